"""The committed completion scripts, in real shells: bash, and zsh (CI installs it; the
development machine has none, so there the zsh tests skip).

bash is driven the way readline drives it: COMP_WORDS and COMP_CWORD set, the function named by
``complete -p`` called, COMPREPLY read. zsh needs its line editor, so it runs interactively on a
pseudo-terminal with a completion widget that records what the completion functions offer.
"""

import os
import pty
import select
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import need_tool
from tools.clidocs.pages import REPO

BASH = REPO / "completions" / "bash"
ZSH = REPO / "completions" / "zsh"


def bash_complete(program: str, *words: str) -> list[str]:
    """What Tab offers after ``program words...`` (the last word is the one being completed)."""
    script = f"""
        source {BASH / program}
        spec=$(complete -p {program}) || exit 3
        [[ $spec == "complete -F _{program} {program}" ]] || exit 4
        COMP_WORDS=({program} "$@")
        COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
        COMP_LINE="${{COMP_WORDS[*]}}"
        COMP_POINT=${{#COMP_LINE}}
        _{program} {program} "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script, "bash", *words],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, ""), done
    return done.stdout.split()


@pytest.mark.parametrize("program", ["dirtylogd", "dirtylogctl"])
def test_the_bash_script_loads_and_registers_its_function(program):
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", f"source {BASH / program}; complete -p {program}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"complete -F _{program} {program}\n"


@pytest.mark.parametrize(
    ("words", "offered"),
    [
        (
            [""],
            "version vm memslot consumer get clear io-mark rate calc-dirty-rate dirty-limit "
            "stop cont workload migrate migrate-receive qmp",
        ),
        (["v"], "version vm"),
        (["vm", ""], "list show create remove"),
        (["vm", "c"], "create"),
        (["-s", "/x.sock", "--timeout", "3", "w"], "workload"),  # option values are skipped
        (["--socket", "=", "/x.sock", "vm", "l"], "list"),  # --socket=/x.sock
        (["vm", "create", "--b"], "--backend"),
        (["vm", "create", "--backend", ""], "auto softmmu kvm"),
        (["vm", "create", "--backend", "=", "s"], "softmmu"),
        (["workload", "start", "--pattern", "h"], "hot-set"),
        (["clear", "--"], "--help --all --bitmap-file --as-id --consumer"),
        (["--j"], "--json"),
        (["vm", "list", "--j"], ""),  # --json belongs to dirtylogctl, not to vm list
        (["get", "demo", "0", "--consumer", ""], ""),  # a consumer's name: not guessed
    ],
)
def test_bash_completes_dirtylogctl(words, offered):
    assert bash_complete("dirtylogctl", *words) == offered.split()


def test_bash_completes_file_names_where_the_value_is_a_file(tmp_path):
    (tmp_path / "bitmap.bin").write_bytes(b"")
    (tmp_path / "bits").mkdir()
    prefix = str(tmp_path / "bi")
    assert sorted(bash_complete("dirtylogctl", "get", "--out", prefix)) == [
        str(tmp_path / "bitmap.bin"),
        str(tmp_path / "bits"),
    ]
    assert bash_complete("dirtylogd", "--runtime-dir", prefix) == [str(tmp_path / "bits")]


def test_bash_completes_dirtylogd():
    assert bash_complete("dirtylogd", "--log-level", "") == ["debug", "info", "warning", "error"]
    assert bash_complete("dirtylogd", "--max-c") == [
        "--max-clients",
        "--max-consumers",
        "--max-clients-per-uid",
    ]


# --- zsh --------------------------------------------------------------------------------------
ZSH_PRELUDE = ""  # lines run before compinit: where a zsh outside /usr keeps its modules


def zsh_complete(line: str, tmp_path: Path) -> list[str]:
    """What zsh's completion functions offer for Tab at the end of ``line``."""
    zsh = need_tool("zsh")
    out = tmp_path / "offered"
    out.write_text("")
    rc = tmp_path / "rc.zsh"
    rc.write_text(
        ZSH_PRELUDE
        + textwrap.dedent(f"""
        PS1='' RPS1=''
        fpath=({ZSH} $fpath)
        autoload -Uz compinit && compinit -u -D
        # every candidate offered (compadd -O: matched, not added), then added as usual
        compadd() {{
          if (( ${{@[(I)-[OAD]]}} )); then builtin compadd "$@"; return; fi
          local -a offered
          builtin compadd -O offered "$@"
          (( $#offered )) && print -rl -- $offered >> {out}
          builtin compadd "$@"
        }}
        _record() {{ _main_complete; print -r -- '<<done>>' >> {out} }}
        zle -C record complete-word _record
        bindkey '^I' record
        """)
    )
    leader, follower = pty.openpty()
    shell = subprocess.Popen(
        [zsh, "-f", "-i"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={"PATH": os.environ["PATH"], "TERM": "xterm", "HOME": str(tmp_path)},
        start_new_session=True,
    )
    os.close(follower)
    screen = b""
    try:
        os.write(leader, f"source {rc}\n{line}\t".encode())
        deadline = time.monotonic() + 30
        while "<<done>>" not in out.read_text() and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.1)[0]:
                try:
                    screen += os.read(leader, 65536)  # keep the terminal from filling up
                except OSError:
                    break
    finally:
        shell.kill()
        shell.wait()
        os.close(leader)
    offered = out.read_text()
    assert "<<done>>" in offered, (
        f"zsh did not complete; its screen:\n{screen.decode(errors='replace')}"
    )
    return offered.partition("<<done>>")[0].split()


@pytest.mark.parametrize("program", ["dirtylogd", "dirtylogctl"])
def test_the_zsh_script_parses(program):
    zsh = need_tool("zsh")
    done = subprocess.run([zsh, "-n", str(ZSH / f"_{program}")], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize(
    ("line", "offered"),
    [
        ("dirtylogctl v", "version vm"),
        ("dirtylogctl vm ", "list show create remove"),
        ("dirtylogctl -s /x.sock vm c", "create"),
        ("dirtylogctl vm create --backend ", "auto softmmu kvm"),
        ("dirtylogctl workload start --pattern=h", "hot-set"),
        ("dirtylogctl --version ", ""),
        ("dirtylogd --log-level ", "debug info warning error"),
        ("dirtylogd --st", "--state-dir"),
    ],
)
def test_zsh_completes(line, offered, tmp_path):
    assert zsh_complete(line, tmp_path) == offered.split()
