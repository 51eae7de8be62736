"""What the s390 reference shares across kernel generations, one page at a time.

The oracle of the model: each function does what its kernel namesake does, in plain Python on
plain ints, so it can be checked by reading. The functions that differ between generations live
in :mod:`.linux_3_15` and :mod:`.linux_3_16`, one module per kernel, literal and without
switches; an :class:`Mm` carries its kernel's module as ``pgtable`` and the generic code here
(the fault path of mm/memory.c, the accesses, the harvest loop of kvm-s390.c) calls through it.
The vectorised engine in :mod:`kvmshim.s390.mmu` is tested to produce identical pte, PGSTE and
storage-key arrays and identical harvest results for each generation.

From 4.19 (:mod:`.linux_4_19`) the model also has the gmap's segment table (``Mm.segment``,
one entry per 1 MiB of guest memory): a guest access to a segment it has not linked faults and
links it (mm/fault.c do_exception → __gmap_link), and the harvest walks it by segment. With
``hugepages`` the guest memory is a shared hugetlbfs mapping: no page tables, one host pmd per
segment (``Mm.pmd``) and the dirty state in the gmap entry (_SEGMENT_ENTRY_GMAP_UC). 3.15 and
3.16 have neither list: their harvest walks the host mm, and linking is invisible to it.

What is modelled
  * One host mm with PGSTE page tables (``mm_has_pgste``) that uses storage keys
    (``mm_use_skey``; an assumption for 3.16, where it is set at the guest's first key
    instruction), covering the host pages that back one memslot; ``ptep`` is an index.
  * The guest RAM VMA is a shared, writable file mapping that wants write notification, so its
    ``vm_page_prot`` is PAGE_READ: a read fault maps the page read-only, a write fault maps it
    writable and dirty (mm/memory.c do_read_fault / do_shared_fault / wp_page_reuse).
  * The machine has the store-indication facility, so a DAT exception raised by a store is a
    write fault; ``esop`` selects MACHINE_HAS_ESOP.
  * IPTE is atomic: it sets _PAGE_INVALID in the entry and there is no TLB to purge.

Not modelled: swap and file ptes, THP, CMMA usage states beyond clearing _PGSTE_GPS_ZERO, the
lazy ``s390_enable_skey``, page-table teardown. The harvest loop's inclusive bound needs the
memslot layout, so it is modelled one level up, in the softmmu backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

from kvmshim.s390.bits import (
    _PAGE_CHANGED,
    _PAGE_DIRTY,
    _PAGE_INVALID,
    _PAGE_PRESENT,
    _PAGE_PROTECT,
    _PAGE_READ,
    _PAGE_REFERENCED,
    _PAGE_WRITE,
    _PAGE_YOUNG,
    _SEGMENT_ENTRY_INVALID,
    _SEGMENT_ENTRY_LARGE,
    _SEGMENT_ENTRY_ORIGIN_LARGE,
    _SEGMENT_ENTRY_PROTECT,
    GUEST_RC_SHIFT,
    KEY_ACC_SHIFT,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    PGSTE_ACC_BITS,
    PGSTE_FP_BIT,
    PGSTE_GC_BIT,
    PGSTE_GR_BIT,
    PGSTE_PCL_BIT,
    PTRS_PER_PTE,
)

MAX_FAULT_RETRIES = 4  # every access in the model resolves in one fault; more means a bug


@dataclass
class Mm:
    """The host mm state the primitives act on: ptes, PGSTEs, real storage keys, the gmap.

    ``pgtable`` is the kernel generation's module (:mod:`.linux_3_15`, :mod:`.linux_3_16` or
    :mod:`.linux_4_19`); ``hugepages`` backs the memory with 1 MiB pages (4.19 only).
    """

    npages: int
    pgtable: ModuleType
    esop: bool = True
    frame_base: int = 0  # physical address of the frame backing page 0
    guest_base: int = 0  # guest address of page 0 (the gmap's view, for IPTE notify)
    hugepages: bool = False
    pte: list[int] = field(default_factory=list)
    pgste: list[int] = field(default_factory=list)
    skey: list[int] = field(default_factory=list)  # real storage key per 4 KiB frame
    # Per 1 MiB segment, from 4.19: the host pmd (hugepages; a page table's otherwise), the
    # gmap's segment-table entry, and PG_arch_1 of the huge page (its keys were initialised).
    pmd: list[int] = field(default_factory=list)
    segment: list[int] = field(default_factory=list)
    pg_arch_1: list[bool] = field(default_factory=list)
    notifiers: list[Callable[[int], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.skey:
            return
        n = whole_tables(self.npages)
        if not self.hugepages:
            self.pte, self.pgste = self.pgtable.page_table_alloc_pgste(self.npages)
        self.skey = [0] * n
        # Only 4.19's module models the gmap (3.x harvest the host mm, where linking is moot).
        gmap_create = getattr(self.pgtable, "gmap_create", None)
        if gmap_create is not None:
            self.pmd, self.segment = gmap_create(n // PTRS_PER_PTE, self.hugepages)
            self.pg_arch_1 = [False] * len(self.pmd)

    def frame_index(self, entry: int) -> int:
        return ((entry & PAGE_MASK) - self.frame_base) >> PAGE_SHIFT

    def frame_of(self, ptep: int) -> int:
        return self.frame_base + (ptep << PAGE_SHIFT)


def segment_of(ptep: int) -> int:
    """The 1 MiB segment (page table, gmap segment entry) a page belongs to."""
    return ptep // PTRS_PER_PTE


def whole_tables(npages: int) -> int:
    """Entries in the 256-entry page tables that cover ``npages`` pages."""
    return -(-npages // PTRS_PER_PTE) * PTRS_PER_PTE


# --- pte predicates and modifiers (asm/pgtable.h) --------------------------------------------
def pte_present(pte: int) -> bool:
    return bool(pte & _PAGE_PRESENT)


def pte_none(pte: int) -> bool:
    return pte == _PAGE_INVALID


def pte_write(pte: int) -> bool:
    return bool(pte & _PAGE_WRITE)


def pte_young(pte: int) -> bool:
    return bool(pte & _PAGE_YOUNG)


def pte_mkdirty(pte: int) -> int:
    pte |= _PAGE_DIRTY
    if pte & _PAGE_WRITE:
        pte &= ~_PAGE_PROTECT
    return pte


def pte_mkclean(pte: int) -> int:
    return (pte & ~_PAGE_DIRTY) | _PAGE_PROTECT


def pte_mkwrite(pte: int) -> int:
    pte |= _PAGE_WRITE
    if pte & _PAGE_DIRTY:
        pte &= ~_PAGE_PROTECT
    return pte


def pte_wrprotect(pte: int) -> int:
    return (pte & ~_PAGE_WRITE) | _PAGE_PROTECT


def pte_mkyoung(pte: int) -> int:
    pte |= _PAGE_YOUNG
    if pte & _PAGE_READ:
        pte &= ~_PAGE_INVALID
    return pte


def pte_mkold(pte: int) -> int:
    return (pte & ~_PAGE_YOUNG) | _PAGE_INVALID


def mk_pte_phys(physpage: int, pgprot: int) -> int:
    return pte_mkyoung(physpage + pgprot)


# --- PGSTE lock and storage keys -------------------------------------------------------------
def pgste_get_lock(mm: Mm, ptep: int) -> int:
    """Take the PCL bit; the returned local copy carries it until pgste_set_unlock."""
    assert not mm.pgste[ptep] & PGSTE_PCL_BIT, "PGSTE already locked"
    mm.pgste[ptep] |= PGSTE_PCL_BIT
    return mm.pgste[ptep]


def pgste_set_unlock(mm: Mm, ptep: int, pgste: int) -> None:
    mm.pgste[ptep] = pgste & ~PGSTE_PCL_BIT


def page_get_storage_key(mm: Mm, address: int) -> int:
    return mm.skey[(address - mm.frame_base) >> PAGE_SHIFT]


def page_set_storage_key(mm: Mm, address: int, key: int, mapped: bool) -> None:
    """SSKE (``mapped`` only selects the quiescing form, which the model cannot observe)."""
    mm.skey[(address - mm.frame_base) >> PAGE_SHIFT] = key & 0xFF


def page_reset_referenced(mm: Mm, address: int) -> bool:
    """RRBE: clear the key's R bit, return whether it was set."""
    i = (address - mm.frame_base) >> PAGE_SHIFT
    old = mm.skey[i]
    mm.skey[i] = old & ~_PAGE_REFERENCED
    return bool(old & _PAGE_REFERENCED)


def get_guest_storage_key(mm: Mm, ptep: int) -> int:
    """The guest's view of one page's key, what KVM_S390_GET_SKEYS returns for it, on a 3.15 or
    3.16 state: Linux 4.19's function (arch/s390/mm/pgtable.c; the ioctl came after 3.16) from
    its page-table level on — those models have no host pmd to be absent or huge. 4.19's
    :func:`.linux_4_19_pgtable.get_guest_storage_key` adds those cases and ends here; use
    ``getattr(mm.pgtable, "get_guest_storage_key", this)``. The PGSTE lock is taken and given
    back unchanged: reading a key sets no UC and no R bit.

    Valid pte: the real key of its frame; invalid: ACC/F from the PGSTE; either way the
    PGSTE's GR/GC ORed in as R/C (the kernel: "Reflect guest's logical view, not physical").
    """
    pgste = pgste_get_lock(mm, ptep)
    key = (pgste & (PGSTE_ACC_BITS | PGSTE_FP_BIT)) >> KEY_ACC_SHIFT
    pte = mm.pte[ptep]
    if not pte & _PAGE_INVALID:
        key = page_get_storage_key(mm, pte & PAGE_MASK)
    key |= (pgste & (PGSTE_GR_BIT | PGSTE_GC_BIT)) >> GUEST_RC_SHIFT
    pgste_set_unlock(mm, ptep, pgste)
    return key


# --- IPTE and its notification ----------------------------------------------------------------
def gmap_do_ipte_notify(mm: Mm, ptep: int) -> None:
    gaddr = mm.guest_base + ptep * PAGE_SIZE
    for notifier_call in mm.notifiers:
        notifier_call(gaddr)


def __ptep_ipte(mm: Mm, ptep: int) -> None:
    """IPTE: the hardware sets the invalid bit in the entry (and purges TLBs everywhere)."""
    mm.pte[ptep] |= _PAGE_INVALID


def ptep_flush_direct(mm: Mm, ptep: int) -> None:
    if mm.pte[ptep] & _PAGE_INVALID:
        return
    __ptep_ipte(mm, ptep)


# --- the generic fault path (mm/memory.c) ---------------------------------------------------------
def do_fault(mm: Mm, ptep: int, write: bool) -> None:
    """Fault on a none pte of the shared file mapping: do_read_fault / do_shared_fault.

    ``pte_mkdirty`` and the VMA's ``vm_page_prot`` are the generation's (4.19: soft dirty,
    PAGE_RO with _PAGE_NOEXEC)."""
    entry = mk_pte_phys(mm.frame_of(ptep), mm.pgtable.VM_PAGE_PROT)
    if write:
        entry = pte_mkwrite(mm.pgtable.pte_mkdirty(entry))  # maybe_mkwrite: VM_WRITE
    mm.pgtable.set_pte_at(mm, ptep, entry)


def do_wp_page(mm: Mm, ptep: int, orig_pte: int) -> None:
    """Write to a read-only pte of the shared mapping: wp_page_reuse makes it writable, dirty."""
    entry = pte_mkyoung(orig_pte)
    entry = pte_mkwrite(mm.pgtable.pte_mkdirty(entry))
    mm.pgtable.ptep_set_access_flags(mm, ptep, entry)


def handle_mm_fault(mm: Mm, ptep: int, write: bool) -> None:
    """handle_pte_fault for the cases the model has: none, present read-only, present writable;
    a hugetlb VMA goes to hugetlb_fault (mm/memory.c handle_mm_fault, 4.19 with hugepages)."""
    if mm.hugepages:
        mm.pgtable.hugetlb_fault(mm, segment_of(ptep), write)
        return
    entry = mm.pte[ptep]
    if not pte_present(entry):
        assert pte_none(entry), f"swap/file pte {entry:#x} is not modelled"
        do_fault(mm, ptep, write)
        return
    if write:
        if not pte_write(entry):
            do_wp_page(mm, ptep, entry)
            return
        entry = mm.pgtable.pte_mkdirty(entry)
    entry = pte_mkyoung(entry)
    mm.pgtable.ptep_set_access_flags(mm, ptep, entry)


def fixup_user_fault(mm: Mm, ptep: int, write: bool) -> None:
    handle_mm_fault(mm, ptep, write)


def do_exception(mm: Mm, ptep: int, write: bool) -> None:
    """mm/fault.c do_exception for a fault in SIE: the host fault, then (4.19, where the gmap is
    modelled) __gmap_link of the guest segment; 3.16's __gmap_fault linked first, unobservably."""
    handle_mm_fault(mm, ptep, write)
    if mm.segment:
        mm.pgtable.__gmap_link(mm, segment_of(ptep))


def do_protection_exception(mm: Mm, ptep: int) -> None:
    """Store to a DAT-protected page (TEID says a store): a write fault."""
    do_exception(mm, ptep, write=True)


def do_dat_exception(mm: Mm, ptep: int, store: bool) -> None:
    """Translation exception; the store indication makes it a write fault."""
    do_exception(mm, ptep, write=store)


# --- the accesses: what the CPU and devices do ---------------------------------------------
def guest_translate(mm: Mm, ptep: int) -> tuple[bool, bool, int]:
    """What DAT finds for a guest page: (invalid, protected, frame address).

    Where the gmap is modelled (4.19) its segment entry comes first: invalid when not linked,
    and for a large segment it is the last level (the frame is its origin plus the offset)."""
    if mm.segment:
        ste = mm.segment[segment_of(ptep)]
        if ste & _SEGMENT_ENTRY_INVALID:
            return True, False, 0
        if ste & _SEGMENT_ENTRY_LARGE:
            frame = (ste & _SEGMENT_ENTRY_ORIGIN_LARGE) + (ptep % PTRS_PER_PTE) * PAGE_SIZE
            return False, bool(ste & _SEGMENT_ENTRY_PROTECT), frame
    pte = mm.pte[ptep]
    return bool(pte & _PAGE_INVALID), bool(pte & _PAGE_PROTECT), pte & PAGE_MASK


def guest_store(mm: Mm, ptep: int) -> str | None:
    """A guest store through DAT. Returns the exception it took first (or None)."""
    taken = None
    for _ in range(MAX_FAULT_RETRIES):
        invalid, protected, frame = guest_translate(mm, ptep)
        if invalid:
            taken = taken or "translation"
            do_dat_exception(mm, ptep, store=True)
        elif protected:
            taken = taken or "protection"
            do_protection_exception(mm, ptep)
        else:
            mm.skey[(frame - mm.frame_base) >> PAGE_SHIFT] |= _PAGE_REFERENCED | _PAGE_CHANGED
            return taken
    raise AssertionError("guest_store: fault did not resolve")


def guest_load(mm: Mm, ptep: int) -> str | None:
    """A guest load through DAT: only an invalid entry faults."""
    taken = None
    for _ in range(MAX_FAULT_RETRIES):
        invalid, _protected, frame = guest_translate(mm, ptep)
        if invalid:
            taken = taken or "translation"
            do_dat_exception(mm, ptep, store=False)
        else:
            mm.skey[(frame - mm.frame_base) >> PAGE_SHIFT] |= _PAGE_REFERENCED
            return taken
    raise AssertionError("guest_load: fault did not resolve")


def io_store(mm: Mm, ptep: int) -> None:
    """DMA or a kernel-mapping store: the frame's key gets R and C; the pte and UC do not move."""
    mm.skey[ptep] |= _PAGE_REFERENCED | _PAGE_CHANGED


# --- the harvest loop (arch/s390/kvm/kvm-s390.c) ----------------------------------------------
def kvm_s390_sync_dirty_log(mm: Mm, npages: int) -> list[int]:
    """The pages [0, npages) whose user-dirty state the generation's test-and-clear reports.

    3.16.0's loop, page by page over the host mm; 4.19 walks the gmap one segment at a time
    (:func:`.linux_4_19.kvm_s390_sync_dirty_log`)."""
    if mm.segment:
        result: list[int] = mm.pgtable.kvm_s390_sync_dirty_log(mm, npages)
        return result
    return [p for p in range(npages) if mm.pgtable.ptep_test_and_clear_user_dirty(mm, p)]
