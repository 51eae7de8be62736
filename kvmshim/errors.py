"""The one error root of kvmshim.

    KvmShimError
     ├── KvmError          a kernel-contract failure; carries the errno KVM would return
     ├── BitmapError       a dirty bitmap of the wrong length, or with bits past the last page
     └── NotSupportedError something this backend cannot model (storage keys on real KVM)

KvmError's text always ends in the errno name, e.g.
``slot 3 of vm 'a': dirty logging is not enabled (ENOENT)``, so that a person reading a QMP
error can look the case up in the KVM API documentation.
"""

from __future__ import annotations

import errno as _errno


class KvmShimError(Exception):
    """Root of every error raised by kvmshim."""


class KvmError(KvmShimError):
    """A call that KVM would fail with ``-errno``; ``slot`` names the memslot it concerns."""

    def __init__(self, err: int, reason: str, slot: int | None = None) -> None:
        self.errno = err
        self.reason = reason
        self.slot = slot
        super().__init__(self.describe())

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, f"errno {self.errno}")

    def describe(self, vm: str | None = None) -> str:
        """``slot 3 of vm 'a': <reason> (ENOENT)``; the vm part only when given."""
        where = ""
        if self.slot is not None:
            as_id, slot_id = self.slot >> 16, self.slot & 0xFFFF
            where = f"slot {slot_id}" + (f" (address space {as_id})" if as_id else "")
        if vm is not None:
            where = f"{where} of vm '{vm}'" if where else f"vm '{vm}'"
        prefix = f"{where}: " if where else ""
        return f"{prefix}{self.reason} ({self.errno_name})"

    @classmethod
    def from_oserror(cls, exc: OSError, reason: str, slot: int | None = None) -> KvmError:
        """Wrap a failed ioctl, keeping the kernel's errno."""
        return cls(exc.errno or _errno.EIO, reason, slot)


class BitmapError(KvmShimError, ValueError):
    """A bitmap that does not fit the memslot it is meant for."""


class NotSupportedError(KvmShimError):
    """The operation exists, but not on this backend; the text names the one that has it."""
