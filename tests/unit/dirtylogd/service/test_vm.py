"""The daemon's side of a VM: consumers, the I/O log, undo, concurrent harvests."""

import errno
import threading
import time

import numpy as np
import pytest

from dirtylogd.service.vm import VmState
from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmshim.backends.base import WorkloadSpec, WritePath
from kvmshim.backends.softmmu import SoftMmuBackend
from kvmshim.errors import KvmError

MiB = 1 << 20


@pytest.fixture
def vm(tmp_path):
    backend = SoftMmuBackend("v", str(tmp_path))
    state = VmState("v", backend)
    backend.io_reporter = state.io_mark_gfns
    state.apply_memslot_change(backend.set_user_memory_region(0, LOG, 0, MiB))
    yield state
    backend.close()


def test_undo_does_not_cross_a_logging_restart(vm):
    vm.backend.write_pages(np.array([1]), 1, WritePath.GUEST)
    taken = vm.harvest(0, "default")
    vm.apply_memslot_change(vm.backend.set_user_memory_region(0, 0, 0, MiB))  # logging off
    vm.apply_memslot_change(vm.backend.set_user_memory_region(0, LOG, 0, MiB))  # and on again
    vm.put_back(taken)  # belongs to the old bitmap: dropped, as KVM frees it
    assert vm.consumers["default"].pending[0].count() == 0


def test_put_back_returns_exactly_the_taken_bits(vm):
    vm.backend.write_pages(np.array([3, 4]), 1, WritePath.GUEST)
    taken = vm.harvest(0, "default")
    vm.backend.write_pages(np.array([9]), 2, WritePath.GUEST)
    vm.put_back(taken)
    assert vm.harvest(0, "default").bitmap.pages().tolist() == [3, 4, 9]


def test_new_consumer_gets_all_ones_only_if_initially_set(vm):
    vm.add_consumer("a", manual_protect=False, initially_set=True)
    vm.add_consumer("b", manual_protect=False, initially_set=False)
    assert vm.harvest(0, "a").bitmap.count() == 256
    assert vm.harvest(0, "b").bitmap.count() == 0


def test_io_marks_outside_the_slots_are_efault_and_mark_nothing(vm):
    with pytest.raises(KvmError) as info:
        vm.io_mark_ranges([(0, 4096), (MiB - 4096, 8192)])
    assert info.value.errno == errno.EFAULT
    assert vm.slots[0].io_log.count() == 0


def test_clear_checks_the_kernel_rules_then_the_bitmap(vm):
    vm.add_consumer("mp", manual_protect=True, initially_set=True)
    with pytest.raises(KvmError) as info:
        vm.clear(0, "mp", 0, 64, b"\xff" * 16)
    assert info.value.errno == errno.EINVAL
    vm.clear(0, "mp", 192, 64, b"\xff" * 8)
    assert vm.harvest(0, "mp").bitmap.count() == 192


def test_concurrent_consumers_io_and_workload_lose_nothing(vm):
    """Two consumers harvest in parallel threads while vCPUs store and I/O is reported.

    Afterwards (VM paused, a final harvest each) every page whose stamp changed must have been
    delivered to *both* consumers — the selftest method, per consumer.
    """
    vm.add_consumer("a", manual_protect=False, initially_set=False)
    vm.add_consumer("b", manual_protect=False, initially_set=False)
    words = vm.backend._regions[0].words
    before = words[::512].copy()
    vm.backend.start_workload(
        WorkloadSpec(pages_per_second=50_000, vcpus=2, seed=5, dma_share=0.2, dma_report=True)
    )
    got = {"a": set(), "b": set()}
    stop = threading.Event()

    def harvester(name):
        while not stop.is_set():
            got[name].update(vm.harvest(0, name).bitmap.pages().tolist())

    threads = [threading.Thread(target=harvester, args=(n,)) for n in got]
    for t in threads:
        t.start()
    time.sleep(0.5)
    vm.backend.pause()
    stop.set()
    for t in threads:
        t.join()
    for name in got:
        got[name].update(vm.harvest(0, name).bitmap.pages().tolist())
    changed = set(np.flatnonzero(words[::512] != before).tolist())
    vm.backend.stop_workload()
    assert len(changed) > 100
    for name, pages in got.items():
        assert changed <= pages, f"{name} lost {sorted(changed - pages)[:10]}"
