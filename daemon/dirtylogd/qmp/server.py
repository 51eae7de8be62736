"""The QMP unix socket: accepts peers, wires each connection to a framing decoder and a session.

asyncio's streams cannot receive SCM_RIGHTS descriptors, so connections use non-blocking
sockets with ``recvmsg`` driven by ``loop.add_reader``. Replies on one connection are written in
request order, one command at a time: a client that stops reading stops being read (the kernel's
socket buffers are its only queue). A reply that is not fully written — the peer vanished, was
dropped, or the daemon is stopping — runs its undo, so its consumer loses nothing; one written
whole runs its done, so what is counted as delivered was. Peers are checked
(dirtylogd.qmp.peers) before any greeting.

The socket is bound (:meth:`QmpServer.bind`) before the VMs are restored and accepted on
(:meth:`QmpServer.start`) after, so a live daemon already on the path is found before anything
is touched: its socket is never taken over, only a stale one whose daemon is gone is replaced.

Slots are bounded three ways, so that neither idle nor greedy clients can lock others out: a
connection must finish capabilities negotiation within ``negotiation_timeout`` or is closed; one
uid may hold at most ``max_clients_per_uid``; and ``reserved_clients`` slots past
``max_clients`` are kept for root and the daemon's own user (who are not limited per uid), so
the operator can always get in to look. Every refusal tells the peer why and is counted.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dirtylogd.qmp.events import EventHub
from dirtylogd.qmp.fds import MAX_HELD_FDS, FdRegistry
from dirtylogd.qmp.framing import JsonStreamDecoder, MessageTooLarge, encode
from dirtylogd.qmp.peers import Peer, PeerPolicy, peer_of
from dirtylogd.qmp.scope import ConnectionScope
from dirtylogd.qmp.session import Phase, Session, error, event, greeting
from dirtylogd.qmp.telemetry import ServerTelemetry

log = logging.getLogger(__name__)
RECV_BYTES = 1 << 16
# Events queued for one client that is not reading; past this it is disconnected (its
# in-flight reply is undone) rather than letting the queue grow without bound.
MAX_EVENT_BACKLOG = 256
ACCEPT_RETRY_SECONDS = 0.1
# How long the parting error of a connection being closed may wait for room in its socket: a
# peer that is not reading does not get to keep the slot by not reading the farewell either.
FAREWELL_SECONDS = 1.0


@dataclass
class Limits:
    max_message_bytes: int = 1 << 20
    max_reply_bytes: int = 8 << 20
    max_held_fds: int = MAX_HELD_FDS
    max_clients: int = 256
    negotiation_timeout: float = 10.0
    max_clients_per_uid: int = 64
    reserved_clients: int = 8


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    session: Session
    fds: FdRegistry
    peer: Peer
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    events: set[asyncio.Task[Any]] = field(default_factory=set)  # queued event writes
    # A write was cancelled part-way: the stream may end inside a message, so nothing more
    # may be written to it.
    torn: bool = False

    async def send(self, message: dict[str, Any]) -> bool:
        """Write one message; False if the peer is gone."""
        loop = asyncio.get_running_loop()
        async with self.write_lock:
            if self.torn:
                return False
            try:
                await loop.sock_sendall(self.sock, encode(message))
                return True
            except OSError:
                return False
            except asyncio.CancelledError:
                self.torn = True
                raise


# Makes the session of a new connection, given the descriptors that connection holds.
SessionFactory = Callable[[FdRegistry, ConnectionScope], Session]


class QmpServer:
    def __init__(
        self,
        new_session: SessionFactory,
        telemetry: ServerTelemetry,
        policy: PeerPolicy,
        limits: Limits,
        events: EventHub,
    ) -> None:
        self.new_session = new_session
        self.telemetry = telemetry
        self.policy = policy
        self.limits = limits
        self.path: str | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        events.subscribe(self.broadcast)

    # --- listening ------------------------------------------------------------------------------
    def bind(self, path: str | None, inherited: socket.socket | None = None) -> None:
        """Listen on ``inherited`` (socket activation) or bind ``path`` with mode 0660.

        Connections wait in the backlog until :meth:`start`. A socket at ``path`` that a live
        process answers on is not taken over (:class:`SocketInUse`); only a stale one, whose
        daemon is gone, is replaced. An inherited socket is ours by definition."""
        if inherited is not None:
            sock = inherited
        else:
            assert path is not None
            os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
            _clear_stale_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o117)  # the socket is born 0660, never briefly wider
            try:
                sock.bind(path)
            except BaseException:
                sock.close()
                raise
            finally:
                os.umask(old)
            self._listener, self.path, self._bound = sock, path, _identity(path)  # close() undoes
            os.chmod(path, 0o660)
            sock.listen(64)
        sock.setblocking(False)
        self._listener = sock

    def start(self) -> None:
        """Accept connections on the bound socket."""
        assert self._listener is not None, "bind() first"
        self._accept_task = asyncio.create_task(self._accept_loop())

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        if self.path is not None:
            # Only our own socket: were the path someone else's by now, it is theirs to remove.
            found = _identity(self.path)
            if found is not None and found == self._bound:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            elif found is not None:
                log.warning(
                    "left %s in place: it is no longer the socket this daemon bound", self.path
                )

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        failing = False
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:  # EMFILE and friends: keep serving, retry shortly
                if not failing:
                    log.warning("accept failed: %s; retrying until it works", exc.strerror)
                failing = True
                await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            if failing:
                log.warning("accepting clients again")
                failing = False
            task = asyncio.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # --- one connection --------------------------------------------------------------------------
    async def _serve(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        peer = peer_of(sock)
        reason = self.policy.refusal(peer)
        if reason is not None:
            self.telemetry.refused_peers += 1
            log.warning("refused a client: %s", reason)
            await _turn_away(sock, f"access denied: {reason}")
            return
        full = self._no_room_for(peer)
        if full is not None:
            label, text = full
            self.telemetry.dropped_clients[label] += 1
            log.warning("refused %s: %s (%d clients connected)", peer, text, len(self._connections))
            await _turn_away(sock, text)
            return
        # From here to the add below nothing waits, so no other peer can take the slot between.
        fds = FdRegistry(self.limits.max_held_fds)
        scope = ConnectionScope()
        session = self.new_session(fds, scope)
        conn = Connection(sock, session, fds, peer, task=asyncio.current_task())
        self._connections.add(conn)
        self.telemetry.clients += 1
        try:
            await self._converse(conn)
        except Exception:  # one broken connection must not go unnoticed, nor take others down
            log.exception("connection from %s failed", peer)
        finally:
            self.telemetry.clients -= 1
            self._connections.discard(conn)
            fds.close_all()
            scope.close()
            for task in conn.events:
                task.cancel()
            # Let cancelled writes unregister from the loop before their socket closes.
            await asyncio.gather(*conn.events, asyncio.sleep(0), return_exceptions=True)
            sock.close()

    def _no_room_for(self, peer: Peer) -> tuple[str, str] | None:
        """None if ``peer`` may have a slot now, else (the reason counted, what the peer is told).

        Root and the daemon's own user may also take the reserved slots, and are not limited
        per uid: they can stop the daemon anyway, and must be able to get in while others fill
        it. Everyone else is limited per uid first, so one user cannot take every slot."""
        limits = self.limits
        connected = len(self._connections)
        if self.policy.privileged(peer):
            if connected < limits.max_clients + limits.reserved_clients:
                return None
            text = f"too many clients: at most {limits.max_clients}"
            if limits.reserved_clients:
                text += (
                    f", and the {limits.reserved_clients} kept for root and the daemon's own "
                    "user are in use too"
                )
            return "too-many-clients", text
        same_uid = sum(1 for c in self._connections if c.peer.uid == peer.uid)
        if same_uid >= limits.max_clients_per_uid:
            return (
                "too-many-from-uid",
                f"too many connections from uid {peer.uid}: at most {limits.max_clients_per_uid}",
            )
        if connected >= limits.max_clients:
            return "too-many-clients", f"too many clients: at most {limits.max_clients}"
        return None

    async def _converse(self, conn: Connection) -> None:
        """Serve one connection; one that has not negotiated in time is told so and closed."""
        timeout = self.limits.negotiation_timeout
        try:
            async with asyncio.timeout(timeout) as negotiation:
                await self._exchange(conn, negotiation)
        except TimeoutError:
            if not negotiation.expired():
                raise
            self.telemetry.dropped_clients["negotiation-timeout"] += 1
            log.warning("closing %s: no capabilities negotiation within %g s", conn.peer, timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    conn.send(
                        error(
                            f"capabilities negotiation not completed within {timeout:g} s "
                            "(send qmp_capabilities first); closing the connection"
                        )
                    ),
                    FAREWELL_SECONDS,
                )

    async def _exchange(self, conn: Connection, negotiation: asyncio.Timeout) -> None:
        """Greeting, then requests and replies; lifts ``negotiation`` once it is complete."""
        if not await conn.send(greeting()):
            return
        decoder = JsonStreamDecoder(self.limits.max_message_bytes)
        warned = False
        while True:
            data, received, truncated = await _recv_with_fds(conn.sock)
            # Every descriptor that arrived is held or closed here, before anything can fail
            # or wait, whether or not the kernel dropped others (MSG_CTRUNC).
            refused = conn.fds.hold(received)
            if truncated and not warned:  # once: a flood of them must not flood the log
                log.warning("a client sent more descriptors than one message may carry")
                warned = True
            if truncated or refused:
                await conn.send(
                    error(
                        f"too many file descriptors: at most {self.limits.max_held_fds} may be "
                        "held at once, named or not (extras were closed; closefd frees names)"
                    )
                )
            if not data:
                return
            for item in decoder.feed(data):
                if isinstance(item, MessageTooLarge):
                    await conn.send(error(f"{item.desc}; closing the connection"))
                    return
                reply = await conn.session.handle(item)
                if conn.session.phase is Phase.COMMAND and negotiation.when() is not None:
                    negotiation.reschedule(None)  # negotiated: from here on it may idle
                sent = False
                try:
                    sent = await conn.send(reply.message)
                finally:  # also on cancellation: a half-written reply was never received
                    if not sent and reply.undo is not None:
                        reply.undo()
                if not sent:
                    return
                if reply.done is not None:
                    reply.done()

    # --- events -------------------------------------------------------------------------------
    def broadcast(self, name: str, data: dict[str, Any]) -> None:
        """Send an event to every negotiated client (not while a reply is being written)."""
        message = event(name, data)
        for conn in list(self._connections):
            if conn.session.phase is not Phase.COMMAND:
                continue
            if len(conn.events) >= MAX_EVENT_BACKLOG:
                self._drop_slow(conn)
                continue
            task = asyncio.create_task(conn.send(message))
            conn.events.add(task)
            task.add_done_callback(conn.events.discard)

    def _drop_slow(self, conn: Connection) -> None:
        """Disconnect a client that has not read its last MAX_EVENT_BACKLOG events."""
        if conn.task is None or conn.task.done() or conn.task.cancelling():
            return
        self.telemetry.dropped_clients["not-reading"] += 1
        log.warning(
            "disconnecting a client that stopped reading (%d events queued)", len(conn.events)
        )
        conn.task.cancel()

    @property
    def connections(self) -> Iterable[Connection]:
        return tuple(self._connections)


class SocketInUse(Exception):
    """A live process answers on the socket path: another daemon is serving it."""


# How long the start-up probe waits for a connection to the existing socket to be accepted.
PROBE_SECONDS = 2.0


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _clear_stale_socket(path: str) -> None:
    """Remove a socket left by a daemon that is gone; refuse if a live one answers on it.

    Unlinking a live daemon's socket would leave it running, with its VMs, but unreachable.
    Whether anyone listens is asked the only reliable way, by connecting: refused (or the file
    gone) means stale. A connection accepted, or a full backlog, means someone is there; its
    pid, from SO_PEERCRED, goes into the message."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(PROBE_SECONDS)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing the stale socket %s (nothing listens on it)", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        except (BlockingIOError, TimeoutError):  # EAGAIN: a listener whose backlog is full
            raise SocketInUse(
                f"another process is listening on {path} (its backlog is full); not taking "
                "over its socket: stop that daemon first, or choose another --socket"
            ) from None
        except OSError as exc:
            raise SocketInUse(
                f"cannot tell whether a daemon serves {path} ({exc.strerror}); not replacing it"
            ) from None
        try:
            pid = peer_of(probe).pid
        except OSError:
            pid = 0
    holder = f" (pid {pid})" if pid > 0 else ""
    raise SocketInUse(
        f"another daemon{holder} is serving {path}; not taking over its socket: stop that "
        "daemon first, or choose another --socket"
    )


async def _turn_away(sock: socket.socket, why: str) -> None:
    """Tell a peer that gets no slot why, and close its socket."""
    try:
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_sendall(sock, encode(error(why))),
                FAREWELL_SECONDS,
            )
    finally:
        sock.close()


async def _recv_with_fds(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """recvmsg on a non-blocking socket: (data, descriptors, truncated). b'' means EOF.

    ``truncated``: the message carried more descriptors than fit (MSG_CTRUNC); the kernel closed
    those, and the caller owns every one returned. They arrive close-on-exec, so nothing the
    daemon ever starts inherits a client's descriptor.
    """
    loop = asyncio.get_running_loop()
    cmsg_space = socket.CMSG_SPACE(MAX_HELD_FDS * array.array("i").itemsize)
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(RECV_BYTES, cmsg_space, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_reader(sock.fileno(), ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
            continue
        except (ConnectionResetError, OSError):
            return b"", [], False
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        return data, fds, bool(flags & socket.MSG_CTRUNC)
