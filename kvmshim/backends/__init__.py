"""Backends: where a VM's dirty bits come from (the s390 software MMU, or real KVM)."""

from kvmshim.backends.base import (
    Backend,
    Harvest,
    Pattern,
    RamRegion,
    ReadPath,
    WorkloadSpec,
    WritePath,
)

__all__ = [
    "Backend",
    "Harvest",
    "Pattern",
    "RamRegion",
    "ReadPath",
    "WorkloadSpec",
    "WritePath",
]
