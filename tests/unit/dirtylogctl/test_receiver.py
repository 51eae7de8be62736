"""The receiver against hostile peers, in-process: what a peer's bytes may cost it in memory,
which errors they may end it with, and what they may do to an existing output file.

``migrate-receive`` listens without authentication, so every stream is untrusted. Memory is
measured with tracemalloc (numpy reports its buffers to it); the mapped image is a file's
page cache and is not counted. The fuzz property runs DIRTYLOGD_FUZZ_EXAMPLES examples (200
by default, a few seconds).
"""

import io
import json
import os
import re
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dirtylogctl import image
from dirtylogctl import receive as stream
from dirtylogctl.image import Image
from dirtylogctl.receive import check_output, receive, receive_image
from dirtylogctl.wireformat import (
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_KEYS_PER_FRAME,
    MAX_PAGES_PER_FRAME,
    MAX_VERIFY_KEYS,
    MAX_VERIFY_PAGES,
    PAGE_SIZE,
    Header,
    SlotInfo,
    StreamError,
    done_frame,
    encode_err,
    encode_header,
    page_digests,
    pages_frame,
    verify_frame,
)

MiB = 1 << 20
LARGEST_FRAME = MAX_PAGES_PER_FRAME * (8 + PAGE_SIZE)  # a PAGES frame's payload, ~1 MiB
EXAMPLES = int(os.environ.get("DIRTYLOGD_FUZZ_EXAMPLES", "200"))


def raw_header(doc) -> bytes:
    meta = json.dumps(doc).encode()
    return MAGIC + struct.pack("<I", len(meta)) + meta


def raw_frame(kind: int, count: int, aux: int, payload: bytes) -> bytes:
    head = struct.pack("<BIQ", kind, count, aux)
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


class Wire(io.BytesIO):
    """A peer's bytes that remembers the largest read the receiver asked for."""

    largest = 0

    def read(self, n=-1):
        self.largest = max(self.largest, n)
        return super().read(n)


class Zeros:
    """An image stand-in of zero pages that stores nothing."""

    def write(self, gpas, data):
        pass

    def read(self, gpas):
        return np.zeros((gpas.size, PAGE_SIZE), np.uint8)

    def write_keys(self, gpa, keys):
        pass

    def differing_keys(self, gpa, keys):
        return np.zeros(0, "<u8")

    def sync(self):
        pass


def peak_of(run) -> tuple[object, int]:
    """``run()``'s result (or the exception it raised) and the most memory it held at once."""
    tracemalloc.start()
    try:
        try:
            result = run()
        except Exception as exc:  # handed back for the test to judge
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


HEADER = encode_header(Header("vm1", (SlotInfo(0, 0, MAX_VERIFY_PAGES),)))


# --- memory: every frame bounded by its kind, the receiver by a few frames ----------------------
@pytest.mark.parametrize(
    ("kind", "count", "after_done"),
    [
        (3, MAX_VERIFY_PAGES + 1, True),
        (3, 1 << 18, True),  # the 2 GiB of the issue
        (3, (1 << 32) - 1, True),
        (1, MAX_PAGES_PER_FRAME + 1, False),
        (1, 1 << 20, False),
        (4, MAX_KEYS_PER_FRAME + 1, False),
        (4, (1 << 32) - 1, False),
        (5, MAX_VERIFY_KEYS + 1, True),
    ],
    ids=[
        "verify-limit+1",
        "verify-2^18",
        "verify-2^32-1",
        "pages-limit+1",
        "pages-2^20",
        "keys-limit+1",
        "keys-2^32-1",
        "verify-keys-limit+1",
    ],
)
def test_a_frame_over_its_kinds_limit_is_refused_before_its_payload_is_read(
    kind, count, after_done
):
    """Only the frame's head is sent: a receiver that read (or allocated) the payload first
    would ask for count * item bytes, then say the stream ended instead of naming the limit."""
    wire = Wire(
        HEADER + (done_frame(0) if after_done else b"") + struct.pack("<BIQ", kind, count, 0)
    )
    answers: list[bytes] = []
    refused, peak = peak_of(lambda: receive(wire, lambda header: Zeros(), answers.append))
    assert isinstance(refused, StreamError)
    name, limit = {
        1: ("PAGES", MAX_PAGES_PER_FRAME),
        3: ("VERIFY", MAX_VERIFY_PAGES),
        4: ("KEYS", MAX_KEYS_PER_FRAME),
        5: ("VERIFY_KEYS", MAX_VERIFY_KEYS),
    }[kind]
    assert str(refused).endswith(f"{name} of {count} pages is over the limit of {limit}")
    assert answers[-1] == encode_err(str(refused))
    assert wire.largest <= len(HEADER) and peak < MiB


def test_verifying_the_largest_frame_costs_a_few_frames_of_memory(tmp_path):
    """A full VERIFY names 64 MiB of pages; they are read and hashed a PAGES frame's worth at a
    time (before: all at once, and their products too — 128 MiB for one 256 KiB frame)."""
    gpas = np.arange(MAX_VERIFY_PAGES) * PAGE_SIZE
    digests = page_digests(np.zeros((1, PAGE_SIZE), np.uint8), 7).repeat(MAX_VERIFY_PAGES)
    digests[5] ^= 1
    raw = HEADER + done_frame(0) + verify_frame(7, gpas, digests)
    target = Image(str(tmp_path / "img"), MAX_VERIFY_PAGES * PAGE_SIZE)
    answers: list[bytes] = []
    got, peak = peak_of(lambda: receive(io.BytesIO(raw), lambda header: target, answers.append))
    target.close()
    assert got.verified_pages == MAX_VERIFY_PAGES and got.differing == 1
    assert answers[-1] == b"DIFF" + struct.pack("<IQ", 1, 5 * PAGE_SIZE)
    assert peak < 4 * LARGEST_FRAME, f"{peak / MiB:.1f} MiB"


@pytest.mark.parametrize(
    "item",
    [b"{}, ", b"[], ", b"1.5, "],
    ids=["objects", "lists", "floats"],
)
def test_the_largest_header_costs_a_few_frames_of_memory(item):
    """JSON costs up to ~25 bytes of objects per byte; the header is small enough that the
    worst one still costs only a few frames (before, at 1 MiB: 26 MiB)."""
    prefix = b'{"version": 2, "page-size": 4096, "vm": "x", "storage-keys": false, "slots": ['
    items = (MAX_HEADER_BYTES - len(prefix)) // len(item)
    meta = prefix + (item * items).rstrip(b", ") + b"]}"
    assert len(meta) <= MAX_HEADER_BYTES
    raw = MAGIC + struct.pack("<I", len(meta)) + meta
    refused, peak = peak_of(
        lambda: receive(io.BytesIO(raw), lambda header: Zeros(), lambda _: None)
    )
    assert isinstance(refused, StreamError) and "over the limit of 1024" in str(refused)
    assert peak < 4 * LARGEST_FRAME, f"{peak / MiB:.1f} MiB"


def test_a_header_nested_too_deeply_is_refused_not_a_recursion_error():
    meta = b"[" * 100_000
    raw = MAGIC + struct.pack("<I", len(meta)) + meta
    with pytest.raises(StreamError, match="bad stream header: JSON nested too deeply"):
        receive(io.BytesIO(raw), lambda header: Zeros(), lambda _: None)


def test_an_image_costs_memory_by_its_slots_not_by_its_span(tmp_path):
    """One page at 8 TiB: the image is a sparse 8 TiB file, its slots two numbers (before: a
    flag per page of the span, 2 GiB)."""
    top = 8 << 40
    image, peak = peak_of(lambda: Image(str(tmp_path / "img"), top, [(top - PAGE_SIZE, PAGE_SIZE)]))
    assert isinstance(image, Image), image
    page = np.full((1, PAGE_SIZE), 9, np.uint8)
    image.write(np.array([top - PAGE_SIZE]), page)
    with pytest.raises(StreamError, match="a page at 0x0 lies outside the image's slots"):
        image.write(np.array([0]), page)
    image.close()
    assert peak < MiB, f"{peak / MiB:.1f} MiB"


def test_an_image_larger_than_the_free_space_is_refused_before_any_is_reserved(
    tmp_path, monkeypatch
):
    """A peer's absurd size must not fill the disk for a moment on its way to ENOSPC."""
    real = os.fstatvfs

    def nearly_full(fd):
        st = real(fd)
        return os.statvfs_result((*st[:4], 2, *st[5:]))  # f_bavail: 2 blocks

    def never(*args):
        raise AssertionError("posix_fallocate called for an image that cannot fit")

    monkeypatch.setattr(image.os, "fstatvfs", nearly_full)
    monkeypatch.setattr(image.os, "posix_fallocate", never)
    with pytest.raises(StreamError, match=r"No space left on device \(ENOSPC\): only \d+ bytes"):
        Image(str(tmp_path / "img"), 1 << 30)
    assert list(tmp_path.iterdir()) == []


# --- every field a peer sends: refused with a reason, never a crash -----------------------------
def test_a_slot_reaching_past_what_a_file_can_hold_is_refused_not_an_overflow(tmp_path):
    doc = {"version": 2, "page-size": 4096, "vm": "x", "storage-keys": False}
    doc["slots"] = [{"slot": 0, "guest-phys-addr": (1 << 64) - PAGE_SIZE, "npages": 1}]
    out = str(tmp_path / "out")
    with pytest.raises(StreamError, match="larger than a file can be"):
        receive_image(io.BytesIO(raw_header(doc) + done_frame(0)), lambda _: None, out)
    assert list(tmp_path.iterdir()) == []


def test_a_slot_number_past_kvms_32_bits_is_refused():
    doc = {"version": 2, "page-size": 4096, "vm": "x", "storage-keys": False}
    doc["slots"] = [{"slot": 1 << 70, "guest-phys-addr": 0, "npages": 1}]
    with pytest.raises(StreamError, match=r"'slots\[0\].slot' must be an integer from 0 to"):
        receive(io.BytesIO(raw_header(doc)), lambda header: Zeros(), lambda _: None)


def test_a_page_at_an_unaligned_address_is_refused_not_stored_at_the_page_below():
    raw = HEADER + pages_frame(np.array([PAGE_SIZE + 1]), np.ones(PAGE_SIZE, np.uint8))
    with pytest.raises(StreamError, match="frame 1: PAGES names 0x1001, not a page address"):
        receive(io.BytesIO(raw), lambda header: Zeros(), lambda _: None)


def test_a_vm_without_pages_is_received_into_an_empty_image(tmp_path):
    out = tmp_path / "out"
    raw = encode_header(Header("empty", ())) + done_frame(0)
    assert receive_image(io.BytesIO(raw), lambda _: None, str(out)).done
    assert out.stat().st_size == 0


class Broken(io.BytesIO):
    """A connection that resets after the bytes it was given."""

    def read(self, n=-1):
        data = super().read(n)
        if not data:
            raise ConnectionResetError(104, "Connection reset by peer")
        return data


def test_a_peer_that_resets_or_stops_reading_ends_the_receive_with_a_stream_error():
    """Lost connections are the peer's doing too: one line, like every other refusal."""
    with pytest.raises(StreamError, match=r"lost the connection to the sender: .*reset by peer"):
        receive(Broken(HEADER), lambda header: Zeros(), lambda _: None)

    def unread(data):
        if data.startswith(b"ACK "):
            raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(StreamError, match=r"cannot answer the sender: \[Errno 32\] Broken pipe"):
        receive(io.BytesIO(HEADER + done_frame(0)), lambda header: Zeros(), unread)


# --- the output: replaced by a complete image, or untouched -------------------------------------
def test_the_output_is_replaced_only_when_done_is_synced(tmp_path):
    out = tmp_path / "out"
    out.write_bytes(b"the previous image")
    page = np.full(PAGE_SIZE, 3, np.uint8)
    partial = encode_header(Header("x", (SlotInfo(0, 0, 2),))) + pages_frame(np.array([0]), page)
    with pytest.raises(StreamError, match="ended before DONE"):
        receive_image(io.BytesIO(partial), lambda _: None, str(out))
    assert out.read_bytes() == b"the previous image"
    assert receive_image(io.BytesIO(partial + done_frame(1)), lambda _: None, str(out)).done
    assert out.read_bytes() == page.tobytes() + bytes(PAGE_SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary file left


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("file/out", "Not a directory (ENOTDIR)"),
        ("missing/out", "No such file or directory (ENOENT)"),
        (".", "it is a directory"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_up_front(tmp_path, where, says):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StreamError, match="cannot write the image") as refused:
        check_output(str(tmp_path / where))
    assert str(refused.value).endswith(says)


# --- fuzz ---------------------------------------------------------------------------------------
ODD = st.sampled_from([1 << 70, 1 << 64, (1 << 64) - PAGE_SIZE, 1 << 63, 1 << 40, -1, 2.5, "1"])
SLOT = st.fixed_dictionaries(
    {
        "slot": st.integers(0, 40) | ODD,
        "guest-phys-addr": st.integers(0, 16).map(lambda n: n * PAGE_SIZE) | ODD,
        "npages": st.integers(0, 16) | ODD,
    }
)
DOC = st.fixed_dictionaries(
    {
        "version": st.just(2) | ODD,
        "page-size": st.just(PAGE_SIZE) | ODD,
        "vm": st.just("vm") | st.text(max_size=8),
        "storage-keys": st.booleans() | ODD,
        "slots": st.lists(SLOT, max_size=3),
    }
)
GPA = st.one_of(
    st.integers(0, 40).map(lambda n: n * PAGE_SIZE),
    st.integers(0, 40).map(lambda n: n * PAGE_SIZE),
    st.integers(0, (1 << 64) - 1),
)


@st.composite
def frames(draw) -> bytes:
    """One frame: well formed with scattered addresses, or of any kind and count at all."""
    choice = draw(
        st.sampled_from(["pages", "pages", "done", "done", "verify", "keys", "keys", "raw"])
    )
    if choice == "pages":
        gpas = np.array(draw(st.lists(GPA, max_size=4)), np.uint64)
        return raw_frame(
            1, gpas.size, 0, gpas.astype("<u8").tobytes() + bytes(gpas.size * PAGE_SIZE)
        )
    if choice == "done":
        return done_frame(draw(st.integers(0, 64)))
    if choice == "keys":  # KEYS or VERIFY_KEYS, mostly from a page where a slot may start
        keys = draw(st.binary(max_size=20))
        return raw_frame(draw(st.sampled_from([4, 4, 5])), len(keys), draw(GPA), keys)
    if choice == "verify":
        pairs = draw(st.lists(st.tuples(GPA, st.integers(0, (1 << 64) - 1)), max_size=4))
        body = np.array(pairs, np.uint64).reshape(-1, 2).astype("<u8").tobytes()
        return raw_frame(3, len(pairs), 0, struct.pack("<Q", draw(st.integers(0, 9))) + body)
    count = draw(st.integers(0, 4) | st.sampled_from([1 << 18, 1 << 24, (1 << 32) - 1]))
    payload = draw(st.binary(max_size=64))
    return raw_frame(draw(st.integers(0, 255)), count, draw(st.integers(0, (1 << 64) - 1)), payload)


VALID = st.tuples(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 16), st.integers(0, 16)), max_size=3),
    st.booleans(),
).map(
    lambda drawn: raw_header(
        {
            "version": 2,
            "page-size": PAGE_SIZE,
            "vm": "vm",
            "storage-keys": drawn[1],
            "slots": [
                {"slot": n, "guest-phys-addr": at * PAGE_SIZE, "npages": size}
                for n, at, size in drawn[0]
            ],
        }
    )
)


@st.composite
def streams(draw) -> bytes:
    """Mostly a valid header and frames, else a mutated header or none at all; then perhaps a
    cut or a flipped bit."""
    start = draw(
        st.sampled_from(["valid"] * 6 + ["mutated", "junk", "magic", "length"]).flatmap(
            lambda mode: {
                "valid": VALID,
                "mutated": DOC.map(raw_header),
                "junk": st.binary(max_size=64),
                "magic": st.binary(max_size=16).map(lambda b: MAGIC + b),
                "length": st.integers(0, (1 << 32) - 1).map(lambda n: MAGIC + struct.pack("<I", n)),
            }[mode]
        )
    )
    raw = bytearray(start + b"".join(draw(st.lists(frames(), max_size=6))))
    # hypothesis leans towards small integers: 3 (not 0) means "cut", and the cut counts back
    # from the end
    if raw and draw(st.integers(0, 3)) == 3:
        raw = raw[: len(raw) - draw(st.integers(1, len(raw)))]
    if raw and draw(st.integers(0, 3)) == 3:
        raw[draw(st.integers(0, len(raw) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(raw)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(raw=streams())
def test_any_stream_is_received_or_refused_in_one_line_never_a_crash(outputs, raw):
    """Whatever a peer sends: a Received or a StreamError (nothing else escapes), its text one
    line and sent back as ERR, a few frames of memory at most, and ``--output`` either the old
    file or — only after an ACK — the complete new image; no temporary file is left."""
    out = outputs / "out"
    out.write_bytes(b"old image")
    answers: list[bytes] = []
    got, peak = peak_of(lambda: receive_image(io.BytesIO(raw), answers.append, str(out)))
    assert isinstance(got, stream.Received | StreamError), repr(got)
    event("received" if isinstance(got, stream.Received) else re.sub(r"\d+", "N", str(got))[:48])
    if isinstance(got, StreamError):
        text = str(got)
        assert text and "\n" not in text and answers[-1] == encode_err(text)
    acknowledged = any(a.startswith(b"ACK ") for a in answers)
    assert (out.read_bytes() == b"old image") != acknowledged
    assert {p.name for p in outputs.iterdir()} <= {"out", "out.skeys"}  # no temporary left
    assert peak < 4 * LARGEST_FRAME, f"{peak / MiB:.1f} MiB"
