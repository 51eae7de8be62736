"""The migration wire format: what a receiver accepts, what it refuses and with which words,
and that the sender keeps to the limits the receiver checks."""

import asyncio
import contextlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtylogctl.migrate import Migration, Options, _Slot
from dirtylogctl.receive import receive
from dirtylogctl.wireformat import (
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_PAGES_PER_FRAME,
    MAX_VERIFY_PAGES,
    PAGE_SIZE,
    VERSION,
    Header,
    Kind,
    SlotInfo,
    StreamError,
    done_frame,
    encode_err,
    encode_frame,
    encode_header,
    pages_frame,
    read_ack,
    read_header,
    run_head,
)
from kvmshim.bitmap import DirtyBitmap


class Target:
    """An image stand-in: remembers what was written."""

    def __init__(self):
        self.header = None
        self.pages: dict[int, bytes] = {}
        self.keys: list[tuple[int, bytes]] = []

    def open(self, header):
        self.header = header
        return self

    def write(self, gpas, data):
        for g, row in zip(gpas.tolist(), data.reshape(-1, PAGE_SIZE), strict=True):
            self.pages[g] = row.tobytes()

    def read(self, gpas):
        return np.zeros((gpas.size, PAGE_SIZE), np.uint8)

    def write_keys(self, gpa, keys):
        self.keys.append((gpa, keys.tobytes()))

    def differing_keys(self, gpa, keys):
        return np.flatnonzero(keys) * PAGE_SIZE + gpa  # as if every stored key were 0

    def sync(self):
        pass


def reader(raw: bytes):
    buf = io.BytesIO(raw)

    def read(n):
        data = buf.read(n)
        if len(data) < n:
            raise StreamError("short")
        return data

    return read


def refusal(raw: bytes) -> str:
    """The receiver's error for ``raw``; the sender is told the same text through ERR."""
    answers: list[bytes] = []
    with pytest.raises(StreamError) as caught:
        receive(io.BytesIO(raw), Target().open, answers.append)
    assert answers[-1] == encode_err(str(caught.value))
    return str(caught.value)


def raw_header(doc) -> bytes:
    meta = json.dumps(doc).encode()
    return MAGIC + struct.pack("<I", len(meta)) + meta


def raw_frame(kind: int, count: int, aux: int, payload: bytes) -> bytes:
    """A frame built from the layout in the module docstring, bypassing the sender's checks."""
    head = struct.pack("<BIQ", kind, count, aux)
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


HEADER = Header("vm1", (SlotInfo(0, 4 << 30, 3), SlotInfo(1, 8 << 30, 1)))


# --- the header ---------------------------------------------------------------------------------
def test_header_round_trip_carries_version_and_page_size():
    raw = encode_header(HEADER)
    assert raw.startswith(MAGIC)
    doc = json.loads(raw[len(MAGIC) + 4 :])
    assert doc["version"] == 3 and VERSION == 4 and doc["page-size"] == PAGE_SIZE == 4096
    assert doc["storage-keys"] is False
    assert read_header(reader(raw)) == HEADER
    assert HEADER.image_bytes() == (8 << 30) + PAGE_SIZE


def test_a_whole_stream_round_trips_through_the_receiver():
    gpas = np.array([4 << 30, (4 << 30) + 2 * PAGE_SIZE])
    data = np.stack([np.full(PAGE_SIZE, b, np.uint8) for b in (7, 9)])
    raw = encode_header(HEADER) + pages_frame(gpas, data) + done_frame(2)
    target, answers = Target(), []
    got = receive(io.BytesIO(raw), target.open, answers.append)
    assert target.header == HEADER and got.pages == 2 and got.done
    assert target.pages[(4 << 30) + 2 * PAGE_SIZE] == bytes([9]) * PAGE_SIZE
    assert read_ack(reader(answers[-1])) == 2


def test_an_unknown_version_is_refused_naming_both_versions():
    raw = encode_header(Header("vm1", (), version=5)) + done_frame(0)
    assert refusal(raw) == (
        "stream format version 5 is not supported (this receiver speaks version 4)"
    )


def test_a_version_1_stream_is_refused_saying_why_it_cannot_be_taken_as_it_is():
    """Version 1 had no storage keys: taking it would silently drop an s390 guest's keys."""
    raw = raw_header({"version": 1, "page-size": 4096, "vm": "vm1", "slots": []})
    assert refusal(raw + done_frame(0)) == (
        "stream format version 1 is not supported (this receiver speaks version 4): version 1 "
        "carries no storage keys, so an s390 guest's would be left behind; upgrade dirtylogctl "
        "on the source"
    )


def test_a_header_without_a_version_is_refused():
    raw = raw_header({"page-size": 4096, "vm": "vm1", "slots": []}) + done_frame(0)
    assert "names no format version (this receiver speaks version 4)" in refusal(raw)


@pytest.mark.parametrize("page_size", [512, 8192, 65536, 1 << 20])
def test_a_page_size_other_than_4096_is_refused(page_size):
    raw = encode_header(Header("vm1", (), page_size=page_size)) + done_frame(0)
    assert refusal(raw) == (
        f"stream page size {page_size} is not supported (format version 4 carries 4096-byte pages)"
    )


GOOD = {"version": 2, "page-size": 4096, "vm": "vm1", "storage-keys": False, "slots": []}


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ([1, 2], "expected a JSON object, got list"),
        ({**GOOD, "version": "1"}, "'version' must be a non-negative integer, not '1'"),
        ({**GOOD, "version": True}, "'version' must be a non-negative integer, not True"),
        ({**GOOD, "page-size": None}, "'page-size' must be a non-negative integer, not None"),
        ({**GOOD, "vm": 3}, "'vm' must be a string"),
        ({**GOOD, "storage-keys": 1}, "'storage-keys' must be true or false"),
        ({"version": 2, "page-size": 4096, "vm": "v"}, "'storage-keys' must be true or false"),
        ({**GOOD, "slots": {}}, "'slots' must be a list"),
        ({**GOOD, "slots": [7]}, "slots[0] must be an object"),
        (
            {**GOOD, "slots": [{"slot": 0, "guest-phys-addr": 0, "npages": -1}]},
            "'slots[0].npages' must be a non-negative integer, not -1",
        ),
        (
            {**GOOD, "slots": [{"slot": 0, "guest-phys-addr": 4097, "npages": 1}]},
            "slot 0 at 0x1001 with 1 pages is not a page-aligned range",
        ),
        (
            {**GOOD, "slots": [{"slot": 2, "guest-phys-addr": (1 << 64) - 4096, "npages": 2}]},
            "is not a page-aligned range of the 64-bit address space",
        ),
    ],
)
def test_a_malformed_header_is_a_clear_error(doc, says):
    message = refusal(raw_header(doc))
    assert message.startswith("bad stream header: ") and says in message


def test_a_header_that_is_not_json_or_too_long_is_a_clear_error():
    assert "bad stream header: not JSON" in refusal(MAGIC + struct.pack("<I", 2) + b"\xff{")
    too_long = MAGIC + struct.pack("<I", MAX_HEADER_BYTES + 1)
    assert refusal(too_long) == (
        f"stream header of {MAX_HEADER_BYTES + 1} bytes is over the limit of {MAX_HEADER_BYTES}"
    )


MEMBERS = st.sampled_from(
    ["version", "page-size", "vm", "storage-keys", "slots", "slot", "guest-phys-addr", "npages"]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(MEMBERS | st.text(), inner),
    max_leaves=12,
)


@given(JSON)
def test_any_header_is_accepted_or_a_clear_error_never_a_crash(value):
    for doc in (value, {**GOOD, "slots": value}, {**GOOD, "slots": [value]}):
        with contextlib.suppress(StreamError):
            read_header(reader(raw_header(doc)))


# --- frames -------------------------------------------------------------------------------------
PAGE_ITEM = 8 + PAGE_SIZE


def test_a_pages_frame_over_the_limit_is_refused():
    count = MAX_PAGES_PER_FRAME + 1
    raw = encode_header(HEADER) + raw_frame(1, count, 0, bytes(count * PAGE_ITEM))
    assert refusal(raw) == f"frame 1: PAGES of {count} pages is over the limit of 256"


def test_a_verify_frame_over_the_limit_is_refused():
    count = MAX_VERIFY_PAGES + 1
    raw = encode_header(HEADER) + done_frame(0) + raw_frame(3, count, 0, bytes(8 + 16 * count))
    assert refusal(raw) == f"frame 2: VERIFY of {count} pages is over the limit of 16384"


def test_a_frame_at_the_limit_is_accepted():
    gpas = (4 << 30) + np.arange(MAX_PAGES_PER_FRAME) * PAGE_SIZE
    big = Header("vm1", (SlotInfo(0, 4 << 30, MAX_PAGES_PER_FRAME),))
    payload = gpas.astype("<u8").tobytes() + bytes(MAX_PAGES_PER_FRAME * PAGE_SIZE)
    raw = encode_header(big) + raw_frame(1, MAX_PAGES_PER_FRAME, 0, payload) + done_frame(256)
    assert receive(io.BytesIO(raw), Target().open, lambda _: None).pages == MAX_PAGES_PER_FRAME


def test_frames_out_of_order_or_of_unknown_type_are_refused():
    one = pages_frame(np.array([4 << 30]), np.zeros(PAGE_SIZE, np.uint8))
    assert refusal(encode_header(HEADER) + done_frame(0) + one) == (
        "frame 2: PAGES may only come before DONE"
    )
    verify = raw_frame(3, 0, 0, bytes(8))
    assert refusal(encode_header(HEADER) + verify) == "frame 1: VERIFY may only come after DONE"
    assert refusal(encode_header(HEADER) + raw_frame(9, 0, 0, b"")) == "frame 1: unknown type 9"


def test_the_sender_cannot_build_a_frame_the_receiver_refuses():
    count = MAX_PAGES_PER_FRAME + 1
    with pytest.raises(ValueError, match="PAGES frame of 257 items"):
        encode_frame(Kind.PAGES, count, 0, bytes(count * PAGE_ITEM))


# --- the sender keeps to the same limits --------------------------------------------------------
class RecordingSink:
    def __init__(self):
        self.frames: list[int] = []
        self.verified: list[int] = []

    def send_pages(self, gpas, data):
        pages_frame(gpas, data)  # what TcpSink sends; raises if over the limit
        self.frames.append(gpas.size)

    def send_run(self, run):
        run_head(run.gpa, run.pages.shape[0])  # what TcpSink sends; raises if over the limit
        self.frames.append(run.pages.shape[0])

    def verify(self, gpas, pages):
        self.verified.append(gpas.size)
        return []

    def drain(self):
        pass


def slot(npages: int) -> _Slot:
    region = np.zeros((npages, PAGE_SIZE), np.uint8)
    return _Slot(0, 0, 4 << 30, npages, True, region, DirtyBitmap.zeros(npages))


def test_the_sender_splits_pages_into_frames_of_the_receivers_limit():
    npages = 2 * MAX_PAGES_PER_FRAME + 3
    migration = Migration(None, Options("vm1", "/dev/null"), progress=None)
    sink = RecordingSink()
    s = slot(npages)
    asyncio.run(migration._copy(0, [s], {0: DirtyBitmap.ones(npages)}, sink, 0.0))
    assert sink.frames == [MAX_PAGES_PER_FRAME, MAX_PAGES_PER_FRAME, 3]
    assert s.sent.count() == npages and migration.stats.unique_pages_sent == npages


def test_the_sender_verifies_in_steps_of_the_receivers_limit():
    migration = Migration(None, Options("vm1", "/dev/null"), progress=None)
    sink = RecordingSink()
    asyncio.run(migration._verify([slot(MAX_VERIFY_PAGES + 1)], sink))
    assert sink.verified == [MAX_VERIFY_PAGES, 1]


# --- the header's limits ------------------------------------------------------------------------
def test_the_most_slots_at_their_widest_fit_the_header_and_one_more_is_refused_by_both_ends():
    """MAX_HEADER_BYTES is small (a hostile header costs ~25 bytes of objects a byte), yet a
    VM of MAX_SLOTS slots with the longest numbers and a 64-character name still fits it."""
    from dirtylogctl.wireformat import MAX_SLOT_FIELD, MAX_SLOTS

    wide = SlotInfo(MAX_SLOT_FIELD, (1 << 63) + (1 << 62), (1 << 50) - 1)
    header = Header("v" * 64, (wide,) * MAX_SLOTS)
    assert len(encode_header(header)) <= len(MAGIC) + 4 + MAX_HEADER_BYTES
    assert read_header(reader(encode_header(header))) == header
    over = Header("vm", (SlotInfo(0, 0, 1),) * (MAX_SLOTS + 1))
    with pytest.raises(StreamError, match="the VM has 1025 memslots; format version 4 carries"):
        encode_header(over)
    doc = {**GOOD, "slots": [{"slot": 0, "guest-phys-addr": 0, "npages": 1}] * (MAX_SLOTS + 1)}
    assert refusal(raw_header(doc)) == "bad stream header: 1025 slots, over the limit of 1024"
