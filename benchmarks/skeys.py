"""What carrying the storage keys costs a migration: bytes, and time inside the downtime.

For a 1 GiB and a 4 GiB guest (software MMU, ESOP, every page stored once, so every pte is
valid and each key is a gather of the real key array): the read alone — ``storage-keys-get``
of every page into a memfd, as the driver does, median of 5 — and whole migrations to a tmpfs
image with two vCPUs storing 5,000 pages/s, verified: the key pass's bytes and milliseconds
against the downtime, and the keys' verification (outside the downtime).

    python benchmarks/skeys.py            # 1 and 4 GiB, ~1 minute
    python benchmarks/skeys.py --gib 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from daemon_client import connected_daemon, socket_path

GiB = 1 << 30
MAX_KEYS = 1 << 20  # KVM_S390_SKEYS_MAX
CTL = [sys.executable, "-m", "dirtylogctl.cli"]


async def read_all(qmp, npages: int, base_gfn: int) -> float:
    """Seconds to read every key through storage-keys-get into a memfd, as the driver does."""
    started = time.perf_counter()
    for start in range(0, npages, MAX_KEYS):
        count = min(MAX_KEYS, npages - start)
        await qmp.execute(
            "storage-keys-get",
            {"vm": "keys", "start-gfn": base_gfn + start, "count": count, "encoding": "fd"}
            | {"fdname": "keys"},
        )
    return time.perf_counter() - started


async def case(gib: int, tmp: str) -> dict:
    async with connected_daemon(tmp) as qmp:
        npages, base = gib * GiB // 4096, 4 * GiB
        await qmp.execute(
            "vm-create",
            {
                "name": "keys",
                "backend": "softmmu",
                "memslots": [{"slot": 0, "guest-phys-addr": base, "size": gib * GiB}],
            },
        )
        gfns = np.arange(npages) + (base >> 12)
        for i in range(0, npages, 65536):  # every page stored once: valid ptes, keys R|C
            await qmp.execute(
                "sim-write-pages", {"vm": "keys", "gfns": gfns[i : i + 65536].tolist(), "value": 1}
            )
        fd = os.memfd_create("keys")
        qmp.send_fd_scm(fd)
        await qmp.execute("getfd", {"fdname": "keys"})
        reads = [await read_all(qmp, npages, base >> 12) for _ in range(5)]
        os.close(fd)
        await qmp.execute(
            "sim-workload-start", {"vm": "keys", "pages-per-second": 5000, "vcpus": 2, "seed": 1}
        )
        await asyncio.sleep(1.0)
        runs = []
        for _ in range(3):
            image = os.path.join(tmp, "image")
            started = time.monotonic()
            migrate = ["migrate", "keys", image, "--verify", "--resume"]
            out = await asyncio.to_thread(
                subprocess.run,
                [*CTL, "-s", socket_path(tmp), "--json", *migrate],
                capture_output=True,
                text=True,
            )
            if not out.stdout.startswith("{"):
                raise SystemExit(f"migrate failed: {out.stderr}")
            doc = json.loads(out.stdout)
            doc["wall"] = time.monotonic() - started
            runs.append(doc)
            os.unlink(image)
            os.unlink(image + ".skeys")
        return {"gib": gib, "read": statistics.median(reads), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gib", type=int, action="append")
    gibs = ap.parse_args().gib or [1, 4]
    print("storage keys of a guest whose every page was stored once; tmpfs image, verified")
    print(
        f"{'guest':>6} {'keys':>9} {'read':>8} {'key pass':>9} {'downtime':>9} {'share':>6} "
        f"{'differ':>7}"
    )
    for gib in gibs:
        with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
            result = asyncio.run(case(gib, tmp))
        for doc in result["runs"]:
            keys = doc["storage-keys"]
            assert keys["sent"] and doc["verify"]["storage-keys"]["differing-keys"] == 0
            print(
                f"{gib:>4}Gi {keys['bytes'] / 1024:>7.0f}Ki {result['read'] * 1e3:>6.1f}ms "
                f"{keys['ms']:>7.1f}ms {doc['downtime']:>7.1f}ms "
                f"{keys['ms'] / max(doc['downtime'], 1e-9):>6.1%} "
                f"{doc['verify']['storage-keys']['differing-keys']:>7}"
            )


if __name__ == "__main__":
    main()
