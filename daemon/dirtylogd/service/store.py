"""What survives a restart: each VM's definition, and — after a graceful stop — every consumer's
pending bits.

    <state-dir>/vms/<vm>.json                       the definition, rewritten on every change
    <state-dir>/vms/<vm>.pending/<consumer>@<slot>  pending bits in KVM's layout (graceful stop)
    <state-dir>/vms/<vm>.skeys/<slot>               the model's guest storage keys, one byte per
                                                    page (graceful stop; softmmu only)

A definition is written with ``clean: false`` whenever it changes and with ``clean: true`` only
after a graceful stop saved the pending bits. A VM restored from an unclean record (the daemon
was killed) cannot know what its consumers missed, so every consumer starts all dirty: when in
doubt, dirty. Files are written to a temporary name and renamed, so a crash mid-write leaves the
previous version; a write that fails removes its temporary file and raises.

What a crash or a full disk can leave in a pending directory never costs a VM: a saved file is
``<consumer>@<slot>`` exactly; a ``<consumer>@<slot>.tmp`` makes that consumer's saved bits
untrusted, and any other entry makes every consumer's untrusted (all dirty on restore).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)
_SAVED = re.compile(r"(?P<consumer>.+)@(?P<slot>[0-9]{1,10})(?P<tmp>\.tmp)?")


@dataclass
class SavedBits:
    """What a graceful stop left for one VM, and which of it cannot be trusted."""

    bits: dict[tuple[str, int], bytes] = field(default_factory=dict)
    untrusted: set[str] = field(default_factory=set)  # consumers whose bits start all dirty
    all_untrusted: bool = False  # an entry nobody can be blamed for: every consumer all dirty

    def trusted(self, consumer: str) -> bool:
        return not self.all_untrusted and consumer not in self.untrusted


@dataclass
class StoredRecord:
    """One record file as found: its VM name (from the file name) and its JSON, or why not."""

    name: str
    path: str
    data: object = None
    error: str | None = None


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

    def _keys_dir(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.skeys")

    def save_keys(self, name: str, slot: int, keys: bytes) -> None:
        directory = self._keys_dir(name)
        os.makedirs(directory, mode=0o750, exist_ok=True)
        _write_atomically(os.path.join(directory, str(slot)), keys)

    def take_keys(self, name: str) -> dict[int, bytes]:
        """The saved storage keys by slot, removed as they are read (good for one restore); a
        file that is not a slot number or cannot be read is skipped with a warning."""
        directory = self._keys_dir(name)
        keys: dict[int, bytes] = {}
        if not os.path.isdir(directory):
            return keys
        for entry in sorted(os.listdir(directory)):
            path = os.path.join(directory, entry)
            try:
                if not entry.isdigit():
                    raise OSError(0, "not a slot's key file")
                with open(path, "rb") as f:
                    keys[int(entry)] = f.read()
            except OSError as exc:
                log.warning("vm %s: ignoring %s: %s", name, path, exc.strerror)
        shutil.rmtree(directory, ignore_errors=True)
        return keys

    def record_path(self, name: str) -> str:
        return self._record(name)

    def delete_vm(self, name: str) -> None:
        """Remove a VM's record and saved bits; raises OSError if either stays."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record(name))
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self._pending_dir(name))
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self._keys_dir(name))

    def save_pending(self, name: str, consumer: str, slot: int, bitmap: bytes) -> None:
        directory = self._pending_dir(name)
        os.makedirs(directory, mode=0o750, exist_ok=True)
        _write_atomically(os.path.join(directory, f"{consumer}@{slot}"), bitmap)

    def take_pending(self, name: str) -> SavedBits:
        """The saved pending bits, removed as they are read: they are good for one restore."""
        directory = self._pending_dir(name)
        saved = SavedBits()
        if not os.path.isdir(directory):
            return saved
        for entry in sorted(os.listdir(directory)):
            found = _SAVED.fullmatch(entry)
            path = os.path.join(directory, entry)
            if found is None or not os.path.isfile(path):
                log.warning("vm %s: unexpected %s; every consumer starts all dirty", name, path)
                saved.all_untrusted = True
            elif found["tmp"]:
                log.warning("vm %s: %s was never completed (an interrupted save)", name, path)
                saved.untrusted.add(found["consumer"])
            else:
                try:
                    with open(path, "rb") as f:
                        saved.bits[(found["consumer"], int(found["slot"]))] = f.read()
                except OSError as exc:
                    log.warning("vm %s: cannot read %s: %s", name, path, exc.strerror)
                    saved.untrusted.add(found["consumer"])
        shutil.rmtree(directory, ignore_errors=True)
        return saved

    def load_all(self) -> list[StoredRecord]:
        """Every ``<name>.json`` (a leftover ``.tmp`` is not a record), parsed or with its error."""
        records = []
        for entry in sorted(os.listdir(self.directory)):
            if not entry.endswith(".json"):
                continue
            path = os.path.join(self.directory, entry)
            stored = StoredRecord(entry[: -len(".json")], path)
            try:
                with open(path, "rb") as f:
                    stored.data = json.load(f)
            except (OSError, ValueError) as exc:
                stored.error = f"unreadable: {exc}"
            records.append(stored)
        return records

    def leftovers(self) -> list[str]:
        """Temporary files an interrupted write left beside the records."""
        return [e for e in sorted(os.listdir(self.directory)) if e.endswith(".tmp")]


def _write_atomically(path: str, data: bytes) -> None:
    """All of ``data`` at ``path`` or, raising, nothing new there and no temporary file left."""
    tmp = f"{path}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        with open(fd, "wb") as f:  # a buffered write raises unless every byte was written
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
