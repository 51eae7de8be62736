"""The committed man pages render with man(1) without a warning (groff's -ww, through man-db's
--warnings), at 80 columns, with the sections a reader looks for."""

import os
import subprocess

import pytest

from tests.conftest import need_tool
from tools.clidocs.pages import REPO

PAGES = {"docs/man/dirtylogd.8": "DIRTYLOGD(8)", "docs/man/dirtylogctl.1": "DIRTYLOGCTL(1)"}


def render(page: str) -> subprocess.CompletedProcess[str]:
    need_tool("man")
    need_tool("groff")
    return subprocess.run(
        ["man", "--warnings", "-l", str(REPO / page)],
        env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("page", sorted(PAGES))
def test_the_man_page_renders_without_warnings(page):
    done = render(page)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].startswith(PAGES[page]) and lines[0].endswith(PAGES[page])
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "SEE ALSO"):
        assert section in lines, f"{page} has no {section} section"
    assert max(map(len, lines)) <= 80, "a line wider than MANWIDTH"
    assert "\u2010" not in done.stdout, "hyphenated: an option or a path broken across lines"


def test_the_client_page_lists_every_command_and_exit_status():
    text = render("docs/man/dirtylogctl.1").stdout
    assert "COMMANDS" in text.splitlines()
    for words in ("vm create", "consumer add", "migrate-receive", "workload start", "qmp"):
        assert f"\n   {words}\n" in text, words
    for code in ("0", "1", "2", "3", "4", "5", "130", "141"):
        assert f"\n       {code} " in text, code


def test_the_daemon_page_says_where_things_live_and_how_the_config_file_is_typed():
    text = render("docs/man/dirtylogd.8").stdout
    for path in ("/run/dirtylogd/qmp.sock", "/run/dirtylogd/ram", "/var/lib/dirtylogd"):
        assert f"\n       {path}\n" in text
    assert "/tmp/dirtylogd-UID/dirtylogd/qmp.sock" in text
    assert 'demo = "false"' in text
