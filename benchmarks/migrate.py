"""Pre-copy migration of a running 4 GiB guest with dirtylogctl migrate.

The guest (software MMU, ESOP) first stores to every page once, as a booted guest would have,
then two vCPUs keep storing at 50,000 or 200,000 pages/s (200,000 is about the 800-900 MB/s of
published KVM/QEMU tests). Each case migrates to an image file on tmpfs, with and without a
bandwidth cap, and verifies it. Reported per case: rounds, total time, downtime against QEMU's
prediction (remaining / bandwidth, the rule the switch-over uses), pages sent more than once,
and the round overhead (harvest + bitmap transfer) as a share of the copy time: over all
rounds, and for the worst single round (a short last round copies little).

    python benchmarks/migrate.py                  # four cases, ~2 minutes
    python benchmarks/migrate.py --gib 1          # smaller guest
    python benchmarks/migrate.py wire --gib 2     # a quiet guest vs sendfile over loopback
    python benchmarks/migrate.py wire --gib 2 --channels 1,2  # ... over 1 and 2 TCP channels
    python benchmarks/migrate.py downtime --gib 2 # downtime vs prediction, file destination

(``wire`` and ``downtime`` live in migrate_wire.py.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile

from daemon_client import connected_daemon, stored_vm

GiB = 1 << 30
CASES = [(50_000, None), (50_000, "400M"), (200_000, None), (200_000, "400M")]


async def run(gib: int, tmp: str) -> list[dict]:
    results = []
    async with connected_daemon(tmp) as qmp:
        await stored_vm(qmp, "mig", gib)  # every page stored once
        for pps, cap in CASES:
            await qmp.execute(
                "sim-workload-start", {"vm": "mig", "pages-per-second": pps, "vcpus": 2, "seed": 1}
            )
            await asyncio.sleep(1.0)
            image = os.path.join(tmp, "image")
            args = [
                sys.executable,
                "-m",
                "dirtylogctl.cli",
                "-s",
                os.path.join(tmp, "qmp.sock"),
                "--json",
                "migrate",
                "mig",
                image,
                "--verify",
                "--resume",
                "--max-rounds",
                "15",
            ] + (["--max-bandwidth", cap] if cap else [])
            out = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True)
            if not out.stdout.startswith("{"):
                raise SystemExit(f"migrate failed: {out.stderr}")
            doc = json.loads(out.stdout)
            doc["case"] = (pps, cap)
            results.append(doc)
            os.unlink(image)
            await qmp.execute("sim-workload-stop", {"vm": "mig"})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "mode", nargs="?", default="workloads", choices=["workloads", "wire", "downtime"]
    )
    ap.add_argument("--gib", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="wire, downtime: runs")
    ap.add_argument("--pages-per-second", type=int, default=50_000, help="downtime's workload")
    ap.add_argument(
        "--channels", default="1", help="wire: TCP channel counts to migrate with, e.g. 1,2"
    )
    args = ap.parse_args()
    if args.mode != "workloads":
        import migrate_wire

        with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
            if args.mode == "wire":
                counts = tuple(int(n) for n in args.channels.split(","))
                asyncio.run(migrate_wire.run(args.gib, tmp, args.repeats, counts))
            else:
                asyncio.run(
                    migrate_wire.downtime(args.gib, tmp, args.repeats, args.pages_per_second)
                )
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        results = asyncio.run(run(args.gib, tmp))
    print(f"pre-copy of a running {args.gib} GiB guest to a tmpfs image, verified")
    print(
        f"{'workload':>9} {'cap':>6} {'rounds':>6} {'conv':>5} {'total':>8} {'downtime':>9} "
        f"{'predicted':>9} {'resent':>8} {'MB/s':>6} {'overhead':>8} {'verify':>7}"
    )
    for doc in results:
        pps, cap = doc["case"]
        ram = doc["ram"]
        rounds = [r for r in doc["rounds"] if r["copy-ms"] > 0]
        worst = max(r["harvest-ms"] / r["copy-ms"] for r in rounds) if rounds else 0.0
        overhead = sum(r["harvest-ms"] for r in rounds) / max(sum(r["copy-ms"] for r in rounds), 1)
        print(
            f"{pps:>9,} {cap or '-':>6} {ram['dirty-sync-count']:>6} "
            f"{'yes' if doc['converged'] else 'no':>5} {doc['total-time']:>6.0f}ms "
            f"{doc['downtime']:>7.0f}ms {doc['expected-downtime']:>7.0f}ms "
            f"{ram['pages-resent']:>8} {ram['mbps'] / 8:>6.0f} {overhead:>7.1%} {worst:>6.1%} "
            f"{doc['verify']['differing-pages']:>7}"
        )


if __name__ == "__main__":
    main()
