"""Consumers, the I/O merge and delivery, through a real daemon and qemu.qmp."""

import base64
import os
import socket
import time

import pytest

from kvmshim.bitmap import DirtyBitmap

from .full_fs import fill_leaving, tiny_tmpfs
from .raw import Raw

MiB = 1 << 20


@pytest.fixture
def vm(qmp, request):
    name = request.node.name[:60]
    qmp(
        "vm-create",
        name=name,
        memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}],
        backend="softmmu",
    )
    yield name
    qmp("vm-remove", vm=name)


def dirty(qmp, vm, consumer="default"):
    r = qmp("dirty-log-get", vm=vm, slot=0, consumer=consumer, encoding="ranges")
    return [p for first, n in r["ranges"] for p in range(first, first + n)]


def test_default_consumer_behaves_like_kvm_get_dirty_log(qmp, vm):
    assert dirty(qmp, vm) == []  # not initially set
    qmp("sim-write-pages", vm=vm, gfns=[4, 9], value=1)
    assert dirty(qmp, vm) == [4, 9]
    assert dirty(qmp, vm) == []  # the GET cleared them
    qmp("sim-write-pages", vm=vm, gfns=[9], value=2)
    assert dirty(qmp, vm) == [9]


def test_two_consumers_see_the_same_pages_independently(qmp, vm):
    qmp("consumer-add", vm=vm, name="migration", initially_set=False)
    qmp("consumer-add", vm=vm, name="monitor", initially_set=False)
    qmp("sim-write-pages", vm=vm, gfns=[1, 2, 3], value=1)
    assert dirty(qmp, vm, "migration") == [1, 2, 3]
    qmp("sim-write-pages", vm=vm, gfns=[7], value=2)
    assert dirty(qmp, vm, "monitor") == [1, 2, 3, 7]  # nothing was stolen by the other's GET
    assert dirty(qmp, vm, "migration") == [7]
    assert dirty(qmp, vm) == [1, 2, 3, 7]
    assert dirty(qmp, vm, "monitor") == []


def test_manual_protect_initially_set_starts_all_dirty_and_only_clear_clears(qmp, vm):
    qmp("consumer-add", vm=vm, name="mp", manual_protect=True)  # initially-set by default
    assert dirty(qmp, vm, "mp") == list(range(256))
    assert dirty(qmp, vm, "mp") == list(range(256))  # GET does not clear
    # clear pages [0, 64) except 5: bitmap of 64 bits, all ones but bit 5
    mask = (0xFFFF_FFFF_FFFF_FFFF & ~(1 << 5)).to_bytes(8, "little")
    qmp(
        "dirty-log-clear",
        vm=vm,
        slot=0,
        first_page=0,
        num_pages=64,
        consumer="mp",
        bitmap=base64.b64encode(mask).decode(),
    )
    assert dirty(qmp, vm, "mp") == [5, *range(64, 256)]
    qmp("sim-write-pages", vm=vm, gfns=[10], value=1)
    assert dirty(qmp, vm, "mp") == [5, 10, *range(64, 256)]


def test_consumer_names_are_unique_and_default_stays(qmp, vm):
    qmp("consumer-add", vm=vm, name="a")
    assert qmp.error("consumer-add", vm=vm, name="a") == (
        "GenericError",
        f"vm '{vm}' already has a consumer named 'a'",
    )
    assert qmp.error("consumer-remove", vm=vm, name="zz")[0] == "DeviceNotFound"
    assert qmp.error("consumer-remove", vm=vm, name="default")[0] == "GenericError"
    qmp("consumer-remove", vm=vm, name="a")
    assert qmp.error("dirty-log-get", vm=vm, slot=0, consumer="a")[0] == "DeviceNotFound"


def test_dma_write_is_missing_unless_reported(qmp, vm):
    qmp("sim-write-pages", vm=vm, gfns=[20], value=1, path="dma", report=False)
    assert dirty(qmp, vm) == []  # the seed's documented gap
    qmp("sim-write-pages", vm=vm, gfns=[21], value=1, path="dma", report=True)
    qmp("sim-write", vm=vm, guest_phys_addr=22 * 4096, data="AAAA", path="kernel")  # reported
    assert dirty(qmp, vm) == [21, 22]
    qmp("sim-write-pages", vm=vm, gfns=[30], value=1, path="dma", report=False)
    assert qmp("io-dirty-mark", vm=vm, ranges=[{"guest-phys-addr": 30 * 4096, "length": 1}]) == {
        "pages": 1
    }
    assert dirty(qmp, vm) == [30]


def test_get_dirty_log_does_not_lose_pages_on_disconnect(daemon, qmp):
    """A client that asks and vanishes without reading loses nothing for its consumer.

    The slot is 8 GiB, so the base64 answer (~350 KB) is larger than the socket buffer: the
    daemon is still writing it when the client closes, the write fails, and the bits go back.
    """
    qmp("vm-create", name="vanish", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": 8 << 30}])
    qmp("consumer-add", vm="vanish", name="mig", initially_set=False)
    qmp("sim-write-pages", vm="vanish", gfns=[3, 1 << 20, (2 << 20) - 1], value=1)
    raw = Raw(daemon.socket)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.recv()
    raw.ask({"execute": "qmp_capabilities"})
    raw.send(
        {"execute": "dirty-log-get", "arguments": {"vm": "vanish", "slot": 0, "consumer": "mig"}}
    )
    time.sleep(0.5)  # the answer is written until the buffers are full
    raw.close()
    time.sleep(0.2)
    r = qmp("dirty-log-get", vm="vanish", slot=0, consumer="mig", encoding="ranges")
    assert r["ranges"] == [[3, 1], [1 << 20, 1], [(2 << 20) - 1, 1]]
    qmp("vm-remove", vm="vanish")


def test_a_bitmap_that_does_not_fit_the_descriptors_file_system_is_not_lost(qmp, tmp_path):
    """Half the bitmap fits the client's file system, then ENOSPC: the GET fails naming ENOSPC,
    and every page — those whose bits were written and those whose bits were not — comes with
    the consumer's next GET.

    A 1 GiB slot has a 32 KiB bitmap; the tmpfs has 16 KiB left, so the first pwrite is short
    and the next one fails."""
    npages = 1 << 18
    pages = [0, 3, 4095, npages // 2 - 1, npages // 2, npages // 2 + 77, npages - 1]
    qmp("vm-create", name="full", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": 1 << 30}])
    try:
        qmp("consumer-add", vm="full", name="mig", initially_set=False)
        qmp("sim-write-pages", vm="full", gfns=pages, value=1)
        with tiny_tmpfs(tmp_path / "fs", 256 << 10) as fs:
            fill_leaving(fs, 16 << 10)
            fd = os.open(fs / "bitmap", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                qmp.send_fd(fd)
                qmp("getfd", fdname="full")
            finally:
                os.close(fd)
            cls, desc = qmp.error(
                "dirty-log-get", vm="full", slot=0, consumer="mig", encoding="fd", fdname="full"
            )
            assert cls == "GenericError"
            assert "(16384 of 32768 bytes written)" in desc and "(ENOSPC)" in desc, desc
            qmp("closefd", fdname="full")
        memfd = os.memfd_create("good")
        try:
            qmp.send_fd(memfd)
            qmp("getfd", fdname="good")
            r = qmp(
                "dirty-log-get", vm="full", slot=0, consumer="mig", encoding="fd", fdname="good"
            )
            bits = DirtyBitmap.from_bytes(npages, os.pread(memfd, npages // 8, 0))
        finally:
            os.close(memfd)
        assert r["dirty-pages"] == len(pages)
        assert bits.pages().tolist() == pages
    finally:
        qmp("vm-remove", vm="full")


def test_consumers_past_the_limit_are_refused_and_change_nothing(fresh_daemon):
    """--max-consumers counts the consumers clients add; 'default' belongs to the VM."""
    d = fresh_daemon("--max-consumers", "3", metrics=False)
    with d.client() as q:
        q("vm-create", name="crowd", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
        for name in ("a", "b", "c"):
            q("consumer-add", vm="crowd", name=name, initially_set=False)
        q("sim-write-pages", vm="crowd", gfns=[8], value=1)
        assert dirty(q, "crowd", "a") == [8]  # harvested: b and c have page 8 pending
        before = q("query-vms")
        assert q.error("consumer-add", vm="crowd", name="d") == (
            "GenericError",
            "vm 'crowd' has 3 consumers besides 'default', the most allowed "
            "(--max-consumers 3): remove one first",
        )
        assert q("query-vms") == before
        assert dirty(q, "crowd", "b") == [8]
        q("consumer-remove", vm="crowd", name="a")
        q("consumer-add", vm="crowd", name="d")  # room again
        assert [c["name"] for c in q("query-vms")[0]["consumers"]] == ["default", "b", "c", "d"]
