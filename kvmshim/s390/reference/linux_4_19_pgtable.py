"""Linux 4.19's s390 pte and PGSTE primitives and storage-key functions, one page at a time.

arch/s390/mm/pgtable.c and arch/s390/include/asm/pgtable.h as read in the 4.19.1 tree (identical
for these functions in 4.19.0-rc3 and 4.19.95; research kernel-419 §2). The PGSTE rules are the
seed's (3.16); what changed is around them: every pte exchange goes through
``ptep_xchg_commit``, which writes the storage key when a valid pte replaces an invalid one and
folds it into the PGSTE the other way round, and ``ptep_force_prot`` (arming the notifier)
stores the pte again, so a writable one becomes user-dirty. The gmap, hugetlbfs and KVM side
is :mod:`.linux_4_19`, which re-exports what the generic code calls from here.

Machine and configuration assumed: no NX (z13 or older: set_pte_at strips _PAGE_NOEXEC),
CONFIG_MEM_SOFT_DIRTY=y as in the s390 defconfigs (pte_mkdirty sets _PAGE_SOFT_DIRTY), the mm
uses storage keys, no vSIE shadows (PGSTE_VSIE_BIT is never set).
"""

from __future__ import annotations

import errno
from mmap import PROT_READ, PROT_WRITE

from kvmshim.s390.bits import (
    _PAGE_ACC_BITS,
    _PAGE_CHANGED,
    _PAGE_DIRTY,
    _PAGE_FP_BIT,
    _PAGE_INVALID,
    _PAGE_NOEXEC,
    _PAGE_PRESENT,
    _PAGE_PROTECT,
    _PAGE_REFERENCED,
    _PAGE_SOFT_DIRTY,
    _PAGE_UNUSED,
    _PAGE_WRITE,
    _PGSTE_GPS_USAGE_MASK,
    _PGSTE_GPS_USAGE_UNUSED,
    _PGSTE_GPS_ZERO,
    _SEGMENT_ENTRY_EMPTY,
    _SEGMENT_ENTRY_LARGE,
    GUEST_RC_SHIFT,
    HOST_RC_SHIFT,
    HPAGE_MASK,
    KEY_ACC_SHIFT,
    PAGE_MASK,
    PAGE_RO,
    PAGE_SIZE,
    PGSTE_ACC_BITS,
    PGSTE_FP_BIT,
    PGSTE_GC_BIT,
    PGSTE_GR_BIT,
    PGSTE_IN_BIT,
    PGSTE_UC_BIT,
    PGSTE_VSIE_BIT,
    PTRS_PER_PTE,
)
from kvmshim.s390.reference import common
from kvmshim.s390.reference.common import (
    Mm,
    __ptep_ipte,
    page_get_storage_key,
    page_set_storage_key,
    pgste_get_lock,
    pgste_set_unlock,
    pte_mkold,
    pte_present,
    pte_young,
    segment_of,
    whole_tables,
)

MACHINE_HAS_NX = False  # see the module docstring
PROT_NONE = 0  # linux/mman.h (Python's mmap has no name for it)
# The guest RAM VMA on 4 KiB pages: a shared file mapping with write notification, PROT_READ |
# PROT_WRITE, so __P011.
VM_PAGE_PROT = PAGE_RO


# --- pte modifiers that changed (4.19.1 asm/pgtable.h) --------------------------------------------
def pte_mkdirty(pte: int) -> int:
    """4.19: also the soft-dirty bit (0x002, 3.16's _PAGE_TYPE)."""
    pte |= _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    if pte & _PAGE_WRITE:
        pte &= ~_PAGE_PROTECT
    return pte


# --- page tables (4.19.1 mm/pgalloc.c page_table_alloc, mm_alloc_pgste branch) --------------------
def page_table_alloc_pgste(npages: int) -> tuple[list[int], list[int]]:
    """Whole 256-entry tables: ptes _PAGE_INVALID, PGSTEs 0 (as 3.16)."""
    n = whole_tables(npages)
    return [_PAGE_INVALID] * n, [0] * n


# --- PGSTE helpers (4.19.1 mm/pgtable.c) ----------------------------------------------------------
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
    """A valid pte replaces an invalid one: the real key gets the guest's ACC/F and R/C."""
    if entry & _PAGE_INVALID:
        return
    assert mm.pte[ptep] & _PAGE_INVALID, "pgste_set_key on a valid pte (VM_BUG_ON)"
    nkey = (pgste & (PGSTE_ACC_BITS | PGSTE_FP_BIT)) >> KEY_ACC_SHIFT
    nkey |= (pgste & (PGSTE_GR_BIT | PGSTE_GC_BIT)) >> GUEST_RC_SHIFT
    page_set_storage_key(mm, entry & PAGE_MASK, nkey, False)


def pgste_set_pte(mm: Mm, ptep: int, pgste: int, entry: int, esop: bool) -> int:
    """Store a pte; a hardware-writable, valid one sets PGSTE_UC_BIT (the seed's rule)."""
    if entry & _PAGE_PRESENT and entry & _PAGE_WRITE and not entry & _PAGE_INVALID:
        if not esop:
            entry |= _PAGE_DIRTY
            entry &= ~_PAGE_PROTECT
        if not entry & _PAGE_PROTECT:
            pgste |= PGSTE_UC_BIT
    mm.pte[ptep] = entry
    return pgste


def pgste_pte_notify(mm: Mm, ptep: int, pgste: int) -> int:
    """3.16's pgste_ipte_notify: IN (and VSIE) are cleared and reported."""
    bits = pgste & (PGSTE_IN_BIT | PGSTE_VSIE_BIT)
    if bits:
        pgste ^= bits
        ptep_notify(mm, ptep, bits)
    return pgste


def gmap_call_notifier(mm: Mm, start: int, end: int) -> None:
    """mm/gmap.c, used by both sides: the range [start, end]. The model's notifiers take page
    addresses, so a range is delivered page by page (256 for a segment)."""
    for gaddr in range(start, end + 1, PAGE_SIZE):
        for notifier_call in mm.notifiers:
            notifier_call(gaddr)


def ptep_notify(mm: Mm, ptep: int, bits: int) -> None:
    """mm/gmap.c: only a gmap that has the segment linked (host_to_guest) is told."""
    if mm.segment[segment_of(ptep)] != _SEGMENT_ENTRY_EMPTY and bits & PGSTE_IN_BIT:
        gaddr = mm.guest_base + ptep * PAGE_SIZE
        gmap_call_notifier(mm, gaddr, gaddr + PAGE_SIZE - 1)


# --- pte exchange (4.19.1 mm/pgtable.c) -----------------------------------------------------------
def ptep_flush_direct(mm: Mm, ptep: int) -> int:
    """IPTE unless already invalid; returns the pte from before the flush."""
    old = mm.pte[ptep]
    if old & _PAGE_INVALID:
        return old
    __ptep_ipte(mm, ptep)
    return old


def ptep_xchg_start(mm: Mm, ptep: int) -> int:
    pgste = pgste_get_lock(mm, ptep)
    return pgste_pte_notify(mm, ptep, pgste)


def ptep_xchg_commit(mm: Mm, ptep: int, pgste: int, old: int, new: int) -> int:
    """Since 3.16 the key follows every exchange: set from the PGSTE when a valid pte replaces
    an invalid one, folded into it when an invalid one replaces a valid one."""
    if old & _PAGE_INVALID:
        pgste_set_key(mm, ptep, pgste, new)
    if new & _PAGE_INVALID:
        pgste = pgste_update_all(mm, old, pgste)
        if (pgste & _PGSTE_GPS_USAGE_MASK) == _PGSTE_GPS_USAGE_UNUSED:
            old |= _PAGE_UNUSED
    pgste = pgste_set_pte(mm, ptep, pgste, new, mm.esop)
    pgste_set_unlock(mm, ptep, pgste)
    return old


def ptep_xchg_direct(mm: Mm, ptep: int, new: int) -> int:
    pgste = ptep_xchg_start(mm, ptep)
    old = ptep_flush_direct(mm, ptep)
    return ptep_xchg_commit(mm, ptep, pgste, old, new)


# --- pte updates (4.19.1 asm/pgtable.h, mm/pgtable.c) ---------------------------------------------
def set_pte_at(mm: Mm, ptep: int, entry: int) -> None:
    """No NX: strip _PAGE_NOEXEC; a present entry loses _PAGE_UNUSED; then ptep_set_pte_at."""
    if not MACHINE_HAS_NX:
        entry &= ~_PAGE_NOEXEC
    if pte_present(entry):
        entry &= ~_PAGE_UNUSED
    ptep_set_pte_at(mm, ptep, entry)


def ptep_set_pte_at(mm: Mm, ptep: int, entry: int) -> None:
    pgste = pgste_get_lock(mm, ptep)
    pgste &= ~_PGSTE_GPS_ZERO
    pgste_set_key(mm, ptep, pgste, entry)
    pgste = pgste_set_pte(mm, ptep, pgste, entry, mm.esop)
    pgste_set_unlock(mm, ptep, pgste)


def ptep_set_access_flags(mm: Mm, ptep: int, entry: int) -> bool:
    """Through ptep_xchg_direct: re-validating an invalid pte writes the real key (3.16 did not)."""
    if mm.pte[ptep] == entry:
        return False
    ptep_xchg_direct(mm, ptep, entry)
    return True


def ptep_test_and_clear_young(mm: Mm, ptep: int) -> bool:
    """Page aging; the new pte is invalid, so the exchange folds the key (3.16 did not)."""
    pte = mm.pte[ptep]
    pte = ptep_xchg_direct(mm, ptep, pte_mkold(pte))
    return pte_young(pte)


def ptep_test_and_clear_uc(mm: Mm, ptep: int) -> bool:
    """3.16's ptep_test_and_clear_user_dirty, renamed: test-and-clear UC; protect (ESOP) or
    invalidate the pte of a dirty present page."""
    pgste = pgste_get_lock(mm, ptep)
    dirty = bool(pgste & PGSTE_UC_BIT)
    pgste &= ~PGSTE_UC_BIT
    pte = mm.pte[ptep]
    if dirty and pte & _PAGE_PRESENT:
        pgste = pgste_pte_notify(mm, ptep, pgste)
        __ptep_ipte(mm, ptep)  # ptep_ipte_global
        if mm.esop or not pte & _PAGE_WRITE:
            pte |= _PAGE_PROTECT
        else:
            pte |= _PAGE_INVALID
        mm.pte[ptep] = pte
    pgste_set_unlock(mm, ptep, pgste)
    return dirty


ptep_test_and_clear_user_dirty = ptep_test_and_clear_uc  # the name the generic code uses


def ptep_force_prot(mm: Mm, ptep: int, prot: int, bit: int) -> int:
    """Set a PGSTE bit (IN) once the pte allows ``prot``; -EAGAIN asks for a fault first. The pte
    is stored again through pgste_set_pte, so a writable one becomes user-dirty."""
    pgste = pgste_get_lock(mm, ptep)
    entry = mm.pte[ptep]
    pte_i = entry & _PAGE_INVALID
    pte_p = entry & _PAGE_PROTECT
    if (pte_i and prot != PROT_NONE) or (pte_p and prot & PROT_WRITE):
        pgste_set_unlock(mm, ptep, pgste)
        return -errno.EAGAIN
    if prot == PROT_NONE and not pte_i:
        ptep_flush_direct(mm, ptep)
        pgste = pgste_update_all(mm, entry, pgste)
        entry |= _PAGE_INVALID
    if prot == PROT_READ and not pte_p:
        ptep_flush_direct(mm, ptep)
        entry &= ~_PAGE_INVALID
        entry |= _PAGE_PROTECT
    pgste |= bit
    pgste = pgste_set_pte(mm, ptep, pgste, entry, mm.esop)
    pgste_set_unlock(mm, ptep, pgste)
    return 0


# --- storage keys (4.19.1 mm/pgtable.c) -----------------------------------------------------------
def set_guest_storage_key(mm: Mm, ptep: int, key: int, nq: bool = False) -> int:
    """-EFAULT without a host pmd (the callers fault it in and retry). A huge pmd takes the
    whole key into the real key and nothing else: no PGSTE, no GMAP_UC, not a dirty page.
    4 KiB: 3.16's body, still without fault-and-retry (a protected pte stays protected)."""
    seg = segment_of(ptep)
    pmd = mm.pmd[seg]
    if pmd == _SEGMENT_ENTRY_EMPTY:  # !pmd_present
        return -errno.EFAULT
    if pmd & _SEGMENT_ENTRY_LARGE:
        paddr = (pmd & HPAGE_MASK) | (ptep % PTRS_PER_PTE) * PAGE_SIZE
        page_set_storage_key(mm, paddr, key, True)  # "Huge pmds need quiescing operations"
        return 0
    new = old = pgste_get_lock(mm, ptep)
    new &= ~(PGSTE_GR_BIT | PGSTE_GC_BIT | PGSTE_ACC_BITS | PGSTE_FP_BIT)
    new |= (key & (_PAGE_CHANGED | _PAGE_REFERENCED)) << GUEST_RC_SHIFT
    new |= (key & (_PAGE_ACC_BITS | _PAGE_FP_BIT)) << KEY_ACC_SHIFT
    pte = mm.pte[ptep]
    if not pte & _PAGE_INVALID:
        paddr = pte & PAGE_MASK
        skey = page_get_storage_key(mm, paddr)
        bits = skey & (_PAGE_CHANGED | _PAGE_REFERENCED)
        page_set_storage_key(mm, paddr, key & (_PAGE_ACC_BITS | _PAGE_FP_BIT), not nq)
        new |= bits << HOST_RC_SHIFT
    # "changing the guest storage key is considered a change of the page"
    if (new ^ old) & (PGSTE_ACC_BITS | PGSTE_FP_BIT | PGSTE_GR_BIT | PGSTE_GC_BIT):
        new |= PGSTE_UC_BIT
    pgste_set_unlock(mm, ptep, new)
    return 0


def get_guest_storage_key(mm: Mm, ptep: int) -> int:
    """The guest's view of a key: 0 without a host pmd; the real key of a huge page; else the
    real key (PGSTE ACC/F if the pte is invalid) with the PGSTE's guest R/C ORed in."""
    seg = segment_of(ptep)
    pmd = mm.pmd[seg]
    if pmd == _SEGMENT_ENTRY_EMPTY:
        return 0  # "Not yet mapped memory has a zero key"
    if pmd & _SEGMENT_ENTRY_LARGE:
        return page_get_storage_key(mm, (pmd & HPAGE_MASK) | (ptep % PTRS_PER_PTE) * PAGE_SIZE)
    return common.get_guest_storage_key(mm, ptep)  # the 4 KiB tail, the same in every tree
