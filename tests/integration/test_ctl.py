"""dirtylogctl as a user runs it: a real process against a real daemon."""

import json
import os
import subprocess
import sys

import pytest

from kvmshim.bitmap import DirtyBitmap

from .full_fs import fill_leaving, tiny_tmpfs


@pytest.fixture
def ctl(daemon):
    def run(*args, check=True):
        out = subprocess.run(
            [sys.executable, "-m", "dirtylogctl.cli", "-s", daemon.socket, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check:
            assert out.returncode == 0, out.stderr
        return out

    return run


def test_vm_lifecycle_in_tables_and_json(ctl):
    assert (
        "created vm cli"
        in ctl(
            "vm",
            "create",
            "cli",
            "--slot",
            "0:0:4M",
            "--slot",
            "1:16M:1M:nolog",
            "--backend",
            "softmmu",
        ).stdout
    )
    listing = ctl("vm", "list").stdout.splitlines()
    assert listing[0].split() == [
        "NAME",
        "BACKEND",
        "SLOTS",
        "CONSUMERS",
        "PAUSED",
        "GENERATION",
        "WORKLOAD",
    ]
    assert any(line.split()[:3] == ["cli", "softmmu", "2"] for line in listing[1:])
    shown = json.loads(ctl("--json", "vm", "show", "cli").stdout)
    assert [m["log-dirty-pages"] for m in shown["memslots"]] == [True, False]
    ctl("vm", "remove", "cli")


def test_get_clear_io_and_get_out_file(ctl, tmp_path):
    ctl("vm", "create", "cli2", "--slot", "0:0:1M", "--backend", "softmmu")
    ctl("qmp", "sim-write-pages", '{"vm": "cli2", "gfns": [1, 2, 3, 200], "value": 9}')
    assert "4 of 256 pages dirty" in ctl("get", "cli2", "0").stdout
    ctl("io-mark", "cli2", "0x5000:8K")
    ctl("consumer", "add", "cli2", "mp", "--manual-protect")
    out = tmp_path / "bitmap"
    ctl("get", "cli2", "0", "--consumer", "mp", "--out", str(out))
    assert DirtyBitmap.from_bytes(256, out.read_bytes()).count() == 256  # initially set
    ctl("clear", "cli2", "0", "0", "256", "--consumer", "mp", "--all")
    ctl("get", "cli2", "0", "--consumer", "mp", "--out", str(out))
    assert DirtyBitmap.from_bytes(256, out.read_bytes()).count() == 0
    assert "5-6" in ctl("get", "cli2", "0").stdout  # the I/O marked pages 5 and 6
    rate = json.loads(ctl("--json", "rate", "cli2").stdout)
    assert rate["status"] == "measured"
    ctl("vm", "remove", "cli2")


def test_get_out_to_a_full_file_system_fails_before_the_pages_are_taken(ctl, tmp_path):
    """The output's space is reserved before the GET: a disk that cannot hold the 32 KiB
    bitmap is a one-line error, and the consumer still has every page."""
    ctl("vm", "create", "full", "--slot", "0:0:1G", "--backend", "softmmu")
    ctl("qmp", "sim-write-pages", '{"vm": "full", "gfns": [1, 262143], "value": 9}')
    with tiny_tmpfs(tmp_path / "fs", 256 << 10) as fs:
        fill_leaving(fs, 16 << 10)
        out = ctl("get", "full", "0", "--out", str(fs / "bitmap"), check=False)
        assert "2 of 262144 pages dirty" in ctl("get", "full", "0").stdout  # nothing was taken
        assert out.returncode == 1
        assert out.stderr == (
            f"dirtylogctl: cannot write {fs / 'bitmap'}: No space left on device "
            "(nothing was asked of the daemon)\n"
        )
        assert [p.name for p in fs.iterdir()] == ["filler"]
    ctl("vm", "remove", "full")


def test_workload_stop_and_cont(ctl):
    ctl("vm", "create", "cli3", "--slot", "0:0:1M", "--backend", "softmmu")
    ctl("workload", "start", "cli3", "--pps", "5000", "--seed", "1")
    assert "stopped" in ctl("stop", "cli3").stdout
    assert "running" in ctl("cont", "cli3").stdout
    ctl("workload", "stop", "cli3")
    ctl("vm", "remove", "cli3")


def test_exit_codes_separate_usage_qmp_and_connection_errors(ctl, tmp_path):
    usage = ctl("vm", "create", check=False)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    refused = ctl("get", "no-such-vm", "0", check=False)
    assert refused.returncode == 3
    assert refused.stderr.strip() == "dirtylogctl: DeviceNotFound: no VM named 'no-such-vm'"
    gone = subprocess.run(
        [sys.executable, "-m", "dirtylogctl.cli", "-s", str(tmp_path / "none"), "version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 4 and "cannot talk to dirtylogd" in gone.stderr
    bad_json = ctl("qmp", "query-vms", "{not json", check=False)
    assert bad_json.returncode == 2 and "not JSON" in bad_json.stderr


def test_socket_comes_from_the_environment(daemon):
    out = subprocess.run(
        [sys.executable, "-m", "dirtylogctl.cli", "version"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DIRTYLOGD_SOCKET": daemon.socket},
    )
    assert out.returncode == 0 and out.stdout.startswith("dirtylogd ")
