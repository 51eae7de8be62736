"""What every backend VM shares: the RAM file, generation stamps, address lookup, the vCPU
workload and stop/cont. Backends add where their dirty bits come from and how guests store.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kvmshim import abi
from kvmshim.backends.base import (
    IoReporter,
    RamRegion,
    VcpuFailureHook,
    WorkloadSpec,
    WorkloadStatus,
    WritePath,
)
from kvmshim.backends.ram import GuestRamFile, Region
from kvmshim.backends.vcpu_control import RingSnapshot, VcpuControls, VcpuRate
from kvmshim.backends.workload import GfnLayout, RunGate, Workload
from kvmshim.errors import KvmError
from kvmshim.memslot import MemslotChange, MemslotTable

PAGE_SHIFT = abi.PAGE_SHIFT


def gfn_span(gpa: int, length: int) -> np.ndarray:
    """The guest frame numbers that bytes [gpa, gpa + length) touch."""
    if length <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(gpa >> PAGE_SHIFT, ((gpa + length - 1) >> PAGE_SHIFT) + 1, dtype=np.int64)


@dataclass(frozen=True)
class Span:
    """The part of a guest byte range that falls in one memslot."""

    slot: int
    pages: np.ndarray  # page indices within the slot
    lo: int  # guest address of the first byte
    hi: int  # guest address past the last byte
    offset: int  # offset of lo within the slot's RAM region


class GuestVm:
    """Shared state and behaviour; subclasses set ``kind`` and implement the harvest."""

    kind = "guest"
    max_gfn: int | None = None  # highest frame a guest store may reach, if limited
    # Whether guest stores report the pages they newly dirtied (write_pages' count): the
    # model's per-vCPU dirty ring, which dirty limits need. KVM's dirty bitmap cannot.
    has_dirty_ring = False

    def __init__(
        self, name: str, runtime_dir: str, memslots: MemslotTable, adopt: bool = False
    ) -> None:
        self.name = name
        self.memslots = memslots
        self.ram = GuestRamFile(os.path.join(runtime_dir, f"{name}.ram"), adopt=adopt)
        self.generation = 1  # stamps start at 1 so that a never-written (zero) page stands out
        self.io_reporter: IoReporter | None = None
        self.on_vcpu_failure: VcpuFailureHook | None = None
        self.vcpu_failures = 0
        self._regions: dict[int, Region] = {}
        self._lock = threading.Lock()  # the memslot table and the regions
        self._gen_lock = threading.Lock()
        self._gate = RunGate()
        # Throttle, dirty limits and per-vCPU counters: the VM's, so they outlive a workload.
        self.vcpu_controls = VcpuControls(name, dirty_ring=self.has_dirty_ring)
        self._workload: Workload | None = None
        self._layout: GfnLayout | None = None
        self._writes: Counter[str] = Counter()
        self._harvests = 0
        self._harvested = 0

    # --- memslots ---------------------------------------------------------------------------
    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int
    ) -> MemslotChange:
        """KVM_SET_USER_MEMORY_REGION; a new slot's RAM goes at the end of the RAM file."""
        return self._set_region(slot, flags, guest_phys_addr, memory_size, None)

    def restore_memslot(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, ram_offset: int
    ) -> MemslotChange:
        """Recreate a slot over the RAM a previous daemon left at ``ram_offset``."""
        return self._set_region(slot, flags, guest_phys_addr, memory_size, ram_offset)

    def _set_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, at: int | None
    ) -> MemslotChange:
        """The backend's memslot change, with its RAM at ``at`` (None: a fresh region)."""
        raise NotImplementedError

    # --- harvest bookkeeping -----------------------------------------------------------------
    def _closed_generation(self, generation: int, dirty: int) -> None:
        """A harvest that ran under ``generation`` is done: later stores get the next stamp."""
        with self._gen_lock:
            self.generation = max(self.generation, generation + 1)
            self._harvests += 1
            self._harvested += dirty

    # --- memory -------------------------------------------------------------------------------
    def ram_region(self, slot: int) -> RamRegion | None:
        region = self._regions.get(slot)
        return None if region is None else RamRegion(self.ram.path, region.offset, region.size)

    def _locate(self, gfns: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(slot, page indices) per memslot; EFAULT before anything is done if a frame is in
        no memslot (or beyond what guests can reach)."""
        with self._lock:
            slots = [s.slot for s in self.memslots.sorted_slots()]
            which, pages = self.memslots.translate_gfns(gfns)
        if gfns.size:
            outside = which < 0
            if self.max_gfn is not None:
                outside |= gfns > self.max_gfn
            if outside.any():
                bad = int(gfns[np.flatnonzero(outside)[0]])
                raise KvmError(
                    errno.EFAULT, f"guest address {bad << PAGE_SHIFT:#x} is in no memslot"
                )
            if (which == which[0]).all():
                yield slots[int(which[0])], pages
                return
        for w in np.unique(which):
            yield slots[int(w)], pages[which == w]

    def _spans(self, gpa: int, length: int) -> list[Span]:
        """Split a guest byte range by memslot; EFAULT (nothing done) for any gap."""
        spans = []
        for slot, pages in self._locate(gfn_span(gpa, length)):
            base = self.memslots.get(slot).guest_phys_addr  # type: ignore[union-attr]
            lo = max(gpa, base + (int(pages[0]) << PAGE_SHIFT))
            hi = min(gpa + length, base + ((int(pages[-1]) + 1) << PAGE_SHIFT))
            spans.append(Span(slot, pages, lo, hi, lo - base))
        return spans

    def _read_host(self, gpa: int, length: int) -> bytes:
        """What a migration tool reads through its own mapping: no MMU effect."""
        out = bytearray(length)
        for span in self._spans(gpa, length):
            region = self._regions[span.slot]
            out[span.lo - gpa : span.hi - gpa] = region.bytes[
                span.offset : span.offset + span.hi - span.lo
            ].tobytes()
        return bytes(out)

    # --- vCPU workload, stop/cont --------------------------------------------------------------
    def start_workload(self, spec: WorkloadSpec) -> None:
        self.stop_workload()
        self._workload = Workload(
            spec,
            self._gfn_layout,
            self._workload_store,
            lambda: self.generation,
            self._gate,
            report=lambda gfns: self.io_reporter(gfns) if self.io_reporter else None,
            name=self.name,
            on_failure=self._vcpu_failed,
            controls=self.vcpu_controls,
        )
        self._workload.start()

    def _vcpu_failed(self, vcpu: int, exc: BaseException) -> None:
        self.vcpu_failures += 1
        if self.on_vcpu_failure is not None:
            self.on_vcpu_failure(vcpu, exc)

    def stop_workload(self) -> None:
        if self._workload is not None:
            self._workload.stop()
            self._workload = None
            self.vcpu_controls.detach()

    @property
    def workload(self) -> Workload | None:
        return self._workload

    def workload_status(self) -> WorkloadStatus | None:
        w = self._workload
        if w is None:
            return None
        return WorkloadStatus(w.spec, w.running, w.pages_stored, w.failure)

    def vcpu_rates(self) -> list[VcpuRate]:
        """Each vCPU's limit and rates over the last complete period; [] without a workload."""
        if self._workload is None:
            return []
        return self.vcpu_controls.rates()

    def dirty_ring_snapshot(self) -> RingSnapshot | None:
        """The per-vCPU stored and newly-dirtied counters now (cumulative since the workload
        started; on KVM ``dirtied`` stays 0); None without a workload."""
        if self._workload is None:
            return None
        return self.vcpu_controls.snapshot()

    @property
    def ram_path(self) -> str:
        return self.ram.path

    def options(self) -> dict[str, object]:
        return {}

    def pause(self) -> None:
        self._gate.pause()

    def resume(self) -> None:
        self._gate.resume()

    @property
    def paused(self) -> bool:
        return self._gate.paused

    def write_pages(self, gfns: np.ndarray, value: int, path: WritePath) -> int | None:
        raise NotImplementedError

    def _gfn_layout(self) -> GfnLayout:
        with self._lock:
            if self._layout is None:
                self._layout = GfnLayout.from_slots(
                    [(s.base_gfn, s.npages) for s in self.memslots.sorted_slots()]
                )
            return self._layout

    def _workload_store(self, gfns: np.ndarray, stamp: int, path: WritePath) -> int | None:
        try:
            return self.write_pages(gfns, stamp, path)
        except KvmError as exc:
            if exc.errno != errno.EFAULT:
                raise
            # A memslot went away under the batch; the next batch uses the new layout.
            return 0

    def _close_common(self, keep_ram: bool) -> None:
        self.stop_workload()
        self._gate.resume()
        self.ram.close(unlink=not keep_ram)
