"""A reference pre-copy migration driver: what a migration tool does with the daemon.

1. Register a consumer of its own (manual protect, initially set), so no other consumer loses
   a bit; map the VM's RAM file read-only.
2. Round 0 sends every page (the initially-set bitmap says all are dirty). Each later round:
   GET the dirty pages; if the switch-over would fit the downtime limit (QEMU's rule, remaining
   / bandwidth, made whole: see ``_predict``), switch over;
   else CLEAR them, then read and send them — clear *before* reading, so a store during the
   copy sets the bit again and is sent next round.
3. Switch-over (converged, or after ``max_rounds``): ``stop`` the VM, a final GET/CLEAR/copy,
   slots without dirty logging in full, then every page's storage key (s390; once, as QEMU's
   non-iterable s390-skeys section, see :mod:`dirtylogctl.skeys`), and wait for the
   destination's acknowledgement that every page and key is in the image. The downtime
   reported is the time actually spent between ``stop`` and that acknowledgement, the keys
   included; the destination's flush (fsync, the image put in place) follows, outside it —
   the destination holds the state once it has it, as QEMU's does in memory.
4. ``verify``: compare the destination with the paused source, page by page, then key by key.

On any failure — Ctrl-C included, which cancels the driver at its next await (the copy
awaits between frames, so within one frame) — the source is resumed if we stopped it and our
consumer is removed; on success it stays stopped (as QEMU's source does) unless asked to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from qemu.qmp import ExecuteError, QMPClient, QMPError

from dirtylogctl.skeys import KeyPass, KeyStats, Range, why_not_carried
from dirtylogctl.stream import FileSink, Run, Sink, TcpSink
from dirtylogctl.throttling import Brake, Params
from dirtylogctl.wireformat import (
    MAX_PAGES_PER_FRAME,
    MAX_VERIFY_PAGES,
    PAGE_SIZE,
    Header,
    SlotInfo,
)
from kvmshim.abi import dirty_bitmap_bytes
from kvmshim.bitmap import DirtyBitmap
from kvmshim.errors import BitmapError


@dataclass
class Options:
    vm: str
    destination: str  # a file path, or tcp:HOST:PORT
    downtime_limit: float = 0.3  # seconds
    max_bandwidth: float | None = None  # bytes/s
    max_rounds: int = 30
    verify: bool = False
    resume: bool = False  # cont the source after a successful migration
    reconnect_timeout: float = 30.0  # seconds to wait for a restarted daemon
    channels: int = 1  # TCP connections offered to a migrate-receive (a file has none)
    convergence: Params = field(default_factory=Params)  # auto-converge or dirty-limit


@dataclass
class Round:
    number: int
    dirty_pages: int
    harvest_seconds: float  # GET + CLEAR of every slot
    copy_seconds: float
    bytes: int
    key_bytes: int = 0  # the switch-over round: every page's storage key, one byte each
    key_seconds: float = 0.0

    @property
    def bandwidth(self) -> float:
        return self.bytes / self.copy_seconds if self.copy_seconds > 0 else 0.0


@dataclass
class Stats:
    """QEMU/libvirt migration vocabulary where it applies (query-migrate's ram section)."""

    status: str = "setup"
    total_bytes: int = 0
    transferred: int = 0
    remaining: int = 0
    setup_time: float = 0.0
    total_time: float = 0.0
    downtime: float = 0.0  # stop to the destination's ACK, which comes before its flush
    expected_downtime: float = 0.0
    settle_time: float = 0.0  # the destination's flush, after the downtime
    converged: bool = False
    pages_sent: int = 0
    unique_pages_sent: int = 0
    rounds: list[Round] = field(default_factory=list)
    differing_pages: list[int] | None = None
    storage_keys: KeyStats = field(default_factory=KeyStats)
    channels: int = 1  # TCP connections the destination accepted
    convergence: dict[str, Any] | None = None  # what slowing the guest did and cost

    @property
    def dirty_sync_count(self) -> int:
        return len(self.rounds)

    def to_json(self) -> dict[str, Any]:
        elapsed = self.total_time or 1e-9
        rates = [r.dirty_pages / r.copy_seconds for r in self.rounds[1:] if r.copy_seconds > 0]
        out: dict[str, Any] = {
            "status": self.status,
            "total-time": round(self.total_time * 1e3, 1),
            "setup-time": round(self.setup_time * 1e3, 1),
            "downtime": round(self.downtime * 1e3, 1),
            "expected-downtime": round(self.expected_downtime * 1e3, 1),
            "settle-time": round(self.settle_time * 1e3, 1),
            "ram": {
                "total": self.total_bytes,
                "transferred": self.transferred,
                "remaining": self.remaining,
                "normal": self.pages_sent,
                "pages-resent": self.pages_sent - self.unique_pages_sent,
                "dirty-sync-count": self.dirty_sync_count,
                "dirty-pages-rate": round(rates[-1], 1) if rates else 0.0,
                "pages-per-second": round(self.pages_sent / elapsed, 1),
                "mbps": round(self.transferred * 8 / elapsed / 1e6, 3),
            },
            "converged": self.converged,
            "channels": self.channels,
            "rounds": [
                {
                    "round": r.number,
                    "dirty-pages": r.dirty_pages,
                    "harvest-ms": round(r.harvest_seconds * 1e3, 3),
                    "copy-ms": round(r.copy_seconds * 1e3, 3),
                    "mbps": round(r.bandwidth * 8 / 1e6, 3),
                    "key-bytes": r.key_bytes,
                    "key-ms": round(r.key_seconds * 1e3, 3),
                }
                for r in self.rounds
            ],
            "storage-keys": self.storage_keys.to_json(),
            **({"convergence": self.convergence} if self.convergence is not None else {}),
        }
        if self.differing_pages is not None:
            out["verify"] = {
                "differing-pages": len(self.differing_pages),
                "first": [hex(g) for g in self.differing_pages[:8]],
                "storage-keys": self.storage_keys.verify_json(),
            }
        return out

    @property
    def differs(self) -> bool:
        """--verify found pages or keys that differ from the paused source."""
        return bool(self.differing_pages) or bool(self.storage_keys.differing)


class Progress(Protocol):
    def round_done(self, stats: Stats, last: Round) -> None: ...

    def note(self, text: str) -> None: ...


class MigrationError(Exception):
    """The migration did not complete; the text says why and what happened to the source."""


class VmUnavailable(MigrationError):
    """The daemon has no usable VM of that name: nothing was started, nothing was touched."""


@dataclass
class _Slot:
    slot: int
    as_id: int
    gpa: int
    npages: int
    logged: bool
    region: np.ndarray  # the slot's RAM, (npages, PAGE_SIZE) uint8, read-only
    sent: DirtyBitmap  # pages sent at least once
    offset: int = 0  # of the slot's first page in the RAM file


DESTINATION_FORM = "tcp:HOST:PORT (port 1-65535) or a file path"
_PORT = re.compile(r"[0-9]{1,5}")


def tcp_address(destination: str) -> tuple[str, int] | None:
    """(host, port) of ``tcp:HOST:PORT``, None for a file path; ValueError names the form.

    Checked before anything is asked of the daemon, so a typo is a usage error, not a
    traceback half-way through a migration. An IPv6 host may be bracketed: tcp:[::1]:7700."""
    if not destination:
        raise ValueError(f"the destination must be {DESTINATION_FORM}, not empty")
    if not destination.startswith("tcp:"):
        return None
    host, _, port = destination[4:].rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise ValueError(f"the destination must be {DESTINATION_FORM}, not {destination!r}")
    return host, int(port)


def open_sink(destination: str, channels: int = 1) -> Sink:
    """A TCP destination offered ``channels`` connections; a file, which has none, ignores it."""
    address = tcp_address(destination)
    if address is not None:
        return TcpSink(*address, offered=channels)
    return FileSink(destination)


Connect = Callable[[], Awaitable[QMPClient]]


class Migration:
    def __init__(
        self, qmp: QMPClient, options: Options, progress: Progress, connect: Connect | None = None
    ) -> None:
        self.qmp = qmp
        self._connect = connect
        self.o = options
        self.progress = progress
        self.stats = Stats()
        self.consumer = f"migrate-{os.getpid()}"
        self._stopped_by_us = False
        self._consumer_added = False  # set before asking: a cancelled ask may have succeeded
        self._fd = -1
        self._ram_fd = -1
        self._stop_seconds = 0.0  # a QMP round trip, measured at setup
        self._key_seconds = 0.0  # reading every key, timed when a switch-over comes near
        # seconds a page of a run and a scattered page last took to send: they differ (a RUN
        # frame is one copy of contiguous memory; PAGES a gather, and a fault each at a file)
        self._page_seconds: dict[str, float] = {}
        self.brake = Brake(options.convergence, options.vm, self._execute, self._note)

    def _note(self, text: str) -> None:
        self.progress.note(text)

    @property
    def source_stopped(self) -> bool:
        """The driver stopped the source and has not resumed it (a resume failed)."""
        return self._stopped_by_us

    async def run(self) -> Stats:
        started = time.monotonic()
        sink: Sink | None = None
        ram_map = None
        try:
            vm = await self._find_vm()  # before the destination hears of it
            await self.brake.setup(vm, 0, time.monotonic())
            sink = open_sink(self.o.destination, self.o.channels)
            slots, ram_map = await self._setup(vm, sink)
            self.stats.setup_time = time.monotonic() - started
            await self._precopy(slots, sink)
            await self._switch_over(slots, sink)
            if self.o.verify:
                self.stats.differing_pages = await self._verify(slots, sink)
                if self.stats.storage_keys.carried:
                    keys = self._key_pass().verify(_ranges(slots), sink)
                    self.stats.storage_keys.differing = await keys
            self.stats.status = "completed"
            if self.o.resume:
                await self._cont()
                await self.brake.resumed()
        except BaseException:
            self.stats.status = "failed"
            await self.brake.lift()  # before the guest runs again, as cpu_throttle_stop
            if self._stopped_by_us:
                await self._cont()
            raise
        finally:
            self.stats.total_time = time.monotonic() - started
            await self._cleanup(sink, ram_map)
            if self.brake.active:
                self.brake.finish()
                self.stats.convergence = self.brake.to_json()
        return self.stats

    # --- talking to the daemon, across its restarts -----------------------------------------------
    async def _execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One QMP command; if the daemon goes away, reconnect and send it again.

        Every command the driver sends may be repeated: GET does not clear for a manual-protect
        consumer, CLEAR of the same bitmap twice is CLEAR once, stop and cont are idempotent.
        A daemon that was killed comes back with this consumer all dirty, so nothing is lost —
        pages are sent again.
        """
        deadline = time.monotonic() + self.o.reconnect_timeout
        while True:
            try:
                return await self.qmp.execute(command, arguments or {})
            except ExecuteError:
                raise
            except (QMPError, OSError, EOFError) as exc:
                if self._connect is None or time.monotonic() > deadline:
                    raise MigrationError(f"lost the daemon during '{command}': {exc}") from None
                self.progress.note(f"lost the daemon during '{command}' ({exc}); reconnecting")
                await self._reconnect(deadline)

    async def _reconnect(self, deadline: float) -> None:
        assert self._connect is not None
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        while True:
            try:
                self.qmp = await self._connect()
                break
            except (QMPError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise MigrationError(f"the daemon did not come back: {exc}") from None
                await asyncio.sleep(0.2)
        if self._fd >= 0:  # our bitmap memfd is named per connection
            self.qmp.send_fd_scm(self._fd)
            await self.qmp.execute("getfd", {"fdname": self.consumer})
        self.brake.lost()  # the old connection's slow-down went with it
        self.progress.note("reconnected to the daemon")

    # --- setup ----------------------------------------------------------------------------------
    async def _find_vm(self) -> dict[str, Any]:
        """The VM as query-vms describes it; VmUnavailable if there is none to migrate."""
        vms: dict[str, dict[str, Any]] = {v["name"]: v for v in await self._execute("query-vms")}
        vm = vms.get(self.o.vm)
        if vm is None:
            raise VmUnavailable(f"DeviceNotFound: no VM named '{self.o.vm}'")
        if vm.get("status", "ok") != "ok":
            raise VmUnavailable(f"vm '{self.o.vm}' cannot be used: {vm.get('reason')}")
        return vm

    async def _setup(self, vm: dict[str, Any], sink: Sink) -> tuple[list[_Slot], np.memmap]:
        if "ram-path" not in vm:
            raise MigrationError(f"vm '{self.o.vm}' has no RAM file a migration could read")
        ram = np.memmap(vm["ram-path"], dtype=np.uint8, mode="r")
        self._ram_fd = os.open(vm["ram-path"], os.O_RDONLY | os.O_CLOEXEC)  # for sendfile
        slots = [
            _Slot(
                m["slot"],
                m["as-id"],
                m["guest-phys-addr"],
                m["npages"],
                m["log-dirty-pages"],
                ram[m["ram-offset"] : m["ram-offset"] + m["size"]].reshape(-1, PAGE_SIZE),
                DirtyBitmap.zeros(m["npages"]),
                m["ram-offset"],
            )
            for m in vm["memslots"]
        ]
        self.stats.total_bytes = sum(s.npages for s in slots) * PAGE_SIZE
        keys = self.stats.storage_keys
        keys.why_not = why_not_carried(vm)
        keys.carried = keys.why_not is None
        self._consumer_added = True
        await self._execute(
            "consumer-add",
            {"vm": self.o.vm, "name": self.consumer, "manual-protect": True, "initially-set": True},
        )
        self._fd = os.memfd_create("dirtylogctl-migrate", os.MFD_CLOEXEC)
        self.qmp.send_fd_scm(self._fd)
        t0 = time.monotonic()
        await self.qmp.execute("getfd", {"fdname": self.consumer})
        self._stop_seconds = time.monotonic() - t0  # what a "stop" costs: one round trip
        infos = tuple(SlotInfo(s.slot, s.gpa, s.npages) for s in slots)
        sink.start(Header.offering(self.o.vm, infos, keys.carried, self.o.channels))
        self.stats.channels = sink.channels
        return slots, ram

    # --- rounds ---------------------------------------------------------------------------------
    async def _precopy(self, slots: list[_Slot], sink: Sink) -> None:
        bandwidth = 0.0
        for number in range(self.o.max_rounds + 1):
            t0 = time.monotonic()
            dirty = await self._get(slots)
            got = time.monotonic() - t0
            pending = sum(b.count() for b in dirty.values())
            self.stats.remaining = pending * PAGE_SIZE
            if number > 0:  # round 0's pages are the initially-set bitmap, none newly dirty
                await self.brake.sync(number, time.monotonic(), pending, self.stats.transferred)
            if number > 0 and bandwidth > 0:
                by_bandwidth = pending * PAGE_SIZE / bandwidth
                copy = self._copy_seconds(dirty, by_bandwidth)
                predicted = await self._predict(slots, by_bandwidth if copy is None else copy, got)
                self.stats.expected_downtime = predicted
                if copy is not None and predicted <= self.o.downtime_limit:
                    self.stats.converged = True
                    return
            await self._clear(slots, dirty)
            harvested = time.monotonic() - t0
            last = await self._copy(number, slots, dirty, sink, harvested)
            bandwidth = last.bandwidth
            self.progress.round_done(self.stats, last)
        self.progress.note(
            f"did not converge within {self.o.max_rounds} rounds: "
            f"{self.stats.remaining // PAGE_SIZE} pages still dirty"
        )

    def _copy_seconds(self, dirty: dict[int, DirtyBitmap], by_bandwidth: float) -> float | None:
        """What copying ``dirty`` takes: its run pages and its scattered pages, each at its
        kind's last per-page cost. A kind not yet timed (round 0 is one long run) makes it
        it unknown (None: one more round times it), unless it has too few pages to matter."""
        counted = {"runs": 0, "scattered": 0}
        for bitmap in dirty.values():
            _, counts, scattered = split_runs(bitmap.pages())
            counted["runs"] += int(counts.sum())
            counted["scattered"] += scattered.size
        seconds = 0.0
        for kind, count in counted.items():
            if kind in self._page_seconds:
                seconds += count * self._page_seconds[kind]
            elif count >= MAX_PAGES_PER_FRAME:
                return None
        return seconds if self._page_seconds else by_bandwidth

    async def _predict(self, slots: list[_Slot], copy: float, get_seconds: float) -> float:
        """The downtime a switch-over now would take: what it does, each at its last measured
        cost — stop, GET (and a CLEAR of about its cost), copy the pending pages at the last
        round's bandwidth, every storage key (QEMU leaves device state out; we time a read of
        them once the rest fits, so as not to pay one every round), DONE's round trip. The
        flush is not in it: it comes after the ACK (see settle)."""
        pages = self._stop_seconds + 2 * get_seconds + copy
        if self.stats.storage_keys.carried and pages <= self.o.downtime_limit:
            self._key_seconds = await self._key_pass().time_read(_ranges(slots))
        return pages + self._key_seconds

    async def _switch_over(self, slots: list[_Slot], sink: Sink) -> None:
        await self.brake.stopped()  # the guest's last stores before the stop
        stopped = time.monotonic()
        self._stopped_by_us = True  # before asking: a stop cancelled in flight may have happened
        await self._execute("stop", {"vm": self.o.vm})
        dirty = await self._get(slots)
        await self._clear(slots, dirty)
        for s in slots:  # no dirty log: the whole slot goes now, with the vCPUs stopped
            if not s.logged:
                dirty[s.slot] = DirtyBitmap.ones(s.npages)
        last = await self._copy(
            len(self.stats.rounds), slots, dirty, sink, time.monotonic() - stopped, stopped=True
        )
        keys = self.stats.storage_keys
        if keys.carried:  # after the last page: every key as the last store left it
            await self._key_pass().send(_ranges(slots), sink, keys)
            last.key_bytes, last.key_seconds = keys.keys, keys.seconds
        sink.finish(self.stats.pages_sent)
        self.stats.downtime = time.monotonic() - stopped
        self.stats.remaining = 0
        settle = time.monotonic()
        sink.settle()  # the destination's flush, after the ACK: the guest could run by now
        self.stats.settle_time = time.monotonic() - settle
        self.progress.round_done(self.stats, last)
        await self.brake.lift()  # the source is stopped; lifted before anything resumes it

    async def _get(self, slots: list[_Slot]) -> dict[int, DirtyBitmap]:
        """The consumer's dirty bitmap per logged slot (it travels through a memfd)."""
        out = {}
        for s in slots:
            if not s.logged:
                continue
            reply = await self._execute(
                "dirty-log-get",
                {
                    "vm": self.o.vm,
                    "slot": s.slot,
                    "as-id": s.as_id,
                    "consumer": self.consumer,
                    "encoding": "fd",
                    "fdname": self.consumer,
                },
            )
            npages = reply["npages"]
            if npages != s.npages:
                raise MigrationError(
                    f"slot {s.slot} changed from {s.npages} to {npages} pages during the migration"
                )
            raw = os.pread(self._fd, dirty_bitmap_bytes(npages), 0)
            try:
                out[s.slot] = DirtyBitmap.from_bytes(npages, raw)
            except BitmapError as exc:
                raise MigrationError(f"the daemon's bitmap of slot {s.slot}: {exc}") from None
        return out

    async def _clear(self, slots: list[_Slot], dirty: dict[int, DirtyBitmap]) -> None:
        for s in slots:
            bitmap = dirty.get(s.slot)
            if bitmap is None or not bitmap.any():
                continue
            await self._execute(
                "dirty-log-clear",
                {
                    "vm": self.o.vm,
                    "slot": s.slot,
                    "as-id": s.as_id,
                    "consumer": self.consumer,
                    "first-page": 0,
                    "num-pages": s.npages,
                    "bitmap": bitmap.to_base64(),
                },
            )

    async def _copy(
        self,
        number: int,
        slots: list[_Slot],
        dirty: dict[int, DirtyBitmap],
        sink: Sink,
        harvested: float,
        stopped: bool = False,
    ) -> Round:
        """Send the dirty pages: runs as RUN frames (from the RAM file by the kernel when the
        guest is ``stopped``), the scattered rest in PAGES frames."""
        t0 = time.monotonic()
        sent = 0
        spent = {"runs": [0.0, 0], "scattered": [0.0, 0]}  # seconds, pages
        for s in slots:
            bitmap = dirty.get(s.slot)
            if bitmap is None:
                continue
            pages = bitmap.pages()
            firsts, counts, scattered = split_runs(pages)
            t_runs = time.monotonic()
            for first, count in zip(firsts.tolist(), counts.tolist(), strict=True):
                gpa, offset = s.gpa + first * PAGE_SIZE, s.offset + first * PAGE_SIZE
                run = Run(gpa, s.region[first : first + count], self._ram_fd, offset, stopped)
                sink.send_run(run)
                sent += count
                await self._throttle(sent * PAGE_SIZE, t0)
            sink.drain()  # channels send from threads: a kind's time is the wire's
            t_scattered = time.monotonic()
            spent["runs"][0] += t_scattered - t_runs
            spent["runs"][1] += int(counts.sum())
            for start in range(0, scattered.size, MAX_PAGES_PER_FRAME):
                chunk = scattered[start : start + MAX_PAGES_PER_FRAME]
                sink.send_pages(s.gpa + chunk * PAGE_SIZE, s.region[chunk])
                sent += chunk.size
                await self._throttle(sent * PAGE_SIZE, t0)
            sink.drain()
            spent["scattered"][0] += time.monotonic() - t_scattered
            spent["scattered"][1] += scattered.size
            s.sent |= bitmap
        for kind, (seconds, count) in spent.items():
            if count >= MAX_PAGES_PER_FRAME:  # enough to time: the prediction's per-page cost
                self._page_seconds[kind] = seconds / count
        elapsed = time.monotonic() - t0
        self.stats.pages_sent += sent
        self.stats.transferred += sent * PAGE_SIZE
        self.stats.unique_pages_sent = sum(s.sent.count() for s in slots)
        last = Round(number, sent, harvested, elapsed, sent * PAGE_SIZE)
        self.stats.rounds.append(last)
        return last

    async def _throttle(self, sent_bytes: int, since: float) -> None:
        """Wait off any lead over the bandwidth cap; always a point where Ctrl-C gets in."""
        ahead = 0.0
        if self.o.max_bandwidth:
            ahead = sent_bytes / self.o.max_bandwidth - (time.monotonic() - since)
        await asyncio.sleep(max(ahead, 0.0))

    # --- the end --------------------------------------------------------------------------------
    async def _verify(self, slots: list[_Slot], sink: Sink) -> list[int]:
        differing: list[int] = []
        for s in slots:
            for start in range(0, s.npages, MAX_VERIFY_PAGES):
                idx = np.arange(start, min(start + MAX_VERIFY_PAGES, s.npages))
                gpas = s.gpa + idx * PAGE_SIZE
                differing += sink.verify(gpas, np.ascontiguousarray(s.region[idx]))
                await asyncio.sleep(0)  # let Ctrl-C in between batches
        return sorted(differing)

    def _key_pass(self) -> KeyPass:
        """Keys travel through the driver's memfd, as bitmaps do (a million keys: 1 MiB)."""
        return KeyPass(self._execute, self.o.vm, self._fd, self.consumer)

    async def _cont(self) -> None:
        await self._execute("cont", {"vm": self.o.vm})
        self._stopped_by_us = False

    async def _cleanup(self, sink: Sink | None, ram_map: np.memmap | None) -> None:
        await self.brake.lift()  # a no-op unless something above left it on
        try:
            if self._consumer_added:
                await self._execute("consumer-remove", {"vm": self.o.vm, "name": self.consumer})
            if self._fd >= 0:
                await self._execute("closefd", {"fdname": self.consumer})
        except Exception:  # the migration's own outcome matters more than tidying up
            pass
        if self._fd >= 0:
            os.close(self._fd)
        if self._ram_fd >= 0:
            os.close(self._ram_fd)
        if sink is not None:
            sink.close()
        del ram_map


MIN_RUN_PAGES = 16
"""Shorter runs of dirty pages go in PAGES frames: a RUN costs three sends, worth it from
64 KiB on (below, a copy into one frame is cheaper than the system calls)."""


def split_runs(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted page numbers as runs of at least MIN_RUN_PAGES contiguous pages, each at most
    MAX_PAGES_PER_FRAME long (first pages, lengths), and the pages left over."""
    if not pages.size:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [pages.size])))
    long = lengths >= MIN_RUN_PAGES
    scattered = pages[~np.repeat(long, lengths)]
    starts, lengths = starts[long], lengths[long]
    # each long run in frames: ceil(length / MAX) pieces, the last one shorter
    pieces = -(-lengths // MAX_PAGES_PER_FRAME)
    run_of = np.repeat(np.arange(starts.size), pieces)
    within = np.arange(run_of.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    firsts = pages[starts[run_of]] + within * MAX_PAGES_PER_FRAME
    counts = np.minimum(lengths[run_of] - within * MAX_PAGES_PER_FRAME, MAX_PAGES_PER_FRAME)
    return firsts.astype(np.int64), counts.astype(np.int64), scattered.astype(np.int64)


def _ranges(slots: list[_Slot]) -> list[Range]:
    """The slots as key ranges, in the header's order (the order KEYS frames must follow)."""
    return [Range(s.gpa, s.npages) for s in slots]
