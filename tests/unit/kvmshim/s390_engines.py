"""One interface over the per-page reference and the vectorised MMU, so tests run on both, for
any kernel generation."""

from __future__ import annotations

import numpy as np

from kvmshim.s390 import bits as b
from kvmshim.s390 import reference as ref
from kvmshim.s390.generations import DEFAULT_KERNEL
from kvmshim.s390.mmu import S390Mmu
from kvmshim.s390.reference import common


class RefEngine:
    """Runs each operation page by page through the kernel-named reference functions."""

    name = "reference"

    def __init__(
        self,
        npages: int,
        esop: bool,
        frame_base: int = 0,
        guest_base: int = 0,
        kernel: str = DEFAULT_KERNEL,
        hugepages: bool = False,
    ):
        self.mm = ref.new_mm(npages, kernel, esop, frame_base, guest_base, hugepages)
        self.k = self.mm.pgtable
        self.npages = npages
        self.notified: list[int] = []
        self.mm.notifiers.append(self.notified.append)
        self.faults = {"translation": 0, "protection": 0}

    def _count(self, taken):
        if taken:
            self.faults[taken] += 1

    def store(self, pages):
        for p in pages:
            self._count(common.guest_store(self.mm, int(p)))

    def load(self, pages):
        for p in pages:
            self._count(common.guest_load(self.mm, int(p)))

    def io_store(self, pages):
        for p in pages:
            common.io_store(self.mm, int(p))

    def set_key(self, pages, key):
        # 4.19 emulates the guest's SSKE (always, with 1 MiB pages): the page is faulted in first
        # if the host has no pmd for it. 3.x reach set_guest_storage_key from PFMF directly.
        set_key = getattr(self.k, "handle_sske", self.k.set_guest_storage_key)
        for p in pages:
            set_key(self.mm, int(p), key)

    def arm_notify(self, pages):
        for p in pages:
            self.k.gmap_ipte_notify(self.mm, int(p))

    def age(self, pages):
        if self.mm.hugepages:  # hugetlb pages are not on the LRU: nothing ages them
            return []
        present = sorted({int(p) for p in pages if common.pte_present(self.mm.pte[int(p)])})
        return [self.k.ptep_test_and_clear_young(self.mm, p) for p in present]

    def harvest(self) -> list[int]:
        return common.kvm_s390_sync_dirty_log(self.mm, self.npages)

    def harvest_pages(self, pages) -> list[int]:
        """The harvest of single pages, as another slot's inclusive bound reaches them (4.19:
        through the gmap, so only linked segments; a large one as a whole)."""
        pages = sorted({int(p) for p in pages})
        if not self.mm.segment:
            return [p for p in pages if self.k.ptep_test_and_clear_user_dirty(self.mm, p)]
        if self.mm.hugepages:
            segs = sorted({p // 256 for p in pages})
            dirty = {s for s in segs if self.k.gmap_sync_dirty_log_pmd(self.mm, s)}
            return [p for p in pages if p // 256 in dirty]
        linked = [p for p in pages if self.mm.segment[p // 256] != b._SEGMENT_ENTRY_EMPTY]
        return [p for p in linked if self.k.ptep_test_and_clear_uc(self.mm, p)]

    def arrays(self):
        return (
            np.array(self.mm.pte, dtype=np.uint64),
            np.array(self.mm.pgste, dtype=np.uint64),
            np.array(self.mm.skey, dtype=np.uint8),
        )

    def segments(self):
        """The gmap's segment entries (4.19; empty for 3.x)."""
        return np.array(self.mm.segment, dtype=np.uint64)


class VecEngine:
    """Runs each operation as one batch through the vectorised MMU."""

    name = "vectorised"

    def __init__(
        self,
        npages: int,
        esop: bool,
        frame_base: int = 0,
        guest_base: int = 0,
        kernel: str = DEFAULT_KERNEL,
        harvest_chunk: int = 64,
        hugepages: bool = False,
    ):
        self.mmu = S390Mmu(
            npages,
            esop=esop,
            frame_base=frame_base,
            guest_base=guest_base,
            harvest_chunk=harvest_chunk,
            kernel=kernel,
            hugepages=hugepages,
        )
        self.npages = npages
        self.notified: list[int] = []
        self.mmu.notifiers.append(lambda gaddrs: self.notified.extend(int(g) for g in gaddrs))

    @property
    def faults(self):
        s = self.mmu.stats
        return {"translation": s.translation_faults, "protection": s.protection_faults}

    def store(self, pages):
        self.mmu.guest_store(np.asarray(pages, dtype=np.int64))

    def load(self, pages):
        self.mmu.guest_load(np.asarray(pages, dtype=np.int64))

    def io_store(self, pages):
        self.mmu.io_store(np.asarray(pages, dtype=np.int64))

    def set_key(self, pages, key):
        self.mmu.set_guest_storage_key(np.asarray(pages, dtype=np.int64), key)

    def arm_notify(self, pages):
        self.mmu.gmap_ipte_notify(np.asarray(pages, dtype=np.int64))

    def age(self, pages):
        return self.mmu.ptep_test_and_clear_young(np.asarray(pages, dtype=np.int64)).tolist()

    def harvest(self) -> list[int]:
        out = np.zeros(-(-self.npages // 64) * 8, dtype=np.uint8)
        count = self.mmu.harvest(out)
        pages = np.flatnonzero(np.unpackbits(out, bitorder="little")).tolist()
        assert count == len(pages)
        return pages

    def harvest_pages(self, pages) -> list[int]:
        idx = np.unique(np.asarray(pages, dtype=np.int64))
        return idx[self.mmu.test_and_clear_user_dirty(idx)].tolist()

    def arrays(self):
        return self.mmu.pte.copy(), self.mmu.pgste.copy(), self.mmu.skey.copy()

    def segments(self):
        return self.mmu.segment.copy()


ENGINES = [RefEngine, VecEngine]
