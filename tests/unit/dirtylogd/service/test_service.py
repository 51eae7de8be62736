"""The service's async face: cancelled harvests, state writes, and what stays off the loop."""

import asyncio
import json
import threading

import pytest

from dirtylogd.service.registry import Service
from dirtylogd.service.store import StateStore

MiB = 1 << 20
SLOT = {"slot": 0, "as_id": 0, "guest_phys_addr": 0, "size": 64 * MiB, "log_dirty_pages": True}


async def cancelled_get_keeps_the_bits(tmp_path) -> list[int]:
    service = Service(str(tmp_path / "vms"))
    await service.create_vm("v", [SLOT], "softmmu", True)
    vm = service.vm("v")
    await service.add_consumer(vm, "c", manual_protect=False, initially_set=False)
    await service.write_pages(vm, [3, 9000], 1, "guest", True)
    get = asyncio.ensure_future(service.get_dirty_log(vm, 0, 0, "c"))
    await asyncio.sleep(0)  # the harvest thread has started
    get.cancel()
    try:
        await get
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the get was not cancelled")
    # Nothing awaited in between: the bits are back before the cancellation reached us.
    pending = vm.consumer("c").pending_pages()
    again = (await service.get_dirty_log(vm, 0, 0, "c")).bitmap.pages().tolist()
    await service.shutdown()
    assert pending == 2
    return again


def test_a_get_cancelled_mid_harvest_gives_its_bits_back(tmp_path):
    assert asyncio.run(cancelled_get_keeps_the_bits(tmp_path)) == [3, 9000]


class RecordingStore(StateStore):
    """Writes as StateStore does, noting the thread and the consumers of every record; the
    first write of a record with consumers waits (up to 2 s) for the next one to start."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.writes: list[tuple[int, list[str]]] = []
        self.next_started = threading.Event()
        self.held = False

    def save_vm(self, record):
        consumers = [c["name"] for c in record["consumers"]]
        if consumers and not self.held:
            self.held = True
            self.next_started.wait(2)
        else:
            self.next_started.set()
        super().save_vm(record)
        self.writes.append((threading.get_ident(), consumers))


def test_state_writes_run_off_the_loop_in_the_order_of_the_changes(tmp_path):
    store = RecordingStore(str(tmp_path / "state"))

    async def main():
        service = Service(str(tmp_path / "vms"), store)
        await service.create_vm("v", [SLOT], "softmmu", True)
        vm = service.vm("v")
        # Two quick changes; the first write is slow. Written in parallel, the second would
        # land first and the first would then overwrite it with the older record.
        first = service.add_consumer(vm, "a", manual_protect=False, initially_set=True)
        second = service.add_consumer(vm, "b", manual_protect=False, initially_set=True)
        await asyncio.gather(first, second)
        on_disk = json.loads((tmp_path / "state" / "vms" / "v.json").read_text())
        await service.shutdown()
        return threading.get_ident(), on_disk

    loop_thread, on_disk = asyncio.run(main())
    assert [c["name"] for c in on_disk["consumers"]] == ["a", "b"]
    assert [consumers for _, consumers in store.writes[:3]] == [[], ["a"], ["a", "b"]]
    assert loop_thread not in {thread for thread, _ in store.writes}


def test_a_write_whose_caller_was_cancelled_still_happens_in_turn(tmp_path):
    store = RecordingStore(str(tmp_path / "state"))

    async def main():
        service = Service(str(tmp_path / "vms"), store)
        await service.create_vm("v", [SLOT], "softmmu", True)
        vm = service.vm("v")
        store.held = True  # no waiting in this test
        store.next_started.clear()
        waiting = asyncio.ensure_future(service.add_consumer(vm, "a", False, True))
        await asyncio.sleep(0)
        waiting.cancel()  # the client went away before its record was on disk
        await service.remove_consumer(vm, "a")
        await service.shutdown()  # a graceful stop writes the clean record last

    asyncio.run(main())
    assert [consumers for _, consumers in store.writes] == [[], ["a"], [], []]


def test_shutdown_waits_for_writes_nobody_awaits(tmp_path):
    store = StateStore(str(tmp_path / "state"))

    async def main():
        service = Service(str(tmp_path / "vms"), store)
        await service.create_vm("v", [SLOT], "softmmu", True)
        adding = asyncio.ensure_future(
            service.add_consumer(service.vm("v"), "monitor", False, False)
        )
        await asyncio.sleep(0)  # it has started; nobody awaits its write
        del adding
        await service.shutdown()

    asyncio.run(main())
    record = json.loads((tmp_path / "state" / "vms" / "v.json").read_text())
    assert record["clean"] and record["consumers"][0]["name"] == "monitor"
    assert not [t for t in threading.enumerate() if t.name.startswith("dirtylogd-state")]


@pytest.mark.parametrize("query", ["query_vms", "dirty_rate"])
def test_queries_do_not_wait_for_the_vm_lock_on_the_loop(tmp_path, query):
    """While a worker holds the VM's lock (as a merge does), the loop keeps serving: another
    coroutine runs while the query waits. Were the query run on the loop, the loop would be
    blocked until the holder gave up after 5 s, with the other coroutine not yet run."""

    async def main():
        service = Service(str(tmp_path / "vms"))
        await service.create_vm("v", [SLOT], "softmmu", True)
        vm = service.vm("v")
        holding, other_ran = threading.Event(), threading.Event()

        def hold_the_lock() -> bool:
            with vm.lock:
                holding.set()
                return other_ran.wait(5)

        holder = asyncio.ensure_future(asyncio.to_thread(hold_the_lock))
        await asyncio.to_thread(holding.wait, 5)
        answer = asyncio.ensure_future(
            service.query_vms() if query == "query_vms" else service.dirty_rate(vm)
        )

        async def other():
            other_ran.set()

        await asyncio.gather(answer, other())
        released_by_other = await holder
        await service.shutdown()
        return released_by_other, answer.result()

    released_by_other, answer = asyncio.run(main())
    assert released_by_other, "the loop was blocked while the lock was held"
    assert answer


def test_vm_remove_waits_for_calls_in_flight_and_refuses_later_ones(tmp_path):
    """vm-remove racing a store: the store in flight finishes on a live backend; one issued
    after the remove began is DeviceNotFound, never a KeyError from a closed backend.

        t0  write_pages starts in a worker, blocks inside the backend
        t1  vm-remove begins: the VM is marked removed, the remove waits
        t2  a second write_pages is refused (DeviceNotFound)
        t3  the first write completes; only then is the backend closed
    """
    from dirtylogd.errors import DeviceNotFound

    async def main():
        service = Service(str(tmp_path / "vms"))
        await service.create_vm("v", [SLOT], "softmmu", True)
        vm = service.vm("v")
        inside, release = threading.Event(), threading.Event()
        real = vm.backend.write_pages

        def slow_write(gfns, value, path):
            inside.set()
            release.wait(10)
            real(gfns, value, path)

        vm.backend.write_pages = slow_write
        first = asyncio.ensure_future(service.write_pages(vm, [1, 2], 7, "guest", False))
        await asyncio.to_thread(inside.wait, 10)
        remove = asyncio.ensure_future(service.remove_vm("v"))
        await asyncio.sleep(0.05)
        assert not remove.done()  # waiting for the write in flight
        with pytest.raises(DeviceNotFound):
            await service.write_pages(vm, [3], 7, "guest", False)
        with pytest.raises(DeviceNotFound):
            service.vm("v")
        release.set()
        await first  # completed against the live backend
        await remove
        assert "v" not in service.vms
        await service.shutdown()

    asyncio.run(main())


def test_a_memslot_change_whose_caller_went_away_keeps_the_vm_and_backend_agreeing(tmp_path):
    """The client of a memslot-set disconnects while the backend is changing the slot: the
    change lands in the backend (its thread runs on), so the VM's view must follow it."""

    async def main():
        service = Service(str(tmp_path / "vms"))
        await service.create_vm("v", [], "softmmu", True)
        vm = service.vm("v")
        inside, release = threading.Event(), threading.Event()
        real = vm.backend.set_user_memory_region

        def slow(*args):
            inside.set()
            release.wait(10)
            return real(*args)

        vm.backend.set_user_memory_region = slow
        change = asyncio.ensure_future(service.set_memslot(vm, 3, 0, 0, 4 * MiB, True))
        await asyncio.to_thread(inside.wait, 10)
        change.cancel()  # the client went away
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await change
        assert 3 in vm.slots and vm.backend.memslots.get(3) is not None
        await service.write_pages(vm, [5], 1, "guest", False)
        assert (await service.get_dirty_log(vm, 3, 0, "default")).bitmap.pages().tolist() == [5]
        await service.shutdown()

    asyncio.run(main())
