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
from collections.abc import Callable

import numpy as np

from kvmshim import abi
from kvmshim.backends.base import BackendStats, Harvest, ReadPath, WritePath
from kvmshim.backends.guestvm import GuestVm, gfn_span
from kvmshim.bitmap import DirtyBitmap
from kvmshim.errors import KvmError
from kvmshim.memslot import S390_USER_MEM_SLOTS, Change, MemslotChange, MemslotTable
from kvmshim.s390.mmu import MmuStats, S390Mmu

WORDS_PER_PAGE = abi.PAGE_SIZE // 8


class SoftMmuBackend(GuestVm):
    """One simulated s390 VM (ESOP or not) whose dirty bits come from PGSTE_UC."""

    kind = "softmmu"

    def __init__(
        self,
        name: str,
        runtime_dir: str,
        esop: bool = True,
        max_slots: int = S390_USER_MEM_SLOTS,
        adopt: bool = False,
    ) -> None:
        super().__init__(
            name, runtime_dir, MemslotTable(max_slots=max_slots, address_spaces=1), adopt
        )
        self.esop = esop
        self._mmus: dict[int, S390Mmu] = {}
        self._retired = MmuStats()  # counters of deleted slots' MMUs

    def options(self) -> dict[str, object]:
        return {"esop": self.esop}

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
    def _set_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, at: int | None
    ) -> MemslotChange:
        with self._lock:
            old = self.memslots.get(slot)
            if old is not None:
                uaddr = old.userspace_addr
            else:
                uaddr = self.ram.next_offset if at is None else at
            change = self.memslots.prepare(slot, flags, guest_phys_addr, memory_size, uaddr)
            if change.kind is Change.CREATE:
                assert change.new is not None
                _check_model_fits(change.new.npages, slot)
                region = self.ram.allocate_at(uaddr, memory_size)
                self._regions[slot] = region
                self._mmus[slot] = S390Mmu(
                    change.new.npages, self.esop, region.offset, guest_phys_addr
                )
            elif change.kind is Change.DELETE:
                self._retire(self._mmus.pop(slot).stats)
                self.ram.release(self._regions.pop(slot))
            elif change.kind is Change.MOVE:
                self._mmus[slot].guest_base = guest_phys_addr  # the gmap moves, ptes stay
            self.memslots.commit(change)
            self._layout = None
            return change

    # --- dirty log --------------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> Harvest:
        with self._lock:
            memslot = self.memslots.for_dirty_log(slot)
            mmu = self._mmus[slot]
        generation = self.generation
        bitmap = DirtyBitmap(memslot.npages)
        dirty = mmu.harvest(bitmap.bytes_view(), memslot.npages)
        self._closed_generation(generation, dirty)
        return Harvest(bitmap, generation)

    def check_clear_dirty_log(self, slot: int, first_page: int, num_pages: int) -> None:
        """KVM_CLEAR_DIRTY_LOG's argument rules (s390 has no such ioctl; the rules are KVM's)."""
        with self._lock:
            self.memslots.for_clear_dirty_log(slot, first_page, num_pages)

    # --- accesses ---------------------------------------------------------------------------
    def write_pages(self, gfns: np.ndarray, value: int, path: WritePath) -> None:
        """Store ``value`` (LE u64) into the first 8 bytes of every page in ``gfns``."""
        gfns = np.asarray(gfns, dtype=np.int64)
        stamp = np.uint64(value)
        for slot, pages in list(self._locate(gfns)):
            words, at = self._regions[slot].words, pages * WORDS_PER_PAGE

            def commit(words: np.ndarray = words, at: np.ndarray = at) -> None:
                words[at] = stamp

            self._access(self._mmus[slot], pages, path, commit)
        self._writes[path] += gfns.size

    def write(self, gpa: int, data: bytes, path: WritePath) -> np.ndarray:
        """Store ``data`` at ``gpa`` (may span pages and slots); returns the gfns touched."""
        for span in self._spans(gpa, len(data)):
            chunk = np.frombuffer(data, np.uint8, span.hi - span.lo, span.lo - gpa)
            target = self._regions[span.slot].bytes

            def commit(
                target: np.ndarray = target, off: int = span.offset, chunk: np.ndarray = chunk
            ) -> None:
                target[off : off + chunk.size] = chunk

            self._access(self._mmus[span.slot], span.pages, path, commit)
        gfns = gfn_span(gpa, len(data))
        self._writes[path] += gfns.size
        return gfns

    def read(self, gpa: int, length: int, path: ReadPath) -> bytes:
        if path is ReadPath.HOST:
            return self._read_host(gpa, length)
        out = bytearray(length)
        view = np.frombuffer(out, dtype=np.uint8)
        for span in self._spans(gpa, length):
            source = self._regions[span.slot].bytes

            def copy(
                source: np.ndarray = source,
                lo: int = span.lo,
                hi: int = span.hi,
                off: int = span.offset,
            ) -> None:
                view[lo - gpa : hi - gpa] = source[off : off + hi - lo]

            self._mmus[span.slot].guest_load(span.pages, copy)
        return bytes(out)

    def set_storage_key(self, gpa: int, key: int) -> None:
        for slot, pages in self._locate(np.array([gpa >> abi.PAGE_SHIFT], dtype=np.int64)):
            self._mmus[slot].set_guest_storage_key(pages, key)

    def arm_ipte_notify(self, gpa: int, length: int) -> None:
        """gmap_ipte_notify: KVM arms this for a vCPU's prefix pages."""
        if gpa % abi.PAGE_SIZE or length % abi.PAGE_SIZE:
            raise KvmError(errno.EINVAL, "IPTE notify range must be page aligned")
        for slot, pages in self._locate(gfn_span(gpa, length)):
            self._mmus[slot].gmap_ipte_notify(pages)

    def _access(
        self, mmu: S390Mmu, pages: np.ndarray, path: WritePath, commit: Callable[[], None]
    ) -> None:
        if path is WritePath.GUEST:
            mmu.guest_store(pages, commit)
        else:
            mmu.io_store(pages, commit)

    # --- bookkeeping ------------------------------------------------------------------------
    def stats(self) -> BackendStats:
        with self._lock:
            mmus = [m.stats for m in self._mmus.values()]
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

    def close(self, keep_ram: bool = False) -> None:
        self.stop_workload()  # first: vCPU threads must not store into regions being dropped
        with self._lock:
            self._mmus.clear()
            self._regions.clear()
        self._close_common(keep_ram)


def memory_available() -> int:
    """MemAvailable from /proc/meminfo (free pages where it is missing), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_model_fits(npages: int, slot: int) -> None:
    """ENOMEM, as KVM's own bitmap allocation would fail, rather than the OOM killer later.

    The model's pte, PGSTE and key arrays are real memory (the guest RAM file is sparse); a slot
    whose arrays do not fit in what the host has available is refused before any is allocated.
    """
    need = npages * S390Mmu.BYTES_PER_PAGE
    have = memory_available()
    if need > have:
        raise KvmError(
            errno.ENOMEM,
            f"the model of {npages} pages needs {_mib(need)}; {_mib(have)} is available",
            slot,
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
