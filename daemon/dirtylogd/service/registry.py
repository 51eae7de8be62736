"""The service: the registry of VMs and the async face of everything commands ask for.

Blocking work — harvests, memslot changes, stores, vCPU control — runs in worker threads
(``asyncio.to_thread``) so one large VM never stalls the socket of another. Kernel-contract
failures become GenericError with the errno in the text; unknown names become DeviceNotFound.

It also drives the state store: on a graceful stop every VM is saved with its consumers'
pending bits; on start every saved VM comes back (all dirty if the daemon was killed).
Events (STOP, RESUME, VCPU_FAILED) go to the sink it is given; it does not know who listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from dirtylogd.errors import DeviceNotFound, GenericError, QmpError
from dirtylogd.service.records import running_workload, vm_record
from dirtylogd.service.store import StateStore
from dirtylogd.service.vm import Taken, VmState
from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES, make_slot_id
from kvmshim.backends import WorkloadSpec, create_backend
from kvmshim.backends.base import Pattern, ReadPath, WritePath
from kvmshim.errors import KvmError, KvmShimError
from kvmshim.memslot import Memslot

log = logging.getLogger(__name__)
T = TypeVar("T")
# Where events go: (name, data), called on the event loop's thread.
EventSink = Callable[[str, dict[str, Any]], None]


def from_kvm(exc: KvmError, vm: str) -> QmpError:
    """A kernel-contract failure as the client sees it: the errno stays in the text."""
    return GenericError(exc.describe(vm))


def _no_events(name: str, data: dict[str, Any]) -> None:
    """The sink of a service nobody listens to (tests, tools)."""


class Service:
    def __init__(
        self,
        runtime_dir: str,
        state: StateStore | None = None,
        events: EventSink = _no_events,
    ) -> None:
        self.runtime_dir = runtime_dir
        self.state = state
        self.vms: dict[str, VmState] = {}
        self._creating: set[str] = set()
        self.emit_event = events

    # --- persistence ----------------------------------------------------------------------------
    def register(self, vm: VmState) -> None:
        vm.backend.io_reporter = vm.io_mark_gfns
        vm.backend.on_vcpu_failure = self._vcpu_failure_reporter(vm.name)
        self.vms[vm.name] = vm

    def persist(self, vm: VmState) -> None:
        """Record a registered VM's definition (not clean: a crash from here on is unclean)."""
        if self.state is not None and self.vms.get(vm.name) is vm:
            self.state.save_vm(vm_record(vm))

    async def restore(self) -> None:
        """Bring back every VM the state store has a record of (before serving clients)."""
        if self.state is None:
            return
        for record in self.state.load_all():
            name = record.get("name", "?")
            if not os.path.exists(record.get("ram-path", "")):
                log.error(
                    "vm %s cannot be restored: its RAM file %s is gone",
                    name,
                    record.get("ram-path"),
                )
                self.state.delete_vm(name)
                continue
            try:
                await self._restore(self.state, record)
            except Exception:  # one broken record must not keep the daemon from serving the rest
                log.exception(
                    "vm %s could not be restored; its record stays in %s",
                    name,
                    self.state.directory,
                )

    async def _restore(self, store: StateStore, record: dict[str, Any]) -> None:
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
        self.register(vm)
        if record.get("paused"):
            await self.pause(vm)
        if record.get("workload"):
            await self.start_workload(vm, **record["workload"])
        self.persist(vm)
        if record.get("clean"):
            log.info("vm %s restored (pending bits as saved)", name)
        else:
            log.info("vm %s restored (every page dirty: the daemon was not stopped cleanly)", name)

    async def save_all(self, store: StateStore) -> None:
        """Graceful stop: pause, harvest into every consumer, save their bits, keep the RAM."""
        for vm in list(self.vms.values()):
            workload = running_workload(vm)
            await asyncio.to_thread(vm.backend.pause)  # nothing stores from here on ...
            await asyncio.to_thread(vm.backend.stop_workload)
            await asyncio.to_thread(vm.flush)  # ... so this harvest is the last word
            for (consumer, slot), bits in vm.pending_snapshot().items():
                store.save_pending(vm.name, consumer, slot, bits)
            store.save_vm(vm_record(vm, clean=True, workload=workload))
            await asyncio.to_thread(vm.backend.close, True)
            log.info("vm %s saved: its consumers' pending bits wait for the next start", vm.name)
        self.vms.clear()

    # --- helpers ------------------------------------------------------------------------------
    def vm(self, name: str) -> VmState:
        found = self.vms.get(name)
        if found is None:
            raise DeviceNotFound(f"no VM named '{name}'")
        return found

    async def _call(self, vm: VmState, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking backend work in a thread; map kvmshim errors for the client."""
        try:
            return await asyncio.to_thread(fn, *args)
        except KvmError as exc:
            raise from_kvm(exc, vm.name) from None
        except KvmShimError as exc:
            raise GenericError(f"vm '{vm.name}': {exc}") from None

    # --- VMs ----------------------------------------------------------------------------------
    async def create_vm(
        self, name: str, memslots: list[dict[str, Any]], backend: str, esop: bool
    ) -> None:
        if name in self.vms or name in self._creating:
            raise GenericError(f"a VM named '{name}' already exists")
        self._creating.add(name)
        try:
            os.makedirs(self.runtime_dir, mode=0o750, exist_ok=True)
            try:
                created = await asyncio.to_thread(
                    create_backend, backend, name, self.runtime_dir, esop
                )
            except (KvmShimError, OSError) as exc:
                raise GenericError(
                    f"cannot create vm '{name}' with backend '{backend}': {exc}"
                ) from None
            vm = VmState(name, created)
            try:
                for spec in memslots:
                    await self.set_memslot(vm, **spec)
            except BaseException:
                await asyncio.to_thread(created.close)
                raise
            self.register(vm)
            self.persist(vm)
            log.info("vm %s created (%s backend, %d memslots)", name, created.kind, len(memslots))
        finally:
            self._creating.discard(name)

    def _vcpu_failure_reporter(self, name: str) -> Callable[[int, BaseException], None]:
        """A dead vCPU thread is announced as an event (from its thread, via the loop)."""
        loop = asyncio.get_running_loop()

        def report(vcpu: int, exc: BaseException) -> None:
            data = {"vm": name, "vcpu": vcpu, "error": str(exc) or type(exc).__name__}
            loop.call_soon_threadsafe(self.emit_event, "VCPU_FAILED", data)

        return report

    async def remove_vm(self, name: str) -> None:
        vm = self.vm(name)
        del self.vms[name]
        if self.state is not None:
            self.state.delete_vm(name)
        await asyncio.to_thread(vm.backend.close)
        log.info("vm %s removed", name)

    def query_vms(self) -> list[dict[str, Any]]:
        out = []
        for vm in self.vms.values():
            entry = vm.describe()
            backend = vm.backend
            entry["backend"] = backend.kind
            entry["capabilities"] = backend.capabilities()
            entry["paused"] = backend.paused
            entry["generation"] = backend.generation
            entry["ram-path"] = backend.ram_path
            workload = backend.workload_status()
            if workload is not None:
                entry["workload"] = {
                    "running": workload.running,
                    "pages-stored": workload.pages_stored,
                    "pages-per-second": workload.spec.pages_per_second,
                    "vcpus": workload.spec.vcpus,
                    "failed": None if workload.failure is None else repr(workload.failure),
                }
            out.append(entry)
        return out

    def memslot(self, vm: VmState, slot: int, as_id: int) -> Memslot | None:
        """The memslot a command names, or None (the harvest will say why: ENOENT, EINVAL)."""
        return vm.backend.memslots.get(make_slot_id(as_id, slot))

    async def set_memslot(
        self,
        vm: VmState,
        slot: int,
        as_id: int,
        guest_phys_addr: int,
        size: int,
        log_dirty_pages: bool,
    ) -> None:
        flags = KVM_MEM_LOG_DIRTY_PAGES if log_dirty_pages else 0
        change = await self._call(
            vm,
            vm.backend.set_user_memory_region,
            make_slot_id(as_id, slot),
            flags,
            guest_phys_addr,
            size,
        )
        vm.apply_memslot_change(change)
        self.persist(vm)

    def add_consumer(
        self, vm: VmState, name: str, manual_protect: bool, initially_set: bool
    ) -> None:
        vm.add_consumer(name, manual_protect, initially_set)
        self.persist(vm)

    def remove_consumer(self, vm: VmState, name: str) -> None:
        vm.remove_consumer(name)
        self.persist(vm)

    # --- dirty logs ---------------------------------------------------------------------------
    async def get_dirty_log(self, vm: VmState, slot: int, as_id: int, consumer: str) -> Taken:
        """Harvest for one consumer. If the caller is cancelled (its client was dropped, the
        daemon is stopping) the harvest thread still runs to the end and takes the bits; they
        are put back before the cancellation goes on, so a save that follows has them."""
        harvest = asyncio.ensure_future(
            self._call(vm, vm.harvest, make_slot_id(as_id, slot), consumer)
        )
        try:
            return await asyncio.shield(harvest)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # a failed harvest took nothing
                vm.put_back(await harvest)
            raise

    async def clear_dirty_log(
        self,
        vm: VmState,
        slot: int,
        as_id: int,
        consumer: str,
        first_page: int,
        num_pages: int,
        bitmap: bytes,
    ) -> None:
        await self._call(
            vm, vm.clear, make_slot_id(as_id, slot), consumer, first_page, num_pages, bitmap
        )

    async def io_mark(self, vm: VmState, ranges: list[tuple[int, int]]) -> int:
        return await self._call(vm, vm.io_mark_ranges, ranges)

    # --- simulation ----------------------------------------------------------------------------
    async def write(self, vm: VmState, gpa: int, data: bytes, path: str, report: bool) -> None:
        gfns = await self._call(vm, vm.backend.write, gpa, data, WritePath(path))
        if path != WritePath.GUEST and report:
            await self._call(vm, vm.io_mark_gfns, gfns)

    async def write_pages(
        self, vm: VmState, gfns: list[int], value: int, path: str, report: bool
    ) -> None:
        frames = np.asarray(gfns, dtype=np.int64)
        await self._call(vm, vm.backend.write_pages, frames, value, WritePath(path))
        if path != WritePath.GUEST and report:
            await self._call(vm, vm.io_mark_gfns, frames)

    async def read(self, vm: VmState, gpa: int, length: int, path: str) -> bytes:
        return await self._call(vm, vm.backend.read, gpa, length, ReadPath(path))

    async def set_storage_key(self, vm: VmState, gpa: int, key: int) -> None:
        await self._call(vm, vm.backend.set_storage_key, gpa, key)

    async def start_workload(self, vm: VmState, **spec: Any) -> None:
        spec["pattern"] = Pattern(spec["pattern"])
        try:
            workload = WorkloadSpec(**spec)
        except (TypeError, ValueError) as exc:
            raise GenericError(str(exc)) from None
        await self._call(vm, vm.backend.start_workload, workload)
        self.persist(vm)

    async def stop_workload(self, vm: VmState) -> None:
        await self._call(vm, vm.backend.stop_workload)
        self.persist(vm)

    async def pause(self, vm: VmState) -> None:
        await self._call(vm, vm.backend.pause)
        vm.user_paused = True
        self.persist(vm)
        self.emit_event("STOP", {"vm": vm.name})

    async def resume(self, vm: VmState) -> None:
        await self._call(vm, vm.backend.resume)
        vm.user_paused = False
        self.persist(vm)
        self.emit_event("RESUME", {"vm": vm.name})

    async def shutdown(self) -> None:
        """Graceful stop: with a state directory the VMs are saved, else removed."""
        if self.state is not None:
            await self.save_all(self.state)
            return
        for name in list(self.vms):
            await self.remove_vm(name)
