"""Reading storage keys (KVM_S390_GET_SKEYS): the vectorised get_guest_storage_key equals the
per-page reference for every generation that has one, reading changes nothing, and the softmmu
backend applies the ioctl's rules (EINVAL, EFAULT) across memslots.

Example budgets are per generation, as in test_s390_mmu.py: about 1 s each on the test VM."""

import errno

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmshim import abi
from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmshim.backends import create_backend
from kvmshim.backends.base import WritePath
from kvmshim.backends.softmmu import SoftMmuBackend
from kvmshim.errors import KvmError
from kvmshim.s390 import bits as b
from kvmshim.s390 import reference as ref
from kvmshim.s390.generations import GENERATIONS
from kvmshim.s390.mmu import S390Mmu

from .s390_engines import RefEngine, VecEngine

MiB = 1 << 20
EXAMPLES = 150
# The generations with a per-page oracle (a new one joins when its module does), and 1 MiB
# pages where the generation has them.
ORACLES = list(ref.PGTABLE)
MODELS = [(k, False) for k in ORACLES] + [(k, True) for k in ORACLES if GENERATIONS[k].hugepages]
OPS = ["store", "load", "io", "key", "notify", "age", "harvest"]
SLOW_OK = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
by_kernel = pytest.mark.parametrize("kernel", ORACLES, ids=lambda k: f"linux-{k}")
by_model = pytest.mark.parametrize(
    ("kernel", "hugepages"), MODELS, ids=[f"linux-{k}" + ("-1m" if h else "") for k, h in MODELS]
)


def reference_key(mm, page: int) -> int:
    """The generation's own get_guest_storage_key (4.19 has the pmd level), else common's."""
    read = getattr(mm.pgtable, "get_guest_storage_key", ref.common.get_guest_storage_key)
    key: int = read(mm, page)
    return key


@st.composite
def histories(draw, hugepages=False):
    """Random operations on a few pages; with 1 MiB pages, on whole segments (as memslots are)."""
    npages = (
        draw(st.integers(1, 3)) * b.PAGES_PER_SEGMENT if hugepages else draw(st.integers(1, 300))
    )
    page = st.one_of(st.integers(0, min(npages - 1, 7)), st.integers(0, npages - 1))
    steps = draw(
        st.lists(
            st.tuples(st.sampled_from(OPS), st.lists(page, max_size=40), st.integers(0, 255)),
            max_size=20,
        )
    )
    return npages, draw(st.booleans()), steps


def run(engine, op, pages, key):
    if op == "key":
        engine.set_key(pages, key)
    elif op == "harvest":
        engine.harvest()
    elif op == "age":
        engine.age(pages)
    else:
        {"store": engine.store, "load": engine.load, "io": engine.io_store}.get(
            op, engine.arm_notify
        )(pages)


@by_model
def test_vectorised_key_read_equals_reference_and_changes_nothing(kernel, hugepages):
    """After any history of accesses, key changes, aging and harvests, every page's key reads
    the same from both engines, and neither engine's arrays move (no UC, no R bit)."""

    @settings(max_examples=EXAMPLES, **SLOW_OK)
    @given(histories(hugepages))
    def check(history):
        npages, esop, steps = history
        where = {"frame_base": 0x40000000, "kernel": kernel, "hugepages": hugepages}
        rm, vm = RefEngine(npages, esop, **where), VecEngine(npages, esop, **where)
        for op, pages, key in steps:
            run(rm, op, pages, key)
            run(vm, op, pages, key)
        before = rm.arrays()
        expected = [reference_key(rm.mm, p) for p in range(npages)]
        got = vm.mmu.get_guest_storage_key(np.arange(npages))
        assert got.dtype == np.uint8 and got.tolist() == expected
        for want, have, after in zip(before, vm.arrays(), rm.arrays(), strict=True):
            assert np.array_equal(want, have) and np.array_equal(want, after)

    check()


PTE_LOW_BITS = [0x400, 0x03D, 0x23D, 0x43D, 0x215, 0x611, 0x001]
PGSTE_KEY_BITS = [
    b.PGSTE_ACC_BITS & 0x5000000000000000,
    b.PGSTE_FP_BIT,
    b.PGSTE_GR_BIT,
    b.PGSTE_GC_BIT,
    b.PGSTE_HR_BIT,
    b.PGSTE_HC_BIT,
    b.PGSTE_UC_BIT,
]


@by_kernel
def test_key_read_of_arbitrary_states_equals_reference(kernel):
    """States the operations may never build: any real key under a valid pte, any guest
    fields in the PGSTE under an invalid one."""

    @settings(max_examples=EXAMPLES, **SLOW_OK)
    @given(st.data())
    def check(data):
        n = data.draw(st.integers(1, 200))
        low = data.draw(st.lists(st.sampled_from(PTE_LOW_BITS), min_size=n, max_size=n))
        bits = st.lists(st.sampled_from(PGSTE_KEY_BITS), max_size=4)
        pgstes = [sum(set(x)) for x in data.draw(st.lists(bits, min_size=n, max_size=n))]
        keys = data.draw(st.lists(st.integers(0, 127).map(lambda k: k * 2), min_size=n, max_size=n))
        ptes = [lo if lo == 0x400 else 0x40000000 + i * 4096 + lo for i, lo in enumerate(low)]
        rm = ref.new_mm(n, kernel, frame_base=0x40000000)
        rm.pte[:n], rm.pgste[:n], rm.skey[:n] = ptes, pgstes, keys
        mmu = S390Mmu(n, frame_base=0x40000000, kernel=kernel)
        mmu.pte[:n], mmu.pgste[:n], mmu.skey[:n] = ptes, pgstes, keys
        expected = [reference_key(rm, p) for p in range(n)]
        assert mmu.get_guest_storage_key(np.arange(n)).tolist() == expected

    check()


def test_guest_view_of_a_key_in_each_pte_state():
    """[0]: never mapped, key set by the guest: ACC/F and R/C from the PGSTE (0x36)
    [1]: stored to, then the guest set 0x30: the real key 0x30 (SSKE clears the real R/C,
         which go to HR/HC) with the guest's R/C (none) = 0x30; a store after it adds R|C
    [2]: DMA only: the real key has R|C, but the pte is invalid, so the guest sees 0"""
    mmu = S390Mmu(3)
    mmu.set_guest_storage_key(np.array([0]), 0x36)
    mmu.guest_store(np.array([1]))
    mmu.set_guest_storage_key(np.array([1]), 0x30)
    mmu.io_store(np.array([2]))
    assert mmu.get_guest_storage_key(np.arange(3)).tolist() == [0x36, 0x30, 0x00]
    mmu.guest_store(np.array([1]))
    assert mmu.get_guest_storage_key(np.array([1])).tolist() == [0x30 | 0x06]


def test_a_1mib_page_reads_its_frames_real_key_once_the_host_maps_it():
    """4.19's large-pmd case: no PGSTE, the 4 KiB frame's own key, whole; a segment the host
    never mapped reads 0 ("Not yet mapped memory has a zero key"), whatever DMA left there."""
    mmu = S390Mmu(768, kernel="4.19", hugepages=True)
    mmu.set_guest_storage_key(np.array([3, 300]), 0x5A)  # faults segments 0 and 1 in
    mmu.guest_store(np.array([4]))
    mmu.io_store(np.array([600]))  # segment 2: never mapped by the host
    segments = mmu.segment.copy()
    got = mmu.get_guest_storage_key(np.array([3, 4, 5, 300, 600]))
    assert got.tolist() == [0x5A, 0x06, 0x00, 0x5A, 0x00]
    assert np.array_equal(mmu.segment, segments)  # the store's GMAP_UC is still there


# --- the backend: KVM_S390_GET_SKEYS across memslots --------------------------------------------
@pytest.fixture
def vm(tmp_path):
    backend = SoftMmuBackend("k", str(tmp_path))
    backend.set_user_memory_region(0, LOG, 0, 4 * MiB)  # gfn [0, 1024)
    backend.set_user_memory_region(1, LOG, 4 * MiB, 2 * MiB)  # gfn [1024, 1536), adjacent
    backend.set_user_memory_region(2, LOG, 16 * MiB, MiB)  # gfn [4096, 4352), after a gap
    yield backend
    backend.close()


def test_keys_of_a_range_across_adjacent_slots_in_frame_order(vm):
    vm.set_storage_key(1023 * 4096, 0x10)
    vm.set_storage_key(1024 * 4096, 0x20)
    vm.set_storage_key(1025 * 4096, 0x30)
    keys = vm.get_storage_keys(1022, 4)
    assert keys is not None and keys.tolist() == [0x00, 0x10, 0x20, 0x30]
    assert vm.capabilities()["s390-skeys"] == 1


def test_reading_keys_dirties_nothing(vm):
    vm.write_pages(np.arange(0, 1024, 7), 1, WritePath.GUEST)
    vm.set_storage_key(5 * 4096, 0x40)
    vm.get_dirty_log(0)  # everything harvested, ptes protected
    vm.get_storage_keys(0, 1024)
    assert vm.get_dirty_log(0).bitmap.count() == 0


@pytest.mark.parametrize(
    ("start", "count", "code"),
    [
        (1500, 100, errno.EFAULT),  # [1500, 1600): past slot 1 into the gap
        (5000, 1, errno.EFAULT),  # after every slot
        (0, 0, errno.EINVAL),
        (0, abi.KVM_S390_SKEYS_MAX + 1, errno.EINVAL),
    ],
    ids=["gap", "beyond", "zero", "over-max"],
)
def test_the_ioctls_rules_with_its_errno(vm, start, count, code):
    with pytest.raises(KvmError) as caught:
        vm.get_storage_keys(start, count)
    assert caught.value.errno == code


def test_keys_of_1mib_pages_through_the_backend(tmp_path):
    """4.19 with 1 MiB pages, read by range: a key set by the guest, and 0 in a segment the
    host never mapped."""
    backend = create_backend("softmmu", "huge", str(tmp_path), kernel="4.19", hugepages=True)
    try:
        backend.set_user_memory_region(0, LOG, 0, 2 * MiB)  # gfn [0, 512): two segments
        backend.set_storage_key(3 * 4096, 0x5A)
        backend.write(300 * 4096, b"x", WritePath.DMA)  # segment 1: no host pmd yet
        keys = backend.get_storage_keys(2, 299)
        assert keys is not None and keys[[0, 1, 2, 298]].tolist() == [0, 0x5A, 0, 0]
    finally:
        backend.close()


def test_the_largest_read_is_kvm_s390_skeys_max_keys(tmp_path):
    backend = create_backend("softmmu", "big", str(tmp_path))
    try:
        backend.set_user_memory_region(0, LOG, 0, 4 << 30)  # 4 GiB: exactly the maximum
        keys = backend.get_storage_keys(0, abi.KVM_S390_SKEYS_MAX)
        assert keys is not None and keys.size == abi.KVM_S390_SKEYS_MAX and not keys.any()
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("kernel", "hugepages"), [("3.15", False), ("3.16", False), ("4.19", False), ("4.19", True)]
)
def test_keys_restored_into_a_fresh_mmu_read_back_and_dirty_nothing(kernel, hugepages):
    """The daemon's restart: the keys one model had, given to the next, as they were."""
    keys = np.random.default_rng(3).integers(0, 128, 512, dtype=np.uint8) * 2
    keys[256:] = 0  # a segment with no key set stays "not yet mapped" with 1 MiB pages
    mmu = S390Mmu(512, kernel=kernel, hugepages=hugepages)
    out = np.zeros(64, np.uint8)
    mmu.harvest(out)  # 3.15's allocation HC aside
    mmu.restore_guest_storage_keys(keys)
    assert (mmu.get_guest_storage_key(slice(0, 512)) == keys).all()
    assert mmu.harvest(out) == 0
    mmu.guest_store(np.array([3]))  # and the model goes on from there
    assert mmu.harvest(out) == (256 if hugepages else 1)
    if not hugepages:  # a mapped page's key is its frame's: only a fresh MMU takes keys
        with pytest.raises(ValueError, match="fresh"):
            mmu.restore_guest_storage_keys(keys)
