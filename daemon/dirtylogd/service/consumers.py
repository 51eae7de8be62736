"""Consumers: independent readers of one VM's dirty pages.

KVM's dirty log has one reader — a GET by anyone clears the bits for everyone. Here every
harvest is ORed into the pending bitmap of *every* consumer, and each consumer takes or clears
only its own bits, so a migration tool and a dirty-rate monitor never steal from each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmshim.bitmap import DirtyBitmap


@dataclass
class Consumer:
    """Pending bits per memslot that this consumer has not been given (or has not cleared).

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

    def attach(self, slot: int, npages: int) -> None:
        """A slot starts logging: KVM allocates its bitmap, all ones with INITIALLY_SET."""
        self.pending[slot] = DirtyBitmap.ones(npages) if self.initially_set else DirtyBitmap(npages)

    def detach(self, slot: int) -> None:
        self.pending.pop(slot, None)

    def merge(self, slot: int, bits: DirtyBitmap) -> None:
        self.pending[slot] |= bits

    def take(self, slot: int) -> DirtyBitmap:
        """GET: the pending bits; auto-clearing consumers hand them over (and start afresh)."""
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
        """CLEAR_DIRTY_LOG: drop the pages set in mask (bit 0 is first_page)."""
        self.pending[slot].clear_window(first_page, mask)

    def pending_pages(self) -> int:
        return sum(bm.count() for bm in self.pending.values())
