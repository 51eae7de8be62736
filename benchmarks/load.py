"""Many clients, each with its own consumer, loop dirty-log-get while vCPUs store: nothing lost.

The KVM selftest method (tools/testing/selftests/kvm/dirty_log_test.c), per consumer: read the
stamp in every page (the first 8 bytes, which the simulated vCPUs write) before the workload
starts; let every client loop ``dirty-log-get`` on its own consumer for a fixed time; ``stop``
the VM; one final get each; read the stamps again. Every page whose stamp changed must be in the
union of the bitmaps that consumer received (``lost``). Stronger, since a page is written many
times: its final stamp — the generation its last store read — must not be newer than the
generation of the last answer that reported it to that consumer (``stale``: the consumer's copy
would miss the last store). Also reported: errors, and the latency of each get as the client
sees it (p50, p99, max), with the number of gets per second the daemon served; the baseline
is the p50 of one client alone (the 'default' consumer, same workload), measured just before.

    python benchmarks/load.py                  # 64 clients, 4 GiB, 200,000 pages/s, 30 s
    python benchmarks/load.py --clients 16 --gib 1 --seconds 3 --json   # what the test runs
    python benchmarks/load.py --encoding fd    # answers written into each client's memfd

With ``--encoding fd`` every client (and the baseline) passes a memfd once with ``getfd`` and
reads each answer's bitmap from it, as a migration tool does with a large VM: no base64 or JSON
of a 128 KiB bitmap per answer on either side, so what is left is the daemon's own work.

Exits 1 if a page was lost or stale, or a command failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import mmap
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import psutil
from daemon_client import connected_daemon, socket_path
from qemu.qmp import QMPClient

GiB = 1 << 30
PAGE = 4096
VM = "load"


@dataclass
class Result:
    clients: int
    gib: int
    pages_per_second: int
    seconds: float
    gets: int
    fewest_gets: int  # of any one client
    errors: int
    changed_pages: int
    lost_pages: int  # worst consumer: changed, never reported
    stale_pages: int  # worst consumer: last store newer than the last report
    alone_p50_ms: float  # one client, nobody else asking
    p50_ms: float
    p99_ms: float
    max_ms: float
    gets_per_second: float
    daemon_cpu: float  # share of one core during the run
    client_cpu: float  # this process: 64 clients decoding and checking every answer
    daemon_cpu_ms_per_get: float  # the crowd's, vCPU stores included
    alone_daemon_cpu: float  # cores, while one client alone asks
    encoding: str


def stamps(ram_path: str, size: int) -> np.ndarray:
    """The first u64 of every page, as a tool that maps the RAM file read-only sees it."""
    with open(ram_path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        return np.frombuffer(m, "<u8")[:: PAGE // 8].copy()


def cpu_seconds(process: psutil.Process) -> float:
    t = process.cpu_times()
    return t.user + t.system


class Answers:
    """How one client asks for and reads its bitmaps: inline, or through its memfd."""

    def __init__(self, encoding: str, npages: int) -> None:
        self.encoding = encoding
        self.nbytes = (npages + 63) // 64 * 8
        self.fd = os.memfd_create("load") if encoding == "fd" else -1

    async def attach(self, client: QMPClient) -> dict[str, str]:
        """The GET arguments this client adds (after passing its memfd, with fd)."""
        if self.encoding != "fd":
            return {}
        client.send_fd_scm(self.fd)
        await client.execute("getfd", {"fdname": "bits"})
        return {"encoding": "fd", "fdname": "bits"}

    def bits(self, reply: dict) -> np.ndarray:
        if self.encoding == "fd":
            return np.frombuffer(os.pread(self.fd, self.nbytes, 0), dtype=np.uint8)
        return np.frombuffer(base64.b64decode(reply["bitmap"]), dtype=np.uint8)


async def consumer_loop(
    client: QMPClient, name: str, npages: int, until: asyncio.Event, encoding: str
) -> tuple[np.ndarray, list[float], int]:
    """Loop gets until ``until`` is set, then one final get.

    Returns, per page, the generation of the last answer that reported it (0: never), the
    latencies, and the number of errors.
    """
    reported = np.zeros(npages, dtype=np.uint32)
    latencies: list[float] = []
    errors = 0
    answers = Answers(encoding, npages)
    args = {"vm": VM, "slot": 0, "consumer": name, **await answers.attach(client)}
    while True:
        final = until.is_set()
        t0 = time.perf_counter()
        try:
            reply = await client.execute("dirty-log-get", args)
        except Exception as exc:  # any failure counts; the run goes on to find the rest
            errors += 1
            print(f"{name}: {exc!r}", file=sys.stderr)
            if final:
                return reported, latencies, errors
            await asyncio.sleep(0.01)
            continue
        latencies.append((time.perf_counter() - t0) * 1e3)
        bits = answers.bits(reply)
        reported[np.unpackbits(bits, bitorder="little").view(bool)] = reply["generation"]
        if final:
            return reported, latencies, errors


async def run(clients: int, gib: int, pps: int, seconds: float, tmp: str, encoding: str) -> Result:
    npages = gib * GiB // PAGE
    # One consumer per client: past the default limit (64) the daemon must be told.
    async with connected_daemon(tmp, "--max-consumers", str(max(clients, 1))) as admin:
        await admin.execute(
            "vm-create",
            {
                "name": VM,
                "backend": "softmmu",
                "memslots": [{"slot": 0, "guest-phys-addr": 0, "size": gib * GiB}],
            },
        )
        names = [f"c{i}" for i in range(clients)]
        for name in names:  # initially clean: only what the guest stores may show up
            await admin.execute("consumer-add", {"vm": VM, "name": name, "initially-set": False})
        vm = (await admin.execute("query-vms"))[0]
        before = stamps(vm["ram-path"], gib * GiB)
        connections = []
        for _ in names:
            c = QMPClient("load")
            await c.connect(socket_path(tmp))
            connections.append(c)
        stop = asyncio.Event()
        await admin.execute(
            "sim-workload-start", {"vm": VM, "pages-per-second": pps, "vcpus": 2, "seed": 1}
        )
        alone = []
        (daemon,) = psutil.Process().children()
        baseline = Answers(encoding, npages)
        alone_args = {"vm": VM, "slot": 0, **await baseline.attach(admin)}
        cpu_alone, alone_started = cpu_seconds(daemon), time.perf_counter()
        for _ in range(50):  # the baseline: one client, nobody else asking
            t0 = time.perf_counter()
            reply = await admin.execute("dirty-log-get", alone_args)
            alone.append((time.perf_counter() - t0) * 1e3)
            baseline.bits(reply)  # read, as every client of the crowd reads its answers
        alone_cpu = (cpu_seconds(daemon) - cpu_alone) / (time.perf_counter() - alone_started)
        cpu_before = (cpu_seconds(daemon), cpu_seconds(psutil.Process()))
        started = time.perf_counter()
        loops = [
            asyncio.create_task(consumer_loop(c, n, npages, stop, encoding))
            for c, n in zip(connections, names, strict=True)
        ]
        await asyncio.sleep(seconds)
        await admin.execute("stop", {"vm": VM})  # no store after this returns
        stop.set()
        outcomes = await asyncio.gather(*loops)
        elapsed = time.perf_counter() - started
        daemon_cpu_seconds = cpu_seconds(daemon) - cpu_before[0]
        daemon_cpu = daemon_cpu_seconds / elapsed
        client_cpu = (cpu_seconds(psutil.Process()) - cpu_before[1]) / elapsed
        after = stamps(vm["ram-path"], gib * GiB)
        for c in connections:
            await c.disconnect()
        await admin.execute("vm-remove", {"vm": VM})

    changed = np.flatnonzero(after != before)
    lost = stale = errors = 0
    latencies: list[float] = []
    for reported, lat, err in outcomes:
        last = reported[changed]
        lost = max(lost, int(np.count_nonzero(last == 0)))
        stale = max(stale, int(np.count_nonzero(after[changed] > last)))
        latencies += lat
        errors += err
    return Result(
        clients=clients,
        gib=gib,
        pages_per_second=pps,
        seconds=seconds,
        gets=len(latencies),
        fewest_gets=min(len(lat) for _, lat, _ in outcomes),
        errors=errors,
        changed_pages=len(changed),
        lost_pages=lost,
        stale_pages=stale,
        alone_p50_ms=float(np.percentile(alone, 50)),
        p50_ms=float(np.percentile(latencies, 50)),
        p99_ms=float(np.percentile(latencies, 99)),
        max_ms=float(np.max(latencies)),
        gets_per_second=len(latencies) / elapsed,
        daemon_cpu=daemon_cpu,
        client_cpu=client_cpu,
        daemon_cpu_ms_per_get=daemon_cpu_seconds / max(len(latencies), 1) * 1e3,
        alone_daemon_cpu=alone_cpu,
        encoding=encoding,
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--gib", type=int, default=4)
    ap.add_argument("--pps", type=int, default=200_000, help="guest stores per second")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--encoding", choices=("bitmap", "fd"), default="bitmap")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        r = asyncio.run(run(args.clients, args.gib, args.pps, args.seconds, tmp, args.encoding))
    if args.json:
        print(json.dumps(asdict(r)))
    else:
        print(
            f"{r.clients} clients, {r.gib} GiB, {r.pages_per_second} pages/s for {r.seconds:.0f} s"
            f" (encoding {r.encoding})"
        )
        print(
            f"  gets           {r.gets} ({r.gets_per_second:.0f}/s, fewest by one client "
            f"{r.fewest_gets}), errors {r.errors}"
        )
        print(
            f"  latency (ms)   p50 {r.p50_ms:.1f}  p99 {r.p99_ms:.1f}  max {r.max_ms:.1f}; "
            f"alone p50 {r.alone_p50_ms:.1f} (p50 {r.p50_ms / r.alone_p50_ms:.0f}x alone)"
        )
        print(
            f"  CPU (cores)    daemon {r.daemon_cpu:.2f} (alone {r.alone_daemon_cpu:.2f}), "
            f"clients {r.client_cpu:.2f}; daemon {r.daemon_cpu_ms_per_get:.2f} ms a get"
        )
        print(
            f"  changed pages  {r.changed_pages}; worst consumer: lost {r.lost_pages}, "
            f"stale {r.stale_pages}"
        )
    return 1 if r.lost_pages or r.stale_pages or r.errors else 0


if __name__ == "__main__":
    sys.exit(main())
