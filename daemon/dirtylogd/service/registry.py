"""The service: the registry of VMs and the async face of everything commands ask for.

Blocking work — harvests, memslot changes, stores, vCPU control, reads of a VM's consumers
and rates — runs in worker threads (``asyncio.to_thread``) so one large VM never stalls the
socket of another. Kernel-contract failures become GenericError with the errno in the text;
unknown names become DeviceNotFound.

It also drives the state store: on a graceful stop every VM is saved with its consumers'
pending bits; on start every saved VM comes back (all dirty if the daemon was killed). Every
store call (write + fsync, delete, read) runs on the store's one thread, first in first out:
records are built on the loop when the state changes and written in that order, and a VM's
deletion comes after its last save.
Events (STOP, RESUME, VCPU_FAILED) go to the sink it is given; it does not know who listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from dirtylogd.errors import DeviceNotFound, GenericError, QmpError
from dirtylogd.service.records import running_workload, vm_record
from dirtylogd.service.store import StateStore
from dirtylogd.service.vm import DEFAULT_MAX_CONSUMERS, Taken, VmState
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
        max_consumers: int = DEFAULT_MAX_CONSUMERS,
    ) -> None:
        self.runtime_dir = runtime_dir
        self.max_consumers = max_consumers  # per VM, besides 'default'; only consumer-add checks
        self.state = state
        self.vms: dict[str, VmState] = {}
        self._creating: set[str] = set()
        self.emit_event = events
        self._store_thread: ThreadPoolExecutor | None = None  # made on first use

    # --- persistence ----------------------------------------------------------------------------
    def register(self, vm: VmState) -> None:
        vm.backend.io_reporter = vm.io_mark_gfns
        vm.backend.on_vcpu_failure = self._vcpu_failure_reporter(vm.name)
        self.vms[vm.name] = vm

    def persist(self, vm: VmState) -> asyncio.Future[None]:
        """Record a registered VM's definition (not clean: a crash from here on is unclean).

        The record is built now, on the loop, so it is the state as of the change just made;
        the write and fsync happen on the store's thread, after every earlier one. Await the
        result to know the record is on disk (and to hear if it could not be written)."""
        if self.state is None or self.vms.get(vm.name) is not vm:
            return _done()
        return self._store(self.state.save_vm, vm_record(vm))

    def _store(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run a state-store call on the store's one thread, after every call queued before.

        A caller cancelled while it waits (its client went away) stops waiting; the call still
        runs, and in its turn: a queued write is never dropped or overtaken."""
        if self._store_thread is None:
            self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="dirtylogd-state")
        done = asyncio.wrap_future(self._store_thread.submit(fn, *args))
        done.add_done_callback(_log_store_failure)
        return asyncio.shield(done)

    async def _close_store(self) -> None:
        """Wait for every queued store call (some nobody awaits), then end the thread."""
        thread, self._store_thread = self._store_thread, None
        if thread is not None:
            await asyncio.to_thread(thread.shutdown)

    async def restore(self) -> None:
        """Bring back every VM the state store has a record of (before serving clients)."""
        if self.state is None:
            return
        for record in await self._store(self.state.load_all):
            name = record.get("name", "?")
            if not os.path.exists(record.get("ram-path", "")):
                log.error(
                    "vm %s cannot be restored: its RAM file %s is gone",
                    name,
                    record.get("ram-path"),
                )
                await self._store(self.state.delete_vm, name)
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
        # Always consumed: never reused by a later restart.
        saved = await self._store(store.take_pending, name)
        vm.restore_pending(saved if record.get("clean") else None)
        self.register(vm)
        if record.get("paused"):
            await self.pause(vm)
        if record.get("workload"):
            await self.start_workload(vm, **record["workload"])
        await self.persist(vm)
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
            pending = await asyncio.to_thread(vm.pending_snapshot)
            record = vm_record(vm, clean=True, workload=workload)
            await self._store(_save_stopped, store, pending, record)
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
            await self.persist(vm)
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
        deleted = _done() if self.state is None else self._store(self.state.delete_vm, name)
        await asyncio.to_thread(vm.backend.close)
        await deleted
        log.info("vm %s removed", name)

    async def query_vms(self) -> list[dict[str, Any]]:
        vms = list(self.vms.values())
        # describe() takes each VM's lock and counts every pending bitmap: a worker's job.
        described = await asyncio.to_thread(lambda: [vm.describe() for vm in vms])
        out = []
        for vm, entry in zip(vms, described, strict=True):
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
        await self.persist(vm)

    def add_consumer(
        self, vm: VmState, name: str, manual_protect: bool, initially_set: bool
    ) -> asyncio.Future[None]:
        """Add a consumer at once (a caller that does not await, like --demo, sees it next
        line); the result is done when the VM's record with it is on disk."""
        vm.add_consumer(name, manual_protect, initially_set, self.max_consumers)
        return self.persist(vm)

    def remove_consumer(self, vm: VmState, name: str) -> asyncio.Future[None]:
        """Remove a consumer at once; the result is done when the record says so on disk."""
        vm.remove_consumer(name)
        return self.persist(vm)

    async def dirty_rate(self, vm: VmState) -> dict[str, object]:
        return await asyncio.to_thread(vm.dirty_rate)

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

    async def io_mark(self, vm: VmState, ranges: Sequence[Mapping[str, int]]) -> int:
        """Record reported I/O writes; the up to 65,536 ranges are unpacked in the worker."""

        def mark() -> int:
            return vm.io_mark_ranges([(r["guest_phys_addr"], r["length"]) for r in ranges])

        return await self._call(vm, mark)

    # --- simulation ----------------------------------------------------------------------------
    async def write(self, vm: VmState, gpa: int, data: bytes, path: str, report: bool) -> None:
        gfns = await self._call(vm, vm.backend.write, gpa, data, WritePath(path))
        if path != WritePath.GUEST and report:
            await self._call(vm, vm.io_mark_gfns, gfns)

    async def write_pages(
        self, vm: VmState, gfns: list[int], value: int, path: str, report: bool
    ) -> None:
        def store() -> np.ndarray:
            frames = np.asarray(gfns, dtype=np.int64)  # 131,072 gfns: milliseconds, not here
            vm.backend.write_pages(frames, value, WritePath(path))
            return frames

        frames = await self._call(vm, store)
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
        await self.persist(vm)

    async def stop_workload(self, vm: VmState) -> None:
        await self._call(vm, vm.backend.stop_workload)
        await self.persist(vm)

    async def pause(self, vm: VmState) -> None:
        await self._call(vm, vm.backend.pause)
        vm.user_paused = True
        await self.persist(vm)
        self.emit_event("STOP", {"vm": vm.name})

    async def resume(self, vm: VmState) -> None:
        await self._call(vm, vm.backend.resume)
        vm.user_paused = False
        await self.persist(vm)
        self.emit_event("RESUME", {"vm": vm.name})

    async def shutdown(self) -> None:
        """Graceful stop: with a state directory the VMs are saved, else removed. Either way
        every queued store call is done before this returns."""
        try:
            if self.state is not None:
                await self.save_all(self.state)
                return
            for name in list(self.vms):
                await self.remove_vm(name)
        finally:
            await self._close_store()


def _done() -> asyncio.Future[None]:
    """An awaitable that is already done: nothing to write."""
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


def _log_store_failure(done: asyncio.Future[Any]) -> None:
    """A store call that failed is logged even if nobody awaits it (or its awaiter left)."""
    if not done.cancelled() and done.exception() is not None:
        log.error("the state store failed: %r", done.exception())


def _save_stopped(
    store: StateStore, pending: dict[tuple[str, int], bytes], record: dict[str, Any]
) -> None:
    """A stopped VM's consumers' bits, then its clean record: clean only once the bits are in."""
    for (consumer, slot), bits in pending.items():
        store.save_pending(record["name"], consumer, slot, bits)
    store.save_vm(record)
