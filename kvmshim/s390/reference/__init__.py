"""The per-page oracle of the s390 model: generic code in :mod:`.common`, one literal module of
pgtable primitives per kernel generation (:mod:`.linux_3_15`, :mod:`.linux_3_16`,
:mod:`.linux_4_19`)."""

from __future__ import annotations

from types import ModuleType

from kvmshim.errors import KvmShimError
from kvmshim.s390.bits import HPAGE_SIZE
from kvmshim.s390.generations import DEFAULT_KERNEL, kernel_generation
from kvmshim.s390.reference import common, linux_3_15, linux_3_16, linux_4_19
from kvmshim.s390.reference.common import Mm

PGTABLE: dict[str, ModuleType] = {"3.15": linux_3_15, "3.16": linux_3_16, "4.19": linux_4_19}
# Where the guest memory can be 1 MiB pages: KVM_CAP_S390_HPAGE_1M is new in 4.19.
HUGEPAGES: frozenset[str] = frozenset({"4.19"})


def new_mm(
    npages: int,
    kernel: str = DEFAULT_KERNEL,
    esop: bool = True,
    frame_base: int = 0,
    guest_base: int = 0,
    hugepages: bool = False,
) -> Mm:
    """A fresh mm whose page tables follow ``kernel``'s primitives.

    ``hugepages`` backs the memory with 1 MiB hugetlbfs pages (4.19 only); each huge page and
    each guest segment is 1 MiB aligned, so ``frame_base`` and ``guest_base`` must be too.
    """
    name = kernel_generation(kernel).name
    if hugepages:
        if name not in HUGEPAGES:
            raise KvmShimError(
                f"kernel {name} cannot back guest memory with 1 MiB pages "
                f"(KVM_CAP_S390_HPAGE_1M is new in 4.19; choose {', '.join(sorted(HUGEPAGES))})"
            )
        if frame_base % HPAGE_SIZE or guest_base % HPAGE_SIZE:
            raise KvmShimError(
                f"1 MiB pages need 1 MiB aligned frame and guest addresses "
                f"(frame {frame_base:#x}, guest {guest_base:#x})"
            )
    return Mm(npages, PGTABLE[name], esop, frame_base, guest_base, hugepages)


__all__ = [
    "HUGEPAGES",
    "PGTABLE",
    "Mm",
    "common",
    "linux_3_15",
    "linux_3_16",
    "linux_4_19",
    "new_mm",
]
