"""Backends: where a VM's dirty bits come from (the s390 software MMU, or real KVM).

:data:`BACKENDS` is the one registry: the daemon's schema, the factory below and dirtylogctl's
``--backend`` choices all read it.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from kvmshim.backends.base import (
    Backend,
    Harvest,
    Pattern,
    RamRegion,
    ReadPath,
    WorkloadSpec,
    WorkloadStatus,
    WritePath,
)
from kvmshim.errors import KvmShimError


@dataclass(frozen=True)
class BackendInfo:
    """One backend kind, as users choose it."""

    name: str
    summary: str


BACKENDS: dict[str, BackendInfo] = {
    info.name: info
    for info in (
        BackendInfo("auto", "kvm on s390x hosts with /dev/kvm, softmmu elsewhere"),
        BackendInfo(
            "softmmu",
            "the simulated s390 VM, by kernel generation: PGSTE_UC harvesting (Linux 3.16, "
            "the default), the storage key's change bit (3.15, before the seed), or 4.19 "
            "with optional 1 MiB pages tracked per segment",
        ),
        BackendInfo("kvm", "a real KVM VM owned by the daemon, harvested with the real ioctls"),
    )
}
KINDS: tuple[str, ...] = tuple(BACKENDS)


def resolve_kind(kind: str) -> str:
    """'auto' means the real kernel where the seed's semantics are the kernel's: s390x hosts."""
    if kind not in BACKENDS:
        raise KvmShimError(f"unknown backend '{kind}' (choose from {', '.join(KINDS)})")
    if kind == "auto":
        return "kvm" if platform.machine() == "s390x" and os.path.exists("/dev/kvm") else "softmmu"
    return kind


def create_backend(
    kind: str,
    name: str,
    runtime_dir: str,
    esop: bool = True,
    adopt: bool = False,
    kernel: str | None = None,
    hugepages: bool = False,
) -> Backend:
    """A new VM of the given kind, its RAM file under ``runtime_dir`` (or, with ``adopt``, the
    RAM file a previous daemon left there).

    ``kernel`` picks the s390 model's generation (:data:`kvmshim.s390.generations.KERNELS`;
    None: the default, "3.16") and applies to softmmu only; KvmShimError for an unknown one,
    or for any with the kvm backend, which runs the host's own kernel. ``hugepages`` backs the
    guest with 1 MiB pages: a generation that has KVM_CAP_S390_HPAGE_1M (4.19) only.
    """
    kind = resolve_kind(kind)
    if kind == "softmmu":
        from kvmshim.backends.softmmu import SoftMmuBackend

        return SoftMmuBackend(
            name, runtime_dir, esop=esop, adopt=adopt, kernel=kernel, hugepages=hugepages
        )
    if hugepages:
        raise KvmShimError(
            "hugepages selects 1 MiB pages in the s390 model (kernel 4.19) and applies to the "
            "softmmu backend only"
        )
    if kernel is not None:
        raise KvmShimError(
            f"kernel {kernel!r} selects a generation of the s390 model and applies to the "
            "softmmu backend only; the kvm backend runs the host's own kernel"
        )
    from kvmshim.backends.kvm import KvmBackend

    return KvmBackend(name, runtime_dir, adopt=adopt)


__all__ = [
    "BACKENDS",
    "KINDS",
    "Backend",
    "BackendInfo",
    "Harvest",
    "Pattern",
    "RamRegion",
    "ReadPath",
    "WorkloadSpec",
    "WorkloadStatus",
    "WritePath",
    "create_backend",
    "resolve_kind",
]
