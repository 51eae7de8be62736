"""The simulated s390 VM: guest RAM in a file, stores by path, harvests, workload, pause."""

import errno
import mmap
import os
import stat
import time

import numpy as np
import pytest

from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmshim.backends import create_backend
from kvmshim.backends.base import Pattern, ReadPath, WorkloadSpec, WritePath
from kvmshim.backends.softmmu import SoftMmuBackend
from kvmshim.errors import KvmError, KvmShimError
from kvmshim.s390 import bits as b

MiB = 1 << 20


@pytest.fixture
def vm(tmp_path):
    backend = SoftMmuBackend("t", str(tmp_path), esop=True)
    backend.set_user_memory_region(
        0,
        LOG,
        0,
        4 * MiB,
    )  # gfn [0, 1024)
    backend.set_user_memory_region(1, LOG, 16 * MiB, 2 * MiB)  # gfn [4096, 4608)
    yield backend
    backend.close()


def dirty(vm, slot):
    return vm.get_dirty_log(slot).bitmap.pages().tolist()


def stamps(vm, slot):
    region = vm.ram_region(slot)
    with open(region.path, "rb") as f:
        m = mmap.mmap(f.fileno(), region.size, prot=mmap.PROT_READ, offset=region.offset)
        return np.frombuffer(m, "<u8")[::512].copy()


def test_guest_stores_are_harvested_exactly_once(vm):
    vm.write_pages(np.array([3, 5, 5, 1023, 4096 + 7]), 42, WritePath.GUEST)
    assert dirty(vm, 0) == [3, 5, 1023]
    assert dirty(vm, 1) == [7]
    assert dirty(vm, 0) == [] and dirty(vm, 1) == []


def test_stores_land_in_the_ram_file_a_tool_maps_read_only(vm):
    vm.write_pages(np.array([2, 4096 + 1]), 0x1122334455667788, WritePath.GUEST)
    vm.write(3 * 4096 + 10, b"hello", WritePath.GUEST)
    s0, s1 = stamps(vm, 0), stamps(vm, 1)
    assert s0[2] == 0x1122334455667788 and s1[1] == 0x1122334455667788
    assert vm.read(3 * 4096 + 10, 5, ReadPath.HOST) == b"hello"
    region = vm.ram_region(0)
    assert stat.S_IMODE(os.stat(region.path).st_mode) == 0o640  # not readable by others
    assert region.offset == 0 and vm.ram_region(1).offset == 4 * MiB


def test_dma_store_changes_ram_and_key_but_is_missing_from_the_harvest(vm):
    vm.write_pages(np.array([9]), 1, WritePath.GUEST)
    dirty(vm, 0)
    vm.write_pages(np.array([9, 10]), 77, WritePath.DMA)
    assert stamps(vm, 0)[[9, 10]].tolist() == [77, 77]
    keys = vm._mmus[0].skey  # the real storage keys of the frames
    assert keys[9] & b._PAGE_CHANGED and keys[10] & b._PAGE_CHANGED
    assert dirty(vm, 0) == []  # the documented gap


def test_a_write_spanning_two_slots_is_split_and_logged_in_both(tmp_path):
    vm = SoftMmuBackend("span", str(tmp_path))
    vm.set_user_memory_region(0, LOG, 0, MiB)
    vm.set_user_memory_region(1, LOG, MiB, MiB)  # adjacent
    data = bytes(range(256)) * 40  # 10240 bytes from 1 MiB - 4096
    gfns = vm.write(MiB - 4096, data, WritePath.GUEST)
    assert gfns.tolist() == [255, 256, 257]
    assert vm.read(MiB - 4096, len(data), ReadPath.HOST) == data
    assert dirty(vm, 0) == [255] and dirty(vm, 1) == [0, 1]
    vm.close()


def test_access_outside_every_slot_is_efault_and_changes_nothing(vm):
    with pytest.raises(KvmError) as info:
        vm.write_pages(np.array([1, 2000]), 5, WritePath.GUEST)
    assert info.value.errno == errno.EFAULT
    assert stamps(vm, 0)[1] == 0
    assert dirty(vm, 0) == []


def test_get_dirty_log_errors(vm):
    with pytest.raises(KvmError) as info:
        vm.get_dirty_log(7)
    assert info.value.errno == errno.ENOENT
    vm.set_user_memory_region(1, 0, 16 * MiB, 2 * MiB)  # logging off
    with pytest.raises(KvmError, match="not enabled") as info:
        vm.get_dirty_log(1)
    assert info.value.errno == errno.ENOENT


def test_moved_slot_keeps_its_data_and_pending_dirt(vm):
    vm.write_pages(np.array([4096 + 3]), 9, WritePath.GUEST)
    vm.set_user_memory_region(1, LOG, 32 * MiB, 2 * MiB)
    assert dirty(vm, 1) == [3]
    assert vm.read(32 * MiB + 3 * 4096, 8, ReadPath.HOST) == (9).to_bytes(8, "little")


def test_deleted_slot_is_gone_and_its_memory_released(vm):
    vm.write_pages(np.arange(4096, 4608), 1, WritePath.GUEST)
    vm.set_user_memory_region(1, LOG, 0, 0)
    assert vm.ram_region(1) is None
    with pytest.raises(KvmError):
        vm.write_pages(np.array([4096]), 1, WritePath.GUEST)
    st = os.stat(vm.ram.path)
    assert st.st_blocks * 512 < 4 * MiB + 64 * 1024  # the 2 MiB region was punched out


def test_guest_load_through_the_mmu_returns_the_data(vm):
    vm.write(100, b"xyz", WritePath.DMA)
    assert vm.read(100, 3, ReadPath.GUEST) == b"xyz"
    assert dirty(vm, 0) == []  # ESOP: a load maps read-only, no UC


def test_storage_key_change_is_reported_dirty(vm):
    vm.set_storage_key(5 * 4096, 0x60)
    assert dirty(vm, 0) == [5]


def test_generation_advances_per_harvest(vm):
    first = vm.get_dirty_log(0).generation
    assert vm.get_dirty_log(1).generation == first + 1
    assert vm.generation == first + 2


@pytest.mark.parametrize("pattern", list(Pattern))
def test_workload_stores_stamps_and_pause_stops_it(vm, pattern):
    vm.start_workload(WorkloadSpec(pages_per_second=50_000, vcpus=2, pattern=pattern, seed=3))
    time.sleep(0.2)
    vm.pause()
    written = vm.workload.pages_stored
    assert written > 1000
    before = (stamps(vm, 0).copy(), stamps(vm, 1).copy())
    time.sleep(0.1)
    assert vm.workload.pages_stored == written  # stopped: no store lands while paused
    assert np.array_equal(before[0], stamps(vm, 0)) and np.array_equal(before[1], stamps(vm, 1))
    assert (before[0] != 0).any() or (before[1] != 0).any()
    vm.resume()
    time.sleep(0.05)
    vm.stop_workload()
    assert vm.workload is None


def test_sequential_workload_walks_each_vcpus_share_in_order(tmp_path):
    vm = SoftMmuBackend("seq", str(tmp_path))
    vm.set_user_memory_region(0, LOG, 0, MiB)
    vm.start_workload(WorkloadSpec(pages_per_second=2_000, vcpus=1, pattern=Pattern.SEQUENTIAL))
    time.sleep(0.1)
    vm.pause()
    pages = vm.get_dirty_log(0).bitmap.pages()
    assert pages.size and pages.tolist() == list(range(pages.size))  # a prefix [0, n)
    vm.close()


def test_kvm_selftest_method_with_the_workload_running(tmp_path):
    """kernel-semantics §7.1 on the s390 model (ESOP, stores only), with two vCPU threads.

    Round k: snapshot stamps S_k, then harvest B_k (generation g_k).
      * no loss: a page whose stamp changed between S_{k-1} and S_k is in B_{k-1} or B_k;
      * no false dirt: a page in B_k carries, right after the harvest, a stamp >= g_{k-1}
        (it was stored after harvest k-1 passed it, while the generation was g_{k-1} or g_k).
    """
    vm = SoftMmuBackend("selftest", str(tmp_path), esop=True)
    vm.set_user_memory_region(1, LOG, 0x40000000, 16 * MiB)  # 4096 pages, like the test slot
    vm.start_workload(WorkloadSpec(pages_per_second=100_000, vcpus=2, seed=11))
    try:
        prev_snapshot = stamps(vm, 1)
        prev = vm.get_dirty_log(1)
        checked_dirty = checked_changed = 0
        for _ in range(40):
            time.sleep(0.01)
            snapshot = stamps(vm, 1)
            cur = vm.get_dirty_log(1)
            after = stamps(vm, 1)
            changed = np.flatnonzero(snapshot != prev_snapshot)
            reported = (prev.bitmap | cur.bitmap).pages()
            lost = np.setdiff1d(changed, reported)
            assert lost.size == 0, f"pages written but never reported: {lost[:10]}"
            pages = cur.bitmap.pages()
            stale = pages[after[pages] < prev.generation]
            assert stale.size == 0, f"reported dirty with old stamps: {stale[:10]}"
            checked_changed += changed.size
            checked_dirty += pages.size
            prev_snapshot, prev = snapshot, cur
        assert checked_changed > 10_000 and checked_dirty > 10_000
    finally:
        vm.close()


def test_close_with_a_running_workload_stops_the_vcpus_first(tmp_path, caplog):
    vm = SoftMmuBackend("closing", str(tmp_path))
    vm.set_user_memory_region(0, LOG, 0, 4 * MiB)
    vm.start_workload(WorkloadSpec(pages_per_second=200_000, vcpus=2, seed=1, dma_share=0.5))
    time.sleep(0.1)
    workload = vm.workload
    vm.close()
    assert workload.failure is None and not workload.running
    assert "died" not in caplog.text


def test_a_slot_whose_model_does_not_fit_in_memory_is_enomem_and_changes_nothing(vm, monkeypatch):
    import kvmshim.backends.softmmu as softmmu

    # The machine has 1 MiB available: a 1 GiB slot's arrays (262144 pages of 17 B) do not fit.
    monkeypatch.setattr(softmmu, "memory_available", lambda: 1 << 20)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(2, LOG, 1 << 30, 1 << 30)
    assert info.value.errno == errno.ENOMEM
    assert "262144 pages needs 4.2 MiB; 1.0 MiB is available (ENOMEM)" in str(info.value)
    assert vm.memslots.get(2) is None
    vm.set_user_memory_region(2, LOG, 1 << 30, MiB)  # 4352 bytes fit
    assert vm.memslots.get(2).npages == 256


def test_memory_available_reads_the_host():
    from kvmshim.backends.softmmu import memory_available

    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert 0 < memory_available() <= total


# --- the s390 memslot rule (kvm_arch_prepare_memory_region, 3.10.65 through 3.18.30) -----------
@pytest.mark.parametrize("size", [4096, 64 * 4096, MiB + 4096])
def test_a_slot_size_that_is_not_a_1_mib_multiple_is_einval_and_changes_nothing(vm, size):
    with pytest.raises(KvmError, match="1 MiB multiples") as info:
        vm.set_user_memory_region(2, LOG, 64 * MiB, size)
    assert info.value.errno == errno.EINVAL
    assert vm.memslots.get(2) is None and vm.ram.next_offset == 6 * MiB


def test_a_restored_slot_off_a_1_mib_boundary_of_the_ram_file_is_einval(vm):
    with pytest.raises(KvmError, match="1 MiB boundary") as info:
        vm.restore_memslot(2, LOG, 64 * MiB, MiB, 6 * MiB + 4096)
    assert info.value.errno == errno.EINVAL


def test_the_guest_address_needs_only_4_kib_alignment(vm):
    vm.set_user_memory_region(2, LOG, 64 * MiB + 4096, MiB)  # the rule is on host memory
    assert vm.ram_region(2).offset == 6 * MiB


# --- kvm_s390_sync_dirty_log's inclusive bound (3.16.0: cur_gfn <= last_gfn) -----------------
KERNELS = ["3.15", "3.16"]


def settled(tmp_path, kernel, *slots):
    """A VM with the given (guest address) 1 MiB slots, consecutive in the RAM file, and every
    slot harvested once in reverse order, so that 3.15's allocation-time HC bits are gone."""
    vm = SoftMmuBackend(f"bound-{kernel}", str(tmp_path), kernel=kernel)
    for i, gpa in enumerate(slots):
        vm.set_user_memory_region(i, LOG, gpa, MiB)
    for _ in range(2):  # the second round takes what the first marked
        for i in reversed(range(len(slots))):
            vm.get_dirty_log(i)
    return vm


@pytest.mark.parametrize("kernel", KERNELS)
def test_get_of_a_slot_consumes_the_first_page_of_the_slot_after_it_in_host_memory(
    tmp_path, kernel
):
    # A: gpa [0, 1 MiB), host [0, 1 MiB); B: gpa [16 MiB, 17 MiB), host [1 MiB, 2 MiB).
    # GET A also harvests host page 1 MiB (B's page 0) and marks gfn 256, which no slot holds:
    # the kernel loses B's page 0. overreach(A) names it for the caller to mark.
    vm = settled(tmp_path, kernel, 0, 16 * MiB)
    vm.write_pages(np.array([4096]), 7, WritePath.GUEST)
    assert dirty(vm, 0) == []
    assert dirty(vm, 1) == []  # the lost page
    assert vm.overreach(0) == [(1, 0)]
    assert vm.overreach(1) == []  # nothing after B in the RAM file
    vm.close()


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_page_after_a_slot_adjacent_in_both_memories_is_reported_to_its_slot(tmp_path, kernel):
    # B follows A in guest and host memory: gfn 256 is B's page 0, mark_page_dirty puts it in
    # B's dirty bitmap and B's next GET returns it.
    vm = settled(tmp_path, kernel, 0, MiB)
    vm.write_pages(np.array([256]), 7, WritePath.GUEST)
    assert dirty(vm, 0) == []
    assert dirty(vm, 1) == [0]
    assert dirty(vm, 1) == []  # copied out and cleared
    assert vm.overreach(0) == []
    vm.close()


def test_the_mark_lands_in_the_slot_holding_the_gfn_after_the_slot(tmp_path):
    # C holds gfn 256 (gpa 1 MiB) but sits after B in host memory: GET A harvests B's page 0
    # and reports it as C's page 0, a false positive for C and a loss for B.
    vm = settled(tmp_path, "3.16", 0, 16 * MiB, MiB)  # A, B, C
    vm.write_pages(np.array([4096]), 7, WritePath.GUEST)
    assert dirty(vm, 0) == []
    assert dirty(vm, 2) == [0]
    assert dirty(vm, 1) == []
    assert vm.overreach(0) == [(1, 0)]
    vm.close()


def test_a_pending_mark_goes_with_the_dirty_bitmap_when_logging_stops(tmp_path):
    vm = settled(tmp_path, "3.16", 0, MiB)
    vm.write_pages(np.array([256]), 7, WritePath.GUEST)
    dirty(vm, 0)  # marks B's page 0 in B's dirty bitmap
    vm.set_user_memory_region(1, 0, MiB, MiB)  # logging off: the bitmap is freed
    # With B not logging, a mark for B goes nowhere (mark_page_dirty_in_slot), while B's UC is
    # consumed all the same and B keeps no record of it until logging resumes: named.
    assert vm.overreach(0) == [(1, 0)]
    vm.set_user_memory_region(1, LOG, MiB, MiB)
    assert dirty(vm, 1) == []
    assert vm.overreach(0) == []
    vm.close()


# --- kernel generations ---------------------------------------------------------------------
def test_under_3_15_a_dma_store_to_a_mapped_page_is_reported(tmp_path):
    vm = SoftMmuBackend("k315", str(tmp_path), kernel="3.15")
    vm.set_user_memory_region(0, LOG, 0, MiB)
    vm.write_pages(np.array([9]), 1, WritePath.GUEST)  # maps the page
    dirty(vm, 0)
    dirty(vm, 0)
    vm.write_pages(np.array([9]), 77, WritePath.DMA)
    assert dirty(vm, 0) == [9]
    vm.close()


def test_kernel_is_an_option_and_a_capability(tmp_path):
    vm = SoftMmuBackend("k", str(tmp_path))
    assert vm.options() == {"esop": True, "kernel": "3.16", "hugepages": False}
    assert vm.capabilities()["kernel"] == "3.16"
    assert vm.capabilities()["s390-hpage-1m"] == 0  # KVM_CAP_S390_HPAGE_1M is new in 4.19
    vm.close()
    vm = create_backend("softmmu", "k", str(tmp_path), **{"esop": False, "kernel": "3.15"})
    assert vm.options() == {"esop": False, "kernel": "3.15", "hugepages": False}
    vm.close()
    vm = create_backend("softmmu", "k", str(tmp_path), kernel="4.19", hugepages=True)
    assert vm.options() == {"esop": True, "kernel": "4.19", "hugepages": True}
    assert vm.capabilities()["s390-hpage-1m"] == 1 and vm.capabilities()["hugepages"]
    vm.close()


def test_an_unknown_kernel_is_refused_naming_the_choices(tmp_path):
    with pytest.raises(KvmShimError, match=r"unknown kernel '3.14'.*3\.15, 3\.16, 4\.19"):
        create_backend("softmmu", "bad", str(tmp_path), kernel="3.14")
    assert os.listdir(tmp_path) == []  # refused before the RAM file exists


def test_the_kvm_backend_refuses_a_kernel(tmp_path):
    with pytest.raises(KvmShimError, match="softmmu backend only") as info:
        create_backend("kvm", "k", str(tmp_path), kernel="3.16")
    assert type(info.value) is KvmShimError
    assert os.listdir(tmp_path) == []


# --- 4.19: 1 MiB pages and the harvest by segment ---------------------------------------------
@pytest.mark.parametrize(("hugepages", "reported"), [(False, [300]), (True, list(range(256, 512)))])
def test_under_4_19_a_one_page_store_reports_its_page_or_with_huge_pages_its_segment(
    tmp_path, hugepages, reported
):
    vm = SoftMmuBackend("h", str(tmp_path), kernel="4.19", hugepages=hugepages)
    vm.set_user_memory_region(0, LOG, 0, 4 * MiB)
    dirty(vm, 0)  # nothing yet
    vm.write_pages(np.array([300]), 7, WritePath.GUEST)
    assert dirty(vm, 0) == reported
    assert dirty(vm, 0) == []
    vm.write_pages(np.array([300, 301]), 8, WritePath.GUEST)  # protected again: faults
    assert dirty(vm, 0) == (reported if hugepages else [300, 301])
    # 1 MiB pages: one translation fault, then one protection fault, for the whole segment.
    assert sum(vm.stats().faults_by_kind.values()) == (2 if hugepages else 3)
    assert stamps(vm, 0)[300] == 8
    vm.close()


@pytest.mark.parametrize("kernel", ["3.15", "3.16"])
def test_huge_pages_are_refused_before_4_19_and_on_kvm(tmp_path, kernel):
    with pytest.raises(KvmShimError, match=r"1 MiB pages.*4\.19"):
        create_backend("softmmu", "h", str(tmp_path), kernel=kernel, hugepages=True)
    with pytest.raises(KvmShimError, match="softmmu backend only"):
        create_backend("kvm", "h", str(tmp_path), hugepages=True)
    assert os.listdir(tmp_path) == []


def test_under_4_19_a_guest_address_off_1_mib_is_einval(tmp_path):
    vm = SoftMmuBackend("h", str(tmp_path), kernel="4.19")
    with pytest.raises(KvmError, match="1 MiB aligned") as info:
        vm.set_user_memory_region(0, LOG, 4096, MiB)
    assert info.value.errno == errno.EINVAL and vm.memslots.get(0) is None
    vm.close()


@pytest.mark.parametrize("hugepages", [False, True])
def test_under_4_19_the_extra_iteration_takes_the_next_guest_segment_into_its_own_slot(
    tmp_path, hugepages
):
    # A: gpa [0, 1 MiB); B: gpa [1 MiB, 2 MiB), host [1 MiB, 2 MiB). GET A walks the gmap to
    # guest segment 1 and marks gfns 256..511: B's own pages, so B's next GET has them.
    vm = SoftMmuBackend("h", str(tmp_path), kernel="4.19", hugepages=hugepages)
    vm.set_user_memory_region(0, LOG, 0, MiB)
    vm.set_user_memory_region(1, LOG, MiB, MiB)
    vm.write_pages(np.array([256 + 5]), 7, WritePath.GUEST)
    assert dirty(vm, 0) == []
    assert dirty(vm, 1) == ([5] if not hugepages else list(range(256)))
    assert vm.overreach(0) == []
    # B not logging: mark_page_dirty_in_slot drops the marks, and the whole segment is named.
    vm.set_user_memory_region(1, 0, MiB, MiB)
    assert vm.overreach(0) == [(1, p) for p in range(256)]
    vm.close()


def test_under_4_19_a_slot_far_away_in_guest_memory_is_not_reached(tmp_path):
    # The 3.16 loop reached the host page after A (B's page 0); 4.19's reaches guest memory
    # after A, which no slot holds here: B keeps its store.
    vm = SoftMmuBackend("h", str(tmp_path), kernel="4.19")
    vm.set_user_memory_region(0, LOG, 0, MiB)
    vm.set_user_memory_region(1, LOG, 16 * MiB, MiB)
    vm.write_pages(np.array([4096]), 7, WritePath.GUEST)
    assert dirty(vm, 0) == [] and vm.overreach(0) == []
    assert dirty(vm, 1) == [0]
    vm.close()


def test_with_huge_pages_a_key_change_is_not_a_change_of_the_page(tmp_path):
    # 4.19 set_guest_storage_key on a large pmd sets the frame's key and nothing else.
    vm = SoftMmuBackend("h", str(tmp_path), kernel="4.19", hugepages=True)
    vm.set_user_memory_region(0, LOG, 0, MiB)
    vm.write_pages(np.array([3]), 7, WritePath.GUEST)
    dirty(vm, 0)
    vm.set_storage_key(3 * 4096, 0x30)
    assert dirty(vm, 0) == []
    vm.close()
