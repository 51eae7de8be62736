"""What a VM's consumers cost: the daemon's memory, a GET, a query-vms, and the event loop.

A harvest appends the slot's bits to the slot's log, whatever the number of consumers; each
consumer folds in what it has not seen when it reads, and query-vms counts every consumer's
pending pages (folding them in), so a query grows with the number of consumers; each consumer
holds one bit per page. With N consumers (added clean) on one VM this measures the daemon's RSS
growth (once harvests have touched every bitmap), the p50 of ``dirty-log-get`` (a few dirty
pages, ``ranges``) and of ``query-vms`` as a client sees them, and — on a second connection
pinging ``query-version`` throughout — how long any other client waited (the event loop's
worst stall).

    python benchmarks/consumers.py                      # 64 consumers (the default limit), 8 GiB
    python benchmarks/consumers.py --consumers 3000     # the flood the limit now refuses
    python benchmarks/consumers.py --merge              # harvest + merge, 64 consumers vs 1

``--merge`` measures in-process (no socket) the cost of ``VmState.harvest`` — the backend's
harvest, the merge and the take — on a 4 GiB slot with the same dirtiness before each (1 %,
random pages), for one consumer (the baseline) and for 64 consumers, either all reading in turn
or one reading while 63 never do. The three VMs are measured round by round, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import psutil
from daemon_client import connected_daemon, socket_path
from qemu.qmp import QMPClient

from dirtylogd.service.vm import VmState
from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES
from kvmshim.backends.base import WritePath
from kvmshim.backends.softmmu import SoftMmuBackend

GiB = 1 << 30
VM = "crowd"


@dataclass
class Result:
    consumers: int
    gib: int
    rss_growth_mib: float  # the daemon's, from adding the consumers to after the gets
    get_p50_ms: float
    query_vms_p50_ms: float
    ping_p50_ms: float  # query-version on another connection, while gets and queries run
    ping_max_ms: float


async def timed(client: QMPClient, command: str, args: dict | None, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await client.execute(command, args)
        out.append((time.perf_counter() - started) * 1e3)
    return out


async def ping(tmp: str, stop: asyncio.Event) -> list[float]:
    """query-version on its own connection until ``stop``: what any other client waits."""
    client = QMPClient("ping")
    await client.connect(socket_path(tmp))
    latencies = []
    try:
        while not stop.is_set():
            latencies += await timed(client, "query-version", None, 1)
            await asyncio.sleep(0.001)
    finally:
        await client.disconnect()
    return latencies


async def run(consumers: int, gib: int, repeat: int, tmp: str) -> Result:
    async with connected_daemon(tmp, "--max-consumers", str(consumers)) as admin:
        (daemon,) = psutil.Process().children()
        slot = {"slot": 0, "guest-phys-addr": 0, "size": gib * GiB}
        await admin.execute("vm-create", {"name": VM, "backend": "softmmu", "memslots": [slot]})
        rss = daemon.memory_info().rss
        for i in range(consumers):
            args = {"vm": VM, "name": f"c{i}", "initially-set": False}
            await admin.execute("consumer-add", args)
        stop = asyncio.Event()
        pinger = asyncio.create_task(ping(tmp, stop))
        await asyncio.sleep(0.2)
        gets, queries = [], []
        for _ in range(repeat):
            gfns = {"vm": VM, "gfns": [1, 1000, 100_000], "value": 1}
            await admin.execute("sim-write-pages", gfns)
            get = {"vm": VM, "slot": 0, "consumer": "c0", "encoding": "ranges"}
            gets += await timed(admin, "dirty-log-get", get, 1)
            queries += await timed(admin, "query-vms", None, 1)
        stop.set()
        pings = await pinger
        # Pending bitmaps are zero pages until a harvest ORs into them: measured after the gets.
        rss_growth = (daemon.memory_info().rss - rss) / (1 << 20)
    return Result(
        consumers,
        gib,
        round(rss_growth, 1),
        round(statistics.median(gets), 2),
        round(statistics.median(queries), 2),
        round(statistics.median(pings), 2),
        round(max(pings), 2),
    )


def merge_cost(gib: int, consumers: int, rounds: int, dirty: float, tmp: str) -> dict[str, float]:
    """p50 ms of one harvest + merge + take, per setup (see the module docstring)."""
    npages = gib * GiB // 4096
    setups: dict[str, tuple[VmState, list[str]]] = {}
    for label, readers, idle in (
        ("1 consumer", 1, 0),
        (f"{consumers} reading in turn", consumers, 0),
        (f"1 reading, {consumers - 1} idle", 1, consumers - 1),
    ):
        backend = SoftMmuBackend(label.replace(" ", "_"), tmp)
        vm = VmState(label, backend)
        vm.apply_memslot_change(
            backend.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, gib * GiB)
        )
        names = [f"r{i}" for i in range(readers)]
        for name in names + [f"idle{i}" for i in range(idle)]:
            vm.add_consumer(name, manual_protect=False, initially_set=False)
        setups[label] = (vm, names)
    rng = np.random.default_rng(1)
    times: dict[str, list[float]] = {label: [] for label in setups}
    for i in range(rounds + consumers):  # the first ``consumers`` rounds warm up
        gfns = rng.choice(npages, size=int(npages * dirty), replace=False)
        for label, (vm, names) in setups.items():
            vm.backend.write_pages(gfns, i + 1, WritePath.GUEST)
            t0 = time.perf_counter()
            vm.harvest(0, names[i % len(names)])
            if i >= consumers:
                times[label].append((time.perf_counter() - t0) * 1e3)
    for vm, _ in setups.values():
        vm.backend.close()
    return {label: statistics.median(t) for label, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--consumers", type=int, default=64)
    ap.add_argument("--gib", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=20, help="gets and queries measured")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--merge", action="store_true", help="harvest + merge cost, in-process")
    ap.add_argument("--rounds", type=int, default=200, help="harvests timed per setup (--merge)")
    ap.add_argument("--dirty", type=float, default=0.01, help="share of pages dirty (--merge)")
    args = ap.parse_args()
    if args.merge:
        gib = 4 if args.gib == 8 else args.gib  # the figure is on 4 GiB
        with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
            p50 = merge_cost(gib, args.consumers, args.rounds, args.dirty, tmp)
        if args.json:
            print(json.dumps(p50))
            return
        base = p50["1 consumer"]
        print(
            f"harvest + merge + take, {gib} GiB slot, {args.dirty:.0%} dirty, p50 of {args.rounds}"
        )
        for label, ms in p50.items():
            print(f"  {label:28} {ms:7.2f} ms  ({ms / base:.2f}x one consumer)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        r = asyncio.run(run(args.consumers, args.gib, args.repeat, tmp))
    if args.json:
        print(json.dumps(asdict(r)))
        return
    print(f"{r.consumers} consumers on {r.gib} GiB")
    print(f"  daemon RSS     +{r.rss_growth_mib} MiB")
    print(f"  dirty-log-get  p50 {r.get_p50_ms} ms")
    print(f"  query-vms      p50 {r.query_vms_p50_ms} ms")
    print(f"  another client p50 {r.ping_p50_ms} ms, worst {r.ping_max_ms} ms")


if __name__ == "__main__":
    main()
