"""What survives a restart: each VM's definition, and — after a graceful stop — every consumer's
pending bits.

    <state-dir>/vms/<vm>.json                       the definition, rewritten on every change
    <state-dir>/vms/<vm>.pending/<consumer>@<slot>  pending bits in KVM's layout (graceful stop)

A definition is written with ``clean: false`` whenever it changes and with ``clean: true`` only
after a graceful stop saved the pending bits. A VM restored from an unclean record (the daemon
was killed) cannot know what its consumers missed, so every consumer starts all dirty: when in
doubt, dirty. Files are written to a temporary name and renamed, so a crash mid-write leaves the
previous version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Any

log = logging.getLogger(__name__)


class StateStore:
    def __init__(self, directory: str) -> None:
        self.directory = os.path.join(directory, "vms")
        os.makedirs(self.directory, mode=0o750, exist_ok=True)

    def _record(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.json")

    def _pending_dir(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.pending")

    def save_vm(self, record: dict[str, Any]) -> None:
        _write_atomically(self._record(record["name"]), json.dumps(record, indent=2).encode())

    def delete_vm(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record(name))
        shutil.rmtree(self._pending_dir(name), ignore_errors=True)

    def save_pending(self, name: str, consumer: str, slot: int, bitmap: bytes) -> None:
        directory = self._pending_dir(name)
        os.makedirs(directory, mode=0o750, exist_ok=True)
        _write_atomically(os.path.join(directory, f"{consumer}@{slot}"), bitmap)

    def take_pending(self, name: str) -> dict[tuple[str, int], bytes]:
        """The saved pending bits, removed as they are read: they are good for one restore."""
        directory = self._pending_dir(name)
        found: dict[tuple[str, int], bytes] = {}
        if os.path.isdir(directory):
            for entry in os.listdir(directory):
                consumer, _, slot = entry.rpartition("@")
                with open(os.path.join(directory, entry), "rb") as f:
                    found[(consumer, int(slot))] = f.read()
            shutil.rmtree(directory)
        return found

    def load_all(self) -> list[dict[str, Any]]:
        records = []
        for entry in sorted(os.listdir(self.directory)):
            if not entry.endswith(".json"):
                continue
            path = os.path.join(self.directory, entry)
            try:
                with open(path, "rb") as f:
                    records.append(json.load(f))
            except (OSError, ValueError) as exc:
                log.error("ignoring unreadable VM record %s: %s", path, exc)
        return records


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
