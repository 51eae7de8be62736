"""Linux 4.19's gmap, hugetlbfs and KVM side of s390 dirty tracking, per page or 1 MiB segment.

arch/s390/mm/gmap.c, arch/s390/mm/hugetlbpage.c, mm/hugetlb.c, arch/s390/kvm/kvm-s390.c and
kvm/priv.c as read in the 4.19.1 tree (identical for these functions in 4.19.0-rc3 and 4.19.95;
research kernel-419 §3-§7). This is the module a 4.19 :class:`.common.Mm` carries as
``pgtable``: it re-exports the pte primitives of :mod:`.linux_4_19_pgtable` the generic code
calls. The harvest walks the gmap one guest segment at a time and skips segments the guest has
not linked (``mm.segment``: the gmap's segment-table entries).

With ``mm.hugepages`` (KVM_CAP_S390_HPAGE_1M enabled, guest memory a shared hugetlbfs mapping)
there are no page tables: the host has one large pmd per segment (``mm.pmd``) and the gmap
segment entry carries the dirty state (_SEGMENT_ENTRY_GMAP_UC) and the notify bit
(_SEGMENT_ENTRY_GMAP_IN). Any store to a segment reports all its 256 pages. The model's 4 KiB
page tables exist from the start, as for 3.x; a hugetlbfs pmd appears at the first fault.
"""

from __future__ import annotations

import errno
from mmap import PROT_READ, PROT_WRITE

from kvmshim.abi import KVM_S390_SKEYS_MAX
from kvmshim.s390.bits import (
    _PAGE_DIRTY,
    _PAGE_INVALID,
    _PAGE_LARGE,
    _PAGE_NOEXEC,
    _PAGE_PRESENT,
    _PAGE_PROTECT,
    _PAGE_READ,
    _PAGE_SOFT_DIRTY,
    _PAGE_WRITE,
    _PAGE_YOUNG,
    _SEGMENT_ENTRY,
    _SEGMENT_ENTRY_DIRTY,
    _SEGMENT_ENTRY_EMPTY,
    _SEGMENT_ENTRY_GMAP_IN,
    _SEGMENT_ENTRY_GMAP_UC,
    _SEGMENT_ENTRY_HARDWARE_BITS,
    _SEGMENT_ENTRY_HARDWARE_BITS_LARGE,
    _SEGMENT_ENTRY_INVALID,
    _SEGMENT_ENTRY_LARGE,
    _SEGMENT_ENTRY_NOEXEC,
    _SEGMENT_ENTRY_ORIGIN_LARGE,
    _SEGMENT_ENTRY_PROTECT,
    _SEGMENT_ENTRY_READ,
    _SEGMENT_ENTRY_SOFT_DIRTY,
    _SEGMENT_ENTRY_WRITE,
    _SEGMENT_ENTRY_YOUNG,
    GMAP_NOTIFY_MPROT,
    GMAP_NOTIFY_SHADOW,
    HPAGE_SIZE,
    PAGE_DEFAULT_KEY,
    PAGE_MASK,
    PAGE_RW,
    PGSTE_IN_BIT,
    PTRS_PER_PTE,
)
from kvmshim.s390.reference import linux_4_19_pgtable as pgtable
from kvmshim.s390.reference.common import (
    MAX_FAULT_RETRIES,
    Mm,
    fixup_user_fault,
    mk_pte_phys,
    pte_mkwrite,
    pte_mkyoung,
    pte_present,
    pte_wrprotect,
    segment_of,
)
from kvmshim.s390.reference.linux_4_19_pgtable import (
    MACHINE_HAS_NX,
    PROT_NONE,
    get_guest_storage_key,
    gmap_call_notifier,
    pte_mkdirty,
    ptep_force_prot,
    ptep_test_and_clear_uc,
    set_guest_storage_key,
)

# What the generic code and the tests call through ``mm.pgtable``, from the pgtable module.
VM_PAGE_PROT = pgtable.VM_PAGE_PROT
page_table_alloc_pgste = pgtable.page_table_alloc_pgste
pgste_set_pte = pgtable.pgste_set_pte
set_pte_at = pgtable.set_pte_at
ptep_set_access_flags = pgtable.ptep_set_access_flags
ptep_test_and_clear_young = pgtable.ptep_test_and_clear_young
ptep_test_and_clear_user_dirty = pgtable.ptep_test_and_clear_user_dirty

# A shared hugetlbfs mapping wants no write notification: PROT_READ | PROT_WRITE is __S011.
HUGETLB_VM_PAGE_PROT = PAGE_RW


# --- setup (4.19.1 asm/pgtable.h pte_mkhuge; mm/gmap.c gmap_create, gmap_map_segment) -----------
def pte_mkhuge(pte: int) -> int:
    return pte | _PAGE_LARGE


def gmap_create(nsegments: int, hugepages: bool) -> tuple[list[int], list[int]]:
    """Host pmds and gmap segment entries. The host pmd of a 4 KiB mapping points at its page
    table from the start (origin not modelled); a hugetlbfs one is empty until the first fault.
    The gmap links nothing until the guest touches a segment (gmap_map_segment only fills the
    guest-to-host radix tree)."""
    host = _SEGMENT_ENTRY_EMPTY if hugepages else _SEGMENT_ENTRY
    return [host] * nsegments, [_SEGMENT_ENTRY_EMPTY] * nsegments


# --- storage-key instructions and ioctls (4.19.1 kvm/priv.c, kvm/kvm-s390.c) ---------------------
def handle_sske(mm: Mm, ptep: int, key: int, nq: bool = False) -> None:
    """kvm/priv.c: a guest SSKE, emulated (always so with KVM_CAP_S390_HPAGE_1M, which clears
    use_skf). Bit 7 of the key is dropped; without a host pmd the page is write-faulted in (on
    the host only, the gmap is not linked) and the instruction retried."""
    for _ in range(MAX_FAULT_RETRIES):
        if set_guest_storage_key(mm, ptep, key & 0xFE, nq) == 0:
            return
        fixup_user_fault(mm, ptep, write=True)
    raise AssertionError("handle_sske: fault did not resolve")


def kvm_s390_get_skeys(mm: Mm, start: int, count: int) -> list[int] | int:
    """KVM_S390_GET_SKEYS over the mm's pages (the model's mm uses keys, so never
    KVM_S390_GET_SKEYS_NONE); a negative errno as the kernel returns it. No fault-in."""
    if count < 1 or count > KVM_S390_SKEYS_MAX:
        return -errno.EINVAL
    if start < 0 or start + count > len(mm.skey):
        return -errno.EFAULT  # gfn_to_hva: no slot there
    return [get_guest_storage_key(mm, p) for p in range(start, start + count)]


def kvm_s390_set_skeys(mm: Mm, start: int, keys: list[int]) -> int:
    """KVM_S390_SET_SKEYS: keys in order; bit 7 set is -EINVAL (the keys before it stay set);
    a page without a host pmd is write-faulted in and its key set again."""
    if len(keys) < 1 or len(keys) > KVM_S390_SKEYS_MAX:
        return -errno.EINVAL
    i = 0
    while i < len(keys):
        if start + i >= len(mm.skey):
            return -errno.EFAULT
        if keys[i] & 0x01:  # "Lowest order bit is reserved"
            return -errno.EINVAL
        if set_guest_storage_key(mm, start + i, keys[i]) == 0:
            i += 1
        else:
            fixup_user_fault(mm, start + i, write=True)
    return 0


# --- hugetlbfs: the host's 1 MiB pages (4.19.1 mm/hugetlb.c, arch/s390/mm/hugetlbpage.c) ----------
def __pte_to_rste(pte: int) -> int:
    """The pte-format huge entry the generic code builds, in segment-table-entry format."""
    if not pte_present(pte):
        return _SEGMENT_ENTRY_EMPTY
    rste = pte & PAGE_MASK
    for pte_bit, rste_bit in (
        (_PAGE_READ, _SEGMENT_ENTRY_READ),
        (_PAGE_WRITE, _SEGMENT_ENTRY_WRITE),
        (_PAGE_INVALID, _SEGMENT_ENTRY_INVALID),
        (_PAGE_PROTECT, _SEGMENT_ENTRY_PROTECT),
        (_PAGE_DIRTY, _SEGMENT_ENTRY_DIRTY),
        (_PAGE_YOUNG, _SEGMENT_ENTRY_YOUNG),
        (_PAGE_SOFT_DIRTY, _SEGMENT_ENTRY_SOFT_DIRTY),
        (_PAGE_NOEXEC, _SEGMENT_ENTRY_NOEXEC),
    ):
        if pte & pte_bit:
            rste |= rste_bit
    return rste


def __rste_to_pte(rste: int) -> int:
    """The reverse; 4.19 maps the segment's soft-dirty bit to _PAGE_DIRTY, not
    _PAGE_SOFT_DIRTY, so a huge pte read back never has soft dirty."""
    if rste == _SEGMENT_ENTRY_EMPTY:  # !pmd_present
        return _PAGE_INVALID
    pte = (rste & _SEGMENT_ENTRY_ORIGIN_LARGE) | _PAGE_LARGE | _PAGE_PRESENT
    for rste_bit, pte_bit in (
        (_SEGMENT_ENTRY_READ, _PAGE_READ),
        (_SEGMENT_ENTRY_WRITE, _PAGE_WRITE),
        (_SEGMENT_ENTRY_INVALID, _PAGE_INVALID),
        (_SEGMENT_ENTRY_PROTECT, _PAGE_PROTECT),
        (_SEGMENT_ENTRY_DIRTY, _PAGE_DIRTY),
        (_SEGMENT_ENTRY_YOUNG, _PAGE_YOUNG),
        (_SEGMENT_ENTRY_SOFT_DIRTY, _PAGE_DIRTY),
        (_SEGMENT_ENTRY_NOEXEC, _PAGE_NOEXEC),
    ):
        if rste & rste_bit:
            pte |= pte_bit
    return pte


def huge_ptep_get(mm: Mm, seg: int) -> int:
    return __rste_to_pte(mm.pmd[seg])


def clear_huge_pte_skeys(mm: Mm, seg: int, rste: int) -> None:
    """The first mapping of a huge page (PG_arch_1 clear) sets all its 256 keys to default."""
    if rste & _SEGMENT_ENTRY_INVALID:
        return
    if not mm.pg_arch_1[seg]:
        mm.pg_arch_1[seg] = True
        first = seg * PTRS_PER_PTE
        mm.skey[first : first + PTRS_PER_PTE] = [PAGE_DEFAULT_KEY] * PTRS_PER_PTE


def set_huge_pte_at(mm: Mm, seg: int, pte: int) -> None:
    rste = __pte_to_rste(pte)
    if not MACHINE_HAS_NX:
        rste &= ~_SEGMENT_ENTRY_NOEXEC
    rste |= _SEGMENT_ENTRY_LARGE
    clear_huge_pte_skeys(mm, seg, rste)
    mm.pmd[seg] = rste


def make_huge_pte(mm: Mm, seg: int, writable: bool) -> int:
    """mk_huge_pte = mk_pte: a hugetlbfs page in the page cache is PageDirty."""
    entry = mk_pte_phys(mm.frame_of(seg * PTRS_PER_PTE), HUGETLB_VM_PAGE_PROT)
    if entry & _PAGE_WRITE:
        entry = pte_mkdirty(entry)
    entry = pte_mkwrite(pte_mkdirty(entry)) if writable else pte_wrprotect(entry)
    return pte_mkhuge(pte_mkyoung(entry))


def hugetlb_no_page(mm: Mm, seg: int, write: bool) -> None:
    """A shared writable mapping is mapped writable and dirty on its first fault, read or write."""
    set_huge_pte_at(mm, seg, make_huge_pte(mm, seg, writable=True))


def hugetlb_fault(mm: Mm, seg: int, write: bool) -> None:
    entry = huge_ptep_get(mm, seg)
    if entry == _PAGE_INVALID:  # huge_pte_none
        hugetlb_no_page(mm, seg, write)
        return
    if write:
        assert entry & _PAGE_WRITE, "hugetlb_cow (a private mapping) is not modelled"
        entry = pte_mkdirty(entry)
    entry = pte_mkyoung(entry)
    huge_ptep_set_access_flags(mm, seg, entry)


def huge_ptep_set_access_flags(mm: Mm, seg: int, pte: int) -> bool:
    """A change goes through an invalidation of the host pmd, which unlinks the gmap segment.
    With soft dirty the read-back never equals pte_mkdirty's result, so every write fault on a
    present huge pmd does this (§3.3)."""
    changed = huge_ptep_get(mm, seg) != pte
    if changed:
        huge_ptep_get_and_clear(mm, seg)
        set_huge_pte_at(mm, seg, pte)
    return changed


def huge_ptep_get_and_clear(mm: Mm, seg: int) -> int:
    pte = huge_ptep_get(mm, seg)
    pmdp_xchg_direct(mm, seg, _SEGMENT_ENTRY_EMPTY)
    return pte


def pmdp_xchg_direct(mm: Mm, seg: int, new: int) -> int:
    old = mm.pmd[seg]
    if not old & _SEGMENT_ENTRY_INVALID:  # pmdp_flush_direct → pmdp_idte_*
        gmap_pmdp_idte_global(mm, seg)  # allow_gmap_hpage_1m: the gmap entries go too
    mm.pmd[seg] = new
    return old


# --- the gmap (4.19.1 mm/gmap.c) ------------------------------------------------------------------
def pmdp_notify_gmap(mm: Mm, seg: int) -> None:
    """Clear GMAP_IN and call the notifiers for the whole segment, armed or not."""
    mm.segment[seg] &= ~_SEGMENT_ENTRY_GMAP_IN
    gaddr = mm.guest_base + seg * HPAGE_SIZE
    gmap_call_notifier(mm, gaddr, gaddr + HPAGE_SIZE - 1)


def gmap_pmdp_xchg(mm: Mm, seg: int, new: int) -> None:
    pmdp_notify_gmap(mm, seg)
    new &= ~_SEGMENT_ENTRY_GMAP_IN
    mm.segment[seg] = new  # after the IDTE of the old entry, which leaves no trace here


def gmap_pmdp_idte_global(mm: Mm, seg: int) -> None:
    """The host pmd is invalidated: a linked gmap entry is notified and emptied (GMAP_UC lost)."""
    if mm.segment[seg] != _SEGMENT_ENTRY_EMPTY:  # radix_tree_delete(host_to_guest) found it
        pmdp_notify_gmap(mm, seg)
        mm.segment[seg] = _SEGMENT_ENTRY_EMPTY


def __gmap_link(mm: Mm, seg: int) -> int:
    """Link a guest segment to the host pmd after a fault. A large pmd's first link, and the
    unprotecting of a protected entry, set GMAP_UC: the segment counts as written."""
    pmd = mm.pmd[seg]
    assert pmd != _SEGMENT_ENTRY_EMPTY, "__gmap_link without a host pmd (VM_BUG_ON)"
    table = mm.segment[seg]
    if table == _SEGMENT_ENTRY_EMPTY:
        if pmd & _SEGMENT_ENTRY_LARGE:
            table = (pmd & _SEGMENT_ENTRY_HARDWARE_BITS_LARGE) | _SEGMENT_ENTRY_GMAP_UC
        else:
            table = pmd & _SEGMENT_ENTRY_HARDWARE_BITS
        mm.segment[seg] = table
    elif table & _SEGMENT_ENTRY_PROTECT and not pmd & _SEGMENT_ENTRY_PROTECT:
        unprot = (table & ~_SEGMENT_ENTRY_PROTECT) | _SEGMENT_ENTRY_GMAP_UC
        gmap_pmdp_xchg(mm, seg, unprot)
    return 0


def gmap_protect_pmd(mm: Mm, seg: int, prot: int, bits: int) -> int:
    entry = mm.segment[seg]
    pmd_i = entry & _SEGMENT_ENTRY_INVALID
    pmd_p = entry & _SEGMENT_ENTRY_PROTECT
    new = entry
    if (pmd_i and prot != PROT_NONE) or (pmd_p and prot == PROT_WRITE):
        return -errno.EAGAIN
    if prot == PROT_NONE and not pmd_i:
        new |= _SEGMENT_ENTRY_INVALID
        gmap_pmdp_xchg(mm, seg, new)
    if prot == PROT_READ and not pmd_p:
        new &= ~_SEGMENT_ENTRY_INVALID
        new |= _SEGMENT_ENTRY_PROTECT
        gmap_pmdp_xchg(mm, seg, new)
    if bits & GMAP_NOTIFY_MPROT:
        mm.segment[seg] |= _SEGMENT_ENTRY_GMAP_IN
    if bits & GMAP_NOTIFY_SHADOW:
        return -errno.EINVAL
    return 0


def gmap_protect_pte(mm: Mm, ptep: int, prot: int, bits: int) -> int:
    if mm.segment[segment_of(ptep)] & _SEGMENT_ENTRY_INVALID:
        return -errno.EAGAIN
    pbits = PGSTE_IN_BIT if bits & GMAP_NOTIFY_MPROT else 0
    return ptep_force_prot(mm, ptep, prot, pbits)


def gmap_pte_op_fixup(mm: Mm, ptep: int, prot: int) -> int:
    fixup_user_fault(mm, ptep, write=prot == PROT_WRITE)
    return __gmap_link(mm, segment_of(ptep))


def gmap_protect_range(mm: Mm, ptep: int, prot: int, bits: int) -> int:
    """One page of the range (the kernel loops without bound; the model's faults resolve at
    once, so more than a few rounds is a bug)."""
    for _ in range(MAX_FAULT_RETRIES):
        rc = -errno.EAGAIN
        seg = segment_of(ptep)
        if mm.segment[seg] != _SEGMENT_ENTRY_EMPTY:  # gmap_pmd_op_walk
            if mm.segment[seg] & _SEGMENT_ENTRY_LARGE:
                rc = gmap_protect_pmd(mm, seg, prot, bits)
            else:
                rc = gmap_protect_pte(mm, ptep, prot, bits)
        if rc != -errno.EAGAIN:
            return rc
        gmap_pte_op_fixup(mm, ptep, prot)
    raise AssertionError("gmap_protect_range: fault did not resolve")


def gmap_mprotect_notify(mm: Mm, ptep: int) -> None:
    """Arm notification for one page as KVM does for the prefix (PROT_WRITE): the 4 KiB pte
    gets IN and UC; a large segment gets GMAP_IN (GMAP_UC only if a fixup unprotected it)."""
    rc = gmap_protect_range(mm, ptep, PROT_WRITE, GMAP_NOTIFY_MPROT)
    assert rc == 0, rc


gmap_ipte_notify = gmap_mprotect_notify  # 3.16's name, which the generic code uses


def gmap_test_and_clear_dirty_pmd(mm: Mm, seg: int) -> bool:
    """Dirty unless invalid or (protected and no GMAP_UC); a dirty segment loses GMAP_UC and is
    protected again (PROT_READ, whether or not the machine has ESOP)."""
    entry = mm.segment[seg]
    if entry & _SEGMENT_ENTRY_INVALID:
        return False
    # "Already protected memory, which did not change is clean"
    if entry & _SEGMENT_ENTRY_PROTECT and not entry & _SEGMENT_ENTRY_GMAP_UC:
        return False
    mm.segment[seg] = entry & ~_SEGMENT_ENTRY_GMAP_UC
    gmap_protect_pmd(mm, seg, PROT_READ, 0)
    return True


def gmap_sync_dirty_log_pmd(mm: Mm, seg: int) -> list[int]:
    """The dirty pages of one guest segment, as offsets 0..255; nothing if it is not linked."""
    entry = mm.segment[seg]
    if entry == _SEGMENT_ENTRY_EMPTY:  # gmap_pmd_op_walk: pmd_none
        return []
    if entry & _SEGMENT_ENTRY_LARGE:
        return list(range(PTRS_PER_PTE)) if gmap_test_and_clear_dirty_pmd(mm, seg) else []
    first = seg * PTRS_PER_PTE
    return [i for i in range(PTRS_PER_PTE) if ptep_test_and_clear_uc(mm, first + i)]


# --- the harvest loop (4.19.1 arch/s390/kvm/kvm-s390.c) -------------------------------------------
def kvm_s390_sync_dirty_log(mm: Mm, npages: int) -> list[int]:
    """One segment at a time, ``cur_gfn <= last_gfn``: the last round is the guest segment after
    the slot, another mm's (the softmmu backend models it); pages are marked at their own gfn."""
    dirty: list[int] = []
    for cur in range(0, npages + 1, PTRS_PER_PTE):
        seg = segment_of(cur)
        if seg >= len(mm.segment):
            continue  # the segment after the slot
        dirty += [cur + i for i in gmap_sync_dirty_log_pmd(mm, seg) if cur + i < npages]
    return dirty
