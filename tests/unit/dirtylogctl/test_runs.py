"""RUN and FLUSH frames (format version 3): contiguous pages straight into the image, checked
before they are stored; DONE's ACK before the flush, FLUSH's SYNC after it; and the driver's
split of dirty pages into runs and scattered pages."""

import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtylogctl.migrate import MIN_RUN_PAGES, split_runs
from dirtylogctl.receive import receive, receive_image
from dirtylogctl.wireformat import (
    MAX_PAGES_PER_FRAME,
    PAGE_SIZE,
    SYNC,
    Header,
    SlotInfo,
    StreamError,
    done_frame,
    encode_ack,
    encode_header,
    flush_frame,
    frame_crc,
    run_head,
)

BASE = 1 << 30  # [BASE, BASE + 64 pages): the one slot


def header(version: int = 3) -> bytes:
    return encode_header(Header("vm1", (SlotInfo(0, BASE, 64),), version=version))


def run_frame(gpa: int, payload: bytes) -> bytes:
    head = run_head(gpa, len(payload) // PAGE_SIZE)
    return head + payload + frame_crc(head, payload)


def pages(count: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, count * PAGE_SIZE, np.uint8).tobytes()


def test_a_run_lands_at_its_address_and_flush_puts_the_image_in_place(tmp_path):
    data = pages(16)
    raw = header() + run_frame(BASE + 8 * PAGE_SIZE, data) + done_frame(16) + flush_frame()
    answers: list[bytes] = []
    out = tmp_path / "out.img"
    got = receive_image(io.BytesIO(raw), answers.append, str(out))
    assert got.runs == 1 and got.pages == 16 and got.synced == 3
    assert answers == [encode_ack(16), SYNC]
    image = out.read_bytes()
    # [BASE, +8 pages): zeros / [+8, +24): the run / [+24, +64): zeros
    assert image[BASE : BASE + 8 * PAGE_SIZE] == bytes(8 * PAGE_SIZE)
    assert image[BASE + 8 * PAGE_SIZE : BASE + 24 * PAGE_SIZE] == data
    assert image[BASE + 24 * PAGE_SIZE :] == bytes(40 * PAGE_SIZE)


def test_a_run_whose_checksum_differs_is_refused_and_nothing_is_put_in_place(tmp_path):
    frame = bytearray(run_frame(BASE, pages(4)))
    frame[13 + 5000] ^= 0x01  # a byte of the second page
    answers: list[bytes] = []
    with pytest.raises(StreamError, match=r"^frame 1: checksum mismatch$"):
        receive_image(io.BytesIO(header() + bytes(frame)), answers.append, str(tmp_path / "o"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "gpa, count, why",
    [
        (BASE + 60 * PAGE_SIZE, 8, "lies outside the image's slots"),  # past the slot's end
        (BASE - PAGE_SIZE, 2, "lies outside the image's slots"),  # before its start
        (BASE + 1, 1, "not a page address"),
    ],
)
def test_a_run_outside_the_slots_is_refused_naming_its_frame(tmp_path, gpa, count, why):
    head = run_head(gpa - gpa % PAGE_SIZE, count)
    if gpa % PAGE_SIZE:
        head = head[:5] + gpa.to_bytes(8, "little")
    payload = pages(count)
    raw = header() + head + payload + frame_crc(head, payload)
    with pytest.raises(StreamError, match=rf"^frame 1: .*{why}"):
        receive_image(io.BytesIO(raw), lambda _: None, str(tmp_path / "o"))


def test_a_stream_that_ends_inside_a_run_says_so(tmp_path):
    raw = header() + run_frame(BASE, pages(4))[:-100]
    with pytest.raises(StreamError, match=r"^the stream ended inside frame 1$"):
        receive_image(io.BytesIO(raw), lambda _: None, str(tmp_path / "o"))


class Recorder:
    """An image stand-in that records when it was synced among the answers."""

    def __init__(self, events: list[object]) -> None:
        self.events = events

    def write(self, gpas, data):
        pass

    def write_run(self, gpa, data):
        pass

    def sync(self):
        self.events.append("sync")


def test_version_3_acknowledges_done_before_the_flush_and_a_close_after_done_syncs():
    events: list[object] = []
    raw = header() + run_frame(BASE, pages(2)) + done_frame(2)
    receive(io.BytesIO(raw), lambda h: Recorder(events), events.append)
    assert events == [encode_ack(2), "sync"]  # the ACK is out of the sender's downtime's flush


def test_version_2_still_syncs_before_its_ack():
    events: list[object] = []
    receive(io.BytesIO(header(2) + done_frame(0)), lambda h: Recorder(events), events.append)
    assert events == ["sync", encode_ack(0)]


# --- the driver's split -------------------------------------------------------------------------
@given(st.sets(st.integers(0, 3000), max_size=1500))
def test_split_runs_covers_every_page_once_in_runs_of_the_allowed_lengths(page_set):
    pages = np.array(sorted(page_set), np.int64)
    firsts, counts, scattered = split_runs(pages)
    in_runs = [
        p for f, c in zip(firsts.tolist(), counts.tolist(), strict=True) for p in range(f, f + c)
    ]
    assert sorted(in_runs + scattered.tolist()) == pages.tolist()  # each page exactly once
    assert all(1 <= c <= MAX_PAGES_PER_FRAME for c in counts.tolist())
    # the oracle: a page is scattered exactly when its maximal run is shorter than MIN_RUN_PAGES
    oracle, run = [], []
    for p in pages.tolist():
        if run and p != run[-1] + 1:
            oracle += run if len(run) < MIN_RUN_PAGES else []
            run = []
        run.append(p)
    oracle += run if len(run) < MIN_RUN_PAGES else []
    assert scattered.tolist() == oracle
