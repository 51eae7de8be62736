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
import functools
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from dirtylogd.errors import DeviceNotFound, GenericError, QmpError, oserror_text
from dirtylogd.service import limits
from dirtylogd.service.records import (
    RecordError,
    UnavailableVm,
    parse_record,
    record_with,
    vm_record,
)
from dirtylogd.service.revive import (
    give_back_keys,
    give_back_pending,
    revive,
    save_stopped,
    write_stopped,
)
from dirtylogd.service.store import StateStore
from dirtylogd.service.vm import DEFAULT_CONSUMER, DEFAULT_MAX_CONSUMERS, Taken, VmState
from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES, make_slot_id
from kvmshim.backends import WorkloadSpec, create_backend
from kvmshim.backends.base import Pattern, ReadPath, WritePath
from kvmshim.errors import KvmError, KvmShimError
from kvmshim.memslot import Memslot, MemslotChange

log = logging.getLogger(__name__)
T = TypeVar("T")
# Where events go: (name, data), called on the event loop's thread.
EventSink = Callable[[str, dict[str, Any]], None]


def from_kvm(exc: KvmError, vm: str) -> QmpError:
    """A kernel-contract failure as the client sees it: the errno stays in the text."""
    return GenericError(exc.describe(vm))


def _no_answer(taken: Taken) -> None:
    """The answer of a GET whose caller builds its own."""


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
        self.unavailable: dict[str, UnavailableVm] = {}
        self.state_write_failures: Counter[str] = Counter()  # by VM: records not written
        self._creating: set[str] = set()
        self._users: Counter[str] = Counter()  # calls in flight per VM name
        self._idle: dict[str, asyncio.Event] = {}
        self.emit_event = events
        self._store_thread: ThreadPoolExecutor | None = None  # made on first use

    # --- the state store ------------------------------------------------------------------------
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

    async def _record(self, vm: VmState, record: dict[str, Any] | None = None) -> None:
        """Write ``record`` (default: the VM as it is now) or raise the QMP error that says why
        not. Commands that create or remove state call this to be all or nothing."""
        if self.state is None or self.vms.get(vm.name) is not vm:
            return
        try:
            await self._store(self.state.save_vm, record or vm_record(vm))
        except OSError as exc:
            self.state_write_failures[vm.name] += 1
            raise GenericError(
                f"cannot record vm '{vm.name}' in {self.state.directory}: {oserror_text(exc)}; "
                "nothing was changed"
            ) from None

    async def _record_or_mark(self, vm: VmState) -> None:
        """For commands that must take effect whatever the disk says (stop, cont): a record
        that cannot be written is logged and counted, and marks the VM's record stale, so the
        next start reports every page dirty."""
        try:
            await self.persist(vm)
        except OSError as exc:
            vm.record_stale = True
            self.state_write_failures[vm.name] += 1
            log.error(
                "vm %s: its record could not be written (%s); a restart will report "
                "every page dirty",
                vm.name,
                oserror_text(exc),
            )

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

    # --- restore policy -------------------------------------------------------------------------
    async def restore(self) -> None:
        """Bring back every VM the state store has a record of (before serving clients).

        One policy for every odd case, and no case deletes anything:
        * a record that is not what the daemon writes (unreadable, not an object, wrong field
          types, another version, a name other than its file's) is logged and listed by
          query-vms as "unrestorable"; only vm-remove works on it, and removes it;
        * a record whose RAM file is gone (a reboot emptied the tmpfs) is listed as "ram-lost",
          its saved bits kept until vm-remove;
        * a record that fails to restore for any other reason is "unrestorable" likewise;
        * unexpected entries among a VM's saved bits make the consumers they may belong to
          start all dirty (see :mod:`dirtylogd.service.store`); a RAM file no record names is
          left where it is, with a warning.
        """
        if self.state is None:
            return
        store = self.state
        for leftover in await self._store(store.leftovers):
            log.warning(
                "ignoring %s in %s: a write that never completed", leftover, store.directory
            )
        named: set[str] = set()
        for stored in await self._store(store.load_all):
            try:
                record = parse_record(stored)
            except RecordError as exc:
                self._unavailable(stored.name, "unrestorable", str(exc), stored.path)
                continue
            except Exception as exc:  # a check that missed a shape must not stop the daemon
                log.exception("checking the record of %s", stored.name)
                self._unavailable(
                    stored.name, "unrestorable", f"not understood: {exc!r}", stored.path
                )
                continue
            named.add(os.path.realpath(record["ram-path"]))
            if not os.path.exists(record["ram-path"]):
                why = f"its RAM file {record['ram-path']} is gone (a reboot empties /run)"
                self._unavailable(stored.name, "ram-lost", why, stored.path)
                continue
            try:
                await self._restore(store, record)
            except Exception as exc:  # one broken record must not keep the others from serving
                log.debug("restoring %s", stored.name, exc_info=True)
                self._unavailable(stored.name, "unrestorable", f"{exc}", stored.path)
        self._warn_orphans(named)

    def _unavailable(self, name: str, status: str, reason: str, path: str) -> None:
        log.error(
            "vm %s cannot be restored (%s): %s; its record stays in %s until vm-remove",
            name,
            status,
            reason,
            path,
        )
        self.unavailable[name] = UnavailableVm(name, status, reason, path)

    def _warn_orphans(self, named: set[str]) -> None:
        with contextlib.suppress(OSError):
            for entry in sorted(os.listdir(self.runtime_dir)):
                path = os.path.realpath(os.path.join(self.runtime_dir, entry))
                if entry.endswith(".ram") and path not in named:
                    log.warning(
                        "%s belongs to no saved VM; left in place (it may hold a "
                        "guest's memory: remove it by hand if not)",
                        path,
                    )

    async def _restore(self, store: StateStore, record: dict[str, Any]) -> None:
        name = record["name"]
        vm = await revive(record)
        extra = len(record["consumers"]) - self.max_consumers
        if extra > 0:  # never dropped (nothing lost); only new ones are refused
            log.warning(
                "vm %s: %d consumers past --max-consumers %d were restored",
                name,
                extra,
                self.max_consumers,
            )
        # Always consumed: never reused by a later restart.
        saved = await self._store(store.take_pending, name)
        give_back_pending(vm, saved, clean=record["clean"])
        keys = await self._store(store.take_keys, name)
        await asyncio.to_thread(give_back_keys, vm, keys, record["clean"])
        self.register(vm)
        if record["paused"]:
            await self.pause(vm)
        if record.get("workload"):
            try:
                await self.start_workload(vm, **record["workload"])
            except QmpError as exc:
                log.error("vm %s: its workload was not restarted: %s", name, exc.desc)
        await self._record_or_mark(vm)
        if record["clean"]:
            log.info("vm %s restored (pending bits as saved)", name)
        else:
            log.info("vm %s restored (every page dirty: the daemon was not stopped cleanly)", name)

    async def save_all(self, store: StateStore) -> None:
        """Graceful stop: pause, harvest into every consumer, save their bits, keep the RAM."""
        for vm in list(self.vms.values()):
            await vm.calc.stop()  # never saved: its consumer goes before the bits are taken
            record = await save_stopped(vm, clean=not vm.record_stale)
            pending = await asyncio.to_thread(vm.pending_snapshot)
            keys = await asyncio.to_thread(vm.backend.saved_storage_keys)
            try:
                await self._store(write_stopped, store, pending, record, keys)
                how = "its consumers' pending bits wait for the next start"
                if vm.record_stale:
                    how = "marked unclean (a record write had failed): every page dirty"
                log.info("vm %s saved: %s", vm.name, how)
            except OSError as exc:
                log.error(
                    "vm %s could not be saved (%s): the next start reports every page dirty",
                    vm.name,
                    oserror_text(exc),
                )
            await asyncio.to_thread(vm.backend.close, True)
        self.vms.clear()

    # --- helpers ------------------------------------------------------------------------------
    def vm(self, name: str) -> VmState:
        found = self.vms.get(name)
        if found is not None and not found.removed:
            return found
        gone = self.unavailable.get(name)
        if gone is not None:
            raise GenericError(
                f"vm '{name}' cannot be used: {gone.reason}; only query-vms and vm-remove "
                "work on it"
            )
        raise DeviceNotFound(f"no VM named '{name}'")

    def _live(self, vm: VmState) -> None:
        """A VM looked up before a vm-remove began is gone for every later step."""
        if vm.removed:
            raise DeviceNotFound(f"no VM named '{vm.name}' (it was removed)")

    async def _call(self, vm: VmState, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking backend work in a thread; map kvmshim errors for the client.

        Counted as in flight: vm-remove waits for every call that started before it, and
        refuses every call after it, so no call ever meets a closed backend."""
        self._live(vm)
        self._users[vm.name] += 1
        try:
            return await asyncio.to_thread(fn, *args)
        except KvmError as exc:
            raise from_kvm(exc, vm.name) from None
        except KvmShimError as exc:
            raise GenericError(f"vm '{vm.name}': {exc}") from None
        finally:
            self._users[vm.name] -= 1
            if self._users[vm.name] == 0:
                del self._users[vm.name]
                idle = self._idle.pop(vm.name, None)
                if idle is not None:
                    idle.set()

    async def _drain(self, vm: VmState) -> None:
        """Wait until no call on ``vm`` is in flight (new ones are refused: ``vm.removed``)."""
        if self._users[vm.name]:
            idle = self._idle.setdefault(vm.name, asyncio.Event())
            await idle.wait()

    # --- VMs ----------------------------------------------------------------------------------
    async def create_vm(
        self,
        name: str,
        memslots: list[dict[str, Any]],
        backend: str,
        esop: bool,
        kernel: str | None = None,
        hugepages: bool = False,
    ) -> None:
        if name in self.vms or name in self._creating:
            raise GenericError(f"a VM named '{name}' already exists")
        if name in self.unavailable:
            raise GenericError(
                f"a VM named '{name}' already exists but cannot be used "
                f"({self.unavailable[name].reason}): vm-remove it first"
            )
        self._creating.add(name)
        try:
            os.makedirs(self.runtime_dir, mode=0o750, exist_ok=True)
            try:
                created = await asyncio.to_thread(
                    functools.partial(
                        create_backend,
                        backend,
                        name,
                        self.runtime_dir,
                        esop=esop,
                        kernel=kernel,
                        hugepages=hugepages,
                    )
                )
            except (KvmShimError, OSError) as exc:
                raise GenericError(
                    f"cannot create vm '{name}' with backend '{backend}': {exc}"
                ) from None
            vm = VmState(name, created)
            try:
                for spec in memslots:
                    await self._set_memslot(vm, **spec)
                self.register(vm)
            except BaseException:
                await asyncio.to_thread(created.close)
                raise
            try:
                await self._record(vm)  # all or nothing: no record, no VM
            except QmpError:  # (a cancelled caller leaves both: the write still lands)
                del self.vms[name]
                await asyncio.to_thread(created.close)
                raise
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
        """All or nothing: the record and saved bits go first; if they cannot, the VM stays.

        Calls already running on the VM finish first; calls after this began are refused."""
        if name not in self.vms and name in self.unavailable:
            await self._delete_record(name)
            del self.unavailable[name]
            log.info("vm %s removed (it was %s)", name, "unavailable")
            return
        vm = self.vm(name)
        vm.removed = True
        try:
            await vm.calc.stop()  # its harvests and page reads are done; its consumer gone
            await self._drain(vm)
            await self._delete_record(name)
        except BaseException:
            vm.removed = False
            raise
        del self.vms[name]
        await asyncio.to_thread(vm.backend.close)
        log.info("vm %s removed", name)

    async def _delete_record(self, name: str) -> None:
        if self.state is None:
            return
        try:
            await self._store(self.state.delete_vm, name)
        except OSError as exc:
            raise GenericError(
                f"cannot remove the record of vm '{name}' from {self.state.directory}: "
                f"{oserror_text(exc)}; the VM stays"
            ) from None

    async def query_vms(self) -> list[dict[str, Any]]:
        """Every VM: those served ("status": "ok"), then those only listed (see restore)."""
        vms = [vm for vm in self.vms.values() if not vm.removed]
        # describe() takes each VM's lock and counts every pending bitmap: a worker's job.
        described = await asyncio.to_thread(lambda: [vm.describe() for vm in vms])
        out = []
        for vm, entry in zip(vms, described, strict=True):
            entry["status"] = "ok"
            backend = vm.backend
            entry["backend"] = backend.kind
            entry["capabilities"] = backend.capabilities()
            options = backend.options()
            if options.get("kernel") is not None:
                entry["kernel"] = options["kernel"]
                entry["hugepages"] = options.get("hugepages", False)
            entry["paused"] = backend.paused
            entry["generation"] = backend.generation
            entry["ram-path"] = backend.ram_path
            entry.update(limits.describe(vm))
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
        return out + [gone.describe() for gone in self.unavailable.values()]

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
        """KVM_SET_USER_MEMORY_REGION and its record, all or nothing.

        A change that cannot be undone — deleting a slot releases its memory, turning logging
        off drops its log — is recorded first; any other is made, recorded, and undone if the
        record cannot be written."""
        self._live(vm)
        slot_id = make_slot_id(as_id, slot)
        old = vm.backend.memslots.get(slot_id)
        ahead = old is not None and (
            size == 0
            or (
                old.log_dirty_pages
                and not log_dirty_pages
                and (guest_phys_addr, size) == (old.guest_phys_addr, old.memory_size)
            )
        )
        if ahead:
            await self._record(vm, record_with(vm, slot, as_id, size, log_dirty_pages))
        try:
            change = await self._set_memslot(
                vm, slot, as_id, guest_phys_addr, size, log_dirty_pages
            )
        except BaseException:
            if ahead:  # the record said what may not have happened: write what did
                await self._record_or_mark(vm)
            raise
        if ahead:
            return
        try:
            await self._record(vm)
        except QmpError:
            await self._undo_memslot(vm, change)
            raise

    async def _set_memslot(
        self,
        vm: VmState,
        slot: int,
        as_id: int,
        guest_phys_addr: int,
        size: int,
        log_dirty_pages: bool,
    ) -> MemslotChange:
        flags = KVM_MEM_LOG_DIRTY_PAGES if log_dirty_pages else 0
        slot_id = make_slot_id(as_id, slot)
        job = asyncio.ensure_future(
            self._call(vm, vm.backend.set_user_memory_region, slot_id, flags, guest_phys_addr, size)
        )
        try:
            change = await asyncio.shield(job)
        except asyncio.CancelledError:
            # The backend's thread goes on and may change the slot: the VM's view follows it,
            # or a client that went away would leave the two disagreeing.
            with contextlib.suppress(Exception):
                vm.apply_memslot_change(await job)
            raise
        vm.apply_memslot_change(change)
        return change

    async def _undo_memslot(self, vm: VmState, change: MemslotChange) -> None:
        """Put a created, moved or newly logged slot back as it was (its record failed)."""
        new, old = change.new, change.old
        if new is None:
            return
        if old is None:
            await self._set_memslot(vm, new.id, new.as_id, new.guest_phys_addr, 0, False)
        else:
            await self._set_memslot(
                vm, old.id, old.as_id, old.guest_phys_addr, old.memory_size, old.log_dirty_pages
            )

    async def add_consumer(
        self, vm: VmState, name: str, manual_protect: bool, initially_set: bool
    ) -> None:
        """A new consumer and its record, or neither."""
        self._live(vm)
        vm.add_consumer(name, manual_protect, initially_set, self.max_consumers)
        try:
            await self._record(vm)
        except QmpError:  # (a cancelled caller keeps both: the write still lands)
            vm.remove_consumer(name)
            raise

    async def remove_consumer(self, vm: VmState, name: str) -> None:
        """The record without the consumer first: its pending bits go only once that holds."""
        self._live(vm)
        if name != DEFAULT_CONSUMER:
            vm.consumer(name)  # DeviceNotFound before anything is written
            record = vm_record(vm)
            record["consumers"] = [c for c in record["consumers"] if c["name"] != name]
            await self._record(vm, record)
        vm.remove_consumer(name)

    async def dirty_rate(self, vm: VmState) -> dict[str, object]:
        return await asyncio.to_thread(vm.dirty_rate)

    # --- dirty logs ---------------------------------------------------------------------------
    async def get_dirty_log(self, vm: VmState, slot: int, as_id: int, consumer: str) -> Taken:
        """Harvest for one consumer (see :meth:`get_dirty_log_answered`)."""
        taken, _ = await self.get_dirty_log_answered(vm, slot, as_id, consumer, _no_answer)
        return taken

    async def get_dirty_log_answered(
        self, vm: VmState, slot: int, as_id: int, consumer: str, answer: Callable[[Taken], T]
    ) -> tuple[Taken, T]:
        """Harvest for one consumer and build the answer from it in the same worker thread:
        one hop off the loop per GET, not two. An answer that raises puts the bits back.

        If the caller is cancelled (its client was dropped, the daemon is stopping) the
        thread still runs to the end and takes the bits; they are put back before the
        cancellation goes on, so a save that follows has them."""
        slot_id = make_slot_id(as_id, slot)
        # Taken on the loop as the request arrives, not when a worker thread gets to it: any
        # harvest that begins after this may answer it (VmState.harvest).
        ticket = vm.ticket(slot_id)

        def harvest_and_answer() -> tuple[Taken, T]:
            taken = vm.harvest(slot_id, consumer, ticket)
            try:
                return taken, answer(taken)
            except BaseException:
                vm.put_back(taken)
                raise

        harvest = asyncio.ensure_future(self._call(vm, harvest_and_answer))
        try:
            return await asyncio.shield(harvest)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # a failed harvest took nothing
                vm.put_back((await harvest)[0])
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

    async def storage_keys(self, vm: VmState, start_gfn: int, count: int) -> np.ndarray | None:
        """KVM_S390_GET_SKEYS in a worker (up to a million frames); None: the guest uses none."""
        return await self._call(vm, vm.backend.get_storage_keys, start_gfn, count)

    async def start_workload(self, vm: VmState, **spec: Any) -> None:
        try:
            spec["pattern"] = Pattern(spec["pattern"])
            workload = WorkloadSpec(**spec)
        except (TypeError, ValueError) as exc:
            raise GenericError(str(exc)) from None
        await self._call(vm, vm.backend.start_workload, workload)
        await self._record_or_mark(vm)

    async def stop_workload(self, vm: VmState) -> None:
        await self._call(vm, vm.backend.stop_workload)
        await self._record_or_mark(vm)

    async def pause(self, vm: VmState) -> None:
        """stop: takes effect and is announced whatever the disk says (a migration's
        switch-over must not wait for it); see :meth:`_record_or_mark`."""
        await self._call(vm, vm.backend.pause)
        vm.user_paused = True
        self.emit_event("STOP", {"vm": vm.name})
        await self._record_or_mark(vm)

    async def resume(self, vm: VmState) -> None:
        await self._call(vm, vm.backend.resume)
        vm.user_paused = False
        self.emit_event("RESUME", {"vm": vm.name})
        await self._record_or_mark(vm)

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
