"""Linux 3.15.5's s390 dirty-tracking primitives: the code the seed commit removed.

arch/s390/include/asm/pgtable.h and arch/s390/mm/pgtable.c as read in the 3.15.5 tree (research
kernel-315-316 §2-§3; every function here has the same text in 3.14.1 and matches the seed's
pre-image, so 3.15.0 is very probably the same [inferred]). The user-dirty state is the host
change bit PGSTE_HC, which ``pgste_update_all`` moves out of the real storage key: any store the
hardware saw (guest, DMA, kernel mapping) sets the key's C bit. There is no PGSTE_UC_BIT and
PGSTE_IN_BIT sits where 3.16 puts UC.

3.15's s390 KVM_GET_DIRTY_LOG was a stub (returned 0, harvested nothing); the model drives these
primitives with 3.16's ``kvm_s390_sync_dirty_log`` loop, i.e. the seed reverted.
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
    PGSTE_HC_BIT,
    PGSTE_HR_BIT,
    PGSTE_IN_BIT_315,
)
from kvmshim.s390.reference.common import (
    MAX_FAULT_RETRIES,
    Mm,
    fixup_user_fault,
    gmap_do_ipte_notify,
    page_get_storage_key,
    page_reset_referenced,
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

PGSTE_IN_BIT = PGSTE_IN_BIT_315


# The guest RAM VMA's protection (shared, writable, wants write notification) and the dirty
# modifier, as 3.15.5 has them: the generic fault path in common calls through these.
VM_PAGE_PROT = PAGE_READ


# --- page tables (mm/pgtable.c) ---------------------------------------------------------------
def page_table_alloc_pgste(npages: int) -> tuple[list[int], list[int]]:
    """Whole 256-entry tables: ptes _PAGE_INVALID, PGSTEs HR|HC: every new page host-dirty."""
    n = whole_tables(npages)
    return [_PAGE_INVALID] * n, [PGSTE_HR_BIT | PGSTE_HC_BIT] * n


# --- PGSTE helpers (asm/pgtable.h) -------------------------------------------------------------
def pgste_update_all(mm: Mm, pte: int, pgste: int) -> int:
    """Move the real key's C/R into HC/HR (resetting them in the key), OR them into GR/GC and
    copy ACC/F. Nothing for an invalid pte: a store the key saw then stays in the key."""
    if pte & _PAGE_INVALID:
        return pgste
    address = pte & PAGE_MASK
    skey = page_get_storage_key(mm, address)
    bits = skey & (_PAGE_CHANGED | _PAGE_REFERENCED)
    if not pgste & PGSTE_HC_BIT and bits & _PAGE_CHANGED:
        # Transfer dirty + referenced bit to host bits in pgste
        pgste |= bits << HOST_RC_SHIFT
        page_set_storage_key(mm, address, skey ^ bits, False)
    elif not pgste & PGSTE_HR_BIT and bits & _PAGE_REFERENCED:
        # Transfer referenced bit to host bit in pgste
        pgste |= PGSTE_HR_BIT
        page_reset_referenced(mm, address)
    pgste |= bits << GUEST_RC_SHIFT
    pgste &= ~(PGSTE_ACC_BITS | PGSTE_FP_BIT)
    pgste |= (skey & (_PAGE_ACC_BITS | _PAGE_FP_BIT)) << KEY_ACC_SHIFT
    return pgste


def pgste_update_young(mm: Mm, pte: int, pgste: int) -> int:
    """The real R into HR|GR (only for ptep_test_and_clear_user_young, which has no callers)."""
    if pte & _PAGE_INVALID:
        return pgste
    if page_reset_referenced(mm, pte & PAGE_MASK):
        pgste |= PGSTE_HR_BIT | PGSTE_GR_BIT
    return pgste


def pgste_set_key(mm: Mm, ptep: int, pgste: int, entry: int) -> None:
    """When a mapping is established, the real key gets the guest's ACC/F, and R = C = 0."""
    if entry & _PAGE_INVALID:
        return
    assert mm.pte[ptep] & _PAGE_INVALID, "pgste_set_key on a valid pte (VM_BUG_ON)"
    nkey = (pgste & (PGSTE_ACC_BITS | PGSTE_FP_BIT)) >> KEY_ACC_SHIFT
    page_set_storage_key(mm, entry & PAGE_MASK, nkey, False)


def pgste_set_pte(mm: Mm, ptep: int, entry: int, esop: bool) -> None:
    """Store a pte; without ESOP every present writable one is forced dirty, even if invalid."""
    if not esop and entry & _PAGE_PRESENT and entry & _PAGE_WRITE:
        entry |= _PAGE_DIRTY
        entry &= ~_PAGE_PROTECT
    mm.pte[ptep] = entry


def pgste_ipte_notify(mm: Mm, ptep: int, pgste: int) -> int:
    if pgste & PGSTE_IN_BIT:
        pgste &= ~PGSTE_IN_BIT
        gmap_do_ipte_notify(mm, ptep)
    return pgste


# --- pte updates (asm/pgtable.h) ---------------------------------------------------------------
def set_pte_at(mm: Mm, ptep: int, entry: int) -> None:
    pgste = pgste_get_lock(mm, ptep)
    pgste &= ~_PGSTE_GPS_ZERO
    pgste_set_key(mm, ptep, pgste, entry)
    pgste_set_pte(mm, ptep, entry, mm.esop)
    pgste_set_unlock(mm, ptep, pgste)


def ptep_set_access_flags(mm: Mm, ptep: int, entry: int) -> bool:
    if mm.pte[ptep] == entry:
        return False
    pgste = pgste_get_lock(mm, ptep)
    pgste = pgste_ipte_notify(mm, ptep, pgste)
    ptep_flush_direct(mm, ptep)
    pgste_set_pte(mm, ptep, entry, mm.esop)
    pgste_set_unlock(mm, ptep, pgste)
    return True


def ptep_test_and_clear_young(mm: Mm, ptep: int) -> bool:
    """Page aging: make the pte old; the key is not folded."""
    pgste = pgste_get_lock(mm, ptep)
    pgste = pgste_ipte_notify(mm, ptep, pgste)
    pte = mm.pte[ptep]
    ptep_flush_direct(mm, ptep)
    young = pte_young(pte)
    pte = pte_mkold(pte)
    pgste_set_pte(mm, ptep, pte, mm.esop)
    pgste_set_unlock(mm, ptep, pgste)
    return young


def ptep_test_and_clear_user_dirty(mm: Mm, ptep: int) -> bool:
    """The harvest of one page: fold the real key (pgste_update_all), test-and-clear HC. The
    pte is left alone: the hardware change bit sees the next store without a fault."""
    pgste = pgste_get_lock(mm, ptep)
    pgste = pgste_update_all(mm, mm.pte[ptep], pgste)
    dirty = bool(pgste & PGSTE_HC_BIT)
    pgste &= ~PGSTE_HC_BIT
    pgste_set_unlock(mm, ptep, pgste)
    return dirty


def ptep_test_and_clear_user_young(mm: Mm, ptep: int) -> bool:
    """Test-and-clear HR after pgste_update_young (no callers in 3.15.5; kept for the record)."""
    pgste = pgste_get_lock(mm, ptep)
    pgste = pgste_update_young(mm, mm.pte[ptep], pgste)
    young = bool(pgste & PGSTE_HR_BIT)
    pgste &= ~PGSTE_HR_BIT
    pgste_set_unlock(mm, ptep, pgste)
    return young


# --- mm/pgtable.c ------------------------------------------------------------------------------
def set_guest_storage_key(mm: Mm, ptep: int, key: int, nq: bool = False) -> None:
    """A guest key change (reached from an intercepted PFMF with SK); a change sets HC."""
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
        new |= PGSTE_HC_BIT
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
