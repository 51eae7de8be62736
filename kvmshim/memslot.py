"""Memslots as KVM_SET_USER_MEMORY_REGION defines them, and the GET/CLEAR_DIRTY_LOG argument rules.

The checks run in the kernel's order (virt/kvm/kvm_main.c: __kvm_set_memory_region,
kvm_get_dirty_log, kvm_clear_dirty_log_protect) so the errno is the one KVM would return when
several things are wrong at once. A change is validated first (:meth:`MemslotTable.prepare`) and
applied only after the backend has done its part (:meth:`MemslotTable.commit`), so a failed call
changes nothing.
"""

from __future__ import annotations

import enum
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, replace
from errno import EEXIST, EINVAL, ENOENT

import numpy as np

from kvmshim.abi import (
    BITS_PER_LONG,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    PAGE_SHIFT,
    PAGE_SIZE,
    make_slot_id,
    split_slot_id,
)
from kvmshim.errors import KvmError

# KVM_MEM_MAX_NR_PAGES on 64-bit hosts: (1UL << 31) - 1 pages per slot.
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
# KVM_USER_MEM_SLOTS of arch/s390/include/asm/kvm_host.h in Linux 3.16.
S390_USER_MEM_SLOTS = 32


class Change(enum.Enum):
    """enum kvm_mr_change, plus NONE for a call that changes nothing."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags-only"
    NONE = "none"


@dataclass(frozen=True)
class Memslot:
    """One memory slot: guest-physical range, flags, and where its RAM lives for the host."""

    as_id: int
    id: int
    guest_phys_addr: int
    memory_size: int
    flags: int
    userspace_addr: int

    @property
    def slot(self) -> int:
        """The encoded ``as_id << 16 | id`` used by the dirty-log ioctls."""
        return make_slot_id(self.as_id, self.id)

    @property
    def npages(self) -> int:
        return self.memory_size >> PAGE_SHIFT

    @property
    def base_gfn(self) -> int:
        return self.guest_phys_addr >> PAGE_SHIFT

    @property
    def log_dirty_pages(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)


@dataclass(frozen=True)
class MemslotChange:
    """A validated, not yet applied KVM_SET_USER_MEMORY_REGION."""

    kind: Change
    old: Memslot | None
    new: Memslot | None


class MemslotTable:
    """The memslots of one VM, with the kernel's validation rules."""

    def __init__(
        self,
        max_slots: int = S390_USER_MEM_SLOTS,
        address_spaces: int = 1,
        valid_flags: int = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY,
    ) -> None:
        self.max_slots = max_slots
        self.address_spaces = address_spaces
        self.valid_flags = valid_flags
        self._slots: dict[int, Memslot] = {}

    def __iter__(self) -> Iterator[Memslot]:
        return iter(sorted(self._slots.values(), key=lambda s: (s.as_id, s.id)))

    def __len__(self) -> int:
        return len(self._slots)

    def get(self, slot: int) -> Memslot | None:
        return self._slots.get(slot)

    # --- KVM_SET_USER_MEMORY_REGION ----------------------------------------------------------
    def prepare(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> MemslotChange:
        """Validate a KVM_SET_USER_MEMORY_REGION and say what it would do; raises KvmError."""
        as_id, slot_id = split_slot_id(slot)
        if flags & ~self.valid_flags:
            raise KvmError(EINVAL, f"unsupported memslot flags {flags:#x}", slot)
        if memory_size % PAGE_SIZE:
            raise KvmError(EINVAL, f"size {memory_size:#x} is not a multiple of 4 KiB", slot)
        if guest_phys_addr % PAGE_SIZE:
            raise KvmError(
                EINVAL, f"guest-phys-addr {guest_phys_addr:#x} is not page aligned", slot
            )
        if userspace_addr % PAGE_SIZE:
            raise KvmError(EINVAL, "userspace address is not page aligned", slot)
        self._check_ids(slot)
        if guest_phys_addr + memory_size >= 1 << 64:
            raise KvmError(EINVAL, "guest-phys-addr + size overflows 64 bits", slot)
        npages = memory_size >> PAGE_SHIFT
        if npages > KVM_MEM_MAX_NR_PAGES:
            raise KvmError(EINVAL, f"{npages} pages exceed KVM_MEM_MAX_NR_PAGES", slot)

        old = self._slots.get(slot)
        if memory_size == 0:
            if old is None:
                raise KvmError(EINVAL, "cannot delete a slot that does not exist", slot)
            return MemslotChange(Change.DELETE, old, None)

        new = Memslot(as_id, slot_id, guest_phys_addr, memory_size, flags, userspace_addr)
        if old is None:
            kind = Change.CREATE
        else:
            if userspace_addr != old.userspace_addr or npages != old.npages:
                raise KvmError(EINVAL, "an existing slot cannot be resized or remapped", slot)
            if (flags ^ old.flags) & KVM_MEM_READONLY:
                raise KvmError(EINVAL, "KVM_MEM_READONLY cannot be toggled", slot)
            if guest_phys_addr != old.guest_phys_addr:
                kind = Change.MOVE
            elif flags != old.flags:
                kind = Change.FLAGS_ONLY
            else:
                return MemslotChange(Change.NONE, old, old)
        if kind in (Change.CREATE, Change.MOVE):
            clash = self._overlapping(new)
            if clash is not None:
                raise KvmError(
                    EEXIST,
                    f"[{guest_phys_addr:#x}, {guest_phys_addr + memory_size:#x}) overlaps "
                    f"slot {clash.id}",
                    slot,
                )
        return MemslotChange(kind, old, new)

    def commit(self, change: MemslotChange) -> None:
        """Apply a change returned by :meth:`prepare` (and carried out by the backend)."""
        if change.kind is Change.DELETE:
            assert change.old is not None
            del self._slots[change.old.slot]
        elif change.new is not None:
            self._slots[change.new.slot] = change.new

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> MemslotChange:
        """Validate and apply in one step (for callers with nothing to do in between)."""
        change = self.prepare(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        self.commit(change)
        return change

    def _overlapping(self, new: Memslot) -> Memslot | None:
        lo, hi = new.base_gfn, new.base_gfn + new.npages
        for other in self._slots.values():
            if other.as_id != new.as_id or other.id == new.id:
                continue
            if other.base_gfn < hi and lo < other.base_gfn + other.npages:
                return other
        return None

    def _check_ids(self, slot: int) -> None:
        as_id, slot_id = split_slot_id(slot)
        if as_id >= self.address_spaces:
            raise KvmError(
                EINVAL, f"address space {as_id} does not exist ({self.address_spaces} here)", slot
            )
        if slot_id >= self.max_slots:
            raise KvmError(EINVAL, f"slot id must be below {self.max_slots}", slot)

    # --- KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG ----------------------------------------------
    def for_dirty_log(self, slot: int) -> Memslot:
        """The slot a GET_DIRTY_LOG addresses: EINVAL for bad ids, ENOENT if absent/not logged."""
        self._check_ids(slot)
        memslot = self._slots.get(slot)
        if memslot is None:
            raise KvmError(ENOENT, "no such memslot", slot)
        if not memslot.log_dirty_pages:
            raise KvmError(ENOENT, "dirty logging is not enabled", slot)
        return memslot

    def for_clear_dirty_log(self, slot: int, first_page: int, num_pages: int) -> Memslot:
        """The slot a CLEAR_DIRTY_LOG addresses, with kvm_clear_dirty_log_protect's range rules."""
        self._check_ids(slot)
        if first_page % BITS_PER_LONG:
            raise KvmError(EINVAL, f"first-page {first_page} is not a multiple of 64", slot)
        memslot = self.for_dirty_log(slot)
        npages = memslot.npages
        if first_page > npages or num_pages > npages - first_page:
            raise KvmError(
                EINVAL,
                f"pages [{first_page}, {first_page + num_pages}) are outside the slot's "
                f"{npages} pages",
                slot,
            )
        if num_pages < npages - first_page and num_pages % BITS_PER_LONG:
            raise KvmError(
                EINVAL,
                f"num-pages {num_pages} is not a multiple of 64 and does not end at the "
                f"slot's end ({npages} pages)",
                slot,
            )
        return memslot

    # --- address translation ------------------------------------------------------------------
    def translate_gfns(self, gfns: np.ndarray, as_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Map guest frame numbers to (slot index into :meth:`sorted_slots`, page in slot).

        Frames outside every slot get slot index -1. Vectorised: one searchsorted for the batch.
        """
        slots = self.sorted_slots(as_id)
        gfns = np.asarray(gfns, dtype=np.int64)
        if not slots:
            return np.full(gfns.shape, -1, dtype=np.int64), np.zeros(gfns.shape, dtype=np.int64)
        bases = np.array([s.base_gfn for s in slots], dtype=np.int64)
        ends = np.array([s.base_gfn + s.npages for s in slots], dtype=np.int64)
        which = np.searchsorted(bases, gfns, side="right") - 1
        clipped = np.clip(which, 0, None)
        inside = (which >= 0) & (gfns < ends[clipped])
        which = np.where(inside, which, -1)
        return which, gfns - bases[clipped]

    def sorted_slots(self, as_id: int = 0) -> list[Memslot]:
        """Slots of one address space ordered by guest address."""
        return sorted(
            (s for s in self._slots.values() if s.as_id == as_id), key=lambda s: s.base_gfn
        )

    def slot_for_gpa(self, gpa: int, as_id: int = 0) -> Memslot | None:
        slots = self.sorted_slots(as_id)
        bases = [s.guest_phys_addr for s in slots]
        i = bisect_right(bases, gpa) - 1
        if i >= 0 and gpa < slots[i].guest_phys_addr + slots[i].memory_size:
            return slots[i]
        return None

    def with_flags(self, slot: int, flags: int) -> Memslot:
        """A copy of an existing slot with other flags (for building a FLAGS_ONLY call)."""
        return replace(self._slots[slot], flags=flags)
