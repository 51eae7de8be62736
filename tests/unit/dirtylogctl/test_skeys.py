"""The driver's storage-key pass, without a daemon: frames of the receiver's limits in header
order, a guest without keys, the reasons for carrying none, and the report's lines."""

import asyncio
import os

import numpy as np
import pytest

from dirtylogctl.migrate import Stats
from dirtylogctl.migrate_cli import summary
from dirtylogctl.skeys import KeyPass, KeyStats, Range, why_not_carried
from dirtylogctl.wireformat import MAX_KEYS_PER_FRAME, MAX_VERIFY_KEYS, PAGE_SIZE


class FakeDaemon:
    """storage-keys-get into the memfd: key of frame f is f % 251 (or no keys at all)."""

    def __init__(self, fd, uses_keys=True):
        self.fd, self.uses_keys, self.asked = fd, uses_keys, []

    async def __call__(self, command, arguments):
        assert command == "storage-keys-get" and arguments["encoding"] == "fd"
        start, count = arguments["start-gfn"], arguments["count"]
        assert 1 <= count <= MAX_KEYS_PER_FRAME  # KVM_S390_SKEYS_MAX
        self.asked.append((start, count))
        if self.uses_keys:
            os.pwrite(self.fd, (np.arange(start, start + count) % 251).astype(np.uint8), 0)
        return {"start-gfn": start, "count": count, "uses-keys": self.uses_keys}


class KeySink:
    def __init__(self):
        self.sent, self.verified = [], []

    def send_keys(self, gpa, keys):
        self.sent.append((gpa, keys.size, int(keys[0]) if keys.size else None))

    def verify_keys(self, gpa, keys):
        self.verified.append(keys.size)
        return [gpa] if gpa == 0 else []


@pytest.fixture
def memfd():
    fd = os.memfd_create("keys")
    yield fd
    os.close(fd)


def test_keys_go_slot_by_slot_in_frames_of_at_most_one_ioctl(memfd):
    daemon, sink, stats = FakeDaemon(memfd), KeySink(), KeyStats(carried=True)
    ranges = [Range(8 << 30, MAX_KEYS_PER_FRAME + 3), Range(0, 5), Range(4 << 30, 0)]
    asyncio.run(KeyPass(daemon, "vm", memfd, "fdname").send(ranges, sink, stats))
    first = (8 << 30) // PAGE_SIZE
    assert daemon.asked == [(first, MAX_KEYS_PER_FRAME), (first + MAX_KEYS_PER_FRAME, 3), (0, 5)]
    assert sink.sent == [
        (8 << 30, MAX_KEYS_PER_FRAME, first % 251),
        ((8 << 30) + MAX_KEYS_PER_FRAME * PAGE_SIZE, 3, (first + MAX_KEYS_PER_FRAME) % 251),
        (0, 5, 0),
    ]
    assert stats.keys == MAX_KEYS_PER_FRAME + 8 and stats.guest_uses_keys


def test_keys_are_verified_in_frames_of_the_receivers_limit(memfd):
    sink = KeySink()
    run = KeyPass(FakeDaemon(memfd), "vm", memfd, "fd").verify(
        [Range(0, MAX_VERIFY_KEYS + 1)], sink
    )
    assert asyncio.run(run) == [0] and sink.verified == [MAX_VERIFY_KEYS, 1]


def test_a_guest_without_keys_sends_zeros_which_is_what_its_keys_are(memfd):
    os.pwrite(memfd, b"\xff" * 16, 0)  # stale bytes in the memfd must not be sent
    sink, stats = KeySink(), KeyStats(carried=True)
    asyncio.run(
        KeyPass(FakeDaemon(memfd, False), "vm", memfd, "f").send([Range(0, 16)], sink, stats)
    )
    assert sink.sent == [(0, 16, 0)] and stats.guest_uses_keys is False


@pytest.mark.parametrize(
    ("vm", "why"),
    [
        ({"backend": "softmmu", "capabilities": {"s390-skeys": 1}}, None),
        (
            {"backend": "kvm", "capabilities": {"s390-skeys": 0, "arch": "x86_64"}},
            "the kvm backend on x86_64 has no storage keys (KVM_CAP_S390_SKEYS is 0)",
        ),
        (
            {"backend": "softmmu", "capabilities": {}},
            "the daemon does not report KVM_CAP_S390_SKEYS (it has no storage-keys-get)",
        ),
    ],
    ids=["softmmu", "kvm-x86", "older-daemon"],
)
def test_keys_are_carried_where_the_vm_has_them_and_the_reason_is_kept_where_not(vm, why):
    assert why_not_carried(vm) == why


def report(keys: KeyStats, differing_pages=None) -> list[str]:
    stats = Stats(status="completed", storage_keys=keys, differing_pages=differing_pages)
    return summary("vm", stats, 0.3).splitlines()[2:]


def test_the_report_says_what_became_of_the_keys():
    sent = KeyStats(carried=True, keys=16384, seconds=0.0021, differing=[])
    assert report(sent, []) == [
        "storage keys: 16384 (16.0 KiB) sent in 2 ms, inside the downtime",
        "verify: the destination equals the paused source (0 pages)",
        "verify: the destination's storage keys equal the paused source's (16384)",
    ]
    wrong = KeyStats(carried=True, keys=4, differing=[0x3000])
    assert report(wrong, [])[-1] == (
        "verify: 1 storage keys differ from the paused source, first at 0x3000"
    )
    assert Stats(storage_keys=wrong, differing_pages=[]).differs  # exit 5
    none = KeyStats(why_not="the kvm backend on x86_64 has no storage keys")
    assert report(none, []) == [
        "storage keys: none sent: the kvm backend on x86_64 has no storage keys",
        "verify: the destination equals the paused source (0 pages)",
        "verify: storage keys not compared: the kvm backend on x86_64 has no storage keys",
    ]
    assert not Stats(storage_keys=none, differing_pages=[]).differs
    unused = KeyStats(carried=True, keys=2, guest_uses_keys=False)
    assert report(unused)[0].endswith("(the guest uses none: every key is 0)")
