"""The daemon's side of one VM: consumers, the I/O log, the harvest merge, dirty rates.

The backend owns memslots, RAM and vCPUs; this owns what KVM does not have — several consumers,
and the log of pages written by I/O that the s390 UC bit cannot see (the seed's gap). Methods
are synchronous and run in worker threads; ``lock`` guards consumers, slot states and I/O logs.

A harvest of a slot: backend bits | the slot's I/O log, ORed into every consumer's pending
bitmap, then the asking consumer takes its own. Harvests of one VM are serialised by
``harvest_lock``, as KVM_GET_DIRTY_LOG is by ``kvm->slots_lock``: each answer's generation is
then higher than that of every harvest whose bits it carries. The merge and take happen under
``lock``, so an I/O mark or a query sees either all of a harvest or none of it; the backend's
harvest itself runs outside ``lock``, so queries are not held up by it.
"""

from __future__ import annotations

import errno
import itertools
import threading
import time
from dataclasses import dataclass

import numpy as np

from dirtylogd.errors import DeviceNotFound, GenericError
from dirtylogd.service.consumers import Consumer
from dirtylogd.service.telemetry import VmTelemetry
from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SHIFT, PAGE_SIZE, make_slot_id
from kvmshim.backends.base import Backend
from kvmshim.bitmap import DirtyBitmap
from kvmshim.errors import BitmapError, KvmError
from kvmshim.memslot import Change, Memslot, MemslotChange

DEFAULT_CONSUMER = "default"


@dataclass
class SlotState:
    memslot: Memslot
    incarnation: int  # a new one whenever logging (re)starts, so stale undo cannot cross it
    io_log: DirtyBitmap | None = None  # None while dirty logging is off
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


class VmState:
    def __init__(self, name: str, backend: Backend) -> None:
        self.name = name
        self.backend = backend
        self.lock = threading.Lock()
        self.harvest_lock = threading.Lock()  # the slots_lock of GET_DIRTY_LOG
        self.consumers: dict[str, Consumer] = {
            DEFAULT_CONSUMER: Consumer(DEFAULT_CONSUMER, manual_protect=False, initially_set=False)
        }
        self.slots: dict[int, SlotState] = {}
        self.telemetry = VmTelemetry()
        self.user_paused = False  # stop/cont as the user asked (not quiescing for a save)
        self._incarnations = itertools.count(1)

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
                state.io_log = None  # KVM frees the dirty bitmap
                for c in self.consumers.values():
                    c.detach(new.slot)

    def _start_logging(self, state: SlotState) -> None:
        state.incarnation = next(self._incarnations)
        state.io_log = DirtyBitmap(state.memslot.npages)
        state.logging_since = time.monotonic()
        state.last_harvest = None
        for c in self.consumers.values():
            c.attach(state.memslot.slot, state.memslot.npages)

    def add_consumer(self, name: str, manual_protect: bool, initially_set: bool) -> None:
        with self.lock:
            if name in self.consumers:
                raise GenericError(f"vm '{self.name}' already has a consumer named '{name}'")
            consumer = Consumer(name, manual_protect, initially_set)
            for state in self.slots.values():
                if state.io_log is not None:
                    consumer.attach(state.memslot.slot, state.memslot.npages)
            self.consumers[name] = consumer

    def remove_consumer(self, name: str) -> None:
        with self.lock:
            if name == DEFAULT_CONSUMER:
                raise GenericError("the 'default' consumer belongs to the VM and cannot be removed")
            if self.consumers.pop(name, None) is None:
                raise self._no_consumer(name)

    def consumer(self, name: str) -> Consumer:
        found = self.consumers.get(name)
        if found is None:
            raise self._no_consumer(name)
        return found

    def _no_consumer(self, name: str) -> DeviceNotFound:
        return DeviceNotFound(f"vm '{self.name}' has no consumer named '{name}'")

    # --- the harvest --------------------------------------------------------------------------
    def harvest(self, slot: int, consumer: str) -> Taken:
        """GET_DIRTY_LOG for ``consumer`` (worker thread). Raises KvmError or DeviceNotFound."""
        self.consumer(consumer)  # an unknown consumer fails before anything is harvested
        started = time.monotonic()
        with self.harvest_lock:
            harvest = self.backend.get_dirty_log(slot)
            with self.lock:
                state = self.slots.get(slot)
                who = self.consumers.get(consumer)
                if state is None or state.io_log is None:
                    raise KvmError(
                        errno.ENOENT, "the slot stopped logging during the harvest", slot
                    )
                if who is None:  # removed meanwhile; the bits still go to everyone else
                    self._merge(state, harvest.bitmap)
                    raise self._no_consumer(consumer)
                self._merge(state, harvest.bitmap)
                taken = who.take(slot)
        self.telemetry.harvests += 1
        self.telemetry.harvest_seconds.observe(time.monotonic() - started)
        return Taken(taken, harvest.generation, slot, state.incarnation, consumer)

    def _merge(self, state: SlotState, uc_bits: DirtyBitmap) -> None:
        io = state.io_log
        assert io is not None
        merged = uc_bits
        io_count = io.count()
        if io_count:
            merged = uc_bits | io
            state.io_log = DirtyBitmap(io.npages)
        for c in self.consumers.values():
            c.merge(state.memslot.slot, merged)
        now = time.monotonic()
        state.last_interval = now - (state.last_harvest or state.logging_since)
        state.last_harvest = now
        state.last_dirty = merged.count()
        self.telemetry.dirty_pages["uc"] += uc_bits.count()
        self.telemetry.dirty_pages["io"] += io_count

    def flush(self) -> None:
        """Harvest every logged slot into every consumer, taking nothing (before a stop)."""
        for slot in [s.memslot.slot for s in self.slots.values() if s.io_log is not None]:
            with self.harvest_lock:
                harvest = self.backend.get_dirty_log(slot)
                with self.lock:
                    state = self.slots.get(slot)
                    if state is not None and state.io_log is not None:
                        self._merge(state, harvest.bitmap)

    def pending_snapshot(self) -> dict[tuple[str, int], bytes]:
        """Every consumer's pending bits per logged slot, in KVM's layout."""
        with self.lock:
            return {
                (c.name, slot): bm.to_bytes()
                for c in self.consumers.values()
                for slot, bm in c.pending.items()
            }

    def restore_pending(self, saved: dict[tuple[str, int], bytes] | None) -> None:
        """After a restart: the saved bits where a graceful stop left them, else all dirty."""
        with self.lock:
            for c in self.consumers.values():
                for slot, bm in c.pending.items():
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

    def clear(self, slot: int, consumer: str, first_page: int, num_pages: int, data: bytes) -> None:
        """CLEAR_DIRTY_LOG for one consumer, with the kernel's argument rules."""
        with self.lock:
            who = self.consumer(consumer)
            self.backend.check_clear_dirty_log(slot, first_page, num_pages)
            try:
                mask = DirtyBitmap.from_bytes(num_pages, data)
            except BitmapError as exc:
                raise KvmError(errno.EINVAL, str(exc), slot) from None
            if slot not in who.pending:  # logging state of the daemon lags the backend's
                raise KvmError(errno.ENOENT, "dirty logging is not enabled", slot)
            who.clear(slot, first_page, mask)

    # --- the I/O log ---------------------------------------------------------------------------
    def io_mark_ranges(self, ranges: list[tuple[int, int]]) -> int:
        """Record I/O writes; every byte must be in some memslot, or nothing is recorded."""
        with self.lock:
            plan: list[tuple[SlotState, int, int]] = []
            for gpa, length in ranges:
                plan += self._cover(gpa, length)
            marked = 0
            for state, first, count in plan:
                if state.io_log is not None:  # like mark_page_dirty: unlogged slots are skipped
                    state.io_log.set_range(first, count)
                    marked += count
            self.telemetry.io_marked_pages += marked
            return marked

    def io_mark_gfns(self, gfns: np.ndarray) -> None:
        """Record I/O writes to whole pages (the reporter hook of backends and sim-write)."""
        with self.lock:
            for state in self.slots.values():
                if state.io_log is None:
                    continue
                base, npages = state.memslot.base_gfn, state.memslot.npages
                inside = gfns[(gfns >= base) & (gfns < base + npages)]
                if inside.size:
                    state.io_log.set_pages(inside - base)
                    self.telemetry.io_marked_pages += inside.size

    def _cover(self, gpa: int, length: int) -> list[tuple[SlotState, int, int]]:
        """Split [gpa, gpa+length) into (slot, first page, count); EFAULT for any gap."""
        first_gfn = gpa >> PAGE_SHIFT
        end_gfn = (gpa + length - 1 >> PAGE_SHIFT) + 1
        ordered = sorted(
            (s for s in self.slots.values() if s.memslot.as_id == 0),
            key=lambda s: s.memslot.base_gfn,
        )
        parts, gfn = [], first_gfn
        for state in ordered:
            base, end = state.memslot.base_gfn, state.memslot.base_gfn + state.memslot.npages
            if end <= gfn or base > gfn:
                continue
            stop = min(end, end_gfn)
            parts.append((state, gfn - base, stop - gfn))
            gfn = stop
            if gfn >= end_gfn:
                return parts
        raise KvmError(
            errno.EFAULT,
            f"I/O range [{gpa:#x}, {gpa + length:#x}) leaves the memslots at {gfn * PAGE_SIZE:#x}",
        )

    # --- reporting ------------------------------------------------------------------------------
    def dirty_rate(self) -> dict[str, object]:
        """Rates from the latest harvest of each logging slot (QEMU DirtyRateInfo names)."""
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
            "status": "measured" if rows else "unstarted",
            "mode": "dirty-bitmap",
            "dirty-rate": int(pages_per_second * PAGE_SIZE / (1 << 20)),
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
