"""The receiving end of a migration stream: ``migrate-receive``.

:func:`receive` applies a stream to an image and answers the sender. A frame whose checksum
does not match, or a stream that ends inside a frame, is an error — never a silently wrong
image. The image (and its storage keys) is staged beside ``--output`` and put in place only
once complete.

``migrate-receive`` listens without authentication, so :func:`serve_once` expects hostile
peers: no peer's bytes cost it more memory than a few of the largest frames, or end it with
anything but a one-line StreamError; a silent peer is dropped after an idle timeout; a peer
that never sends a valid header is dropped without ending it; and ``--output`` is replaced
only by a complete image. A migration over several TCP channels (format version 4) has its
further connections accepted on the same socket by :class:`Channels`, which refuses any
that is not one of them.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar, assert_never

import numpy as np

from dirtylogctl import wireformat as wf
from dirtylogctl.image import StagedImage, _why
from dirtylogctl.keyfile import key_path
from dirtylogctl.wireformat import Header, Kind, StreamError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

T = TypeVar("T")
D = TypeVar("D")


# --- the receiving side -------------------------------------------------------------------------
@dataclass
class Received:
    pages: int = 0
    frames: int = 0
    done: bool = False
    verified_pages: int = 0
    differing: int = 0
    keys: int = 0  # storage keys received
    verified_keys: int = 0
    differing_keys: int = 0
    runs: int = 0  # RUN frames, read straight into the image
    synced: int = -1  # the frame after which the image was last synced
    channels: int = 1  # TCP connections of the migration (version 4 may have several)
    channel: int = 0  # which of them these counts are of (0: the main channel)
    run_buffer: memoryview | None = field(default=None, repr=False)  # at the first RUN


class Target(Protocol):
    """What :func:`receive` writes into: a :class:`StagedImage`, or a stand-in in tests."""

    def write(self, gpas: np.ndarray, data: np.ndarray) -> None: ...

    def read(self, gpas: np.ndarray) -> np.ndarray: ...

    def write_keys(self, gpa: int, keys: np.ndarray) -> None: ...

    def differing_keys(self, gpa: int, keys: np.ndarray) -> np.ndarray: ...

    def write_run(self, gpa: int, data: memoryview) -> None:
        """Contiguous pages from ``gpa``; StreamError outside the slots."""
        ...

    def sync(self) -> None:
        """Make the image (and keys) durable; StreamError if declared keys are missing."""
        ...


def receive(
    conn: io.BufferedIOBase,
    open_image: Callable[[Header], Target],
    answer: Callable[[bytes], None],
    channels: Channels | None = None,
) -> Received:
    """Apply one stream to an image until the sender closes after DONE (and any VERIFY).

    Raises StreamError, after answering ERR with the same text, for a header this receiver
    does not accept, a checksum mismatch, a frame out of limits or order, or a stream that
    ends before DONE or inside a frame — and for anything else that stops it (a lost
    connection, an image that cannot be made or stored): a peer's bytes can end a receive
    only with a StreamError, whose one line says why.

    A version-4 header is answered with the channels accepted: ``channels`` reads the data
    channels (none without it), and a failure of any of them is the migration's.
    """
    stats = Received()
    in_header = True

    def some(n: int) -> bytes:
        try:
            return conn.read(n) or b""
        except OSError as exc:
            raise StreamError(f"lost the connection to the sender: {exc}") from None

    def whole(data: bytes, n: int) -> bytes:
        if len(data) < n:
            if in_header:
                where = "inside its header"
            else:
                where = "before DONE" if not stats.done else f"inside frame {stats.frames}"
            raise StreamError(f"the stream ended {where}")
        return data

    def read(n: int) -> bytes:
        return whole(some(n), n)

    def reply(data: bytes) -> None:
        try:
            answer(data)
        except OSError as exc:
            raise StreamError(f"cannot answer the sender: {exc}") from None

    try:
        header = wf.read_header(read)
        in_header = False
        try:
            image = open_image(header)
        except OSError as exc:
            raise StreamError(f"cannot create the image: {exc}") from None
        if header.version >= 4:
            stats.channels = 1 if channels is None else channels.open(header, image)
            reply(wf.encode_chan(stats.channels))
        while True:
            head = some(wf.FRAME_HEAD.size)
            if not head and stats.done:
                if stats.synced < 0:  # a version-3 sender that did not ask for FLUSH
                    _sync(image, stats)
                return stats  # a clean end: the sender closed after DONE
            stats.frames += 1
            head = whole(head, wf.FRAME_HEAD.size)
            kind = wf.frame_kind(head, stats.frames, stats.done)
            if kind is Kind.RUN:
                _run(head, read, conn, image, stats)
                continue
            if kind is Kind.END:
                raise StreamError(f"frame {stats.frames}: END on the main channel")
            frame = wf.read_frame(head, read, stats.frames, stats.done)
            if frame.kind in wf.KEY_KINDS and not header.storage_keys:
                raise StreamError(
                    f"frame {stats.frames}: {frame.kind.name} in a stream whose header "
                    "declares no storage keys"
                )
            if frame.kind is Kind.DONE and channels is not None and stats.channels > 1:
                stats.pages += channels.finish()  # every channel's pages are in first
            _apply(frame, image, stats, reply, header)
    except StreamError as exc:
        failed = channels.failure if channels is not None else None
        reason = failed or exc  # a lost channel, not the main channel's end it caused
        with contextlib.suppress(OSError):  # the other end may be gone already
            answer(wf.encode_err(str(reason)))
        if reason is exc:
            raise
        raise reason from None
    finally:
        if channels is not None:
            channels.stop()


def _run(
    head: bytes, read: wf.Read, conn: io.BufferedIOBase, image: Target, stats: Received
) -> None:
    """A RUN frame: read into one reused buffer (not through the BufferedReader's: see
    READ_BUFFER), checked, then written to the image with one pwrite."""
    gpa, count = wf.run_address(head, stats.frames)
    _pinned(np.array([gpa, gpa + max(count - 1, 0) * wf.PAGE_SIZE], np.uint64), stats)
    if stats.run_buffer is None:
        stats.run_buffer = memoryview(bytearray(wf.MAX_PAGES_PER_FRAME * wf.PAGE_SIZE))
    view = stats.run_buffer[: count * wf.PAGE_SIZE]
    got = 0
    while got < view.nbytes:
        try:
            n = conn.readinto(view[got:])
        except OSError as exc:
            raise StreamError(f"lost the connection to the sender: {exc}") from None
        if not n:
            raise StreamError(f"the stream ended inside frame {stats.frames}")
        got += n
    if wf.frame_crc(head, view) != read(wf.CRC.size):
        raise StreamError(f"frame {stats.frames}: checksum mismatch")
    _numbered(stats, image.write_run, gpa, view)
    stats.pages += count
    stats.runs += 1


def _pinned(gpas: np.ndarray, stats: Received) -> None:
    """Refuse pages of another channel: only pinning keeps two sends of a page in order."""
    if stats.channels > 1:
        strays = wf.strays(gpas, stats.channel, stats.channels)
        if strays.size:
            raise StreamError(
                f"frame {stats.frames}: the page at {int(strays[0]):#x} belongs to channel "
                f"{wf.channel_of(int(strays[0]), stats.channels)}, not {stats.channel}"
            )


def _done(image: Target, stats: Received, header: Header) -> bytes:
    """DONE: every page intact and every key here, then ACK. Version 3 leaves the flush to
    FLUSH (or the sender's close), out of the sender's downtime; version 2 syncs first."""
    if header.version < 3 or (header.storage_keys and stats.keys < header.total_pages()):
        _sync(image, stats)  # says which keys are missing before syncing anything
        if stats.synced < 0:
            raise StreamError("the stream declared storage keys but did not send them all")
    stats.done = True
    return wf.encode_ack(stats.pages)


def _sync(image: Target, stats: Received) -> None:
    """The image (and keys) synced and put in place; StreamError if keys are missing."""
    try:
        image.sync()
    except OSError as exc:
        raise StreamError(f"cannot store the image: {exc}") from None
    stats.synced = stats.frames


def _apply(
    frame: wf.Frame,
    image: Target,
    stats: Received,
    answer: Callable[[bytes], None],
    header: Header,
) -> None:
    """One checked frame's effect on the image, and the receiver's answer to it."""
    if frame.kind is Kind.PAGES:
        gpas, data = frame.pages()
        _pinned(frame.addresses(), stats)
        image.write(gpas, data)
        stats.pages += frame.count
    elif frame.kind is Kind.DONE:
        answer(_done(image, stats, header))
    elif frame.kind is Kind.FLUSH:
        _sync(image, stats)
        answer(wf.SYNC)
    elif frame.kind is Kind.RUN or frame.kind is Kind.END:
        raise AssertionError("read by _run, or refused on the main channel")
    elif frame.kind is Kind.KEYS:
        gpa, keys = frame.keys()
        _numbered(stats, image.write_keys, gpa, keys)
        stats.keys += frame.count
    elif frame.kind is Kind.VERIFY_KEYS:
        gpa, keys = frame.keys()
        differ = _numbered(stats, image.differing_keys, gpa, keys)
        stats.verified_keys += frame.count
        stats.differing_keys += int(differ.size)
        answer(wf.encode_diff(differ))
    elif frame.kind is Kind.VERIFY:
        key, gpas, digests = frame.verify()
        # A PAGES frame's worth at a time: the frame names up to 64 MiB of pages, and reading
        # and hashing them at once would cost that much memory twice over.
        differ = np.zeros(gpas.size, dtype=bool)
        for at in range(0, gpas.size, wf.MAX_PAGES_PER_FRAME):
            part = slice(at, at + wf.MAX_PAGES_PER_FRAME)
            differ[part] = wf.page_digests(image.read(gpas[part]), key) != digests[part]
        bad = gpas[differ]
        stats.verified_pages += frame.count
        stats.differing += int(bad.size)
        answer(wf.encode_diff(bad))
    else:
        assert_never(frame.kind)  # a new Kind needs its case here


def _numbered(stats: Received, step: Callable[[int, D], T], gpa: int, keys: D) -> T:
    """``step(gpa, keys)``, its refusal naming the frame it came with."""
    try:
        return step(gpa, keys)
    except StreamError as exc:
        raise StreamError(f"frame {stats.frames}: {exc}") from None
    except OSError as exc:
        raise StreamError(f"cannot store the image: {_why(exc)}") from None


# --- migrate-receive ----------------------------------------------------------------------------
IDLE_TIMEOUT = 30.0
"""Seconds a receiver waits for a connected peer's next bytes, and for its whole header. A
sender is silent longest while it reconnects to a restarted daemon (a restart takes a second
or two; it gives up after its --reconnect-timeout, 30 s); its own socket timeout is 30 s too."""


READ_BUFFER = 256 << 10
DEFAULT_MAX_CHANNELS = 8


def check_output(output: str) -> str:
    """Where the image will be renamed to (symlinks resolved), once a file could be created
    beside it: an output that cannot be written is an error before any peer is waited for."""
    path = os.path.realpath(output)
    if os.path.isdir(path):
        raise StreamError(f"cannot write the image {output}: it is a directory")
    for where in (path, key_path(path)):  # the image, and its storage keys beside it
        if os.path.exists(where) and not stat.S_ISREG(os.stat(where).st_mode):
            raise StreamError(f"cannot write the image {output}: {where} is not a regular file")
    directory, name = os.path.split(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=directory)
    except OSError as exc:
        raise StreamError(f"cannot write the image {output}: {_why(exc)}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def receive_image(
    conn: io.BufferedIOBase,
    answer: Callable[[bytes], None],
    output: str,
    max_image_bytes: int | None = None,
    started: Callable[[], None] | None = None,
    channels: Channels | None = None,
) -> Received:
    """:func:`receive` into a :class:`StagedImage` that replaces ``output`` (a path from
    :func:`check_output`) at DONE. ``started`` is called once the header is valid, before the
    image is made; an image whose slots need more than ``max_image_bytes`` is refused."""
    staged: list[StagedImage] = []

    def open_image(header: Header) -> StagedImage:
        if started is not None:
            started()
        need = sum(s.npages for s in header.slots) * header.page_size
        if max_image_bytes is not None and need > max_image_bytes:
            raise StreamError(
                f"the image needs {need} bytes for its slots, over the receiver's limit of "
                f"{max_image_bytes} (--max-image-size)"
            )
        staged.append(StagedImage(output, header))
        return staged[-1]

    try:
        return receive(conn, open_image, answer, channels)
    finally:
        for image in staged:
            image.close()


class _Activity:
    """When any connection of a migration last brought bytes: a channel may be silent while
    its siblings carry a round (its pages are elsewhere), and that is not the sender's
    silence."""

    def __init__(self) -> None:
        self.last = time.monotonic()


class _Peer(io.RawIOBase):
    """A connected peer's socket, read with a receiver's patience: ``idle`` seconds for any
    bytes (on any of the migration's connections, once it has several), and until the
    deadline for all of its header. Running out of either, or losing the connection, is a
    StreamError."""

    def __init__(self, sock: socket.socket, idle: float, activity: _Activity | None = None) -> None:
        super().__init__()
        self.sock, self.idle = sock, idle
        self.activity = activity or _Activity()
        self.deadline: float | None = time.monotonic() + idle
        self.begun = False  # its header was valid: it is the migration
        sock.settimeout(idle)  # replies too: a peer that reads nothing cannot hold a send

    def started(self) -> None:
        self.begun, self.deadline = True, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while True:
            wait = self.idle - (time.monotonic() - self.activity.last)
            if self.deadline is not None:
                wait = min(self.idle, self.deadline - time.monotonic())
            try:
                if wait <= 0:
                    raise TimeoutError
                self.sock.settimeout(wait)
                n = self.sock.recv_into(buffer)
                self.activity.last = time.monotonic()
                return n
            except TimeoutError:
                if self.deadline is not None and wait < self.idle:  # the header's came first
                    raise StreamError(
                        f"no complete stream header within {self.idle:g} s of connecting"
                    ) from None
                if time.monotonic() - self.activity.last >= self.idle:
                    raise StreamError(f"nothing from the sender for {self.idle:g} s") from None
            except OSError as exc:
                raise StreamError(f"lost the connection to the sender: {exc}") from None


Dropped = Callable[[str, StreamError], None]
MAX_GREETING = 16  # connections at once that have not yet said which channel they are


class Channels:
    """The data channels of one migration (format version 4): accepted on the receiver's
    listening socket while the migration runs, each checked by its HELLO and then read in a
    thread of its own straight into the image (recv, CRC-32C and pwrite release the GIL).

    A connection that is not one of this migration's channels — a wrong token, an index out
    of range or already connected, a channel after DONE — is answered ERR and closed before
    any frame of it is read. A channel that fails fails the migration: its reason is kept
    (``failure``) and the main channel's read is woken to report it."""

    def __init__(
        self,
        server: socket.socket,
        main: socket.socket,
        max_channels: int,
        idle: float,
        activity: _Activity,
        dropped: Dropped | None = None,
    ) -> None:
        self.server, self.main, self.max = server, main, max_channels
        self.idle, self.activity, self.dropped = idle, activity, dropped
        self.failure: StreamError | None = None
        self.count = 1
        self.token = b""
        self.image: Target | None = None
        self.readers: dict[int, threading.Thread] = {}
        self.pages: dict[int, int] = {}
        self.socks: list[socket.socket] = []
        self.greeting = 0
        self.closed = threading.Event()  # no channel is taken any more
        self.stopping = False
        self.lock = threading.Lock()
        self.acceptor: threading.Thread | None = None
        self.opened = time.monotonic()

    def open(self, header: Header, image: Target) -> int:
        """The channels accepted for ``header``; from now on, its further ones are accepted."""
        self.count = max(1, min(header.channels, self.max))
        self.token, self.image = header.token, image
        self.opened = time.monotonic()
        if self.count > 1:
            self.acceptor = threading.Thread(target=self._accept, name="channels", daemon=True)
            self.acceptor.start()
        return self.count

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self.stopping:  # after DONE too: a late channel is told it is refused
            try:
                conn, address = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.socks.append(conn)
                crowded = self.greeting >= MAX_GREETING
                self.greeting += not crowded
            if crowded:
                self._refuse(conn, address, StreamError("too many connections greeting at once"))
                continue
            threading.Thread(
                target=self._greet, args=(conn, address), name="channel-hello", daemon=True
            ).start()

    def _greet(self, conn: socket.socket, address: tuple[str, int]) -> None:
        """Read a HELLO; accept the channel it names, and read it, or refuse the connection."""
        peer = _Peer(conn, self.idle)
        index = 0
        try:
            with conn, io.BufferedReader(peer, READ_BUFFER) as stream:
                try:
                    token, index = wf.read_hello(lambda n: _exactly(stream, n))
                    self._admit(token, index)
                except StreamError as exc:
                    self._refuse(conn, address, exc)
                    return
                finally:
                    with self.lock:
                        self.greeting -= 1
                peer.started()
                peer.activity = self.activity
                conn.sendall(wf.encode_chan(index))
                self.pages[index] = self._read(stream, index)
        except (StreamError, OSError) as exc:
            why = exc if isinstance(exc, StreamError) else StreamError(f"{exc}")
            self._fail(StreamError(f"channel {index}: {why}"))

    def _admit(self, token: bytes, index: int) -> None:
        with self.lock:
            if self.closed.is_set():
                raise StreamError("the migration takes no more channels")
            if not hmac.compare_digest(token, self.token):
                raise StreamError("a channel hello with the wrong token")
            if not 1 <= index < self.count:
                raise StreamError(f"channel {index} is not one of 1..{self.count - 1}")
            if index in self.readers:
                raise StreamError(f"channel {index} is already connected")
            self.readers[index] = threading.current_thread()

    def _refuse(self, conn: socket.socket, address: tuple[str, int], why: StreamError) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(wf.encode_err(str(why)))
            conn.close()
        if self.dropped is not None:
            self.dropped(f"{address[0]}:{address[1]}", why)

    def _read(self, stream: io.BufferedIOBase, index: int) -> int:
        """Channel ``index``'s frames into the image, until its END; the pages it carried."""
        assert self.image is not None
        stats = Received(channels=self.count, channel=index)
        while True:
            head = _exactly(
                stream, wf.FRAME_HEAD.size, f"before its END ({stats.frames} frames came)"
            )
            stats.frames += 1
            kind = wf.frame_kind(head, stats.frames, False)
            if kind is Kind.RUN:
                _run(head, lambda n: _exactly(stream, n), stream, self.image, stats)
                continue
            if kind not in (Kind.PAGES, Kind.END):
                raise StreamError(f"frame {stats.frames}: {kind.name} on a data channel")
            frame = wf.read_frame(head, lambda n: _exactly(stream, n), stats.frames, False)
            if frame.kind is Kind.END:
                if frame.aux != stats.pages:
                    raise StreamError(
                        f"its END says {frame.aux} pages were sent, {stats.pages} came"
                    )
                return stats.pages
            _apply(frame, self.image, stats, lambda _: None, Header("", ()))

    def _fail(self, why: StreamError) -> None:
        """The migration fails with ``why`` (the first failure): wake the main channel's read."""
        with self.lock:
            if self.stopping:  # the migration is over; its channels were shut down for it
                return
            self.failure = self.failure or why
        with contextlib.suppress(OSError):
            self.main.shutdown(socket.SHUT_RD)

    def finish(self) -> int:
        """At DONE: every channel connected, read to its END and written; their pages."""
        deadline = self.opened + self.idle
        while len(self.readers) < self.count - 1 and self.failure is None:
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, self.count)) - set(self.readers))
                raise StreamError(f"channel {missing[0]} never connected")
            time.sleep(0.01)
        self.closed.set()
        for reader in list(self.readers.values()):
            reader.join()
        if self.failure is not None:
            raise self.failure
        return sum(self.pages.values())

    def stop(self) -> None:
        """No more channels; every channel's reader ended (its connection shut down)."""
        with self.lock:
            self.stopping = True
        self.closed.set()
        if self.acceptor is not None:
            self.acceptor.join()
            with contextlib.suppress(OSError):
                self.server.settimeout(None)
        with self.lock:
            socks = list(self.socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for reader in list(self.readers.values()):
            if reader is not threading.current_thread():
                reader.join()


def _exactly(stream: io.BufferedIOBase, n: int, where: str = "inside a frame") -> bytes:
    data = stream.read(n) or b""
    if len(data) < n:
        raise StreamError(f"the channel ended {where}")
    return data


def serve_once(
    host: str,
    port: int,
    output: str,
    ready: Callable[[int], None] | None = None,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    max_image_bytes: int | None = None,
    dropped: Dropped | None = None,
    max_channels: int = DEFAULT_MAX_CHANNELS,
) -> Received:
    """Receive one migration on HOST:PORT into ``output``, which must be writable before
    anything listens.

    A connection is the migration once its header is valid: its outcome is returned, or
    raised as StreamError. A connection that never gets that far — silent for
    ``idle_timeout``, not a migration stream, a header this receiver refuses — is answered
    ERR, closed, reported to ``dropped``, and the next one is accepted: without
    authentication anyone can connect, and a stray or hostile peer must neither end the
    receiver nor hold it for longer than ``idle_timeout``.

    A version-4 sender gets up to ``max_channels`` connections; the further ones are accepted
    on the same socket while its migration runs (see :class:`Channels`).
    """
    target = check_output(output)
    with socket.create_server((host, port)) as server:
        if ready is not None:
            ready(server.getsockname()[1])
        while True:
            conn, address = server.accept()
            activity = _Activity()
            peer = _Peer(conn, idle_timeout, activity)
            channels = Channels(server, conn, max_channels, idle_timeout, activity, dropped)
            try:
                # a buffer smaller than a RUN's payload: BufferedReader reads one straight
                # from the socket into the image instead of through its buffer
                with conn, io.BufferedReader(peer, READ_BUFFER) as stream:
                    return receive_image(
                        stream, conn.sendall, target, max_image_bytes, peer.started, channels
                    )
            except StreamError as exc:
                if peer.begun:
                    raise
                if dropped is not None:
                    dropped(f"{address[0]}:{address[1]}", exc)
