"""dirtylogctl's commands against a stand-in for the daemon: what a reply's shape makes of them."""

import asyncio
import json
from typing import Any

import pytest

from dirtylogctl.cli import Ctl, ReplyError

VERSION_INFO = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "dirtylogd 0.1.0"}


class Answers:
    """Enough of QMPClient for one command: ``execute`` answers from a table."""

    def __init__(self, **replies: Any) -> None:
        self.replies = replies

    async def execute(self, command: str, arguments: Any = None) -> Any:
        return self.replies[command]


def version(reply: Any, as_json: bool = False) -> None:
    ctl = Ctl(Answers(**{"query-version": reply}), as_json)
    asyncio.run(ctl.cmd_version(None))


def test_version_prints_the_package_line_of_qemus_version_info(capsys):
    version(VERSION_INFO)
    assert capsys.readouterr().out == "dirtylogd 0.1.0\n"
    version(VERSION_INFO, as_json=True)
    assert json.loads(capsys.readouterr().out) == VERSION_INFO


@pytest.mark.parametrize(
    "reply",
    [
        {"dirtylogd": VERSION_INFO["qemu"], "package": "dirtylogd 0.1.0"},  # before issue 13
        {"qemu": {"major": 0}, "package": "dirtylogd 0.1.0"},
        {"qemu": VERSION_INFO["qemu"]},
    ],
)
def test_a_version_that_is_not_version_info_is_a_reply_error_not_a_traceback(reply):
    with pytest.raises(ReplyError, match="query-version returned no VersionInfo"):
        version(reply)
