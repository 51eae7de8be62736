"""The storage-key pass of a migration: an s390 guest's keys, read with ``storage-keys-get``
and sent once, at switch-over.

Why once, at the end: QEMU saves its "s390-skeys" section with ``save_state`` only — no
``save_setup``/``save_live_iterate`` — so it is a non-iterable section, written by
``qemu_savevm_state_complete_precopy_non_iterable`` after the final RAM pass, with the VM
stopped (hw/s390x/s390-skeys.c ``s390_storage_keys_save``, migration/savevm.c). Nothing is
lost meanwhile: a guest key change is a change of its page (``set_guest_storage_key`` sets
PGSTE_UC), so pre-copy resends that page like any store, and the final pass reads every key as
it is after the last store. The keys of 4 GiB of guest are 1 MiB: one ioctl
(KVM_S390_SKEYS_MAX keys), one KEYS frame.

Where there are no keys (the kvm backend on x86: KVM_CAP_S390_SKEYS is 0) nothing is sent and
``--verify`` says the keys were not compared, and why.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dirtylogctl.stream import Sink
from dirtylogctl.wireformat import MAX_KEYS_PER_FRAME, MAX_VERIFY_KEYS, PAGE_SIZE

Execute = Callable[[str, dict[str, Any]], Awaitable[Any]]


@dataclass
class KeyStats:
    """What became of the storage keys; ``why_not`` is set when they were not carried."""

    carried: bool = False
    why_not: str | None = None
    keys: int = 0  # keys sent (one byte each)
    seconds: float = 0.0  # reading and sending them, inside the downtime
    guest_uses_keys: bool = True  # False: KVM_S390_GET_SKEYS_NONE, every key sent as 0
    differing: list[int] | None = None  # after --verify: pages whose key differs

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": self.carried,
            "bytes": self.keys,
            "ms": round(self.seconds * 1e3, 3),
            "guest-uses-keys": self.guest_uses_keys,
            "not-sent-because": self.why_not,
        }

    def verify_json(self) -> dict[str, Any]:
        if not self.carried or self.differing is None:
            return {"compared": False, "why": self.why_not}
        return {
            "compared": True,
            "differing-keys": len(self.differing),
            "first": [hex(g) for g in self.differing[:8]],
        }


def why_not_carried(vm: dict[str, Any]) -> str | None:
    """None if the VM (a query-vms entry) has storage keys to carry; else the reason."""
    caps = vm.get("capabilities", {})
    have = caps.get("s390-skeys")
    if have is None:
        return "the daemon does not report KVM_CAP_S390_SKEYS (it has no storage-keys-get)"
    if have:
        return None
    where = f"the {vm.get('backend', '?')} backend"
    if caps.get("arch"):
        where += f" on {caps['arch']}"
    return f"{where} has no storage keys (KVM_CAP_S390_SKEYS is 0)"


@dataclass(frozen=True)
class Range:
    """A run of guest pages whose keys travel together: one memslot."""

    gpa: int
    npages: int

    def chunks(self, most: int) -> Iterator[tuple[int, int]]:
        """(first page, count) pieces of at most ``most`` pages."""
        for start in range(0, self.npages, most):
            yield start, min(most, self.npages - start)


class KeyPass:
    """Reads keys through the daemon into the driver's memfd, and sends or verifies them."""

    def __init__(self, execute: Execute, vm: str, fd: int, fdname: str) -> None:
        self.execute, self.vm, self.fd, self.fdname = execute, vm, fd, fdname
        self.guest_uses_keys = True

    async def read(self, gpa: int, count: int) -> np.ndarray:
        """The keys of ``count`` pages from ``gpa`` (at most KVM_S390_SKEYS_MAX): zeros where
        the guest uses none (KVM_S390_GET_SKEYS_NONE), which is what every key then is."""
        reply = await self.execute(
            "storage-keys-get",
            {
                "vm": self.vm,
                "start-gfn": gpa // PAGE_SIZE,
                "count": count,
                "encoding": "fd",
                "fdname": self.fdname,
            },
        )
        if not reply["uses-keys"]:
            self.guest_uses_keys = False
            return np.zeros(count, np.uint8)
        return np.frombuffer(os.pread(self.fd, count, 0), np.uint8, count)

    async def time_read(self, ranges: list[Range]) -> float:
        """Seconds to read every key once: the switch-over's key pass, for its prediction."""
        started = time.monotonic()
        for r in ranges:
            for start, count in r.chunks(MAX_KEYS_PER_FRAME):
                await self.read(r.gpa + start * PAGE_SIZE, count)
        return time.monotonic() - started

    async def send(self, ranges: list[Range], sink: Sink, stats: KeyStats) -> None:
        """Every page's key, once, in header order: slot by slot, up from each first page."""
        started = time.monotonic()
        for r in ranges:
            for start, count in r.chunks(MAX_KEYS_PER_FRAME):
                gpa = r.gpa + start * PAGE_SIZE
                sink.send_keys(gpa, await self.read(gpa, count))
                stats.keys += count
        stats.seconds = time.monotonic() - started
        stats.guest_uses_keys = self.guest_uses_keys

    async def verify(self, ranges: list[Range], sink: Sink) -> list[int]:
        """The guest addresses of the pages whose key at the destination differs."""
        differing: list[int] = []
        for r in ranges:
            for start, count in r.chunks(MAX_KEYS_PER_FRAME):
                gpa = r.gpa + start * PAGE_SIZE
                keys = await self.read(gpa, count)
                for at in range(0, count, MAX_VERIFY_KEYS):
                    part = keys[at : at + MAX_VERIFY_KEYS]
                    differing += sink.verify_keys(gpa + at * PAGE_SIZE, part)
                    await asyncio.sleep(0)  # let Ctrl-C in between frames
        return sorted(differing)
