"""The vectorised s390 MMU: the primitives of :mod:`kvmshim.s390.reference` over whole arrays.

One engine for every kernel generation: where generations differ, it reads a field of its
:class:`~kvmshim.s390.generations.KernelGeneration` (bit values, behaviour switches); nothing
here compares kernel names.

State per host page: pte (u64), PGSTE (u64) and the real storage key of its frame (u8): 17 bytes.
The kernel keeps a table's 256 ptes and 256 PGSTEs in one 4 KiB page (the PGSTE of ``ptep`` is
``ptep[PTRS_PER_PTE]``); here they are two contiguous arrays with the same index, because numpy
passes over contiguous memory run about three times faster than over interleaved halves.

Every method takes a batch of page indices and leaves the arrays exactly as running the
generation's reference function once per page (in any order) would;
``tests/unit/kvmshim/test_s390_mmu.py`` checks this with hypothesis. Batches are processed per
distinct page, which is what the kernel does too: the first access to a page faults, the rest of
the batch finds it mapped.

Concurrency: the PGSTE lock (the PCL bit) is one lock per harvest chunk (256 tables). Every
operation but the harvest takes ``lock`` (the MMU's own: stats, the gmap, the notifiers) and then
the chunk locks of the pages it touches, in ascending order, and holds them from its fault-in to
its data commit. A harvest worker takes one chunk lock at a time and never ``lock`` while
holding it, so there is no cycle, and workers on different chunks never wait for each other.
So, per chunk as before: a store that finished before a harvest started released that chunk's
lock before the harvest took it, and is seen; one that overlaps it either set UC before its
chunk was harvested or found the pte protected afterwards and faults, setting UC for the next
harvest. The commit of data happens under the chunk lock, so no store can land between a
harvest's test-and-clear of its page and the protection that makes the next store fault.

The empty-chunk hint (``_maybe_dirty``, the model's own; the kernel keeps none): each operation
that may set the harvested bit sets its chunks' flag under their chunk locks, before it changes
anything; a harvest of a whole chunk clears it, under the same lock, when it leaves nothing a
second harvest could find. A chunk whose flag is clear is answered clean without reading it,
exactly what a scan would answer: see :meth:`S390Mmu._harvest_one` for why, per generation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from kvmshim.errors import KvmShimError
from kvmshim.s390 import bits as b
from kvmshim.s390.generations import (
    DEFAULT_KERNEL,
    GENERATIONS,
    KernelGeneration,
    kernel_generation,
)
from kvmshim.s390.harvest_pool import run_split

U64 = np.uint64
_PRESENT = U64(b._PAGE_PRESENT)
_YOUNG = U64(b._PAGE_YOUNG)
_DIRTY = U64(b._PAGE_DIRTY)
_READ = U64(b._PAGE_READ)
_WRITE = U64(b._PAGE_WRITE)
_PROTECT = U64(b._PAGE_PROTECT)
_INVALID = U64(b._PAGE_INVALID)
_PAGE_MASK = U64(b.PAGE_MASK)
_PAGE_READ_PROT = U64(b.PAGE_READ)
_HC = U64(b.PGSTE_HC_BIT)
_HR = U64(b.PGSTE_HR_BIT)
_GUEST_RC = U64(b.PGSTE_GR_BIT | b.PGSTE_GC_BIT)
_ACC_FP = U64(b.PGSTE_ACC_BITS | b.PGSTE_FP_BIT)
_KEY_FIELDS = U64(b.PGSTE_ACC_BITS | b.PGSTE_FP_BIT | b.PGSTE_GR_BIT | b.PGSTE_GC_BIT)
_GPS_ZERO = U64(b._PGSTE_GPS_ZERO)
_NO_BITS = U64(0)
_SEG_INVALID = U64(b._SEGMENT_ENTRY_INVALID)
_SEG_PROTECT = U64(b._SEGMENT_ENTRY_PROTECT)
_SEG_LARGE = U64(b._SEGMENT_ENTRY_LARGE)
_SEG_EMPTY = U64(b._SEGMENT_ENTRY_EMPTY)
_SEG_UC = U64(b._SEGMENT_ENTRY_GMAP_UC)
_SEG_IN = U64(b._SEGMENT_ENTRY_GMAP_IN)
_SEG_PAGES = b.PAGES_PER_SEGMENT
_KEY_RC = b._PAGE_REFERENCED | b._PAGE_CHANGED
_KEY_ACC_F = b._PAGE_ACC_BITS | b._PAGE_FP_BIT
_GUEST_RC_SHIFT = U64(b.GUEST_RC_SHIFT)
_HOST_RC_SHIFT = U64(b.HOST_RC_SHIFT)
_KEY_ACC_SHIFT = U64(b.KEY_ACC_SHIFT)
# Shifts of the branch-free dense harvest (see _protect_dense); the harvested bit's shift is
# per generation and checked in S390Mmu.__init__.
_PRESENT_TO_PROTECT = U64(b._PAGE_PROTECT.bit_length() - b._PAGE_PRESENT.bit_length())
_WRITE_SHIFT = U64(b._PAGE_WRITE.bit_length() - 1)
_PROTECT_BITS = b._PAGE_PROTECT.bit_length()
_UC_IN_BYTE = np.uint8(7)  # the harvested bit's shift within its byte (_check_dense_shifts)
assert b._PAGE_INVALID == b._PAGE_PROTECT << 1, "non-ESOP shift assumes INVALID = PROTECT << 1"

# Pages per harvest step and per chunk lock: 512 page tables (512 MiB of guest), 1 MiB of
# PGSTEs, so a sparse chunk's one temporary (a byte per page) and a dense chunk's two (u64)
# stay in L2, and the ~15 numpy calls per chunk are paid 32 times for 16 GiB, not 64.
HARVEST_CHUNK = 512 * b.PTRS_PER_PTE
# A chunk with more than 1/DENSE_FRACTION dirty pages is updated with whole-chunk masked passes
# instead of gather/scatter on the dirty indices.
DENSE_FRACTION = 16
MAX_FAULT_ROUNDS = 4

IpteNotifier = Callable[[np.ndarray], None]


# --- pte modifiers over arrays (asm/pgtable.h) --------------------------------------------------
def pte_mkdirty(pte: np.ndarray, soft_dirty: np.uint64 = _NO_BITS) -> np.ndarray:
    pte = pte | _DIRTY | soft_dirty  # 4.19 also sets _PAGE_SOFT_DIRTY
    return np.where(pte & _WRITE, pte & ~_PROTECT, pte)


def pte_mkwrite(pte: np.ndarray) -> np.ndarray:
    pte = pte | _WRITE
    return np.where(pte & _DIRTY, pte & ~_PROTECT, pte)


def pte_mkyoung(pte: np.ndarray) -> np.ndarray:
    pte = pte | _YOUNG
    return np.where(pte & _READ, pte & ~_INVALID, pte)


def pte_mkold(pte: np.ndarray) -> np.ndarray:
    return (pte & ~_YOUNG) | _INVALID


def pgste_set_pte(
    pgste: np.ndarray,
    entry: np.ndarray,
    esop: bool,
    kernel: KernelGeneration = GENERATIONS[DEFAULT_KERNEL],
) -> tuple[np.ndarray, np.ndarray]:
    """pgste_set_pte over arrays: returns (pgste, entry to store).

    Without ESOP, present writable ptes are forced dirty (3.16: valid ones only); 3.16 sets UC
    for every present, writable, valid, unprotected entry (the seed's rule), 3.15 nothing.
    """
    present_write = ((entry & _PRESENT) != 0) & ((entry & _WRITE) != 0)
    writable = present_write & ((entry & _INVALID) == 0)
    if not esop:  # force the dirty bit on for all writable ptes
        forced = present_write if kernel.force_dirty_on_invalid else writable
        entry = np.where(forced, (entry | _DIRTY) & ~_PROTECT, entry)
    if not kernel.user_dirty_bit:
        return pgste, entry
    user_dirty = writable & ((entry & _PROTECT) == 0)
    return np.where(user_dirty, pgste | U64(kernel.user_dirty_bit), pgste), entry


def check_hugepages(gen: KernelGeneration, hugepages: bool) -> None:
    """KvmShimError unless the generation can back guest memory with 1 MiB pages."""
    if hugepages and not gen.hugepages:
        with_them = ", ".join(k for k, g in GENERATIONS.items() if g.hugepages)
        raise KvmShimError(
            f"kernel {gen.name} cannot back guest memory with 1 MiB pages "
            f"(KVM_CAP_S390_HPAGE_1M is new in 4.19; choose kernel {with_them})"
        )


class _Scratch:
    """One harvest worker's temporaries, a chunk long each (the chunk functions' ``out=``),
    allocated on first use: a worker whose chunks are all clean allocates nothing."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self._t64: np.ndarray | None = None
        self._t64b: np.ndarray | None = None
        self._t8: np.ndarray | None = None

    @property
    def t64(self) -> np.ndarray:
        if self._t64 is None:
            self._t64 = np.empty(self.chunk, dtype=U64)
        return self._t64

    @property
    def t64b(self) -> np.ndarray:
        if self._t64b is None:
            self._t64b = np.empty(self.chunk, dtype=U64)
        return self._t64b

    @property
    def t8(self) -> np.ndarray:
        if self._t8 is None:
            self._t8 = np.empty(self.chunk, dtype=np.uint8)
        return self._t8


@dataclass
class MmuStats:
    """Event counters for metrics; plain ints bumped once per batch, read at scrape time."""

    translation_faults: int = 0
    protection_faults: int = 0
    ipte_notifications: int = 0
    harvested_dirty: int = 0
    guest_stores: int = 0
    guest_loads: int = 0
    io_stores: int = 0


class S390Mmu:
    """ptes, PGSTEs and storage keys for the host pages backing one memslot."""

    BYTES_PER_PAGE = 8 + 8 + 1  # pte, PGSTE, storage key
    BYTES_PER_HUGE_PAGE = 1 + 8 / b.PAGES_PER_SEGMENT  # storage key, 1/256 of a segment entry

    def __init__(
        self,
        npages: int,
        esop: bool = True,
        frame_base: int = 0,
        guest_base: int = 0,
        harvest_chunk: int = HARVEST_CHUNK,
        kernel: str = DEFAULT_KERNEL,
        hugepages: bool = False,
    ) -> None:
        if harvest_chunk <= 0 or harvest_chunk % 64:
            raise ValueError("harvest_chunk must be a positive multiple of 64")
        self.kernel = gen = kernel_generation(kernel)
        check_hugepages(gen, hugepages)
        # page_table_alloc_pgste: whole tables, ptes _PAGE_INVALID, the generation's PGSTE.
        ntables = -(-npages // b.PTRS_PER_PTE)
        n = ntables * b.PTRS_PER_PTE
        self.npages = npages
        self.hugepages = hugepages
        # With 1 MiB pages there are no page tables: the gmap's segment entry per 1 MiB (4.19
        # mm/gmap.c) holds the dirty and notify state; storage keys stay per 4 KiB frame.
        self.segment = np.full(ntables if hugepages else 0, _SEG_EMPTY, dtype=U64)
        n_tables = 0 if hugepages else n
        self.esop = esop
        self.frame_base = frame_base
        self.guest_base = guest_base
        self.pte = np.full(n_tables, _INVALID, dtype=U64)
        self.pgste = np.full(n_tables, U64(gen.pgste_initial), dtype=U64)
        self._in = U64(gen.pgste_in_bit)
        self._dirty_bit = U64(gen.harvest_bit)
        self._key_change = U64(gen.key_change_bit)
        if gen.harvest_protects:
            self._check_dense_shifts(gen)
            self._dirty_to_protect = U64(gen.harvest_bit.bit_length() - _PROTECT_BITS)
            self._uc_byte = (gen.harvest_bit.bit_length() - 1) // 8
            self._harvest_chunk = self._harvest_chunk_protect
        else:
            self._harvest_chunk = self._harvest_chunk_fold
        self.skey = np.zeros(n, dtype=np.uint8)
        self.lock = threading.Lock()
        self._notify_lock = threading.Lock()  # harvest workers notify from several threads
        self.notifiers: list[IpteNotifier] = []
        self.stats = MmuStats()
        self.harvest_chunk = harvest_chunk
        self._table_pages = n_tables
        nchunks = -(-n_tables // harvest_chunk)
        self._chunk_locks = [threading.Lock() for _ in range(nchunks)]
        # Per chunk: was it dirty at its last harvest? Only picks the path (a chunk that was
        # clean is first checked with one OR-reduction); both paths scan exactly.
        self._chunk_was_dirty = np.ones(nchunks, dtype=bool)
        # Per chunk: may a harvest find anything? (the hint; see the module docstring)
        self._maybe_dirty = np.ones(nchunks, dtype=bool)
        # Per chunk: may a PGSTE hold IN? Only arming sets IN, and a dense harvest that finds
        # none clears this, so dense chunks skip the notify pass when no prefix page is there.
        self._may_have_in = np.ones(nchunks, dtype=bool)
        self._soft_dirty = U64(gen.pte_soft_dirty)
        # 4.19 harvests through the gmap: a segment the guest never touched is not linked there
        # and its PGSTEs are skipped (a key change can set UC in one; it waits for the link).
        self.linked = np.zeros(ntables if gen.sync_dirty_log_by_segment else 0, dtype=bool)
        self._unlinked = self.linked.size
        # 1 MiB pages: is the host's huge pmd present (its 256 keys were reset when it came)?
        self.hpmd_present = np.zeros(self.segment.size, dtype=bool)

    @contextmanager
    def _locked(self, pages: np.ndarray | slice, mark: bool = True) -> Iterator[None]:
        """``lock``, then the chunk locks of ``pages`` in ascending order; with ``mark``, the
        caller may set a harvested bit there, so those chunks lose the empty hint first."""
        with self.lock:
            chunks = self._chunks_of(pages)
            locks = [self._chunk_locks[c] for c in chunks.tolist()]
            for lock in locks:
                lock.acquire()
            try:
                if mark:
                    self._maybe_dirty[chunks] = True
                yield
            finally:
                for lock in reversed(locks):
                    lock.release()

    def _chunks_of(self, pages: np.ndarray | slice) -> np.ndarray:
        """The distinct harvest chunks of ``pages``, ascending (none with 1 MiB pages)."""
        nchunks = len(self._chunk_locks)
        if not nchunks:
            return np.zeros(0, dtype=np.int64)
        if isinstance(pages, slice):
            lo, hi, _ = pages.indices(self._table_pages)
            return np.arange(lo // self.harvest_chunk, -(-hi // self.harvest_chunk))
        chunk = self.harvest_chunk
        if self.linked.size and chunk % _SEG_PAGES:
            # 4.19: linking a segment makes UC anywhere in it visible, so a chunk smaller than
            # a segment takes (and marks) every chunk of the segments it touches.
            first = pages // _SEG_PAGES * _SEG_PAGES
            steps = [*range(0, _SEG_PAGES, min(chunk, _SEG_PAGES)), _SEG_PAGES - 1]
            pages = np.concatenate([first + d for d in steps])
        seen = np.zeros(nchunks, dtype=bool)
        seen[pages // chunk] = True
        return np.flatnonzero(seen)

    # --- accesses ---------------------------------------------------------------------------
    def guest_store(self, pages: np.ndarray, commit: Callable[[], None] | None = None) -> int:
        """Guest stores to ``pages``: fault each in writable, run ``commit`` (the data), set R|C.

        Returns how many pages these stores newly dirtied: the pages the next harvest reports
        because of them (the model's per-vCPU dirty ring entries), each counted once. See
        :meth:`_harvest_indicator` for what "dirty" means per generation.
        """
        pages = np.asarray(pages, dtype=np.int64)
        with self._locked(pages):
            before = self._harvest_indicator(pages)
            if self.hugepages:
                self._gmap_fault(pages, write=True)
            else:
                self._fault_in(pages, write=True)
                self._gmap_link_tables(pages)
            if commit is not None:
                commit()
            self.skey[pages] |= np.uint8(_KEY_RC)
            self.stats.guest_stores += pages.size
            return self._newly_dirtied(pages, before)

    def _harvest_indicator(self, pages: np.ndarray) -> np.ndarray:
        """Per entry of ``pages`` (under the locks): is it dirty for the next harvest now?

        3.16/4.19 (4 KiB): PGSTE_UC. 4.19 (1 MiB): the segment's GMAP_UC. 3.15: PGSTE_HC, or
        the real key's C bit behind a valid pte (the harvest folds C into HC first; the model
        keys frames by page index, as :meth:`guest_store` sets them).
        """
        dirty: np.ndarray
        if self.hugepages:
            dirty = (self.segment[pages // _SEG_PAGES] & _SEG_UC) != 0
            return dirty
        dirty = (self.pgste[pages] & self._dirty_bit) != 0
        if self.kernel.harvest_folds_key:
            valid = (self.pte[pages] & _INVALID) == 0
            dirty |= valid & ((self.skey[pages] & np.uint8(b._PAGE_CHANGED)) != 0)
        return dirty

    def _newly_dirtied(self, pages: np.ndarray, before: np.ndarray) -> int:
        """Pages whose harvest indicator went clean → dirty since ``before``; a 1 MiB segment
        counts as its 256 pages (the harvest reports all of them)."""
        went = pages[~before & self._harvest_indicator(pages)]
        if not went.size:
            return 0
        if self.hugepages:
            return int(np.unique(went // _SEG_PAGES).size) * _SEG_PAGES
        return int(np.unique(went).size)

    def guest_load(self, pages: np.ndarray, commit: Callable[[], None] | None = None) -> None:
        """Guest loads: only invalid ptes fault; the key gets R."""
        pages = np.asarray(pages, dtype=np.int64)
        with self._locked(pages):
            if self.hugepages:
                self._gmap_fault(pages, write=False)
            else:
                self._fault_in(pages, write=False)
                self._gmap_link_tables(pages)
            if commit is not None:
                commit()
            self.skey[pages] |= np.uint8(b._PAGE_REFERENCED)
            self.stats.guest_loads += pages.size

    def io_store(self, pages: np.ndarray, commit: Callable[[], None] | None = None) -> None:
        """DMA or kernel-mapping stores: key R|C only. UC is not touched — the seed's gap; a
        generation that harvests the key (3.15) sees the C bit if the pte is valid then."""
        pages = np.asarray(pages, dtype=np.int64)
        with self._locked(pages):  # 3.15's harvest folds the key's C bit into HC
            if commit is not None:
                commit()
            self.skey[pages] |= np.uint8(_KEY_RC)
            self.stats.io_stores += pages.size

    def set_guest_storage_key(self, pages: np.ndarray, key: int, nq: bool = False) -> None:
        """set_guest_storage_key on each page (an intercepted PFMF with SK; see the reference).

        No fault first (3.16.0 and 3.15.5; the fault-and-retry is 3.17): a protected pte stays
        protected. A change of ACC/F/R/C sets the generation's key-change bit (UC / HC).
        """
        idx = np.unique(np.asarray(pages, dtype=np.int64))
        with self._locked(idx):
            if self.hugepages:
                # 4.19 set_guest_storage_key on a large pmd: the whole key into the frame, no
                # PGSTE and no dirty state: a key change on a 1 MiB page does not make it go
                # again. A host pmd not yet present is -EFAULT; the caller write-faults it in
                # (fixup_user_fault) and retries.
                self._hugetlb_fault(np.unique(idx // _SEG_PAGES))
                self.skey[idx] = np.uint8(key & 0xFE)
                return
            old = self.pgste[idx]
            new = old & ~_KEY_FIELDS
            new |= U64((key & _KEY_RC) << b.GUEST_RC_SHIFT)
            new |= U64((key & _KEY_ACC_F) << b.KEY_ACC_SHIFT)
            p = self.pte[idx]
            valid = (p & _INVALID) == 0
            if valid.any():
                frames = self._key_index(p[valid])
                host_rc = (self.skey[frames] & np.uint8(_KEY_RC)).astype(U64)
                self.skey[frames] = np.uint8(key & _KEY_ACC_F)
                new[valid] |= host_rc << _HOST_RC_SHIFT
            changed = ((new ^ old) & _KEY_FIELDS) != 0
            new[changed] |= self._key_change
            self.pgste[idx] = new

    def get_guest_storage_key(self, pages: np.ndarray | slice) -> np.ndarray:
        """The guest's view of each page's key, as KVM_S390_GET_SKEYS reads it: 4.19
        get_guest_storage_key (the reference's namesake), for every generation's state.

        A valid pte's real key, else the PGSTE's ACC/F; either way with the PGSTE's GR/GC as
        R/C. A 1 MiB page has no PGSTE: its frame's real key once the host's huge pmd is
        present, 0 before (4.19's large-pmd and "not yet mapped" cases). Only reads: no UC, no
        R bit, no fault — a migration reading keys must not dirty the guest. ``pages`` may be
        a slice: a whole range without gathers (KVM_S390_GET_SKEYS's case).
        """
        idx = pages if isinstance(pages, slice) else np.asarray(pages, dtype=np.int64)
        with self._locked(idx, mark=False):
            if self.hugepages:
                of = np.arange(*idx.indices(self.skey.size)) if isinstance(idx, slice) else idx
                present = self.hpmd_present[of // _SEG_PAGES]
                return np.where(present, self.skey[idx], np.uint8(0))
            pg, pte = self.pgste[idx], self.pte[idx]
            key = ((pg & _ACC_FP) >> _KEY_ACC_SHIFT).astype(np.uint8)
            valid = (pte & _INVALID) == 0
            key[valid] = self.skey[self._key_index(pte[valid])]
            key |= ((pg & _GUEST_RC) >> _GUEST_RC_SHIFT).astype(np.uint8)
            return key

    def restore_guest_storage_keys(self, keys: np.ndarray) -> None:
        """Give a fresh MMU (every pte invalid) the guest keys a previous instance of the model
        had: the model's own state across the daemon's restart, where a real kernel would have
        kept its keys; no kernel function runs, so nothing becomes dirty. With 4 KiB pages
        the keys go into the PGSTEs (ACC/F, and R/C as GR/GC), which is where an invalid pte's
        key lives; with 1 MiB pages into the frames, their host pmds then present."""
        keys = np.asarray(keys, dtype=np.uint8)
        if keys.size != self.npages:
            raise ValueError(f"{keys.size} keys for {self.npages} pages")
        with self.lock:
            if self.hugepages:
                self.skey[: self.npages] = keys
                self.hpmd_present |= keys.reshape(-1, _SEG_PAGES).any(axis=1)
                return
            if not (self.pte[: self.npages] == _INVALID).all():
                raise ValueError("keys are restored into a fresh MMU only")
            k = keys.astype(U64)
            pg = self.pgste[: self.npages] & ~_KEY_FIELDS
            pg |= (k & U64(_KEY_ACC_F)) << _KEY_ACC_SHIFT
            pg |= (k & U64(_KEY_RC)) << _GUEST_RC_SHIFT
            self.pgste[: self.npages] = pg

    def gmap_ipte_notify(self, pages: np.ndarray) -> None:
        """Arm IPTE notification: fault each page in writable, then set PGSTE_IN_BIT."""
        idx = np.unique(np.asarray(pages, dtype=np.int64))
        with self._locked(idx):
            if self.hugepages:
                self._gmap_protect_pmd_notify(idx)
                return
            self._gmap_link_tables(idx)
            for _ in range(MAX_FAULT_ROUNDS):
                if idx.size == 0:
                    return
                self._handle_mm_fault(idx, write=True)
                p = self.pte[idx]
                ok = (p & (_INVALID | _PROTECT)) == 0
                okidx = idx[ok]
                self._may_have_in[okidx // self.harvest_chunk] = True
                pg = self.pgste[okidx] | self._in
                if self.kernel.notify_arm_sets_pte:
                    pg, entry = pgste_set_pte(pg, p[ok], self.esop, self.kernel)
                    self.pte[okidx] = entry
                self.pgste[okidx] = pg
                idx = idx[~ok]
            raise AssertionError("gmap_ipte_notify: fault did not resolve")

    def ptep_test_and_clear_young(self, pages: np.ndarray) -> np.ndarray:
        """Age present pages; returns which of the (distinct, sorted) present pages were young.

        The key is not folded into the PGSTE (3.16.0 and 3.15.5; 3.17.0 added that).
        """
        idx = np.unique(np.asarray(pages, dtype=np.int64))
        with self._locked(idx):
            if self.hugepages:  # hugetlb pages are not on the LRU: nothing ages them
                return np.zeros(0, dtype=bool)
            oldpte = self.pte[idx]
            present = (oldpte & _PRESENT) != 0
            idx, oldpte = idx[present], oldpte[present]
            pg = self._pgste_ipte_notify(idx, self.pgste[idx])
            if self.kernel.xchg_commit_keys:  # the new pte is invalid: fold the key first
                pg = self._pgste_update_all(oldpte, pg)
            young: np.ndarray = (oldpte & _YOUNG) != 0
            pte = pte_mkold(oldpte)
            pg, pte = pgste_set_pte(pg, pte, self.esop, self.kernel)
            self.pte[idx] = pte
            self.pgste[idx] = pg
            return young

    # --- the harvest ------------------------------------------------------------------------
    def harvest(self, out: np.ndarray, npages: int | None = None) -> int:
        """ptep_test_and_clear_user_dirty for pages [0, npages): KVM-layout bitmap into ``out``.

        The loop of kvm_s390_sync_dirty_log over the slot's own pages; its inclusive bound (one
        page more) needs the memslot layout: the backend does it with
        :meth:`test_and_clear_user_dirty`.

        ``out`` is a uint8 array of at least ceil(npages/8) bytes; returns the dirty count.
        """
        npages = self.npages if npages is None else npages
        if self.hugepages:
            with self.lock:
                dirty = self._sync_segments(np.arange(-(-npages // _SEG_PAGES)))
            out[: dirty.size * _SEG_PAGES // 8] = np.repeat(dirty.astype(np.uint8) * 0xFF, 32)
            total = int(np.count_nonzero(dirty)) * _SEG_PAGES
            self.stats.harvested_dirty += total
            return total
        out[: -(-npages // 8)] = 0
        # Only chunks with the hint set go to the workers; each checks it again under its lock
        # (a store that sets it after this read overlaps the harvest: it is for the next one).
        todo = np.flatnonzero(self._maybe_dirty[: -(-npages // self.harvest_chunk)]).tolist()

        def harvest_chunks(lo: int, hi: int) -> int:
            scratch = _Scratch(self.harvest_chunk)
            return sum(self._harvest_one(k, npages, out, scratch) for k in todo[lo:hi])

        total = sum(run_split(harvest_chunks, len(todo)))
        with self.lock:
            self.stats.harvested_dirty += total
        return total

    def _harvest_one(self, k: int, npages: int, out: np.ndarray, scratch: _Scratch) -> int:
        """Chunk ``k`` of a harvest of [0, npages), under its chunk lock.

        The hint is cleared only after a harvest of the whole chunk that leaves nothing for a
        second one: under 3.16/4.19 every UC it can see is cleared (UC left in a segment 4.19
        has not linked stays invisible until a store, load or notify links it, which sets the
        hint); under 3.15 a fold that found nothing leaves a fixed point (no key C on a valid
        pte, no HC), but one that found something may leave key C bits behind (HC was set
        already), so the hint stays.
        """
        start = k * self.harvest_chunk
        stop = min(start + self.harvest_chunk, npages)
        with self._chunk_locks[k]:
            if not self._maybe_dirty[k]:  # cleared by a harvest running beside this one
                return 0
            count = self._harvest_chunk(start, stop, out, scratch)
            whole = stop == min(start + self.harvest_chunk, self._table_pages)
            left = count > 0 and not self.kernel.harvest_protects
            self._maybe_dirty[k] = not whole or left
            return count

    def test_and_clear_user_dirty(self, pages: np.ndarray) -> np.ndarray:
        """ptep_test_and_clear_user_dirty for the distinct ``pages``: which were dirty.

        For pages a harvest of another slot reaches (kvm_s390_sync_dirty_log's ``<=`` bound).
        """
        idx = np.unique(np.asarray(pages, dtype=np.int64))
        with self._locked(idx):  # 3.15 folds keys: C bits left behind make the next one dirty
            if self.hugepages:
                seg = np.unique(idx // _SEG_PAGES)
                dirty_seg = seg[self._sync_segments(seg)]
                return np.isin(idx // _SEG_PAGES, dirty_seg)
            if self._unlinked:
                linked = self.linked[idx // _SEG_PAGES]
                dirty = np.zeros(idx.size, dtype=bool)
                dirty[linked] = self._test_and_clear(idx[linked])
                return dirty
            return self._test_and_clear(idx)

    def _test_and_clear(self, idx: np.ndarray) -> np.ndarray:
        """The per-page harvest of ``idx`` (distinct pages), under the lock."""
        if self.kernel.harvest_folds_key:
            self.pgste[idx] = self._pgste_update_all(self.pte[idx], self.pgste[idx])
        dirty: np.ndarray = (self.pgste[idx] & self._dirty_bit) != 0
        if self.kernel.harvest_protects:
            self._protect_sparse(idx[dirty])
        else:
            self.pgste[idx[dirty]] &= ~self._dirty_bit
        return dirty

    def _harvest_chunk_fold(self, start: int, stop: int, out: np.ndarray, scratch: _Scratch) -> int:
        """Before the seed: fold each valid pte's key (pgste_update_all), test-and-clear HC."""
        idx = np.flatnonzero((self.pte[start:stop] & _INVALID) == 0) + start
        if idx.size:
            self.pgste[idx] = self._pgste_update_all(self.pte[idx], self.pgste[idx])
        pg = self.pgste[start:stop]
        dirty = (pg & self._dirty_bit) != 0
        packed = np.packbits(dirty, bitorder="little")
        out[start // 8 : start // 8 + packed.size] = packed
        np.bitwise_and(pg, ~self._dirty_bit, out=pg)
        return int(np.count_nonzero(dirty))

    def _harvest_chunk_protect(
        self, start: int, stop: int, out: np.ndarray, scratch: _Scratch
    ) -> int:
        """Since the seed: test-and-clear UC; protect or invalidate the ptes of dirty pages."""
        n = stop - start
        pg = self.pgste[start:stop]
        chunk = start // self.harvest_chunk
        uc = self._dirty_bit
        if not self._chunk_was_dirty[chunk] and not np.bitwise_or.reduce(pg) & uc:
            out[start // 8 : -(-stop // 8)] = 0
            return 0
        # UC is the top bit of one byte of each (little-endian) PGSTE: one narrow pass over
        # that byte gives 0 or 1 per page, which numpy reads as bool without a compare pass.
        uc_bytes = self.pgste.view(np.uint8)[start * 8 + self._uc_byte : stop * 8 : 8]
        dirty = np.right_shift(uc_bytes, _UC_IN_BYTE, out=scratch.t8[:n]).view(bool)
        if self._unlinked:  # 4.19: only segments linked in the gmap are walked
            dirty &= np.repeat(
                self.linked[start // _SEG_PAGES : -(-stop // _SEG_PAGES)], _SEG_PAGES
            )[:n]
        packed = np.packbits(dirty, bitorder="little")
        out[start // 8 : start // 8 + packed.size] = packed
        count = int(np.bitwise_count(packed).sum(dtype=np.int64))
        self._chunk_was_dirty[chunk] = count > 0
        if count == 0:
            return 0
        if count * DENSE_FRACTION > n and not self._unlinked:  # dense passes touch every page
            flags = np.bitwise_and(pg, uc | self._in, out=scratch.t64[:n])
            self._protect_dense(start, stop, flags, scratch.t64b[:n])
        else:
            self._protect_sparse(np.flatnonzero(dirty) + start)
        return count

    def _protect_sparse(self, idx: np.ndarray) -> None:
        """Clear UC and protect/invalidate the present ptes of the dirty pages ``idx``."""
        pg = self.pgste[idx] & ~self._dirty_bit
        pte = self.pte[idx]
        present = (pte & _PRESENT) != 0
        if not present.all():
            self.pgste[idx[~present]] = pg[~present]
            idx, pg, pte = idx[present], pg[present], pte[present]
        pg = self._pgste_ipte_notify(idx, pg)
        self.pte[idx] = self._harvest_protection(pte)
        self.pgste[idx] = pg

    def _protect_dense(self, start: int, stop: int, flags: np.ndarray, tmp: np.ndarray) -> None:
        """Same as _protect_sparse for a densely dirty chunk, in branch-free whole-chunk passes.

        ``flags`` holds each entry's PGSTE & (UC|IN); it is consumed as scratch space, and so is
        ``tmp`` (as long).
        """
        pg = self.pgste[start:stop]
        pte = self.pte[start:stop]
        uc = self._dirty_bit
        chunk = start // self.harvest_chunk
        if self._may_have_in[chunk] and not np.bitwise_or.reduce(flags) & self._in:
            self._may_have_in[chunk] = False
        if self._may_have_in[chunk] and np.count_nonzero(flags > uc):  # UC and IN: notify
            armed = np.flatnonzero((flags > uc) & ((pte & _PRESENT) != 0)) + start
            self.pgste[armed] = self._pgste_ipte_notify(armed, self.pgste[armed])
        np.bitwise_and(pg, ~uc, out=pg)
        # UC (bit 47) >> 38 lands on _PAGE_PROTECT (bit 9); IN lands on bit 8, which the AND
        # with pte << 9 (PRESENT moved to bit 9, bits 0-8 zero) drops along with absent ptes.
        add = np.right_shift(flags, self._dirty_to_protect, out=flags)
        scratch = np.left_shift(pte, _PRESENT_TO_PROTECT, out=tmp)
        np.bitwise_and(add, scratch, out=add)
        if not self.esop:  # writable ptes get INVALID (bit 10) instead: shift by the WRITE bit
            np.right_shift(pte, _WRITE_SHIFT, out=scratch)
            np.bitwise_and(scratch, U64(1), out=scratch)
            np.left_shift(add, scratch, out=add)
        np.bitwise_or(pte, add, out=pte)

    def _harvest_protection(self, pte: np.ndarray) -> np.ndarray:
        """The bit the harvest adds: PROTECT on ESOP or for read-only ptes, else INVALID."""
        if self.esop:
            return pte | _PROTECT
        return np.where(pte & _WRITE, pte | _INVALID, pte | _PROTECT)

    # --- fault handling (mm/memory.c and arch/s390/mm/fault.c) -------------------------------
    def _fault_in(self, pages: np.ndarray, write: bool) -> None:
        """Retry the access until no page faults: the CPU re-executes after each fault."""
        for round_ in range(MAX_FAULT_ROUNDS):
            pte = self.pte[pages]
            blocked = (pte & (_INVALID | _PROTECT if write else _INVALID)) != 0
            if not blocked.any():
                return
            idx = np.unique(pages[blocked])
            if round_ == 0:
                translation = int(np.count_nonzero(self.pte[idx] & _INVALID))
                self.stats.translation_faults += translation
                self.stats.protection_faults += idx.size - translation
            self._handle_mm_fault(idx, write)
        raise AssertionError("access did not resolve after faulting")

    def _handle_mm_fault(self, idx: np.ndarray, write: bool) -> None:
        """handle_pte_fault for distinct pages: none → do_fault, present → access flags."""
        pte = self.pte[idx]
        present = (pte & _PRESENT) != 0
        none = pte == _INVALID
        if not (present | none).all():
            raise AssertionError("swap/file ptes are not modelled")
        if none.any():
            ni = idx[none]
            entry = pte_mkyoung(self._frames(ni) + _PAGE_READ_PROT)  # mk_pte(page, PAGE_READ)
            if write:
                entry = pte_mkwrite(pte_mkdirty(entry, self._soft_dirty))  # maybe_mkwrite
            self._set_pte_at(ni, entry)
        if present.any():
            pi, entry = idx[present], pte[present]
            if write:
                # handle_pte_fault's pte_mkdirty for writable ptes, do_wp_page's
                # wp_page_reuse (mkyoung, mkdirty, mkwrite) for read-only ones: same result.
                entry = pte_mkwrite(pte_mkdirty(entry, self._soft_dirty))
            self._ptep_set_access_flags(pi, pte_mkyoung(entry))

    def _set_pte_at(self, idx: np.ndarray, entry: np.ndarray) -> None:
        """set_pte_at; 3.15.5 and 3.16.0 leave _PAGE_UNUSED alone (4.x clears it)."""
        pg = self.pgste[idx] & ~_GPS_ZERO
        self._pgste_set_key(pg, entry)
        pg, entry = pgste_set_pte(pg, entry, self.esop, self.kernel)
        self.pte[idx] = entry
        self.pgste[idx] = pg

    def _ptep_set_access_flags(self, idx: np.ndarray, entry: np.ndarray) -> None:
        """ptep_set_access_flags: 3.15.5 and 3.16.0 only notify, flush and set the pte; 4.19
        exchanges through ptep_xchg_commit, which also sets or folds the storage key."""
        changed = self.pte[idx] != entry  # pte_same → nothing to do
        idx, entry = idx[changed], entry[changed]
        if idx.size == 0:
            return
        pg = self._pgste_ipte_notify(idx, self.pgste[idx])
        # ptep_flush_direct's IPTE only sets INVALID in the old entry, which pgste_set_pte
        # overwrites below, so it leaves no trace here.
        if self.kernel.xchg_commit_keys:  # ptep_xchg_commit (4.19)
            old = self.pte[idx]
            was_invalid = (old & _INVALID) != 0
            if was_invalid.any():
                self._pgste_set_key(pg[was_invalid], entry[was_invalid])
            pg = self._pgste_update_all(np.where((entry & _INVALID) != 0, old, _INVALID), pg)
        pg, entry = pgste_set_pte(pg, entry, self.esop, self.kernel)
        self.pte[idx] = entry
        self.pgste[idx] = pg

    # --- PGSTE helpers ------------------------------------------------------------------------
    def _pgste_set_key(self, pg: np.ndarray, entry: np.ndarray) -> None:
        """The real key of each newly valid entry: ACC/F, and GR/GC where the generation says."""
        valid = (entry & _INVALID) == 0
        if not valid.any():
            return
        pgv = pg[valid]
        nkey = (pgv & _ACC_FP) >> _KEY_ACC_SHIFT
        if self.kernel.set_key_copies_guest_rc:
            nkey |= (pgv & _GUEST_RC) >> _GUEST_RC_SHIFT
        self.skey[self._key_index(entry[valid])] = nkey.astype(np.uint8)

    def _pgste_update_all(self, pte: np.ndarray, pg: np.ndarray) -> np.ndarray:
        """pgste_update_all for entries ``pte``; 3.15 also moves key C/R into HC/HR."""
        valid = (pte & _INVALID) == 0
        if not valid.any():
            return pg
        frames = self._key_index(pte[valid])
        skey = self.skey[frames]
        bits = skey & np.uint8(_KEY_RC)
        pgv = pg[valid] | (bits.astype(U64) << _GUEST_RC_SHIFT)
        if self.kernel.update_all_moves_host_rc:
            move_c = ((pgv & _HC) == 0) & ((bits & np.uint8(b._PAGE_CHANGED)) != 0)
            move_r = ~move_c & ((pgv & _HR) == 0) & ((bits & np.uint8(b._PAGE_REFERENCED)) != 0)
            pgv |= np.where(move_c, bits.astype(U64) << _HOST_RC_SHIFT, U64(0))
            pgv |= np.where(move_r, _HR, U64(0))
            reset = np.where(move_c, bits, np.where(move_r, np.uint8(b._PAGE_REFERENCED), 0))
            self.skey[frames] = skey & ~reset.astype(np.uint8)
        pgv = (pgv & ~_ACC_FP) | ((skey & np.uint8(_KEY_ACC_F)).astype(U64) << _KEY_ACC_SHIFT)
        pg = pg.copy()
        pg[valid] = pgv
        return pg

    def _pgste_ipte_notify(self, idx: np.ndarray, pg: np.ndarray) -> np.ndarray:
        armed = (pg & self._in) != 0
        if not armed.any():
            return pg
        self._gmap_do_ipte_notify(idx[armed])
        return np.where(armed, pg & ~self._in, pg)

    def _gmap_do_ipte_notify(self, idx: np.ndarray) -> None:
        gaddrs = self.guest_base + idx.astype(np.int64) * b.PAGE_SIZE
        with self._notify_lock:  # harvest workers of one MMU may notify at the same time
            self.stats.ipte_notifications += idx.size
            for notifier_call in self.notifiers:
                notifier_call(gaddrs)

    # --- 1 MiB pages: the gmap's segment entries (4.19 mm/gmap.c) ------------------------------
    def _gmap_fault(self, pages: np.ndarray, write: bool) -> None:
        """A guest access to large segments: an invalid entry (or a protected one, for a store)
        faults; gmap_fault makes the host's huge pmd present and writable (a shared hugetlbfs
        mapping is writable from its first fault) and __gmap_link links or unprotects the
        entry, setting _SEGMENT_ENTRY_GMAP_UC either way. One fault per segment, not per page."""
        seg = np.unique(pages // _SEG_PAGES)
        entry = self.segment[seg]
        invalid = (entry & _SEG_INVALID) != 0
        blocked = invalid | ((entry & _SEG_PROTECT) != 0) if write else invalid
        if not blocked.any():
            return
        translation = int(np.count_nonzero(invalid))
        self.stats.translation_faults += translation
        self.stats.protection_faults += int(np.count_nonzero(blocked)) - translation
        self._gmap_link(seg[blocked])

    def _gmap_link(self, seg: np.ndarray) -> None:
        """__gmap_link for faulted segments: an empty entry gets the host pmd's bits (large,
        writable) and GMAP_UC; a protected one loses PROTECT through gmap_pmdp_xchg (which
        fires and clears GMAP_IN) and gets GMAP_UC."""
        self._hugetlb_fault(seg)
        entry = self.segment[seg]
        empty = (entry & _SEG_INVALID) != 0
        unprotect = ~empty & ((entry & _SEG_PROTECT) != 0)
        self._pmdp_notify(seg[unprotect])
        new = np.where(empty, _SEG_LARGE, entry & ~(_SEG_PROTECT | _SEG_IN))
        self.segment[seg[empty | unprotect]] = new[empty | unprotect] | _SEG_UC

    def _sync_segments(self, seg: np.ndarray) -> np.ndarray:
        """gmap_test_and_clear_dirty_pmd per segment: which were dirty. An invalid entry is
        clean, so is a protected one without GMAP_UC; a dirty one loses GMAP_UC and is
        protected again (gmap_protect_pmd, PROT_READ: an xchg that fires GMAP_IN)."""
        entry = self.segment[seg]
        dirty: np.ndarray = ((entry & _SEG_INVALID) == 0) & (
            ((entry & _SEG_PROTECT) == 0) | ((entry & _SEG_UC) != 0)
        )
        d, e = seg[dirty], entry[dirty] & ~_SEG_UC
        unprotected = (e & _SEG_PROTECT) == 0
        self._pmdp_notify(d[unprotected])
        self.segment[d] = np.where(unprotected, (e & ~_SEG_IN) | _SEG_PROTECT, e)
        return dirty

    def _gmap_protect_pmd_notify(self, idx: np.ndarray) -> None:
        """gmap_mprotect_notify (4.19's gmap_ipte_notify) on large segments: an invalid or
        protected entry is fixed up by a write fault first, then GMAP_IN is set."""
        seg = np.unique(idx // _SEG_PAGES)
        entry = self.segment[seg]
        blocked = (entry & (_SEG_INVALID | _SEG_PROTECT)) != 0
        self._gmap_link(seg[blocked])
        self.segment[seg] |= _SEG_IN

    def _pmdp_notify(self, seg: np.ndarray) -> None:
        """pmdp_notify_gmap, on every exchange of a segment entry: GMAP_IN set or not, the
        notifiers hear of the whole 1 MiB (4.19 gmap_pmdp_xchg); KVM's own checks whether a
        prefix page is in it. The caller clears GMAP_IN in the new entry."""
        if not seg.size:
            return
        if not self.notifiers:  # nobody listens: count, without building 256 addresses each
            self.stats.ipte_notifications += seg.size * _SEG_PAGES
            return
        self._gmap_do_ipte_notify((seg[:, None] * _SEG_PAGES + np.arange(_SEG_PAGES)).ravel())

    def _hugetlb_fault(self, seg: np.ndarray) -> None:
        """Make the host's huge pmds present: hugetlb_no_page maps a shared writable
        hugetlbfs page writable and dirty, and set_huge_pte_at's clear_huge_pte_skeys resets
        the 256 keys of a page mapped for the first time (PG_arch_1)."""
        new = seg[~self.hpmd_present[seg]]
        if new.size:
            self.hpmd_present[new] = True
            self.skey[(new[:, None] * _SEG_PAGES + np.arange(_SEG_PAGES)).ravel()] = 0

    def _gmap_link_tables(self, pages: np.ndarray) -> None:
        """__gmap_link for 4 KiB pages (4.19): the gmap entry points at the page table; it
        marks nothing dirty, but from now on the harvest walks this segment."""
        if self._unlinked:
            seg = np.unique(pages // _SEG_PAGES)
            self._unlinked -= int(np.count_nonzero(~self.linked[seg]))
            self.linked[seg] = True

    @staticmethod
    def _check_dense_shifts(gen: KernelGeneration) -> None:
        """_protect_dense shifts the harvested bit onto PROTECT; IN must then fall below it.
        The chunk scan reads the harvested bit as the top bit of a little-endian byte."""
        assert np.little_endian and gen.harvest_bit.bit_length() % 8 == 0, "UC tops a byte"
        to_protect = gen.harvest_bit.bit_length() - _PROTECT_BITS
        assert gen.pgste_in_bit < gen.harvest_bit, "IN must be below the harvested bit"
        assert (gen.pgste_in_bit >> to_protect) < (b._PAGE_PRESENT << int(_PRESENT_TO_PROTECT)), (
            "IN must land below PROTECT so that the PRESENT mask drops it"
        )

    def _frames(self, idx: np.ndarray) -> np.ndarray:
        return U64(self.frame_base) + (idx.astype(U64) << U64(b.PAGE_SHIFT))

    def _key_index(self, entry: np.ndarray) -> np.ndarray:
        return (((entry & _PAGE_MASK) - U64(self.frame_base)) >> U64(b.PAGE_SHIFT)).astype(np.int64)
