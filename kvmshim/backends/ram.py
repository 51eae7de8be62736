"""Guest RAM in a file: one sparse file per VM, one 1 MiB-aligned region per memslot.

A migration tool maps the file read-only, as it would map QEMU's memory-backend-file, and reads
pages at ``region offset + page * 4096``. Regions are never reused within a VM's life, so a tool
holding an old offset never reads another slot's memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
from dataclasses import dataclass

import numpy as np

SEGMENT = 1 << 20  # s390 maps guest memory in 1 MiB segments; regions are aligned to them
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give a region's pages back to the file system (tmpfs frees the memory)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class Region:
    """A mapped region of the RAM file, with byte and little-endian u64 views."""

    offset: int
    size: int
    map: mmap.mmap
    bytes: np.ndarray  # uint8, the region's bytes
    words: np.ndarray  # <u8, word 512*n is the first 8 bytes of page n


class GuestRamFile:
    """The RAM file of one VM."""

    def __init__(self, path: str, mode: int = 0o640, adopt: bool = False) -> None:
        """Create the file, or with ``adopt`` reopen the file a previous daemon left behind."""
        self.path = path
        if adopt:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            size = os.fstat(self.fd).st_size
            self._next_offset = -(-size // SEGMENT) * SEGMENT
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            self._next_offset = 0
        os.fchmod(self.fd, mode)  # the umask must not widen or narrow what we promised

    @property
    def next_offset(self) -> int:
        """Where the next region will start (used as the slot's userspace address)."""
        return self._next_offset

    def allocate(self, size: int) -> Region:
        """Map a fresh zero-filled region of ``size`` bytes (a multiple of the page size)."""
        return self.allocate_at(self._next_offset, size)

    def allocate_at(self, offset: int, size: int) -> Region:
        """Map the region at ``offset`` (an adopted file's existing contents are kept)."""
        end = offset + -(-size // SEGMENT) * SEGMENT
        self._next_offset = max(self._next_offset, end)
        if os.fstat(self.fd).st_size < end:
            os.ftruncate(self.fd, end)
        m = mmap.mmap(
            self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
        )
        raw = np.frombuffer(m, dtype=np.uint8)
        return Region(offset, size, m, raw, raw.view("<u8"))

    def release(self, region: Region) -> None:
        """Drop a deleted slot's memory. The mapping itself goes when its last view does."""
        punch_hole(self.fd, region.offset, region.size)

    def close(self, unlink: bool = True) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
