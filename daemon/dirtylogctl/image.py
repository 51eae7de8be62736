"""The destination image: a sparse file addressed by guest-physical address, mapped for numpy.

Both a local file destination (:class:`dirtylogctl.stream.FileSink`) and ``migrate-receive``
(:mod:`dirtylogctl.receive`) write one; the receiver's is staged (:class:`StagedImage`).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from dirtylogctl.keyfile import KeyFile, key_path
from dirtylogctl.wireformat import PAGE_SIZE, Header, StreamError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


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

    def write_run(self, gpa: int, data: ReadableBuffer) -> None:
        """Contiguous pages from ``gpa``, written to the file (not through the mapping: a
        store through it faults each fresh page in, and pwrite costs one copy); StreamError
        unless all of them lie in one reserved slot."""
        length = memoryview(data).nbytes
        first, count = gpa // PAGE_SIZE, -(-length // PAGE_SIZE)
        rows = np.array([first, first + max(count, 1) - 1], np.int64)
        which = np.searchsorted(self._starts, rows, side="right") - 1
        if not self._inside(rows).all() or which[0] != which[1]:
            raise StreamError(f"a run of {count} pages at {gpa:#x} lies outside the image's slots")
        view, at = memoryview(data).cast("B"), 0
        while at < length:
            at += os.pwrite(self.fd, view[at:], first * PAGE_SIZE + at)

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


def _remove_stale_keys(image: str) -> None:
    """Remove the key file of an earlier image at ``image``, if there is one."""
    try:
        os.unlink(key_path(image))
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StreamError(f"cannot remove the stale {key_path(image)}: {_why(exc)}") from None


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

    def write_run(self, gpa: int, data: memoryview) -> None:
        self.image.write_run(gpa, data)

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
