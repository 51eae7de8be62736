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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dirtylogd import VERSION, __version__
from dirtylogd.api.introspect import qmp_schema
from dirtylogd.errors import GenericError
from dirtylogd.qmp.fds import FdRegistry
from dirtylogd.qmp.session import Deferred
from dirtylogd.service.registry import Service
from dirtylogd.service.vm import Taken, VmState
from kvmshim.abi import dirty_bitmap_bytes

if TYPE_CHECKING:
    from dirtylogd.api.schema import Command


@dataclass
class Context:
    """What a handler may touch: the service, its connection's descriptors, the table itself."""

    service: Service
    fds: FdRegistry
    max_reply_bytes: int
    commands: Sequence[Command]


Handler = Callable[[Context, dict[str, Any]], Awaitable[Any]]


async def query_version(ctx: Context, a: dict[str, Any]) -> Any:
    major, minor, micro = VERSION
    return {
        "dirtylogd": {"major": major, "minor": minor, "micro": micro},
        "package": f"dirtylogd {__version__}",
    }


async def query_commands(ctx: Context, a: dict[str, Any]) -> Any:
    return [{"name": c.name} for c in ctx.commands]


async def query_qmp_schema(ctx: Context, a: dict[str, Any]) -> Any:
    return qmp_schema(ctx.commands)


async def getfd(ctx: Context, a: dict[str, Any]) -> Any:
    ctx.fds.claim(a["fdname"])
    return {}


async def closefd(ctx: Context, a: dict[str, Any]) -> Any:
    ctx.fds.close(a["fdname"])
    return {}


async def vm_create(ctx: Context, a: dict[str, Any]) -> Any:
    await ctx.service.create_vm(a["name"], a["memslots"], a["backend"], a["esop"])
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
        _check_writable(fd, fdname)  # before the harvest: a failed command changes nothing
    elif fdname is not None:
        raise GenericError("fdname is only used with encoding 'fd'")
    elif encoding == "bitmap":
        _check_inline_fits(ctx, vm, a["slot"], a["as_id"])
    taken = await ctx.service.get_dirty_log(vm, a["slot"], a["as_id"], a["consumer"])
    undo = _undo(vm, taken)
    try:
        result = await _encode_answer(ctx, taken, encoding, fd, fdname)
    except BaseException:
        undo()
        raise
    return Deferred(result, undo)


def _check_writable(fd: int, name: str) -> None:
    """The bitmap goes to offset 0 of a regular file or memfd opened for writing."""
    try:
        mode = os.fstat(fd).st_mode
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise GenericError(f"descriptor '{name}' is unusable: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise GenericError(
            f"descriptor '{name}' is not a file or memfd: the bitmap is written "
            "at offset 0, as KVM writes into the caller's buffer (EINVAL)"
        )
    if access not in (os.O_WRONLY, os.O_RDWR):
        raise GenericError(f"descriptor '{name}' is not open for writing (EBADF)")


def _undo(vm: VmState, taken: Taken) -> Callable[[], None]:
    return lambda: vm.put_back(taken)


def _check_inline_fits(ctx: Context, vm: VmState, slot: int, as_id: int) -> None:
    memslot = ctx.service.memslot(vm, slot, as_id)
    if memslot is None:
        return  # the harvest will say why (ENOENT / EINVAL)
    nbytes = dirty_bitmap_bytes(memslot.npages)
    if (nbytes + 2) // 3 * 4 + 256 > ctx.max_reply_bytes:
        raise GenericError(
            f"the bitmap of slot {memslot.id} ({nbytes} bytes) does not fit an inline reply of "
            f"at most {ctx.max_reply_bytes} bytes: use encoding 'fd' (with getfd) or 'ranges'"
        )


async def _encode_answer(
    ctx: Context, taken: Taken, encoding: str, fd: int, fdname: str | None
) -> dict[str, Any]:
    bm = taken.bitmap
    result: dict[str, Any] = {
        "npages": bm.npages,
        "dirty-pages": bm.count(),
        "generation": taken.generation,
    }
    if encoding == "bitmap":
        result["bitmap"] = bm.to_base64()
    elif encoding == "ranges":
        ranges = bm.ranges()
        # Each [first, count] costs at most 2 * 10 digits and 4 separators in JSON.
        if len(ranges) * (4 + 2 * len(str(bm.npages))) + 256 > ctx.max_reply_bytes:
            raise GenericError(
                f"{len(ranges)} dirty ranges do not fit an inline reply of at most "
                f"{ctx.max_reply_bytes} bytes: use encoding 'fd' (with getfd)"
            )
        result["ranges"] = ranges
    else:
        try:
            await asyncio.to_thread(os.pwrite, fd, bm.bytes_view(), 0)
        except OSError as exc:
            raise GenericError(
                f"cannot write the bitmap to descriptor '{fdname}': {exc.strerror} "
                f"({errno.errorcode.get(errno.EFAULT)})"
            ) from None
    return result


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
    return await ctx.service.dirty_rate(ctx.service.vm(a["vm"]))


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
