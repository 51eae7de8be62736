"""A simulated s390 VM: guest RAM in a file, one software MMU per memslot, for one kernel
generation (:mod:`kvmshim.s390.generations`: "3.16", the seed tree; "3.15", before it; "4.19",
optionally with guest memory on 1 MiB pages).

Guest stores go through :class:`~kvmshim.s390.mmu.S390Mmu` (faults, UC) and land in the RAM file;
DMA and kernel-mapping stores only touch the storage key and the data — under 3.16 the gap the
seed commit documents, which the daemon closes with its I/O log; under 3.15 the harvest finds
them through the key's change bit. ``get_dirty_log`` is 3.16's s390 KVM_GET_DIRTY_LOG:
kvm_s390_sync_dirty_log over the slot, including the one page past it that its ``<=`` bound
reaches (4.19: the guest segment past it), then the slot's KVM dirty bitmap is copied out and
cleared.

Memslots follow the s390 rule (host address and size 1 MiB aligned); the RAM file places each
slot's region at the next 1 MiB boundary, so slots created one after another are adjacent in
host memory, which is where the inclusive bound matters.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable

import numpy as np

from kvmshim import abi
from kvmshim.backends.base import BackendStats, Harvest, ReadPath, WritePath
from kvmshim.backends.guestvm import GuestVm, gfn_span
from kvmshim.bitmap import DirtyBitmap
from kvmshim.errors import KvmError
from kvmshim.memslot import S390_USER_MEM_SLOTS, Change, Memslot, MemslotChange, MemslotTable
from kvmshim.s390.generations import kernel_generation
from kvmshim.s390.kvm_s390 import (
    gmap_map_segment_rule,
    guest_segment_after,
    host_page_after,
    kvm_arch_prepare_memory_region,
    sync_dirty_log_overreach,
)
from kvmshim.s390.mmu import MmuStats, S390Mmu, check_hugepages

WORDS_PER_PAGE = abi.PAGE_SIZE // 8


class SoftMmuBackend(GuestVm):
    """One simulated s390 VM (ESOP or not) of one kernel generation."""

    kind = "softmmu"
    has_dirty_ring = True  # guest_store counts the pages each store newly dirtied

    def __init__(
        self,
        name: str,
        runtime_dir: str,
        esop: bool = True,
        max_slots: int = S390_USER_MEM_SLOTS,
        adopt: bool = False,
        kernel: str | None = None,
        hugepages: bool = False,
    ) -> None:
        self.kernel = kernel_generation(kernel)  # first: a bad name creates no RAM file
        check_hugepages(self.kernel, hugepages)
        self.hugepages = hugepages
        super().__init__(
            name, runtime_dir, MemslotTable(max_slots=max_slots, address_spaces=1), adopt
        )
        self.esop = esop
        self._mmus: dict[int, S390Mmu] = {}
        self._retired = MmuStats()  # counters of deleted slots' MMUs
        # KVM's memslot->dirty_bitmap holds only what mark_page_dirty put there from another
        # slot's harvest (the slot's own pages go straight from the PGSTEs into the result);
        # at most one page (3.16) or one segment (4.19) per other slot, so a set per slot.
        self._marks: dict[int, set[int]] = {}
        # Bytes 8-15 of a page stored by write_pages: a sequence number per batch, so every
        # store changes its page as a real guest's data would, even when the stamp (the
        # generation) is the one already there. Page sampling (calc-dirty-rate) sees it.
        self._store_seq = itertools.count(1)

    def options(self) -> dict[str, object]:
        return {"esop": self.esop, "kernel": self.kernel.name, "hugepages": self.hugepages}

    def capabilities(self) -> dict[str, object]:
        """What the generation's s390 KVM would report (KVM_CAP_S390_COW is MACHINE_HAS_ESOP;
        KVM_CAP_S390_HPAGE_1M exists from 4.19, and this VM enabled it if ``hugepages``)."""
        return {
            "kernel": self.kernel.name,
            "esop": self.esop,
            "hugepages": self.hugepages,
            "s390-cow": int(self.esop),
            "s390-hpage-1m": int(self.kernel.hugepages),
            "s390-skeys": 1,  # KVM_CAP_S390_SKEYS: get_storage_keys reads them
            "nr-memslots": self.memslots.max_slots,
            "manual-dirty-log-protect2": 0,
            "dirty-log-ring": 0,
            "vcpu-dirty-ring": self.has_dirty_ring,
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
            if change.kind is not Change.NONE and self.kernel.memslot_segment_rule:
                kvm_arch_prepare_memory_region(slot, uaddr, memory_size)
            if change.new is not None and self.kernel.memslot_gpa_segment_rule:
                gmap_map_segment_rule(slot, guest_phys_addr)
            if change.kind is Change.CREATE:
                assert change.new is not None
                _check_model_fits(change.new.npages, slot, self.hugepages)
                region = self.ram.allocate_at(uaddr, memory_size)
                self._regions[slot] = region
                self._mmus[slot] = S390Mmu(
                    change.new.npages,
                    self.esop,
                    region.offset,
                    guest_phys_addr,
                    kernel=self.kernel.name,
                    hugepages=self.hugepages,
                )
            elif change.kind is Change.DELETE:
                self._retire(self._mmus.pop(slot).stats)
                self.ram.release(self._regions.pop(slot))
            elif change.kind is Change.MOVE:
                self._mmus[slot].guest_base = guest_phys_addr  # the gmap moves, ptes stay
            self.memslots.commit(change)
            if change.new is None or not change.new.log_dirty_pages:
                # __kvm_set_memory_region: no KVM_MEM_LOG_DIRTY_PAGES, no dirty_bitmap; a
                # bitmap allocated when logging starts again is zeroed.
                self._marks.pop(slot, None)
            self._layout = None
            return change

    # --- dirty log --------------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> Harvest:
        """kvm_vm_ioctl_get_dirty_log (3.16.0): sync, copy out the slot's bitmap, clear it."""
        with self._lock:
            memslot = self.memslots.for_dirty_log(slot)
            mmu = self._mmus[slot]
            past = host_page_after(self.memslots, memslot)
            segment_after = guest_segment_after(self.memslots, memslot)
        generation = self.generation
        bitmap = DirtyBitmap(memslot.npages)
        dirty = mmu.harvest(bitmap.bytes_view(), memslot.npages)
        if self.kernel.sync_dirty_log_by_segment:
            self._sync_segment_after(segment_after)
        elif self.kernel.sync_dirty_log_inclusive:
            self._sync_past_the_end(memslot, past)
        with self._lock:
            marks = self._marks.pop(slot, None)
        if marks:
            before = bitmap.count()
            bitmap.set_pages(np.fromiter(marks, dtype=np.int64))
            dirty += bitmap.count() - before
        self._closed_generation(generation, dirty)
        return Harvest(bitmap, generation)

    def _sync_past_the_end(self, memslot: Memslot, past: list[tuple[Memslot, int]]) -> None:
        """The ``cur_gfn == last_gfn`` iteration of kvm_s390_sync_dirty_log (3.16.0).

        gfn_to_hva_memslot does not check the bound, so it harvests the host page after the
        slot; if that page was dirty, mark_page_dirty(kvm, base_gfn + npages) sets the bit of
        that gfn in whichever slot holds it, if any, and if that slot logs dirty pages. A host
        page past the slot that no slot backs is taken as clean (3.16 would find a PGSTE of 0
        there; 3.15's fresh HR|HC tables would report it once, into the same gfn: not modelled).
        """
        for other, page in past:
            mmu = self._mmus.get(other.slot)  # None if deleted meanwhile
            if mmu is None or not mmu.test_and_clear_user_dirty(np.array([page]))[0]:
                continue
            gfn = memslot.base_gfn + memslot.npages
            with self._lock:
                target = self.memslots.slot_for_gpa(gfn << abi.PAGE_SHIFT)
                if target is not None and target.log_dirty_pages:
                    self._marks.setdefault(target.slot, set()).add(gfn - target.base_gfn)

    def _sync_segment_after(self, after: tuple[Memslot, np.ndarray] | None) -> None:
        """The ``cur_gfn == last_gfn`` iteration of 4.19's kvm_s390_sync_dirty_log.

        gmap_sync_dirty_log_pmd walks the gmap to the guest segment after the slot and
        test-and-clears it (all 256 ptes, or the large segment entry); mark_page_dirty then sets
        those very gfns in their own slot's bitmap if it logs dirty pages, else they are lost.
        """
        if after is None:
            return
        other, pages = after
        mmu = self._mmus.get(other.slot)  # None if deleted meanwhile
        if mmu is None:
            return
        dirty = pages[mmu.test_and_clear_user_dirty(pages)]
        with self._lock:
            current = self.memslots.get(other.slot)
            if dirty.size and current is not None and current.log_dirty_pages:
                self._marks.setdefault(other.slot, set()).update(dirty.tolist())

    def overreach(self, slot: int) -> list[tuple[int, int]]:
        """Pages of other slots a GET of ``slot`` consumes without reporting them to their own
        slot (see :func:`kvmshim.s390.kvm_s390.sync_dirty_log_overreach`)."""
        with self._lock:
            memslot = self.memslots.get(slot)
            if memslot is None or not self.kernel.sync_dirty_log_inclusive:
                return []
            return sync_dirty_log_overreach(
                self.memslots, memslot, self.kernel.sync_dirty_log_by_segment
            )

    def check_clear_dirty_log(self, slot: int, first_page: int, num_pages: int) -> None:
        """KVM_CLEAR_DIRTY_LOG's argument rules (s390 has no such ioctl; the rules are KVM's)."""
        with self._lock:
            self.memslots.for_clear_dirty_log(slot, first_page, num_pages)

    # --- accesses ---------------------------------------------------------------------------
    def write_pages(self, gfns: np.ndarray, value: int, path: WritePath) -> int:
        """Store ``value`` (LE u64) into the first 8 bytes of every page in ``gfns``.

        Returns the pages these stores newly dirtied (:meth:`S390Mmu.guest_store`): what the
        workload's per-vCPU dirty ring counts. DMA and kernel-mapping stores set no UC (the
        seed's gap), so they newly dirty nothing here: 0.
        """
        gfns = np.asarray(gfns, dtype=np.int64)
        stamp = np.uint64(value)
        newly = 0
        for slot, pages in list(self._locate(gfns)):
            words, at = self._regions[slot].words, pages * WORDS_PER_PAGE

            def commit(words: np.ndarray = words, at: np.ndarray = at) -> None:
                words[at] = stamp
                words[at + 1] = np.uint64(next(self._store_seq))

            newly += self._access(self._mmus[slot], pages, path, commit)
        self._writes[path] += gfns.size
        return newly

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
        """set_guest_storage_key: in 3.15 and 3.16 an intercepted PFMF with SK gets there (a
        guest SSKE is interpreted by SIE after its first intercept) [inferred, research §5]."""
        for slot, pages in self._locate(np.array([gpa >> abi.PAGE_SHIFT], dtype=np.int64)):
            self._mmus[slot].set_guest_storage_key(pages, key)

    def saved_storage_keys(self) -> dict[int, bytes]:
        with self._lock:
            mmus = dict(self._mmus)
        return {
            slot: mmu.get_guest_storage_key(slice(0, mmu.npages)).tobytes()
            for slot, mmu in mmus.items()
        }

    def restore_storage_keys(self, slot: int, keys: bytes) -> None:
        with self._lock:
            mmu = self._mmus[slot]
        mmu.restore_guest_storage_keys(np.frombuffer(keys, dtype=np.uint8))

    def get_storage_keys(self, start_gfn: int, count: int) -> np.ndarray | None:
        """kvm_s390_get_skeys (4.19 arch/s390/kvm/kvm-s390.c): every frame through its memslot
        (EFAULT for a gap, nothing read), each key as get_guest_storage_key gives it
        (:meth:`S390Mmu.get_guest_storage_key`). Never None: the model's mm uses storage keys
        (see :mod:`kvmshim.s390.reference.common`), so KVM_S390_GET_SKEYS_NONE cannot happen."""
        if not 1 <= count <= abi.KVM_S390_SKEYS_MAX:
            raise KvmError(
                errno.EINVAL,
                f"a count of {count} keys is outside 1..{abi.KVM_S390_SKEYS_MAX} "
                "(KVM_S390_SKEYS_MAX)",
            )
        parts = [
            self._mmus[slot].get_guest_storage_key(pages)
            for slot, pages in self._runs(start_gfn, count)
        ]
        return np.concatenate(parts)

    def _runs(self, gfn: int, count: int) -> list[tuple[int, slice]]:
        """Frames [gfn, gfn + count) as (slot, page slice) runs in frame order; EFAULT, before
        anything is read, if one is in no memslot. Slices, not page lists: a million frames
        cost no per-frame lookup (gfn_to_hva per frame is the kernel's way, not a model's)."""
        end, runs = gfn + count, []
        with self._lock:
            for memslot in self.memslots.sorted_slots():
                if gfn < memslot.base_gfn:
                    break  # a hole before this slot
                lo, hi = gfn - memslot.base_gfn, min(end, memslot.base_gfn + memslot.npages)
                if lo < memslot.npages:
                    runs.append((memslot.slot, slice(lo, hi - memslot.base_gfn)))
                    gfn = hi
                if gfn == end:
                    return runs
        raise KvmError(errno.EFAULT, f"guest address {gfn << abi.PAGE_SHIFT:#x} is in no memslot")

    def arm_ipte_notify(self, gpa: int, length: int) -> None:
        """gmap_ipte_notify: KVM arms this for a vCPU's prefix pages."""
        if gpa % abi.PAGE_SIZE or length % abi.PAGE_SIZE:
            raise KvmError(errno.EINVAL, "IPTE notify range must be page aligned")
        for slot, pages in self._locate(gfn_span(gpa, length)):
            self._mmus[slot].gmap_ipte_notify(pages)

    def _access(
        self, mmu: S390Mmu, pages: np.ndarray, path: WritePath, commit: Callable[[], None]
    ) -> int:
        """One slot's stores by ``path``; the pages they newly dirtied (0 off the guest path)."""
        if path is WritePath.GUEST:
            return mmu.guest_store(pages, commit)
        mmu.io_store(pages, commit)
        return 0

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
            self._marks.clear()
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


def _check_model_fits(npages: int, slot: int, hugepages: bool = False) -> None:
    """ENOMEM, as KVM's own bitmap allocation would fail, rather than the OOM killer later.

    The model's pte, PGSTE and key arrays are real memory (the guest RAM file is sparse); a slot
    whose arrays do not fit in what the host has available is refused before any is allocated.
    """
    need = int(npages * (S390Mmu.BYTES_PER_HUGE_PAGE if hugepages else S390Mmu.BYTES_PER_PAGE))
    have = memory_available()
    if need > have:
        raise KvmError(
            errno.ENOMEM,
            f"the model of {npages} pages needs {_mib(need)}; {_mib(have)} is available",
            slot,
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
