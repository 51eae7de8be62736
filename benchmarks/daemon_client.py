"""A dirtylogd process for benchmarks, and a qemu.qmp client connected to it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from qemu.qmp import QMPClient


def socket_path(tmp: str) -> str:
    """Where connected_daemon's daemon listens, for further clients."""
    return os.path.join(tmp, "qmp.sock")


@asynccontextmanager
async def connected_daemon(tmp: str, *extra: str) -> AsyncIterator[QMPClient]:
    """Start ``python -m dirtylogd`` with its socket and RAM under ``tmp`` (and ``extra``
    flags); yield a client."""
    sock = socket_path(tmp)
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dirtylogd",
            "--socket",
            sock,
            "--runtime-dir",
            os.path.join(tmp, "vms"),
            "--state-dir",
            "none",
            "--metrics-listen",
            "none",
            "--log-level",
            "warning",
            *extra,
        ]
    )
    try:
        for _ in range(400):
            if os.path.exists(sock):
                break
            await asyncio.sleep(0.05)
        client = QMPClient("bench")
        await client.connect(sock)
        try:
            yield client
        finally:
            await client.disconnect()
    finally:
        daemon.terminate()
        daemon.wait(30)


async def stored_vm(qmp: QMPClient, name: str, gib: int, base: int = 4 << 30) -> None:
    """A softmmu VM of one ``gib`` GiB slot at guest address ``base``, every page stored once
    (the migration benchmarks' starting point)."""
    await qmp.execute(
        "vm-create",
        {
            "name": name,
            "backend": "softmmu",
            "memslots": [{"slot": 0, "guest-phys-addr": base, "size": gib << 30}],
        },
    )
    first, npages = base >> 12, (gib << 30) >> 12
    for i in range(0, npages, 65536):
        gfns = list(range(first + i, first + min(i + 65536, npages)))
        await qmp.execute("sim-write-pages", {"vm": name, "gfns": gfns, "value": 1})
