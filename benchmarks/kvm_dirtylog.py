"""Real KVM: the raw KVM_GET_DIRTY_LOG ioctl in-process against dirty-log-get through the daemon.

Both sides own a real VM with one 4 GiB memslot; before each timed call the guest program
stores to the same 1 % or 50 % of the pages (real guest stores, write-protect faults and all),
which is not timed. In-process, the raw GET is timed, and GET + CLEAR: with manual protect
CLEAR is where KVM write-protects the pages again (without it, GET does that itself), so
GET + CLEAR is the kernel's whole harvest. Through the daemon the whole request is timed:
GET + CLEAR + merge into consumers + the answer (the bitmap goes to a memfd). Also reports
guest stores per second through the guest program.

    python benchmarks/kvm_dirtylog.py            # 10 calls per case
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

from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES
from kvmshim.backends.base import WritePath
from kvmshim.backends.kvm import KvmBackend

GiB = 1 << 30
NPAGES = 4 * GiB // 4096
BASE = 4 * GiB  # RAM above the PCI hole, as on PCs (the xAPIC page is at 0xfee00000)
FRACTIONS = (0.01, 0.50)


def in_process(calls: int, tmp: str, rng: np.random.Generator) -> dict[float, dict[str, float]]:
    vm = KvmBackend("raw", tmp)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, BASE, 4 * GiB)
    out: dict[float, dict[str, float]] = {}
    for frac in FRACTIONS:
        dirty = np.sort(rng.choice(NPAGES, int(NPAGES * frac), replace=False))
        raw, harvest, store_rates = [], [], []
        for _ in range(calls):
            t0 = time.perf_counter()
            vm.write_pages(dirty + (BASE >> 12), 1, WritePath.GUEST)
            store_rates.append(dirty.size / (time.perf_counter() - t0))
            words = np.zeros(NPAGES // 64, dtype="<u8")
            t0 = time.perf_counter()
            vm.vm.get_dirty_log(0, words)
            raw.append((time.perf_counter() - t0) * 1e3)
            assert int(np.bitwise_count(words).sum()) == dirty.size
            t0 = time.perf_counter()
            vm.vm.clear_dirty_log(0, 0, NPAGES, words)  # re-arm: write-protect those pages
            harvest.append(raw[-1] + (time.perf_counter() - t0) * 1e3)
        out[frac] = {
            "raw_ms": statistics.median(raw),
            "harvest_ms": statistics.median(harvest),
            "stores_s": statistics.median(store_rates),
        }
    vm.close()
    return out


async def through_daemon(calls: int, tmp: str, rng: np.random.Generator) -> dict[float, float]:
    async with connected_daemon(tmp) as qmp:
        await qmp.execute(
            "vm-create",
            {
                "name": "k",
                "backend": "kvm",
                "memslots": [{"slot": 0, "guest-phys-addr": BASE, "size": 4 * GiB}],
            },
        )
        fd = os.memfd_create("bench")
        qmp.send_fd_scm(fd)
        await qmp.execute("getfd", {"fdname": "bm"})
        out = {}
        for frac in FRACTIONS:
            picked = np.sort(rng.choice(NPAGES, int(NPAGES * frac), replace=False))
            gfns = (picked + (BASE >> 12)).tolist()
            times = []
            for _ in range(calls):
                for i in range(0, len(gfns), 65536):
                    await qmp.execute(
                        "sim-write-pages", {"vm": "k", "gfns": gfns[i : i + 65536], "value": 1}
                    )
                t0 = time.perf_counter()
                reply = await qmp.execute(
                    "dirty-log-get", {"vm": "k", "slot": 0, "encoding": "fd", "fdname": "bm"}
                )
                times.append((time.perf_counter() - t0) * 1e3)
                assert reply["dirty-pages"] == len(gfns), reply
            out[frac] = statistics.median(times)
        os.close(fd)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    rng = np.random.default_rng(11)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        raw = in_process(args.calls, tmp, rng)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        daemon = asyncio.run(through_daemon(args.calls, tmp, rng))
    print(f"4 GiB memslot on real KVM, {args.calls} calls per case (medians, ms)")
    print(
        f"{'dirty':>6} {'raw GET':>8} {'GET+CLEAR':>10} {'daemon':>8} {'/raw GET':>9} "
        f"{'/GET+CLEAR':>11} {'added':>7} {'guest stores/s':>15}"
    )
    for frac in FRACTIONS:
        r, h, d = raw[frac]["raw_ms"], raw[frac]["harvest_ms"], daemon[frac]
        print(
            f"{frac:>6.0%} {r:>8.2f} {h:>10.2f} {d:>8.2f} {d / r:>8.1f}x {d / h:>10.2f}x "
            f"{d - h:>7.2f} {raw[frac]['stores_s']:>15,.0f}"
        )


if __name__ == "__main__":
    main()
