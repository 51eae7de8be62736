"""The service as a packager installs it, under a live systemd: Debian bookworm in a container.

The wheel built from this checkout goes into ``/opt/dirtylogd`` inside a booted bookworm tree
(tests/deployment/container.py) the documented way — ``python3 -m venv``, ``pip install``,
``dirtylogd-install-units``, ``systemctl enable --now dirtylogd.socket`` — and is then used as
an operator would: first connect, a group member, a stop and a start, a hung process, a
provoked error in the journal, a scrape of the metrics. The tests share one boot and run in
file order; each states what it leaves behind.

The dependencies come from a wheelhouse that the host's pip fills (bookworm's python3 is 3.11,
like the host's), bound read-only into the container, so the container needs no network.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deployment.conftest import user_env

from .container import BootedContainer, bookworm_tree, need_container_tools

pytestmark = pytest.mark.deployment

VENV = "/opt/dirtylogd"
CTL = f"{VENV}/bin/dirtylogctl"
SOCKET = "/run/dirtylogd/qmp.sock"
UNIT = "dirtylogd.service"
# Short enough for a test to wait out, long enough for a loaded 2-core host to ping in time.
TEST_WATCHDOG = "4s"


@pytest.fixture(scope="module")
def wheelhouse(built_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel and every runtime dependency as wheels, for an offline pip in the container."""
    house = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary=:all:",
            "-d",
            house,
            built_wheel,
        ],
        check=True,
        env=user_env(),
        cwd=house,
        timeout=600,
    )
    return house


@pytest.fixture(scope="module")
def box(
    wheelhouse: Path,
    built_wheel: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BootedContainer]:
    """A booted bookworm with dirtylogd installed the documented way and its socket enabled."""
    need_container_tools()
    tree = bookworm_tree()
    with BootedContainer(tree, tmp_path_factory.mktemp("box"), {wheelhouse: "/wheels"}) as c:
        c.run(["python3", "-m", "venv", VENV])
        c.run(
            [
                f"{VENV}/bin/pip",
                "install",
                "-q",
                "--no-index",
                "--find-links",
                "/wheels",
                f"/wheels/{built_wheel.name}",
            ],
            timeout=300,
        )
        installed = c.run([f"{VENV}/bin/dirtylogd-install-units"]).stdout
        assert "ran       systemctl daemon-reload" in installed, installed
        # The one test-only change: a watchdog a test can wait out (the unit ships 30 s).
        c.run(["mkdir", "-p", f"/etc/systemd/system/{UNIT}.d"])
        c.run(
            ["tee", f"/etc/systemd/system/{UNIT}.d/test.conf"],
            input=f"[Service]\nWatchdogSec={TEST_WATCHDOG}\n",
        )
        c.run(["systemctl", "daemon-reload"])
        c.run(["systemctl", "enable", "--now", "dirtylogd.socket"])
        c.run(["useradd", "--create-home", "--groups", "dirtylogd", "alice"])
        c.run(["useradd", "--create-home", "bob"])
        yield c


def show(c: BootedContainer, *props: str) -> dict[str, str]:
    out = c.run(["systemctl", "show", UNIT, *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def ctl(
    c: BootedContainer, *args: str, user: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return c.run([CTL, "-s", SOCKET, *args], user=user, check=check)


def vms(c: BootedContainer) -> dict[str, dict]:
    return {vm["name"]: vm for vm in json.loads(ctl(c, "--json", "vm", "list").stdout)}


def pending(c: BootedContainer, vm: str, consumer: str) -> list[list[int]]:
    """The consumer's dirty ranges of slot 0 (taking them)."""
    return json.loads(ctl(c, "--json", "get", vm, "0", "--consumer", consumer).stdout)["ranges"]


def wait_for(what: str, check, timeout: float = 30.0, c: BootedContainer | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n" + (c.journal(UNIT)[-4000:] if c else ""))


def test_the_first_connect_starts_the_service(box):
    """Socket activation: nothing runs until a client connects; its greeting comes from the
    daemon systemd started for it, and the client is served."""
    assert show(box, "ActiveState")["ActiveState"] == "inactive"
    probe = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "t = time.monotonic()\n"
        f"s.connect({SOCKET!r})\n"
        "greeting = s.makefile().readline()\n"
        "print(time.monotonic() - t)\n"
        "print(greeting)\n"
    )
    seconds, greeting = box.run([f"{VENV}/bin/python", "-c", probe]).stdout.splitlines()[:2]
    print(f"\nsocket activation: first greeting {float(seconds) * 1000:.0f} ms after connect")
    assert json.loads(greeting)["QMP"]["capabilities"] is not None
    assert show(box, "ActiveState")["ActiveState"] == "active"
    assert ctl(box, "version").stdout.startswith("dirtylogd")


def test_ready_and_status_reach_systemd(box):
    state = show(box, "Type", "ActiveState", "SubState", "StatusText", "MainPID", "WatchdogUSec")
    assert state["Type"] == "notify" and state["SubState"] == "running", state
    assert state["StatusText"] == f"serving QMP on {SOCKET} (from systemd)", state
    assert state["WatchdogUSec"] == TEST_WATCHDOG, state


def test_a_member_of_the_sockets_group_is_served_and_others_are_told_why_not(box):
    assert ctl(box, "version", user="alice").stdout.startswith("dirtylogd")
    bob = ctl(box, "version", user="bob", check=False)
    assert bob.returncode == 4, bob
    assert "not in group dirtylogd" in bob.stderr, bob.stderr
    # An administrator who widens the socket's mode still does not widen who is served: the
    # daemon refuses bob, and the client prints the daemon's reason.
    box.run(["chmod", "0666", SOCKET])
    try:
        bob = ctl(box, "version", user="bob", check=False)
    finally:
        box.run(["chmod", "0660", SOCKET])
    assert bob.returncode == 4, bob
    assert "refused this client" in bob.stderr and "is not allowed" in bob.stderr, bob.stderr


def test_exposure_under_the_live_systemd(box):
    out = box.run(["systemd-analyze", "security", "--offline=yes", UNIT], check=False).stdout
    m = re.search(r"Overall exposure level for dirtylogd\.service: ([\d.]+)", out)
    assert m, out
    print(f"\nsystemd-analyze security under the live systemd: exposure {m.group(1)}")
    assert float(m.group(1)) <= 1.3


def test_stop_and_start_give_back_every_vm_with_its_pending_pages(box):
    """The RAM sits on its own tmpfs, which a stop leaves alone (leaves VMs g1, g2)."""
    for name in ("g1", "g2"):
        ctl(box, "vm", "create", name, "--slot", "0:0:64M")
        ctl(box, "consumer", "add", name, "mig", "--not-initially-set")
    ctl(box, "io-mark", "g1", "0x10000:0x3000")
    ctl(box, "io-mark", "g2", "0x200000:0x1000")
    pid = show(box, "MainPID")["MainPID"]
    box.run(["systemctl", "stop", UNIT])
    assert show(box, "ActiveState")["ActiveState"] == "inactive"
    ram = box.run(["findmnt", "--noheadings", "--output", "FSTYPE", "/run/dirtylogd/ram"]).stdout
    assert ram.strip() == "tmpfs"
    assert set(box.run(["ls", "/run/dirtylogd/ram"]).stdout.split()) >= {"g1.ram", "g2.ram"}
    box.run(["systemctl", "start", UNIT])
    assert show(box, "MainPID")["MainPID"] != pid
    listed = vms(box)
    assert {n: v["status"] for n, v in listed.items()} == {"g1": "ok", "g2": "ok"}, listed
    assert pending(box, "g1", "mig") == [[16, 3]]
    assert pending(box, "g2", "mig") == [[512, 1]]


def test_the_watchdog_restarts_a_process_that_stopped_answering(box):
    """SIGSTOP stands for a hung event loop: no WATCHDOG=1, so systemd kills and restarts it
    (leaves the VMs, all dirty: a killed daemon cannot say what it missed)."""
    before = show(box, "MainPID", "NRestarts")
    box.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", UNIT])
    t = time.monotonic()
    after = wait_for(
        "a restart by the watchdog",
        lambda: (
            (s := show(box, "MainPID", "NRestarts", "SubState"))["SubState"] == "running"
            and s["MainPID"] not in ("0", before["MainPID"])
            and s
        ),
        c=box,
    )
    print(f"\nwatchdog: restarted {time.monotonic() - t:.1f} s after SIGSTOP ({TEST_WATCHDOG})")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert "watchdog timeout" in box.journal(UNIT).lower()
    assert set(vms(box)) == {"g1", "g2"}
    assert pending(box, "g1", "mig") == [[0, 16384]]


def test_an_error_reaches_journalctl_p_err(box):
    """As after a reboot: the RAM tmpfs comes back empty, the VMs are listed as ram-lost and
    the daemon logs why at priority err (leaves g1 and g2 ram-lost)."""
    box.run(["systemctl", "stop", UNIT, "run-dirtylogd-ram.mount"])
    box.run(["systemctl", "start", UNIT])  # mounts an empty tmpfs again
    listed = vms(box)
    assert {n: v["status"] for n, v in listed.items()} == {"g1": "ram-lost", "g2": "ram-lost"}
    errors = box.journal(UNIT, priority="err")
    assert "vm g1 cannot be restored (ram-lost)" in errors, errors


def test_process_metrics_are_exported_under_the_unit(box):
    scrape = (
        "import urllib.request\n"
        "print(urllib.request.urlopen('http://127.0.0.1:8742/metrics', timeout=10).read().decode())"
    )
    text = box.run([f"{VENV}/bin/python", "-c", scrape]).stdout
    for series in (
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
        "dirtylogd_",
    ):
        assert re.search(rf"^{series}", text, re.MULTILINE), f"no {series} in:\n{text[:2000]}"
