"""The harvests of one memslot that some consumer has not folded in yet.

A harvest no longer ORs its bits into every consumer's pending bitmap (a cost that grew with
the number of consumers): it appends them here, in O(1) bitmap passes, and each consumer ORs in
what it has not seen when it next reads, clears or is saved.

Harvests are numbered 1, 2, ... (``head`` is the latest); a consumer's *position* is the number
of the last harvest it folded in. The entries cover (lowest position, head] in order, and every
boundary between two entries is the position of some consumer — so a consumer folds exactly the
harvests after its position, never one it already had (a page is never reported twice for one
store), and the log holds at most one bitmap per distinct position behind ``head``:

* a harvest extends the last entry (one OR) unless a consumer sits at the previous head;
* a consumer leaving a position nobody else holds merges the two entries meeting there (one OR)
  or, at the lowest position, drops the oldest;
* past ``MAX_ENTRIES`` entries (consumers reading at many different moments, never together),
  :meth:`SlotLog.fold_all` turns the entries into suffix unions in place and hands each lagging
  consumer the one it needs: ``MAX_ENTRIES`` + consumers ORs, once per ``MAX_ENTRIES`` harvests.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from kvmshim.bitmap import DirtyBitmap

# Bitmaps a slot's log may hold (1 bit per page each) before it is folded into every consumer.
MAX_ENTRIES = 16


@dataclass
class _Entry:
    end: int  # the last harvest it holds; it starts after the previous entry's end
    bits: DirtyBitmap  # owned by the log: ORed into in place


class SlotLog:
    """Harvests of one slot since the lowest consumer position (all under the VM's ``lock``)."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.head = 0
        self._entries: list[_Entry] = []
        self._ends: list[int] = []  # the entries' ends, for bisect
        self._at: Counter[int] = Counter()  # consumers per position

    def __len__(self) -> int:
        return len(self._entries)

    def join(self) -> int:
        """A consumer starts at ``head``: it owes nothing harvested before."""
        self._at[self.head] += 1
        return self.head

    def leave(self, position: int) -> None:
        """A consumer at ``position`` is gone (removed, detached, or moved on)."""
        self._at[position] -= 1
        if self._at[position]:
            return
        del self._at[position]
        if not self._entries or position >= self.head:
            return
        i = bisect.bisect_left(self._ends, position)
        if i < len(self._ends) and self._ends[i] == position:  # a boundary nobody needs now
            self._entries[i + 1].bits |= self._entries[i].bits
            self._drop(i)
        elif i == 0 and self._lowest() > position:  # it was the lowest: entry 0 is done with
            while self._entries and self._ends[0] <= self._lowest():
                self._drop(0)

    def append(self, bits: DirtyBitmap) -> None:
        """One harvest's bits (the log takes ``bits`` over and may OR into it)."""
        if not self._at:  # no consumer: nobody is owed anything
            self.head += 1
            return
        if self._entries and not self._at.get(self.head):
            self._entries[-1].bits |= bits
            self._entries[-1].end = self._ends[-1] = self.head + 1
        else:  # someone sits at the previous head: a new boundary
            self._entries.append(_Entry(self.head + 1, bits))
            self._ends.append(self.head + 1)
        self.head += 1

    def fold(self, pending: DirtyBitmap, position: int) -> int:
        """OR the harvests after ``position`` into ``pending``; the consumer's new position."""
        if position == self.head:
            return position
        for entry in self._entries[bisect.bisect_right(self._ends, position) :]:
            pending |= entry.bits
        self._at[self.head] += 1
        self.leave(position)
        return self.head

    def fold_all(self, consumers: Iterable[tuple[DirtyBitmap, int]]) -> None:
        """Hand every consumer ((pending, position) pairs: all of them) what it is owed and empty
        the log: entries become suffix unions in place, so each consumer needs one OR."""
        for i in range(len(self._entries) - 2, -1, -1):
            self._entries[i].bits |= self._entries[i + 1].bits
        for pending, position in consumers:
            i = bisect.bisect_right(self._ends, position)
            if i < len(self._entries):
                pending |= self._entries[i].bits
        total = sum(self._at.values())
        self._entries, self._ends = [], []
        self._at = Counter({self.head: total} if total else {})

    def _lowest(self) -> int:
        return min(self._at) if self._at else self.head

    def _drop(self, i: int) -> None:
        del self._entries[i]
        del self._ends[i]
