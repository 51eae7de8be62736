"""The destination's storage keys: a file beside the image, ``IMAGE.skeys``.

Layout: one byte per page — the guest's storage key, as KVM_S390_GET_SKEYS returns it — of
every slot of the stream header, slots in header order, each from its first page; nothing
else (no header: the image's stream header says which slot is where, and the file's size is
the slots' page count). A KVM_S390_SET_SKEYS of each slot's part restores them.

The sender sends each page's key once, in that very order (see
:mod:`dirtylogctl.wireformat`), so the file checks the stream with one position: a KEYS frame
must start where the previous one ended, stay within its slot, and DONE must find every slot
complete. What a peer's header costs is bounded like the image: the file is 1/4096 of the
image's reserved size, reserved too before anything is written (ENOSPC at the start, clearly).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os

import numpy as np

from dirtylogctl.wireformat import PAGE_SIZE, Header, StreamError

SUFFIX = ".skeys"


def _why(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{exc.strerror or exc} ({code})"


def key_path(image: str) -> str:
    """Where the keys of the image at ``image`` live."""
    return image + SUFFIX


class KeyFile:
    """The key file of one stream, written in order and checked complete at DONE."""

    def __init__(self, path: str, header: Header, label: str | None = None) -> None:
        self.path = path
        self.label = label or path
        self.slots = [s for s in header.slots if s.npages]
        starts = np.cumsum([0] + [s.npages for s in self.slots])
        self.offsets = [int(x) for x in starts[:-1]]
        self.size = int(starts[-1])
        self.next = 0  # keys received so far, in file order: the position of the next
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(self.fd, self.size)
            if self.size:
                os.posix_fallocate(self.fd, 0, self.size)
        except OSError as exc:
            os.close(self.fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise StreamError(
                f"cannot reserve the {self.size} bytes of the storage keys {self.label}: "
                f"{_why(exc)}"
            ) from None

    def _due(self) -> tuple[int, int]:
        """(slot index, page) of the next key the stream owes."""
        i = bisect.bisect_right(self.offsets, self.next) - 1
        return i, self.next - self.offsets[i]

    def write(self, gpa: int, keys: np.ndarray) -> None:
        """The keys of the pages from ``gpa`` on: exactly the next ones due, within one slot."""
        if self.next >= self.size:
            raise StreamError(f"KEYS at {gpa:#x} after every slot's keys had come")
        i, page = self._due()
        slot = self.slots[i]
        due = slot.gpa + page * PAGE_SIZE
        if gpa != due:
            raise StreamError(
                f"KEYS at {gpa:#x} where those from {due:#x} (slot {slot.slot}) were due: "
                "keys come once each, slot by slot in header order"
            )
        if page + keys.size > slot.npages:
            raise StreamError(
                f"KEYS of {keys.size} pages at {gpa:#x} run past the end of slot {slot.slot}"
            )
        data = memoryview(keys.tobytes())
        try:
            done = 0
            while done < len(data):  # a regular file takes it all, or says why
                done += os.pwrite(self.fd, data[done:], self.next + done)
        except OSError as exc:
            raise StreamError(f"cannot store the storage keys {self.label}: {_why(exc)}") from None
        self.next += keys.size

    def missing(self) -> str | None:
        """Why the keys are incomplete, or None once every slot's have come."""
        if self.next == self.size:
            return None
        i, page = self._due()
        slot = self.slots[i]
        return (
            f"the stream declared storage keys but sent {self.next} of {self.size}: none from "
            f"{slot.gpa + page * PAGE_SIZE:#x} (slot {slot.slot}) on"
        )

    def differing(self, gpa: int, keys: np.ndarray) -> np.ndarray:
        """The guest addresses (u64) of the pages from ``gpa`` whose stored key differs; the
        range must lie in one slot (the first, in header order, that holds it)."""
        end = gpa + keys.size * PAGE_SIZE
        for slot, offset in zip(self.slots, self.offsets, strict=True):
            if slot.gpa <= gpa and end <= slot.gpa + slot.npages * PAGE_SIZE:
                at = offset + (gpa - slot.gpa) // PAGE_SIZE
                try:
                    have = np.frombuffer(os.pread(self.fd, keys.size, at), np.uint8)
                except OSError as exc:
                    raise StreamError(f"cannot read the storage keys: {_why(exc)}") from None
                pages = np.flatnonzero(have != keys)
                result: np.ndarray = (gpa + pages * PAGE_SIZE).astype("<u8")
                return result
        raise StreamError(f"VERIFY_KEYS of {keys.size} pages at {gpa:#x} lies in no one slot")

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
