"""dirtylogctl migrate against a real daemon: byte-identical results, the I/O gap, failures,
convergence, a receiver on another (network-namespace) host, and a receiver's hostile peers."""

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest

from dirtylogctl.wireformat import (
    MAX_VERIFY_PAGES,
    PAGE_SIZE,
    Header,
    SlotInfo,
    done_frame,
    encode_header,
    page_digests,
    pages_frame,
    verify_frame,
)
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


RECEIVE = [sys.executable, "-m", "dirtylogctl.cli", "migrate-receive"]


@contextmanager
def receiver(output, host="127.0.0.1", netns=None, extra=()):
    """dirtylogctl migrate-receive on an ephemeral port (optionally inside a network namespace)."""
    preexec = None
    if netns is not None:
        from pyroute2 import netns as nsmod

        def preexec():
            nsmod.setns(netns, flags=0)

    proc = subprocess.Popen(
        [*RECEIVE, "--listen", f"{host}:0", "--output", str(output), *extra],
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
    # the image and its keys, written under temporary names, are in place: slot 1 ends at
    # 8 GiB + 16 MiB; a key per page of the 64 MiB of slots
    assert sorted(p.name for p in tmp_path.iterdir()) == ["remote.img", "remote.img.skeys"]
    assert (tmp_path / "remote.img").stat().st_size == (8 << 30) + 16 * MiB
    assert (tmp_path / "remote.img.skeys").stat().st_size == 64 * MiB // PAGE_SIZE


def test_the_sender_is_told_why_the_receiver_refused_the_stream(tmp_path):
    """A header the receiver does not speak: the sender gets the reason (not "Broken pipe"),
    and the receiver drops that peer and waits for the next — the real sender may follow."""
    from dirtylogctl.stream import TcpSink
    from dirtylogctl.wireformat import StreamError

    reason = "stream format version 5 is not supported (this receiver speaks version 4)"
    with receiver(tmp_path / "never.img") as (proc, port):
        sink = TcpSink("127.0.0.1", port)
        pages = np.zeros((256, 4096), np.uint8)
        with pytest.raises(StreamError, match=re.escape(f"refused the stream: {reason}")):
            sink.start(Header("t", (), version=5))  # a version-4 sender waits for CHAN here
            for _ in range(64):
                sink.send_pages(np.arange(256) * 4096, pages)
            sink.finish(64 * 256)
        sink.close()
        line = proc.stderr.readline()
        assert re.fullmatch(
            rf"dirtylogctl: dropped 127\.0\.0\.1:\d+: {re.escape(reason)}; still listening\n", line
        )
        assert proc.poll() is None


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


# --- hostile peers: migrate-receive listens without authentication -----------------------------
def exchange(port, data, timeout=30.0):
    """Send ``data`` as a peer, close the sending side, and return every byte answered."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as peer:
        with suppress(OSError):  # a receiver that refuses early may reset the rest
            peer.sendall(data)
            peer.shutdown(socket.SHUT_WR)
        with suppress(OSError):
            while chunk := peer.recv(65536):
                answer += chunk
    return answer


def one_line(text):
    """The receiver's stderr is one line, and not a traceback."""
    assert text.count("\n") == 1 and text.endswith("\n") and "Traceback" not in text, text
    return text.rstrip("\n")


def test_an_idle_peer_is_dropped_after_the_idle_timeout_and_the_migration_behind_it_succeeds(
    daemon, running_vm, tmp_path
):
    """A peer that connects and sends nothing holds the receiver for --idle-timeout (here 2 s),
    then is told why and dropped; the sender queued behind it migrates, verified."""
    vm = running_vm()
    with receiver(tmp_path / "remote.img", extra=("--idle-timeout", "2")) as (proc, port):
        idle = socket.create_connection(("127.0.0.1", port))
        connected = time.monotonic()
        heard: list[tuple[float, bytes]] = []

        def listen():
            idle.settimeout(60)
            data = b""
            while chunk := idle.recv(4096):
                data += chunk
            heard.append((time.monotonic() - connected, data))

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        out, doc = migrate(daemon, vm, f"tcp:127.0.0.1:{port}", "--verify")
        assert out.returncode == 0, out.stderr
        assert doc["verify"]["differing-pages"] == 0
        assert proc.wait(30) == 0
        listener.join(10)
        held, said = heard[0]
        reason = "no complete stream header within 2 s of connecting"
        assert 1.8 < held < 10 and said.endswith(reason.encode()), (held, said)
        err = one_line(proc.stderr.read())
        assert re.fullmatch(
            rf"dirtylogctl: dropped 127\.0\.0\.1:\d+: {re.escape(reason)}; still listening", err
        )
        idle.close()


def test_a_peer_trickling_its_header_is_dropped_at_the_idle_timeout_all_the_same(tmp_path):
    """A byte every 0.5 s never trips a 2 s idle timeout; the header must be complete 2 s
    after connecting, so the peer is dropped then, and a real stream after it is received."""
    with receiver(tmp_path / "img", extra=("--idle-timeout", "2")) as (proc, port):
        slow = socket.create_connection(("127.0.0.1", port))
        started = time.monotonic()
        with suppress(OSError):
            for byte in SMALL:
                slow.sendall(bytes([byte]))
                time.sleep(0.5)
                if time.monotonic() - started > 10:
                    break
        held = time.monotonic() - started
        line = proc.stderr.readline()
        assert "no complete stream header within 2 s of connecting" in line, line
        assert 1.8 < held < 5, held
        assert exchange(port, SMALL + done_frame(0)).startswith(b"ACK ")
        assert proc.wait(30) == 0
        slow.close()


def test_a_migration_whose_sender_falls_silent_fails_after_the_idle_timeout(tmp_path):
    with receiver(tmp_path / "img", extra=("--idle-timeout", "2")) as (proc, port):
        with socket.create_connection(("127.0.0.1", port)) as peer:
            peer.sendall(SMALL)
            started = time.monotonic()
            assert proc.wait(30) == 1
            assert 1.8 < time.monotonic() - started < 10
        err = one_line(proc.stderr.read())
    assert err == "dirtylogctl: receive failed: nothing from the sender for 2 s"
    assert not (tmp_path / "img").exists() and list(tmp_path.iterdir()) == []


OLD_IMAGE = b"an image from an earlier migration\n" * 1000


def raw_header(slots):
    doc = {"version": 2, "page-size": 4096, "vm": "x", "storage-keys": False, "slots": slots}
    meta = json.dumps(doc).encode()
    return b"DLGMIG1\n" + struct.pack("<I", len(meta)) + meta


SMALL = encode_header(Header("x", (SlotInfo(0, 0, 16),)))
REFUSED_PEERS = {
    # a peer that never sends a valid header is dropped, and the receiver waits on
    "not-a-migration": (b"GET / HTTP/1.1\r\n\r\n", None, "bad magic"),
    "version-5": (encode_header(Header("x", (), version=5)), None, "version 5 is not supported"),
    "version-1": (
        raw_header([]).replace(b'"version": 2', b'"version": 1'),
        None,
        "version 1 carries no storage keys",
    ),
    "slot-2^70": (
        raw_header([{"slot": 1 << 70, "guest-phys-addr": 0, "npages": 1}]),
        None,
        "'slots[0].slot' must be an integer from 0 to 4294967295, not 1180591620717411303424",
    ),
    # from a valid header on, the stream is the migration: its failure ends the receiver
    "slot-reaching-2^63": (
        raw_header([{"slot": 0, "guest-phys-addr": 1 << 63, "npages": 1}]) + done_frame(0),
        1,
        "larger than a file can be",  # before: OverflowError, and the output deleted
    ),
    "broken-off-after-a-page": (
        SMALL + pages_frame(np.array([0]), np.ones(PAGE_SIZE, np.uint8)),
        1,
        "the stream ended before DONE",  # before: the output truncated and half written
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_PEERS))
def test_a_peer_the_receiver_refuses_leaves_an_existing_output_byte_identical(tmp_path, case):
    data, code, reason = REFUSED_PEERS[case]
    output = tmp_path / "vm.img"
    output.write_bytes(OLD_IMAGE)
    with receiver(output) as (proc, port):
        answer = exchange(port, data)
        assert answer.startswith(b"ERR ") and reason.encode() in answer, answer
        if code is None:
            line = proc.stderr.readline()
            assert line.startswith("dirtylogctl: dropped 127.0.0.1:") and reason in line, line
            assert proc.poll() is None  # still listening
        else:
            assert proc.wait(30) == code
            err = one_line(proc.stderr.read())
            assert err.startswith("dirtylogctl: receive failed: ") and reason in err, err
        assert output.read_bytes() == OLD_IMAGE
        assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.img"]  # no temporary left


@pytest.mark.parametrize("where", ["under-a-file", "missing-directory", "read-only-fs"])
def test_an_output_that_cannot_be_written_is_an_error_before_listening(tmp_path, where):
    """Root ignores mode bits, so: a path under a regular file, in a directory that does not
    exist, and on a file system mounted read-only."""
    if where == "read-only-fs":
        with tiny_tmpfs(tmp_path / "ro", MiB) as fs:
            subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
            output, says = fs / "vm.img", "Read-only file system (EROFS)"
            done = run_receiver(output)
    else:
        (tmp_path / "file").write_bytes(b"")
        output, says = {
            "under-a-file": (tmp_path / "file" / "vm.img", "Not a directory (ENOTDIR)"),
            "missing-directory": (
                tmp_path / "missing" / "vm.img",
                "No such file or directory (ENOENT)",
            ),
        }[where]
        done = run_receiver(output)
    assert done.returncode == 1 and done.stdout == ""  # it never listened
    err = one_line(done.stderr)
    assert err == f"dirtylogctl: receive failed: cannot write the image {output}: {says}", err


def run_receiver(output):
    return subprocess.run(
        [*RECEIVE, "--listen", "127.0.0.1:0", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=20,
    )


@pytest.mark.parametrize("why", ["max-image-size", "directory-removed"])
def test_a_sender_whose_stream_the_receiver_refuses_prints_the_receivers_reason(
    daemon, qmp, running_vm, tmp_path, why
):
    """The receiver refuses once the pages flow: the sender's write fails, and what it
    reports is the receiver's ERR, not "Broken pipe"; the source runs on."""
    vm = running_vm()  # 64 MiB of slots
    (tmp_path / "dir").mkdir()
    output = tmp_path / "dir" / "remote.img"
    extra = ("--max-image-size", "1M") if why == "max-image-size" else ()
    with receiver(output, extra=extra) as (proc, port):
        if why == "max-image-size":
            reason = (
                "the image needs 67108864 bytes for its slots, over the receiver's limit of "
                "1048576 (--max-image-size)"
            )
        else:
            (tmp_path / "dir").rmdir()
            reason = f"cannot create the image {output}: No such file or directory (ENOENT)"
        out = ctl(daemon, "migrate", vm, f"tcp:127.0.0.1:{port}")
        assert proc.wait(30) == 1
        assert one_line(proc.stderr.read()) == f"dirtylogctl: receive failed: {reason}"
    assert out.returncode == 1
    assert f"the destination refused the stream: {reason}" in out.stderr, out.stderr
    assert "Broken pipe" not in out.stderr and "reset" not in out.stderr
    assert vm_state(qmp, vm)["paused"] is False


def memory(pid):
    """The peak RSS and the file-backed RSS of a process, in bytes (/proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "RssFile")}


def test_a_receiver_under_the_largest_frames_stays_small_and_refuses_larger_ones(tmp_path):
    """A full VERIFY (16,384 pages named in 256 KiB) costs the receiver process a few MiB
    besides the image pages it maps (before: 128 MiB more); a VERIFY of 2^18 is refused from
    its head, with the limit in the ERR, and ends the receiver with one line."""
    with receiver(tmp_path / "img") as (proc, port):
        peer = socket.create_connection(("127.0.0.1", port), timeout=30)
        peer.sendall(encode_header(Header("x", (SlotInfo(0, 0, MAX_VERIFY_PAGES),))))
        peer.sendall(done_frame(0))
        assert recv_exactly(peer, 12) == b"ACK " + bytes(8)
        before = memory(proc.pid)
        gpas = np.arange(MAX_VERIFY_PAGES) * PAGE_SIZE
        zero = page_digests(np.zeros((1, PAGE_SIZE), np.uint8), 11)
        peer.sendall(verify_frame(11, gpas, zero.repeat(MAX_VERIFY_PAGES)))
        assert recv_exactly(peer, 8) == b"DIFF" + bytes(4)
        after = memory(proc.pid)
        grew = (after["VmHWM"] - before["VmHWM"]) - (after["RssFile"] - before["RssFile"])
        assert grew < 16 * MiB, f"{grew / MiB:.0f} MiB"
        peer.sendall(struct.pack("<BIQ", 3, 1 << 18, 0))  # only the head of the frame
        reason = b"frame 3: VERIFY of 262144 pages is over the limit of 16384"
        answer = recv_exactly(peer, 8 + len(reason))
        assert answer == b"ERR " + struct.pack("<I", len(reason)) + reason
        assert proc.wait(30) == 1
        assert one_line(proc.stderr.read()) == f"dirtylogctl: receive failed: {reason.decode()}"
        peer.close()


def recv_exactly(sock, n):
    data = b""
    while len(data) < n and (chunk := sock.recv(n - len(data))):
        data += chunk
    return data


MALFORMED = {
    "unknown-frame-type": SMALL + struct.pack("<BIQ", 9, 0, 0) + bytes(4),
    "unaligned-page": SMALL + pages_frame(np.array([0x1001]), np.ones(PAGE_SIZE, np.uint8)),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_migration_stream_ends_the_receiver_with_one_line_and_exit_1(tmp_path, case):
    with receiver(tmp_path / "img") as (proc, port):
        answer = exchange(port, MALFORMED[case] + done_frame(1))
        assert proc.wait(30) == 1
        err = one_line(proc.stderr.read())
    assert err.startswith("dirtylogctl: receive failed: frame 1: ") and answer.startswith(b"ERR ")


def test_ctrl_c_on_migrate_receive_is_exit_130_with_one_line_and_the_output_untouched(tmp_path):
    output = tmp_path / "image.img"
    output.write_bytes(b"an older image")
    receiver = subprocess.Popen(
        [*CTL, "migrate-receive", "--listen", "127.0.0.1:0", "--output", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout.readline().startswith("listening on")
        receiver.send_signal(signal.SIGINT)
        _, err = receiver.communicate(timeout=10)
    finally:
        if receiver.poll() is None:
            receiver.kill()
    assert receiver.returncode == 130
    assert err.strip().splitlines() == [f"dirtylogctl: interrupted; {output} was not changed"]
    assert output.read_bytes() == b"an older image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.img"]
