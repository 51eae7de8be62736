"""Command handlers: schema-checked arguments in, service calls out.

Each handler is a plain async function bound to its entry in :data:`dirtylogd.api.schema.COMMANDS`;
it never sees JSON, only the values the schema produced. A handler whose answer hands bits over
to a client returns :class:`~dirtylogd.qmp.session.Deferred`, so the session can give them back
if the answer cannot be delivered.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import fcntl
import os
import stat
from collections.abc import Callable
from typing import Any

import numpy as np

from dirtylogd.api.command import Context
from dirtylogd.api.introspect import qmp_schema
from dirtylogd.errors import GenericError
from dirtylogd.qmp.framing import AsciiText
from dirtylogd.qmp.session import Deferred, version_info
from dirtylogd.service.vm import Taken, VmState
from kvmshim.abi import dirty_bitmap_bytes
from kvmshim.bitmap import WORD, DirtyBitmap

# Storage keys of at most this many pages are encoded on the event loop, more in a worker thread
# (a hand-off to a thread costs ~0.1 ms). A GET answer is always built in the worker thread that
# harvested it: that hop is paid anyway.
INLINE_ENCODE_MAX_BYTES = 1024


async def query_version(ctx: Context, a: dict[str, Any]) -> Any:
    return version_info()  # the greeting's, as qmp-spec asks


async def query_commands(ctx: Context, a: dict[str, Any]) -> Any:
    return [{"name": c.name} for c in ctx.commands]


async def query_qmp_schema(ctx: Context, a: dict[str, Any]) -> Any:
    return qmp_schema(ctx.commands, ctx.events)


async def getfd(ctx: Context, a: dict[str, Any]) -> Any:
    ctx.fds.claim(a["fdname"])
    return {}


async def closefd(ctx: Context, a: dict[str, Any]) -> Any:
    ctx.fds.close(a["fdname"])
    return {}


async def vm_create(ctx: Context, a: dict[str, Any]) -> Any:
    await ctx.service.create_vm(
        a["name"], a["memslots"], a["backend"], a["esop"], a.get("kernel"), a["hugepages"]
    )
    return {}


async def vm_remove(ctx: Context, a: dict[str, Any]) -> Any:
    await ctx.service.remove_vm(a["vm"])
    return {}


async def query_vms(ctx: Context, a: dict[str, Any]) -> Any:
    return await ctx.service.query_vms()


async def memslot_set(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a.pop("vm"))
    await ctx.service.set_memslot(vm, **a)
    return {}


async def consumer_add(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    await ctx.service.add_consumer(vm, a["name"], a["manual_protect"], a["initially_set"])
    return {}


async def consumer_remove(ctx: Context, a: dict[str, Any]) -> Any:
    await ctx.service.remove_consumer(ctx.service.vm(a["vm"]), a["name"])
    return {}


async def dirty_log_get(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    encoding, fdname = a["encoding"], a["fdname"]
    fd = -1
    if encoding == "fd":
        if fdname is None:
            raise GenericError("encoding 'fd' needs fdname: pass a memfd with getfd first")
        fd = ctx.fds.lookup(fdname)
        # Before the harvest: a refused command changes nothing.
        _check_writable(fd, fdname, _bitmap_bytes(ctx, vm, a["slot"], a["as_id"]))
    elif fdname is not None:
        raise GenericError("fdname is only used with encoding 'fd'")
    elif encoding == "bitmap":
        _check_inline_fits(ctx, vm, a["slot"], a["as_id"])

    def answer(taken: Taken) -> dict[str, Any]:
        return _encode(taken, encoding, fd, fdname, ctx.max_reply_bytes)

    taken, result = await ctx.service.get_dirty_log_answered(
        vm, a["slot"], a["as_id"], a["consumer"], answer
    )
    return Deferred(result, _undo(vm, taken), lambda: vm.delivered(taken))


# Not every Python names it yet: no write at all, even through another mapping (Linux 5.1).
F_SEAL_FUTURE_WRITE = 0x0010


def _check_writable(fd: int, name: str, nbytes: int | None, what: str = "the bitmap") -> None:
    """The answer (``what``) goes to offset 0 of a regular file or memfd opened for writing.

    Everything that can be known before the harvest is checked here, so a descriptor that
    cannot take the answer is refused with nothing harvested: O_APPEND (Linux's pwrite then
    appends, whatever the offset, and the client would read stale bytes at 0) and memfd seals
    that forbid the write. What cannot be known (a full file system) fails the write itself,
    and the bits go back (see ``_write_bitmap``)."""
    try:
        info = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        raise GenericError(f"descriptor '{name}' is unusable: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise GenericError(
            f"descriptor '{name}' is not a file or memfd: {what} goes "
            "at offset 0, as KVM writes into the caller's buffer (EINVAL)"
        )
    if (flags & os.O_ACCMODE) not in (os.O_WRONLY, os.O_RDWR):
        raise GenericError(f"descriptor '{name}' is not open for writing (EBADF)")
    if flags & os.O_APPEND:
        raise GenericError(
            f"descriptor '{name}' was opened with O_APPEND: {what} would land at the file's "
            "end, not at offset 0 where it is read (EINVAL)"
        )
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # not a memfd (or a kernel without seals): nothing is sealed
    if seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        raise GenericError(f"descriptor '{name}' is sealed against writing (EPERM)")
    if seals & fcntl.F_SEAL_GROW and nbytes is not None and info.st_size < nbytes:
        raise GenericError(
            f"descriptor '{name}' is sealed against growing at {info.st_size} bytes; "
            f"{what} needs {nbytes} (EPERM)"
        )


def _bitmap_bytes(ctx: Context, vm: VmState, slot: int, as_id: int) -> int | None:
    """Bytes of the slot's bitmap, or None if there is no such slot (the harvest says why)."""
    memslot = ctx.service.memslot(vm, slot, as_id)
    return None if memslot is None else dirty_bitmap_bytes(memslot.npages)


def _undo(vm: VmState, taken: Taken) -> Callable[[], None]:
    return lambda: vm.put_back(taken)


def _check_inline_fits(ctx: Context, vm: VmState, slot: int, as_id: int) -> None:
    nbytes = _bitmap_bytes(ctx, vm, slot, as_id)
    if nbytes is None:
        return  # the harvest will say why (ENOENT / EINVAL)
    if (nbytes + 2) // 3 * 4 + 256 > ctx.max_reply_bytes:
        raise GenericError(
            f"the bitmap of slot {slot} ({nbytes} bytes) does not fit an inline reply of "
            f"at most {ctx.max_reply_bytes} bytes: use encoding 'fd' (with getfd) or 'ranges'"
        )


def _encode(
    taken: Taken, encoding: str, fd: int, fdname: str | None, max_reply_bytes: int
) -> dict[str, Any]:
    """The answer's members, built in the harvest's worker thread (one hop off the loop per
    GET): it reads only ``taken.bitmap``, which no one else writes once taken (a put-back only
    reads it). Raising puts the bits back."""
    bm = taken.bitmap
    result: dict[str, Any] = {
        "npages": bm.npages,
        "dirty-pages": taken.pages,
        "generation": taken.generation,
    }
    if encoding == "bitmap":
        result["bitmap"] = _base64(bm)
    elif encoding == "ranges":
        # Count first, build only what fits: 2 M ranges (a 16 GiB slot, every other page dirty)
        # take 0.3 s and ~200 MB to build, only to be refused.
        starts, lasts = _run_edges(bm)
        nranges = _popcount(starts)
        # Each [first, count] costs at most 2 * 10 digits and 4 separators in JSON.
        if nranges * (4 + 2 * len(str(bm.npages))) + 256 > max_reply_bytes:
            raise GenericError(
                f"{nranges} dirty ranges do not fit an inline reply of at most "
                f"{max_reply_bytes} bytes: use encoding 'fd' (with getfd)"
            )
        result["ranges"] = _ranges(bm.npages, starts, lasts)
    else:
        assert fdname is not None
        _write_bitmap(fd, fdname, bm.bytes_view().data)
    return result


# Python objects are made in pieces: a worker thread building them holds the GIL for the whole
# of one C call (tolist, b64encode), and the loop gets it back only between calls. A piece of
# 4,096 ranges or 768 KiB of base64 takes ~1.5 ms.
_RANGES_PIECE = 4096
_BASE64_PIECE = 3 << 18  # a multiple of 3: the pieces' texts join into one base64 text


def _base64(bm: DirtyBitmap) -> AsciiText:
    """``bm.to_base64()``, in pieces; sent as it is, not escaped again (see AsciiText)."""
    raw = bm.bytes_view()
    step = _BASE64_PIECE
    return AsciiText(
        "".join(
            base64.b64encode(raw[i : i + step].data).decode("ascii")
            for i in range(0, raw.size, step)
        )
    )


def _run_edges(bm: DirtyBitmap) -> tuple[np.ndarray, np.ndarray]:
    """Bitmaps (as words) of the first and of the last page of every run of dirty pages: a
    set bit whose lower (upper) neighbour, across word edges too, is clear."""
    words = bm.words
    below = words << np.uint64(1)
    below[1:] |= words[:-1] >> np.uint64(63)
    above = words >> np.uint64(1)
    above[:-1] |= words[1:] << np.uint64(63)
    return words & ~below, words & ~above


def _popcount(words: np.ndarray) -> int:
    """Set bits in ``words``: with the run starts, how many ranges there are."""
    return int(np.bitwise_count(words).sum(dtype=np.int64))


def _ranges(npages: int, starts: np.ndarray, lasts: np.ndarray) -> list[tuple[int, int]]:
    """``bm.ranges()`` from the run edges, built in pieces, as (first, count) tuples (JSON
    arrays all the same). Tuples of ints leave the garbage collector's view at its next pass;
    2 M lists would stay in it and make each full collection (~100 ms, GIL held) walk them."""
    firsts = DirtyBitmap(npages, starts.astype(WORD, copy=False)).pages()
    counts = DirtyBitmap(npages, lasts.astype(WORD, copy=False)).pages() + 1 - firsts
    out: list[tuple[int, int]] = []
    for i in range(0, firsts.size, _RANGES_PIECE):
        piece = slice(i, i + _RANGES_PIECE)
        out += zip(firsts[piece].tolist(), counts[piece].tolist(), strict=True)
    return out


def _write_bitmap(fd: int, fdname: str, data: memoryview) -> None:
    """The bitmap at offset 0; the caller gives the bits back on the error, so the consumer
    gets them again with its next GET."""
    _write_at_zero(fd, fdname, data, "the bitmap", "; its pages stay pending")


def _write_at_zero(fd: int, fdname: str, data: memoryview, what: str, after: str = "") -> None:
    """All of ``data`` at offset 0, or a GenericError naming the errno and how far it got.

    pwrite may write less than asked — a file system that fills up, RLIMIT_FSIZE — and only the
    next call says why; an answer is a success only once every byte is in."""
    done = 0
    try:
        while done < len(data):
            written = os.pwrite(fd, data[done:], done)
            if written <= 0:  # no progress and no error: never report success, never spin
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            done += written
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or errno.EIO, str(exc.errno))
        raise GenericError(
            f"cannot write {what} to descriptor '{fdname}' ({done} of {len(data)} bytes "
            f"written): {exc.strerror} ({code}){after}"
        ) from None


async def dirty_log_clear(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    await ctx.service.clear_dirty_log(
        vm, a["slot"], a["as_id"], a["consumer"], a["first_page"], a["num_pages"], a["bitmap"]
    )
    return {}


async def io_dirty_mark(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    return {"pages": await ctx.service.io_mark(vm, a["ranges"])}


async def query_dirty_rate(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    return {**vm.calc.info(a["calc_time_unit"]), **await ctx.service.dirty_rate(vm)}


async def sim_write(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    await ctx.service.write(vm, a["guest_phys_addr"], a["data"], a["path"], a["report"])
    return {}


async def sim_write_pages(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    await ctx.service.write_pages(vm, a["gfns"], a["value"], a["path"], a["report"])
    return {}


async def sim_read(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    data = await ctx.service.read(vm, a["guest_phys_addr"], a["length"], a["path"])
    return {"data": base64.b64encode(data).decode("ascii")}


async def sim_set_storage_key(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    await ctx.service.set_storage_key(vm, a["guest_phys_addr"], a["key"])
    return {}


async def storage_keys_get(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    count, encoding, fdname = a["count"], a["encoding"], a["fdname"]
    fd = -1
    if encoding == "fd":
        if fdname is None:
            raise GenericError("encoding 'fd' needs fdname: pass a memfd with getfd first")
        fd = ctx.fds.lookup(fdname)
        _check_writable(fd, fdname, count, "the keys")  # before reading: nothing half done
    elif fdname is not None:
        raise GenericError("fdname is only used with encoding 'fd'")
    elif (count + 2) // 3 * 4 + 256 > ctx.max_reply_bytes:
        raise GenericError(
            f"{count} keys do not fit an inline reply of at most {ctx.max_reply_bytes} bytes: "
            "use encoding 'fd' (with getfd) or a smaller count"
        )
    keys = await ctx.service.storage_keys(vm, a["start_gfn"], count)
    result: dict[str, Any] = {"start-gfn": a["start_gfn"], "count": count}
    result["uses-keys"] = keys is not None
    if keys is None:
        return result
    if encoding == "fd":  # the client's file may be slow: never on the loop
        await asyncio.to_thread(_write_at_zero, fd, fdname, keys.data, "the keys")
    elif count <= INLINE_ENCODE_MAX_BYTES:
        result["keys"] = _keys_base64(keys)
    else:  # up to a million keys: 1.4 MB of text, milliseconds the loop need not wait
        result["keys"] = await asyncio.to_thread(_keys_base64, keys)
    return result


def _keys_base64(keys: np.ndarray) -> AsciiText:
    return AsciiText(base64.b64encode(keys.data).decode("ascii"))


async def sim_workload_start(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a.pop("vm"))
    await ctx.service.start_workload(vm, **a)
    return {}


async def sim_workload_stop(ctx: Context, a: dict[str, Any]) -> Any:
    await ctx.service.stop_workload(ctx.service.vm(a["vm"]))
    return {}


async def stop(ctx: Context, a: dict[str, Any]) -> Any:
    await ctx.service.pause(ctx.service.vm(a["vm"]))
    return {}


async def cont(ctx: Context, a: dict[str, Any]) -> Any:
    await ctx.service.resume(ctx.service.vm(a["vm"]))
    return {}
