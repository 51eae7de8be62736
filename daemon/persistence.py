"""Saving VMs on a graceful stop and bringing them back on start.

Graceful stop (SIGTERM): pause the vCPUs, stop the workload, harvest every logged slot into
every consumer, save each consumer's pending bits, mark the record clean, keep the RAM file.
Start: re-open each VM's RAM file, recreate its memslots at the same offsets, its consumers,
its pause state and workload; consumers get their saved bits if the record is clean, else every
page dirty (the daemon was killed, and what its consumers missed is unknown).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from dirtylogd.state import StateStore
from dirtylogd.vm import DEFAULT_CONSUMER, VmState
from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES, make_slot_id
from kvmshim.backends import create_backend

if TYPE_CHECKING:
    from dirtylogd.service import Service

log = logging.getLogger(__name__)
RECORD_VERSION = 1


def vm_record(
    vm: VmState, clean: bool = False, workload: dict[str, Any] | None = None
) -> dict[str, Any]:
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
    running = getattr(backend, "workload", None)
    if workload is None and running is not None:
        workload = workload_spec(running.spec)
    return {
        "version": RECORD_VERSION,
        "name": vm.name,
        "backend": backend.kind,
        "esop": getattr(backend, "esop", True),
        "ram-path": backend.ram.path,  # type: ignore[attr-defined]
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


def workload_spec(spec: Any) -> dict[str, Any]:
    out = dataclasses.asdict(spec)
    out["pattern"] = str(spec.pattern)
    return out


async def save_all(service: Service, store: StateStore) -> None:
    for vm in list(service.vms.values()):
        running = getattr(vm.backend, "workload", None)
        workload = workload_spec(running.spec) if running is not None else None
        await asyncio.to_thread(vm.backend.pause)  # nothing stores from here on ...
        await asyncio.to_thread(vm.backend.stop_workload)
        await asyncio.to_thread(vm.flush)  # ... so this harvest is the last word
        for (consumer, slot), bits in vm.pending_snapshot().items():
            store.save_pending(vm.name, consumer, slot, bits)
        store.save_vm(vm_record(vm, clean=True, workload=workload))
        await asyncio.to_thread(vm.backend.close, True)
        log.info("vm %s saved: its consumers' pending bits wait for the next start", vm.name)
    service.vms.clear()


async def restore_all(service: Service, store: StateStore) -> None:
    for record in store.load_all():
        name = record.get("name", "?")
        if not os.path.exists(record.get("ram-path", "")):
            log.error(
                "vm %s cannot be restored: its RAM file %s is gone", name, record.get("ram-path")
            )
            store.delete_vm(name)
            continue
        try:
            await _restore(service, store, record)
        except Exception:  # one broken record must not keep the daemon from serving the rest
            log.exception(
                "vm %s could not be restored; its record stays in %s", name, store.directory
            )


async def _restore(service: Service, store: StateStore, record: dict[str, Any]) -> None:
    name = record["name"]
    runtime_dir = os.path.dirname(record["ram-path"])
    backend = await asyncio.to_thread(
        create_backend, record["backend"], name, runtime_dir, record.get("esop", True), True
    )
    vm = VmState(name, backend)
    try:
        for m in record["memslots"]:
            flags = KVM_MEM_LOG_DIRTY_PAGES if m["log-dirty-pages"] else 0
            change = await asyncio.to_thread(
                backend.restore_memslot,
                make_slot_id(m["as-id"], m["slot"]),
                flags,
                m["guest-phys-addr"],
                m["size"],
                m["ram-offset"],
            )
            vm.apply_memslot_change(change)
        for c in record["consumers"]:
            vm.add_consumer(c["name"], c["manual-protect"], c["initially-set"])
    except BaseException:
        await asyncio.to_thread(backend.close, True)
        raise
    saved = store.take_pending(name)  # always consumed: never reused by a later restart
    vm.restore_pending(saved if record.get("clean") else None)
    service.register(vm)
    if record.get("paused"):
        await service.pause(vm)
    if record.get("workload"):
        await service.start_workload(vm, **record["workload"])
    service.persist(vm)
    log.info(
        "vm %s restored (%s)",
        name,
        "pending bits as saved"
        if record.get("clean")
        else "every page dirty: the daemon was not stopped cleanly",
    )
