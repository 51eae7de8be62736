"""The s390 dirty-tracking primitives of Linux 3.16, one page at a time, named as in the kernel.

This is the oracle: each function does what its kernel namesake does (kernel-semantics §2, §4;
the seed commit), in plain Python on plain ints, so it can be checked by reading. The
vectorised engine in :mod:`kvmshim.s390.mmu` is tested to produce identical pte, PGSTE and
storage-key arrays and identical harvest results.

What is modelled
  * One host mm with PGSTE page tables (``mm_has_pgste``) that uses storage keys
    (``mm_use_skey``), covering the host pages that back one memslot; ``ptep`` is an index.
  * The guest RAM VMA is a shared, writable file mapping that wants write notification, so its
    ``vm_page_prot`` is PAGE_READ: a read fault maps the page read-only, a write fault maps it
    writable and dirty (mm/memory.c do_read_fault / do_shared_fault / wp_page_reuse).
  * The machine has the store-indication facility, so a DAT exception raised by a store is a
    write fault; ``esop`` selects MACHINE_HAS_ESOP.
  * IPTE is atomic: it sets _PAGE_INVALID in the entry and there is no TLB to purge.

Not modelled: swap and file ptes, THP, CMMA usage states beyond clearing _PGSTE_GPS_ZERO, the
lazy ``s390_enable_skey``, and the harvest loop's inclusive bound (kernel-semantics §3.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvmshim.s390.bits import (
    _PAGE_ACC_BITS,
    _PAGE_CHANGED,
    _PAGE_DIRTY,
    _PAGE_FP_BIT,
    _PAGE_INVALID,
    _PAGE_PRESENT,
    _PAGE_PROTECT,
    _PAGE_READ,
    _PAGE_REFERENCED,
    _PAGE_UNUSED,
    _PAGE_WRITE,
    _PAGE_YOUNG,
    _PGSTE_GPS_ZERO,
    GUEST_RC_SHIFT,
    HOST_RC_SHIFT,
    KEY_ACC_SHIFT,
    PAGE_MASK,
    PAGE_READ,
    PAGE_SHIFT,
    PAGE_SIZE,
    PGSTE_ACC_BITS,
    PGSTE_FP_BIT,
    PGSTE_GC_BIT,
    PGSTE_GR_BIT,
    PGSTE_IN_BIT,
    PGSTE_PCL_BIT,
    PGSTE_UC_BIT,
    PTRS_PER_PTE,
)

MAX_FAULT_RETRIES = 4  # every access in the model resolves in one fault; more means a bug


@dataclass
class Mm:
    """The host mm state the primitives act on: ptes, PGSTEs, real storage keys, the gmap."""

    npages: int
    esop: bool = True
    frame_base: int = 0  # physical address of the frame backing page 0
    guest_base: int = 0  # guest address of page 0 (the gmap's view, for IPTE notify)
    pte: list[int] = field(default_factory=list)
    pgste: list[int] = field(default_factory=list)
    skey: list[int] = field(default_factory=list)  # real storage key per frame
    notifiers: list[Callable[[int], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pte:
            self.pte, self.pgste = page_table_alloc_pgste(self.npages)
            self.skey = [0] * len(self.pte)

    def frame_index(self, entry: int) -> int:
        return ((entry & PAGE_MASK) - self.frame_base) >> PAGE_SHIFT

    def frame_of(self, ptep: int) -> int:
        return self.frame_base + (ptep << PAGE_SHIFT)


# --- page tables -----------------------------------------------------------------------------
def page_table_alloc_pgste(npages: int) -> tuple[list[int], list[int]]:
    """Whole 256-entry tables: ptes _PAGE_INVALID, PGSTEs 0 (HR|HC before the seed commit)."""
    ntables = -(-npages // PTRS_PER_PTE)
    n = ntables * PTRS_PER_PTE
    return [_PAGE_INVALID] * n, [0] * n


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


def pgste_update_all(mm: Mm, pte: int, pgste: int) -> int:
    """Fold the real key's R/C into GR/GC and copy its ACC/F; nothing for an invalid pte."""
    if pte & _PAGE_INVALID:
        return pgste
    skey = page_get_storage_key(mm, pte & PAGE_MASK)
    bits = skey & (_PAGE_CHANGED | _PAGE_REFERENCED)
    pgste |= bits << GUEST_RC_SHIFT
    pgste &= ~(PGSTE_ACC_BITS | PGSTE_FP_BIT)
    pgste |= (skey & (_PAGE_ACC_BITS | _PAGE_FP_BIT)) << KEY_ACC_SHIFT
    return pgste


def pgste_set_key(mm: Mm, ptep: int, pgste: int, entry: int) -> None:
    """When a mapping is established, the real key gets the guest's ACC/F and (seed) R/C."""
    if entry & _PAGE_INVALID:
        return
    assert mm.pte[ptep] & _PAGE_INVALID, "pgste_set_key on a valid pte (VM_BUG_ON)"
    nkey = (pgste & (PGSTE_ACC_BITS | PGSTE_FP_BIT)) >> KEY_ACC_SHIFT
    nkey |= (pgste & (PGSTE_GR_BIT | PGSTE_GC_BIT)) >> GUEST_RC_SHIFT
    page_set_storage_key(mm, entry & PAGE_MASK, nkey, False)


def pgste_set_pte(mm: Mm, ptep: int, pgste: int, entry: int, esop: bool) -> int:
    """Store a pte; a hardware-writable, valid one sets PGSTE_UC_BIT (the seed's core rule)."""
    if entry & _PAGE_PRESENT and entry & _PAGE_WRITE and not entry & _PAGE_INVALID:
        if not esop:
            # Without ESOP every writable pte is forced dirty, i.e. hardware writable.
            entry |= _PAGE_DIRTY
            entry &= ~_PAGE_PROTECT
        if not entry & _PAGE_PROTECT:
            pgste |= PGSTE_UC_BIT
    mm.pte[ptep] = entry
    return pgste


# --- IPTE and its notification ----------------------------------------------------------------
def gmap_do_ipte_notify(mm: Mm, ptep: int) -> None:
    gaddr = mm.guest_base + ptep * PAGE_SIZE
    for notifier_call in mm.notifiers:
        notifier_call(gaddr)


def pgste_ipte_notify(mm: Mm, ptep: int, pgste: int) -> int:
    if pgste & PGSTE_IN_BIT:
        pgste &= ~PGSTE_IN_BIT
        gmap_do_ipte_notify(mm, ptep)
    return pgste


def __ptep_ipte(mm: Mm, ptep: int) -> None:
    """IPTE: the hardware sets the invalid bit in the entry (and purges TLBs everywhere)."""
    mm.pte[ptep] |= _PAGE_INVALID


def ptep_flush_direct(mm: Mm, ptep: int) -> None:
    if mm.pte[ptep] & _PAGE_INVALID:
        return
    __ptep_ipte(mm, ptep)


# --- pte updates ------------------------------------------------------------------------------
def set_pte_at(mm: Mm, ptep: int, entry: int) -> None:
    if pte_present(entry):
        entry &= ~_PAGE_UNUSED
    pgste = pgste_get_lock(mm, ptep)
    pgste &= ~_PGSTE_GPS_ZERO
    pgste_set_key(mm, ptep, pgste, entry)
    pgste = pgste_set_pte(mm, ptep, pgste, entry, mm.esop)
    pgste_set_unlock(mm, ptep, pgste)


def ptep_set_access_flags(mm: Mm, ptep: int, entry: int) -> bool:
    if mm.pte[ptep] == entry:
        return False
    pgste = pgste_get_lock(mm, ptep)
    pgste = pgste_ipte_notify(mm, ptep, pgste)
    ptep_flush_direct(mm, ptep)
    pgste_set_key(mm, ptep, pgste, entry)
    pgste = pgste_set_pte(mm, ptep, pgste, entry, mm.esop)
    pgste_set_unlock(mm, ptep, pgste)
    return True


def ptep_test_and_clear_young(mm: Mm, ptep: int) -> bool:
    """Page aging (reclaim's referenced scan): make the pte old, fold the key into the PGSTE."""
    pgste = pgste_get_lock(mm, ptep)
    pgste = pgste_ipte_notify(mm, ptep, pgste)
    oldpte = pte = mm.pte[ptep]
    ptep_flush_direct(mm, ptep)
    young = pte_young(pte)
    pte = pte_mkold(pte)
    pgste = pgste_update_all(mm, oldpte, pgste)
    pgste = pgste_set_pte(mm, ptep, pgste, pte, mm.esop)
    pgste_set_unlock(mm, ptep, pgste)
    return young


def ptep_test_and_clear_user_dirty(mm: Mm, ptep: int) -> bool:
    """The harvest of one page: test-and-clear UC; protect (ESOP) or invalidate the pte."""
    pgste = pgste_get_lock(mm, ptep)
    dirty = bool(pgste & PGSTE_UC_BIT)
    pgste &= ~PGSTE_UC_BIT
    pte = mm.pte[ptep]
    if dirty and pte & _PAGE_PRESENT:
        pgste = pgste_ipte_notify(mm, ptep, pgste)
        __ptep_ipte(mm, ptep)
        if mm.esop or not pte & _PAGE_WRITE:
            pte |= _PAGE_PROTECT
        else:
            pte |= _PAGE_INVALID
        mm.pte[ptep] = pte
    pgste_set_unlock(mm, ptep, pgste)
    return dirty


def set_guest_storage_key(mm: Mm, ptep: int, key: int, nq: bool = False) -> None:
    """SSKE by the guest: keys live in the PGSTE; a changed key counts as a change of the page."""
    for _ in range(MAX_FAULT_RETRIES):
        pte = mm.pte[ptep]
        if pte & _PAGE_INVALID or not pte & _PAGE_PROTECT:
            break
        fixup_user_fault(mm, ptep, write=True)
    else:
        raise AssertionError("set_guest_storage_key: fault did not resolve")
    new = old = pgste_get_lock(mm, ptep)
    new &= ~(PGSTE_GR_BIT | PGSTE_GC_BIT | PGSTE_ACC_BITS | PGSTE_FP_BIT)
    new |= (key & (_PAGE_CHANGED | _PAGE_REFERENCED)) << GUEST_RC_SHIFT
    new |= (key & (_PAGE_ACC_BITS | _PAGE_FP_BIT)) << KEY_ACC_SHIFT
    pte = mm.pte[ptep]
    if not pte & _PAGE_INVALID:
        address = pte & PAGE_MASK
        skey = page_get_storage_key(mm, address)
        bits = skey & (_PAGE_CHANGED | _PAGE_REFERENCED)
        page_set_storage_key(mm, address, key & (_PAGE_ACC_BITS | _PAGE_FP_BIT), not nq)
        new |= bits << HOST_RC_SHIFT
    if (new ^ old) & (PGSTE_ACC_BITS | PGSTE_FP_BIT | PGSTE_GR_BIT | PGSTE_GC_BIT):
        new |= PGSTE_UC_BIT
    pgste_set_unlock(mm, ptep, new)


def gmap_ipte_notify(mm: Mm, ptep: int) -> None:
    """Arm IPTE notification for one page: fault it in writable, then set PGSTE_IN_BIT."""
    for _ in range(MAX_FAULT_RETRIES):
        fixup_user_fault(mm, ptep, write=True)
        pte = mm.pte[ptep]
        if not pte & (_PAGE_INVALID | _PAGE_PROTECT):
            pgste = pgste_get_lock(mm, ptep)
            pgste_set_unlock(mm, ptep, pgste | PGSTE_IN_BIT)
            return
    raise AssertionError("gmap_ipte_notify: fault did not resolve")


# --- the generic fault path (mm/memory.c) ---------------------------------------------------------
def do_fault(mm: Mm, ptep: int, write: bool) -> None:
    """Fault on a none pte of the shared file mapping: do_read_fault / do_shared_fault."""
    entry = mk_pte_phys(mm.frame_of(ptep), PAGE_READ)
    if write:
        entry = pte_mkwrite(pte_mkdirty(entry))  # maybe_mkwrite: the VMA is VM_WRITE
    set_pte_at(mm, ptep, entry)


def do_wp_page(mm: Mm, ptep: int, orig_pte: int) -> None:
    """Write to a read-only pte of the shared mapping: wp_page_reuse makes it writable, dirty."""
    entry = pte_mkyoung(orig_pte)
    entry = pte_mkwrite(pte_mkdirty(entry))
    ptep_set_access_flags(mm, ptep, entry)


def handle_mm_fault(mm: Mm, ptep: int, write: bool) -> None:
    """handle_pte_fault for the cases the model has: none, present read-only, present writable."""
    entry = mm.pte[ptep]
    if not pte_present(entry):
        assert pte_none(entry), f"swap/file pte {entry:#x} is not modelled"
        do_fault(mm, ptep, write)
        return
    if write:
        if not pte_write(entry):
            do_wp_page(mm, ptep, entry)
            return
        entry = pte_mkdirty(entry)
    entry = pte_mkyoung(entry)
    ptep_set_access_flags(mm, ptep, entry)


def fixup_user_fault(mm: Mm, ptep: int, write: bool) -> None:
    handle_mm_fault(mm, ptep, write)


def do_protection_exception(mm: Mm, ptep: int) -> None:
    """Store to a DAT-protected page (TEID says a store): a write fault."""
    handle_mm_fault(mm, ptep, write=True)


def do_dat_exception(mm: Mm, ptep: int, store: bool) -> None:
    """Translation exception; the store indication makes it a write fault."""
    handle_mm_fault(mm, ptep, write=store)


# --- the accesses: what the CPU and devices do ---------------------------------------------
def guest_store(mm: Mm, ptep: int) -> str | None:
    """A guest store through DAT. Returns the exception it took first (or None)."""
    taken = None
    for _ in range(MAX_FAULT_RETRIES):
        pte = mm.pte[ptep]
        if pte & _PAGE_INVALID:
            taken = taken or "translation"
            do_dat_exception(mm, ptep, store=True)
        elif pte & _PAGE_PROTECT:
            taken = taken or "protection"
            do_protection_exception(mm, ptep)
        else:
            mm.skey[mm.frame_index(pte)] |= _PAGE_REFERENCED | _PAGE_CHANGED
            return taken
    raise AssertionError("guest_store: fault did not resolve")


def guest_load(mm: Mm, ptep: int) -> str | None:
    """A guest load through DAT: only an invalid pte faults."""
    taken = None
    for _ in range(MAX_FAULT_RETRIES):
        pte = mm.pte[ptep]
        if pte & _PAGE_INVALID:
            taken = taken or "translation"
            do_dat_exception(mm, ptep, store=False)
        else:
            mm.skey[mm.frame_index(pte)] |= _PAGE_REFERENCED
            return taken
    raise AssertionError("guest_load: fault did not resolve")


def io_store(mm: Mm, ptep: int) -> None:
    """DMA or a kernel-mapping store: the frame's key gets R and C; the pte and UC do not move."""
    mm.skey[ptep] |= _PAGE_REFERENCED | _PAGE_CHANGED
