"""The two ends of a migration stream, and the destination image.

The bytes on the wire — header, frames, checksums, replies, limits — are defined once, in
:mod:`dirtylogctl.wireformat`; this module moves them. A sink takes pages to a local image
file or to a ``migrate-receive`` over TCP; :func:`receive` applies a stream to an image and
answers the sender. A frame whose checksum does not match, or a stream that ends inside a
frame, is an error — never a silently wrong image. The destination image is a sparse file
addressed by guest-physical address.

With the header's "storage-keys", the guest's s390 storage keys travel too (KEYS frames at
switch-over) and land in a key file beside the image (:mod:`dirtylogctl.keyfile`), put in
place with it.

``migrate-receive`` listens without authentication, so :func:`serve_once` expects hostile
peers: no peer's bytes cost it more memory than a few of the largest frames, or end it with
anything but a one-line StreamError; a silent peer is dropped after an idle timeout; a peer
that never sends a valid header is dropped without ending it; and ``--output`` is replaced
only by a complete image.
"""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol, TypeVar, assert_never

import numpy as np

from dirtylogctl import wireformat as wf
from dirtylogctl.keyfile import KeyFile, key_path
from dirtylogctl.wireformat import PAGE_SIZE, Header, Kind, StreamError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

T = TypeVar("T")


def _why(exc: OSError) -> str:
    """An OSError as one line: its text and the errno's name, e.g. "No space left on device
    (ENOSPC)"."""
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{exc.strerror or exc} ({code})"


def _merge(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) spans as sorted, disjoint [start, end) byte ranges."""
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(spans):
        if length <= 0:
            continue
        if merged and offset <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], offset + length))
        else:
            merged.append((offset, offset + length))
    return merged


class Image:
    """A destination image: a sparse file, page n at offset n * 4096, mapped for numpy.

    Writing a frame of pages is one fancy-index assignment into the mapping, however scattered
    the pages are; reading pages for verification is one gather.

    A store into a mapped page the file system has no room for is SIGBUS — the process dies
    with no word of why. So the space of every slot (``slots``: (offset, length) pairs; by
    default the whole image) is reserved before anything is written: a full file system is a
    clear error at the start, and a page outside the reserved slots is refused. The image's
    size comes from a peer, so what it costs this process is bounded by the number of slots,
    not their size: the slots are kept as ranges (not a flag per page), and space the file
    system does not have is refused before any is reserved.
    """

    def __init__(
        self,
        path: str,
        size: int,
        slots: Sequence[tuple[int, int]] | None = None,
        label: str | None = None,
    ) -> None:
        self.path = path
        self.label = label or path  # how errors name it: a receiver writes under another name
        self.npages = -(-size // PAGE_SIZE)
        if self.npages * PAGE_SIZE > sys.maxsize:  # ftruncate and mmap take a signed size
            raise StreamError(
                f"an image reaching {size:#x} is larger than a file can be ({sys.maxsize:#x})"
            )
        spans = [(0, self.npages * PAGE_SIZE)] if slots is None else list(slots)
        for offset, length in spans:
            if offset < 0 or length < 0 or offset + length > self.npages * PAGE_SIZE:
                raise StreamError(f"slot [{offset:#x}, +{length:#x}) lies outside the image")
        self.ranges = _merge(spans)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(self.fd, self.npages * PAGE_SIZE)
            self._reserve()
            # mmap refuses a length of 0: an image without pages has no mapping
            self.map = mmap.mmap(self.fd, self.npages * PAGE_SIZE) if self.npages else None
        except BaseException:
            os.close(self.fd)
            with contextlib.suppress(OSError):
                os.unlink(path)  # give back what a partial reservation took
            raise
        self.pages = (
            np.frombuffer(self.map, np.uint8).reshape(-1, PAGE_SIZE)
            if self.map is not None
            else np.zeros((0, PAGE_SIZE), np.uint8)
        )
        self._starts = np.array([start // PAGE_SIZE for start, _ in self.ranges], np.int64)
        self._ends = np.array([-(-end // PAGE_SIZE) for _, end in self.ranges], np.int64)

    def _reserve(self) -> None:
        """Allocate every slot's blocks (posix_fallocate), or StreamError naming the errno.
        An image larger than the file system's free space is refused before any is taken, so
        a peer's absurd size does not fill the disk for a moment (nor delay the error)."""
        total = sum(end - start for start, end in self.ranges)
        stats = os.fstatvfs(self.fd)
        free = stats.f_bavail * stats.f_frsize
        if total > free:
            raise StreamError(
                f"cannot reserve the {total} bytes of the image {self.label}: "
                f"{os.strerror(errno.ENOSPC)} (ENOSPC): only {free} bytes are free"
            )
        for start, end in self.ranges:
            try:
                os.posix_fallocate(self.fd, start, end - start)
            except OSError as exc:
                raise StreamError(
                    f"cannot reserve the {total} bytes of the image {self.label}: {_why(exc)}"
                ) from None

    def _inside(self, rows: np.ndarray) -> np.ndarray:
        """Which pages (numbers) lie in a reserved slot: only those may be stored."""
        if not self._starts.size:
            return np.zeros(rows.shape, bool)
        which = np.searchsorted(self._starts, rows, side="right") - 1
        result: np.ndarray = (which >= 0) & (rows < self._ends[np.maximum(which, 0)])
        return result

    def write(self, gpas: np.ndarray, data: np.ndarray) -> None:
        rows = gpas // PAGE_SIZE
        inside = self._inside(rows)
        if not inside.all():
            first = int(gpas[~inside][0]) % (1 << 64)  # as sent: a u64 read as int64
            raise StreamError(f"a page at {first:#x} lies outside the image's slots")
        self.pages[rows] = data.reshape(-1, PAGE_SIZE)

    def read(self, gpas: np.ndarray) -> np.ndarray:
        rows = gpas // PAGE_SIZE
        out = np.zeros((gpas.size, PAGE_SIZE), dtype=np.uint8)
        inside = (rows >= 0) & (rows < self.npages)
        out[inside] = self.pages[rows[inside]]
        return out

    def sync(self) -> None:
        if self.map is not None:
            self.map.flush()
        os.fsync(self.fd)

    def close(self) -> None:
        del self.pages
        if self.map is not None:
            self.map.close()
        os.close(self.fd)


def image_for(path: str, header: Header, label: str | None = None) -> Image:
    """The image a stream with ``header`` needs, with the space of its slots reserved."""
    slots = [(s.gpa, s.npages * header.page_size) for s in header.slots]
    return Image(path, header.image_bytes(), slots, label)


# --- the sending side ---------------------------------------------------------------------------
class Sink(Protocol):
    """Where a migration sends pages."""

    def start(self, header: Header) -> None: ...

    def send_pages(self, gpas: np.ndarray, data: np.ndarray) -> None: ...

    def send_keys(self, gpa: int, keys: np.ndarray) -> None:
        """The storage keys of the pages from ``gpa`` on (a header with storage keys only)."""
        ...

    def finish(self, total_pages: int) -> None: ...

    def verify(self, gpas: np.ndarray, pages: np.ndarray) -> list[int]: ...

    def verify_keys(self, gpa: int, keys: np.ndarray) -> list[int]:
        """The guest addresses of the pages from ``gpa`` whose key at the destination differs."""
        ...

    def close(self) -> None: ...


class FileSink(Sink):
    """A local image file; pages land at their guest-physical offsets, keys in its key file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.image: Image | None = None
        self.keys: KeyFile | None = None

    def start(self, header: Header) -> None:
        self.image = image_for(self.path, header)
        if header.storage_keys:
            self.keys = KeyFile(key_path(self.path), header)
        else:  # the keys of the image just replaced must not pass for this one's
            _remove_stale_keys(self.path)

    def send_pages(self, gpas: np.ndarray, data: np.ndarray) -> None:
        assert self.image is not None
        self.image.write(gpas, data)

    def send_keys(self, gpa: int, keys: np.ndarray) -> None:
        assert self.keys is not None
        self.keys.write(gpa, keys)

    def finish(self, total_pages: int) -> None:
        assert self.image is not None
        if self.keys is not None:
            why = self.keys.missing()
            if why is not None:
                raise StreamError(why)
            self.keys.sync()
        self.image.sync()

    def verify_keys(self, gpa: int, keys: np.ndarray) -> list[int]:
        assert self.keys is not None
        return [int(g) for g in self.keys.differing(gpa, keys)]

    def verify(self, gpas: np.ndarray, pages: np.ndarray) -> list[int]:
        assert self.image is not None
        have = self.image.read(gpas)
        differ = (have != pages.reshape(-1, PAGE_SIZE)).any(axis=1)
        return [int(g) for g in gpas[differ]]

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
            self.image = None
        if self.keys is not None:
            self.keys.close()
            self.keys = None


def _remove_stale_keys(image: str) -> None:
    """Remove the key file of an earlier image at ``image``, if there is one."""
    try:
        os.unlink(key_path(image))
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StreamError(f"cannot remove the stale {key_path(image)}: {_why(exc)}") from None


class TcpSink(Sink):
    """A migrate-receive process listening on HOST:PORT."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise StreamError(f"cannot reach the destination {host}:{port}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            lost = StreamError(f"lost the connection to the destination: {exc}")
            raise (self._refusal() or lost) from None

    def _refusal(self) -> StreamError | None:
        """The ERR a receiver sent before closing on us, if it did: its reason beats "connection
        reset" (Linux keeps data that arrived before the reset readable)."""
        with contextlib.suppress(OSError):
            self.sock.settimeout(1.0)
        try:
            wf.read_reply_tag(self._recv)
        except wf.RefusedError as exc:
            return exc
        except StreamError:
            pass
        return None

    def start(self, header: Header) -> None:
        self._send(wf.encode_header(header))

    def send_pages(self, gpas: np.ndarray, data: np.ndarray) -> None:
        self._send(wf.pages_frame(gpas, data))

    def send_keys(self, gpa: int, keys: np.ndarray) -> None:
        self._send(wf.keys_frame(gpa, keys))

    def finish(self, total_pages: int) -> None:
        self._send(wf.done_frame(total_pages))
        written = wf.read_ack(self._recv)
        if written != total_pages:
            raise StreamError(f"the destination wrote {written} pages of {total_pages}")

    def verify(self, gpas: np.ndarray, pages: np.ndarray) -> list[int]:
        key = int.from_bytes(os.urandom(8), "little")
        self._send(wf.verify_frame(key, gpas, wf.page_digests(pages, key)))
        return wf.read_diff(self._recv)

    def verify_keys(self, gpa: int, keys: np.ndarray) -> list[int]:
        self._send(wf.verify_keys_frame(gpa, keys))
        return wf.read_diff(self._recv)

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError as exc:
                raise StreamError(f"lost the connection to the destination: {exc}") from None
            if not chunk:
                raise StreamError("the destination closed the connection without an answer")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


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


class Target(Protocol):
    """What :func:`receive` writes into: a :class:`StagedImage`, or a stand-in in tests."""

    def write(self, gpas: np.ndarray, data: np.ndarray) -> None: ...

    def read(self, gpas: np.ndarray) -> np.ndarray: ...

    def write_keys(self, gpa: int, keys: np.ndarray) -> None: ...

    def differing_keys(self, gpa: int, keys: np.ndarray) -> np.ndarray: ...

    def sync(self) -> None:
        """Make the image (and keys) durable; StreamError if declared keys are missing."""
        ...


def receive(
    conn: BinaryIO, open_image: Callable[[Header], Target], answer: Callable[[bytes], None]
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
                return stats  # a clean end: the sender closed after DONE
            stats.frames += 1
            head = whole(head, wf.FRAME_HEAD.size)
            frame = wf.read_frame(head, read, stats.frames, stats.done)
            if frame.kind in wf.KEY_KINDS and not header.storage_keys:
                raise StreamError(
                    f"frame {stats.frames}: {frame.kind.name} in a stream whose header "
                    "declares no storage keys"
                )
            _apply(frame, image, stats, reply)
    except StreamError as exc:
        with contextlib.suppress(OSError):  # the other end may be gone already
            answer(wf.encode_err(str(exc)))
        raise


def _apply(
    frame: wf.Frame, image: Target, stats: Received, answer: Callable[[bytes], None]
) -> None:
    """One checked frame's effect on the image, and the receiver's answer to it."""
    if frame.kind is Kind.PAGES:
        gpas, data = frame.pages()
        image.write(gpas, data)
        stats.pages += frame.count
    elif frame.kind is Kind.DONE:
        try:
            image.sync()
        except OSError as exc:
            raise StreamError(f"cannot store the image: {exc}") from None
        stats.done = True
        answer(wf.encode_ack(stats.pages))
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


def _numbered(
    stats: Received, step: Callable[[int, np.ndarray], T], gpa: int, keys: np.ndarray
) -> T:
    """``step(gpa, keys)``, its refusal naming the frame it came with."""
    try:
        return step(gpa, keys)
    except StreamError as exc:
        raise StreamError(f"frame {stats.frames}: {exc}") from None


# --- migrate-receive ----------------------------------------------------------------------------
IDLE_TIMEOUT = 30.0
"""Seconds a receiver waits for a connected peer's next bytes, and for its whole header. A
sender is silent longest while it reconnects to a restarted daemon (a restart takes a second
or two; it gives up after its --reconnect-timeout, 30 s); its own socket timeout is 30 s too."""


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


class StagedImage:
    """An image (and its storage keys, if the stream has them) written beside ``output`` under
    temporary names, renamed over ``output`` (and ``output.skeys``) once the sender's DONE is
    synced: until then both keep whatever they held, so a peer that is refused, goes silent or
    breaks off never costs the operator an existing file. An image published without keys
    takes an older image's key file with it: those keys described the image it replaced."""

    def __init__(self, output: str, header: Header) -> None:
        self.output = output
        self.directory, self.name = os.path.split(output)
        self.published = False
        self.temps: list[str] = []
        self.keys: KeyFile | None = None
        try:
            self.temp = self._temp("")
            self.image = image_for(self.temp, header, label=output)
        except BaseException:
            self._discard()
            raise
        try:
            if header.storage_keys:
                self.keys = KeyFile(self._temp(".skeys"), header, label=key_path(output))
        except BaseException:
            self.close()
            raise

    def _temp(self, kind: str) -> str:
        """A fresh temporary file beside the output, removed on close unless published."""
        try:
            fd, temp = tempfile.mkstemp(
                prefix=f".{self.name}{kind}.", suffix=".part", dir=self.directory
            )
        except OSError as exc:  # the directory went away or became read-only since
            raise StreamError(f"cannot create the image {self.output}: {_why(exc)}") from None
        os.close(fd)
        self.temps.append(temp)
        return temp

    def write(self, gpas: np.ndarray, data: np.ndarray) -> None:
        self.image.write(gpas, data)

    def read(self, gpas: np.ndarray) -> np.ndarray:
        return self.image.read(gpas)

    def write_keys(self, gpa: int, keys: np.ndarray) -> None:
        assert self.keys is not None  # receive() refuses KEYS a header does not declare
        self.keys.write(gpa, keys)

    def differing_keys(self, gpa: int, keys: np.ndarray) -> np.ndarray:
        assert self.keys is not None
        return self.keys.differing(gpa, keys)

    def sync(self) -> None:
        """Sync, then put the image and keys in place (once): the ACK that follows means all.

        Keys first: a crash between the renames leaves the new keys beside the old image,
        unacknowledged — the sender then reports the migration failed either way."""
        if self.keys is not None:
            why = self.keys.missing()
            if why is not None:
                raise StreamError(why)
            self.keys.sync()
        self.image.sync()
        if self.published:
            return
        if self.keys is not None:
            os.replace(self.keys.path, key_path(self.output))
        else:
            _remove_stale_keys(self.output)
        os.replace(self.temp, self.output)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # the renames themselves survive a crash
        finally:
            os.close(fd)
        self.published = True

    def close(self) -> None:
        self.image.close()
        if self.keys is not None:
            self.keys.close()
        self._discard()

    def _discard(self) -> None:
        """Remove the temporary files, unless they were put in place."""
        if not self.published:
            for temp in self.temps:
                with contextlib.suppress(OSError):
                    os.unlink(temp)


def receive_image(
    conn: BinaryIO,
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
                with conn, io.BufferedReader(peer, 1 << 20) as stream:
                    return receive_image(
                        stream, conn.sendall, target, max_image_bytes, peer.started
                    )
            except StreamError as exc:
                if peer.begun:
                    raise
                if dropped is not None:
                    dropped(f"{address[0]}:{address[1]}", exc)
