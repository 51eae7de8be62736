"""Attribution: the pages a guest store newly dirtied (the model's per-vCPU dirty ring).

S390Mmu.guest_store returns how many pages went clean → dirty for the next harvest through its
stores (UC under 3.16/4.19, the segment's GMAP_UC with 1 MiB pages, HC or a valid pte's key C
under 3.15). With only guest stores between two harvests, the counts of every "vCPU" add up to
exactly what the second harvest reports. Where they do not, the harvest reports pages no store
newly dirtied, and the tests below pin those differences down instead of hiding them:

* 3.15 before its first harvest: every PGSTE starts with HC set (page_table_alloc_pgste), so
  the first harvest reports every page, and a store then finds its page dirty already (0). That
  harvest leaves the store's key C behind (HC was set, so pgste_update_all did not move it):
  the second harvest reports the page again without a new store.
* the inclusive harvest bound (3.16: one page past the slot; 4.19: the guest segment past it)
  moves a page's report into another slot's harvest: per slot the counts differ, summed over
  the slots they agree.
* a guest key change sets UC (3.16/4.19) or HC (3.15) without any store.
"""

import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmshim.backends.base import WritePath
from kvmshim.backends.softmmu import SoftMmuBackend
from kvmshim.s390.mmu import S390Mmu

from .test_s390_mmu import SLOW_OK

MiB = 1 << 20
NPAGES = 1024  # four page tables, four 1 MiB segments
# (kernel, esop, hugepages): every generation and both ESOP settings; 1 MiB pages on 4.19.
CASES = [
    ("3.15", True, False),
    ("3.15", False, False),
    ("3.16", True, False),
    ("3.16", False, False),
    ("4.19", True, False),
    ("4.19", False, False),
    ("4.19", True, True),
    ("4.19", False, True),
]

pages = st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=40)
batch = st.tuples(st.integers(0, 3), pages)  # (vCPU, the pages of its batch)
rounds = st.lists(st.lists(batch, max_size=8), min_size=1, max_size=5)


def harvest(mmu: S390Mmu) -> int:
    return mmu.harvest(np.zeros(NPAGES // 8, dtype=np.uint8))


@pytest.mark.parametrize(("kernel", "esop", "huge"), CASES)
@settings(max_examples=40, **SLOW_OK)
@given(rounds=rounds)
def test_attributed_counts_add_up_to_the_next_harvest(kernel, esop, huge, rounds):
    mmu = S390Mmu(NPAGES, esop=esop, kernel=kernel, hugepages=huge, harvest_chunk=256)
    harvest(mmu)  # 3.15's PGSTEs start with HC set: the first harvest reports every page
    for stores in rounds:
        per_vcpu = [0, 0, 0, 0]
        for vcpu, batch_pages in stores:
            n = mmu.guest_store(np.array(batch_pages))
            unit = 256 if huge else 1  # a 1 MiB page is reported as its 256 pages
            distinct = np.unique(np.array(batch_pages) // unit).size * unit
            assert 0 <= n <= distinct  # each page once per batch, even when named twice
            per_vcpu[vcpu] += n
        assert sum(per_vcpu) == harvest(mmu)


@pytest.mark.parametrize(("kernel", "esop", "huge"), CASES)
def test_a_second_store_to_a_dirty_page_dirties_nothing(kernel, esop, huge):
    mmu = S390Mmu(NPAGES, esop=esop, kernel=kernel, hugepages=huge)
    harvest(mmu)
    unit = 256 if huge else 1
    assert mmu.guest_store(np.array([5, 5, 6])) == (unit if huge else 2)
    assert mmu.guest_store(np.array([5, 6])) == 0
    harvest(mmu)
    assert mmu.guest_store(np.array([6])) == unit  # protected (or its key C folded) again


def test_3_15_before_the_first_harvest_reports_pages_no_store_newly_dirtied():
    mmu = S390Mmu(NPAGES, kernel="3.15")
    assert mmu.guest_store(np.array([1, 2, 3])) == 0  # HC is set from the start
    assert harvest(mmu) == NPAGES  # every page: the initial HC
    assert harvest(mmu) == 3  # the key C bits the first harvest left behind
    assert harvest(mmu) == 0  # from here on the counts are exact
    assert mmu.guest_store(np.array([1, 2, 3])) == 3


@pytest.mark.parametrize("kernel", ["3.15", "3.16", "4.19"])
def test_a_key_change_dirties_a_page_without_a_store(kernel):
    mmu = S390Mmu(NPAGES, kernel=kernel)
    harvest(mmu)
    mmu.guest_store(np.array([7]))
    harvest(mmu)
    mmu.set_guest_storage_key(np.array([7]), 0x30)
    assert harvest(mmu) == 1  # attributed to no store: set_guest_storage_key set UC/HC


@pytest.mark.parametrize(("kernel", "huge"), [("3.16", False), ("4.19", False), ("4.19", True)])
def test_the_inclusive_bound_moves_reports_between_slots_but_not_the_total(kernel, huge):
    with tempfile.TemporaryDirectory() as d:
        vm = SoftMmuBackend("t", d, kernel=kernel, hugepages=huge)
        try:
            vm.set_user_memory_region(0, LOG, 0, 2 * MiB)  # gfn [0, 512), adjacent RAM
            vm.set_user_memory_region(1, LOG, 2 * MiB, 2 * MiB)  # gfn [512, 1024)
            for slot in (0, 1):
                vm.get_dirty_log(slot)
            rng = np.random.default_rng(5)
            for _ in range(6):
                n = vm.write_pages(rng.integers(0, 1024, 300), 1, WritePath.GUEST)
                n += vm.write_pages(np.array([511, 512, 513, 767, 768]), 1, WritePath.GUEST)
                reported = sum(vm.get_dirty_log(slot).bitmap.count() for slot in (0, 1))
                reported += sum(vm.get_dirty_log(slot).bitmap.count() for slot in (0, 1))
                assert n == reported
        finally:
            vm.close()


def test_write_pages_counts_only_guest_stores(tmp_path):
    vm = SoftMmuBackend("t", str(tmp_path))
    try:
        vm.set_user_memory_region(0, LOG, 0, 4 * MiB)
        vm.get_dirty_log(0)
        assert vm.write_pages(np.array([1, 2]), 1, WritePath.DMA) == 0  # no UC: the seed's gap
        assert vm.write_pages(np.array([3]), 1, WritePath.KERNEL) == 0
        assert vm.write_pages(np.array([1, 2, 3, 3]), 1, WritePath.GUEST) == 3
        assert vm.write_pages(np.array([1, 2, 3]), 1, WritePath.GUEST) == 0
        assert vm.has_dirty_ring
    finally:
        vm.close()
