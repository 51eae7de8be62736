"""Backends: where a VM's dirty bits come from (the s390 software MMU, or real KVM)."""

from __future__ import annotations

import os
import platform

from kvmshim.backends.base import (
    Backend,
    Harvest,
    Pattern,
    RamRegion,
    ReadPath,
    WorkloadSpec,
    WritePath,
)
from kvmshim.errors import KvmShimError

KINDS = ("auto", "softmmu", "kvm")


def resolve_kind(kind: str) -> str:
    """'auto' means the real kernel where the seed's semantics are the kernel's: s390x hosts."""
    if kind not in KINDS:
        raise KvmShimError(f"unknown backend '{kind}' (choose from {', '.join(KINDS)})")
    if kind == "auto":
        return "kvm" if platform.machine() == "s390x" and os.path.exists("/dev/kvm") else "softmmu"
    return kind


def create_backend(
    kind: str, name: str, runtime_dir: str, esop: bool = True, adopt: bool = False
) -> Backend:
    """A new VM of the given kind, its RAM file under ``runtime_dir`` (or, with ``adopt``, the
    RAM file a previous daemon left there)."""
    kind = resolve_kind(kind)
    if kind == "softmmu":
        from kvmshim.backends.softmmu import SoftMmuBackend

        return SoftMmuBackend(name, runtime_dir, esop=esop, adopt=adopt)
    from kvmshim.backends.kvm import KvmBackend

    return KvmBackend(name, runtime_dir, adopt=adopt)


__all__ = [
    "KINDS",
    "Backend",
    "Harvest",
    "Pattern",
    "RamRegion",
    "ReadPath",
    "WorkloadSpec",
    "WritePath",
    "create_backend",
    "resolve_kind",
]
