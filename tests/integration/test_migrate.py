"""dirtylogctl migrate against a real daemon: byte-identical results, the I/O gap, failures,
convergence, and a receiver on another (network-namespace) host."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager, suppress

import numpy as np
import pytest

from tests.conftest import need

from .full_fs import tiny_tmpfs

MiB = 1 << 20


def ctl(daemon, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "dirtylogctl.cli", "-s", daemon.socket, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def migrate(daemon, vm, dest, *extra):
    out = ctl(daemon, "--json", "migrate", vm, dest, *extra)
    doc = json.loads(out.stdout) if out.stdout.strip().startswith("{") else None
    return out, doc


@pytest.fixture
def running_vm(qmp, request):
    """A 64 MiB softmmu VM (two slots) with two vCPUs storing 20,000 pages/s."""
    made = []

    def make(esop=True, pps=20_000, dma_share=0.0, dma_report=True, backend="softmmu"):
        name = f"mig-{uuid.uuid4().hex[:8]}"
        qmp(
            "vm-create",
            name=name,
            backend=backend,
            esop=esop,
            memslots=[
                {"slot": 0, "guest-phys-addr": 4 << 30, "size": 48 * MiB},
                {"slot": 1, "guest-phys-addr": 8 << 30, "size": 16 * MiB},
            ],
        )
        qmp(
            "sim-workload-start",
            vm=name,
            pages_per_second=pps,
            vcpus=2,
            seed=7,
            dma_share=dma_share,
            dma_report=dma_report,
        )
        time.sleep(0.3)
        made.append(name)
        return name

    yield make
    for name in made:
        qmp("vm-remove", vm=name)


def vm_state(qmp, name):
    return next(v for v in qmp("query-vms") if v["name"] == name)


@pytest.mark.parametrize("esop", [True, False], ids=["esop", "non-esop"])
def test_running_guest_migrates_byte_identical(daemon, qmp, running_vm, tmp_path, esop):
    vm = running_vm(esop=esop)
    out, doc = migrate(daemon, vm, str(tmp_path / "image"), "--verify")
    assert out.returncode == 0, out.stderr
    assert doc["status"] == "completed" and doc["verify"]["differing-pages"] == 0
    assert doc["ram"]["dirty-sync-count"] >= 2 and doc["ram"]["pages-resent"] > 0
    assert vm_state(qmp, vm)["paused"] is True  # like QEMU, the source stays stopped
    assert [c["name"] for c in vm_state(qmp, vm)["consumers"]] == ["default"]  # tidied up


def test_io_gap_unreported_dma_is_found_and_named(daemon, running_vm, tmp_path):
    vm = running_vm(dma_share=0.3, dma_report=False)
    out, doc = migrate(daemon, vm, str(tmp_path / "image"), "--verify", "--max-bandwidth", "100M")
    assert out.returncode == 5, out.stderr  # the seed's gap is real
    assert doc["verify"]["differing-pages"] > 0
    assert all(addr.startswith("0x") for addr in doc["verify"]["first"])


def test_io_gap_closed_by_reporting(daemon, running_vm, tmp_path):
    vm = running_vm(dma_share=0.3, dma_report=True)
    out, doc = migrate(daemon, vm, str(tmp_path / "image"), "--verify", "--max-bandwidth", "100M")
    assert out.returncode == 0, out.stderr
    assert doc["verify"]["differing-pages"] == 0


def test_slow_workload_converges_within_the_downtime_limit(daemon, running_vm, tmp_path):
    vm = running_vm(pps=5_000)
    out, doc = migrate(daemon, vm, str(tmp_path / "image"), "--verify", "--resume")
    assert out.returncode == 0, out.stderr
    assert doc["converged"] is True and doc["downtime"] <= 300
    assert doc["expected-downtime"] <= 300


def test_fast_workload_stops_at_max_rounds_and_says_so(daemon, qmp, running_vm, tmp_path):
    vm = running_vm(pps=50_000)
    out, doc = migrate(
        daemon,
        vm,
        str(tmp_path / "image"),
        "--verify",
        "--max-bandwidth",
        "20M",
        "--max-rounds",
        "3",
        "--resume",
    )
    assert out.returncode == 0, out.stderr
    assert doc["converged"] is False and doc["ram"]["dirty-sync-count"] == 5  # 0..3 + final
    assert any("did not converge within 3 rounds" in n for n in doc["notes"])
    assert doc["verify"]["differing-pages"] == 0
    assert vm_state(qmp, vm)["paused"] is False  # --resume


@contextmanager
def receiver(output, host="127.0.0.1", netns=None):
    """dirtylogctl migrate-receive on an ephemeral port (optionally inside a network namespace)."""
    preexec = None
    if netns is not None:
        from pyroute2 import netns as nsmod

        def preexec():
            nsmod.setns(netns, flags=0)

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dirtylogctl.cli",
            "migrate-receive",
            "--listen",
            f"{host}:0",
            "--output",
            str(output),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,
    )
    line = proc.stdout.readline()
    assert line.startswith("listening on"), line + proc.stderr.read()
    port = int(line.rsplit(":", 1)[1])
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_tcp_migration_to_migrate_receive(daemon, running_vm, tmp_path):
    vm = running_vm()
    with receiver(tmp_path / "remote.img") as (proc, port):
        out, doc = migrate(daemon, vm, f"tcp:127.0.0.1:{port}", "--verify")
        assert out.returncode == 0, out.stderr
        assert doc["verify"]["differing-pages"] == 0
        assert proc.wait(30) == 0
        assert "received" in proc.stdout.read()


def test_the_sender_is_told_why_the_receiver_refused_the_stream(tmp_path):
    from dirtylogctl.stream import TcpSink
    from dirtylogctl.wireformat import Header, StreamError

    reason = "stream format version 2 is not supported (this receiver speaks version 1)"
    with receiver(tmp_path / "never.img") as (proc, port):
        sink = TcpSink("127.0.0.1", port)
        sink.start(Header("t", (), version=2))
        assert proc.wait(30) == 1  # refused and gone: the pages below meet a closed socket
        assert reason in proc.stderr.read()
        pages = np.zeros((256, 4096), np.uint8)
        with pytest.raises(StreamError, match=re.escape(f"refused the stream: {reason}")):
            for _ in range(64):
                sink.send_pages(np.arange(256) * 4096, pages)
            sink.finish(64 * 256)
        sink.close()


class FlippingProxy(threading.Thread):
    """Forwards one TCP connection, flipping one byte of the sender's stream at ``at``."""

    def __init__(self, target_port, at):
        super().__init__(daemon=True)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target, self.at = target_port, at

    def run(self):
        conn, _ = self.server.accept()
        up = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self.pump, args=(up, conn, None), daemon=True).start()
        self.pump(conn, up, self.at)

    @staticmethod
    def pump(src, dst, flip_at):
        seen = 0
        try:
            while data := src.recv(65536):
                if flip_at is not None and seen <= flip_at < seen + len(data):
                    data = bytearray(data)
                    data[flip_at - seen] ^= 0x01
                seen += len(data)
                dst.sendall(bytes(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_a_flipped_byte_fails_the_migration_and_the_source_runs_on(
    daemon, qmp, running_vm, tmp_path
):
    vm = running_vm()
    with receiver(tmp_path / "bad.img") as (proc, port):
        proxy = FlippingProxy(port, at=5 * MiB)
        proxy.start()
        out = ctl(daemon, "migrate", vm, f"tcp:127.0.0.1:{proxy.port}")
        assert out.returncode == 1
        assert "migration failed" in out.stderr
        assert "checksum mismatch" in out.stderr or "connection" in out.stderr, out.stderr
        assert proc.wait(30) == 1
        assert "checksum mismatch" in proc.stderr.read()
    state = vm_state(qmp, vm)
    assert state["paused"] is False  # never left stopped by accident
    before = state["workload"]["pages-stored"]
    time.sleep(0.2)
    assert vm_state(qmp, vm)["workload"]["pages-stored"] > before  # and still storing


def test_a_receiver_that_dies_mid_stream_fails_the_migration_cleanly(
    daemon, qmp, running_vm, tmp_path
):
    vm = running_vm()
    image = tmp_path / "half.img"
    with receiver(image) as (proc, port):
        sender = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dirtylogctl.cli",
                "-s",
                daemon.socket,
                "migrate",
                vm,
                f"tcp:127.0.0.1:{port}",
                "--max-bandwidth",
                "20M",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while (not image.exists() or image.stat().st_size < MiB) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        _, err = sender.communicate(timeout=60)
    assert sender.returncode == 1 and "migration failed" in err, err
    assert vm_state(qmp, vm)["paused"] is False


def test_an_image_whose_file_system_is_too_small_is_a_clear_error_not_a_crash(
    daemon, qmp, running_vm, tmp_path
):
    """The image is a mapped file: a store into a page its full file system cannot hold would
    be SIGBUS. Its slots' space is reserved first, so the receiver — and a local image — fail
    at the start with one line naming ENOSPC, and the source runs on."""
    vm = running_vm()  # 64 MiB of slots; the file system below holds 1 MiB
    with tiny_tmpfs(tmp_path / "fs", MiB) as fs:
        with receiver(fs / "remote.img") as (proc, port):
            out, _ = migrate(daemon, vm, f"tcp:127.0.0.1:{port}")
            assert proc.wait(30) == 1
            err = proc.stderr.read()
        assert out.returncode == 1 and "No space left on device (ENOSPC)" in out.stderr, out.stderr
        assert err.startswith("dirtylogctl: receive failed: cannot reserve the 67108864 bytes")
        assert err.count("\n") == 1 and "(ENOSPC)" in err, err
        out, _ = migrate(daemon, vm, str(fs / "local.img"))
        assert out.returncode == 1 and "No space left on device (ENOSPC)" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert sorted(p.name for p in fs.iterdir()) == []  # nothing half-reserved is left
    assert vm_state(qmp, vm)["paused"] is False


NS_ADDR, HOST_ADDR = "10.213.7.2", "10.213.7.1"


def test_migration_to_a_receiver_in_another_network_namespace(daemon, running_vm, tmp_path):
    need(os.geteuid() == 0, "creating network namespaces needs root")
    from pyroute2 import IPRoute, NetNS
    from pyroute2 import netns as nsmod

    name = f"dlg-{uuid.uuid4().hex[:6]}"
    host_if, ns_if = f"{name}a", f"{name}b"
    nsmod.create(name)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer=ns_if)
            ipr.link("set", index=ipr.link_lookup(ifname=ns_if)[0], net_ns_fd=name)
            index = ipr.link_lookup(ifname=host_if)[0]
            ipr.addr("add", index=index, address=HOST_ADDR, prefixlen=30)
            ipr.link("set", index=index, state="up")
        with NetNS(name) as ns:
            index = ns.link_lookup(ifname=ns_if)[0]
            ns.addr("add", index=index, address=NS_ADDR, prefixlen=30)
            ns.link("set", index=index, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        vm = running_vm()
        with receiver(tmp_path / "other-host.img", host=NS_ADDR, netns=name) as (proc, port):
            out, doc = migrate(daemon, vm, f"tcp:{NS_ADDR}:{port}", "--verify")
            assert out.returncode == 0, out.stderr
            assert doc["verify"]["differing-pages"] == 0
            assert proc.wait(30) == 0
    finally:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=host_if):
                ipr.link("del", index=index)
        nsmod.remove(name)
    assert name not in nsmod.listnetns()


CTL = [sys.executable, "-m", "dirtylogctl.cli"]


def _consumers(qmp, name):
    return [c["name"] for c in vm_state(qmp, name)["consumers"]]


def _wait_for(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def vm_with_an_unlogged_slot(qmp):
    """4 MiB logged and 64 MiB without dirty logging: the 64 MiB go at switch-over, with the
    source stopped, which makes the stopped phase long enough to interrupt."""
    name = f"mig-{uuid.uuid4().hex[:8]}"
    qmp(
        "vm-create",
        name=name,
        backend="softmmu",
        memslots=[
            {"slot": 0, "guest-phys-addr": 0, "size": 4 * MiB},
            {"slot": 1, "guest-phys-addr": 1 << 30, "size": 64 * MiB, "log-dirty-pages": False},
        ],
    )
    yield name
    qmp("vm-remove", vm=name)


@pytest.mark.parametrize("phase", ["during a round", "with the source stopped"])
def test_ctrl_c_stops_a_migration_within_a_second_and_leaves_the_source_running(
    daemon, qmp, running_vm, vm_with_an_unlogged_slot, tmp_path, phase
):
    """SIGINT used to wait for the round's copy (time.sleep under a bandwidth cap) and end in a
    traceback. Now: exit 130 at once, one line, the source running, our consumer gone."""
    vm = running_vm() if phase == "during a round" else vm_with_an_unlogged_slot
    sender = subprocess.Popen(
        [
            *CTL,
            "-s",
            daemon.socket,
            "migrate",
            vm,
            str(tmp_path / "image"),
            "--max-bandwidth",
            "8M",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if phase == "during a round":  # round 0 alone takes 8 s at 8 MB/s
            _wait_for(lambda: len(_consumers(qmp, vm)) == 2, "the migration's consumer")
            time.sleep(0.5)
        else:  # 64 MiB at 8 MB/s after stop
            _wait_for(lambda: vm_state(qmp, vm)["paused"], "the switch-over")
            time.sleep(0.3)
        assert sender.poll() is None, sender.communicate()
        interrupted = time.monotonic()
        sender.send_signal(signal.SIGINT)
        _, err = sender.communicate(timeout=30)
        took = time.monotonic() - interrupted
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    assert sender.returncode == 130, err
    assert took < 1.5, took
    assert err == f"dirtylogctl: migration of {vm} interrupted; the source VM is running\n"
    state = vm_state(qmp, vm)
    assert state["paused"] is False
    assert _consumers(qmp, vm) == ["default"]


def test_migrating_a_vm_that_does_not_exist_is_refused_with_exit_3(daemon, tmp_path):
    """Not exit 1 with "the source VM is running" about a VM that is not there."""
    out = ctl(daemon, "migrate", "nosuch", str(tmp_path / "x.img"))
    assert out.returncode == 3
    assert out.stderr == "dirtylogctl: DeviceNotFound: no VM named 'nosuch'\n"
    assert not (tmp_path / "x.img").exists()


def test_a_migration_whose_report_nobody_reads_still_completes(daemon, qmp, running_vm, tmp_path):
    """The image is the product and the exit code says how it went; the progress lines and the
    summary are a report, dropped without a word when stdout's reader has gone."""
    vm = running_vm(pps=5_000)
    r, w = os.pipe()
    os.close(r)
    sender = subprocess.run(
        [*CTL, "-s", daemon.socket, "migrate", vm, str(tmp_path / "image"), "--verify", "--resume"],
        stdout=w,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(w)
    assert (sender.returncode, sender.stderr) == (0, "")
    assert (tmp_path / "image").stat().st_size > 0
    assert vm_state(qmp, vm)["paused"] is False and _consumers(qmp, vm) == ["default"]
