"""What a VM's consumers cost: the daemon's memory, a GET, a query-vms, and the event loop.

Every harvest ORs the slot's bits into every consumer's pending bitmap, and query-vms counts
every consumer's pending pages, so both grow with the number of consumers; each consumer holds
one bit per page. With N consumers (added clean) on one VM this measures the daemon's RSS
growth (once harvests have touched every bitmap), the p50 of ``dirty-log-get`` (a few dirty
pages, ``ranges``) and of ``query-vms`` as a client sees them, and — on a second connection
pinging ``query-version`` throughout — how long any other client waited (the event loop's
worst stall).

    python benchmarks/consumers.py                      # 64 consumers (the default limit), 8 GiB
    python benchmarks/consumers.py --consumers 3000     # the flood the limit now refuses
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import psutil
from daemon_client import connected_daemon, socket_path
from qemu.qmp import QMPClient

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--consumers", type=int, default=64)
    ap.add_argument("--gib", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=20, help="gets and queries measured")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
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
