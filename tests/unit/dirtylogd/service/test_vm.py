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
from kvmshim.bitmap import DirtyBitmap
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


def test_reads_and_delivered_pages_count_answers_delivered_and_never_go_down(vm):
    """An answer put back was not delivered: nothing is counted (a count taken back would go
    down, which Prometheus reads as a restart). Manual protect reads, hands over no pages."""
    vm.add_consumer("copy", manual_protect=True, initially_set=False)
    vm.backend.write_pages(np.array([3, 4, 5]), 1, WritePath.GUEST)
    lost = vm.harvest(0, "default")
    vm.put_back(lost)
    assert (vm.consumers["default"].reads, vm.consumers["default"].delivered_pages) == (0, 0)
    vm.delivered(vm.harvest(0, "default"))
    vm.delivered(vm.harvest(0, "copy"))
    vm.delivered(vm.harvest(0, "copy"))
    assert (vm.consumers["default"].reads, vm.consumers["default"].delivered_pages) == (1, 3)
    assert (vm.consumers["copy"].reads, vm.consumers["copy"].delivered_pages) == (2, 0)
    assert vm.consumers["copy"].pending_pages() == 3  # read twice, never cleared


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


# --- I/O marks: mapped onto the slots outside the lock, as the per-range cover did -------------
def cover_one_by_one(slots, gpa, length):
    """The reference: walk the slots of address space 0 by base, range by range."""
    first, end = gpa >> 12, (gpa + length - 1 >> 12) + 1
    parts, gfn = [], first
    for base, npages in sorted(slots):
        if base + npages <= gfn or base > gfn:
            continue
        stop = min(base + npages, end)
        parts.append((base, gfn - base, stop - gfn))
        gfn = stop
        if gfn >= end:
            return parts
    raise KvmError(
        errno.EFAULT,
        f"I/O range [{gpa:#x}, {gpa + length:#x}) leaves the memslots at {gfn << 12:#x}",
    )


def layout_vm(tmp_path, slots, logged=None):
    backend = SoftMmuBackend("l", str(tmp_path))
    state = VmState("l", backend)
    for i, (base, npages) in enumerate(slots):
        flags = LOG if logged is None or i in logged else 0
        state.apply_memslot_change(
            backend.set_user_memory_region(i, flags, base << 12, npages << 12)
        )
    return state


@pytest.mark.parametrize("seed", range(6))
def test_io_marks_match_the_range_by_range_cover(tmp_path, seed):
    rng = np.random.default_rng(seed)
    # (first gfn, pages); 1 MiB multiples, as s390 memslots must be
    slots = [(0, 512), (512, 256), (1024, 256), (1280, 1024), (4096, 256)]  # two gaps
    logged = {0, 2, 3, 4} if seed % 2 else None
    vm = layout_vm(tmp_path, slots, logged)
    stretches = [(0, 768), (1024, 2304), (4096, 4352)]  # back-to-back slots join up
    outcomes = set()
    for round_ in range(24):
        ranges = []
        for _ in range(int(rng.integers(1, 600))):  # past _FEW_RANGES in some slots
            lo, hi = stretches[int(rng.integers(0, 3))]
            first = int(rng.integers(lo << 12, hi << 12))
            ranges.append((first, int(rng.integers(1, (hi << 12) - first + 1))))
        if round_ % 3 == 0:  # one range that leaves the slots, somewhere
            bad = (int(rng.integers(0, 4430 << 12)), int(rng.integers(1, 2000 << 12)))
            ranges.insert(int(rng.integers(0, len(ranges) + 1)), bad)
        before = {s: st.io_log.to_bytes() for s, st in vm.slots.items() if st.io_log is not None}
        try:
            expected = [p for gpa, length in ranges for p in cover_one_by_one(slots, gpa, length)]
        except KvmError as exc:
            with pytest.raises(KvmError) as info:
                vm.io_mark_ranges(ranges)
            assert (info.value.errno, str(info.value)) == (exc.errno, str(exc))
            after = {s: st.io_log.to_bytes() for s, st in vm.slots.items() if st.io_log}
            assert after == before  # all or nothing
            outcomes.add("efault")
            continue
        want = {}
        for base, first, count in expected:
            slot = [b for b, _ in slots].index(base)
            if logged is None or slot in logged:
                want.setdefault(slot, set()).update(range(first, first + count))
        for state in vm.slots.values():
            if state.io_log is not None:
                state.io_log = DirtyBitmap(state.io_log.npages)  # start each round clean
        marked = vm.io_mark_ranges(ranges)
        got = {s: set(st.io_log.pages().tolist()) for s, st in vm.slots.items() if st.io_log}
        assert {s: p for s, p in got.items() if p} == want
        logged_parts = [
            p for p in expected if logged is None or [b for b, _ in slots].index(p[0]) in logged
        ]
        assert marked == sum(count for _, _, count in logged_parts)
        outcomes.add("marked")
    assert outcomes == {"efault", "marked"}
    vm.backend.close()


def test_io_marks_are_mapped_and_clear_masks_built_outside_the_lock(vm, monkeypatch):
    """65,536 ranges took 150 ms under the lock that put_back and add_consumer take on the loop;
    only the OR into the logs may hold it now."""
    held = []
    plan = VmState._io_marks
    check = vm.backend.check_clear_dirty_log

    def planning(self, *args):
        held.append(self.lock.locked())
        return plan(self, *args)

    def checking(*args):
        held.append(vm.lock.locked())
        return check(*args)

    monkeypatch.setattr(VmState, "_io_marks", planning)
    monkeypatch.setattr(vm.backend, "check_clear_dirty_log", checking)
    assert vm.io_mark_ranges([(i * 8192, 4096) for i in range(128)]) == 128
    vm.add_consumer("mp", manual_protect=True, initially_set=True)
    vm.clear(0, "mp", 0, 64, b"\xff" * 8)
    assert held == [False, False]
    assert vm.slots[0].io_log.count() == 128


def test_io_marks_of_gfns_set_each_page_once_per_logging_slot(vm):
    vm.apply_memslot_change(vm.backend.set_user_memory_region(1, LOG, 4 * MiB, MiB))
    gfns = np.array([0, 7, 7, 8, 255, 256, 1023, 1024, 1024 + 255, 1024 + 256, 9, 0])
    vm.io_mark_gfns(gfns)
    assert vm.slots[0].io_log.pages().tolist() == [0, 7, 8, 9, 255]
    assert vm.slots[1].io_log.pages().tolist() == [0, 255]
    assert vm.telemetry.io_marked_pages == 9


# --- shared harvests: GETs queued behind a harvest that began after them --------------------
def test_gets_waiting_behind_a_harvest_share_the_next_and_lose_nothing(vm):
    """A harvests (holding harvest_lock); B and C arrive meanwhile, after page 9 was stored.
    The first of them to get the lock harvests; the other, which arrived before that harvest
    began, is answered from it — and both get page 9, with that harvest's generation."""
    for name in "abc":
        vm.add_consumer(name, manual_protect=False, initially_set=False)
    real, calls = vm.backend.get_dirty_log, []
    inside, release = threading.Event(), threading.Event()

    def held_first(slot):
        result = real(slot)
        calls.append(result.generation)
        if len(calls) == 1:
            inside.set()
            release.wait(30)
        return result

    vm.backend.get_dirty_log = held_first
    answers = {}

    def get(name):
        answers[name] = vm.harvest(0, name)

    first = threading.Thread(target=get, args=("a",))
    first.start()
    assert inside.wait(30)
    vm.backend.write_pages(np.array([9]), 1, WritePath.GUEST)
    waiting = [threading.Thread(target=get, args=(n,)) for n in "bc"]
    for t in waiting:
        t.start()
    time.sleep(0.2)  # both waiting for a harvest
    release.set()
    for t in (first, *waiting):
        t.join()
    assert len(calls) == 2 and vm.telemetry.shared_harvests == 1
    assert answers["a"].bitmap.pages().tolist() == []
    for name in "bc":
        assert answers[name].bitmap.pages().tolist() == [9]
        assert answers[name].generation == calls[1]
