"""The daemon's side of one VM: consumers, the I/O log, the harvest merge, dirty rates.

The backend owns memslots, RAM and vCPUs; this owns what KVM does not have — several consumers,
and the log of pages written by I/O that the s390 UC bit cannot see (the seed's gap).

A harvest of a slot: backend bits | the slot's I/O log, appended to the slot's log
(:mod:`dirtylogd.service.slotlog`) in a few bitmap passes whatever the number of consumers; a
consumer ORs in the harvests it has not seen when it takes, clears or is counted, so one that
does not read costs a harvest nothing. Harvests of one VM are serialised by ``harvest_lock``,
as KVM_GET_DIRTY_LOG is by ``kvm->slots_lock``: each answer's generation is then higher than
that of every harvest whose bits it carries. GETs that queue on it behind a harvest of their
slot that began after they arrived share that harvest (see :meth:`VmState.harvest`). The append
and take happen under ``lock``, so an I/O mark or a query sees either all of a harvest or none.

What runs where (the service, :mod:`dirtylogd.service.registry`, decides):

* On the event loop: ``consumer`` and ``ticket`` (lookups, no lock); ``add_consumer``,
  ``remove_consumer``, ``apply_memslot_change`` (after the backend's change ran in a thread),
  ``put_back`` (the undo of an answer that was not delivered, or of a cancelled GET),
  ``delivered`` (an answer that was) and, at start-up before clients are served,
  ``restore_pending`` — each takes ``lock``.
  The ``slots`` and ``consumers`` dicts are changed only by these, so the loop also reads them
  without a lock (the VM's record).
* In worker threads: ``harvest`` and ``flush`` (``harvest_lock``, then ``lock`` for the merge);
  ``clear``, ``io_mark_ranges``, ``pending_snapshot``, ``describe`` and ``dirty_rate`` (``lock``);
  ``io_mark_gfns`` (``lock``; also from vCPU threads, as the backend's I/O reporter). The
  metrics thread takes ``lock`` to read consumers and calls ``dirty_rate``.

The loop never takes ``harvest_lock``, which is held across the backend's harvest, the long
part of a GET. ``lock`` is never held across a backend call, file I/O or a Python loop over
client input — I/O marks and CLEAR masks are built before it is taken — only across numpy work
on bitmaps already built: the append of one harvest to its slot's log (one or two ORs), a take
(the ORs of what that consumer had not seen), a put-back, a clear, an OR of marks, the counts
of a query. That is the longest the loop can wait for it.
"""

from __future__ import annotations

import errno
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dirtylogd.errors import DeviceNotFound, GenericError
from dirtylogd.service.consumers import Consumer
from dirtylogd.service.slotlog import MAX_ENTRIES, SlotLog
from dirtylogd.service.telemetry import VmTelemetry
from dirtylogd.service.vmstate import DirtyRateCalc, Holds
from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SHIFT, PAGE_SIZE, make_slot_id
from kvmshim.backends.base import Backend
from kvmshim.bitmap import DirtyBitmap
from kvmshim.errors import BitmapError, KvmError
from kvmshim.memslot import Change, Memslot, MemslotChange

DEFAULT_CONSUMER = "default"
# Consumers a VM may have besides 'default' (--max-consumers). Each costs a pending bitmap per
# logged slot (1 bit per page: 256 KiB for 8 GiB of RAM), and a query's time grows with their
# number (a harvest's does not: see slotlog). 64 is what benchmarks/load.py serves with
# nothing lost (64 clients, each its own consumer), and keeps an 8 GiB VM's consumers at 16 MiB
# and a GET at a few ms (docs/reliability.md); tools need a handful (a migration, a monitor).
DEFAULT_MAX_CONSUMERS = 64


@dataclass
class SlotState:
    memslot: Memslot
    incarnation: int  # a new one whenever logging (re)starts, so stale undo cannot cross it
    io_log: DirtyBitmap | None = None  # None while dirty logging is off
    log: SlotLog | None = None  # harvests not folded into every consumer; None: logging off
    generation: int = 0  # the backend's generation of the latest harvest
    harvests_begun: int = 0  # harvests of this slot begun (under ``harvest_lock``)
    covered: int = 0  # the number of the latest that ended well: a GET that arrived before it
    # began is answered from the log without a harvest of its own
    logging_since: float = 0.0
    last_harvest: float | None = None
    last_dirty: int = 0
    last_interval: float = 0.0


@dataclass(frozen=True)
class Taken:
    """Bits handed to one consumer by one GET, with what is needed to give them back."""

    bitmap: DirtyBitmap
    generation: int
    slot: int
    incarnation: int
    consumer: str
    pages: int  # dirty pages in ``bitmap``, counted in the worker that took them


@dataclass(frozen=True)
class Ticket:
    """A slot's state and its count of harvests begun when a GET arrived."""

    state: SlotState | None
    begun: int


# (slot, its memslot, whether it logs), by address space and base gfn.
Layout = tuple[tuple[SlotState, Memslot, bool], ...]


class VmState:
    def __init__(self, name: str, backend: Backend) -> None:
        self.name = name
        self.backend = backend
        self.lock = threading.Lock()
        self.harvest_lock = threading.Lock()  # the slots_lock of GET_DIRTY_LOG
        self._harvest_ended = threading.Condition(self.lock)
        self.consumers: dict[str, Consumer] = {
            DEFAULT_CONSUMER: Consumer(DEFAULT_CONSUMER, manual_protect=False, initially_set=False)
        }
        self.slots: dict[int, SlotState] = {}
        self.telemetry = VmTelemetry()
        self.user_paused = False  # stop/cont as the user asked (not quiescing for a save)
        self.removed = False  # set (on the loop) once vm-remove began: later calls are refused
        self.record_stale = False  # a record write failed: the next start is all dirty
        self._incarnations = itertools.count(1)
        self.calc = DirtyRateCalc()  # the last calc-dirty-rate (filled by service/dirtyrate.py)
        self.holds = Holds()  # until-disconnect limits and throttle (service/limits.py)

    # --- memslots and consumers --------------------------------------------------------------
    def apply_memslot_change(self, change: MemslotChange) -> None:
        """Mirror a KVM_SET_USER_MEMORY_REGION the backend carried out."""
        with self.lock:
            if change.kind is Change.DELETE:
                assert change.old is not None
                self.slots.pop(change.old.slot, None)
                for c in self.consumers.values():
                    c.detach(change.old.slot)
                return
            new = change.new
            if new is None or change.kind is Change.NONE:
                return
            state = self.slots.get(new.slot)
            if state is None:
                state = self.slots[new.slot] = SlotState(new, next(self._incarnations))
            state.memslot = new
            if new.log_dirty_pages and state.io_log is None:
                self._start_logging(state)
            elif not new.log_dirty_pages and state.io_log is not None:
                state.io_log = state.log = None  # KVM frees the dirty bitmap
                for c in self.consumers.values():
                    c.detach(new.slot)

    def _start_logging(self, state: SlotState) -> None:
        state.incarnation = next(self._incarnations)
        state.io_log = DirtyBitmap(state.memslot.npages)
        state.log = SlotLog(state.memslot.npages)
        state.logging_since = time.monotonic()
        state.last_harvest = None
        for c in self.consumers.values():
            c.attach(state.memslot.slot, state.log)

    def add_consumer(
        self, name: str, manual_protect: bool, initially_set: bool, limit: int | None = None
    ) -> None:
        """A new consumer; with ``limit``, refused once the VM has that many besides 'default'
        (a restore passes none: consumers that were saved are never dropped)."""
        with self.lock:
            if name in self.consumers:
                raise GenericError(f"vm '{self.name}' already has a consumer named '{name}'")
            # 'default' belongs to the VM and the daemon's own consumers to it: not counted
            named = sum(not c.internal for c in self.consumers.values()) - 1
            if limit is not None and named >= limit:
                raise GenericError(
                    f"vm '{self.name}' has {named} consumers besides 'default', the most "
                    f"allowed (--max-consumers {limit}): remove one first"
                )
            consumer = Consumer(name, manual_protect, initially_set)
            for state in self.slots.values():
                if state.log is not None:
                    consumer.attach(state.memslot.slot, state.log)
            self.consumers[name] = consumer

    def remove_consumer(self, name: str) -> None:
        with self.lock:
            if name == DEFAULT_CONSUMER:
                raise GenericError("the 'default' consumer belongs to the VM and cannot be removed")
            gone = self.consumers.pop(name, None)
            if gone is None:
                raise self._no_consumer(name)
            gone.detach_all()

    def consumer(self, name: str) -> Consumer:
        found = self.consumers.get(name)
        if found is None:
            raise self._no_consumer(name)
        return found

    def _no_consumer(self, name: str) -> DeviceNotFound:
        return DeviceNotFound(f"vm '{self.name}' has no consumer named '{name}'")

    # --- the harvest --------------------------------------------------------------------------
    def ticket(self, slot: int) -> Ticket:
        """Where the harvests of ``slot`` stand as a GET arrives (on the loop, or any thread)."""
        state = self.slots.get(slot)
        return Ticket(state, state.harvests_begun if state is not None else 0)

    def harvest(self, slot: int, consumer: str, ticket: Ticket | None = None) -> Taken:
        """GET_DIRTY_LOG for ``consumer`` (worker thread). Raises KvmError or DeviceNotFound.

        A GET is answered from the latest harvest of its slot without one of its own if that
        harvest began after the GET arrived (``ticket``, default now) and ended well: it carries
        every store made before the GET arrived, as the GET's own harvest would have, and its
        generation. So many consumers reading at once share harvests instead of queueing one
        each behind ``harvest_lock`` (a group commit)."""
        self.consumer(consumer)  # an unknown consumer fails before anything is harvested
        started = time.monotonic()
        if ticket is None:
            with self.lock:
                ticket = self.ticket(slot)
        with self.lock:
            # Not queued on harvest_lock itself: a plain lock is not fair, and a GET already
            # covered could wait there behind any number of newer harvests.
            while not (shared := self._covers(slot, ticket)):
                if self.harvest_lock.acquire(blocking=False):
                    break
                self._harvest_ended.wait()
            if shared:
                taken = self._take(slot, consumer)
        if not shared:
            try:
                self._harvest_locked(slot)
                with self.lock:
                    taken = self._take(slot, consumer)
            finally:
                self._end_harvest()
        if shared:
            self.telemetry.shared_harvests += 1
        else:
            self.telemetry.harvests += 1
            self.telemetry.harvest_seconds.observe(time.monotonic() - started)
        bits, generation, incarnation = taken
        return Taken(bits, generation, slot, incarnation, consumer, bits.count())

    def _covers(self, slot: int, ticket: Ticket) -> bool:
        """Whether a harvest of ``slot`` that began after ``ticket`` ended well (``lock``)."""
        state = self.slots.get(slot)
        return state is not None and state is ticket.state and state.covered > ticket.begun

    def _take(self, slot: int, consumer: str) -> tuple[DirtyBitmap, int, int]:
        """The consumer's bits after the latest harvest of ``slot``, that harvest's generation
        and the slot's incarnation (under ``lock``)."""
        state = self.slots.get(slot)
        who = self.consumers.get(consumer)
        if state is None or state.log is None:
            raise KvmError(errno.ENOENT, "the slot stopped logging during the harvest", slot)
        if who is None:  # removed meanwhile; the bits are in the log for the others
            raise self._no_consumer(consumer)
        return who.take(slot), state.generation, state.incarnation

    def _harvest_locked(self, slot: int) -> None:
        """The backend's harvest of ``slot`` into its log (``harvest_lock`` held). Raises
        KvmError as the backend does; a slot that stopped logging meanwhile gets nothing."""
        with self.lock:
            state = self.slots.get(slot)
            if state is not None:
                state.harvests_begun += 1
                number = state.harvests_begun
        harvest = self.backend.get_dirty_log(slot)
        overreach = self.backend.overreach(slot)
        with self.lock:
            self._mark_overreach(overreach)
            if state is not None and self.slots.get(slot) is state and state.log is not None:
                self._merge(state, harvest.bitmap)
                state.generation = harvest.generation
                state.covered = number

    def _merge(self, state: SlotState, uc_bits: DirtyBitmap) -> None:
        """Backend bits | the I/O log, appended to the slot's log: a few bitmap passes,
        whatever the number of consumers (each folds them in when it reads)."""
        io, log = state.io_log, state.log
        assert io is not None and log is not None
        merged = uc_bits
        io_count = io.count()
        uc_count = uc_bits.count()
        if io_count:
            merged = uc_bits | io
            state.io_log = DirtyBitmap(io.npages)
        now = time.monotonic()
        state.last_interval = now - (state.last_harvest or state.logging_since)
        state.last_harvest = now
        state.last_dirty = merged.count() if io_count else uc_count
        self.telemetry.dirty_pages["uc"] += uc_count
        self.telemetry.dirty_pages["io"] += io_count
        log.append(merged)  # the log owns ``merged`` from here on
        if len(log) > MAX_ENTRIES:
            self._fold_everyone(state.memslot.slot, log)

    def _fold_everyone(self, slot: int, log: SlotLog) -> None:
        """The log grew past its bound (consumers reading at many different moments): give
        every consumer what it is owed and empty it."""
        joined = [c for c in self.consumers.values() if slot in c.positions]
        log.fold_all((c.pending[slot], c.positions[slot]) for c in joined)
        for c in joined:
            c.positions[slot] = log.head

    def _mark_overreach(self, pages: list[tuple[int, int]]) -> None:
        """Pages of other slots that the harvest just consumed without reporting them there.

        s390's harvest loop runs one gfn past its slot (``cur_gfn <= last_gfn`` in
        kvm_s390_sync_dirty_log, Linux 3.16): it clears the dirty bit of the host page after
        the slot and reports it under a gfn that may belong to another slot or to none. The
        daemon cannot see whether that page was dirty, so it counts it dirty: the page goes
        into its own slot's I/O log, which every consumer gets at that slot's next harvest.
        A logging-off slot has no log (its stores before logging starts are not promised)."""
        for slot, page in pages:
            state = self.slots.get(slot)
            if state is not None and state.io_log is not None:
                state.io_log.set_range(page, 1)
                self.telemetry.overreach_pages += 1

    def flush(self) -> None:
        """Harvest every logged slot into its log, taking nothing (before a stop).

        Twice: an s390 harvest of one slot may mark a page into the KVM dirty bitmap of the
        slot after it (the inclusive bound, when the two are adjacent in guest memory too),
        which only that slot's next harvest returns; the second pass collects such marks
        whatever the order of the first (the vCPUs are paused, so it finds nothing else)."""
        with self.lock:
            logged = [s.memslot.slot for s in self.slots.values() if s.log is not None]
        for slot in logged * 2:
            self.harvest_lock.acquire()
            try:
                self._harvest_locked(slot)
            finally:
                self._end_harvest()

    def _end_harvest(self) -> None:
        """Release ``harvest_lock`` and wake the GETs waiting for a harvest or their turn."""
        with self.lock:
            self.harvest_lock.release()
            self._harvest_ended.notify_all()

    def pending_snapshot(self) -> dict[tuple[str, int], bytes]:
        """Every consumer's pending bits per logged slot, in KVM's layout (the slot logs
        folded in first: they are not saved)."""
        with self.lock:
            for c in self.consumers.values():
                for slot in c.pending:
                    c.catch_up(slot)
            return {
                (c.name, slot): bm.to_bytes()
                for c in self.consumers.values()
                if not c.internal  # never saved: a calc does not outlive the daemon
                for slot, bm in c.pending.items()
            }

    def restore_pending(self, saved: dict[tuple[str, int], bytes] | None) -> None:
        """After a restart: the saved bits where a graceful stop left them, else all dirty."""
        with self.lock:
            for c in self.consumers.values():
                for slot, bm in c.pending.items():
                    c.catch_up(slot)  # the saved bits replace the log's too
                    raw = None if saved is None else saved.get((c.name, slot))
                    if raw is not None and len(raw) == len(bm.to_bytes()):
                        c.pending[slot] = DirtyBitmap.from_bytes(bm.npages, raw)
                    else:  # when in doubt, dirty
                        c.pending[slot] = DirtyBitmap.ones(bm.npages)

    def put_back(self, taken: Taken) -> None:
        """The answer to a GET never reached its client: return the bits to that consumer."""
        with self.lock:
            state = self.slots.get(taken.slot)
            who = self.consumers.get(taken.consumer)
            if state is not None and who is not None and state.incarnation == taken.incarnation:
                who.put_back(taken.slot, taken.bitmap)

    def delivered(self, taken: Taken) -> None:
        """The answer to a GET reached its reader: count it for that consumer's metrics (on
        the loop, once the reply is written). A consumer removed meanwhile counts nothing."""
        with self.lock:
            who = self.consumers.get(taken.consumer)
            if who is not None:
                who.answered(taken.pages)

    def clear(self, slot: int, consumer: str, first_page: int, num_pages: int, data: bytes) -> None:
        """CLEAR_DIRTY_LOG for one consumer, with the kernel's argument rules.

        The arguments are checked and the mask (up to 512 MiB) built before ``lock``."""
        self.consumer(consumer)
        self.backend.check_clear_dirty_log(slot, first_page, num_pages)
        try:
            mask = DirtyBitmap.from_bytes(num_pages, data)
        except BitmapError as exc:
            raise KvmError(errno.EINVAL, str(exc), slot) from None
        with self.lock:
            who = self.consumer(consumer)  # again: it may have been removed meanwhile
            if slot not in who.pending:  # logging state of the daemon lags the backend's
                raise KvmError(errno.ENOENT, "dirty logging is not enabled", slot)
            who.clear(slot, first_page, mask)

    # --- the I/O log ---------------------------------------------------------------------------
    def io_mark_ranges(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Record I/O writes; every byte must be in some memslot, or nothing is recorded.

        The ranges (up to 65,536) are mapped onto the slots and turned into one bitmap per slot
        outside ``lock``; under it those bitmaps are only ORed into the I/O logs. Should the
        slots change in between, the mapping is done again."""
        spans = np.array(
            [(gpa >> PAGE_SHIFT, (gpa + length - 1 >> PAGE_SHIFT) + 1) for gpa, length in ranges],
            dtype=np.int64,
        ).reshape(-1, 2)
        while True:
            with self.lock:
                layout = self._layout(as_id=0)
            marks = self._io_marks(ranges, spans, layout)  # EFAULT here: nothing recorded
            with self.lock:
                if not _same_layout(layout, self._layout(as_id=0)):
                    continue
                marked = 0
                for state, bits, pages in marks:
                    assert state.io_log is not None  # the layout says it is logging
                    state.io_log |= bits
                    marked += pages
                self.telemetry.io_marked_pages += marked
                return marked

    def io_mark_gfns(self, gfns: np.ndarray) -> None:
        """Record I/O writes to whole pages (the reporter hook of backends and sim-write).

        Byte offsets and masks are computed outside ``lock``; under it only ORed in."""
        while True:
            with self.lock:
                layout = self._layout()
            marks = []
            for state, memslot, logging in layout:
                if not logging:
                    continue
                base, npages = memslot.base_gfn, memslot.npages
                inside = gfns[(gfns >= base) & (gfns < base + npages)]
                if inside.size:
                    marks.append((state, *_page_bytes(inside - base), inside.size))
            with self.lock:
                if not _same_layout(layout, self._layout()):
                    continue
                for state, offsets, bits, pages in marks:
                    assert state.io_log is not None
                    raw = state.io_log.bytes_view()
                    raw[offsets] |= bits
                    self.telemetry.io_marked_pages += pages
                return

    def _layout(self, as_id: int | None = None) -> Layout:
        """The slots as they are now (under ``lock``), by base gfn: what a plan made outside
        ``lock`` is checked against before it is applied."""
        states = sorted(self.slots.values(), key=lambda s: (s.memslot.as_id, s.memslot.base_gfn))
        return tuple(
            (s, s.memslot, s.io_log is not None)
            for s in states
            if as_id is None or s.memslot.as_id == as_id
        )

    def _io_marks(
        self, ranges: Sequence[tuple[int, int]], spans: np.ndarray, layout: Layout
    ) -> list[tuple[SlotState, DirtyBitmap, int]]:
        """(slot, its bits, pages) for every logging slot the gfn ``spans`` [first, end) touch;
        EFAULT for the first range that leaves the slots (contiguous slots join up)."""
        first, end = spans[:, 0], spans[:, 1]
        if not first.size:
            return []
        bases = np.array([m.base_gfn for _, m, _ in layout], dtype=np.int64)
        ends = bases + np.array([m.npages for _, m, _ in layout], dtype=np.int64)
        # Stretches of back-to-back slots; a range must lie inside one of them. ``reach``: the
        # end of the stretch a range starts in, where its cover stops.
        reach = first.copy()
        if bases.size:
            new = np.concatenate(([True], ends[:-1] != bases[1:]))
            stretch_first = bases[new]
            stretch_end = ends[np.concatenate((new[1:], [True]))]
            at = np.searchsorted(stretch_first, first, side="right") - 1
            reach = np.where(at >= 0, stretch_end[np.maximum(at, 0)], first)
        inside = first < reach
        bad = np.flatnonzero(~inside | (end > reach))
        if bad.size:
            k = int(bad[0])
            gpa, length = ranges[k]
            gfn = int(reach[k]) if inside[k] else int(first[k])
            raise KvmError(
                errno.EFAULT,
                f"I/O range [{gpa:#x}, {gpa + length:#x}) leaves the memslots at "
                f"{gfn * PAGE_SIZE:#x}",
            )
        # Pieces per slot: most ranges are inside one slot; the few that cross are split.
        lo = np.searchsorted(bases, first, side="right") - 1
        hi = np.searchsorted(bases, end - 1, side="right") - 1
        one = lo == hi
        where, firsts, ends_ = [lo[one]], [first[one]], [end[one]]
        for k in np.flatnonzero(~one).tolist():
            for j in range(int(lo[k]), int(hi[k]) + 1):
                where.append(np.array([j]))
                firsts.append(np.maximum(first[k : k + 1], bases[j]))
                ends_.append(np.minimum(end[k : k + 1], ends[j]))
        slot_of, piece_first, piece_end = map(np.concatenate, (where, firsts, ends_))
        marks = []
        for j in np.unique(slot_of).tolist():
            state, memslot, logging = layout[j]
            if not logging:  # like mark_page_dirty: unlogged slots are skipped
                continue
            mine = slot_of == j
            start, count = piece_first[mine] - bases[j], (piece_end - piece_first)[mine]
            marks.append((state, _bitmap_of(memslot.npages, start, count), int(count.sum())))
        return marks

    # --- reporting ------------------------------------------------------------------------------
    def dirty_rate(self) -> dict[str, object]:
        """Exact rates from the latest harvest of each logging slot (beside QEMU's
        DirtyRateInfo in query-dirty-rate, which says what the last calc-dirty-rate found)."""
        with self.lock:
            rows, pages_per_second, widest = [], 0.0, 0.0
            for state in sorted(self.slots.values(), key=lambda s: s.memslot.slot):
                if state.last_harvest is None:
                    continue
                rate = state.last_dirty / state.last_interval if state.last_interval > 0 else 0.0
                pages_per_second += rate
                widest = max(widest, state.last_interval)
                rows.append(
                    {
                        "slot": state.memslot.id,
                        "as-id": state.memslot.as_id,
                        "dirty-pages": state.last_dirty,
                        "interval-ms": round(state.last_interval * 1e3, 3),
                        "pages-per-second": round(rate, 3),
                    }
                )
        return {
            "harvest-dirty-rate": int(pages_per_second * PAGE_SIZE / (1 << 20)),
            "dirty-pages-rate": round(pages_per_second, 3),
            "calc-time-ms": round(widest * 1e3, 3),
            "slots": rows,
        }

    def describe(self) -> dict[str, object]:
        with self.lock:
            consumers = [
                {
                    "name": c.name,
                    "manual-protect": c.manual_protect,
                    "initially-set": c.initially_set,
                    "pending-pages": c.pending_pages(),
                }
                for c in self.consumers.values()
                if not c.internal
            ]
            slots = [s.memslot for s in self.slots.values()]
        memslots = []
        for m in sorted(slots, key=lambda m: (m.as_id, m.id)):
            entry: dict[str, object] = {
                "slot": m.id,
                "as-id": m.as_id,
                "guest-phys-addr": m.guest_phys_addr,
                "size": m.memory_size,
                "npages": m.npages,
                "log-dirty-pages": bool(m.flags & KVM_MEM_LOG_DIRTY_PAGES),
            }
            region = self.backend.ram_region(make_slot_id(m.as_id, m.id))
            if region is not None:
                entry["ram-offset"] = region.offset
            memslots.append(entry)
        return {"name": self.name, "memslots": memslots, "consumers": consumers}


# Up to this many ranges are set one by one; more go through numpy (a pass over the slot).
_FEW_RANGES = 256


def _same_layout(a: Layout, b: Layout) -> bool:
    """Same slot objects with the same memslots and logging states."""
    return len(a) == len(b) and all(
        x[0] is y[0] and x[1] == y[1] and x[2] == y[2] for x, y in zip(a, b, strict=True)
    )


def _bitmap_of(npages: int, first: np.ndarray, count: np.ndarray) -> DirtyBitmap:
    """A slot's bitmap with pages [first, first + count) set, for every pair."""
    if first.size <= _FEW_RANGES:
        bits = DirtyBitmap(npages)
        for f, c in zip(first.tolist(), count.tolist(), strict=True):
            bits.set_range(f, c)
        return bits
    spans = np.stack((first, count), axis=1)
    # from_ranges reads its argument with np.asarray; its hint names only the JSON shape.
    return DirtyBitmap.from_ranges(npages, spans)  # type: ignore[arg-type]


def _page_bytes(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct byte offsets of ``pages`` in a KVM-layout bitmap and the bits to OR into each,
    so that ``raw[offsets] |= bits`` sets them all (fancy indexing needs distinct offsets)."""
    pages = np.sort(pages)
    offsets = pages >> 3
    bits = np.left_shift(1, pages & 7).astype(np.uint8)
    starts = np.flatnonzero(np.concatenate(([True], offsets[1:] != offsets[:-1])))
    return offsets[starts], np.bitwise_or.reduceat(bits, starts)
