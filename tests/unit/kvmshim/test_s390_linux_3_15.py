"""Worked Linux 3.15.5 examples: the code the seed removed (research kernel-315-316 §2-§3),
driven by 3.16's harvest loop, each run on the reference and the vectorised engine.

The user-dirty state is PGSTE_HC, filled from the real storage key's change bit by
pgste_update_all whenever the harvest finds the pte valid: stores the hardware saw count,
whatever path they took."""

import pytest

from kvmshim.s390 import bits as b

from .s390_engines import ENGINES

FRAME = 0x1234000
GUEST = 0x80000000
HC, HR = b.PGSTE_HC_BIT, b.PGSTE_HR_BIT
IN = b.PGSTE_IN_BIT_315


@pytest.fixture(params=ENGINES, ids=lambda e: e.name)
def engine_cls(request):
    return request.param


def make(engine_cls, esop=True, npages=300):
    return engine_cls(npages, esop=esop, frame_base=FRAME, guest_base=GUEST, kernel="3.15")


def pte(e, page):
    return int(e.arrays()[0][page])


def pgste(e, page):
    return int(e.arrays()[1][page])


def skey(e, page):
    return int(e.arrays()[2][page])


def clean(engine_cls, esop=True):
    """A VM whose allocation-time HC bits have been harvested once."""
    e = make(engine_cls, esop)
    assert e.harvest() == list(range(300))
    return e


def test_new_tables_start_host_dirty_and_the_first_harvest_reports_every_page(engine_cls):
    # 3.15.5 page_table_alloc_pgste: clear_table(..., PGSTE_HR_BIT | PGSTE_HC_BIT, ...)
    e = make(engine_cls)
    assert (e.arrays()[1] == HR | HC).all()
    assert e.harvest() == list(range(300))
    assert e.harvest() == []


@pytest.mark.parametrize("esop", [True, False])
def test_store_is_reported_through_the_key_and_the_pte_stays_writable(engine_cls, esop):
    # 3.15.5 ptep_test_and_clear_user_dirty: pgste_update_all, test-and-clear HC, pte untouched.
    e = clean(engine_cls, esop)
    e.store([5])
    assert pte(e, 5) & 0xFFF == 0x03D
    assert not pgste(e, 5) & b.PGSTE_UC_BIT  # no UC in 3.15 (that bit is IN)
    assert skey(e, 5) == 0x06  # pgste_set_key wrote R = C = 0; the store set them
    assert e.harvest() == [5]
    assert skey(e, 5) == 0 and pgste(e, 5) & HR  # C/R moved into HC/HR, then HC cleared
    assert pte(e, 5) & 0xFFF == 0x03D  # not protected: the next store does not fault
    e.store([5])
    assert e.faults == {"translation": 1, "protection": 0}
    assert e.harvest() == [5]


def test_a_load_is_not_dirty_on_either_machine(engine_cls):
    e = clean(engine_cls, esop=False)
    e.store([1])
    e.harvest()
    e.load([1])
    assert e.harvest() == []


def test_a_store_while_hc_is_still_set_is_reported_twice(engine_cls):
    # pgste_update_all moves C only if HC is clear: with the allocation's HC still set the
    # first harvest reports the page and leaves C in the key, so the next one reports it again.
    e = make(engine_cls)
    e.store([3])
    assert 3 in e.harvest() and skey(e, 3) & b._PAGE_CHANGED
    assert e.harvest() == [3]
    assert e.harvest() == []


def test_dma_store_to_a_mapped_page_is_reported(engine_cls):
    # The hardware sets the key's C bit for any store, the harvest moves it into HC.
    e = clean(engine_cls)
    e.store([2])
    e.harvest()
    e.io_store([2])
    assert e.harvest() == [2]


def test_dma_store_to_an_unmapped_page_is_lost(engine_cls):
    # pgste_update_all does nothing for an invalid pte, so the C bit waits in the key; the
    # fault that maps the page runs pgste_set_key, which writes R = C = 0 (3.15.5).
    e = clean(engine_cls)
    e.io_store([8])
    assert skey(e, 8) & b._PAGE_CHANGED
    assert e.harvest() == []  # pte invalid: not seen
    e.load([8])  # set_pte_at → pgste_set_key: the key's C is gone
    assert skey(e, 8) == b._PAGE_REFERENCED
    assert e.harvest() == []  # never reported


def test_dma_store_to_an_aged_page_is_reported_once_the_pte_is_valid_again(engine_cls):
    # Aging sets INVALID; revalidation goes through ptep_set_access_flags, which (3.15.5 as
    # 3.16.0) has no pgste_set_key, so the key keeps C until the next harvest sees it.
    e = clean(engine_cls)
    e.store([9])
    e.harvest()
    e.age([9])
    e.io_store([9])
    assert e.harvest() == []
    e.load([9])
    assert e.harvest() == [9]


def test_guest_key_change_sets_hc(engine_cls):
    # 3.15.5 set_guest_storage_key: "a change of the page" sets PGSTE_HC_BIT.
    e = clean(engine_cls)
    e.set_key([20], 0x30)
    assert pgste(e, 20) & HC
    assert e.harvest() == [20]
    e.set_key([20], 0x30)
    assert e.harvest() == []


def test_ipte_notify_uses_the_3_15_bit_and_the_harvest_does_not_fire_it(engine_cls):
    e = clean(engine_cls)
    e.arm_notify([6])
    assert pgste(e, 6) & IN
    # Arming faulted the page in for write, but nothing stored: no C, not dirty (3.16's
    # pgste_set_pte sets UC here).
    assert e.harvest() == []
    e.store([6])
    assert e.harvest() == [6]
    assert e.notified == []  # no IPTE: 3.15's harvest leaves the pte alone
    e.age([6])
    assert e.notified == [GUEST + 6 * 4096] and not pgste(e, 6) & IN
