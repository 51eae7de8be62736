"""dirtylogctl's own flags: --version needs no daemon; help and version into a closed pipe are
quiet (`dirtylogctl --help | head -1`)."""

import os
import subprocess
import sys

import pytest

from dirtylogctl import __version__, cli
from dirtylogctl.paths import DEFAULT_SOCKET_RULE


def test_version_is_the_clients_and_asks_no_daemon(tmp_path, capsys):
    """Parsed before any connection: a socket nobody listens on changes nothing."""
    with pytest.raises(SystemExit) as done:
        cli.main(["-s", str(tmp_path / "nobody.sock"), "--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"dirtylogctl {__version__}\n"


def test_the_socket_help_names_this_users_default_or_the_rule():
    def socket_help(parser):
        (action,) = [a for a in parser._actions if "--socket" in a.option_strings]
        return action.help

    assert "$XDG_RUNTIME_DIR" not in socket_help(cli.build_parser())  # a real path here
    assert socket_help(cli.build_parser(fallback=DEFAULT_SOCKET_RULE)).endswith(
        f"else {DEFAULT_SOCKET_RULE})"
    )


def run_into(stdout, *args):
    return subprocess.run(
        [sys.executable, "-m", "dirtylogctl.cli", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["vm", "--help"], ["migrate", "--help"]]
)
def test_help_and_version_into_a_pipe_nobody_reads_are_quiet(args):
    r, w = os.pipe()
    os.close(r)  # what `| head -1` leaves once it has its line
    try:
        done = run_into(w, *args)
    finally:
        os.close(w)
    assert (done.returncode, done.stderr) == (0, "")


def test_help_piped_to_head_prints_one_line_and_nothing_else():
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f'"{sys.executable}" -m dirtylogctl.cli --help | head -1'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("usage: dirtylogctl ") and done.stdout.count("\n") == 1
