"""The sending end of a migration stream: where ``dirtylogctl migrate`` sends pages.

The bytes on the wire — header, frames, checksums, replies, limits — are defined once, in
:mod:`dirtylogctl.wireformat`; this module moves them. A sink takes pages to a local image
file (:class:`FileSink`) or to a ``migrate-receive`` over TCP (:class:`TcpSink`, whose other
end is :mod:`dirtylogctl.receive`), over one connection or several (``--channels``).

With the header's "storage-keys", the guest's s390 storage keys travel too (KEYS frames at
switch-over) and land in a key file beside the image (:mod:`dirtylogctl.keyfile`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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

    channels: int  # the TCP connections in use, after start (1 for a file)

    def start(self, header: Header) -> None: ...

    def drain(self) -> None:
        """Wait until every page handed over is sent (a round's end: its time is the wire's)."""
        ...

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

    channels = 1  # a file has no channels: --channels does not apply

    def __init__(self, path: str) -> None:
        self.path = path
        self.image: Image | None = None
        self.keys: KeyFile | None = None

    def drain(self) -> None:
        pass

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


class _Link:
    """One TCP connection to the destination: frames out, replies in."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise StreamError(f"cannot reach the destination {host}:{port}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = np.empty(wf.MAX_PAGES_PER_FRAME * PAGE_SIZE, np.uint8)  # a live run

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            lost = StreamError(f"lost the connection to the destination: {exc}")
            raise (self.refusal() or lost) from None

    def refusal(self) -> StreamError | None:
        """The ERR a receiver sent before closing on us, if it did: its reason beats "connection
        reset" (Linux keeps data that arrived before the reset readable)."""
        with contextlib.suppress(OSError):
            self.sock.settimeout(1.0)
        try:
            wf.read_reply_tag(self.recv)
        except wf.RefusedError as exc:
            return exc
        except StreamError:
            pass
        return None

    def send_pages(self, gpas: np.ndarray, data: np.ndarray) -> None:
        self.send(wf.pages_frame(gpas, data))

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
        self.send(head)
        size = count * PAGE_SIZE
        try:  # socket.sendfile: os.sendfile, waiting out a full send buffer under the timeout
            with open(run.fd, "rb", closefd=False) as ram:
                if self.sock.sendfile(ram, run.offset, size) != size:
                    raise StreamError("the guest's RAM file ended inside a memslot")
        except OSError as exc:
            lost = StreamError(f"lost the connection to the destination: {exc}")
            raise (self.refusal() or lost) from None
        self.send(crc)

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
            raise (self.refusal() or lost) from None

    def recv(self, n: int) -> bytes:
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

    def shutdown(self) -> None:
        """Wake a thread blocked sending on this connection (close alone would not)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


Job = Callable[[_Link], None]


class _Lane(threading.Thread):
    """Sends one channel's frames, in order, from a thread of its own: sendmsg, sendfile and
    the checksum release the GIL, so channels send in parallel while the driver harvests.
    A short queue keeps the driver (and its bandwidth cap and Ctrl-C) within a frame or two
    of the wire; after a failure the lane drops what is queued, so a put never waits on it."""

    DEPTH = 2

    def __init__(self, link: _Link, index: int) -> None:
        super().__init__(name=f"migrate-channel-{index}", daemon=True)
        self.link = link
        self.jobs: queue.Queue[Job | None] = queue.Queue(self.DEPTH)
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    job(self.link)
            except BaseException as exc:  # reported to the driver at its next put or drain
                self.error = exc
            finally:
                self.jobs.task_done()

    def stop(self) -> None:
        """End the thread (its connection shut down first, so it cannot hang in a send)."""
        self.error = self.error or StreamError("the migration was ended")
        self.link.shutdown()
        with contextlib.suppress(queue.Full):
            self.jobs.put(None, timeout=1.0)
        self.join(timeout=5.0)


class TcpSink(Sink):
    """A migrate-receive process listening on HOST:PORT, over one TCP connection or several
    (``channels``: offered; the receiver may accept fewer, see :mod:`dirtylogctl.wireformat`).

    With several, each page goes on the channel its address pins it to, each channel sent
    from a thread of its own; header, keys, DONE, verification and FLUSH go on the main one
    once every channel's frames are out."""

    def __init__(self, host: str, port: int, timeout: float = 30.0, offered: int = 1) -> None:
        self.address, self.timeout, self.offered = (host, port), timeout, offered
        self.main = _Link(host, port, timeout)
        self.links = [self.main]
        self.lanes: list[_Lane] = []  # with several channels: one sending thread each
        self.channels = 1
        self.sent = [0]  # pages per channel, for END

    def start(self, header: Header) -> None:
        self.main.send(wf.encode_header(header))
        if header.version < 4:
            return
        accepted = wf.read_chan(self.main.recv)
        if not 1 <= accepted <= header.channels:
            raise StreamError(
                f"the destination accepted {accepted} channels of the {header.channels} offered"
            )
        for index in range(1, accepted):
            self.links.append(self._hello(header.token, index))
        self.channels, self.sent = accepted, [0] * accepted
        if accepted > 1:
            self.lanes = [_Lane(link, i) for i, link in enumerate(self.links)]

    def _hello(self, token: bytes, index: int) -> _Link:
        """Channel ``index``, connected and accepted by the receiver."""
        link = _Link(*self.address, self.timeout)
        try:
            link.send(wf.encode_hello(token, index))
            if wf.read_chan(link.recv) != index:
                raise StreamError(f"the destination accepted channel {index} as another")
        except StreamError as exc:
            link.close()
            raise StreamError(f"channel {index}: {exc}") from None
        return link

    def _on(self, channel: int, job: Job) -> None:
        """``job`` on ``channel``'s connection: now, or queued to its lane."""
        if not self.lanes:
            job(self.links[channel])
            return
        self._check()
        self.lanes[channel].jobs.put(job)

    def _check(self) -> None:
        """Raise the first lane's failure, once every lane has stopped sending: preferably
        as the receiver's reason, which it sends on the main channel."""
        failed = next((lane.error for lane in self.lanes if lane.error is not None), None)
        if failed is None:
            return
        for lane in self.lanes:
            lane.error = lane.error or failed  # the rest of every queue is dropped
        for lane in self.lanes:
            lane.jobs.join()
        if isinstance(failed, wf.RefusedError) or not isinstance(failed, StreamError):
            raise failed
        raise self.main.refusal() or failed

    def drain(self) -> None:
        for lane in self.lanes:
            lane.jobs.join()
        self._check()

    def send_pages(self, gpas: np.ndarray, data: np.ndarray) -> None:
        for channel, idx in wf.split_pages(gpas, self.channels):
            part_gpas = gpas if idx.size == gpas.size else gpas[idx]
            part = data if idx.size == gpas.size else data[idx]
            self._on(channel, partial(_Link.send_pages, gpas=part_gpas, data=part))
            self.sent[channel] += int(idx.size)

    def send_run(self, run: Run) -> None:
        for channel, gpa, count in wf.split_run(run.gpa, run.pages.shape[0], self.channels):
            at = (gpa - run.gpa) // PAGE_SIZE
            piece = Run(
                gpa, run.pages[at : at + count], run.fd, run.offset + at * PAGE_SIZE, run.frozen
            )
            self._on(channel, partial(_Link.send_run, run=piece))
            self.sent[channel] += count

    def send_keys(self, gpa: int, keys: np.ndarray) -> None:
        self.drain()  # after every page on the main channel
        self.main.send(wf.keys_frame(gpa, keys))

    def finish(self, total_pages: int) -> None:
        self.drain()
        for index in range(1, self.channels):
            self.links[index].send(wf.end_frame(self.sent[index]))
        self.main.send(wf.done_frame(total_pages))
        written = wf.read_ack(self.main.recv)
        if written != total_pages:
            raise StreamError(f"the destination wrote {written} pages of {total_pages}")

    def settle(self) -> None:
        self.main.send(wf.flush_frame())
        wf.read_sync(self.main.recv)

    def verify(self, gpas: np.ndarray, pages: np.ndarray) -> list[int]:
        key = int.from_bytes(os.urandom(8), "little")
        self.main.send(wf.verify_frame(key, gpas, wf.page_digests(pages, key)))
        return wf.read_diff(self.main.recv)

    def verify_keys(self, gpa: int, keys: np.ndarray) -> list[int]:
        self.main.send(wf.verify_keys_frame(gpa, keys))
        return wf.read_diff(self.main.recv)

    def close(self) -> None:
        for lane in self.lanes:
            lane.stop()
        for link in self.links:
            link.close()
