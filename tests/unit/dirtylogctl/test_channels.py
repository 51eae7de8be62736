"""Format version 4's channels: which channel a page travels on, how runs and scattered pages
are split among them, the header members, and a receiver without channels accepting one."""

import io
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtylogctl.receive import receive
from dirtylogctl.wireformat import (
    BLOCK_PAGES,
    MAGIC,
    MAX_CHANNELS,
    PAGE_SIZE,
    Header,
    SlotInfo,
    StreamError,
    channel_of,
    done_frame,
    encode_header,
    encode_hello,
    read_chan,
    read_header,
    read_hello,
    split_pages,
    split_run,
    strays,
)

BLOCK = BLOCK_PAGES * PAGE_SIZE


def reader(data: bytes):
    stream = io.BytesIO(data)
    return lambda n: stream.read(n)


def test_a_page_maps_to_its_block_modulo_the_count():
    assert [channel_of(b * BLOCK, 3) for b in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert channel_of(BLOCK - PAGE_SIZE, 3) == 0 and channel_of(BLOCK, 3) == 1
    assert channel_of(123 * BLOCK + 5 * PAGE_SIZE, 1) == 0


def test_a_run_is_cut_at_block_boundaries_only_with_several_channels():
    gpa = BLOCK - 10 * PAGE_SIZE  # 10 pages of block 0, then 246 of block 1
    assert split_run(gpa, 256, 1) == [(0, gpa, 256)]
    assert split_run(gpa, 256, 2) == [(0, gpa, 10), (1, BLOCK, 246)]
    assert split_run(BLOCK, 256, 4) == [(1, BLOCK, 256)]  # aligned: one piece


def test_scattered_pages_are_grouped_by_channel_in_order():
    gpas = np.array([0, 2 * BLOCK, BLOCK + PAGE_SIZE, 3 * BLOCK, PAGE_SIZE])
    got = [(c, idx.tolist()) for c, idx in split_pages(gpas, 2)]
    assert got == [(0, [0, 1, 4]), (1, [2, 3])]
    assert [(c, idx.tolist()) for c, idx in split_pages(gpas, 1)] == [(0, [0, 1, 2, 3, 4])]
    assert split_pages(np.zeros(0, np.int64), 3) == []


@given(
    first=st.integers(0, (1 << 40) // PAGE_SIZE),
    count=st.integers(1, BLOCK_PAGES),
    channels=st.integers(1, MAX_CHANNELS),
)
def test_every_page_of_a_split_run_goes_on_its_own_channel_once(first, count, channels):
    gpa = first * PAGE_SIZE
    pieces = split_run(gpa, count, channels)
    pages = []
    for channel, at, n in pieces:
        piece = at + np.arange(n) * PAGE_SIZE
        assert n > 0 and not strays(piece, channel, channels).size
        assert len({channel_of(int(g), channels) for g in piece}) == 1
        pages += piece.tolist()
    assert pages == (gpa + np.arange(count) * PAGE_SIZE).tolist()  # all, in order, once
    assert len(pieces) <= 2  # a run of at most a block spans at most two


@given(
    pages=st.lists(st.integers(0, 1 << 20), min_size=1, max_size=300, unique=True),
    channels=st.integers(1, MAX_CHANNELS),
)
def test_scattered_pages_each_land_on_the_channel_their_address_names(pages, channels):
    gpas = np.array(sorted(pages), np.int64) * PAGE_SIZE
    seen = []
    for channel, idx in split_pages(gpas, channels):
        assert not strays(gpas[idx], channel, channels).size
        seen += idx.tolist()
    assert sorted(seen) == list(range(gpas.size))


def test_strays_names_the_pages_of_other_channels():
    gpas = np.array([0, BLOCK, 2 * BLOCK], np.uint64)
    assert strays(gpas, 0, 2).tolist() == [BLOCK]


def test_a_version_4_header_carries_the_channels_and_the_token():
    header = Header.offering("vm", (SlotInfo(0, 0, 4),), False, 3)
    raw = encode_header(header)
    doc = json.loads(raw[len(MAGIC) + 4 :])
    assert doc["version"] == 4 and doc["channels"] == 3 and len(doc["token"]) == 32
    assert read_header(reader(raw)) == header
    assert Header.offering("vm", (), False, 3).token != header.token  # fresh per migration


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"channels": 0}, "'channels' must be an integer from 1 to 16, not 0"),
        ({"channels": 17}, "'channels' must be an integer from 1 to 16, not 17"),
        ({"channels": True}, "'channels' must be an integer from 1 to 16, not True"),
        ({"token": "zz" * 16}, "'token' must be 32 hex digits"),
        ({"token": "ab"}, "'token' must be 32 hex digits"),
    ],
)
def test_bad_channel_members_are_refused(change, reason):
    doc = {"version": 4, "page-size": 4096, "vm": "x", "storage-keys": False, "slots": []}
    doc |= {"channels": 2, "token": "00" * 16} | change
    meta = json.dumps(doc).encode()
    raw = MAGIC + len(meta).to_bytes(4, "little") + meta
    with pytest.raises(StreamError, match=reason):
        read_header(reader(raw))


def test_a_hello_round_trips_and_a_main_stream_is_not_one():
    token = bytes(range(16))
    assert read_hello(reader(encode_hello(token, 5))) == (token, 5)
    with pytest.raises(StreamError, match="not a migration channel"):
        read_hello(reader(encode_header(Header("x", ())) + bytes(32)))


def test_a_hello_where_a_header_belongs_is_named():
    with pytest.raises(StreamError, match="a channel hello, but no migration is waiting"):
        read_header(reader(encode_hello(bytes(16), 1)))


class Nothing:
    def sync(self):
        pass


def test_a_receiver_without_channels_accepts_one_and_says_so():
    header = Header.offering("vm", (), False, 4)
    answers: list[bytes] = []
    got = receive(
        io.BytesIO(encode_header(header) + done_frame(0)), lambda h: Nothing(), answers.append
    )
    assert got.done and got.channels == 1
    assert read_chan(reader(answers[0])) == 1
