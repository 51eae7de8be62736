"""Linux 3.16.0's s390 dirty-tracking primitives (the seed tree), one page at a time.

arch/s390/include/asm/pgtable.h and arch/s390/mm/pgtable.c as read in the 3.16.0 tree (research
kernel-315-316 §2-§3; the seed's diff context agrees). Where the code the model once followed
came from 3.17 or later, the 3.16 form is used and the difference is named in the docstring.
``mm_use_skey`` is assumed set (see :mod:`.common`); with it clear, pgste_update_all and
pgste_set_key would return at once.
"""

from __future__ import annotations

from kvmshim.s390.bits import (
    _PAGE_ACC_BITS,
    _PAGE_CHANGED,
    _PAGE_DIRTY,
    _PAGE_FP_BIT,
    _PAGE_INVALID,
    _PAGE_PRESENT,
    _PAGE_PROTECT,
    _PAGE_REFERENCED,
    _PAGE_WRITE,
    _PGSTE_GPS_ZERO,
    GUEST_RC_SHIFT,
    HOST_RC_SHIFT,
    KEY_ACC_SHIFT,
    PAGE_MASK,
    PAGE_READ,
    PGSTE_ACC_BITS,
    PGSTE_FP_BIT,
    PGSTE_GC_BIT,
    PGSTE_GR_BIT,
    PGSTE_IN_BIT,
    PGSTE_UC_BIT,
)
from kvmshim.s390.reference.common import (
    MAX_FAULT_RETRIES,
    Mm,
    __ptep_ipte,
    fixup_user_fault,
    gmap_do_ipte_notify,
    page_get_storage_key,
    page_set_storage_key,
    pgste_get_lock,
    pgste_set_unlock,
    pte_mkold,
    pte_young,
    ptep_flush_direct,
    whole_tables,
)
from kvmshim.s390.reference.common import (
    pte_mkdirty as pte_mkdirty,  # re-exported: the generic fault path calls it through here
)

# The guest RAM VMA's protection (shared, writable, wants write notification) and the dirty
# modifier, as 3.16.0 has them: the generic fault path in common calls through these.
VM_PAGE_PROT = PAGE_READ


# --- page tables (mm/pgtable.c) ---------------------------------------------------------------
def page_table_alloc_pgste(npages: int) -> tuple[list[int], list[int]]:
    """Whole 256-entry tables: ptes _PAGE_INVALID, PGSTEs 0 (the seed dropped HR|HC)."""
    n = whole_tables(npages)
    return [_PAGE_INVALID] * n, [0] * n


# --- PGSTE helpers (asm/pgtable.h) -------------------------------------------------------------
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


def pgste_ipte_notify(mm: Mm, ptep: int, pgste: int) -> int:
    if pgste & PGSTE_IN_BIT:
        pgste &= ~PGSTE_IN_BIT
        gmap_do_ipte_notify(mm, ptep)
    return pgste


# --- pte updates (asm/pgtable.h) ---------------------------------------------------------------
def set_pte_at(mm: Mm, ptep: int, entry: int) -> None:
    """3.16.0: no ``_PAGE_UNUSED`` clearing (that line is from 4.x kernels)."""
    pgste = pgste_get_lock(mm, ptep)
    pgste &= ~_PGSTE_GPS_ZERO
    pgste_set_key(mm, ptep, pgste, entry)
    pgste = pgste_set_pte(mm, ptep, pgste, entry, mm.esop)
    pgste_set_unlock(mm, ptep, pgste)


def ptep_set_access_flags(mm: Mm, ptep: int, entry: int) -> bool:
    """3.16.0: no ``pgste_set_key`` here (3.17.0 added it), so the real key is not rewritten."""
    if mm.pte[ptep] == entry:
        return False
    pgste = pgste_get_lock(mm, ptep)
    pgste = pgste_ipte_notify(mm, ptep, pgste)
    ptep_flush_direct(mm, ptep)
    pgste = pgste_set_pte(mm, ptep, pgste, entry, mm.esop)
    pgste_set_unlock(mm, ptep, pgste)
    return True


def ptep_test_and_clear_young(mm: Mm, ptep: int) -> bool:
    """Page aging: make the pte old. 3.16.0 does not fold the key (3.17.0 added that)."""
    pgste = pgste_get_lock(mm, ptep)
    pgste = pgste_ipte_notify(mm, ptep, pgste)
    pte = mm.pte[ptep]
    ptep_flush_direct(mm, ptep)
    young = pte_young(pte)
    pte = pte_mkold(pte)
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


# --- mm/pgtable.c ------------------------------------------------------------------------------
def set_guest_storage_key(mm: Mm, ptep: int, key: int, nq: bool = False) -> None:
    """A guest key change: the guest key lives in the PGSTE; a change sets UC.

    In 3.16 only an intercepted PFMF with SK reaches this (handle_pfmf); a guest SSKE is
    intercepted once per vCPU to enable keys and is then interpreted by SIE, which sets no UC
    [inferred, research §5]. 3.16.0 does not fault a protected pte in first (the
    fault-and-retry is 3.17.0): after an ESOP harvest the pte stays protected.
    """
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
    # "changing the guest storage key is considered a change of the page"
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
