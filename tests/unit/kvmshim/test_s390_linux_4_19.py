"""Worked Linux 4.19 examples (4.19.1; research kernel-419), on the per-page reference.

Guest memory on 4 KiB pages or, with ``hugepages`` (KVM_CAP_S390_HPAGE_1M), on 1 MiB hugetlbfs
pages whose dirty state is the gmap segment entry's _SEGMENT_ENTRY_GMAP_UC. FRAME and GUEST are
1 MiB aligned, as a huge page and a gmap segment are. Segment entries are compared without their
frame origin (``seg``). Tests that read or set the oracle's own state (``e.mm``, the key and
ioctl functions) take the reference only (``ref_engine``); the others run on both engines."""

import errno

import pytest

from kvmshim.abi import KVM_S390_SKEYS_MAX
from kvmshim.errors import KvmShimError
from kvmshim.s390 import bits as b
from kvmshim.s390 import reference as ref
from kvmshim.s390.reference import common
from kvmshim.s390.reference import linux_4_19 as k

from .s390_engines import RefEngine, VecEngine

ENGINES = [RefEngine, VecEngine]
FRAME = 0x4010_0000
GUEST = 0x8000_0000
SEG = 256  # pages per segment
UC, IN = b.PGSTE_UC_BIT, b.PGSTE_IN_BIT
EMPTY = b._SEGMENT_ENTRY_EMPTY
LARGE, PROTECT = b._SEGMENT_ENTRY_LARGE, b._SEGMENT_ENTRY_PROTECT
GMAP_UC, GMAP_IN = b._SEGMENT_ENTRY_GMAP_UC, b._SEGMENT_ENTRY_GMAP_IN
RC = b._PAGE_REFERENCED | b._PAGE_CHANGED


@pytest.fixture(params=ENGINES, ids=lambda e: e.name)
def engine_cls(request):
    return request.param


@pytest.fixture
def ref_engine():
    return RefEngine


def make(engine_cls, hugepages=True, esop=True, npages=3 * SEG):
    return engine_cls(
        npages, esop=esop, frame_base=FRAME, guest_base=GUEST, kernel="4.19", hugepages=hugepages
    )


def seg(e, s):
    """The gmap segment entry of segment ``s`` without its frame origin."""
    return int(e.segments()[s]) & ~b._SEGMENT_ENTRY_ORIGIN_LARGE


def pte(e, page):
    return int(e.arrays()[0][page])


def pgste(e, page):
    return int(e.arrays()[1][page])


def skey(e, page):
    return int(e.arrays()[2][page])


def pages_of(s):
    return list(range(s * SEG, (s + 1) * SEG))


# --- 1 MiB pages: the segment is the unit -------------------------------------------------------
def test_a_store_to_one_page_reports_all_256_pages_of_its_segment_once(engine_cls):
    # __gmap_link: first link of a large pmd sets GMAP_UC; gmap_sync_dirty_log_pmd:
    # bitmap_fill(bitmap, _PAGE_ENTRIES); gmap_test_and_clear_dirty_pmd protects it again.
    e = make(engine_cls)
    e.store([SEG + 7])
    assert seg(e, 1) == LARGE | GMAP_UC and seg(e, 0) == seg(e, 2) == EMPTY
    assert e.faults == {"translation": 1, "protection": 0}
    # [0, 256): clean / [256, 512): dirty / [512, 768): clean
    assert e.harvest() == pages_of(1)
    assert seg(e, 1) == LARGE | PROTECT
    assert e.harvest() == []


def test_the_segment_entry_copies_the_host_pmd_frame_and_hardware_bits(ref_engine):
    # _SEGMENT_ENTRY_HARDWARE_BITS_LARGE keeps the origin and drops the host's software bits
    # (READ, WRITE, YOUNG, DIRTY and SOFT_DIRTY, which has GMAP_UC's value).
    e = make(ref_engine)
    e.store([0])
    host = e.mm.pmd[0]
    assert host == FRAME | LARGE | 0x7003  # SOFT_DIRTY|DIRTY|YOUNG|WRITE|READ, no NOEXEC (no NX)
    assert int(e.segments()[0]) == FRAME | LARGE | GMAP_UC


def test_without_huge_pages_only_the_stored_page_is_reported(engine_cls):
    e = make(engine_cls, hugepages=False)
    e.store([SEG + 7])
    assert e.harvest() == [SEG + 7]
    assert e.harvest() == []


def test_a_4k_gmap_entry_only_points_at_the_page_table(ref_engine):
    e = make(ref_engine, hugepages=False)
    e.store([SEG + 7])
    # __gmap_link copies the host pmd's _SEGMENT_ENTRY_HARDWARE_BITS: the page-table origin
    # (not modelled), no dirty state. Segment 0 was never touched: not linked.
    assert seg(e, 1) == b._SEGMENT_ENTRY and seg(e, 0) == EMPTY


def test_a_load_also_makes_a_huge_segment_dirty_when_it_links_it(engine_cls):
    # __gmap_link sets GMAP_UC on the first link of a large pmd whatever the access; the shared
    # hugetlbfs mapping is writable and dirty from its first fault (hugetlb_no_page).
    e = make(engine_cls)
    e.load([3])
    assert e.harvest() == pages_of(0)
    e.load([4])  # protected, but loads do not fault
    assert e.faults == {"translation": 1, "protection": 0}
    assert e.harvest() == []


@pytest.mark.parametrize("esop", [True, False])
def test_a_store_after_the_harvest_faults_unprotects_and_dirties_the_segment(engine_cls, esop):
    # gmap_test_and_clear_dirty_pmd protects with PROT_READ on any machine (no ESOP test);
    # the protection fault's __gmap_link sets GMAP_UC again (here by relinking: the host's
    # huge_ptep_set_access_flags sees a change because __rste_to_pte maps soft dirty to
    # _PAGE_DIRTY, invalidates the host pmd, and that empties the gmap entry).
    e = make(engine_cls, esop=esop)
    e.store([10])
    e.harvest()
    assert seg(e, 0) == LARGE | PROTECT
    e.store([200])
    assert e.faults == {"translation": 1, "protection": 1}
    assert seg(e, 0) == LARGE | GMAP_UC
    assert e.harvest() == pages_of(0)


@pytest.mark.parametrize("esop", [True, False])
def test_4k_harvest_protects_with_esop_and_invalidates_without(engine_cls, esop):
    # ptep_test_and_clear_uc: 3.16's rule, unchanged.
    e = make(engine_cls, hugepages=False, esop=esop)
    e.store([5])
    assert e.harvest() == [5]
    low = pte(e, 5) & 0xFFF
    assert low == (0x23F if esop else 0x43F)  # 0x03F: 0x03D plus _PAGE_SOFT_DIRTY


def test_every_exchange_of_a_huge_entry_calls_the_notifier_armed_or_not(engine_cls):
    # pmdp_notify_gmap calls gmap_call_notifier for the whole segment without testing GMAP_IN
    # (the model's notifiers get it page by page).
    e = make(engine_cls)
    segment_0 = [GUEST + i * 4096 for i in range(SEG)]
    e.store([1])
    e.harvest()
    assert e.notified == segment_0
    e.store([2])  # the host pmd's invalidation empties and notifies the linked entry
    assert e.notified == segment_0 * 2


def test_arming_a_huge_segment_sets_gmap_in_and_dirties_only_through_its_fixup(engine_cls):
    e = make(engine_cls)
    e.store([0])
    e.arm_notify([0, 1])  # linked and writable: gmap_protect_pmd sets GMAP_IN only
    assert seg(e, 0) == LARGE | GMAP_UC | GMAP_IN
    assert e.harvest() == pages_of(0)  # the harvest's exchange fires and clears GMAP_IN
    assert seg(e, 0) == LARGE | PROTECT and len(e.notified) == SEG
    e.arm_notify([0])  # protected: -EAGAIN, write fault and relink (GMAP_UC), then GMAP_IN
    assert seg(e, 0) == LARGE | GMAP_UC | GMAP_IN
    assert e.harvest() == pages_of(0)


def test_arming_a_4k_page_makes_it_user_dirty(engine_cls):
    # 4.19 ptep_force_prot stores the pte again through pgste_set_pte: UC without a store
    # (3.16's gmap_ipte_notify only set IN).
    e = make(engine_cls, hugepages=False)
    e.arm_notify([6])
    assert pgste(e, 6) & (IN | UC) == IN | UC
    assert e.harvest() == [6]
    assert e.notified == [GUEST + 6 * 4096] and not pgste(e, 6) & IN


def test_huge_pages_are_not_aged(engine_cls):
    e = make(engine_cls)
    e.store([0])
    assert e.age([0]) == []


def test_aging_a_4k_page_folds_the_key_and_revalidating_it_writes_the_key_back(ref_engine):
    # ptep_test_and_clear_young → ptep_xchg_commit: new pte invalid → pgste_update_all;
    # ptep_set_access_flags on the invalid old pte → pgste_set_key (3.16 did neither).
    e = make(ref_engine, hugepages=False)
    e.store([9])
    assert skey(e, 9) == RC
    assert e.age([9]) == [True]
    assert pgste(e, 9) & (b.PGSTE_GR_BIT | b.PGSTE_GC_BIT) == b.PGSTE_GR_BIT | b.PGSTE_GC_BIT
    e.mm.skey[9] = 0  # the key forgets R/C; the PGSTE remembers them
    e.load([9])
    assert skey(e, 9) == RC | b._PAGE_REFERENCED


# --- storage keys ---------------------------------------------------------------------------
def test_a_key_change_on_a_huge_segment_sets_the_real_key_and_is_not_a_change(engine_cls):
    # set_guest_storage_key on a large pmd: page_set_storage_key(paddr, key, 1) and nothing else.
    e = make(engine_cls)
    e.store([20])
    e.harvest()
    e.set_key([20], 0x36)  # the whole key, R and C included
    assert skey(e, 20) == 0x36 and skey(e, 21) == 0
    assert e.harvest() == []


def test_sske_drops_the_lowest_key_bit(ref_engine):
    # handle_sske: key = gprs[reg1] & 0xfe (KVM_S390_SET_SKEYS refuses an odd key instead).
    e = make(ref_engine)
    e.set_key([20], 0x37)
    assert skey(e, 20) == 0x36 and k.get_guest_storage_key(e.mm, 20) == 0x36


def test_a_key_on_an_unmapped_huge_segment_faults_the_host_page_in_but_not_the_gmap(engine_cls):
    # handle_sske: -EFAULT (no host pmd) → fixup_user_fault(WRITE) → set_huge_pte_at, whose
    # clear_huge_pte_skeys sets all 256 keys to the default first; the gmap is not linked.
    e = make(engine_cls)
    e.io_store([SEG + 1])
    e.set_key([SEG], 0x40)
    assert skey(e, SEG) == 0x40 and skey(e, SEG + 1) == 0
    assert seg(e, 1) == EMPTY and e.harvest() == []
    e.load([SEG])  # the guest's first access links it: dirty
    assert e.harvest() == pages_of(1)


def test_a_4k_key_change_waits_until_the_guest_links_the_segment(engine_cls):
    # set_guest_storage_key sets UC on the host pte, but gmap_sync_dirty_log_pmd walks the
    # gmap and skips a segment it has not linked (3.16 harvested the host mm page by page).
    e = make(engine_cls, hugepages=False)
    e.set_key([SEG + 3], 0x30)
    assert pgste(e, SEG + 3) & UC
    assert e.harvest() == []
    e.load([SEG + 100])
    assert e.harvest() == [SEG + 3]


def test_get_guest_storage_key_in_each_state(ref_engine):
    e = make(ref_engine, hugepages=False)
    assert k.get_guest_storage_key(e.mm, 0) == 0  # invalid pte, PGSTE 0
    e.set_key([0], 0x5A)  # invalid pte: the PGSTE holds ACC/F and GR/GC
    assert k.get_guest_storage_key(e.mm, 0) == 0x5A & 0xFE
    e.store([1])
    e.mm.pgste[1] |= b.PGSTE_GC_BIT
    e.mm.skey[1] = 0x34  # valid pte: the real key, guest R/C ORed in
    assert k.get_guest_storage_key(e.mm, 1) == 0x36
    h = make(ref_engine)
    assert k.get_guest_storage_key(h.mm, 0) == 0  # "Not yet mapped memory has a zero key"
    h.store([0])
    assert k.get_guest_storage_key(h.mm, 0) == RC  # the real key as is


def test_skeys_ioctls(ref_engine):
    e = make(ref_engine)
    assert k.kvm_s390_get_skeys(e.mm, 0, 0) == -errno.EINVAL
    assert k.kvm_s390_get_skeys(e.mm, 0, KVM_S390_SKEYS_MAX + 1) == -errno.EINVAL
    assert k.kvm_s390_get_skeys(e.mm, 3 * SEG - 1, 2) == -errno.EFAULT
    assert k.kvm_s390_set_skeys(e.mm, 0, [0x10, 0x21, 0x30]) == -errno.EINVAL  # bit 7 reserved
    assert k.kvm_s390_get_skeys(e.mm, 0, 3) == [0x10, 0, 0]  # the first key stayed set
    assert k.kvm_s390_set_skeys(e.mm, SEG, [0x16]) == 0
    assert k.kvm_s390_get_skeys(e.mm, SEG, 2) == [0x16, 0]


# --- the harvest loop ---------------------------------------------------------------------------
@pytest.mark.parametrize("hugepages", [True, False])
def test_the_inclusive_bound_harvests_the_guest_segment_after_the_slot(ref_engine, hugepages):
    # kvm_s390_sync_dirty_log: cur_gfn <= last_gfn, by 256: a slot of 256 pages harvests
    # segment 1 too. Its pages are marked at their own gfns (the owner's bitmap, not this
    # slot's), so the slot's harvest shows nothing, and the owner's dirty state is consumed.
    e = make(ref_engine, hugepages=hugepages, npages=2 * SEG)
    e.store([SEG + 4])
    assert common.kvm_s390_sync_dirty_log(e.mm, SEG) == []
    assert e.harvest() == []
    e.store([SEG + 4])
    e.store([4])
    assert common.kvm_s390_sync_dirty_log(e.mm, 2 * SEG) == (
        [*pages_of(0), *pages_of(1)] if hugepages else [4, SEG + 4]
    )


def test_new_mm_refuses_huge_pages_before_4_19_and_unaligned_bases():
    with pytest.raises(KvmShimError, match=r"kernel 3\.16 cannot back .* new in 4\.19"):
        ref.new_mm(SEG, "3.16", hugepages=True)
    with pytest.raises(KvmShimError, match="1 MiB aligned"):
        ref.new_mm(SEG, "4.19", frame_base=0x1234000, hugepages=True)
    mm = ref.new_mm(SEG, "4.19", frame_base=FRAME, hugepages=True)
    assert mm.pte == [] and mm.pmd == [EMPTY] and mm.segment == [EMPTY]
