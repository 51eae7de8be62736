"""DirtyBitmap: the one dirty-bitmap type, in KVM's layout.

Page n of a memslot is byte n/8, bit n%8 (``set_bit_le``), and the buffer is
``ALIGN(npages, 64) / 8`` bytes: whole little-endian 64-bit longs. The words are stored as
``<u8`` so the byte view is that layout on any host, big-endian s390x included.
Bits past the last page are always zero; input that sets them is rejected.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence

import numpy as np

from kvmshim.abi import BITS_PER_LONG, dirty_bitmap_bytes
from kvmshim.errors import BitmapError

WORD = np.dtype("<u8")
_BIT_INDEX = np.arange(BITS_PER_LONG, dtype=np.int64)


def _tail_mask(npages: int) -> int:
    """Mask of the valid bits in the last word (all ones when npages is a multiple of 64)."""
    rem = npages % BITS_PER_LONG
    return (1 << rem) - 1 if rem else (1 << BITS_PER_LONG) - 1


class DirtyBitmap:
    """A dirty bitmap for ``npages`` pages, backed by a numpy array of little-endian words."""

    __slots__ = ("npages", "words")

    def __init__(self, npages: int, words: np.ndarray | None = None) -> None:
        if npages < 0:
            raise BitmapError(f"negative page count {npages}")
        nwords = dirty_bitmap_bytes(npages) // 8
        if words is None:
            words = np.zeros(nwords, dtype=WORD)
        elif words.dtype != WORD or words.shape != (nwords,):
            raise BitmapError(
                f"{npages} pages need {nwords} little-endian words, got {words.shape}"
            )
        self.npages = npages
        self.words = words

    # --- constructors ------------------------------------------------------------------------
    @classmethod
    def zeros(cls, npages: int) -> DirtyBitmap:
        return cls(npages)

    @classmethod
    def ones(cls, npages: int) -> DirtyBitmap:
        bm = cls(npages)
        bm.words[:] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
        if bm.words.size:
            bm.words[-1] = np.uint64(_tail_mask(npages))
        return bm

    @classmethod
    def from_bytes(
        cls, npages: int, data: bytes | bytearray | memoryview | np.ndarray
    ) -> DirtyBitmap:
        """Copy a KVM-layout buffer; wrong length or bits past the last page raise BitmapError."""
        raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        expected = dirty_bitmap_bytes(npages)
        if raw.size != expected:
            raise BitmapError(
                f"bitmap for {npages} pages must be {expected} bytes "
                f"(ALIGN(npages, 64) / 8), got {raw.size}"
            )
        words = raw.view(np.uint8).copy().view(WORD)
        if words.size and int(words[-1]) & ~_tail_mask(npages):
            raise BitmapError(f"bitmap sets bits past the last page ({npages} pages)")
        return cls(npages, words)

    @classmethod
    def from_base64(cls, npages: int, text: str) -> DirtyBitmap:
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BitmapError(f"bitmap is not valid base64: {exc}") from None
        return cls.from_bytes(npages, data)

    @classmethod
    def from_pages(cls, npages: int, pages: Iterable[int] | np.ndarray) -> DirtyBitmap:
        """Bitmap with the given page indices set; indices outside [0, npages) raise."""
        idx = np.asarray(pages if isinstance(pages, np.ndarray) else list(pages), dtype=np.int64)
        bm = cls(npages)
        if idx.size == 0:
            return bm
        if idx.min() < 0 or idx.max() >= npages:
            raise BitmapError(f"page index out of range for {npages} pages")
        bits = np.zeros(bm.words.size * BITS_PER_LONG, dtype=bool)
        bits[idx] = True
        bm.words[:] = np.packbits(bits, bitorder="little").view(WORD)
        return bm

    @classmethod
    def from_ranges(cls, npages: int, ranges: Sequence[Sequence[int]]) -> DirtyBitmap:
        """Bitmap from ``[[first, count], ...]`` (the "ranges" encoding)."""
        spans = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        first, count = spans[:, 0], spans[:, 1]
        bad = (first < 0) | (count < 0) | (first + count > npages)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise BitmapError(f"range [{first[i]}, {first[i] + count[i]}) outside {npages} pages")
        nbits = dirty_bitmap_bytes(npages) * 8
        delta = np.zeros(nbits + 1, dtype=np.int64)
        np.add.at(delta, first, 1)
        np.add.at(delta, first + count, -1)
        bits = np.cumsum(delta[:-1]) > 0
        return cls(npages, np.packbits(bits, bitorder="little").view(WORD))

    # --- views and codecs --------------------------------------------------------------------
    def bytes_view(self) -> np.ndarray:
        """The KVM-layout bytes, as a writable uint8 view (no copy)."""
        return self.words.view(np.uint8)

    def to_bytes(self) -> bytes:
        return self.words.tobytes()

    def to_base64(self) -> str:
        return base64.b64encode(self.words.data).decode("ascii")

    def copy(self) -> DirtyBitmap:
        return DirtyBitmap(self.npages, self.words.copy())

    # --- queries -----------------------------------------------------------------------------
    def count(self) -> int:
        return int(np.bitwise_count(self.words).sum(dtype=np.int64))

    def any(self) -> bool:
        return bool(self.words.any())

    def test(self, page: int) -> bool:
        if not 0 <= page < self.npages:
            raise BitmapError(f"page {page} outside {self.npages} pages")
        return bool((int(self.words[page // BITS_PER_LONG]) >> (page % BITS_PER_LONG)) & 1)

    def pages(self) -> np.ndarray:
        """Indices of the dirty pages, ascending (int64). Only non-zero words are expanded."""
        nz = np.flatnonzero(self.words)
        if nz.size == 0:
            return np.zeros(0, dtype=np.int64)
        bits = np.unpackbits(
            self.words[nz].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little"
        ).astype(bool)
        dirty: np.ndarray = (nz[:, None] * BITS_PER_LONG + _BIT_INDEX)[bits]
        return dirty

    def ranges(self) -> list[list[int]]:
        """Runs of dirty pages as ``[[first, count], ...]``, ascending."""
        pages = self.pages()
        if pages.size == 0:
            return []
        breaks = np.flatnonzero(np.diff(pages) != 1)
        starts = pages[np.concatenate(([0], breaks + 1))]
        ends = pages[np.concatenate((breaks, [pages.size - 1]))] + 1
        runs: list[list[int]] = np.stack((starts, ends - starts), axis=1).tolist()
        return runs

    # --- set algebra -------------------------------------------------------------------------
    def _check_same(self, other: DirtyBitmap) -> None:
        if other.npages != self.npages:
            raise BitmapError(f"bitmaps of {self.npages} and {other.npages} pages do not combine")

    def __ior__(self, other: DirtyBitmap) -> DirtyBitmap:
        self._check_same(other)
        np.bitwise_or(self.words, other.words, out=self.words)
        return self

    def __or__(self, other: DirtyBitmap) -> DirtyBitmap:
        return self.copy().__ior__(other)

    def andnot_(self, other: DirtyBitmap) -> DirtyBitmap:
        """In place ``self &= ~other``."""
        self._check_same(other)
        np.bitwise_and(self.words, ~other.words, out=self.words)
        return self

    def andnot(self, other: DirtyBitmap) -> DirtyBitmap:
        return self.copy().andnot_(other)

    def __and__(self, other: DirtyBitmap) -> DirtyBitmap:
        self._check_same(other)
        return DirtyBitmap(self.npages, self.words & other.words)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return self.npages == other.npages and bool(np.array_equal(self.words, other.words))

    __hash__ = None  # type: ignore[assignment]  # mutable

    # --- marking -------------------------------------------------------------------------------
    def set_range(self, first: int, count: int) -> None:
        """Set pages [first, first + count): whole words by slice, the two edges by mask."""
        if first < 0 or count < 0 or first + count > self.npages:
            raise BitmapError(f"range [{first}, {first + count}) outside {self.npages} pages")
        if count == 0:
            return
        last = first + count - 1
        w0, w1 = first // BITS_PER_LONG, last // BITS_PER_LONG
        lo_mask = ((1 << BITS_PER_LONG) - 1) << (first % BITS_PER_LONG) & ((1 << 64) - 1)
        hi_mask = (1 << (last % BITS_PER_LONG + 1)) - 1
        if w0 == w1:
            self.words[w0] |= np.uint64(lo_mask & hi_mask)
            return
        self.words[w0] |= np.uint64(lo_mask)
        self.words[w0 + 1 : w1] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
        self.words[w1] |= np.uint64(hi_mask)

    def set_pages(self, pages: np.ndarray) -> None:
        """Set the given page indices (any order, duplicates allowed)."""
        pages = np.asarray(pages, dtype=np.int64)
        if pages.size == 0:
            return
        if pages.min() < 0 or pages.max() >= self.npages:
            raise BitmapError(f"page index out of range for {self.npages} pages")
        raw = self.bytes_view()
        np.bitwise_or.at(raw, pages >> 3, (1 << (pages & 7)).astype(np.uint8))

    # --- windows (KVM_CLEAR_DIRTY_LOG addresses 64-page aligned windows) ----------------------
    def window(self, first_page: int, num_pages: int) -> DirtyBitmap:
        """Copy of pages [first_page, first_page + num_pages); first_page must be 64-aligned."""
        self._check_window(first_page, num_pages)
        w0 = first_page // BITS_PER_LONG
        sub = DirtyBitmap(num_pages)
        sub.words[:] = self.words[w0 : w0 + sub.words.size]
        if sub.words.size:
            sub.words[-1] &= np.uint64(_tail_mask(num_pages))
        return sub

    def clear_window(self, first_page: int, mask: DirtyBitmap) -> None:
        """Clear every page whose bit is set in ``mask`` (bit 0 of mask is first_page)."""
        self._check_window(first_page, mask.npages)
        w0 = first_page // BITS_PER_LONG
        target = self.words[w0 : w0 + mask.words.size]
        np.bitwise_and(target, ~mask.words, out=target)

    def _check_window(self, first_page: int, num_pages: int) -> None:
        if first_page % BITS_PER_LONG or first_page < 0 or num_pages < 0:
            raise BitmapError(f"window must start at a multiple of 64 pages, not {first_page}")
        if first_page + num_pages > self.npages:
            raise BitmapError(
                f"window [{first_page}, {first_page + num_pages}) outside {self.npages} pages"
            )

    def __repr__(self) -> str:
        return f"DirtyBitmap(npages={self.npages}, dirty={self.count()})"
