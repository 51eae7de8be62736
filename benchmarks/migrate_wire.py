"""Migration over loopback TCP against the plainest pipeline, same run.

A quiet VM (every page stored once, no workload) is migrated with ``dirtylogctl migrate`` to a
``migrate-receive`` writing a fresh image; the pipeline is its RAM file sent with
``os.sendfile`` over one loopback connection to a receiver that ``recv``s into a buffer and
writes a fresh file in the same directory (tmpfs). Both receivers are separate processes,
as the senders are; the ratio is migration rate / pipeline rate (≥ 0.9 is the target), per
run and for the best of each (on a machine shared with other work, each at its quietest).
With ``--channels 1,2`` each run migrates once per count (``dirtylogctl migrate --channels``),
each against the same run's pipeline.

    python benchmarks/migrate.py wire --gib 2 --channels 1,2
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

from daemon_client import connected_daemon, socket_path, stored_vm

GiB = 1 << 30

PIPE_RECEIVER = r"""
import os, socket, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
buf = bytearray(1 << 20)
view = memoryview(buf)
while n := conn.recv_into(buf):
    os.write(fd, view[:n])
os.close(fd)
conn.sendall(b"k")
"""


def pipeline(ram_path: str, out: str) -> float:
    """Seconds to sendfile ``ram_path`` to a receiver process writing ``out``, until it says
    the file is written."""
    receiver = subprocess.Popen(
        [sys.executable, "-c", PIPE_RECEIVER, out], stdout=subprocess.PIPE, text=True
    )
    assert receiver.stdout is not None
    port = int(receiver.stdout.readline())
    size = os.path.getsize(ram_path)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock, open(ram_path, "rb") as src:
        sent = 0
        while sent < size:
            sent += os.sendfile(sock.fileno(), src.fileno(), sent, size - sent)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b"k"
    elapsed = time.perf_counter() - t0
    receiver.wait(30)
    os.unlink(out)
    return elapsed


def migrate_args(tmp: str, destination: str, channels: int = 1) -> list[str]:
    """``dirtylogctl migrate`` of the benchmark VM, JSON report, source resumed afterwards."""
    return [
        sys.executable, "-m", "dirtylogctl.cli", "-s", socket_path(tmp), "--json",
        "migrate", "mig", destination, "--resume", "--channels", str(channels),
    ]  # fmt: skip


def migrate(tmp: str, out: str, channels: int = 1) -> tuple[float, dict[str, Any]]:
    """Seconds from starting ``dirtylogctl migrate`` to its end, and its JSON report."""
    env = dict(os.environ)
    receiver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dirtylogctl.cli",
            "migrate-receive",
            "--listen",
            "127.0.0.1:0",
            "--output",
            out,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert receiver.stdout is not None
    port = 0
    for line in receiver.stdout:
        if "listening" in line:
            port = int(line.rsplit(":", 1)[1].split()[0])
            break
    args = migrate_args(tmp, f"tcp:127.0.0.1:{port}", channels)
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    receiver.wait(30)
    if not done.stdout.startswith("{"):
        raise SystemExit(f"migrate failed: {done.stderr}")
    os.unlink(out)
    return elapsed, json.loads(done.stdout)


async def run(gib: int, tmp: str, repeats: int, channels: tuple[int, ...] = (1,)) -> None:
    async with connected_daemon(tmp) as qmp:
        await stored_vm(qmp, "mig", gib)
        vms: list[dict[str, Any]] = await qmp.execute("query-vms")  # type: ignore[assignment]
        (vm,) = [v for v in vms if v["name"] == "mig"]
        ram = vm["ram-path"]
        out = os.path.join(tmp, "image")
        size = gib * GiB
        print(f"quiet {gib} GiB VM over loopback TCP to a fresh tmpfs image, {repeats} runs")
        print("  MB/s: pipeline; per channel count, whole migration (wall time of dirtylogctl")
        print("  migrate) and its round 0, each also as a ratio to the same run's pipeline")
        heads = [f"{'pipeline':>8}"]
        for n in channels:
            heads += [f"{f'{n}ch':>6} {'ratio':>6} {'r0':>6} {'ratio':>6}"]
        print(f"{'run':>3} " + " | ".join(heads))
        best = [0.0] * (1 + 2 * len(channels))
        for number in range(repeats):
            pipe = size / await asyncio.to_thread(pipeline, ram, out + ".pipe") / 1e6
            rates = [pipe]
            for n in channels:
                mig_s, doc = await asyncio.to_thread(migrate, tmp, out, n)
                if doc["channels"] != n:
                    raise SystemExit(f"asked for {n} channels, got {doc['channels']}")
                rates += [size / mig_s / 1e6, doc["rounds"][0]["mbps"] / 8]
            best = [max(b, x) for b, x in zip(best, rates, strict=True)]
            print(_row(f"{number:>3}", rates))
        # on a shared machine the best of each is what it can do when left alone
        print(_row("best", best))


def _row(label: str, rates: list[float]) -> str:
    """A pipeline rate, then (whole, round 0) per channel count, each with its ratio."""
    pipe, cells = rates[0], [f"{rates[0]:>8.0f}"]
    for at in range(1, len(rates), 2):
        whole, r0 = rates[at], rates[at + 1]
        cells.append(f"{whole:>6.0f} {whole / pipe:>5.2f}x {r0:>6.0f} {r0 / pipe:>5.2f}x")
    return f"{label:>3} " + " | ".join(cells)


async def downtime(gib: int, tmp: str, repeats: int, pps: int) -> None:
    """A VM whose workload converges, migrated to an image file: downtime against the limit
    (300 ms) and the prediction the switch-over decision made; the flush comes after."""
    async with connected_daemon(tmp) as qmp:
        await stored_vm(qmp, "mig", gib)
        print(f"{gib} GiB VM storing {pps:,} pages/s (2 vCPUs) to a tmpfs image file, limit 300 ms")
        columns = ("run", "conv", "rounds", "downtime", "predicted", "error", "flush after")
        print(" ".join(f"{c:>{w}}" for c, w in zip(columns, (3, 5, 6, 9, 9, 7, 11), strict=True)))
        out = os.path.join(tmp, "image")
        for number in range(repeats):
            await qmp.execute(
                "sim-workload-start",
                {"vm": "mig", "pages-per-second": pps, "vcpus": 2, "seed": number},
            )
            await asyncio.sleep(0.5)
            args = migrate_args(tmp, out)
            done = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True)
            await qmp.execute("sim-workload-stop", {"vm": "mig"})
            if not done.stdout.startswith("{"):
                raise SystemExit(f"migrate failed: {done.stderr}")
            doc = json.loads(done.stdout)
            os.unlink(out)
            err = doc["downtime"] - doc["expected-downtime"]
            conv, rounds = "yes" if doc["converged"] else "no", doc["ram"]["dirty-sync-count"]
            print(
                f"{number:>3} {conv:>5} {rounds:>6} {doc['downtime']:>7.0f}ms "
                f"{doc['expected-downtime']:>7.0f}ms {err:>+5.0f}ms {doc['settle-time']:>9.0f}ms"
            )
