"""Worked Linux 3.16.0 examples (the seed tree; research kernel-315-316 §2-§5), each run on the
reference and the vectorised engine. FRAME is the frame address of page 0. The 3.15 generation
has its own file, test_s390_linux_3_15.py."""

import pytest

from kvmshim.s390 import bits as b

from .s390_engines import ENGINES

FRAME = 0x1234000
GUEST = 0x80000000
UC, IN = b.PGSTE_UC_BIT, b.PGSTE_IN_BIT


@pytest.fixture(params=ENGINES, ids=lambda e: e.name)
def engine_cls(request):
    return request.param


def make(engine_cls, esop=True, npages=300):
    return engine_cls(npages, esop=esop, frame_base=FRAME, guest_base=GUEST)


def pte(e, page):
    return int(e.arrays()[0][page])


def pgste(e, page):
    return int(e.arrays()[1][page])


def skey(e, page):
    return int(e.arrays()[2][page])


def test_fresh_table_has_invalid_ptes_and_zero_pgstes(engine_cls):
    e = make(engine_cls)
    ptes, pgstes, _ = e.arrays()
    assert len(ptes) == 512  # 300 pages need two 256-entry tables
    assert (ptes == b._PAGE_INVALID).all()
    # Since the seed the PGSTEs start at 0; before it they started at HR|HC.
    assert (pgstes == 0).all()
    assert not (pgstes & (b.PGSTE_HR_BIT | b.PGSTE_HC_BIT)).any()


def test_first_store_faults_in_a_writable_dirty_young_pte_and_sets_uc(engine_cls):
    e = make(engine_cls)
    e.store([5])
    assert pte(e, 5) == FRAME + 5 * 4096 + 0x03D  # PRESENT|YOUNG|DIRTY|READ|WRITE
    assert pgste(e, 5) & UC
    assert skey(e, 5) & (b._PAGE_CHANGED | b._PAGE_REFERENCED) == 0x06
    assert e.faults == {"translation": 1, "protection": 0}


def test_esop_harvest_protects_0x03d_to_0x23d(engine_cls):
    e = make(engine_cls, esop=True)
    e.store([0])
    assert pte(e, 0) & 0xFFF == 0x03D
    assert e.harvest() == [0]
    assert pte(e, 0) & 0xFFF == 0x23D  # SW still WRITE|DIRTY, HW read-only
    assert not pgste(e, 0) & UC
    assert e.harvest() == []


def test_non_esop_harvest_invalidates_instead(engine_cls):
    e = make(engine_cls, esop=False)
    e.store([0])
    assert e.harvest() == [0]
    assert pte(e, 0) & 0xFFF == 0x43D
    assert not pgste(e, 0) & UC


@pytest.mark.parametrize("esop", [True, False])
def test_store_after_harvest_faults_and_is_dirty_again(engine_cls, esop):
    e = make(engine_cls, esop=esop)
    e.store([7])
    e.harvest()
    e.store([7])
    kind = "protection" if esop else "translation"
    assert e.faults[kind] == 1 + (kind == "translation")
    assert pte(e, 7) & 0xFFF == 0x03D
    assert e.harvest() == [7]


@pytest.mark.parametrize("esop", [True, False])
def test_read_only_pte_gets_protect_on_both(engine_cls, esop):
    e = make(engine_cls, esop=esop)
    e.load([3])  # read fault maps PAGE_READ: PRESENT|READ|YOUNG|PROTECT
    assert pte(e, 3) & 0xFFF == 0x215
    assert not pgste(e, 3) & UC  # not writable, so not user dirty
    e.set_key([9], 0x10)  # a key change on an unmapped page sets UC ...
    e.load([9])  # ... and the page is then mapped read-only
    assert pgste(e, 9) & UC and pte(e, 9) & 0xFFF == 0x215
    assert e.harvest() == [9]
    assert pte(e, 9) & 0xFFF == 0x215  # PROTECT (already set), never INVALID
    assert not pte(e, 9) & b._PAGE_INVALID


def test_guest_key_change_sets_uc_and_merges_host_rc(engine_cls):
    e = make(engine_cls)
    e.store([4])  # writable, valid: the key is set without a fault
    e.harvest()
    e.store([4])
    e.set_key([4], 0x30)  # ACC 3: "a change of the page"
    assert pgste(e, 4) & UC
    assert (pgste(e, 4) & b.PGSTE_ACC_BITS) >> 56 == 0x30  # key ACC 3, as (key & 0xf0) << 56
    assert skey(e, 4) == 0x30  # the real key gets ACC/F, its R/C reset ...
    host_rc = b.PGSTE_HC_BIT | b.PGSTE_HR_BIT
    assert pgste(e, 4) & host_rc == host_rc  # ... after being merged into HC/HR


def test_setting_the_same_key_again_is_not_a_change(engine_cls):
    e = make(engine_cls)
    e.set_key([20], 0x30)  # unmapped page: only the PGSTE holds the key
    assert e.harvest() == [20]
    e.set_key([20], 0x30)
    assert not pgste(e, 20) & UC
    assert e.harvest() == []


def test_key_change_after_an_esop_harvest_leaves_the_pte_protected(engine_cls):
    # 3.16.0 set_guest_storage_key (mm/pgtable.c) has no fault-and-retry (3.17.0 added it): the
    # harvested pte stays protected, the real R/C of the earlier store are merged into HC/HR
    # before the SSKE of ACC/F resets them, and the key change alone sets UC.
    e = make(engine_cls, esop=True)
    e.store([4])
    e.harvest()  # 0x23D: protected
    e.set_key([4], 0x30)
    assert pte(e, 4) & 0xFFF == 0x23D  # still protected: no fault was taken
    assert e.faults == {"translation": 1, "protection": 0}
    assert pgste(e, 4) & UC
    host_rc = b.PGSTE_HC_BIT | b.PGSTE_HR_BIT
    assert pgste(e, 4) & host_rc == host_rc
    assert skey(e, 4) == 0x30
    assert e.harvest() == [4]
    e.store([4])  # the next store takes the protection fault and is dirty as usual
    assert e.faults["protection"] == 1 and e.harvest() == [4]


def test_same_key_after_an_esop_harvest_is_not_reported(engine_cls):
    # 3.16.0: no fault first, so nothing but the key-change rule can set UC.
    e = make(engine_cls, esop=True)
    e.set_key([4], 0x30)
    e.store([4])
    e.harvest()
    e.set_key([4], 0x30)
    assert pte(e, 4) & 0xFFF == 0x23D and e.harvest() == []


def test_revalidating_an_aged_pte_does_not_rewrite_the_real_key(engine_cls):
    # 3.16.0 ptep_set_access_flags has no pgste_set_key (3.17.0 added it): a key the guest
    # changed while the pte was old reaches the PGSTE only, not the real key.
    e = make(engine_cls)
    e.set_key([4], 0x30)
    e.load([4])  # set_pte_at → pgste_set_key: real key ACC 3
    assert skey(e, 4) == 0x34  # ACC 3, R from the load
    e.age([4])  # pte old: INVALID
    e.set_key([4], 0x50)  # invalid pte: PGSTE only
    e.load([4])  # present pte → pte_mkyoung → ptep_set_access_flags
    assert skey(e, 4) == 0x34  # 3.17 would have written ACC 5 here
    assert (pgste(e, 4) & b.PGSTE_ACC_BITS) >> 56 == 0x50


def test_dma_store_sets_the_change_bit_but_not_uc(engine_cls):
    e = make(engine_cls)
    e.store([2])
    e.harvest()
    before = e.arrays()
    e.io_store([2, 8])
    ptes, pgstes, keys = e.arrays()
    assert keys[8] & b._PAGE_CHANGED and keys[2] & b._PAGE_CHANGED
    assert (ptes == before[0]).all() and (pgstes == before[1]).all()
    assert e.harvest() == []  # the documented gap


def test_non_esop_load_after_harvest_is_reported_dirty(engine_cls):
    e = make(engine_cls, esop=False)
    e.store([1])
    e.harvest()
    e.load([1])  # INVALID → translation fault → pte_mkyoung → pgste_set_pte forces UC
    assert e.harvest() == [1]


def test_esop_load_after_harvest_is_not_dirty(engine_cls):
    e = make(engine_cls, esop=True)
    e.store([1])
    e.harvest()
    e.load([1])  # valid, PROTECT only: a load does not fault
    assert e.faults["translation"] == 1
    assert e.harvest() == []


def test_ipte_notify_calls_the_notifier_once_with_the_guest_address(engine_cls):
    e = make(engine_cls)
    e.arm_notify([6])
    assert pgste(e, 6) & IN
    assert e.harvest() == [6]  # arming faulted the page in writable: UC
    assert e.notified == [GUEST + 6 * 4096]
    assert not pgste(e, 6) & IN
    e.store([6])
    e.harvest()
    assert e.notified == [GUEST + 6 * 4096]  # once: IN was cleared


def test_aging_makes_the_pte_old_and_leaves_the_pgste_key_fields(engine_cls):
    # 3.16.0 ptep_test_and_clear_young: no pgste_update_all (3.17.0 folds the key there).
    e = make(engine_cls)
    e.store([11])
    assert e.age([11, 12]) == [True]  # page 12 is not mapped, so it is not aged
    assert pte(e, 11) & b._PAGE_INVALID and not pte(e, 11) & b._PAGE_YOUNG
    assert not pgste(e, 11) & (b.PGSTE_GR_BIT | b.PGSTE_GC_BIT)
    assert skey(e, 11) & 0x06 == 0x06  # R/C stay in the real key


def test_set_pte_at_keeps_page_unused():
    # 3.16.0 set_pte_at does not clear _PAGE_UNUSED (that line is from 4.x kernels).
    from kvmshim.s390 import reference as ref

    mm = ref.new_mm(1, "3.16", frame_base=FRAME)
    entry = FRAME + 0x03D + b._PAGE_UNUSED
    ref.linux_3_16.set_pte_at(mm, 0, entry)
    assert mm.pte[0] == entry
