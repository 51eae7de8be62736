"""dirty-log-get answers: built off the event loop, in the harvest's thread, and nothing is lost."""

import asyncio
import errno
import fcntl
import os
import threading

import numpy as np
import pytest

from dirtylogd.api import handlers
from dirtylogd.api.handlers import (
    Context,
    _base64,
    _popcount,
    _ranges,
    _run_edges,
)
from dirtylogd.api.schema import COMMANDS, EVENTS
from dirtylogd.errors import GenericError
from dirtylogd.qmp.fds import FdRegistry
from dirtylogd.qmp.session import Deferred
from dirtylogd.service.registry import Service
from dirtylogd.service.vm import VmState
from kvmshim.bitmap import DirtyBitmap

MiB = 1 << 20
BIG = 64 * MiB  # 16,384 pages: a 2 KiB bitmap
SMALL = 1 * MiB  # 256 pages: 32 bytes


async def make_context(tmp_path, size: int, max_reply_bytes: int = 8 << 20) -> Context:
    service = Service(str(tmp_path / "vms"))
    slot = {"slot": 0, "as_id": 0, "guest_phys_addr": 0, "size": size, "log_dirty_pages": True}
    await service.create_vm("v", [slot], "softmmu", True)
    vm = service.vm("v")
    await service.add_consumer(vm, "c", manual_protect=False, initially_set=False)
    await service.write_pages(vm, list(range(0, size >> 12, 2)), 1, "guest", True)
    return Context(service, FdRegistry(), max_reply_bytes, COMMANDS, EVENTS)


def get_args(encoding: str, fdname: str | None = None) -> dict:
    return {
        "vm": "v",
        "slot": 0,
        "as_id": 0,
        "consumer": "c",
        "encoding": encoding,
        "fdname": fdname,
    }


@pytest.fixture
def encoders(monkeypatch):
    """Record the thread every encoding step of an answer runs in."""
    threads: dict[str, int] = {}

    def spy(name, original):
        def run(*args, **kwargs):
            threads[name] = threading.get_ident()
            return original(*args, **kwargs)

        return run

    monkeypatch.setattr(DirtyBitmap, "count", spy("count", DirtyBitmap.count))
    for name in ("_base64", "_run_edges", "_ranges"):
        monkeypatch.setattr(handlers, name, spy(name, getattr(handlers, name)))
    monkeypatch.setattr(handlers.os, "pwrite", spy("pwrite", os.pwrite))
    return threads


@pytest.mark.parametrize("encoding", ["bitmap", "ranges", "fd"])
def test_a_large_answer_is_encoded_in_a_worker_thread(tmp_path, encoders, encoding):
    async def main():
        ctx = await make_context(tmp_path, BIG)
        fdname = None
        if encoding == "fd":
            fd = os.open(tmp_path / "bits", os.O_RDWR | os.O_CREAT, 0o600)
            ctx.fds.hold([fd])
            ctx.fds.claim(fdname := "bits")
        encoders.clear()
        answer = await handlers.dirty_log_get(ctx, get_args(encoding, fdname))
        if fdname is not None:
            ctx.fds.close(fdname)
        await ctx.service.shutdown()
        return answer, threading.get_ident()

    answer, loop_thread = asyncio.run(main())
    assert isinstance(answer, Deferred)
    assert answer.value["dirty-pages"] == BIG >> 13
    assert {"count", {"bitmap": "_base64", "ranges": "_ranges", "fd": "pwrite"}[encoding]} <= set(
        encoders
    )
    assert loop_thread not in encoders.values(), encoders
    if encoding == "fd":
        written = DirtyBitmap.from_bytes(BIG >> 12, (tmp_path / "bits").read_bytes())
        assert written.pages().tolist() == list(range(0, BIG >> 12, 2))


@pytest.mark.parametrize("size", [SMALL, BIG])
def test_every_answer_is_built_in_the_thread_that_harvested_it(tmp_path, encoders, size):
    """One hop off the loop per GET: even a small answer is not handed back to the loop to be
    encoded, and a large one is not handed to a second thread."""
    spied = VmState.harvest

    def harvest(self, slot, consumer, ticket=None):
        encoders["harvest"] = threading.get_ident()
        return spied(self, slot, consumer, ticket)

    async def main():
        ctx = await make_context(tmp_path, size)
        fd = os.open(tmp_path / "bits", os.O_RDWR | os.O_CREAT, 0o600)
        ctx.fds.hold([fd])
        ctx.fds.claim("bits")
        threads = {}
        for encoding in ("bitmap", "ranges", "fd"):
            await ctx.service.write_pages(ctx.service.vm("v"), [0, 2], 1, "guest", True)
            encoders.clear()
            fdname = "bits" if encoding == "fd" else None
            answer = await handlers.dirty_log_get(ctx, get_args(encoding, fdname))
            threads[encoding] = dict(encoders)
        ctx.fds.close("bits")
        await ctx.service.shutdown()
        return answer, threads, threading.get_ident()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VmState, "harvest", harvest)
        answer, threads, loop_thread = asyncio.run(main())
    for encoding, steps in threads.items():
        assert set(steps) >= {"harvest", "count"}, encoding
        assert set(steps.values()) == {steps["harvest"]} != {loop_thread}, (encoding, steps)
    assert answer.value["dirty-pages"] == 2  # the pages stored since the GET before


def test_too_many_ranges_are_refused_before_the_list_is_built(tmp_path, monkeypatch):
    def never(*args):
        raise AssertionError("the ranges were built")

    async def main():
        ctx = await make_context(tmp_path, BIG, max_reply_bytes=64 << 10)
        monkeypatch.setattr(handlers, "_ranges", never)
        with pytest.raises(GenericError, match="8192 dirty ranges do not fit"):
            await handlers.dirty_log_get(ctx, get_args("ranges"))
        pending = ctx.service.vm("v").consumer("c").pending_pages()
        await ctx.service.shutdown()
        return pending

    assert asyncio.run(main()) == BIG >> 13  # the refused answer's bits are back


def test_a_get_cancelled_while_its_answer_encodes_gives_its_bits_back(tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    ranges = handlers._ranges

    def slow(*args):
        entered.set()
        release.wait(30)
        return ranges(*args)

    async def main():
        ctx = await make_context(tmp_path, BIG)
        monkeypatch.setattr(handlers, "_ranges", slow)
        get = asyncio.ensure_future(handlers.dirty_log_get(ctx, get_args("ranges")))
        await asyncio.to_thread(entered.wait, 30)  # the loop is free while the answer encodes
        get.cancel()
        with pytest.raises(asyncio.CancelledError):
            await get
        pending = ctx.service.vm("v").consumer("c").pending_pages()
        release.set()
        await ctx.service.shutdown()
        return pending

    try:
        assert asyncio.run(main()) == BIG >> 13
    finally:
        release.set()


def test_a_short_write_then_efbig_fails_the_answer_names_the_errno_and_gives_the_bits_back(
    tmp_path, monkeypatch
):
    """pwrite writes half (RLIMIT_FSIZE reached), the next one fails: the answer is an error
    that says how far it got and why, and the consumer keeps every page for its next GET."""
    real_pwrite = os.pwrite
    calls = []

    def half_then_efbig(fd, data, offset):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        return real_pwrite(fd, bytes(data[: len(data) // 2]), offset)

    async def main():
        ctx = await make_context(tmp_path, BIG)
        fd = os.open(tmp_path / "bits", os.O_RDWR | os.O_CREAT, 0o600)
        ctx.fds.hold([fd])
        ctx.fds.claim("bits")
        monkeypatch.setattr(handlers.os, "pwrite", half_then_efbig)
        with pytest.raises(GenericError) as failed:
            await handlers.dirty_log_get(ctx, get_args("fd", "bits"))
        pending = ctx.service.vm("v").consumer("c").pending_pages()
        ctx.fds.close("bits")
        await ctx.service.shutdown()
        return str(failed.value), pending

    desc, pending = asyncio.run(main())
    nbytes = BIG >> 15
    assert calls == [0, nbytes // 2]  # the short write was carried on from where it stopped
    assert f"({nbytes // 2} of {nbytes} bytes written): File too large (EFBIG)" in desc, desc
    assert pending == BIG >> 13


def _append_only(tmp_path):
    return os.open(tmp_path / "appended", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)


def _sealed(seals):
    def make(tmp_path):
        fd = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        return fd

    return make


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_append_only, "was opened with O_APPEND"),
        (_sealed(fcntl.F_SEAL_WRITE), "is sealed against writing (EPERM)"),
        (_sealed(handlers.F_SEAL_FUTURE_WRITE), "is sealed against writing (EPERM)"),
        (_sealed(fcntl.F_SEAL_GROW), "sealed against growing at 0 bytes; the bitmap needs 2048"),
    ],
    ids=["O_APPEND", "F_SEAL_WRITE", "F_SEAL_FUTURE_WRITE", "F_SEAL_GROW"],
)
def test_a_descriptor_that_cannot_take_the_bitmap_is_refused_before_anything_is_harvested(
    tmp_path, make, says
):
    async def main():
        ctx = await make_context(tmp_path, BIG)
        vm = ctx.service.vm("v")
        ctx.fds.hold([make(tmp_path)])
        ctx.fds.claim("bits")
        generation = vm.backend.generation
        with pytest.raises(GenericError, match="descriptor 'bits'") as refused:
            await handlers.dirty_log_get(ctx, get_args("fd", "bits"))
        unchanged = (vm.backend.generation, vm.consumer("c").pending_pages()) == (generation, 0)
        ctx.fds.close("bits")
        await ctx.service.shutdown()
        return str(refused.value), unchanged

    desc, unchanged = asyncio.run(main())
    assert says in desc
    assert unchanged, "the slot was harvested for an answer that could not be written"


@pytest.mark.parametrize("npages", [0, 1, 63, 64, 65, 130, 1000, 4096, 100_003, 3_000_001])
def test_ranges_built_in_pieces_are_the_bitmaps_ranges(npages, monkeypatch):
    monkeypatch.setattr(handlers, "_RANGES_PIECE", 7)
    monkeypatch.setattr(handlers, "_BASE64_PIECE", 3 * 5)
    rng = np.random.default_rng(npages)
    for density in (0.0, 0.02, 0.5, 0.97, 1.0):
        bm = DirtyBitmap.from_pages(npages, np.flatnonzero(rng.random(npages) < density))
        starts, lasts = _run_edges(bm)
        ranges = bm.ranges()
        assert _popcount(starts) == len(ranges)
        if npages < 10_000 or density in (0.0, 1.0):
            assert [list(r) for r in _ranges(npages, starts, lasts)] == ranges
            assert _base64(bm) == bm.to_base64()
