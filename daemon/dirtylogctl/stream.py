"""The migration page stream: framed, checksummed, and its two ends.

Wire format (little-endian). The sender starts with ``MAGIC`` and a JSON header; then frames:

    u8 type | u32 count | u64 aux | payload | u32 crc32 of everything before it in the frame

    PAGES   count pages; payload = count u64 guest addresses, then count * 4096 bytes
    DONE    aux = pages sent in all; the receiver syncs its image and answers ACK or ERR
    VERIFY  payload = u64 key, then count (u64 gpa, u64 digest) pairs; the receiver answers
            with the addresses whose digest differs (see :func:`page_digests`)

A receiver answers ``ACK`` + u64 pages written, ``ERR`` + u32 length + message, or
``DIFF`` + u32 count + count u64 addresses. A frame whose checksum does not match, or a
stream that ends inside a frame, is an error — never a silently wrong image. The destination
image is a sparse file addressed by guest-physical address.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

PAGE = 4096
MAGIC = b"DLGMIG1\n"
PAGES, DONE, VERIFY = 1, 2, 3
_FRAME = struct.Struct("<BIQ")
_CRC = struct.Struct("<I")
MAX_PAGES_PER_FRAME = 256
MAX_VERIFY_PAGES = 1 << 24


class StreamError(Exception):
    """The stream is corrupt, truncated, or the other end refused it; the text says which."""


def page_digests(pages: np.ndarray, key: int) -> np.ndarray:
    """A keyed multilinear hash of each 4 KiB page (rows of ``pages`` as bytes).

    Word i of a page is multiplied by an odd key derived from ``key`` and i, summed mod 2^64:
    two different pages collide with probability about 2^-63 for a random key, and numpy does
    it for all pages at once.
    """
    words = pages.view("<u8").reshape(-1, PAGE // 8)
    rng = np.random.default_rng(key)
    keys = rng.integers(0, 2**63, PAGE // 8, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    with np.errstate(over="ignore"):
        return (words * keys).sum(axis=1, dtype=np.uint64)


class Image:
    """A destination image: a sparse file, page n at offset n * 4096, mapped for numpy.

    Writing a frame of pages is one fancy-index assignment into the mapping, however scattered
    the pages are; reading pages for verification is one gather.
    """

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.npages = -(-size // PAGE)
        os.ftruncate(self.fd, self.npages * PAGE)
        self.map = mmap.mmap(self.fd, max(self.npages, 1) * PAGE)
        self.pages = np.frombuffer(self.map, np.uint8).reshape(-1, PAGE)[: self.npages]

    def write(self, gpas: np.ndarray, data: np.ndarray) -> None:
        rows = gpas // PAGE
        if rows.size and (rows.max() >= self.npages or rows.min() < 0):
            raise StreamError(f"a page at {int(gpas.max()):#x} lies outside the image's slots")
        self.pages[rows] = data.reshape(-1, PAGE)

    def read(self, gpas: np.ndarray) -> np.ndarray:
        rows = gpas // PAGE
        out = np.zeros((gpas.size, PAGE), dtype=np.uint8)
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


def image_size(header: dict[str, Any]) -> int:
    """Bytes an image needs to hold every slot the header announces, at its guest address."""
    return max((s["guest-phys-addr"] + s["npages"] * PAGE for s in header["slots"]), default=0)


def frame(kind: int, count: int, aux: int, payload: bytes | memoryview = b"") -> bytes:
    head = _FRAME.pack(kind, count, aux)
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + bytes(payload) + _CRC.pack(crc)


def pages_frame(gpas: np.ndarray, data: np.ndarray) -> bytes:
    """One PAGES frame: ``data`` holds len(gpas) pages, in order."""
    payload = gpas.astype("<u8").tobytes() + data.tobytes()
    return frame(PAGES, gpas.size, 0, payload)


# --- the sending side ---------------------------------------------------------------------------
class Sink:
    """Where a migration sends pages."""

    def start(self, header: dict[str, Any]) -> None: ...

    def send_pages(self, gpas: np.ndarray, data: np.ndarray) -> None: ...

    def finish(self, total_pages: int) -> None: ...

    def verify(self, gpas: np.ndarray, pages: np.ndarray) -> list[int]: ...

    def close(self) -> None: ...


class FileSink(Sink):
    """A local image file; pages land at their guest-physical offsets."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.image: Image | None = None

    def start(self, header: dict[str, Any]) -> None:
        self.image = Image(self.path, image_size(header))

    def send_pages(self, gpas: np.ndarray, data: np.ndarray) -> None:
        assert self.image is not None
        self.image.write(gpas, data)

    def finish(self, total_pages: int) -> None:
        assert self.image is not None
        self.image.sync()

    def verify(self, gpas: np.ndarray, pages: np.ndarray) -> list[int]:
        assert self.image is not None
        have = self.image.read(gpas)
        return gpas[(have != pages.reshape(-1, PAGE)).any(axis=1)].tolist()

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
            raise StreamError(f"lost the connection to the destination: {exc}") from None

    def start(self, header: dict[str, Any]) -> None:
        meta = json.dumps(header).encode()
        self._send(MAGIC + struct.pack("<I", len(meta)) + meta)

    def send_pages(self, gpas: np.ndarray, data: np.ndarray) -> None:
        self._send(pages_frame(gpas, data))

    def finish(self, total_pages: int) -> None:
        self._send(frame(DONE, 0, total_pages))
        kind = self._answer()
        if kind != b"ACK ":
            raise StreamError(f"the destination did not acknowledge the image (answered {kind!r})")
        (written,) = struct.unpack("<Q", self._recv(8))
        if written != total_pages:
            raise StreamError(f"the destination wrote {written} pages of {total_pages}")

    def verify(self, gpas: np.ndarray, pages: np.ndarray) -> list[int]:
        key = int.from_bytes(os.urandom(8), "little")
        digests = page_digests(pages, key)
        pairs = np.stack((gpas.astype("<u8"), digests.astype("<u8")), axis=1)
        self._send(frame(VERIFY, gpas.size, 0, struct.pack("<Q", key) + pairs.tobytes()))
        if self._answer() != b"DIFF":
            raise StreamError("the destination did not answer the verification")
        (count,) = struct.unpack("<I", self._recv(4))
        return np.frombuffer(self._recv(8 * count), "<u8").tolist() if count else []

    def _answer(self) -> bytes:
        kind = self._recv(4)
        if kind == b"ERR ":
            (n,) = struct.unpack("<I", self._recv(4))
            raise StreamError(f"the destination refused the stream: {self._recv(n).decode()}")
        return kind

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


def receive(
    conn: BinaryIO, open_image: Callable[[dict[str, Any]], Image], answer: Callable[[bytes], None]
) -> Received:
    """Apply one stream to an image until the sender closes after DONE (and any VERIFY).

    Raises StreamError, after answering ERR, for a bad magic, a checksum mismatch, an unknown
    frame, or a stream that ends before DONE or inside a frame.
    """
    stats = Received()

    def read(n: int, boundary: bool = False) -> bytes | None:
        data = conn.read(n)
        if boundary and not data and stats.done:
            return None  # a clean end: the sender closed after DONE
        if data is None or len(data) < n:
            where = "before DONE" if not stats.done else f"inside frame {stats.frames + 1}"
            raise StreamError(f"the stream ended {where}")
        return data

    try:
        if read(len(MAGIC)) != MAGIC:
            raise StreamError("not a dirtylogd migration stream (bad magic)")
        (meta_len,) = struct.unpack("<I", read(4) or b"")
        if meta_len > 1 << 20:
            raise StreamError("stream header too large")
        try:
            header = json.loads(read(meta_len) or b"")
            image = open_image(header)
        except (ValueError, KeyError, TypeError) as exc:
            raise StreamError(f"bad stream header: {exc}") from None
        while True:
            head = read(_FRAME.size, boundary=True)
            if head is None:
                return stats
            kind, count, _total = _FRAME.unpack(head)
            stats.frames += 1
            limits = {
                PAGES: (MAX_PAGES_PER_FRAME, 8 + PAGE, 0),
                VERIFY: (MAX_VERIFY_PAGES, 16, 8),
                DONE: (0, 0, 0),
            }
            if kind not in limits:
                raise StreamError(f"frame {stats.frames}: unknown type {kind}")
            most, per_page, extra = limits[kind]
            if count > most or (kind == PAGES and stats.done):
                raise StreamError(f"frame {stats.frames}: unexpected {count} pages")
            payload = read(extra + count * per_page) or b""
            (crc,) = _CRC.unpack(read(_CRC.size) or b"")
            if zlib.crc32(payload, zlib.crc32(head)) != crc:
                raise StreamError(f"frame {stats.frames}: checksum mismatch")
            if kind == PAGES:
                gpas = np.frombuffer(payload, "<u8", count).astype(np.int64)
                image.write(gpas, np.frombuffer(payload, np.uint8, count * PAGE, 8 * count))
                stats.pages += count
            elif kind == DONE:
                image.sync()
                stats.done = True
                answer(b"ACK " + struct.pack("<Q", stats.pages))
            else:
                if not stats.done:
                    raise StreamError(f"frame {stats.frames}: VERIFY before DONE")
                (key,) = struct.unpack_from("<Q", payload)
                pairs = np.frombuffer(payload, "<u8", count * 2, 8).reshape(-1, 2)
                have = page_digests(image.read(pairs[:, 0].astype(np.int64)), key)
                bad = pairs[have != pairs[:, 1], 0]
                stats.verified_pages += count
                stats.differing += int(bad.size)
                answer(b"DIFF" + struct.pack("<I", bad.size) + bad.astype("<u8").tobytes())
    except StreamError as exc:
        message = str(exc).encode()
        with contextlib.suppress(OSError):  # the other end may be gone already
            answer(b"ERR " + struct.pack("<I", len(message)) + message)
        raise


def serve_once(
    host: str, port: int, output: str, ready: Callable[[int], None] | None = None
) -> Received:
    """Accept one migration on HOST:PORT and write its image to ``output``."""
    with socket.create_server((host, port)) as server:
        if ready is not None:
            ready(server.getsockname()[1])
        conn, _peer = server.accept()
    images: list[Image] = []

    def open_image(header: dict[str, Any]) -> Image:
        images.append(Image(output, image_size(header)))
        return images[-1]

    try:
        with conn, conn.makefile("rb", buffering=1 << 20) as stream:
            return receive(stream, open_image, conn.sendall)
    finally:
        for image in images:
            image.close()
