"""The sending end of a migration stream: where ``dirtylogctl migrate`` sends pages.

The bytes on the wire — header, frames, checksums, replies, limits — are defined once, in
:mod:`dirtylogctl.wireformat`; this module moves them. A sink takes pages to a local image
file (:class:`FileSink`) or to a ``migrate-receive`` over TCP (:class:`TcpSink`, whose other
end is :mod:`dirtylogctl.receive`).

With the header's "storage-keys", the guest's s390 storage keys travel too (KEYS frames at
switch-over) and land in a key file beside the image (:mod:`dirtylogctl.keyfile`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dirtylogctl import wireformat as wf
from dirtylogctl.image import Image, _remove_stale_keys, image_for
from dirtylogctl.keyfile import KeyFile, key_path
from dirtylogctl.wireformat import PAGE_SIZE, Header, StreamError


# --- the sending side ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """Contiguous guest pages as both a mapping and a file range of the guest's RAM file, so a
    sink can copy them (``pages``) or have the kernel send them (``fd`` at ``offset``)."""

    gpa: int
    pages: np.ndarray  # (count, PAGE_SIZE) uint8, a view of the RAM file's mapping
    fd: int
    offset: int
    frozen: bool = False  # the guest is stopped: nothing changes the pages while they go


class Sink(Protocol):
    """Where a migration sends pages."""

    def start(self, header: Header) -> None: ...

    def send_pages(self, gpas: np.ndarray, data: np.ndarray) -> None: ...

    def send_run(self, run: Run) -> None:
        """At most MAX_PAGES_PER_FRAME contiguous pages."""
        ...

    def settle(self) -> None:
        """After :meth:`finish`: the image is durable and in place (outside the downtime)."""
        ...

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

    def send_run(self, run: Run) -> None:
        assert self.image is not None
        self.image.write_run(run.gpa, run.pages.data)

    def finish(self, total_pages: int) -> None:
        if self.keys is not None:
            why = self.keys.missing()
            if why is not None:
                raise StreamError(why)

    def settle(self) -> None:
        assert self.image is not None
        if self.keys is not None:
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


class TcpSink(Sink):
    """A migrate-receive process listening on HOST:PORT."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise StreamError(f"cannot reach the destination {host}:{port}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = np.empty(wf.MAX_PAGES_PER_FRAME * PAGE_SIZE, np.uint8)  # a live run

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

    def send_run(self, run: Run) -> None:
        """A RUN frame. A frozen run goes zero-copy: the kernel sends it from the RAM file.
        A live one is copied first, and the copy checksummed and sent: the kernel reads
        a sent file's pages when it pleases (over loopback, when the receiver reads them), so
        a guest store in between would fail the checksum of a frame that was never corrupt."""
        count = run.pages.shape[0]
        head = wf.run_head(run.gpa, count)
        if not run.frozen:
            payload = self._buffer[: count * PAGE_SIZE]
            np.copyto(payload.reshape(run.pages.shape), run.pages)
            self._sendmsg([head, payload.data, wf.frame_crc(head, payload.data)])
            return
        crc = wf.frame_crc(head, run.pages.data)
        self._send(head)
        size = count * PAGE_SIZE
        try:  # socket.sendfile: os.sendfile, waiting out a full send buffer under the timeout
            with open(run.fd, "rb", closefd=False) as ram:
                if self.sock.sendfile(ram, run.offset, size) != size:
                    raise StreamError("the guest's RAM file ended inside a memslot")
        except OSError as exc:
            lost = StreamError(f"lost the connection to the destination: {exc}")
            raise (self._refusal() or lost) from None
        self._send(crc)

    def _sendmsg(self, parts: list[bytes | memoryview]) -> None:
        """``parts`` in one gathered send (and its rest, if the kernel took less)."""
        views = [memoryview(p).cast("B") for p in parts]
        try:
            while views:
                n = self.sock.sendmsg(views)
                while views and n >= views[0].nbytes:
                    n -= views.pop(0).nbytes
                if views:
                    views[0] = views[0][n:]
        except OSError as exc:
            lost = StreamError(f"lost the connection to the destination: {exc}")
            raise (self._refusal() or lost) from None

    def finish(self, total_pages: int) -> None:
        self._send(wf.done_frame(total_pages))
        written = wf.read_ack(self._recv)
        if written != total_pages:
            raise StreamError(f"the destination wrote {written} pages of {total_pages}")

    def settle(self) -> None:
        self._send(wf.flush_frame())
        wf.read_sync(self._recv)

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
