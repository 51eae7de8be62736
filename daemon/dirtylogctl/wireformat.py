"""The migration stream's wire format, in one place: the sender builds and the receiver checks
with the same definitions, so the two ends cannot drift apart.

Format version 4 (this receiver still takes versions 2 and 3). Every integer is little-endian.

    stream = MAGIC, header, [CHAN reply,] frame ... DONE frame, VERIFY and VERIFY_KEYS
             frames ... (then the sender closes)
    channel = HELLO, [CHAN reply,] PAGES and RUN frames ..., END frame   (version 4)

    MAGIC    8 bytes   b"DLGMIG1\\n"
    header   u32       length of the JSON that follows (at most MAX_HEADER_BYTES, 128 KiB)
             JSON      {"version": 3, "page-size": 4096, "vm": "NAME", "storage-keys": BOOL,
                        "slots": [{"slot": N, "guest-phys-addr": GPA, "npages": N}, ...]}
                       at most MAX_SLOTS (1024) slots; "slot" is KVM's u32 slot field; each
                       slot a page-aligned range of the 64-bit guest-physical address space;
                       "storage-keys": the source has s390 storage keys, and KEYS frames
                       carry every slot's before DONE
                       version 4 adds "channels": N (1 to MAX_CHANNELS, 16), the TCP
                       connections the sender offers, and "token": 32 hex digits, random
                       per migration, that its further connections present (see below)

    frame    +---------+-----------+---------+-------------------+-------------------------+
             | u8 kind | u32 count | u64 aux | payload           | u32 CRC-32 of all bytes |
             |         |           |         | (size from kind)  | of the frame before it  |
             +---------+-----------+---------+-------------------+-------------------------+

    kind           count (at most)  aux            payload                          when
    1 PAGES        pages (256)      0              count u64 gpa, then              before DONE
                                                   count*4096 bytes
    2 DONE         0                pages sent     none                             any time
    3 VERIFY       pages (16384)    0              u64 key, then count (u64 gpa,    after DONE
                                                   u64 page digest) pairs
    4 KEYS         pages (1048576)  gpa of the     count storage keys, one byte     before DONE
                                    first page     per page from aux on
    5 VERIFY_KEYS  pages (16384)    gpa of the     count storage keys, as KEYS      after DONE
                                    first page
    6 RUN          pages (256)      gpa of the     count*4096 bytes: the pages      before DONE
                                    first page     from aux on, contiguous
    7 FLUSH        0                0              none: sync the image, answered   after DONE
                                                   SYNC (a close after DONE syncs
                                                   too, but answers nobody)
    8 END          0                pages sent     none: a data channel's last frame    version 4:
                                    on the channel                                  its end
    Every gpa is page-aligned. The count is checked before the payload is read, so no frame
    costs a receiver more than the largest one the format allows (a PAGES frame, ~1 MiB).

    KEYS come only if the header declares storage keys, exactly once per page and in header
    order: slot by slot, each from its first page up, a frame within one slot (QEMU sends its
    s390-skeys section the same way, once, at the end). A receiver can thus check with one
    position that DONE comes after all of them, and writes them to a key file beside the
    image: one byte per page of every slot, slots in header order (see dirtylogctl.keyfile).

    RUN (version 3) carries a contiguous run of pages without their addresses, and ends in a
    CRC-32C (Castagnoli: a CPU instruction, ~8x zlib's CRC-32 here) of the head and payload
    instead of a CRC-32. The receiver reads the payload into one buffer, checks it, and writes
    it with one pwrite; the sender copies a live run before checksumming it, and hands a run to
    the kernel from the guest's RAM file (sendfile) only while the guest is stopped: a page the
    guest stores into between the checksum and the kernel's read would fail the frame (see
    dirtylogctl.stream). A mismatch ends the stream; nothing of that frame is stored.

    Channels (version 4, as QEMU's multifd). The receiver answers a version-4 header with
    CHAN and the count it accepts, M (1 <= M <= the count offered, and at most its own
    --max-channels). The connection that carried the header is channel 0, the main channel;
    the sender then opens channels 1 .. M-1, each beginning with a HELLO:

    HELLO    8 bytes   b"DLGCHAN\n"
             16 bytes  the header's token
             u32       the channel's index, 1 .. M-1

    which the receiver answers CHAN with that index, or ERR and a close (a wrong token, an
    index out of range or already connected, no migration waiting for channels): nothing of
    a refused connection is written. A data channel carries only PAGES and RUN frames and
    ends with END, whose aux is the number of pages it carried; the main channel carries
    its own share of pages and everything else (KEYS, DONE, VERIFY, VERIFY_KEYS, FLUSH).
    The receiver acknowledges DONE only once every channel's END has come, its page count
    matched, and all of it is written; a channel that is lost, lies, or never connects
    fails the whole migration (the image is not put in place).

    Ordering without a per-round sync: every page is pinned to one channel by its address,
    channel = (gpa / 4096 / BLOCK_PAGES) mod M, with BLOCK_PAGES = 256 (a RUN frame at most,
    so a RUN spans at most two blocks and the sender splits it at the boundary). Two sends
    of the same page (one per round it was dirty) thus travel on one TCP connection, in
    order: the later cannot overtake the earlier, and the receiver writes them in that
    order. The receiver refuses a frame naming a page of another channel.

    replies (receiver to sender): a 4-byte tag, then
    b"ACK "  u64 pages written                    to DONE: every page and key is in the image
                                                  (version 2: and synced)
    b"SYNC"  nothing                              to FLUSH: the image and keys are synced and
                                                  in place (version 3 leaves this out of ACK,
                                                  and so out of the sender's downtime)
    b"DIFF"  u32 count, count u64 gpa             to VERIFY: pages whose digest differs;
                                                  to VERIFY_KEYS: pages whose key differs
    b"CHAN"  u32 count                            to a version-4 header: the channels
                                                  accepted; to a HELLO: its index, accepted
    b"ERR "  u32 length, UTF-8 reason             instead of any; the receiver then closes

Version 1 had no KEYS and no "storage-keys"; a version-1 receiver refuses a version-2 stream
by its header ("stream format version 2 is not supported"), and this one refuses version 1,
whose sender would silently leave an s390 guest's keys behind. Version 2 had no RUN and
FLUSH, and its ACK meant "synced": a version-2 receiver would fail a version-3 stream at
its first RUN, so version 3 is refused by its header there; this receiver answers a version-2
stream as version 2 did (DONE syncs before its ACK). Version 3 had one connection: a
version-3 receiver would wait for frames while a version-4 sender waits for CHAN, so it
refuses version 4 by its header. A sender of one channel therefore sends version 3, which
every receiver since version 3 takes; only a sender offering more sends version 4.

Extending: MAGIC, the header's length prefix and its "version" member stay the same in every
version, so any receiver can say which version it was sent. A new frame kind is a ``Kind``
member plus a ``FRAMES`` entry (and a case in the receiver); bump ``VERSION`` whenever a
receiver of the previous version would misread the new stream.
"""

from __future__ import annotations

import json
import os
import reprlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any

import numpy as np
from crc32c import crc32c

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

VERSION = 4
SUPPORTED = frozenset({2, 3, 4})  # a version-2 sender gets version 2's single, synced ACK
ONE_CHANNEL_VERSION = 3  # what a sender of one channel sends: any receiver since 3 takes it
MAGIC = b"DLGMIG1\n"
CHANNEL_MAGIC = b"DLGCHAN\n"
TOKEN_BYTES = 16
MAX_CHANNELS = 16
BLOCK_PAGES = 256  # pages pin to channels in blocks of a RUN frame's largest count
PAGE_SIZE = 4096
# The header is JSON, and parsing JSON costs up to ~25 bytes of Python objects per byte
# ("[{},{},..."): 128 KiB keeps a hostile header near 3 MiB, a few PAGES frames, and still
# holds MAX_SLOTS slots at their widest (~90 bytes each). QEMU uses at most a few hundred
# memslots (vhost-user: 509); dirtylogd's vm-create takes 512.
MAX_HEADER_BYTES = 128 << 10
MAX_SLOTS = 1024
MAX_SLOT_FIELD = (1 << 32) - 1  # KVM's u32 slot: address space in bits 16-31, id in 0-15
MAX_PAGES_PER_FRAME = 256  # 1 MiB of pages: a frame is also the unit of throttling
MAX_VERIFY_PAGES = 16384  # 256 KiB of (gpa, digest) pairs standing for 64 MiB of pages
MAX_KEYS_PER_FRAME = 1 << 20  # 1 MiB of keys: KVM_S390_SKEYS_MAX, one ioctl's worth, 4 GiB
MAX_VERIFY_KEYS = MAX_VERIFY_PAGES  # so that a DIFF answer has one bound
MAX_ERR_BYTES = 4096

HEADER_LENGTH = struct.Struct("<I")
FRAME_HEAD = struct.Struct("<BIQ")  # kind, count, aux
CRC = struct.Struct("<I")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

ACK, DIFF, ERR, SYNC, CHAN = b"ACK ", b"DIFF", b"ERR ", b"SYNC", b"CHAN"
HELLO = struct.Struct(f"<8s{TOKEN_BYTES}sI")  # CHANNEL_MAGIC, token, index

Read = Callable[[int], bytes]
"""Exactly n bytes from the other end, or StreamError."""


class StreamError(Exception):
    """The stream is corrupt, truncated, or the other end refused it; the text says which."""


class RefusedError(StreamError):
    """The receiver answered ERR; the text carries its reason."""


# --- frames -------------------------------------------------------------------------------------
class Kind(IntEnum):
    PAGES = 1
    DONE = 2
    VERIFY = 3
    KEYS = 4
    VERIFY_KEYS = 5
    RUN = 6
    FLUSH = 7
    END = 8


class Phase(Enum):
    """Where in the stream a frame kind may appear, relative to DONE."""

    BEFORE_DONE = "before DONE"
    AFTER_DONE = "after DONE"
    ANY = "any time"


@dataclass(frozen=True)
class FrameSpec:
    """What a frame kind may carry: ``fixed + count * per_item`` payload bytes."""

    max_count: int
    per_item: int
    fixed: int
    phase: Phase

    def payload_size(self, count: int) -> int:
        return self.fixed + count * self.per_item


FRAMES: dict[Kind, FrameSpec] = {
    Kind.PAGES: FrameSpec(MAX_PAGES_PER_FRAME, 8 + PAGE_SIZE, 0, Phase.BEFORE_DONE),
    Kind.DONE: FrameSpec(0, 0, 0, Phase.ANY),
    Kind.VERIFY: FrameSpec(MAX_VERIFY_PAGES, 16, 8, Phase.AFTER_DONE),
    Kind.KEYS: FrameSpec(MAX_KEYS_PER_FRAME, 1, 0, Phase.BEFORE_DONE),
    Kind.VERIFY_KEYS: FrameSpec(MAX_VERIFY_KEYS, 1, 0, Phase.AFTER_DONE),
    Kind.RUN: FrameSpec(MAX_PAGES_PER_FRAME, PAGE_SIZE, 0, Phase.BEFORE_DONE),
    Kind.FLUSH: FrameSpec(0, 0, 0, Phase.AFTER_DONE),
    Kind.END: FrameSpec(0, 0, 0, Phase.BEFORE_DONE),
}
PAGE_KINDS = frozenset({Kind.PAGES, Kind.RUN})  # what a data channel carries, and END
KEY_KINDS = frozenset({Kind.KEYS, Kind.VERIFY_KEYS})


@dataclass(frozen=True)
class Frame:
    """One checked frame, as the receiver reads it."""

    kind: Kind
    count: int
    aux: int
    payload: bytes

    def addresses(self) -> np.ndarray:
        """The guest addresses a frame names, as sent (u64): each page of PAGES and VERIFY,
        the first page of KEYS and VERIFY_KEYS; none for DONE."""
        if self.kind is Kind.PAGES:
            return np.frombuffer(self.payload, "<u8", self.count)
        if self.kind is Kind.VERIFY:
            return np.frombuffer(self.payload, "<u8", 2 * self.count, 8)[::2]
        if self.kind in KEY_KINDS:
            return np.array([self.aux], "<u8")
        return np.zeros(0, "<u8")

    def pages(self) -> tuple[np.ndarray, np.ndarray]:
        """PAGES: the guest addresses (int64) and the page bytes, ``(count, PAGE_SIZE)``."""
        gpas = self.addresses().astype(np.int64)
        data = np.frombuffer(self.payload, np.uint8, self.count * PAGE_SIZE, 8 * self.count)
        return gpas, data.reshape(-1, PAGE_SIZE)

    def verify(self) -> tuple[int, np.ndarray, np.ndarray]:
        """VERIFY: the key, the guest addresses (int64) and the sender's digests."""
        (key,) = U64.unpack_from(self.payload)
        pairs = np.frombuffer(self.payload, "<u8", 2 * self.count, 8).reshape(-1, 2)
        return key, pairs[:, 0].astype(np.int64), pairs[:, 1]

    def keys(self) -> tuple[int, np.ndarray]:
        """KEYS, VERIFY_KEYS: the first page's guest address and the keys (uint8), in order."""
        return self.aux, np.frombuffer(self.payload, np.uint8, self.count)


def encode_frame(kind: Kind, count: int, aux: int = 0, payload: bytes = b"") -> bytes:
    """A frame with its checksum; a frame the receiver would refuse is a bug, so ValueError."""
    spec = FRAMES[kind]
    if count > spec.max_count or len(payload) != spec.payload_size(count):
        raise ValueError(f"{kind.name} frame of {count} items and {len(payload)} bytes")
    head = FRAME_HEAD.pack(kind, count, aux)
    return head + payload + CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


def run_head(gpa: int, count: int) -> bytes:
    """A RUN frame's head; its payload follows, then :func:`frame_crc` of both."""
    if count > MAX_PAGES_PER_FRAME or gpa % PAGE_SIZE:
        raise ValueError(f"RUN frame of {count} pages at {gpa:#x}")
    return FRAME_HEAD.pack(Kind.RUN, count, gpa)


def frame_crc(head: bytes, payload: ReadableBuffer) -> bytes:
    """The checksum that ends a RUN frame: CRC-32C of its head and payload.

    RUN frames carry the bulk of a migration, and both ends checksum every byte: zlib's CRC-32
    runs at 1.75-2.3 GB/s on this 2-core machine, so at a 1.2 GB/s wire it took ~0.3 s of each
    end's CPU per GiB, the receiver's largest cost after the copy itself. CRC-32C has an
    instruction (SSE 4.2, ARMv8 CRC): the crc32c package runs at 12-17 GB/s here, takes any
    buffer, falls back to software where there is none, and is maintained (ICRAR, releases
    through 2026). Other frames are small or rare and keep zlib's CRC-32."""
    return CRC.pack(crc32c(payload, crc32c(head)))


def pages_frame(gpas: np.ndarray, data: np.ndarray) -> bytes:
    """PAGES: ``data`` holds ``len(gpas)`` pages, in order."""
    return encode_frame(Kind.PAGES, gpas.size, 0, gpas.astype("<u8").tobytes() + data.tobytes())


def done_frame(total_pages: int) -> bytes:
    return encode_frame(Kind.DONE, 0, total_pages)


def end_frame(channel_pages: int) -> bytes:
    """END: a data channel's last frame, with the pages it carried."""
    return encode_frame(Kind.END, 0, channel_pages)


def verify_frame(key: int, gpas: np.ndarray, digests: np.ndarray) -> bytes:
    pairs = np.stack((gpas.astype("<u8"), digests.astype("<u8")), axis=1)
    return encode_frame(Kind.VERIFY, gpas.size, 0, U64.pack(key) + pairs.tobytes())


def keys_frame(gpa: int, keys: np.ndarray) -> bytes:
    """KEYS: the storage keys of the pages from ``gpa`` on, one byte each."""
    return encode_frame(Kind.KEYS, keys.size, gpa, keys.astype(np.uint8).tobytes())


def verify_keys_frame(gpa: int, keys: np.ndarray) -> bytes:
    return encode_frame(Kind.VERIFY_KEYS, keys.size, gpa, keys.astype(np.uint8).tobytes())


def frame_kind(head: bytes, number: int, done: bool) -> Kind:
    """A frame head's kind, checked against its limits and its place in the stream (``done``:
    DONE was seen)."""
    kind_value, count, _ = FRAME_HEAD.unpack(head)
    try:
        kind = Kind(kind_value)
    except ValueError:
        raise StreamError(f"frame {number}: unknown type {kind_value}") from None
    spec = FRAMES[kind]
    if count > spec.max_count:
        raise StreamError(
            f"frame {number}: {kind.name} of {count} pages is over the limit of {spec.max_count}"
        )
    if (spec.phase is Phase.BEFORE_DONE and done) or (spec.phase is Phase.AFTER_DONE and not done):
        raise StreamError(f"frame {number}: {kind.name} may only come {spec.phase.value}")
    return kind


def run_address(head: bytes, number: int) -> tuple[int, int]:
    """A RUN frame's (first gpa, page count); its checksum is checked once it is stored."""
    _, count, gpa = FRAME_HEAD.unpack(head)
    if gpa % PAGE_SIZE:
        raise StreamError(f"frame {number}: RUN names {gpa:#x}, not a page address")
    return gpa, count


def read_frame(head: bytes, read: Read, number: int, done: bool) -> Frame:
    """The rest of frame ``number`` after its head, checked against its kind's limits, its
    place in the stream (``done``: DONE was seen) and its checksum."""
    kind = frame_kind(head, number, done)
    if kind is Kind.RUN:
        raise StreamError(f"frame {number}: a RUN frame goes straight into an image")
    _, count, aux = FRAME_HEAD.unpack(head)
    spec = FRAMES[kind]
    payload = read(spec.payload_size(count))
    (crc,) = CRC.unpack(read(CRC.size))
    if zlib.crc32(payload, zlib.crc32(head)) != crc:
        raise StreamError(f"frame {number}: checksum mismatch")
    frame = Frame(kind, count, aux, payload)
    unaligned = frame.addresses()[frame.addresses() % PAGE_SIZE != 0]
    if unaligned.size:  # a page at 0x1001 would otherwise land on the page at 0x1000
        raise StreamError(
            f"frame {number}: {kind.name} names {int(unaligned[0]):#x}, not a page address"
        )
    return frame


# --- the header ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlotInfo:
    slot: int
    gpa: int
    npages: int


@dataclass(frozen=True)
class Header:
    """What the sender declares before the first frame."""

    vm: str
    slots: tuple[SlotInfo, ...]
    version: int = ONE_CHANNEL_VERSION
    page_size: int = PAGE_SIZE
    storage_keys: bool = False  # KEYS frames carry every slot's s390 storage keys
    channels: int = 1  # version 4: the TCP connections the sender offers
    token: bytes = b""  # version 4: what its further connections present

    @classmethod
    def offering(
        cls, vm: str, slots: tuple[SlotInfo, ...], storage_keys: bool, channels: int
    ) -> Header:
        """A sender's header: version 3 for one channel (older receivers take it), else
        version 4 with a fresh random token."""
        if channels <= 1:
            return cls(vm, slots, ONE_CHANNEL_VERSION, storage_keys=storage_keys)
        token = os.urandom(TOKEN_BYTES)
        return cls(vm, slots, 4, storage_keys=storage_keys, channels=channels, token=token)

    def total_pages(self) -> int:
        return sum(s.npages for s in self.slots)

    def image_bytes(self) -> int:
        """Bytes an image needs to hold every slot at its guest address."""
        return max((s.gpa + s.npages * self.page_size for s in self.slots), default=0)


def encode_header(header: Header) -> bytes:
    """MAGIC, then the length-prefixed JSON header; StreamError if the format cannot carry it
    (a VM of more than MAX_SLOTS memslots), so the sender says why instead of being refused."""
    if len(header.slots) > MAX_SLOTS:
        raise StreamError(
            f"the VM has {len(header.slots)} memslots; format version {VERSION} carries at most "
            f"{MAX_SLOTS}"
        )
    doc = {
        "version": header.version,
        "page-size": header.page_size,
        "vm": header.vm,
        "storage-keys": header.storage_keys,
        "slots": [
            {"slot": s.slot, "guest-phys-addr": s.gpa, "npages": s.npages} for s in header.slots
        ],
    }
    if header.version >= 4:
        doc["channels"] = header.channels
        doc["token"] = header.token.hex()
    meta = json.dumps(doc).encode()
    if len(meta) > MAX_HEADER_BYTES:
        raise StreamError(
            f"the stream header would be {len(meta)} bytes; format version {VERSION} carries at "
            f"most {MAX_HEADER_BYTES}"
        )
    return MAGIC + HEADER_LENGTH.pack(len(meta)) + meta


def read_header(read: Read) -> Header:
    """MAGIC and the header, checked: a bad one is a StreamError saying what is wrong."""
    magic = read(len(MAGIC))
    if magic == CHANNEL_MAGIC:
        raise StreamError("a channel hello, but no migration is waiting for channels")
    if magic != MAGIC:
        raise StreamError("not a dirtylogd migration stream (bad magic)")
    (length,) = HEADER_LENGTH.unpack(read(HEADER_LENGTH.size))
    if length > MAX_HEADER_BYTES:
        raise StreamError(
            f"stream header of {length} bytes is over the limit of {MAX_HEADER_BYTES}"
        )
    return decode_header(read(length))


# What a receiver adds when it refuses an older version: why it cannot just accept it.
OLDER = {
    1: ": version 1 carries no storage keys, so an s390 guest's would be left behind; "
    "upgrade dirtylogctl on the source",
}


def decode_header(meta: bytes) -> Header:
    """The JSON header, checked in the order a future version needs: the version first."""
    try:
        doc = json.loads(meta)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise StreamError(f"bad stream header: not JSON ({exc})") from None
    except RecursionError:  # "[[[[..." nested deeper than the parser's stack
        raise StreamError("bad stream header: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise StreamError(f"bad stream header: expected a JSON object, got {type(doc).__name__}")
    if "version" not in doc:
        raise StreamError(
            f"bad stream header: it names no format version (this receiver speaks version "
            f"{VERSION})"
        )
    version = _int(doc, "version")
    if version not in SUPPORTED:
        why = OLDER.get(version, "")
        raise StreamError(
            f"stream format version {version} is not supported "
            f"(this receiver speaks version {VERSION}){why}"
        )
    page_size = _int(doc, "page-size")
    if page_size != PAGE_SIZE:
        raise StreamError(
            f"stream page size {page_size} is not supported "
            f"(format version {VERSION} carries {PAGE_SIZE}-byte pages)"
        )
    vm = doc.get("vm")
    if not isinstance(vm, str):
        raise StreamError("bad stream header: 'vm' must be a string")
    storage_keys = doc.get("storage-keys")
    if not isinstance(storage_keys, bool):
        raise StreamError("bad stream header: 'storage-keys' must be true or false")
    slots = doc.get("slots")
    if not isinstance(slots, list):
        raise StreamError("bad stream header: 'slots' must be a list")
    if len(slots) > MAX_SLOTS:
        raise StreamError(f"bad stream header: {len(slots)} slots, over the limit of {MAX_SLOTS}")
    slots_info = tuple(_slot(i, s) for i, s in enumerate(slots))
    channels, token = 1, b""
    if version >= 4:
        channels, token = _channels(doc)
    return Header(vm, slots_info, version, page_size, storage_keys, channels, token)


def _channels(doc: dict[str, Any]) -> tuple[int, bytes]:
    """Version 4's "channels" and "token"."""
    channels = doc.get("channels")
    if (
        not isinstance(channels, int)
        or isinstance(channels, bool)
        or not 1 <= channels <= MAX_CHANNELS
    ):
        raise StreamError(
            f"bad stream header: 'channels' must be an integer from 1 to {MAX_CHANNELS}, "
            f"not {reprlib.repr(channels)}"
        )
    token = doc.get("token")
    if not isinstance(token, str) or len(token) != 2 * TOKEN_BYTES:
        raise StreamError(f"bad stream header: 'token' must be {2 * TOKEN_BYTES} hex digits")
    try:
        return channels, bytes.fromhex(token)
    except ValueError:
        raise StreamError(
            f"bad stream header: 'token' must be {2 * TOKEN_BYTES} hex digits"
        ) from None


def _int(doc: dict[str, Any], name: str, where: str = "", most: int | None = None) -> int:
    """A non-negative integer member; the error shows at most a short repr of what was sent
    (a header may be 128 KiB of one value, and the reason goes to stderr and into ERR)."""
    value = doc.get(name)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < 0
        or (most is not None and value > most)
    ):
        kind = "a non-negative integer" if most is None else f"an integer from 0 to {most}"
        raise StreamError(
            f"bad stream header: '{where}{name}' must be {kind}, not {reprlib.repr(value)}"
        )
    return value


def _slot(index: int, doc: object) -> SlotInfo:
    where = f"slots[{index}]."
    if not isinstance(doc, dict):
        raise StreamError(f"bad stream header: slots[{index}] must be an object")
    slot = SlotInfo(
        _int(doc, "slot", where, MAX_SLOT_FIELD),
        _int(doc, "guest-phys-addr", where),
        _int(doc, "npages", where),
    )
    if slot.gpa % PAGE_SIZE or slot.gpa + slot.npages * PAGE_SIZE > 1 << 64:
        at = f"{slot.gpa:#x}" if slot.gpa < 1 << 64 else reprlib.repr(slot.gpa)
        raise StreamError(
            f"bad stream header: slot {slot.slot} at {at} with {reprlib.repr(slot.npages)} "
            f"pages is not a page-aligned range of the 64-bit address space"
        )
    return slot


# --- channels (version 4) -----------------------------------------------------------------------
def channel_of(gpa: int, channels: int) -> int:
    """The channel a page travels on, always the same one: its 256-page block mod the count."""
    return (gpa // PAGE_SIZE // BLOCK_PAGES) % channels


def split_run(gpa: int, count: int, channels: int) -> list[tuple[int, int, int]]:
    """A run of ``count`` pages from ``gpa`` as (channel, gpa, count) pieces, cut at block
    boundaries when there are several channels (one piece, channel 0, when there is one)."""
    if channels <= 1:
        return [(0, gpa, count)]
    pieces = []
    first, end = gpa // PAGE_SIZE, gpa // PAGE_SIZE + count
    while first < end:
        stop = min(end, (first // BLOCK_PAGES + 1) * BLOCK_PAGES)
        pieces.append(((first // BLOCK_PAGES) % channels, first * PAGE_SIZE, stop - first))
        first = stop
    return pieces


def split_pages(gpas: np.ndarray, channels: int) -> list[tuple[int, np.ndarray]]:
    """Scattered pages by channel: (channel, the indices into ``gpas`` of its pages), in the
    pages' order, only for channels that get any."""
    if channels <= 1:
        return [(0, np.arange(gpas.size))] if gpas.size else []
    of = (gpas.astype(np.uint64) // np.uint64(PAGE_SIZE * BLOCK_PAGES)) % np.uint64(channels)
    return [(c, idx) for c in range(channels) if (idx := np.flatnonzero(of == c)).size]


def strays(gpas: np.ndarray, channel: int, channels: int) -> np.ndarray:
    """The pages of ``gpas`` that are not ``channel``'s: a receiver refuses a frame with any
    (their order against another channel's sends of them would be lost)."""
    of = (gpas.astype(np.uint64) // np.uint64(PAGE_SIZE * BLOCK_PAGES)) % np.uint64(channels)
    result: np.ndarray = gpas[of != np.uint64(channel)]
    return result


def encode_hello(token: bytes, index: int) -> bytes:
    return HELLO.pack(CHANNEL_MAGIC, token, index)


def read_hello(read: Read) -> tuple[bytes, int]:
    """A data channel's HELLO: (token, index); StreamError if it is none."""
    magic, token, index = HELLO.unpack(read(HELLO.size))
    if magic != CHANNEL_MAGIC:
        raise StreamError("not a migration channel (bad magic)")
    return token, index


def encode_chan(count: int) -> bytes:
    return CHAN + U32.pack(count)


def read_chan(read: Read) -> int:
    """CHAN's count: the channels accepted, or the index of the channel accepted."""
    tag = read_reply_tag(read)
    if tag != CHAN:
        raise StreamError(f"the destination did not answer for its channels ({tag!r})")
    (count,) = U32.unpack(read(U32.size))
    return int(count)


# --- replies ------------------------------------------------------------------------------------
def encode_ack(pages_written: int) -> bytes:
    return ACK + U64.pack(pages_written)


def flush_frame() -> bytes:
    return encode_frame(Kind.FLUSH, 0)


def read_sync(read: Read) -> None:
    """The answer to FLUSH: the image is synced and in place."""
    tag = read_reply_tag(read)
    if tag != SYNC:
        raise StreamError(f"the destination did not confirm the image is stored ({tag!r})")


def encode_diff(gpas: np.ndarray) -> bytes:
    return DIFF + U32.pack(gpas.size) + gpas.astype("<u8").tobytes()


def encode_err(reason: str) -> bytes:
    text = reason.encode(errors="replace")[:MAX_ERR_BYTES]
    return ERR + U32.pack(len(text)) + text


def read_reply_tag(read: Read) -> bytes:
    """The next reply's tag; an ERR reply raises RefusedError with the receiver's reason."""
    tag = read(4)
    if tag == ERR:
        (length,) = U32.unpack(read(U32.size))
        if length > MAX_ERR_BYTES:
            raise StreamError(f"the destination sent an ERR reply of {length} bytes")
        reason = read(length).decode(errors="replace")
        raise RefusedError(f"the destination refused the stream: {reason}")
    return tag


def read_ack(read: Read) -> int:
    """The answer to DONE: the number of pages the receiver wrote."""
    tag = read_reply_tag(read)
    if tag != ACK:
        raise StreamError(f"the destination did not acknowledge the image (answered {tag!r})")
    (written,) = U64.unpack(read(U64.size))
    return int(written)


def read_diff(read: Read) -> list[int]:
    """The answer to VERIFY: the guest addresses whose digest differs."""
    if read_reply_tag(read) != DIFF:
        raise StreamError("the destination did not answer the verification")
    (count,) = U32.unpack(read(U32.size))
    if count > MAX_VERIFY_PAGES:  # = MAX_VERIFY_KEYS: one bound for both kinds
        raise StreamError(f"the destination named {count} differing pages of a VERIFY frame")
    return [int(g) for g in np.frombuffer(read(8 * count), "<u8")] if count else []


# --- the verification digest --------------------------------------------------------------------
def page_digests(pages: np.ndarray, key: int) -> np.ndarray:
    """A keyed multilinear hash of each page (rows of ``pages`` as bytes), u64 per page.

    Word i of a page is multiplied by an odd key derived from ``key`` and i, summed mod 2^64:
    two different pages collide with probability about 2^-63 for a random key, and numpy does
    it for all pages at once. Both ends derive the word keys with numpy's default Generator.
    """
    words = pages.view("<u8").reshape(-1, PAGE_SIZE // 8)
    rng = np.random.default_rng(key)
    keys = rng.integers(0, 2**63, PAGE_SIZE // 8, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    with np.errstate(over="ignore"):
        result: np.ndarray = (words * keys).sum(axis=1, dtype=np.uint64)
    return result
