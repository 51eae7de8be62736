"""The migration stream without sockets: round trip, corruption, truncation, verification."""

import io
import struct

import numpy as np
import pytest

from dirtylogctl.receive import receive
from dirtylogctl.wireformat import (
    PAGE_SIZE,
    Header,
    StreamError,
    done_frame,
    encode_header,
    page_digests,
    pages_frame,
    verify_frame,
)

PAGE = PAGE_SIZE


def stream_of(pages: dict[int, bytes], verify=None, done=True) -> bytes:
    out = encode_header(Header("t", ()))
    gpas = np.array(sorted(pages), dtype=np.int64)
    if gpas.size:
        data = np.frombuffer(b"".join(pages[g] for g in gpas.tolist()), np.uint8)
        out += pages_frame(gpas, data)
    if done:
        out += done_frame(len(pages))
    if verify is not None:
        out += verify_frame(*verify)
    return out


class Image:
    def __init__(self):
        self.pages: dict[int, bytes] = {}
        self.answers: list[bytes] = []

    def write(self, gpas, data):
        for g, row in zip(gpas.tolist(), data.reshape(-1, PAGE), strict=True):
            self.pages[g] = row.tobytes()

    def read(self, gpas):
        return np.stack(
            [np.frombuffer(self.pages.get(g, bytes(PAGE)), np.uint8) for g in gpas.tolist()]
        )

    def sync(self):
        pass

    def run(self, raw: bytes):
        return receive(io.BytesIO(raw), lambda header: self, self.answers.append)


def page(byte: int) -> bytes:
    return bytes([byte]) * PAGE


def test_pages_land_at_their_addresses_and_done_is_acknowledged():
    img = Image()
    got = img.run(stream_of({0: page(1), 0x5000: page(2), 0x100000000: page(3)}))
    assert got.pages == 3 and got.done
    assert img.pages[0x5000] == page(2) and img.pages[0x100000000] == page(3)
    assert img.answers == [b"ACK " + struct.pack("<Q", 3)]


def test_a_flipped_byte_is_a_checksum_error_not_a_wrong_image():
    raw = bytearray(stream_of({0: page(1), 4096: page(2)}))
    raw[len(raw) // 2] ^= 0x40  # inside the page data
    img = Image()
    with pytest.raises(StreamError, match="checksum mismatch"):
        img.run(bytes(raw))
    assert img.pages == {} and img.answers[-1].startswith(b"ERR ")


def test_a_truncated_stream_is_an_error():
    raw = stream_of({0: page(1)}, done=False)
    with pytest.raises(StreamError, match=r"ended (inside frame|before DONE)"):
        Image().run(raw[:-100])
    with pytest.raises(StreamError, match="ended before DONE"):
        Image().run(raw)


def test_verification_names_the_pages_that_differ():
    img = Image()
    img.pages = {0: page(1), 4096: page(9)}
    key = 12345
    source = np.stack([np.frombuffer(page(1), np.uint8), np.frombuffer(page(2), np.uint8)])
    gpas = np.array([0, 4096])
    raw = stream_of({}, verify=(key, gpas, page_digests(source, key)))
    got = img.run(raw)
    assert got.differing == 1
    assert img.answers[-1] == b"DIFF" + struct.pack("<IQ", 1, 4096)


def test_digests_tell_pages_apart():
    rng = np.random.default_rng(0)
    pages = rng.integers(0, 256, (200, PAGE), dtype=np.uint8)
    pages[1] = pages[0]
    pages[2] = pages[0]
    pages[2, 4095] ^= 1  # one bit of difference
    d = page_digests(pages, key=99)
    assert d[0] == d[1] and d[0] != d[2]
    assert len(set(d.tolist())) == 199


def test_bad_magic_is_refused():
    with pytest.raises(StreamError, match="bad magic"):
        Image().run(b"GET / HTTP/1.1\r\n\r\n")


def test_file_image_writes_scattered_pages_in_one_go(tmp_path):
    from dirtylogctl.image import Image as FileImage

    img = FileImage(str(tmp_path / "img"), 64 * PAGE)
    gpas = np.array([63 * PAGE, 0, 17 * PAGE])
    data = np.stack([np.full(PAGE, b, np.uint8) for b in (3, 1, 2)])
    img.write(gpas, data)
    assert (img.read(np.array([0, 17 * PAGE, 63 * PAGE, 5 * PAGE]))[:, 0] == [1, 2, 3, 0]).all()
    with pytest.raises(StreamError, match="outside the image"):
        img.write(np.array([64 * PAGE]), data[:1])
    img.sync()
    img.close()
    assert (tmp_path / "img").stat().st_size == 64 * PAGE


def test_an_image_reserves_its_slots_keeps_the_holes_sparse_and_refuses_pages_outside(tmp_path):
    """Every slot's pages are allocated up front (a store into the mapping can then not fail
    for want of space); the gap between slots stays a hole, and no page may be stored there."""
    from dirtylogctl.image import Image as FileImage

    gap = 1 << 30
    img = FileImage(str(tmp_path / "img"), gap + 64 * PAGE, [(0, 64 * PAGE), (gap, 64 * PAGE)])
    assert 128 * PAGE <= (tmp_path / "img").stat().st_blocks * 512 < 256 * PAGE
    page = np.full((1, PAGE), 7, np.uint8)
    img.write(np.array([gap + 63 * PAGE]), page)
    with pytest.raises(StreamError, match="a page at 0x40000 lies outside the image's slots"):
        img.write(np.array([PAGE, 64 * PAGE]), np.concatenate([page, page]))
    img.close()
