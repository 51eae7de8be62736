"""What a hostile peer costs a ``dirtylogctl migrate-receive``: memory and time.

migrate-receive listens without authentication. Each attack gets a fresh receiver process
(whatever ``dirtylogctl`` is on PYTHONPATH, so a checkout before a fix can be measured the
same way) and reports what it did to the receiver:

* ``verify-limit`` — a valid header (one 64 MiB slot), DONE, then a VERIFY of the most pages
  a frame may name (16,384 in 256 KiB): the growth of the receiver's peak RSS (VmHWM), and of
  that the part that is not the image's mapped file pages (RssFile), which are page cache;
* ``verify-2^18`` — then the head of a VERIFY of 2^18 pages: what the receiver answers;
* ``header-limit`` — the largest header the format allows, all ``{}`` (the costliest JSON);
* ``idle`` — a peer that connects and sends nothing, with an honest sender queued behind it:
  how long the idle peer holds the receiver, and when the honest sender gets its ACK.

    python benchmarks/hostile_receiver.py                         # idle timeout: the default
    python benchmarks/hostile_receiver.py --receiver-args "--idle-timeout 5"
    python benchmarks/hostile_receiver.py --idle-cap 60           # give up waiting after 60 s
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dirtylogctl import wireformat as wf

MiB = 1 << 20


@contextmanager
def receiver(extra: list[str]) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A migrate-receive on an ephemeral loopback port, its output in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dirtylogctl.cli", "migrate-receive", "--listen",
             "127.0.0.1:0", "--output", str(Path(tmp) / "img"), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("listening on"):
            raise SystemExit(f"the receiver did not start: {line}")
        try:
            yield proc, int(line.rsplit(":", 1)[1])
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def memory(pid: int) -> dict[str, int]:
    """Peak RSS, file-backed RSS and RSS of ``pid``, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "RssFile", "VmRSS")}


def peak(proc: subprocess.Popen[str]) -> int:
    """The peak RSS of the receiver so far, in bytes; if it has exited (a receiver that ends
    on a refused stream), from its rusage as it is reaped."""
    try:
        return memory(proc.pid)["VmHWM"]
    except (KeyError, FileNotFoundError):  # a zombie's status has no memory lines
        _pid, _status, usage = os.wait4(proc.pid, 0)
        return usage.ru_maxrss * 1024


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := sock.recv(n - len(data))):
        data += chunk
    return data


def reply(sock: socket.socket) -> str:
    """Whatever the receiver answered, as text: ERR's reason, or the tag."""
    tag = recv_exactly(sock, 4)
    if tag == wf.ERR:
        (length,) = struct.unpack("<I", recv_exactly(sock, 4))
        return "ERR " + recv_exactly(sock, length).decode(errors="replace")
    if tag == wf.ACK:
        return f"ACK {struct.unpack('<Q', recv_exactly(sock, 8))[0]}"
    if tag == wf.DIFF:
        (count,) = struct.unpack("<I", recv_exactly(sock, 4))
        recv_exactly(sock, 8 * count)
        return f"DIFF {count}"
    return tag.decode(errors="replace") or "(closed)"


def verify_attack(extra: list[str]) -> dict[str, object]:
    pages = wf.MAX_VERIFY_PAGES
    with receiver(extra) as (proc, port), socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(60)
        s.sendall(wf.encode_header(wf.Header("x", (wf.SlotInfo(0, 0, pages),))))
        s.sendall(wf.done_frame(0))
        assert recv_exactly(s, 12)[:4] == wf.ACK
        before = memory(proc.pid)
        gpas = np.arange(pages) * wf.PAGE_SIZE
        zero = wf.page_digests(np.zeros((1, wf.PAGE_SIZE), np.uint8), 1)
        started = time.monotonic()
        s.sendall(wf.verify_frame(1, gpas, zero.repeat(pages)))
        answered = reply(s)
        took = time.monotonic() - started
        after = memory(proc.pid)
        s.sendall(struct.pack("<BIQ", wf.Kind.VERIFY, 1 << 18, 0))
        started = time.monotonic()
        oversized = reply(s)
        refused_in = time.monotonic() - started
        time.sleep(0.2)
        after["VmHWM"] = max(after["VmHWM"], peak(proc))
    grew = after["VmHWM"] - before["VmHWM"]
    cache = after["RssFile"] - before["RssFile"]
    return {
        "verify-limit": {
            "pages": pages,
            "answer": answered,
            "seconds": round(took, 3),
            "baseline_rss_mib": round(before["VmRSS"] / MiB, 1),
            "peak_rss_growth_mib": round(grew / MiB, 1),
            "of_which_image_page_cache_mib": round(cache / MiB, 1),
            "peak_growth_besides_the_image_mib": round((grew - cache) / MiB, 1),
        },
        "verify-2^18": {"answer": oversized, "seconds": round(refused_in, 3)},
    }


def header_attack(extra: list[str]) -> dict[str, object]:
    prefix = b'{"version": 1, "page-size": 4096, "vm": "x", "slots": ['
    items = (wf.MAX_HEADER_BYTES - len(prefix)) // 4
    meta = prefix + (b"{}, " * items).rstrip(b", ") + b"]}"
    with receiver(extra) as (proc, port), socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(60)
        before = memory(proc.pid)
        s.sendall(wf.MAGIC + struct.pack("<I", len(meta)) + meta)
        answered = reply(s)
        time.sleep(0.2)
        grew = peak(proc) - before["VmHWM"]
    return {
        "header-limit": {
            "header_bytes": len(meta),
            "answer": answered[:90],
            "peak_rss_growth_mib": round(grew / MiB, 1),
        }
    }


def idle_attack(extra: list[str], cap: float) -> dict[str, object]:
    with receiver(extra) as (_proc, port):
        idle = socket.create_connection(("127.0.0.1", port))
        connected = time.monotonic()
        honest: dict[str, object] = {}

        def sender() -> None:
            """An honest (tiny) migration, queued behind the idle peer."""
            try:
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.settimeout(cap)
                    s.sendall(wf.encode_header(wf.Header("x", (wf.SlotInfo(0, 0, 1),))))
                    s.sendall(wf.pages_frame(np.array([0]), np.ones(wf.PAGE_SIZE, np.uint8)))
                    s.sendall(wf.done_frame(1))
                    honest["answer"] = reply(s)
            except OSError as exc:
                honest["answer"] = str(exc)
            honest["after_s"] = round(time.monotonic() - connected, 2)

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        idle.settimeout(cap)
        try:
            said = reply(idle)
            held = round(time.monotonic() - connected, 2)
        except TimeoutError:
            said, held = f"nothing: still held after {cap:g} s", None
        thread.join(cap)
        idle.close()
    return {"idle": {"held_s": held, "idle_peer_heard": said, "honest_sender": honest}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receiver-args", default="", help="extra migrate-receive arguments")
    parser.add_argument("--idle-cap", type=float, default=45.0, help="longest wait, seconds")
    args = parser.parse_args()
    extra = shlex.split(args.receiver_args)
    results: dict[str, object] = {}
    results.update(verify_attack(extra))
    results.update(header_attack(extra))
    results.update(idle_attack(extra, args.idle_cap))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
