"""Handlers of the convergence commands: calc-dirty-rate, the vCPU dirty limits, the throttle.

The QEMU rules live in :mod:`dirtylogd.service.dirtyrate` and :mod:`dirtylogd.service.limits`;
this ties them to the connection that asked: a limit or throttle set with ``until-disconnect``
is lifted by the connection's scope when it closes.
"""

from __future__ import annotations

import functools
from typing import Any

from dirtylogd.api.command import Context
from dirtylogd.service import dirtyrate, limits
from dirtylogd.service.vm import VmState
from dirtylogd.service.vmstate import LIMIT, THROTTLE


async def calc_dirty_rate(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    request = dirtyrate.check_request(
        vm.calc.measuring,
        a["calc_time"],
        a["calc_time_unit"],
        a["sample_pages"],
        a["mode"],
        vm.backend.has_dirty_ring,
    )
    vm.calc.start(request, functools.partial(dirtyrate.measure, vm))
    return {}


async def set_vcpu_dirty_limit(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    held = limits.set_dirty_limit(
        vm, ctx.scope.id, a["cpu_index"], a["dirty_rate"], a["until_disconnect"]
    )
    _hold(ctx, vm, LIMIT, held)
    return {}


async def cancel_vcpu_dirty_limit(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    _hold(ctx, vm, LIMIT, limits.cancel_dirty_limit(vm, ctx.scope.id, a["cpu_index"]))
    return {}


async def query_vcpu_dirty_limit(ctx: Context, a: dict[str, Any]) -> Any:
    return limits.query_dirty_limit(ctx.service.vm(a["vm"]))


async def cpu_throttle_set(ctx: Context, a: dict[str, Any]) -> Any:
    vm = ctx.service.vm(a["vm"])
    held = limits.set_throttle(vm, ctx.scope.id, a["percentage"], a["until_disconnect"])
    _hold(ctx, vm, THROTTLE, held)
    return {}


async def vcpu_dirty_limit_period_set(ctx: Context, a: dict[str, Any]) -> Any:
    limits.set_period(ctx.service.vm(a["vm"]), a["period"])
    return {}


def _hold(ctx: Context, vm: VmState, what: str, held: bool) -> None:
    """Lift ``what`` when this connection closes if it holds it now; else forget that."""
    key = (id(vm), what)
    if held:
        ctx.scope.on_close(key, functools.partial(limits.release, vm, what, ctx.scope.id))
    else:
        ctx.scope.discard(key)
