"""The receiving end of a migration stream: ``migrate-receive``.

:func:`receive` applies a stream to an image and answers the sender. A frame whose checksum
does not match, or a stream that ends inside a frame, is an error — never a silently wrong
image. The image (and its storage keys) is staged beside ``--output`` and put in place only
once complete.

``migrate-receive`` listens without authentication, so :func:`serve_once` expects hostile
peers: no peer's bytes cost it more memory than a few of the largest frames, or end it with
anything but a one-line StreamError; a silent peer is dropped after an idle timeout; a peer
that never sends a valid header is dropped without ending it; and ``--output`` is replaced
only by a complete image.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import stat
import tempfile
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
    conn: io.BufferedIOBase, open_image: Callable[[Header], Target], answer: Callable[[bytes], None]
) -> Received:
    """Apply one stream to an image until the sender closes after DONE (and any VERIFY).

    Raises StreamError, after answering ERR with the same text, for a header this receiver
    does not accept, a checksum mismatch, a frame out of limits or order, or a stream that
    ends before DONE or inside a frame — and for anything else that stops it (a lost
    connection, an image that cannot be made or stored): a peer's bytes can end a receive
    only with a StreamError, whose one line says why.
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
        while True:
            head = some(wf.FRAME_HEAD.size)
            if not head and stats.done:
                if stats.synced < 0:  # a version-3 sender that did not ask for FLUSH
                    _sync(image, stats)
                return stats  # a clean end: the sender closed after DONE
            stats.frames += 1
            head = whole(head, wf.FRAME_HEAD.size)
            if wf.frame_kind(head, stats.frames, stats.done) is Kind.RUN:
                _run(head, read, conn, image, stats)
                continue
            frame = wf.read_frame(head, read, stats.frames, stats.done)
            if frame.kind in wf.KEY_KINDS and not header.storage_keys:
                raise StreamError(
                    f"frame {stats.frames}: {frame.kind.name} in a stream whose header "
                    "declares no storage keys"
                )
            _apply(frame, image, stats, reply, header)
    except StreamError as exc:
        with contextlib.suppress(OSError):  # the other end may be gone already
            answer(wf.encode_err(str(exc)))
        raise


def _run(
    head: bytes, read: wf.Read, conn: io.BufferedIOBase, image: Target, stats: Received
) -> None:
    """A RUN frame: read into one reused buffer (not through the BufferedReader's: see
    READ_BUFFER), checked, then written to the image with one pwrite."""
    gpa, count = wf.run_address(head, stats.frames)
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
        image.write(gpas, data)
        stats.pages += frame.count
    elif frame.kind is Kind.DONE:
        answer(_done(image, stats, header))
    elif frame.kind is Kind.FLUSH:
        _sync(image, stats)
        answer(wf.SYNC)
    elif frame.kind is Kind.RUN:
        raise AssertionError("read by _run")
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
        return receive(conn, open_image, answer)
    finally:
        for image in staged:
            image.close()


class _Peer(io.RawIOBase):
    """A connected peer's socket, read with a receiver's patience: ``idle`` seconds for any
    bytes, and until the deadline for all of its header. Running out of either, or losing the
    connection, is a StreamError."""

    def __init__(self, sock: socket.socket, idle: float) -> None:
        super().__init__()
        self.sock, self.idle = sock, idle
        self.deadline: float | None = time.monotonic() + idle
        self.begun = False  # its header was valid: it is the migration
        sock.settimeout(idle)  # replies too: a peer that reads nothing cannot hold a send

    def started(self) -> None:
        self.begun, self.deadline = True, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        wait = self.idle
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
        try:
            if wait <= 0:
                raise TimeoutError
            self.sock.settimeout(wait)
            return self.sock.recv_into(buffer)
        except TimeoutError:
            if wait < self.idle:  # the header's deadline came first
                raise StreamError(
                    f"no complete stream header within {self.idle:g} s of connecting"
                ) from None
            raise StreamError(f"nothing from the sender for {self.idle:g} s") from None
        except OSError as exc:
            raise StreamError(f"lost the connection to the sender: {exc}") from None


def serve_once(
    host: str,
    port: int,
    output: str,
    ready: Callable[[int], None] | None = None,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    max_image_bytes: int | None = None,
    dropped: Callable[[str, StreamError], None] | None = None,
) -> Received:
    """Receive one migration on HOST:PORT into ``output``, which must be writable before
    anything listens.

    A connection is the migration once its header is valid: its outcome is returned, or
    raised as StreamError. A connection that never gets that far — silent for
    ``idle_timeout``, not a migration stream, a header this receiver refuses — is answered
    ERR, closed, reported to ``dropped``, and the next one is accepted: without
    authentication anyone can connect, and a stray or hostile peer must neither end the
    receiver nor hold it for longer than ``idle_timeout``.
    """
    target = check_output(output)
    with socket.create_server((host, port)) as server:
        if ready is not None:
            ready(server.getsockname()[1])
        while True:
            conn, address = server.accept()
            peer = _Peer(conn, idle_timeout)
            try:
                # a buffer smaller than a RUN's payload: BufferedReader reads one straight
                # from the socket into the image instead of through its buffer
                with conn, io.BufferedReader(peer, READ_BUFFER) as stream:
                    return receive_image(
                        stream, conn.sendall, target, max_image_bytes, peer.started
                    )
            except StreamError as exc:
                if peer.begun:
                    raise
                if dropped is not None:
                    dropped(f"{address[0]}:{address[1]}", exc)
