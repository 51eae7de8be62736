"""A simulated s390 VM: guest RAM in a file, one software MMU per memslot, UC harvesting.

Guest stores go through :class:`~kvmshim.s390.mmu.S390Mmu` (faults, UC) and land in the RAM file;
DMA and kernel-mapping stores only touch the storage key and the data — the gap the seed commit
documents, which the daemon closes with its I/O log. ``get_dirty_log`` is the s390
KVM_GET_DIRTY_LOG: harvest UC for every page of the slot (kvm_s390_sync_dirty_log) into a fresh
bitmap that the caller owns.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from kvmshim import abi
from kvmshim.backends.base import (
    BackendStats,
    Harvest,
    IoReporter,
    RamRegion,
    ReadPath,
    WorkloadSpec,
    WritePath,
)
from kvmshim.backends.ram import GuestRamFile, Region
from kvmshim.backends.workload import GfnLayout, RunGate, Workload
from kvmshim.bitmap import DirtyBitmap
from kvmshim.errors import KvmError
from kvmshim.memslot import S390_USER_MEM_SLOTS, Change, Memslot, MemslotChange, MemslotTable
from kvmshim.s390.mmu import MmuStats, S390Mmu

PAGE_SHIFT = abi.PAGE_SHIFT
WORDS_PER_PAGE = abi.PAGE_SIZE // 8


@dataclass
class _Slot:
    memslot: Memslot
    region: Region
    mmu: S390Mmu


class SoftMmuBackend:
    """One simulated s390 VM (ESOP or not) whose dirty bits come from PGSTE_UC."""

    kind = "softmmu"

    def __init__(
        self, name: str, runtime_dir: str, esop: bool = True, max_slots: int = S390_USER_MEM_SLOTS
    ) -> None:
        self.name = name
        self.esop = esop
        self.memslots = MemslotTable(max_slots=max_slots, address_spaces=1)
        self.ram = GuestRamFile(os.path.join(runtime_dir, f"{name}.ram"))
        self.generation = 1  # stamps start at 1 so that a never-written (zero) page stands out
        self.io_reporter: IoReporter | None = None
        self._slots: dict[int, _Slot] = {}
        self._lock = threading.Lock()  # the memslot table and _slots
        self._gen_lock = threading.Lock()
        self._layout: GfnLayout | None = None
        self._gate = RunGate()
        self._workload: Workload | None = None
        self._writes: Counter[str] = Counter()
        self._harvests = 0
        self._harvested = 0
        self._retired = MmuStats()  # counters of deleted slots' MMUs

    def capabilities(self) -> dict[str, object]:
        """What a Linux 3.16 s390 KVM would report (KVM_CAP_S390_COW is MACHINE_HAS_ESOP)."""
        return {
            "esop": self.esop,
            "s390-cow": int(self.esop),
            "nr-memslots": self.memslots.max_slots,
            "manual-dirty-log-protect2": 0,
            "dirty-log-ring": 0,
        }

    # --- memslots ---------------------------------------------------------------------------
    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int
    ) -> MemslotChange:
        with self._lock:
            old = self.memslots.get(slot)
            uaddr = old.userspace_addr if old else self.ram.next_offset
            change = self.memslots.prepare(slot, flags, guest_phys_addr, memory_size, uaddr)
            if change.kind is Change.CREATE:
                assert change.new is not None
                region = self.ram.allocate(memory_size)
                mmu = S390Mmu(change.new.npages, self.esop, region.offset, guest_phys_addr)
                self._slots[slot] = _Slot(change.new, region, mmu)
            elif change.kind is Change.DELETE:
                gone = self._slots.pop(slot)
                self._retire(gone.mmu.stats)
                self.ram.release(gone.region)
            elif change.new is not None:
                entry = self._slots[slot]
                entry.memslot = change.new
                entry.mmu.guest_base = change.new.guest_phys_addr  # MOVE: the gmap moves
            self.memslots.commit(change)
            self._layout = None
            return change

    def ram_region(self, slot: int) -> RamRegion | None:
        entry = self._slots.get(slot)
        if entry is None:
            return None
        return RamRegion(self.ram.path, entry.region.offset, entry.region.size)

    # --- dirty log --------------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> Harvest:
        with self._lock:
            memslot = self.memslots.for_dirty_log(slot)
            mmu = self._slots[slot].mmu
        generation = self.generation
        bitmap = DirtyBitmap(memslot.npages)
        count = mmu.harvest(bitmap.bytes_view(), memslot.npages)
        with self._gen_lock:
            self.generation = max(self.generation, generation + 1)
            self._harvests += 1
            self._harvested += count
        return Harvest(bitmap, generation)

    # --- accesses ---------------------------------------------------------------------------
    def write_pages(self, gfns: np.ndarray, value: int, path: WritePath) -> None:
        """Store ``value`` (LE u64) into the first 8 bytes of every page in ``gfns``."""
        gfns = np.asarray(gfns, dtype=np.int64)
        stamp = np.uint64(value)
        for entry, pages in self._locate(gfns):
            words, at = entry.region.words, pages * WORDS_PER_PAGE

            def commit(words: np.ndarray = words, at: np.ndarray = at) -> None:
                words[at] = stamp

            self._access(entry.mmu, pages, path, commit)
        self._writes[path] += gfns.size

    def write(self, gpa: int, data: bytes, path: WritePath) -> np.ndarray:
        """Store ``data`` at ``gpa`` (may span pages and slots); returns the gfns touched."""
        gfns = _gfn_span(gpa, len(data))
        for entry, pages, lo, hi in self._spans(gfns, gpa, len(data)):
            chunk = np.frombuffer(data, dtype=np.uint8, count=hi - lo, offset=lo - gpa)
            off = lo - entry.memslot.guest_phys_addr
            target = entry.region.bytes

            def commit(
                target: np.ndarray = target, off: int = off, chunk: np.ndarray = chunk
            ) -> None:
                target[off : off + chunk.size] = chunk

            self._access(entry.mmu, pages, path, commit)
        self._writes[path] += gfns.size
        return gfns

    def read(self, gpa: int, length: int, path: ReadPath) -> bytes:
        out = bytearray(length)
        view = np.frombuffer(out, dtype=np.uint8)
        for entry, pages, lo, hi in self._spans(_gfn_span(gpa, length), gpa, length):
            off = lo - entry.memslot.guest_phys_addr
            source = entry.region.bytes

            def copy(
                source: np.ndarray = source, off: int = off, lo: int = lo, hi: int = hi
            ) -> None:
                view[lo - gpa : hi - gpa] = source[off : off + hi - lo]

            if path is ReadPath.GUEST:
                entry.mmu.guest_load(pages, copy)
            else:
                copy()
        return bytes(out)

    def set_storage_key(self, gpa: int, key: int) -> None:
        for entry, pages in self._locate(np.array([gpa >> PAGE_SHIFT], dtype=np.int64)):
            entry.mmu.set_guest_storage_key(pages, key)

    def arm_ipte_notify(self, gpa: int, length: int) -> None:
        """gmap_ipte_notify: KVM arms this for a vCPU's prefix pages."""
        if gpa % abi.PAGE_SIZE or length % abi.PAGE_SIZE:
            raise KvmError(errno.EINVAL, "IPTE notify range must be page aligned")
        for entry, pages in self._locate(_gfn_span(gpa, length)):
            entry.mmu.gmap_ipte_notify(pages)

    def _access(
        self, mmu: S390Mmu, pages: np.ndarray, path: WritePath, commit: Callable[[], None]
    ) -> None:
        if path is WritePath.GUEST:
            mmu.guest_store(pages, commit)
        else:
            mmu.io_store(pages, commit)

    def _locate(self, gfns: np.ndarray) -> Iterator[tuple[_Slot, np.ndarray]]:
        """Group guest frames by memslot; EFAULT (nothing done) if any is outside every slot."""
        with self._lock:
            slots = self.memslots.sorted_slots()
            entries = [self._slots[s.slot] for s in slots]
            which, pages = self.memslots.translate_gfns(gfns)
        if gfns.size and (which < 0).any():
            bad = int(gfns[np.flatnonzero(which < 0)[0]])
            raise KvmError(errno.EFAULT, f"guest address {bad << PAGE_SHIFT:#x} is in no memslot")
        if gfns.size and (which == which[0]).all():
            yield entries[int(which[0])], pages
            return
        for w in np.unique(which):
            yield entries[int(w)], pages[which == w]

    def _spans(
        self, gfns: np.ndarray, gpa: int, length: int
    ) -> Iterator[tuple[_Slot, np.ndarray, int, int]]:
        """Per slot: the pages and the [lo, hi) guest byte range of an access."""
        for entry, pages in list(self._locate(gfns)):
            base = entry.memslot.guest_phys_addr
            lo = max(gpa, base + (int(pages[0]) << PAGE_SHIFT))
            hi = min(gpa + length, base + ((int(pages[-1]) + 1) << PAGE_SHIFT))
            yield entry, pages, lo, hi

    # --- vCPUs ------------------------------------------------------------------------------
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
        )
        self._workload.start()

    def stop_workload(self) -> None:
        if self._workload is not None:
            self._workload.stop()
            self._workload = None

    @property
    def workload(self) -> Workload | None:
        return self._workload

    def pause(self) -> None:
        self._gate.pause()

    def resume(self) -> None:
        self._gate.resume()

    @property
    def paused(self) -> bool:
        return self._gate.paused

    def _gfn_layout(self) -> GfnLayout:
        with self._lock:
            if self._layout is None:
                self._layout = GfnLayout.from_slots(
                    [(s.base_gfn, s.npages) for s in self.memslots.sorted_slots()]
                )
            return self._layout

    def _workload_store(self, gfns: np.ndarray, stamp: int, path: WritePath) -> None:
        try:
            self.write_pages(gfns, stamp, path)
        except KvmError as exc:
            if exc.errno != errno.EFAULT:
                raise
            # A memslot went away under the batch; the next batch uses the new layout.

    # --- bookkeeping ------------------------------------------------------------------------
    def stats(self) -> BackendStats:
        with self._lock:
            mmus = [e.mmu.stats for e in self._slots.values()]
        total = MmuStats(**vars(self._retired))
        for s in mmus:
            for k, v in vars(s).items():
                setattr(total, k, getattr(total, k) + v)
        return BackendStats(
            harvests=self._harvests,
            harvested_dirty_pages=self._harvested,
            writes_by_path=dict(self._writes),
            faults_by_kind={
                "translation": total.translation_faults,
                "protection": total.protection_faults,
            },
            ipte_notifications=total.ipte_notifications,
        )

    def _retire(self, stats: MmuStats) -> None:
        for k, v in vars(stats).items():
            setattr(self._retired, k, getattr(self._retired, k) + v)

    def close(self) -> None:
        self.stop_workload()
        self._gate.resume()
        with self._lock:
            self._slots.clear()
        self.ram.close()


def _gfn_span(gpa: int, length: int) -> np.ndarray:
    if length <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(gpa >> PAGE_SHIFT, ((gpa + length - 1) >> PAGE_SHIFT) + 1, dtype=np.int64)
