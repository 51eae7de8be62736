"""Pre-copy migration of a running 4 GiB guest with dirtylogctl migrate.

The guest (software MMU, ESOP) first stores to every page once, as a booted guest would have,
then two vCPUs keep storing at 50,000 or 200,000 pages/s (200,000 is about the 800-900 MB/s of
published KVM/QEMU tests). Each case migrates to an image file on tmpfs, with and without a
bandwidth cap, and verifies it. Reported per case: rounds, total time, downtime against QEMU's
prediction (remaining / bandwidth, the rule the switch-over uses), pages sent more than once,
and the round overhead (harvest + bitmap transfer) as a share of the copy time: over all
rounds, and for the worst single round (a short last round copies little).

    python benchmarks/migrate.py                  # six cases, ~4 minutes
    python benchmarks/migrate.py --only slowed    # the 200,000 pages/s guest at 400 MB/s,
                                                  # plain, --auto-converge, --dirty-limit 50
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
SLOWED = ("--auto-converge", "--dirty-limit")
# (pages/s, bandwidth cap, extra migrate flags): the last two slow the guest as QEMU would
CASES: list[tuple[int, str | None, tuple[str, ...]]] = [
    (50_000, None, ()),
    (50_000, "400M", ()),
    (200_000, None, ()),
    (200_000, "400M", ()),
    (200_000, "400M", ("--auto-converge", "--max-rounds", "40")),
    (200_000, "400M", ("--dirty-limit", "50", "--max-rounds", "40")),
]


async def run(gib: int, tmp: str, only_slowed: bool) -> list[dict]:
    results = []
    cases = [c for c in CASES if c[:2] == (200_000, "400M")] if only_slowed else CASES
    async with connected_daemon(tmp) as qmp:
        await stored_vm(qmp, "mig", gib)  # every page stored once
        for pps, cap, extra in cases:
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
            args += extra  # a later --max-rounds wins
            out = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True)
            if not out.stdout.startswith("{"):
                raise SystemExit(f"migrate failed: {out.stderr}")
            doc = json.loads(out.stdout)
            doc["case"] = (pps, cap, next((f for f in extra if f in SLOWED), "-"))
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
    ap.add_argument(
        "--only", choices=["slowed"], help="only the 200,000 pages/s guest at 400 MB/s, three ways"
    )
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
        results = asyncio.run(run(args.gib, tmp, args.only == "slowed"))
    print(f"pre-copy of a running {args.gib} GiB guest to a tmpfs image, verified")
    print(
        f"{'workload':>9} {'cap':>6} {'slowed by':>16} {'rounds':>6} {'conv':>5} {'total':>8} "
        f"{'downtime':>9} "
        f"{'predicted':>9} {'resent':>8} {'MB/s':>6} {'overhead':>8} {'verify':>7}  "
        "guest stores/s: before / during / after"
    )
    for doc in results:
        pps, cap, how = doc["case"]
        ram = doc["ram"]
        rounds = [r for r in doc["rounds"] if r["copy-ms"] > 0]
        worst = max(r["harvest-ms"] / r["copy-ms"] for r in rounds) if rounds else 0.0
        overhead = sum(r["harvest-ms"] for r in rounds) / max(sum(r["copy-ms"] for r in rounds), 1)
        print(
            f"{pps:>9,} {cap or '-':>6} {slowed(how, doc):>16} {ram['dirty-sync-count']:>6} "
            f"{'yes' if doc['converged'] else 'no':>5} {doc['total-time']:>6.0f}ms "
            f"{doc['downtime']:>7.0f}ms {doc['expected-downtime']:>7.0f}ms "
            f"{ram['pages-resent']:>8} {ram['mbps'] / 8:>6.0f} {overhead:>7.1%} {worst:>6.1%} "
            f"{doc['verify']['differing-pages']:>7}  {stores(doc)}"
        )


def slowed(how: str, doc: dict) -> str:
    """What the slow-down did: the throttle's last step, or the limit and its round."""
    conv = doc.get("convergence")
    if conv is None:
        return "-"
    if how == "--auto-converge":
        steps = conv["cpu-throttle-steps"]
        return f"throttle {steps[-1]}%" if steps else "throttle never"
    if conv["dirty-limit-round"] is None:
        return "limit never"
    return f"{conv['vcpu-dirty-limit']} MiB/s r{conv['dirty-limit-round']}"


def stores(doc: dict) -> str:
    """The guest's stores per second before, during and after the slow-down: its cost."""
    conv = doc.get("convergence")
    if conv is None:
        return "-"
    rates = conv["guest-stores-per-second"]
    return " / ".join("-" if rates[k] is None else f"{rates[k]:,.0f}" for k in rates)


if __name__ == "__main__":
    main()
