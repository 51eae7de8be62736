"""The per-page oracle of the s390 model: generic code in :mod:`.common`, one literal module of
pgtable primitives per kernel generation (:mod:`.linux_3_15`, :mod:`.linux_3_16`)."""

from __future__ import annotations

from types import ModuleType

from kvmshim.s390.generations import DEFAULT_KERNEL, kernel_generation
from kvmshim.s390.reference import common, linux_3_15, linux_3_16
from kvmshim.s390.reference.common import Mm

PGTABLE: dict[str, ModuleType] = {"3.15": linux_3_15, "3.16": linux_3_16}


def new_mm(
    npages: int,
    kernel: str = DEFAULT_KERNEL,
    esop: bool = True,
    frame_base: int = 0,
    guest_base: int = 0,
) -> Mm:
    """A fresh mm whose page tables follow ``kernel``'s primitives."""
    return Mm(npages, PGTABLE[kernel_generation(kernel).name], esop, frame_base, guest_base)


__all__ = ["PGTABLE", "Mm", "common", "linux_3_15", "linux_3_16", "new_mm"]
