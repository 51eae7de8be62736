"""The vectorised MMU equals the per-page reference, for every kernel generation: hypothesis
drives random operation sequences through both, for ESOP and non-ESOP machines, and after every
step the pte, PGSTE and storage-key arrays, the harvest bitmaps, the aging results, the IPTE
notifications and the fault counts must be identical.

Example budgets are per generation (``EXAMPLES``), so adding one keeps the suite's time known:
about 5 s per generation on the 2-core test VM."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmshim.s390 import bits as b
from kvmshim.s390 import mmu as mmu_mod
from kvmshim.s390 import reference as ref
from kvmshim.s390.generations import GENERATIONS, KERNELS
from kvmshim.s390.mmu import S390Mmu

from .s390_engines import RefEngine, VecEngine

# Examples per generation: operation sequences, pgste_set_pte states, harvested states.
EXAMPLES = {"3.15": (300, 150, 150), "3.16": (300, 150, 150), "4.19": (300, 150, 150)}
assert set(EXAMPLES) == set(KERNELS)

# "reach" is the single-page harvest another slot's inclusive loop bound does.
OPS = ["store", "load", "io", "key", "notify", "age", "harvest", "reach"]


@st.composite
def scenarios(draw):
    npages = draw(st.integers(1, 300))
    esop = draw(st.booleans())
    chunk = draw(st.sampled_from([64, 128, 65536]))
    # Skew page choice towards a few hot pages so that pages see many transitions.
    page = st.one_of(st.integers(0, min(npages - 1, 7)), st.integers(0, npages - 1))
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(OPS),
                st.lists(page, max_size=60),
                st.integers(0, 255),
            ),
            max_size=30,
        )
    )
    return npages, esop, chunk, steps


def apply(engine, op, pages, key):
    if op == "store":
        return engine.store(pages)
    if op == "load":
        return engine.load(pages)
    if op == "io":
        return engine.io_store(pages)
    if op == "key":
        return engine.set_key(pages, key)
    if op == "notify":
        return engine.arm_notify(pages)
    if op == "age":
        return engine.age(pages)
    if op == "reach":
        return engine.harvest_pages(pages)
    return engine.harvest()


SLOW_OK = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
by_kernel = pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"linux-{k}")


@by_kernel
def test_vectorised_mmu_equals_reference(kernel):
    @settings(max_examples=EXAMPLES[kernel][0], **SLOW_OK)
    @given(scenarios())
    def run(scenario):
        check_sequence(kernel, scenario)

    run()


def check_sequence(kernel, scenario):
    npages, esop, chunk, steps = scenario
    ref = RefEngine(npages, esop, frame_base=0x40000000, guest_base=0x10000, kernel=kernel)
    vec = VecEngine(
        npages, esop, frame_base=0x40000000, guest_base=0x10000, kernel=kernel, harvest_chunk=chunk
    )
    for i, (op, pages, key) in enumerate(steps):
        expected = apply(ref, op, pages, key)
        got = apply(vec, op, pages, key)
        where = f"linux {kernel} step {i}: {op} {pages} key={key:#x} esop={esop}"
        assert got == expected, where
        for name, want, have in zip(
            ("pte", "pgste", "skey"), ref.arrays(), vec.arrays(), strict=True
        ):
            diff = np.flatnonzero(want != have)
            assert diff.size == 0, (
                f"{where}: {name} differs at {diff[:5]}: {want[diff[:5]]} vs {have[diff[:5]]}"
            )
        assert sorted(vec.notified) == sorted(ref.notified), where
        assert vec.faults == ref.faults, where


@st.composite
def huge_scenarios(draw):
    nseg = draw(st.integers(1, 3))
    npages = nseg * b.PAGES_PER_SEGMENT
    page = st.integers(0, npages - 1)
    steps = draw(
        st.lists(
            st.tuples(st.sampled_from(OPS), st.lists(page, max_size=20), st.integers(0, 255)),
            max_size=30,
        )
    )
    return npages, draw(st.booleans()), steps


@settings(max_examples=200, **SLOW_OK)
@given(huge_scenarios())
def test_vectorised_mmu_equals_reference_on_1_mib_pages(scenario):
    """4.19 with KVM_CAP_S390_HPAGE_1M: keys, segment entries (the frame origin aside: the
    engine keeps none), harvests, notifications and faults agree after every step."""
    npages, esop, steps = scenario
    base = dict(frame_base=0x40000000, guest_base=0x100000, kernel="4.19", hugepages=True)
    ref = RefEngine(npages, esop, **base)
    vec = VecEngine(npages, esop, **base)
    for i, (op, pages, key) in enumerate(steps):
        where = f"1 MiB pages step {i}: {op} {pages} key={key:#x} esop={esop}"
        assert apply(vec, op, pages, key) == apply(ref, op, pages, key), where
        assert (ref.arrays()[2] == vec.arrays()[2]).all(), where
        origin_free = ref.segments() & np.uint64(0xFFFFF)
        assert (origin_free == vec.segments()).all(), (where, origin_free, vec.segments())
        assert sorted(vec.notified) == sorted(ref.notified), where
        assert vec.faults == ref.faults, where


def test_harvest_of_a_dense_and_a_sparse_chunk_in_one_pass():
    # [0, 64): every page dirty (dense path) / [64, 128): one page dirty (sparse path)
    mmu = S390Mmu(128, harvest_chunk=64)
    mmu.guest_store(np.r_[np.arange(64), 100])
    out = np.zeros(16, np.uint8)
    assert mmu.harvest(out) == 65
    assert np.flatnonzero(np.unpackbits(out, bitorder="little")).tolist() == [*range(64), 100]
    assert mmu.harvest(out) == 0 and not out.any()


# --- state-level differential: arbitrary pte/PGSTE states, not only reachable ones -------------
# The operations above only build ptes that are already dirty when writable (the modelled VMA
# maps PAGE_READ and write faults mkdirty), so these tests also feed the primitives states such
# as a clean writable pte (PAGE_WRITE mappings, mprotect), where the non-ESOP rule matters, and
# any storage key (3.15's harvest reads it).
PTE_LOW_BITS = [0x400, 0x03D, 0x23D, 0x43D, 0x215, 0x235, 0x439, 0x611, 0x031, 0x001, 0x6B5]
PGSTE_BITS = [
    b.PGSTE_UC_BIT,  # = 3.15's PGSTE_IN_BIT_315
    b.PGSTE_IN_BIT,
    b.PGSTE_GR_BIT,
    b.PGSTE_GC_BIT,
    b.PGSTE_HC_BIT,
    b.PGSTE_HR_BIT,
    b.PGSTE_ACC_BITS & 0x5000000000000000,
    b._PGSTE_GPS_ZERO,
]


@st.composite
def states(draw, max_pages=200):
    n = draw(st.integers(1, max_pages))
    low = draw(st.lists(st.sampled_from(PTE_LOW_BITS), min_size=n, max_size=n))
    pg = draw(st.lists(st.lists(st.sampled_from(PGSTE_BITS), max_size=4), min_size=n, max_size=n))
    frames = [0x40000000 + i * 4096 for i in range(n)]
    ptes = [lo if lo == 0x400 else f + lo for f, lo in zip(frames, low, strict=True)]
    pgstes = [sum(set(bits)) for bits in pg]
    keys = draw(st.lists(st.integers(0, 127).map(lambda k: k * 2), min_size=n, max_size=n))
    return ptes, pgstes, keys


@by_kernel
def test_pgste_set_pte_array_form_equals_reference(kernel):
    pgtable = ref.PGTABLE[kernel]

    @settings(max_examples=EXAMPLES[kernel][1], **SLOW_OK)
    @given(states(), st.booleans())
    def run(state, esop):
        ptes, pgstes, _ = state
        mm = ref.new_mm(len(ptes), kernel, esop, frame_base=0x40000000)
        expected = []
        for i, (entry, pg) in enumerate(zip(ptes, pgstes, strict=True)):
            if kernel == "3.15":  # void pgste_set_pte(pte_t *ptep, pte_t entry)
                pgtable.pgste_set_pte(mm, i, entry, esop)
            else:  # pgste_t pgste_set_pte(pte_t *ptep, pgste_t pgste, pte_t entry)
                pg = pgtable.pgste_set_pte(mm, i, pg, entry, esop)
            expected.append((pg, mm.pte[i]))
        got_pg, got_pte = mmu_mod.pgste_set_pte(
            np.array(pgstes, np.uint64), np.array(ptes, np.uint64), esop, GENERATIONS[kernel]
        )
        assert list(zip(got_pg.tolist(), got_pte.tolist(), strict=True)) == expected

    run()


@by_kernel
def test_harvest_of_arbitrary_states_equals_reference(kernel):
    @settings(max_examples=EXAMPLES[kernel][2], **SLOW_OK)
    @given(states(), st.booleans(), st.sampled_from([64, 128]))
    def run(state, esop, chunk):
        check_harvest_of_state(kernel, state, esop, chunk)

    run()


def check_harvest_of_state(kernel, state, esop, chunk):
    ptes, pgstes, keys = state
    n = len(ptes)
    rm = ref.new_mm(n, kernel, esop, frame_base=0x40000000, guest_base=0x2000)
    rm.pte[:n], rm.pgste[:n], rm.skey[:n] = list(ptes), list(pgstes), list(keys)
    ref_notified: list[int] = []
    rm.notifiers.append(ref_notified.append)
    vm = S390Mmu(
        n, esop=esop, frame_base=0x40000000, guest_base=0x2000, harvest_chunk=chunk, kernel=kernel
    )
    vm.pte[:n], vm.pgste[:n], vm.skey[:n] = ptes, pgstes, keys
    if rm.segment:  # 4.19 harvests through the gmap: link every segment, as accesses would
        rm.segment[:] = [b._SEGMENT_ENTRY] * len(rm.segment)
        vm.linked[:] = True
        vm._unlinked = 0
    vec_notified: list[int] = []
    vm.notifiers.append(lambda g: vec_notified.extend(g.tolist()))

    expected = ref.common.kvm_s390_sync_dirty_log(rm, n)
    out = np.zeros(-(-n // 64) * 8, np.uint8)
    vm.harvest(out)
    assert np.flatnonzero(np.unpackbits(out, bitorder="little")).tolist() == expected
    assert vm.pte.tolist() == rm.pte and vm.pgste.tolist() == rm.pgste
    assert vm.skey.tolist() == rm.skey
    assert vec_notified == ref_notified
