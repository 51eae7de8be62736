"""Clients that misbehave at the socket: never read, are killed mid-reply, or come too many.

Each must cost the daemon bounded memory, cost other clients nothing, and cost its own
consumer nothing: an answer that was not fully written goes back to the consumer.
"""

import array
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import need

from .daemon_proc import Daemon
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
    # The tests run as root, who may also take the reserved slots: none here.
    d = fresh_daemon("--max-clients", "2", "--reserved-clients", "0")
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


def everything_until_closed(raw: Raw) -> list:
    """Every message the daemon sent before it closed the connection."""
    messages = []
    try:
        while True:
            messages.append(raw.recv())
    except (EOFError, ConnectionResetError):  # reset: closed with our requests unread
        raw.close()
        return messages


def test_a_client_that_does_not_negotiate_in_time_is_told_and_its_slot_freed(fresh_daemon):
    """Idle or chattering, a connection that has not sent qmp_capabilities within the
    timeout gets an error saying so and is closed; a negotiated one may idle."""
    d = fresh_daemon("--negotiation-timeout", "0.5")
    negotiated = Raw(d.socket)
    negotiated.negotiate()
    started = time.monotonic()
    idle, chatty = Raw(d.socket), Raw(d.socket)
    assert "QMP" in idle.recv() and "QMP" in chatty.recv()
    while time.monotonic() - started < 1.0:  # activity does not extend the deadline
        try:
            chatty.send({"execute": "query-version"})
        except OSError:
            break
        time.sleep(0.1)
    timed_out = {
        "error": {
            "class": "GenericError",
            "desc": "capabilities negotiation not completed within 0.5 s "
            "(send qmp_capabilities first); closing the connection",
        }
    }
    assert everything_until_closed(idle) == [timed_out]
    *answers, last = everything_until_closed(chatty)
    assert last == timed_out
    assert answers and {a["error"]["class"] for a in answers} == {"CommandNotFound"}
    assert 0.4 < time.monotonic() - started < 5
    assert negotiated.ask({"execute": "query-version"})["return"]  # past the timeout: served
    negotiated.close()
    assert d.metric('dirtylogd_qmp_dropped_clients_total{reason="negotiation-timeout"}') == 2
    assert "no capabilities negotiation within 0.5 s" in d.output()


def test_a_flood_of_idle_connections_lasts_only_the_negotiation_timeout(fresh_daemon):
    """Every slot, reserved ones too, taken by connections that never negotiate: refused
    while they last, and they last the timeout, not forever."""
    d = fresh_daemon("--max-clients", "24", "--reserved-clients", "8", "--negotiation-timeout", "1")
    started = time.monotonic()
    flood = [Raw(d.socket) for _ in range(32)]
    for c in flood:
        assert "QMP" in c.recv()
    with Raw(d.socket) as late:
        assert late.recv()["error"]["desc"] == (
            "too many clients: at most 24, and the 8 kept for root and the daemon's own user "
            "are in use too"
        )
    for c in flood:
        [farewell] = everything_until_closed(c)
        assert "capabilities negotiation not completed" in farewell["error"]["desc"]
    with Raw(d.socket) as after:
        after.negotiate()
    assert time.monotonic() - started < 5


class AsUser:
    """Connections of another uid: a forked child becomes ``uid``, opens ``count`` connections
    one after another, reports each one's first message, and holds them until closed."""

    def __init__(self, path: str, count: int, uid: int = 65534) -> None:
        report_r, report_w = os.pipe()
        self._hold_r, self._hold_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child: no pytest machinery from here on
            try:
                os.close(report_r)
                os.close(self._hold_w)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                held = []
                for _ in range(count):
                    s = socket.socket(socket.AF_UNIX)
                    s.settimeout(10)
                    try:
                        s.connect(path)
                        line = s.recv(4096).split(b"\r\n")[0].decode()
                    except OSError as exc:
                        line = json.dumps({"client-error": str(exc)})
                    held.append(s)
                    os.write(report_w, line.encode() + b"\n")
                os.close(report_w)  # the parent reads to the end
                os.read(self._hold_r, 1)  # until the parent closes its end
            finally:
                os._exit(0)
        os.close(report_w)
        os.close(self._hold_r)
        with os.fdopen(report_r) as f:
            self.first = [json.loads(line) for line in f.read().splitlines()]

    def close(self) -> None:
        os.close(self._hold_w)
        os.waitpid(self.pid, 0)


@pytest.fixture
def public():
    """Start daemons whose socket another user can reach (pytest's directories are 0700)."""
    need(os.geteuid() == 0, "needs root to run clients as another user")
    base = Path(tempfile.mkdtemp(prefix="dirtylogd-public-"))
    base.chmod(0o755)
    made = []

    def start(*extra: str) -> Daemon:
        d = Daemon(base / str(len(made)), "--allow-uid", "nobody", *extra)
        made.append(d)
        os.chmod(d.socket, 0o666)
        return d

    yield start
    for d in made:
        d.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_one_user_cannot_take_more_than_its_share_of_slots_and_root_still_gets_in(public):
    d = public("--max-clients-per-uid", "3")
    nobody = AsUser(d.socket, 4)
    try:
        assert all("QMP" in m for m in nobody.first[:3])
        assert nobody.first[3] == {
            "error": {
                "class": "GenericError",
                "desc": "too many connections from uid 65534: at most 3",
            }
        }
        with d.client() as root:  # root is not limited per uid, and there is room
            assert root("query-version")["package"].startswith("dirtylogd")
    finally:
        nobody.close()
    assert d.metric('dirtylogd_qmp_dropped_clients_total{reason="too-many-from-uid"}') == 1
    assert "refused uid 65534" in d.output()
    deadline = time.monotonic() + 10
    while d.metric("dirtylogd_qmp_clients") and time.monotonic() < deadline:
        time.sleep(0.05)
    again = AsUser(d.socket, 1)  # its slots came back with its connections
    again.close()
    assert "QMP" in again.first[0]


def test_root_is_served_through_the_reserved_slots_when_others_fill_the_daemon(public):
    d = public("--max-clients", "4", "--reserved-clients", "2")
    nobody = AsUser(d.socket, 5)  # four idle connections fill --max-clients
    try:
        assert all("QMP" in m for m in nobody.first[:4])
        assert nobody.first[4]["error"]["desc"] == "too many clients: at most 4"
        with d.client() as root, d.client() as also_root:  # the two reserved slots
            assert root("query-version") == also_root("query-version")
            with Raw(d.socket) as third:
                assert third.recv()["error"]["desc"].startswith(
                    "too many clients: at most 4, and the 2 kept for root"
                )
    finally:
        nobody.close()
    assert d.metric('dirtylogd_qmp_dropped_clients_total{reason="too-many-clients"}') == 2


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
