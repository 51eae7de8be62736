"""set/cancel/query-vcpu-dirty-limit and cpu-throttle-set: QEMU's checks, and who holds what.

The limits and the throttle live in the backend (``vm.backend.vcpu_controls``, kvmshim); this
module adds what the daemon must know about its clients. QEMU 7.1's system/dirtylimit.c refuses
user changes while a migration with the dirty-limit capability runs; here the migration is
another process, so a connection that sets a limit or throttle with ``until-disconnect`` *holds*
it: other connections may not change it, and it is lifted when that connection closes (the
handler registers the release with the connection's scope).

Rates: QEMU's "MB/s" is MiB/s (pages x 4096 / 2^20 per second); the backend counts pages/s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dirtylogd.errors import GenericError
from dirtylogd.service.vmstate import LIMIT, THROTTLE
from kvmshim.abi import PAGE_SIZE

if TYPE_CHECKING:
    from dirtylogd.service.vm import VmState

MiB = 1 << 20
PAGES_PER_MIB = MiB // PAGE_SIZE  # 256

NO_RING = (
    "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set: "
    "the kvm backend reads KVM's dirty bitmap and attributes no page to a vCPU "
    "(auto-converge's cpu throttle works there)"
)


def vcpus_running(vm: VmState) -> int:
    """vCPUs of the VM's running workload (0: none)."""
    status = vm.backend.workload_status()
    return status.spec.vcpus if status is not None and status.running else 0


def _check_index(vm: VmState, cpu_index: int | None) -> None:
    """QEMU's "incorrect cpu index specified", with the vCPUs the VM runs."""
    n = vcpus_running(vm)
    if n == 0 and cpu_index is None:  # nothing to limit: say so, not "incorrect cpu index"
        raise GenericError(
            f"VM '{vm.name}' runs no vCPUs: a dirty limit applies to a running workload"
        )
    if cpu_index is not None and not 0 <= cpu_index < n:
        runs = "runs no vCPUs" if n == 0 else f"runs {n} vCPUs"
        raise GenericError(f"incorrect cpu index specified (VM '{vm.name}' {runs})")


def set_dirty_limit(
    vm: VmState, owner: int, cpu_index: int | None, mib_per_s: int, until_disconnect: bool
) -> bool:
    """qmp_set_vcpu_dirty_limit's checks and order; 0 cancels. Whether ``owner`` now holds
    the limits (the caller lifts them when its connection closes)."""
    if not vm.backend.has_dirty_ring:
        raise GenericError(NO_RING)
    _check_index(vm, cpu_index)
    vm.holds.check(LIMIT, owner, "can't set dirty page rate limit")
    if mib_per_s == 0:
        return cancel_dirty_limit(vm, owner, cpu_index)
    _apply(vm.backend.vcpu_controls.set_dirty_limit, cpu_index, mib_per_s * PAGES_PER_MIB)
    vm.holds.limit = owner if until_disconnect else None
    return until_disconnect


def cancel_dirty_limit(vm: VmState, owner: int, cpu_index: int | None) -> bool:
    """qmp_cancel_vcpu_dirty_limit: without a ring it succeeds silently, as QEMU's does.
    Whether ``owner`` still holds limits afterwards."""
    if not vm.backend.has_dirty_ring:
        return False
    if cpu_index is not None:
        _check_index(vm, cpu_index)
    vm.holds.check(LIMIT, owner, "can't cancel dirty page rate limit")
    controls = vm.backend.vcpu_controls
    _apply(controls.cancel_dirty_limit, cpu_index)
    if not controls.dirty_limits():
        vm.holds.limit = None  # dirtylimit_cleanup: nothing limited, nothing held
    return vm.holds.limit == owner


def query_dirty_limit(vm: VmState) -> list[dict[str, int]]:
    """QEMU's [DirtyLimitInfo]: only limited vCPUs, [] when none (or no workload)."""
    return [
        {
            "cpu-index": r.vcpu,
            "limit-rate": round(r.limit / PAGES_PER_MIB),
            "current-rate": int(r.current / PAGES_PER_MIB),
        }
        for r in vm.backend.vcpu_rates()
        if r.limit is not None
    ]


def set_throttle(vm: VmState, owner: int, percentage: int, until_disconnect: bool) -> bool:
    """cpu-throttle-set (QEMU's cpu_throttle_set, which its migration calls); 0 lifts it."""
    vm.holds.check(THROTTLE, owner, "can't set cpu throttle")
    _apply(vm.backend.vcpu_controls.set_throttle, percentage)
    vm.holds.throttle = owner if until_disconnect and percentage else None
    return vm.holds.throttle == owner


def release(vm: VmState, what: str, owner: int) -> None:
    """``owner``'s connection closed: lift what it still holds (a callback of its scope)."""
    if vm.removed or getattr(vm.holds, what) != owner:
        return
    setattr(vm.holds, what, None)
    controls = vm.backend.vcpu_controls
    if what == LIMIT:
        controls.cancel_dirty_limit(None)
    else:
        controls.set_throttle(0)


def set_period(vm: VmState, ms: int) -> None:
    """x-vcpu-dirty-limit-period: how long each measured current-rate spans."""
    _apply(vm.backend.vcpu_controls.set_period, ms / 1000)


def describe(vm: VmState) -> dict[str, int]:
    """query-vms' throttle members (query-migrate's cpu-throttle-percentage; the period in ms)."""
    controls = vm.backend.vcpu_controls
    return {
        "cpu-throttle-percentage": controls.throttle,
        "vcpu-dirty-limit-period": round(controls.period * 1000),
    }


def _apply(fn: Any, *args: Any) -> None:
    """A backend setting; its ValueError (an index or value it refuses) becomes the client's."""
    try:
        fn(*args)
    except ValueError as exc:
        raise GenericError(str(exc)) from None
