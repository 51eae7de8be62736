"""Storage keys migrate too: a guest changing keys while pre-copy runs ends with the source's
keys beside the destination image, and --verify compares them; a destination holding a wrong
key is named. (The kvm backend, which has none: tests/kernel/test_kvm_migrate.py.)"""

import base64
import random
import socket
import subprocess
import sys
import threading
import time
import zlib
from contextlib import suppress

import numpy as np
import pytest

from dirtylogctl.wireformat import (
    CRC,
    FRAME_HEAD,
    FRAMES,
    HEADER_LENGTH,
    MAGIC,
    PAGE_SIZE,
    Kind,
)

from .test_migrate import migrate, receiver, vm_state

MiB = 1 << 20
CTL = [sys.executable, "-m", "dirtylogctl.cli"]


class KeyChanger(threading.Thread):
    """A guest changing storage keys (sim-set-storage-key: an intercepted PFMF) until the
    source is stopped; it remembers the last key it gave each page.

    1. it sets a key, then asks whether the VM is paused;
    2. the driver's stop lands between two of its sets at the latest;
    3. a set that overlapped the stop is in the final GET (it set UC) and in the key pass,
       which follows the final page copy, milliseconds after the stop — long after that set's
       reply. So every key it set is a key the source holds at the key pass."""

    def __init__(self, daemon, vm, pages):
        super().__init__(daemon=True)
        self.daemon_, self.vm, self.pages = daemon, vm, pages
        self.last: dict[int, int] = {}
        self.before_pause = 0
        self.stop_asked = threading.Event()

    def run(self):
        rng = random.Random(5)
        with self.daemon_.client() as q:
            while not self.stop_asked.is_set():
                gfn = rng.choice(self.pages)
                key = rng.randrange(32) << 3  # ACC and F; R = C = 0 (stores may add them)
                q("sim-set-storage-key", vm=self.vm, guest_phys_addr=gfn * PAGE_SIZE, key=key)
                self.last[gfn] = key
                if vm_state(q, self.vm)["paused"]:
                    return
                self.before_pause += 1
                time.sleep(0.005)


def source_keys(qmp, vm):
    """Every page's key of the (paused) source, slot by slot in query-vms order — the order of
    the stream header, so of the destination's key file."""
    keys = b""
    for m in vm_state(qmp, vm)["memslots"]:
        start = m["guest-phys-addr"] // PAGE_SIZE
        got = qmp("storage-keys-get", vm=vm, start_gfn=start, count=m["npages"])
        assert got["uses-keys"] is True
        keys += base64.b64decode(got["keys"])
    return keys


@pytest.mark.parametrize(
    ("model", "pps", "bandwidth"),
    [
        ({}, 20_000, "40M"),
        # 1 MiB pages: a key change sets no dirty state at all (4.19 set_guest_storage_key on a
        # large pmd), so only the key pass carries it; a slow guest, or every round would send
        # every segment
        ({"kernel": "4.19", "hugepages": True}, 20, "100M"),
    ],
    ids=["3.16", "4.19-1M"],
)
def test_keys_changed_during_the_rounds_reach_the_destination(
    daemon, qmp, running_vm, tmp_path, model, pps, bandwidth
):
    vm = running_vm(pps=pps, **model)  # 64 MiB, two slots; two vCPUs storing
    slots = vm_state(qmp, vm)["memslots"]
    pages = [m["guest-phys-addr"] // PAGE_SIZE + p for m in slots for p in range(0, m["npages"], 7)]
    changer = KeyChanger(daemon, vm, pages)
    with receiver(tmp_path / "remote.img") as (proc, port):
        changer.start()
        # round 0 takes ~1.7 s (~0.7 s), so keys change during the rounds, not only before
        out, doc = migrate(
            daemon, vm, f"tcp:127.0.0.1:{port}", "--verify", "--max-bandwidth", bandwidth
        )
        changer.stop_asked.set()
        changer.join(30)
        assert out.returncode == 0, out.stderr
        assert proc.wait(30) == 0
        said = proc.stdout.read()
    assert changer.before_pause >= 20, changer.before_pause
    assert doc["storage-keys"] == {
        "sent": True,
        "bytes": 64 * MiB // PAGE_SIZE,
        "ms": doc["storage-keys"]["ms"],
        "guest-uses-keys": True,
        "not-sent-because": None,
    }
    assert doc["rounds"][-1]["key-bytes"] == 64 * MiB // PAGE_SIZE  # inside the downtime
    assert doc["storage-keys"]["ms"] <= doc["downtime"]
    assert doc["verify"]["storage-keys"] == {"compared": True, "differing-keys": 0, "first": []}
    assert "and 16384 storage keys" in said and "verified 16384 keys (0 differ)" in said
    # the destination's key file is the paused source's keys, byte for byte ...
    dest = (tmp_path / "remote.img.skeys").read_bytes()
    assert dest == source_keys(qmp, vm)
    # ... and holds the last key the guest gave each page it changed (R/C aside)
    for gfn, key in changer.last.items():
        at = next(
            sum(m["npages"] for m in slots[:i]) + gfn - m["guest-phys-addr"] // PAGE_SIZE
            for i, m in enumerate(slots)
            if 0 <= gfn - m["guest-phys-addr"] // PAGE_SIZE < m["npages"]
        )
        assert dest[at] & 0xF8 == key, (hex(gfn), dest[at], key)


def test_keys_in_the_plain_report_and_the_file_destination(daemon, qmp, running_vm, tmp_path):
    vm = running_vm(pps=2_000)
    qmp("sim-set-storage-key", vm=vm, guest_phys_addr=(4 << 30) + 5 * PAGE_SIZE, key=0x58)
    out = subprocess.run(
        [*CTL, "-s", daemon.socket, "migrate", vm, str(tmp_path / "local.img"), "--verify"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(
        line.startswith("storage keys: 16384 (16.0 KiB) sent in ") and "inside the downtime" in line
        for line in lines
    ), out.stdout
    assert "verify: the destination's storage keys equal the paused source's (16384)" in lines
    last_round = [line for line in lines if line.startswith("round ")][-1]
    assert "; storage keys 16.0 KiB in " in last_round, last_round
    assert (tmp_path / "local.img.skeys").read_bytes()[5] & 0xF8 == 0x58


class KeyCorruptingProxy(threading.Thread):
    """Forwards one migration, frame by frame, changing the key of the first page of the first
    KEYS frame and fixing the frame's checksum: a destination that stored a wrong key."""

    def __init__(self, target_port):
        super().__init__(daemon=True)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target = target_port
        self.changed_gpa: int | None = None

    def run(self):
        conn, _ = self.server.accept()
        up = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self.back, args=(up, conn), daemon=True).start()
        try:
            head = exactly(conn, len(MAGIC) + HEADER_LENGTH.size)
            (length,) = HEADER_LENGTH.unpack_from(head, len(MAGIC))
            up.sendall(head + exactly(conn, length))
            while frame := exactly(conn, FRAME_HEAD.size):
                kind, count, aux = FRAME_HEAD.unpack(frame)
                body = exactly(conn, FRAMES[Kind(kind)].payload_size(count) + CRC.size)
                if kind == Kind.KEYS and self.changed_gpa is None:
                    payload = bytearray(body[: -CRC.size])
                    payload[0] ^= 0x10  # another access-control value
                    crc = zlib.crc32(bytes(payload), zlib.crc32(frame))
                    body = bytes(payload) + CRC.pack(crc)
                    self.changed_gpa = aux
                up.sendall(frame + body)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                up.shutdown(socket.SHUT_WR)

    @staticmethod
    def back(src, dst):
        with suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def exactly(sock, n):
    data = b""
    while len(data) < n and (chunk := sock.recv(n - len(data))):
        data += chunk
    if data and len(data) < n:
        raise OSError("cut")
    return data


def test_a_wrong_key_at_the_destination_is_named_by_verify(daemon, running_vm, tmp_path):
    vm = running_vm(pps=2_000)
    with receiver(tmp_path / "remote.img") as (proc, port):
        proxy = KeyCorruptingProxy(port)
        proxy.start()
        out, doc = migrate(daemon, vm, f"tcp:127.0.0.1:{proxy.port}", "--verify")
        assert proc.wait(30) == 0
    assert out.returncode == 5, out.stderr  # verified, and different
    assert doc["verify"]["differing-pages"] == 0  # the pages are right ...
    assert doc["verify"]["storage-keys"] == {  # ... one key is not, and it is named
        "compared": True,
        "differing-keys": 1,
        "first": [hex(proxy.changed_gpa)],
    }
    assert np.frombuffer((tmp_path / "remote.img.skeys").read_bytes(), np.uint8).size == 16384
