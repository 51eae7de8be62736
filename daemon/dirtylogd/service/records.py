"""A VM's saved record: built from its state, read back into creation arguments.

The state store (:mod:`dirtylogd.service.store`) only reads and writes these records; the
registry (:mod:`dirtylogd.service.registry`) decides when. A record written while the daemon
runs says ``clean: false``; only a graceful stop, after saving every consumer's pending bits,
writes ``clean: true``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dirtylogd.service.store import StoredRecord
from dirtylogd.service.vm import DEFAULT_CONSUMER, VmState
from kvmshim.backends import BACKENDS, WorkloadSpec
from kvmshim.s390.generations import KERNELS

RECORD_VERSION = 1


@dataclass(frozen=True)
class UnavailableVm:
    """A VM the state store has a record of but the daemon cannot serve (restore policy)."""

    name: str
    status: str  # "ram-lost" (its RAM file is gone, e.g. after a reboot) or "unrestorable"
    reason: str
    record: str  # the record's path, kept until vm-remove

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "record": self.record,
        }


class RecordError(Exception):
    """A record the daemon did not write, or cannot use; the text says what is wrong."""


def vm_record(
    vm: VmState, clean: bool = False, workload: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The record of ``vm``; ``workload`` overrides the running one (a stop already ended it)."""
    backend = vm.backend
    memslots = []
    for state in sorted(vm.slots.values(), key=lambda s: s.memslot.slot):
        m = state.memslot
        region = backend.ram_region(m.slot)
        memslots.append(
            {
                "slot": m.id,
                "as-id": m.as_id,
                "guest-phys-addr": m.guest_phys_addr,
                "size": m.memory_size,
                "log-dirty-pages": m.log_dirty_pages,
                "ram-offset": region.offset if region else None,
            }
        )
    if workload is None:
        workload = running_workload(vm)
    return {
        "version": RECORD_VERSION,
        "name": vm.name,
        "backend": backend.kind,
        **backend.options(),
        "ram-path": backend.ram_path,
        "memslots": memslots,
        "consumers": [
            {"name": c.name, "manual-protect": c.manual_protect, "initially-set": c.initially_set}
            for c in vm.consumers.values()
            if c.name != DEFAULT_CONSUMER and not c.internal
        ],
        "paused": vm.user_paused,
        "workload": workload,
        "clean": clean,
    }


def running_workload(vm: VmState) -> dict[str, Any] | None:
    """The workload spec of ``vm`` as a record field, or None if no workload runs."""
    status = vm.backend.workload_status()
    return None if status is None else workload_spec(status.spec)


def workload_spec(spec: WorkloadSpec) -> dict[str, Any]:
    out = dataclasses.asdict(spec)
    out["pattern"] = str(spec.pattern)
    return out


# --- reading a record back ---------------------------------------------------------------------
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _u64(v: object) -> bool:
    return _is_int(v) and 0 <= v < 1 << 64  # type: ignore[operator]


def _u16(v: object) -> bool:
    return _is_int(v) and 0 <= v <= 0xFFFF  # type: ignore[operator]


def _bool(v: object) -> bool:
    return isinstance(v, bool)


def _str(v: object) -> bool:
    return isinstance(v, str) and v != ""


_MEMSLOT: dict[str, Callable[[object], bool]] = {
    "slot": _u16,
    "as-id": _u16,
    "guest-phys-addr": _u64,
    "size": _u64,
    "log-dirty-pages": _bool,
    "ram-offset": _u64,
}
_CONSUMER: dict[str, Callable[[object], bool]] = {
    "name": _str,
    "manual-protect": _bool,
    "initially-set": _bool,
}


def _check_fields(obj: object, fields: dict[str, Callable[[object], bool]], where: str) -> None:
    if not isinstance(obj, dict):
        raise RecordError(f"{where} is not an object")
    for key, ok in fields.items():
        if key not in obj:
            raise RecordError(f"{where} lacks '{key}'")
        if not ok(obj[key]):
            raise RecordError(f"{where} has an unusable '{key}': {obj[key]!r}")


def parse_record(stored: StoredRecord) -> dict[str, Any]:
    """The record's fields, checked to be what :func:`vm_record` writes; RecordError if not.

    The file name is the VM's identity (the store writes ``<name>.json``): a record that names
    another VM is refused rather than restored under either name.
    """
    if stored.error is not None:
        raise RecordError(stored.error)
    data = stored.data
    if not isinstance(data, dict):
        raise RecordError(f"not a VM record (a JSON {type(data).__name__}, not an object)")
    if data.get("version") != RECORD_VERSION:
        raise RecordError(f"record version {data.get('version')!r} is not {RECORD_VERSION}")
    if data.get("name") != stored.name:
        raise RecordError(f"it names vm {data.get('name')!r} but is stored as {stored.name!r}")
    backend = data.get("backend")
    if not isinstance(backend, str) or backend not in BACKENDS or backend == "auto":
        raise RecordError(f"unknown backend {backend!r}")
    path = data.get("ram-path")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise RecordError(f"unusable ram-path {path!r}")
    for key in ("paused", "clean"):
        if not _bool(data.get(key)):
            raise RecordError(f"'{key}' is not a boolean")
    if "esop" in data and not _bool(data["esop"]):
        raise RecordError("'esop' is not a boolean")
    if "kernel" in data and data["kernel"] not in KERNELS:
        raise RecordError(f"unknown kernel {data['kernel']!r}")
    if "hugepages" in data and not _bool(data["hugepages"]):
        raise RecordError("'hugepages' is not a boolean")
    for what, fields in (("memslots", _MEMSLOT), ("consumers", _CONSUMER)):
        items = data.get(what)
        if not isinstance(items, list):
            raise RecordError(f"'{what}' is not a list")
        for i, item in enumerate(items):
            _check_fields(item, fields, f"{what}[{i}]")
    if data.get("workload") is not None and not isinstance(data["workload"], dict):
        raise RecordError("'workload' is neither null nor an object")
    return data


def record_with(
    vm: VmState, slot: int, as_id: int, size: int, log_dirty_pages: bool
) -> dict[str, Any]:
    """The VM's record as it will be once a slot is deleted (size 0) or stops logging."""
    record = vm_record(vm)
    kept = []
    for m in record["memslots"]:
        if (m["slot"], m["as-id"]) == (slot, as_id):
            if size == 0:
                continue
            m = {**m, "log-dirty-pages": log_dirty_pages}
        kept.append(m)
    record["memslots"] = kept
    return record
