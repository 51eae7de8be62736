"""dirty-log-get end to end (client process → daemon → client), as ratios to baselines of the
same run.

A daemon runs in its own process with its RAM on /dev/shm (tmpfs); this process is the client
and also measures the baselines in-process. Before every timed GET the client dirties a fresh
random 1 % of the slot's pages with sim-write-pages (not timed).

* 1 GiB, inline bitmap, against kvmshim's in-process harvest of a slot of the same size and
  dirtiness (target ≤ 2x): what a small answer pays on top of its harvest. Timed twice: with
  qemu.qmp, and with a bare socket client that only writes the request and reads the line,
  which shows the daemon's own share apart from the client library's.
* 16 GiB, via fd (a memfd), against one chunked read-modify-write pass over a PGSTE array of
  the same size, caches flushed first as in benchmarks/harvest.py (target ≤ 2x); and, to tell
  the harvest's share from the request's, against the in-process harvest too.

An empty answer (nothing stored since the last GET) is timed too, for each case, and the daemon's
CPU time per GET (all its threads, from schedstat) is shown: it is far steadier than wall time on
a shared machine.

    python benchmarks/dirtylog_get.py              # 40 calls per case
    python benchmarks/dirtylog_get.py --calls 20   # quicker (and less RAM: 16 GiB x 1 % a call)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import psutil
from daemon_client import connected_daemon, socket_path
from harvest import baseline_pass, flush_caches
from qemu.qmp import QMPClient

from kvmshim.s390.mmu import S390Mmu

GiB = 1 << 30
PAGES_PER_GIB = GiB // 4096
GFNS_PER_WRITE = 65536  # sim-write-pages takes at most this many
# case, GET times, empty GET times, daemon CPU per GET, baseline, baseline p50 (ms)
Row = tuple[str, list[float], list[float], list[float], str, float]


def p50(values: list[float]) -> float:
    return float(np.percentile(values, 50))


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def daemon_cpu_ms() -> float:
    """CPU time of the daemon (this process's only child) so far, every thread, from
    schedstat: nanoseconds, where /proc/PID/stat counts 10 ms ticks."""
    (daemon,) = psutil.Process().children()
    total = 0
    for task in os.listdir(f"/proc/{daemon.pid}/task"):
        path = f"/proc/{daemon.pid}/task/{task}/schedstat"
        with contextlib.suppress(FileNotFoundError), open(path) as f:  # FNF: a thread ended
            total += int(f.read().split()[0])
    return total / 1e6


def fresh_dirty(rng: np.random.Generator, npages: int) -> np.ndarray:
    """A new random 1 % of the pages, sorted."""
    return np.sort(rng.choice(npages, npages // 100, replace=False))


def harvest_ms(npages: int, calls: int, rng: np.random.Generator) -> list[float]:
    """kvmshim's harvest alone, in this process, a fresh 1 % stored before each."""
    mmu = S390Mmu(npages)
    out = np.zeros(npages // 8, dtype=np.uint8)
    times = []
    for _ in range(calls):
        mmu.guest_store(fresh_dirty(rng, npages))
        t0 = time.perf_counter()
        mmu.harvest(out)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def rmw_pass_ms(npages: int, calls: int) -> list[float]:
    """One chunked read-modify-write pass over a PGSTE array of ``npages``, from DRAM."""
    mmu = S390Mmu(npages)
    mmu.pgste[:] = 1  # touched, so the pass does not fault pages in
    times = []
    for _ in range(calls):
        flush_caches()
        t0 = time.perf_counter()
        baseline_pass(mmu)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


async def dirty(qmp: QMPClient, vm: str, gfns: np.ndarray) -> None:
    for i in range(0, gfns.size, GFNS_PER_WRITE):
        piece = gfns[i : i + GFNS_PER_WRITE].tolist()
        await qmp.execute("sim-write-pages", {"vm": vm, "gfns": piece, "value": 1})


async def timed_gets(
    qmp: QMPClient, args: dict[str, Any], calls: int, npages: int, rng: np.random.Generator
) -> tuple[list[float], list[float], list[float]]:
    """Times of GETs with a fresh 1 % stored before each, then of empty ones, via qemu.qmp;
    and the daemon's CPU time for each of the former."""
    full, empty, cpu = [], [], []
    for _ in range(calls):
        gfns = fresh_dirty(rng, npages)
        await dirty(qmp, args["vm"], gfns)
        c0 = daemon_cpu_ms()
        t0 = time.perf_counter()
        reply = await qmp.execute("dirty-log-get", args)
        full.append((time.perf_counter() - t0) * 1e3)
        cpu.append(daemon_cpu_ms() - c0)
        assert reply["dirty-pages"] == gfns.size, (reply["dirty-pages"], gfns.size)
    for _ in range(calls):
        t0 = time.perf_counter()
        reply = await qmp.execute("dirty-log-get", args)
        empty.append((time.perf_counter() - t0) * 1e3)
        assert reply["dirty-pages"] == 0
    return full, empty, cpu


class BareClient:
    """A blocking QMP client that sends a line and reads a line, nothing else: the floor of
    any client, to tell the daemon's cost from qemu.qmp's."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.lines = self.sock.makefile("rb")
        self.lines.readline()  # greeting
        self.execute("qmp_capabilities", {})

    def execute(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        reply = json.loads(self.lines.readline())
        assert "return" in reply, reply
        return reply["return"]

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def bare_gets(
    path: str, args: dict[str, Any], calls: int, npages: int, rng: np.random.Generator
) -> tuple[list[float], list[float]]:
    """GET times with a fresh 1 % stored before each, then empty ones, via BareClient."""
    client = BareClient(path)

    def timed() -> float:
        t0 = time.perf_counter()
        client.execute("dirty-log-get", args)
        return (time.perf_counter() - t0) * 1e3

    full = []
    for _ in range(calls):
        gfns = fresh_dirty(rng, npages)
        for i in range(0, gfns.size, GFNS_PER_WRITE):
            piece = gfns[i : i + GFNS_PER_WRITE].tolist()
            client.execute("sim-write-pages", {"vm": args["vm"], "gfns": piece, "value": 1})
        full.append(timed())
    empty = [timed() for _ in range(calls)]
    client.close()
    return full, empty


async def create(qmp: QMPClient, name: str, gib: int) -> None:
    slot = {"slot": 0, "guest-phys-addr": 0, "size": gib * GiB}
    await qmp.execute("vm-create", {"name": name, "backend": "softmmu", "memslots": [slot]})


async def run(calls: int, tmp: str) -> list[Row]:
    rng = np.random.default_rng(7)
    rows = []
    async with connected_daemon(tmp) as qmp:
        npages = PAGES_PER_GIB
        await create(qmp, "g1", 1)
        args = {"vm": "g1", "slot": 0, "encoding": "bitmap"}
        full, empty, cpu = await timed_gets(qmp, args, calls, npages, rng)
        bare = await asyncio.to_thread(bare_gets, socket_path(tmp), args, calls, npages, rng)
        await qmp.execute("vm-remove", {"vm": "g1"})
        harvest = statistics.median(harvest_ms(npages, calls, rng))
        rows.append(("1 GiB bitmap, qemu.qmp", full, empty, cpu, "in-process harvest", harvest))
        rows.append(("1 GiB bitmap, bare client", *bare, [], "in-process harvest", harvest))

        npages = 16 * PAGES_PER_GIB
        await create(qmp, "g16", 16)
        fd = os.memfd_create("bench")
        qmp.send_fd_scm(fd)
        await qmp.execute("getfd", {"fdname": "bm"})
        args = {"vm": "g16", "slot": 0, "encoding": "fd", "fdname": "bm"}
        full, empty, cpu = await timed_gets(qmp, args, calls, npages, rng)
        os.close(fd)
        await qmp.execute("vm-remove", {"vm": "g16"})
    rmw = statistics.median(rmw_pass_ms(npages, max(calls, 10)))
    rows.append(("16 GiB fd, qemu.qmp", full, empty, cpu, "one RMW pass over the PGSTEs", rmw))
    harvest = statistics.median(harvest_ms(npages, calls, rng))
    rows.append(("16 GiB fd, qemu.qmp", full, empty, cpu, "in-process harvest", harvest))
    return rows


def report(calls: int, rows: list[Row]) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"dirty-log-get end to end, {calls} calls per case, a fresh random 1 % dirty (ms); "
        f"load average {load} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'case':<26} {'p50':>6} {'p99':>6} {'empty p50':>9} {'daemon CPU':>10}  "
        f"{'baseline':<28} {'p50':>6} {'ratio':>6}"
    )
    for case, full, empty, cpu, base_name, base in rows:
        cpu_text = f"{p50(cpu):.2f}" if cpu else "-"
        print(
            f"{case:<26} {p50(full):>6.2f} {p99(full):>6.2f} {p50(empty):>9.2f} {cpu_text:>10}  "
            f"{base_name:<28} {base:>6.2f} {p50(full) / base:>5.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        rows = asyncio.run(run(args.calls, tmp))
    report(args.calls, rows)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
