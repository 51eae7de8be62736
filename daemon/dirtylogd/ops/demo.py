"""--demo: a simulated VM with a running workload, so a new user sees live numbers at once.

The VM "demo" has two memslots and vCPUs storing 20,000 pages/s (5 % of them reported DMA);
a consumer named "monitor" is harvested every second, which keeps query-dirty-rate and the
metrics moving without taking bits from anyone else.
"""

from __future__ import annotations

import asyncio
import logging

from dirtylogd.errors import QmpError
from dirtylogd.service.registry import Service

log = logging.getLogger(__name__)
MiB = 1 << 20
DEMO_VM = "demo"
MONITOR = "monitor"


async def start_demo(service: Service) -> asyncio.Task[None]:
    slots = [
        {"slot": 0, "as_id": 0, "guest_phys_addr": 0, "size": 512 * MiB, "log_dirty_pages": True},
        {
            "slot": 1,
            "as_id": 0,
            "guest_phys_addr": 4096 * MiB,
            "size": 64 * MiB,
            "log_dirty_pages": True,
        },
    ]
    if DEMO_VM not in service.vms:  # a restored demo keeps its memory, consumers and workload
        await service.create_vm(DEMO_VM, slots, "softmmu", True)
        vm = service.vm(DEMO_VM)
        await service.add_consumer(vm, MONITOR, manual_protect=False, initially_set=False)
        await service.start_workload(
            vm,
            pages_per_second=20_000,
            vcpus=2,
            pattern="hot-set",
            seed=None,
            dma_share=0.05,
            dma_report=True,
        )
    log.info("demo: vm '%s' running; try: dirtylogctl rate %s", DEMO_VM, DEMO_VM)
    return asyncio.create_task(_monitor(service))


async def _monitor(service: Service) -> None:
    while True:
        await asyncio.sleep(1.0)
        vm = service.vms.get(DEMO_VM)
        if vm is None or MONITOR not in vm.consumers:
            return
        for slot in list(vm.slots):
            try:
                # The monitor is its own reader: what it takes is delivered (and counted).
                vm.delivered(await service.get_dirty_log(vm, slot & 0xFFFF, slot >> 16, MONITOR))
            except QmpError as exc:
                log.debug("demo monitor: %s", exc.desc)
