"""dirtylogd-install-units into a staging root (--root): what a packager or an admin gets."""

from pathlib import Path

import pytest

from dirtylogd.ops import install

REPO = Path(__file__).resolve().parents[4]
EXE = "/srv/venv/bin/dirtylogd"


def run(*args: str) -> int:
    return install.main([*args, "--executable", EXE])


def test_every_shipped_systemd_file_is_installed_and_none_is_forgotten(tmp_path):
    shipped = {p.name for p in (REPO / "systemd").iterdir()}
    assert shipped == {t.name for t in install.TARGETS}
    assert run("--root", str(tmp_path)) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [
        "etc/systemd/system/dirtylogd.service",
        "etc/systemd/system/dirtylogd.socket",
        "etc/systemd/system/run-dirtylogd-ram.mount",
        "etc/sysusers.d/dirtylogd.conf",
        "etc/tmpfiles.d/dirtylogd.conf",
    ]


def test_execstart_names_the_installation_and_the_socket_group_is_admitted(tmp_path):
    assert run("--root", str(tmp_path)) == 0
    unit = (tmp_path / "etc/systemd/system/dirtylogd.service").read_text()
    (execstart,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert execstart.startswith(f"ExecStart={EXE} ")
    assert "--allow-gid=dirtylogd" in execstart  # the group the socket unit grants
    assert "--runtime-dir=/run/dirtylogd/ram" in execstart
    assert install.TEMPLATE_EXEC not in unit


def test_a_second_install_changes_nothing_and_says_so(tmp_path, capsys):
    assert run("--root", str(tmp_path)) == 0
    capsys.readouterr()
    assert run("--root", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("unchanged") == len(install.TARGETS) and "wrote" not in out


def test_a_file_someone_else_wrote_is_left_alone_unless_forced(tmp_path, capsys):
    mine = tmp_path / "etc/systemd/system/dirtylogd.service"
    mine.parent.mkdir(parents=True)
    mine.write_text("[Service]\nExecStart=/usr/local/bin/my-dirtylogd\n")
    assert run("--root", str(tmp_path)) == 1
    assert "left alone" in capsys.readouterr().err
    assert mine.read_text().startswith("[Service]")
    assert not (tmp_path / "etc/systemd/system/dirtylogd.socket").exists()  # all or nothing
    assert run("--root", str(tmp_path), "--force") == 0
    assert mine.read_text().startswith(install.MARKER)


def test_remove_deletes_only_what_it_wrote(tmp_path, capsys):
    assert run("--root", str(tmp_path)) == 0
    foreign = tmp_path / "etc/tmpfiles.d/dirtylogd.conf"
    foreign.write_text("d /run/mine 0755 root root -\n")
    assert run("--root", str(tmp_path), "--remove") == 0
    assert "kept" in capsys.readouterr().out
    assert foreign.exists()
    assert not (tmp_path / "etc/systemd/system/dirtylogd.service").exists()


@pytest.mark.parametrize("exe", ["dirtylogd", "/nonexistent/bin/dirtylogd"])
def test_an_executable_that_cannot_run_is_refused_for_the_live_system(exe, capsys):
    assert install.main(["--executable", exe]) == 1
    assert "dirtylogd-install-units:" in capsys.readouterr().err
