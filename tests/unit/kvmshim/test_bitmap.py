"""DirtyBitmap: KVM's layout, its codecs, and the errors for bitmaps that do not fit."""

import base64

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmshim.bitmap import DirtyBitmap
from kvmshim.errors import BitmapError


def test_page_n_is_byte_n_div_8_bit_n_mod_8():
    bm = DirtyBitmap.from_pages(130, [0, 9, 64, 129])
    raw = bm.to_bytes()
    assert len(raw) == 24  # ALIGN(130, 64) / 8
    assert raw[0] == 0b0000_0001  # page 0
    assert raw[1] == 0b0000_0010  # page 9
    assert raw[8] == 0b0000_0001  # page 64
    assert raw[16] == 0b0000_0010  # page 129


def test_ones_sets_exactly_npages_bits():
    bm = DirtyBitmap.ones(65)
    assert bm.count() == 65
    assert bm.to_bytes() == b"\xff" * 8 + b"\x01" + b"\x00" * 7


@pytest.mark.parametrize("length", [0, 15, 17, 24])
def test_from_bytes_rejects_wrong_length(length):
    with pytest.raises(BitmapError, match="must be 16 bytes"):
        DirtyBitmap.from_bytes(100, bytes(length))


def test_from_bytes_rejects_bits_past_the_last_page():
    data = bytearray(16)
    data[12] = 0x10  # page 100 of a 100-page slot (pages 0..99)
    with pytest.raises(BitmapError, match="past the last page"):
        DirtyBitmap.from_bytes(100, bytes(data))


def test_from_base64_rejects_garbage():
    with pytest.raises(BitmapError, match="not valid base64"):
        DirtyBitmap.from_base64(64, "not*base64")


def test_base64_round_trip():
    bm = DirtyBitmap.from_pages(200, [3, 150])
    text = bm.to_base64()
    assert base64.b64decode(text) == bm.to_bytes()
    assert DirtyBitmap.from_base64(200, text) == bm


def test_ranges_and_pages():
    # [0, 3): dirty / [3, 64): clean / [64, 66): dirty / [66, 199): clean / [199]: dirty
    bm = DirtyBitmap.from_ranges(200, [[0, 3], [64, 2], [199, 1]])
    assert bm.ranges() == [[0, 3], [64, 2], [199, 1]]
    assert bm.pages().tolist() == [0, 1, 2, 64, 65, 199]
    assert bm.count() == 6


def test_ranges_outside_the_slot_are_errors():
    with pytest.raises(BitmapError, match="outside 10 pages"):
        DirtyBitmap.from_ranges(10, [[8, 3]])
    with pytest.raises(BitmapError, match="out of range"):
        DirtyBitmap.from_pages(10, [10])


def test_union_and_andnot():
    a = DirtyBitmap.from_pages(70, [1, 2, 69])
    b = DirtyBitmap.from_pages(70, [2, 3])
    assert (a | b).pages().tolist() == [1, 2, 3, 69]
    assert a.andnot(b).pages().tolist() == [1, 69]
    with pytest.raises(BitmapError, match="do not combine"):
        a |= DirtyBitmap(71)


def test_window_and_clear_window_are_64_page_aligned():
    bm = DirtyBitmap.ones(200)
    # clear pages [64, 64+136) = [64, 200) where the mask says: its pages 0 and 135
    mask = DirtyBitmap.from_pages(136, [0, 135])
    bm.clear_window(64, mask)
    assert bm.count() == 198
    assert not bm.test(64) and not bm.test(199)
    assert bm.window(64, 136).count() == 134
    with pytest.raises(BitmapError, match="multiple of 64"):
        bm.window(1, 10)


@given(
    st.integers(0, 700).flatmap(
        lambda n: st.tuples(st.just(n), st.sets(st.integers(0, max(n - 1, 0))))
    )
)
def test_pages_round_trip_through_every_codec(case):
    npages, pages = case
    pages = {p for p in pages if p < npages}
    bm = DirtyBitmap.from_pages(npages, sorted(pages))
    assert bm.pages().tolist() == sorted(pages)
    assert bm.count() == len(pages)
    assert DirtyBitmap.from_bytes(npages, bm.to_bytes()) == bm
    assert DirtyBitmap.from_ranges(npages, bm.ranges()) == bm
    # independent check of the bit order against numpy's little-endian unpacking
    bits = np.unpackbits(np.frombuffer(bm.to_bytes(), np.uint8), bitorder="little")
    assert np.flatnonzero(bits).tolist() == sorted(pages)


@given(
    st.integers(1, 300).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(0, n))
    )
)
def test_set_range_equals_setting_each_page(case):
    npages, a, b = case
    first, count = min(a, b), abs(a - b)
    bm = DirtyBitmap.from_pages(npages, [0]) if npages else DirtyBitmap(npages)
    bm.set_range(first, count)
    expected = {0} | set(range(first, first + count))
    assert bm.pages().tolist() == sorted(expected)
    bm2 = DirtyBitmap.from_pages(npages, [0])
    bm2.set_pages(np.array(sorted(expected), dtype=np.int64))
    assert bm2 == bm
