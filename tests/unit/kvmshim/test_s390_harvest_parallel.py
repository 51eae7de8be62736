"""The parallel harvest and the empty-chunk hint change no answer.

The equivalence tests in test_s390_mmu.py already run every harvest with the hint on and the
pool's default thread count; here the hint is checked against a forced scan after the same
random operations, for every generation and thread count, and stores racing a parallel
harvest are checked to be in that harvest or the next (nothing lost)."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmshim.s390 import harvest_pool
from kvmshim.s390.generations import KERNELS
from kvmshim.s390.mmu import S390Mmu

from .s390_engines import VecEngine
from .test_s390_mmu import OPS, SLOW_OK, apply, by_kernel


@pytest.fixture
def threads():
    """Restore the pool's thread count after a test that changes it."""
    before = harvest_pool.harvest_threads()
    yield harvest_pool.set_harvest_threads
    harvest_pool.set_harvest_threads(before)


@st.composite
def sequences(draw):
    npages = draw(st.integers(1, 700))
    page = st.integers(0, npages - 1)
    op = st.sampled_from([*OPS, "harvest", "harvest"])  # harvests often, some back to back
    steps = draw(
        st.lists(st.tuples(op, st.lists(page, max_size=30), st.integers(0, 255)), max_size=25)
    )
    return npages, draw(st.booleans()), draw(st.sampled_from([64, 192, 256])), steps


@by_kernel
def test_the_empty_chunk_hint_never_hides_a_dirty_page(kernel, threads):
    @settings(max_examples=120, **SLOW_OK)
    @given(sequences(), st.sampled_from([1, 3]))
    def run(scenario, nthreads):
        threads(nthreads)
        npages, esop, chunk, steps = scenario
        hinted, scanned = (
            VecEngine(npages, esop, kernel=kernel, harvest_chunk=chunk) for _ in range(2)
        )
        for i, (op, pages, key) in enumerate(steps):
            if op == "harvest":
                scanned.mmu._maybe_dirty[:] = True  # no hint: every chunk is scanned
            where = f"linux {kernel} step {i}: {op} {pages} key={key:#x} esop={esop}"
            assert apply(hinted, op, pages, key) == apply(scanned, op, pages, key), where
            for have, want in zip(hinted.arrays(), scanned.arrays(), strict=True):
                assert (have == want).all(), where
            assert sorted(hinted.notified) == sorted(scanned.notified), where

    run()


@pytest.mark.parametrize("kernel", ["3.16", "4.19"])
def test_a_second_harvest_with_nothing_between_reads_no_chunk(kernel):
    mmu = S390Mmu(4 * 65536, kernel=kernel, harvest_chunk=65536)
    mmu.guest_store(np.arange(0, 4 * 65536, 97))
    out = np.zeros(4 * 65536 // 8, np.uint8)
    assert mmu.harvest(out) == -(-4 * 65536 // 97)
    assert not mmu._maybe_dirty.any()  # the next harvest answers without a scan
    mmu.guest_store(np.array([65536 + 5]))
    assert mmu._maybe_dirty.tolist() == [False, True, False, False]
    assert mmu.harvest(out) == 1 and out[(65536 + 5) // 8] == 1 << 5


def test_a_3_15_chunk_that_was_dirty_is_scanned_again():
    # 3.15's fold leaves a key's C bit behind when HC was already set: the next harvest finds it.
    mmu = S390Mmu(65536, kernel="3.15")
    mmu.guest_store(np.array([3]))
    out = np.zeros(65536 // 8, np.uint8)
    assert mmu.harvest(out) == 65536  # fresh tables: every PGSTE starts with HC
    assert mmu._maybe_dirty.all()
    assert mmu.harvest(out) == 1  # the store's key C, folded now
    assert mmu.harvest(out) == 0 and not mmu._maybe_dirty.any()


@pytest.mark.parametrize("kernel", KERNELS)
def test_stores_racing_a_parallel_harvest_are_in_it_or_the_next(kernel, threads):
    threads(3)
    npages = 8 * 4096
    mmu = S390Mmu(npages, kernel=kernel, harvest_chunk=4096)
    out = np.zeros(npages // 8, np.uint8)
    mmu.harvest(out)  # 3.15's fresh HC bits out of the way
    rng = np.random.default_rng(16)
    batches = [rng.integers(0, npages, 64) for _ in range(300)]
    stop = threading.Event()
    seen = np.zeros(npages, dtype=bool)

    def harvest_loop():
        while not stop.is_set():
            mmu.harvest(out)
            seen[np.unpackbits(out, bitorder="little").astype(bool)] = True

    harvester = threading.Thread(target=harvest_loop)
    harvester.start()
    for pages in batches:
        mmu.guest_store(pages)
    stop.set()
    harvester.join()
    mmu.harvest(out)
    seen[np.unpackbits(out, bitorder="little").astype(bool)] = True
    stored = np.unique(np.concatenate(batches))
    assert seen[stored].all(), np.setdiff1d(stored, np.flatnonzero(seen))[:10]
