"""Clients that misbehave at the socket: never read, are killed mid-reply, or come too many.

Each must cost the daemon bounded memory, cost other clients nothing, and cost its own
consumer nothing: an answer that was not fully written goes back to the consumer.
"""

import array
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .raw import Raw

MiB = 1 << 20
SLOT = [{"slot": 0, "guest-phys-addr": 0, "size": 8 << 30}]  # answers of ~350 KB
WRITTEN = [5, 1 << 20, (2 << 20) - 1]
RANGES = [[g, 1] for g in WRITTEN]
ROOT = Path(__file__).resolve().parents[2]


def rss(daemon) -> int:
    return psutil.Process(daemon.proc.pid).memory_info().rss


@pytest.fixture
def big_vm(fresh_daemon):
    """A daemon with an 8 GiB VM, consumer 'lazy' holding three dirty pages, and a client."""
    d = fresh_daemon()
    q = d.client()
    q("vm-create", name="big", memslots=SLOT)
    q("consumer-add", vm="big", name="lazy", initially_set=False)
    q("sim-write-pages", vm="big", gfns=WRITTEN, value=1)
    yield d, q
    q.close()


def stall(raw: Raw, seconds: float = 1.0) -> int:
    """Pipeline gets for 'lazy' without reading until the socket takes no more; bytes sent."""
    get = b'{"execute": "dirty-log-get", "arguments": {"vm": "big", "slot": 0, "consumer": "lazy"}}'
    raw.sock.setblocking(False)
    sent, idle_since = 0, time.monotonic()
    while time.monotonic() - idle_since < seconds:
        try:
            sent += raw.sock.send(get)
            idle_since = time.monotonic()
        except BlockingIOError:
            time.sleep(0.05)
    return sent


def test_a_client_that_never_reads_is_bounded_then_dropped_and_its_answer_given_back(big_vm):
    d, q = big_vm
    q("dirty-log-get", vm="big", slot=0)  # warm: the first answer's buffers exist already
    rss_before = rss(d)
    lazy = Raw(d.socket)
    lazy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.negotiate()
    sent = stall(lazy)
    # Hundreds of requests went out; the first answer is stuck half-written, so the daemon
    # stopped reading this client and the rest wait in the kernel's buffers.
    assert sent > 10_000
    # Others are served meanwhile, and the daemon holds one answer, not a queue of them.
    for _ in range(20):
        assert q("dirty-log-get", vm="big", slot=0)["npages"] == 2 << 20
    assert rss(d) - rss_before < 64 * MiB
    # Events pile up for it; past the backlog limit it is disconnected.
    for _ in range(150):
        q("stop", vm="big")
        q("cont", vm="big")
    lazy.sock.setblocking(True)
    lazy.sock.settimeout(10)
    try:
        while lazy.sock.recv(1 << 16):  # read what was written, up to the daemon's close
            pass
    except ConnectionResetError:  # closed with our unread requests still queued: the same
        pass
    lazy.close()
    assert d.metric('dirtylogd_qmp_dropped_clients_total{reason="not-reading"}') == 1
    assert "disconnecting a client that stopped reading" in d.output()
    # The half-written answer went back: 'lazy' still has its three pages.
    assert q("dirty-log-get", vm="big", slot=0, consumer="lazy", encoding="ranges")["ranges"] == (
        RANGES
    )
    assert rss(d) - rss_before < 64 * MiB


CLIENT = """
import sys
from tests.integration.raw import Raw
raw = Raw(sys.argv[1])
raw.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
raw.negotiate()
raw.send({"execute": "dirty-log-get",
          "arguments": {"vm": "big", "slot": 0, "consumer": "lazy"}})
print("asked", flush=True)
sys.stdin.read()
"""


def test_a_client_process_killed_mid_answer_loses_nothing(big_vm):
    d, q = big_vm
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, d.socket],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout.readline() == "asked\n"
    time.sleep(0.5)  # the answer is written until the buffers are full
    client.send_signal(signal.SIGKILL)
    client.wait()
    time.sleep(0.2)
    r = q("dirty-log-get", vm="big", slot=0, consumer="lazy", encoding="ranges")
    assert r["ranges"] == RANGES


def test_clients_past_the_limit_are_turned_away_and_the_next_is_served(fresh_daemon):
    d = fresh_daemon("--max-clients", "2")
    first, second = Raw(d.socket), Raw(d.socket)
    first.negotiate()
    second.negotiate()
    with Raw(d.socket) as third:
        assert third.recv() == {
            "error": {"class": "GenericError", "desc": "too many clients: at most 2"}
        }
        assert third.closed()
    first.close()
    time.sleep(0.2)
    with Raw(d.socket) as fourth:
        fourth.negotiate()
    second.close()
    assert d.metric('dirtylogd_qmp_dropped_clients_total{reason="too-many-clients"}') == 1


def test_running_out_of_descriptors_pauses_accepting_but_never_stops_it(fresh_daemon):
    """With RLIMIT_NOFILE reached, accept fails (EMFILE): waiting clients are served later."""
    d = fresh_daemon()
    process = psutil.Process(d.proc.pid)
    soft, hard = process.rlimit(psutil.RLIMIT_NOFILE)
    process.rlimit(psutil.RLIMIT_NOFILE, (process.num_fds() + 3, hard))
    clients = [Raw(d.socket, timeout=1) for _ in range(8)]
    greeted, waiting = [], []
    for c in clients:  # about three fit (the limit counts descriptor numbers, holes too)
        try:
            assert "QMP" in c.recv()
            greeted.append(c)
        except TimeoutError:
            waiting.append(c)
    assert greeted and waiting, (len(greeted), len(waiting))
    for c in greeted:
        c.close()
    for c in waiting:  # accepted once descriptors are free again
        c.sock.settimeout(10)
        assert "QMP" in c.recv()
        c.close()
    process.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    assert "accept failed" in d.output()
    assert os.path.exists(d.socket)


def settled_fds(process: psutil.Process) -> int:
    """The daemon's descriptor count once it has not changed for 0.3 s."""
    last, since = process.num_fds(), time.monotonic()
    while time.monotonic() - since < 0.3:
        time.sleep(0.05)
        now = process.num_fds()
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_descriptors_are_bounded_per_connection_and_closed_with_it(fresh_daemon, tmp_path):
    """Unclaimed and named descriptors count together; all are closed on disconnect."""
    d = fresh_daemon()
    process = psutil.Process(d.proc.pid)
    baseline = settled_fds(process)  # Daemon's own probe connection may still be closing
    target = tmp_path / "target"
    target.write_bytes(b"")
    fds = [os.open(target, os.O_RDWR) for _ in range(17)]
    try:
        with Raw(d.socket) as raw:
            raw.negotiate()
            connected = process.num_fds()
            for i in range(16):  # sixteen named: the limit
                raw.send({"execute": "getfd", "arguments": {"fdname": f"f{i}"}}, fds[i : i + 1])
                assert raw.recv() == {"return": {}}
            raw.send({"execute": "query-version"}, fds[16:])  # one more: refused and closed
            assert "at most 16 may be held at once" in raw.recv()["error"]["desc"]
            assert "return" in raw.recv()  # the command itself still runs
            assert process.num_fds() == connected + 16
            raw.send({"execute": "getfd", "arguments": {"fdname": "late"}}, fds[:5])
            assert "at most 16" in raw.recv()["error"]["desc"]
            assert raw.recv()["error"]["desc"].startswith("no file descriptor was supplied")
        deadline = time.monotonic() + 10
        while process.num_fds() != baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.num_fds() == baseline  # its descriptors and its socket are closed
    finally:
        for fd in fds:
            os.close(fd)


def send_rights(raw: Raw, message: dict, fd: int, count: int) -> None:
    """One sendmsg carrying ``count`` references to ``fd`` (the kernel takes up to 253)."""
    rights = array.array("i", [fd] * count).tobytes()
    raw.sock.sendmsg(
        [json.dumps(message).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
    )


def test_every_descriptor_that_arrives_is_held_or_closed_even_when_the_kernel_truncates(
    fresh_daemon, tmp_path
):
    """Messages carrying more descriptors than the daemon's buffer (MSG_CTRUNC): the ones that
    arrived are held up to the limit and the rest closed, so the fd table stays bounded."""
    d = fresh_daemon(metrics=False)
    process = psutil.Process(d.proc.pid)
    baseline = settled_fds(process)
    target = tmp_path / "target"
    target.write_bytes(b"")
    fd = os.open(target, os.O_RDWR)
    try:
        with Raw(d.socket) as raw:
            raw.negotiate()
            connected = process.num_fds()
            most = connected
            for i in range(60):  # without the fix, 16 leaked per message: 960 in all
                send_rights(raw, {"execute": "query-version"}, fd, 20 if i % 2 else 253)
                assert "too many file descriptors" in raw.recv()["error"]["desc"]
                assert "return" in raw.recv()  # the command itself still runs
                most = max(most, process.num_fds())
            assert most <= connected + 16  # at most the limit is ever held
            held = [
                n
                for n in os.listdir(f"/proc/{d.proc.pid}/fd")
                if os.readlink(f"/proc/{d.proc.pid}/fd/{n}") == str(target)
            ]
            assert len(held) == 16
            for n in held:  # nothing the daemon starts would inherit them
                info = Path(f"/proc/{d.proc.pid}/fdinfo/{n}").read_text()
                flags = next(v for k, v in re.findall(r"(\w+):\s+(\S+)", info) if k == "flags")
                assert int(flags, 8) & os.O_CLOEXEC
            # The held ones are still usable: getfd names the oldest, closefd frees it.
            assert raw.ask({"execute": "getfd", "arguments": {"fdname": "kept"}}) == {"return": {}}
            assert raw.ask({"execute": "closefd", "arguments": {"fdname": "kept"}}) == {
                "return": {}
            }
            assert process.num_fds() == connected + 15
        deadline = time.monotonic() + 10
        while process.num_fds() != baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.num_fds() == baseline  # every one of them closed with the connection
        with Raw(d.socket) as after:  # and a new client passes a descriptor as usual
            after.negotiate()
            after.send({"execute": "getfd", "arguments": {"fdname": "f"}}, [fd])
            assert after.recv() == {"return": {}}
    finally:
        os.close(fd)
