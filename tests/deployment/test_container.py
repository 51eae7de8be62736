"""The container harness itself: boots, runs commands as root and as a user, and leaves no
trace on the host or in the cached tree. Later deployment tests rely on exactly this."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deployment.container import (
    BootedContainer,
    ContainerCommandError,
    bookworm_tree,
    need_container_tools,
)

pytestmark = pytest.mark.deployment


@pytest.fixture(scope="module")
def tree() -> Path:
    need_container_tools()
    return bookworm_tree()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host directory bound read-only into the module's container."""
    folder = tmp_path_factory.mktemp("shared")
    (folder / "hello.txt").write_text("from the host\n")
    return folder


@pytest.fixture(scope="module")
def container(
    tree: Path, shared: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BootedContainer]:
    with BootedContainer(tree, tmp_path_factory.mktemp("container"), {shared: "/srv/shared"}) as c:
        yield c


def test_systemd_is_up(container: BootedContainer) -> None:
    state = container.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded"), container.console_log()
    assert container.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert container.run(["hostname"]).stdout.strip() == "dirtylogd-test"
    # The journal answers, and a clean boot logs nothing at warning or above.
    assert "Journal started" in container.journal()
    assert container.journal(priority="warning") == ""


def test_python_venv(container: BootedContainer) -> None:
    proc = container.run(
        [
            "sh",
            "-c",
            "python3 -m venv /tmp/v && /tmp/v/bin/python -c 'import sys; print(sys.version)'",
        ]
    )
    assert proc.stdout.startswith("3.11."), proc.stdout


def test_user_gets_the_container_groups(container: BootedContainer) -> None:
    # kvm exists as on a real Debian host (udev's postinst), as a system group
    kvm = container.run(["getent", "group", "kvm"]).stdout.split(":")
    assert int(kvm[2]) < 1000, kvm
    container.run(["useradd", "-m", "-G", "kvm", "alice"])
    ids = container.run(["id"], user="alice").stdout
    assert "(alice)" in ids and f"{kvm[2]}(kvm)" in ids, ids
    assert container.run(["id", "-Gn"], user="alice").stdout.split() == ["alice", "kvm"]
    assert container.run(["sh", "-c", "echo $HOME"], user="alice").stdout == "/home/alice\n"


def test_read_only_bind(container: BootedContainer) -> None:
    assert container.run(["cat", "/srv/shared/hello.txt"]).stdout == "from the host\n"
    proc = container.run(["touch", "/srv/shared/new"], check=False)
    assert proc.returncode != 0 and "Read-only" in proc.stderr


def test_failure_reports_output(container: BootedContainer) -> None:
    with pytest.raises(ContainerCommandError) as info:
        container.run(["sh", "-c", "echo out; echo err >&2; exit 3"], input="")
    message = str(info.value)
    assert info.value.returncode == 3
    assert "exited 3" in message and "out" in message and "err" in message
    assert "--- console (end)" in message
    with pytest.raises(subprocess.TimeoutExpired):
        container.run(["sleep", "30"], timeout=0.5)
    assert container.run(["cat"], input="piped").stdout == "piped"


def test_boot_leaves_no_trace(tree: Path, tmp_path: Path) -> None:
    """A file written in one boot is in neither the cached tree nor the next boot; nothing stays
    mounted or running, and no cgroup is left behind."""
    marker = "/root/written-by-a-boot"
    with BootedContainer(tree, tmp_path) as first:
        first.run(["sh", "-c", f"echo x > {marker}"])
        assert (first.upper / marker.lstrip("/")).exists()
        nspawn = first._nspawn
        leader = first.leader
        cgroups = list(first._cgroups)
        assert nspawn is not None and leader is not None and cgroups
    assert not (tree / marker.lstrip("/")).exists()
    assert not os.path.ismount(first.root)
    assert not first.upper.exists()
    assert nspawn.poll() is not None
    assert not Path(f"/proc/{leader}").exists()
    assert not any(path.exists() for path in cgroups)
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts
    assert (tmp_path / "console.log").read_text()  # kept for diagnosis

    with BootedContainer(tree, tmp_path) as second:
        assert second.run(["test", "-e", marker], check=False).returncode == 1
