"""dirty-log-get end to end (client process → daemon → client) against the in-process harvest.

A daemon runs in its own process; this process is the client (qemu.qmp) and also measures the
baseline: kvmshim's harvest of a slot of the same size and dirtiness, in-process, in the same run.
Before every timed GET the client re-dirties the same 1 % of the pages with sim-write-pages
(not timed), so every GET harvests exactly that many pages.

    python benchmarks/dirtylog_get.py            # 60 calls per case
    python benchmarks/dirtylog_get.py --calls 20 # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

import numpy as np
from daemon_client import connected_daemon

from kvmshim.s390.mmu import S390Mmu

GiB = 1 << 30
PAGES_PER_GIB = GiB // 4096


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def baseline_ms(npages: int, dirty: np.ndarray, calls: int) -> list[float]:
    mmu = S390Mmu(npages)
    out = np.zeros(npages // 8, dtype=np.uint8)
    times = []
    for _ in range(calls):
        mmu.guest_store(dirty)
        t0 = time.perf_counter()
        mmu.harvest(out)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


async def run(calls: int, tmp: str) -> None:
    async with connected_daemon(tmp) as qmp:
        rng = np.random.default_rng(7)
        results = []
        for gib, encoding in ((1, "bitmap"), (16, "fd")):
            npages = gib * PAGES_PER_GIB
            name = f"g{gib}"
            await qmp.execute(
                "vm-create",
                {
                    "name": name,
                    "backend": "softmmu",
                    "memslots": [{"slot": 0, "guest-phys-addr": 0, "size": gib * GiB}],
                },
            )
            dirty = np.sort(rng.choice(npages, npages // 100, replace=False))
            gfns = dirty.tolist()
            args = {"vm": name, "slot": 0, "encoding": encoding}
            if encoding == "fd":
                fd = os.memfd_create("bench")
                qmp.send_fd_scm(fd)
                await qmp.execute("getfd", {"fdname": "bm"})
                args["fdname"] = "bm"
            e2e = []
            for _ in range(calls):
                for i in range(0, len(gfns), 65536):
                    await qmp.execute(
                        "sim-write-pages", {"vm": name, "gfns": gfns[i : i + 65536], "value": 1}
                    )
                t0 = time.perf_counter()
                reply = await qmp.execute("dirty-log-get", args)
                e2e.append((time.perf_counter() - t0) * 1e3)
                assert reply["dirty-pages"] == len(gfns), reply["dirty-pages"]
            empty = []
            for _ in range(calls):
                t0 = time.perf_counter()
                reply = await qmp.execute("dirty-log-get", args)
                empty.append((time.perf_counter() - t0) * 1e3)
                assert reply["dirty-pages"] == 0
            base = baseline_ms(npages, dirty, calls)
            results.append((gib, encoding, e2e, empty, base))
            await qmp.execute("vm-remove", {"vm": name})

    print(f"dirty-log-get end to end, {calls} calls per case, 1 % dirty (ms)")
    print(
        f"{'slot':>7} {'encoding':>8} {'p50':>7} {'p99':>7} {'empty p50':>9} "
        f"{'harvest p50':>11} {'e2e/harvest':>11}"
    )
    for gib, encoding, e2e, empty, base in results:
        print(
            f"{gib:>4} GiB {encoding:>8} {pct(e2e, 50):>7.2f} {pct(e2e, 99):>7.2f} "
            f"{pct(empty, 50):>9.2f} {statistics.median(base):>11.2f} "
            f"{pct(e2e, 50) / statistics.median(base):>10.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calls", type=int, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        asyncio.run(run(args.calls, tmp))


if __name__ == "__main__":
    main()
