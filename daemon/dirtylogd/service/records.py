"""A VM's saved record: built from its state, read back into creation arguments.

The state store (:mod:`dirtylogd.service.store`) only reads and writes these records; the
registry (:mod:`dirtylogd.service.registry`) decides when. A record written while the daemon
runs says ``clean: false``; only a graceful stop, after saving every consumer's pending bits,
writes ``clean: true``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dirtylogd.service.vm import DEFAULT_CONSUMER, VmState
from kvmshim.backends import WorkloadSpec

RECORD_VERSION = 1


def vm_record(
    vm: VmState, clean: bool = False, workload: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The record of ``vm``; ``workload`` overrides the running one (a stop already ended it)."""
    backend = vm.backend
    memslots = []
    for state in sorted(vm.slots.values(), key=lambda s: s.memslot.slot):
        m = state.memslot
        region = backend.ram_region(m.slot)
        memslots.append(
            {
                "slot": m.id,
                "as-id": m.as_id,
                "guest-phys-addr": m.guest_phys_addr,
                "size": m.memory_size,
                "log-dirty-pages": m.log_dirty_pages,
                "ram-offset": region.offset if region else None,
            }
        )
    if workload is None:
        workload = running_workload(vm)
    return {
        "version": RECORD_VERSION,
        "name": vm.name,
        "backend": backend.kind,
        **backend.options(),
        "ram-path": backend.ram_path,
        "memslots": memslots,
        "consumers": [
            {"name": c.name, "manual-protect": c.manual_protect, "initially-set": c.initially_set}
            for c in vm.consumers.values()
            if c.name != DEFAULT_CONSUMER
        ],
        "paused": vm.user_paused,
        "workload": workload,
        "clean": clean,
    }


def running_workload(vm: VmState) -> dict[str, Any] | None:
    """The workload spec of ``vm`` as a record field, or None if no workload runs."""
    status = vm.backend.workload_status()
    return None if status is None else workload_spec(status.spec)


def workload_spec(spec: WorkloadSpec) -> dict[str, Any]:
    out = dataclasses.asdict(spec)
    out["pattern"] = str(spec.pattern)
    return out
