"""calc-dirty-rate / query-dirty-rate: QEMU's dirty-rate measurement, one state per VM.

Follows migration/dirtyrate.c of QEMU 8.2 (the millisecond ``calc-time-unit`` patch): the
argument checks in its order and words, the unstarted → measuring → measured states, and the
three modes. What differs, because one daemon serves many VMs and the simulation is not KVM:

* page-sampling reads the sampled pages through the RAM file's own mapping (as a migration tool
  reads; no MMU effect) and compares a CRC-32 of each at start and end;
* dirty-bitmap harvests with an internal consumer of its own (``.calc-dirty-rate``): it never
  takes a bit from another consumer (each folds the slot logs on its own) and it is never
  listed, counted or saved; it is allowed whether or not the backend has a dirty ring (QEMU
  refuses it with KVM's ring: that ring replaces KVM's bitmap, the daemon keeps both);
* dirty-ring differences two snapshots of the workload's per-vCPU counters of newly dirtied
  pages (softmmu only: KVM's bitmap attributes no page to a vCPU).

The measurement runs as a task on the loop that sleeps through the window; every page read,
hash and harvest runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from dirtylogd.errors import GenericError
from dirtylogd.service.vmstate import CalcRequest, Result
from kvmshim.abi import PAGE_SIZE, make_slot_id
from kvmshim.errors import KvmError

if TYPE_CHECKING:
    from dirtylogd.service.vm import VmState

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_CALC_MS, MAX_CALC_MS = 50, 60_000  # MIN_CALC_TIME_MS / MAX_CALC_TIME_MS (dirtyrate.h)
MIN_SAMPLE_PAGES, MAX_SAMPLE_PAGES = 128, 16_384  # per GiB (MIN/MAX_SAMPLE_PAGE_COUNT)
DEFAULT_SAMPLE_PAGES = 512  # DIRTYRATE_DEFAULT_SAMPLE_PAGES, per GiB
CALC_CONSUMER = ".calc-dirty-rate"  # dirty-bitmap mode's reader (consumers.INTERNAL_PREFIX)
MiB = 1 << 20


def check_request(
    measuring: bool,
    calc_time: int,
    unit: str,
    sample_pages: int | None,
    mode: str | None,
    has_ring: bool,
) -> CalcRequest:
    """QEMU 8.2's qmp_calc_dirty_rate checks, in its order and with its words."""
    if measuring:
        raise GenericError("the dirty rate is already being measured.")
    calc_ms = calc_time * 1000 if unit == "second" else calc_time
    if not MIN_CALC_MS <= calc_ms <= MAX_CALC_MS:
        raise GenericError("Calculation time is out of range [50ms, 60000ms].")
    mode = mode or "page-sampling"
    if sample_pages is not None and mode != "page-sampling":
        raise GenericError("sample-pages is used only in page-sampling mode")
    if sample_pages is not None and not MIN_SAMPLE_PAGES <= sample_pages <= MAX_SAMPLE_PAGES:
        raise GenericError("sample-pages is out of range[128, 16384].")
    if mode == "dirty-ring" and not has_ring:
        raise GenericError(
            "mode dirty-ring is not enabled, use other method instead. (The kvm backend reads "
            "KVM's dirty bitmap and attributes no page to a vCPU.)"
        )
    return CalcRequest(
        calc_ms, mode, DEFAULT_SAMPLE_PAGES if sample_pages is None else sample_pages
    )


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn`` in a worker thread; a cancelled caller still waits for it (the backend may close
    right after, and nothing may run on it then)."""
    job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await job
        raise


async def wait_until(began: float, calc_ms: int) -> float:
    """Sleep out the window begun at ``began``; the seconds actually elapsed."""
    await asyncio.sleep(max(0.0, began + calc_ms / 1000 - time.monotonic()))
    return time.monotonic() - began


def to_mib_per_s(pages: float, seconds: float) -> int:
    """QEMU's ``((pages * TARGET_PAGE_SIZE) >> 20) * 1000 / ms`` (MiB/s, floored)."""
    return int(pages * PAGE_SIZE / MiB / seconds) if seconds > 0 else 0


# --- page-sampling --------------------------------------------------------------------------------
@dataclass
class Sample:
    """Pages sampled in one RAM region and the CRC-32 of each at the start."""

    path: str
    offset: int
    size: int
    pages: np.ndarray
    digests: list[int]


def sample_regions(
    regions: list[tuple[str, int, int]], per_gib: int, seed: int | None
) -> list[Sample]:
    """Pick ``size * per_gib >> 30`` pages (at least 1) of each (path, offset, size) region,
    with replacement as QEMU does, and digest them."""
    rng = np.random.default_rng(seed)
    out = []
    for path, offset, size in regions:
        npages = size // PAGE_SIZE
        if npages == 0:
            continue
        count = max(1, size * per_gib >> 30)
        pages = rng.integers(0, npages, count)
        out.append(Sample(path, offset, size, pages, _digests(path, offset, size, pages)))
    return out


def count_changed(samples: list[Sample]) -> tuple[int, int, int]:
    """(sampled pages, how many changed, sampled bytes) after the window."""
    total = changed = nbytes = 0
    for s in samples:
        now = _digests(s.path, s.offset, s.size, s.pages)
        total += len(now)
        changed += sum(a != b for a, b in zip(now, s.digests, strict=True))
        nbytes += s.size
    return total, changed, nbytes


def _digests(path: str, offset: int, size: int, pages: np.ndarray) -> list[int]:
    """CRC-32 of each page, read through a read-only mapping of the RAM file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset) as mapped:
            view = memoryview(mapped)
            try:
                return [
                    zlib.crc32(view[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]) for p in pages.tolist()
                ]
            finally:
                view.release()
    finally:
        os.close(fd)


# --- dirty-bitmap ---------------------------------------------------------------------------------
def harvest_all(vm: VmState, consumer: str) -> int:
    """Harvest every logging slot for ``consumer``; the dirty pages it was handed. A slot that
    stops logging meanwhile counts nothing."""
    with vm.lock:
        slots = [sid for sid, s in vm.slots.items() if s.log is not None]
    pages = 0
    for slot in slots:
        with contextlib.suppress(KvmError):
            pages += vm.harvest(slot, consumer).pages
    return pages


def ram_regions(vm: VmState) -> list[tuple[str, int, int]]:
    """(RAM file, offset, size) of every memslot, by address space and id."""
    with vm.lock:
        memslots = sorted((s.memslot for s in vm.slots.values()), key=lambda m: (m.as_id, m.id))
    out = []
    for m in memslots:
        region = vm.backend.ram_region(make_slot_id(m.as_id, m.id))
        if region is not None:
            out.append((region.path, region.offset, region.size))
    return out


# --- the three modes ------------------------------------------------------------------------------
async def measure(vm: VmState, request: CalcRequest, seed: int | None = None) -> Result:
    """One calc-dirty-rate window on ``vm`` in ``request.mode``."""
    if request.mode == "page-sampling":
        return await _page_sampling(vm, request, seed)
    if request.mode == "dirty-bitmap":
        return await _dirty_bitmap(vm, request)
    return await _dirty_ring(vm, request)


async def _page_sampling(vm: VmState, request: CalcRequest, seed: int | None) -> Result:
    """calculate_dirtyrate_sample_vm: the changed share of the samples times the sampled RAM."""
    began = time.monotonic()
    regions = await off_loop(ram_regions, vm)
    samples = await off_loop(sample_regions, regions, request.sample_pages, seed)
    seconds = await wait_until(began, request.calc_ms)
    total, changed, nbytes = await off_loop(count_changed, samples)
    if total == 0:  # QEMU: no sample, rate stays -1
        return Result(-1, seconds, samples=0, dirty_samples=0)
    rate = int(changed * (nbytes // MiB) / (total * seconds))
    return Result(rate, seconds, samples=total, dirty_samples=changed)


async def _dirty_bitmap(vm: VmState, request: CalcRequest) -> Result:
    """calculate_dirtyrate_dirty_bitmap with a consumer of its own: one harvest discarded at
    the start (what was dirtied before), one at the end; each page counts once."""
    vm.add_consumer(CALC_CONSUMER, manual_protect=False, initially_set=False)
    try:
        await off_loop(harvest_all, vm, CALC_CONSUMER)
        began = time.monotonic()
        await wait_until(began, request.calc_ms)
        pages = await off_loop(harvest_all, vm, CALC_CONSUMER)
        seconds = time.monotonic() - began
        return Result(to_mib_per_s(pages, seconds), seconds)
    finally:
        with contextlib.suppress(GenericError):
            vm.remove_consumer(CALC_CONSUMER)


async def _dirty_ring(vm: VmState, request: CalcRequest) -> Result:
    """calculate_dirtyrate_dirty_ring: per-vCPU newly dirtied pages between two snapshots of
    the workload's ring counters; the VM's rate is their sum (as QEMU sums its vCPUs')."""
    first = await off_loop(vm.backend.dirty_ring_snapshot)
    seconds = await wait_until(time.monotonic(), request.calc_ms)
    last = await off_loop(vm.backend.dirty_ring_snapshot)
    if first is None or last is None or len(first.dirtied) != len(last.dirtied):
        return Result(0, seconds, vcpus=[])  # no workload (or a new one) in the window
    seconds = last.time - first.time
    deltas = (last.dirtied - first.dirtied).tolist()
    vcpus = [{"id": i, "dirty-rate": to_mib_per_s(d, seconds)} for i, d in enumerate(deltas)]
    return Result(sum(v["dirty-rate"] for v in vcpus), seconds, vcpus=vcpus)
