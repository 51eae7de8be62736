"""Consumers: independent readers of one VM's dirty pages.

KVM's dirty log has one reader — a GET by anyone clears the bits for everyone. Here every
harvest goes into its slot's log (:mod:`dirtylogd.service.slotlog`), and each consumer ORs in
the harvests it has not seen yet when it reads, clears or is counted, then takes or clears only
its own bits — so a migration tool and a dirty-rate monitor never steal from each other, and a
consumer that does not read costs a harvest nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dirtylogd.service.slotlog import SlotLog
from kvmshim.bitmap import DirtyBitmap

# Names the daemon gives its own consumers (a dirty-bitmap calc-dirty-rate): no client name
# can start with it (the schema's names start with a letter or digit), and such a consumer is
# never listed, counted against --max-consumers, exported as a metric or saved.
INTERNAL_PREFIX = "."


@dataclass
class Consumer:
    """Pending bits per memslot that this consumer has not been given (or has not cleared).

    ``pending`` holds what was folded in; the harvests after ``positions[slot]`` in that slot's
    log are pending too, until :meth:`catch_up` folds them in.

    ``reads`` and ``delivered_pages`` count GET answers that reached the client (see
    :meth:`answered`), never what was taken: an answer put back was not delivered, and a
    counter that went down again would read to Prometheus as a restart.
    """

    name: str
    manual_protect: bool = False
    initially_set: bool = True
    pending: dict[int, DirtyBitmap] = field(default_factory=dict)
    reads: int = 0
    delivered_pages: int = 0
    logs: dict[int, SlotLog] = field(default_factory=dict, repr=False)
    positions: dict[int, int] = field(default_factory=dict)

    @property
    def internal(self) -> bool:
        """The daemon's own reader, not a client's (see INTERNAL_PREFIX)."""
        return self.name.startswith(INTERNAL_PREFIX)

    def attach(self, slot: int, log: SlotLog) -> None:
        """A slot starts logging: KVM allocates its bitmap, all ones with INITIALLY_SET."""
        npages = log.npages
        self.pending[slot] = DirtyBitmap.ones(npages) if self.initially_set else DirtyBitmap(npages)
        self.logs[slot] = log
        self.positions[slot] = log.join()

    def detach(self, slot: int) -> None:
        self.pending.pop(slot, None)
        log = self.logs.pop(slot, None)
        position = self.positions.pop(slot, None)
        if log is not None and position is not None:
            log.leave(position)

    def detach_all(self) -> None:
        """The consumer is removed: no log keeps harvests for it any longer."""
        for slot in list(self.pending):
            self.detach(slot)

    def catch_up(self, slot: int) -> None:
        """OR in the harvests of ``slot`` this consumer has not seen."""
        log = self.logs.get(slot)
        if log is not None:
            self.positions[slot] = log.fold(self.pending[slot], self.positions[slot])

    def take(self, slot: int) -> DirtyBitmap:
        """GET: the pending bits; auto-clearing consumers hand them over (and start afresh)."""
        self.catch_up(slot)
        current = self.pending[slot]
        if self.manual_protect:
            return current.copy()
        self.pending[slot] = DirtyBitmap(current.npages)
        return current

    def put_back(self, slot: int, bits: DirtyBitmap) -> None:
        """Undo a take whose answer never reached the client: nothing may be lost."""
        current = self.pending.get(slot)
        if not self.manual_protect and current is not None and current.npages == bits.npages:
            current |= bits

    def answered(self, pages: int) -> None:
        """A GET answer of ``pages`` dirty pages reached the client: one read, and (unless
        manual-protect, whose pages stay pending until CLEAR) that many pages handed over."""
        self.reads += 1
        if not self.manual_protect:
            self.delivered_pages += pages

    def clear(self, slot: int, first_page: int, mask: DirtyBitmap) -> None:
        """CLEAR_DIRTY_LOG: drop the pages set in mask (bit 0 is first_page), including those
        of harvests not folded in yet — as KVM clears its one bitmap."""
        self.catch_up(slot)
        self.pending[slot].clear_window(first_page, mask)

    def pending_pages(self) -> int:
        for slot in self.pending:
            self.catch_up(slot)
        return sum(bm.count() for bm in self.pending.values())
