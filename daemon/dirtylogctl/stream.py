"""The two ends of a migration stream, and the destination image.

The bytes on the wire — header, frames, checksums, replies, limits — are defined once, in
:mod:`dirtylogctl.wireformat`; this module moves them. A sink takes pages to a local image
file or to a ``migrate-receive`` over TCP; :func:`receive` applies a stream to an image and
answers the sender. A frame whose checksum does not match, or a stream that ends inside a
frame, is an error — never a silently wrong image. The destination image is a sparse file
addressed by guest-physical address.
"""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol, assert_never

import numpy as np

from dirtylogctl import wireformat as wf
from dirtylogctl.wireformat import PAGE_SIZE, Header, Kind, StreamError


class Image:
    """A destination image: a sparse file, page n at offset n * 4096, mapped for numpy.

    Writing a frame of pages is one fancy-index assignment into the mapping, however scattered
    the pages are; reading pages for verification is one gather.

    A store into a mapped page the file system has no room for is SIGBUS — the process dies
    with no word of why. So the space of every slot (``slots``: (offset, length) pairs; by
    default the whole image) is reserved before anything is written: a full file system is a
    clear error at the start, and a page outside the reserved slots is refused.
    """

    def __init__(
        self, path: str, size: int, slots: Sequence[tuple[int, int]] | None = None
    ) -> None:
        self.path = path
        self.npages = -(-size // PAGE_SIZE)
        spans = [(0, self.npages * PAGE_SIZE)] if slots is None else list(slots)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(self.fd, self.npages * PAGE_SIZE)
            self._reserve(spans)
            self.map = mmap.mmap(self.fd, max(self.npages, 1) * PAGE_SIZE)
        except BaseException:
            os.close(self.fd)
            with contextlib.suppress(OSError):
                os.unlink(path)  # give back what a partial reservation took
            raise
        self.pages = np.frombuffer(self.map, np.uint8).reshape(-1, PAGE_SIZE)[: self.npages]
        self.reserved = np.zeros(self.npages, dtype=bool)
        for offset, length in spans:
            self.reserved[offset // PAGE_SIZE : -(-(offset + length) // PAGE_SIZE)] = True

    def _reserve(self, spans: Sequence[tuple[int, int]]) -> None:
        """Allocate every span's blocks (posix_fallocate), or StreamError naming the errno."""
        for offset, length in spans:
            if offset < 0 or length < 0 or offset + length > self.npages * PAGE_SIZE:
                raise StreamError(f"slot [{offset:#x}, +{length:#x}) lies outside the image")
            if not length:
                continue
            try:
                os.posix_fallocate(self.fd, offset, length)
            except OSError as exc:
                total = sum(n for _, n in spans)
                code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                raise StreamError(
                    f"cannot reserve the {total} bytes of the image {self.path}: "
                    f"{exc.strerror} ({code})"
                ) from None

    def write(self, gpas: np.ndarray, data: np.ndarray) -> None:
        rows = gpas // PAGE_SIZE
        if rows.size and (
            rows.max() >= self.npages or rows.min() < 0 or not self.reserved[rows].all()
        ):
            outside = gpas[(rows < 0) | (rows >= self.npages)]
            if not outside.size:
                outside = gpas[~self.reserved[rows]]
            raise StreamError(f"a page at {int(outside[0]):#x} lies outside the image's slots")
        self.pages[rows] = data.reshape(-1, PAGE_SIZE)

    def read(self, gpas: np.ndarray) -> np.ndarray:
        rows = gpas // PAGE_SIZE
        out = np.zeros((gpas.size, PAGE_SIZE), dtype=np.uint8)
        inside = (rows >= 0) & (rows < self.npages)
        out[inside] = self.pages[rows[inside]]
        return out

    def sync(self) -> None:
        self.map.flush()
        os.fsync(self.fd)

    def close(self) -> None:
        del self.pages
        self.map.close()
        os.close(self.fd)


def image_for(path: str, header: Header) -> Image:
    """The image a stream with ``header`` needs, with the space of its slots reserved."""
    slots = [(s.gpa, s.npages * header.page_size) for s in header.slots]
    return Image(path, header.image_bytes(), slots)


# --- the sending side ---------------------------------------------------------------------------
class Sink(Protocol):
    """Where a migration sends pages."""

    def start(self, header: Header) -> None: ...

    def send_pages(self, gpas: np.ndarray, data: np.ndarray) -> None: ...

    def finish(self, total_pages: int) -> None: ...

    def verify(self, gpas: np.ndarray, pages: np.ndarray) -> list[int]: ...

    def close(self) -> None: ...


class FileSink(Sink):
    """A local image file; pages land at their guest-physical offsets."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.image: Image | None = None

    def start(self, header: Header) -> None:
        self.image = image_for(self.path, header)

    def send_pages(self, gpas: np.ndarray, data: np.ndarray) -> None:
        assert self.image is not None
        self.image.write(gpas, data)

    def finish(self, total_pages: int) -> None:
        assert self.image is not None
        self.image.sync()

    def verify(self, gpas: np.ndarray, pages: np.ndarray) -> list[int]:
        assert self.image is not None
        have = self.image.read(gpas)
        differ = (have != pages.reshape(-1, PAGE_SIZE)).any(axis=1)
        return [int(g) for g in gpas[differ]]

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
            self.image = None


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

    def finish(self, total_pages: int) -> None:
        self._send(wf.done_frame(total_pages))
        written = wf.read_ack(self._recv)
        if written != total_pages:
            raise StreamError(f"the destination wrote {written} pages of {total_pages}")

    def verify(self, gpas: np.ndarray, pages: np.ndarray) -> list[int]:
        key = int.from_bytes(os.urandom(8), "little")
        self._send(wf.verify_frame(key, gpas, wf.page_digests(pages, key)))
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


class Target(Protocol):
    """What :func:`receive` writes into: an :class:`Image`, or a stand-in in tests."""

    def write(self, gpas: np.ndarray, data: np.ndarray) -> None: ...

    def read(self, gpas: np.ndarray) -> np.ndarray: ...

    def sync(self) -> None: ...


def receive(
    conn: BinaryIO, open_image: Callable[[Header], Target], answer: Callable[[bytes], None]
) -> Received:
    """Apply one stream to an image until the sender closes after DONE (and any VERIFY).

    Raises StreamError, after answering ERR with the same text, for a header this receiver
    does not accept, a checksum mismatch, a frame out of limits or order, or a stream that
    ends before DONE or inside a frame.
    """
    stats = Received()

    def whole(data: bytes | None, n: int) -> bytes:
        if data is None or len(data) < n:
            where = "before DONE" if not stats.done else f"inside frame {stats.frames}"
            raise StreamError(f"the stream ended {where}")
        return data

    def read(n: int) -> bytes:
        return whole(conn.read(n), n)

    try:
        header = wf.read_header(read)
        try:
            image = open_image(header)
        except OSError as exc:
            raise StreamError(f"cannot create the image: {exc}") from None
        while True:
            head = conn.read(wf.FRAME_HEAD.size)
            if not head and stats.done:
                return stats  # a clean end: the sender closed after DONE
            stats.frames += 1
            head = whole(head, wf.FRAME_HEAD.size)
            frame = wf.read_frame(head, read, stats.frames, stats.done)
            _apply(frame, image, stats, answer)
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
        image.sync()
        stats.done = True
        answer(wf.encode_ack(stats.pages))
    elif frame.kind is Kind.VERIFY:
        key, gpas, digests = frame.verify()
        bad = gpas[wf.page_digests(image.read(gpas), key) != digests]
        stats.verified_pages += frame.count
        stats.differing += int(bad.size)
        answer(wf.encode_diff(bad))
    else:
        assert_never(frame.kind)  # a new Kind needs its case here


def serve_once(
    host: str, port: int, output: str, ready: Callable[[int], None] | None = None
) -> Received:
    """Accept one migration on HOST:PORT and write its image to ``output``."""
    with socket.create_server((host, port)) as server:
        if ready is not None:
            ready(server.getsockname()[1])
        conn, _peer = server.accept()
    images: list[Image] = []

    def open_image(header: Header) -> Image:
        images.append(image_for(output, header))
        return images[-1]

    try:
        with conn, io.BufferedReader(conn.makefile("rb", buffering=0), 1 << 20) as stream:
            return receive(stream, open_image, conn.sendall)
    finally:
        for image in images:
            image.close()
