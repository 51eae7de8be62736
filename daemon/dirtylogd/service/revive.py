"""One VM out of its saved record, and one VM into it: the steps the registry drives.

Nothing here knows the registry: :mod:`dirtylogd.service.registry` decides when to call these,
in what order, and what to do when one fails (see its restore policy).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from dirtylogd.service.records import running_workload, vm_record
from dirtylogd.service.store import SavedBits, StateStore
from dirtylogd.service.vm import VmState
from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES, make_slot_id
from kvmshim.backends import create_backend

log = logging.getLogger(__name__)


async def revive(record: dict[str, Any]) -> VmState:
    """The VM a checked record describes, over the RAM file it names (adopted, not created)."""
    name = record["name"]
    runtime_dir = record["ram-path"].rsplit("/", 1)[0]
    # Records written before kernel generations existed are Linux 3.16 models (the default).
    backend = await asyncio.to_thread(
        functools.partial(
            create_backend,
            record["backend"],
            name,
            runtime_dir,
            esop=record.get("esop", True),
            adopt=True,
            kernel=record.get("kernel"),
            hugepages=record.get("hugepages", False),
        )
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
    return vm


def give_back_pending(vm: VmState, saved: SavedBits, clean: bool) -> None:
    """Each consumer's saved bits where a clean stop left trusted ones, else all dirty."""
    if not clean:
        vm.restore_pending(None)
        return
    trusted = {key: bits for key, bits in saved.bits.items() if saved.trusted(key[0])}
    vm.restore_pending(trusted)


async def save_stopped(vm: VmState, clean: bool) -> dict[str, Any]:
    """Quiesce ``vm``, harvest it into every consumer and return its record to write.

    The caller writes the pending bits (``vm.pending_snapshot()``) and then this record; a
    record that is not ``clean`` makes every consumer start all dirty, so its bits are moot."""
    workload = running_workload(vm)
    await asyncio.to_thread(vm.backend.pause)  # nothing stores from here on ...
    await asyncio.to_thread(vm.backend.stop_workload)
    await asyncio.to_thread(vm.flush)  # ... so this harvest is the last word
    return vm_record(vm, clean=clean, workload=workload)


def write_stopped(
    store: StateStore,
    pending: dict[tuple[str, int], bytes],
    record: dict[str, Any],
    keys: dict[int, bytes] | None = None,
) -> None:
    """A stopped VM's consumers' bits and the model's storage keys, then its record: clean
    only once both are in."""
    if record["clean"]:
        for (consumer, slot), bits in pending.items():
            store.save_pending(record["name"], consumer, slot, bits)
        for slot, data in (keys or {}).items():
            store.save_keys(record["name"], slot, data)
    store.save_vm(record)


def give_back_keys(vm: VmState, keys: dict[int, bytes], clean: bool) -> None:
    """The model's storage keys as a graceful stop saved them; after an unclean stop (or a
    slot without a usable file) its keys start at 0, which is said, since a migration would
    carry those."""
    backend = vm.backend
    if not backend.capabilities().get("s390-skeys"):
        return  # real KVM keeps its own keys, x86 has none
    lost = []
    for state in vm.slots.values():
        slot = state.memslot.slot
        data = keys.get(slot) if clean else None
        if data is not None and len(data) == state.memslot.npages:
            backend.restore_storage_keys(slot, data)
        else:
            lost.append(slot)
    if lost:
        log.warning(
            "vm %s: storage keys of slot(s) %s were not saved (%s); they start at 0",
            vm.name,
            ", ".join(map(str, sorted(lost))),
            "the daemon was not stopped cleanly" if not clean else "no usable key file",
        )
