"""Storage keys in the migration stream (format version 2): KEYS and VERIFY_KEYS frames, their
bounds, checksum and order, and the key file beside the image — put in place with it, or not
at all."""

import io
import struct
import zlib

import numpy as np
import pytest

from dirtylogctl.keyfile import key_path
from dirtylogctl.receive import receive_image
from dirtylogctl.stream import FileSink
from dirtylogctl.wireformat import (
    MAX_KEYS_PER_FRAME,
    MAX_VERIFY_KEYS,
    MAX_VERIFY_PAGES,
    PAGE_SIZE,
    Header,
    Kind,
    SlotInfo,
    StreamError,
    done_frame,
    encode_err,
    encode_frame,
    encode_header,
    keys_frame,
    read_diff,
    verify_keys_frame,
)
from kvmshim.abi import KVM_S390_SKEYS_MAX

# slot 7: gpa [16 MiB, +3 pages) / slot 2: gpa [0, +2 pages) — header order is not address order
SLOTS = (SlotInfo(7, 16 << 20, 3), SlotInfo(2, 0, 2))
KEYED = Header("vm1", SLOTS, storage_keys=True)
PLAIN = Header("vm1", SLOTS)
K7 = np.array([0x10, 0x26, 0x30], np.uint8)
K2 = np.array([0xF8, 0x06], np.uint8)
ALL_KEYS = keys_frame(16 << 20, K7[:2]) + keys_frame((16 << 20) + 2 * PAGE_SIZE, K7[2:])
ALL_KEYS += keys_frame(0, K2)


def run(tmp_path, raw: bytes):
    """Receive ``raw`` into tmp_path/out; the result (or refusal) and every answer."""
    answers: list[bytes] = []
    try:
        got = receive_image(io.BytesIO(raw), answers.append, str(tmp_path / "out"))
    except StreamError as exc:
        assert answers[-1] == encode_err(str(exc))
        return exc, answers
    return got, answers


def diff_of(answer: bytes) -> list[int]:
    buf = io.BytesIO(answer)
    return read_diff(buf.read)


def test_keys_land_beside_the_image_in_header_order_and_verify_names_a_different_one(tmp_path):
    raw = encode_header(KEYED) + ALL_KEYS + done_frame(0)
    changed = K7.copy()
    changed[1] ^= 0x04  # the destination must name this page, and only it
    raw += verify_keys_frame(16 << 20, changed) + verify_keys_frame(0, K2)
    got, answers = run(tmp_path, raw)
    assert got.done and got.keys == 5 and got.verified_keys == 5 and got.differing_keys == 1
    assert answers[0].startswith(b"ACK ")
    assert diff_of(answers[1]) == [(16 << 20) + PAGE_SIZE] and diff_of(answers[2]) == []
    assert (tmp_path / "out.skeys").read_bytes() == K7.tobytes() + K2.tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.skeys"]


@pytest.mark.parametrize(
    ("frames", "says"),
    [
        (keys_frame(0, K2), "frame 1: KEYS at 0x0 where those from 0x1000000 (slot 7) were due"),
        (
            keys_frame(16 << 20, K7) + keys_frame(PAGE_SIZE, K2[1:]),
            "frame 2: KEYS at 0x1000 where those from 0x0 (slot 2) were due",
        ),
        (ALL_KEYS + keys_frame(0, K2), "frame 4: KEYS at 0x0 after every slot's keys had come"),
        (
            keys_frame(16 << 20, np.zeros(4, np.uint8)),
            "frame 1: KEYS of 4 pages at 0x1000000 run past the end of slot 7",
        ),
        (
            keys_frame(16 << 20, K7),
            "the stream declared storage keys but sent 3 of 5: none from 0x0 (slot 2) on",
        ),
    ],
    ids=["out-of-order", "skipping", "twice", "past-the-slot", "missing-at-done"],
)
def test_keys_come_once_each_in_header_order_and_all_before_done(tmp_path, frames, says):
    (tmp_path / "out").write_bytes(b"old image")
    (tmp_path / "out.skeys").write_bytes(b"old keys")
    got, _ = run(tmp_path, encode_header(KEYED) + frames + done_frame(0))
    assert isinstance(got, StreamError) and str(got).startswith(says), got
    assert (tmp_path / "out").read_bytes() == b"old image"  # nothing put in place
    assert (tmp_path / "out.skeys").read_bytes() == b"old keys"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.skeys"]


@pytest.mark.parametrize("kind", [Kind.KEYS, Kind.VERIFY_KEYS])
def test_key_frames_in_a_stream_without_keys_are_refused(tmp_path, kind):
    frame = encode_frame(kind, 2, 0, K2.tobytes())
    before = frame if kind is Kind.KEYS else done_frame(0) + frame
    got, _ = run(tmp_path, encode_header(PLAIN) + before)
    number = 1 if kind is Kind.KEYS else 2
    assert str(got) == (
        f"frame {number}: {kind.name} in a stream whose header declares no storage keys"
    )


def raw_frame(kind: int, count: int, aux: int, payload: bytes) -> bytes:
    head = struct.pack("<BIQ", kind, count, aux)
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


def test_a_key_frame_is_checked_like_every_frame(tmp_path):
    head = encode_header(KEYED)
    flipped = bytearray(keys_frame(16 << 20, K7))
    flipped[14] ^= 0x01  # the second key byte
    assert str(run(tmp_path, head + bytes(flipped))[0]) == "frame 1: checksum mismatch"
    cut = keys_frame(16 << 20, K7)[:-2]
    assert str(run(tmp_path, head + cut)[0]) == "the stream ended before DONE"
    odd = raw_frame(4, 1, (16 << 20) + 1, b"\x10")
    assert str(run(tmp_path, head + odd)[0]) == "frame 1: KEYS names 0x1000001, not a page address"
    late = ALL_KEYS + done_frame(0) + keys_frame(16 << 20, K7)
    assert str(run(tmp_path, head + late)[0]) == "frame 5: KEYS may only come before DONE"
    early = verify_keys_frame(0, K2)
    assert str(run(tmp_path, head + early)[0]) == "frame 1: VERIFY_KEYS may only come after DONE"
    stray = done_frame(0) + verify_keys_frame(PAGE_SIZE, K2)  # [0x1000, +2 pages): past slot 2
    assert str(run(tmp_path, head + ALL_KEYS + stray)[0]) == (
        "frame 5: VERIFY_KEYS of 2 pages at 0x1000 lies in no one slot"
    )


def test_the_frames_are_bounded_like_the_others():
    assert MAX_KEYS_PER_FRAME == KVM_S390_SKEYS_MAX  # one ioctl's keys, one frame
    assert MAX_VERIFY_KEYS == MAX_VERIFY_PAGES  # one bound for any DIFF answer
    keys_frame(0, np.zeros(MAX_KEYS_PER_FRAME, np.uint8))
    with pytest.raises(ValueError, match="KEYS frame of 1048577 items"):
        keys_frame(0, np.zeros(MAX_KEYS_PER_FRAME + 1, np.uint8))
    with pytest.raises(ValueError, match="VERIFY_KEYS frame of 16385 items"):
        verify_keys_frame(0, np.zeros(MAX_VERIFY_KEYS + 1, np.uint8))


def test_an_image_without_keys_takes_the_old_key_file_with_it(tmp_path):
    (tmp_path / "out.skeys").write_bytes(b"keys of the image being replaced")
    got, _ = run(tmp_path, encode_header(PLAIN) + done_frame(0))
    assert got.done and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_local_file_destination_keeps_the_keys_beside_it_too(tmp_path):
    out = str(tmp_path / "local.img")
    sink = FileSink(out)
    try:
        sink.start(KEYED)
        for gpa, keys in ((16 << 20, K7), (0, K2)):
            sink.send_keys(gpa, keys)
        sink.finish(0)
        assert sink.verify_keys(0, np.array([0xF8, 0x00], np.uint8)) == [PAGE_SIZE]
    finally:
        sink.close()
    with open(key_path(out), "rb") as keys:
        assert keys.read() == K7.tobytes() + K2.tobytes()
    sink = FileSink(out)  # the same file again, from a source without keys
    try:
        sink.start(PLAIN)
        sink.finish(0)
    finally:
        sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.img"]


def test_a_local_destination_refuses_to_finish_without_every_key(tmp_path):
    sink = FileSink(str(tmp_path / "local.img"))
    try:
        sink.start(KEYED)
        sink.send_keys(16 << 20, K7)
        with pytest.raises(StreamError, match="declared storage keys but sent 3 of 5"):
            sink.finish(0)
    finally:
        sink.close()
