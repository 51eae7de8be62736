"""The service's async face: what happens to a harvest whose caller goes away."""

import asyncio

from dirtylogd.service.registry import Service

MiB = 1 << 20


async def cancelled_get_keeps_the_bits(tmp_path) -> list[int]:
    service = Service(str(tmp_path / "vms"))
    await service.create_vm(
        "v",
        [{"slot": 0, "as_id": 0, "guest_phys_addr": 0, "size": 64 * MiB, "log_dirty_pages": True}],
        "softmmu",
        True,
    )
    vm = service.vm("v")
    service.add_consumer(vm, "c", manual_protect=False, initially_set=False)
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
