"""Convergence controls of one VM's simulated vCPUs: QEMU's cpu throttle and dirty limit, and
the per-vCPU counters (the model's dirty ring) that the limit and calc-dirty-rate read.

:class:`VcpuControls` belongs to the VM (:class:`~kvmshim.backends.guestvm.GuestVm`), so its
settings survive a workload restart; each workload attaches to it on start. Every vCPU thread
adds its batch to the counters and asks its :class:`VcpuBrake` how long to sleep before the next
batch; both are a few attribute reads when nothing is set.

* **cpu throttle** (QEMU ``cpu_throttle_set``, for every vCPU): a throttled vCPU runs a 10 ms
  timeslice, then sleeps pct/(1 - pct) * 10 ms. The model's vCPU is CPU-bound while running
  and a batch is its run of batch/rate seconds (10 ms at the usual 100 batches a second), so
  after each batch it sleeps that run time * pct/(100 - pct): it stores (1 - pct/100) * its
  nominal rate, with the same stamps.
* **dirty limit** (QEMU ``set-vcpu-dirty-limit``, per vCPU): KVM stops a vCPU whose dirty ring
  is full and QEMU's dirtylimit.c sizes that sleep by feedback over several periods until the
  vCPU's dirty rate meets the limit. The model knows how many pages a batch newly dirtied (n),
  so it sizes the sleep directly: the vCPU's "dirty deadline" advances by n / limit seconds and
  its next batch does not start before it. Stores to already-dirty pages add nothing (in KVM a
  store to a writable pte exits nothing and fills no ring).

Counters are cumulative since the workload started, one int64 per vCPU, each written only by
its own vCPU thread. Rates are computed lazily: the first vCPU batch (or reader) past a period
boundary takes a snapshot, so no timer thread runs; the current rate is the difference of the
last two boundary snapshots.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from kvmshim.errors import NotSupportedError

log = logging.getLogger(__name__)

THROTTLE_MAX = 99  # QEMU's cpu-throttle-percentage ceiling
PERIOD_MIN, PERIOD_MAX = 0.1, 1.0  # QEMU's x-vcpu-dirty-limit-period bounds, in seconds
PERIOD_DEFAULT = 1.0  # QEMU's x-vcpu-dirty-limit-period default (1000 ms)
WAKE_SLICE = 0.05  # a braked vCPU looks at the settings this often, so a change acts at once


class RingSnapshot(NamedTuple):
    """Per-vCPU counters at one moment; two snapshots differenced give each vCPU's rates.
    A tuple, so ``t, stored, dirtied = snapshot`` works as well as the names."""

    time: float  # time.monotonic()
    stored: np.ndarray  # int64 per vCPU: pages stored (guest and DMA)
    dirtied: np.ndarray  # int64 per vCPU: pages newly dirtied (the dirty ring's entries)


@dataclass(frozen=True)
class VcpuRate:
    """One vCPU over the last complete period."""

    vcpu: int
    limit: float | None  # pages/s, None: no dirty limit
    current: float  # pages/s newly dirtied
    stored_rate: float  # pages/s stored


class VcpuControls:
    """One VM's throttle, dirty limits, period and per-vCPU counters (thread-safe)."""

    def __init__(self, name: str = "vm", dirty_ring: bool = True) -> None:
        self.name = name
        self.dirty_ring = dirty_ring  # whether stores report newly dirtied pages (not on KVM)
        self._lock = threading.Lock()
        self._throttle = 0
        self._limits: dict[int, float] = {}
        self._period = PERIOD_DEFAULT
        self.version = 0  # bumped by every change: braked vCPUs wake up and look again
        self._vcpus = 0  # of the attached workload; 0: none
        self._stored = np.zeros(0, dtype=np.int64)
        self._dirtied = np.zeros(0, dtype=np.int64)
        self._start = self._snap(time.monotonic())  # the current period's first snapshot
        self._window: tuple[RingSnapshot, RingSnapshot] | None = None  # last complete period

    # --- settings -----------------------------------------------------------------------------
    @property
    def throttle(self) -> int:
        return self._throttle

    def set_throttle(self, pct: int) -> None:
        """cpu-throttle-percentage for every vCPU; 0 clears it."""
        if not 0 <= pct <= THROTTLE_MAX:
            raise ValueError(f"throttle percentage {pct} is outside 0..{THROTTLE_MAX}")
        with self._lock:
            self._throttle = int(pct)
            self.version += 1

    def set_dirty_limit(self, vcpu: int | None, pages_per_second: float) -> None:
        """Limit the newly-dirtied rate of ``vcpu`` (None: every vCPU of the running workload)."""
        if not self.dirty_ring:
            raise NotSupportedError(
                "no dirty limit without a dirty ring: this backend cannot tell which vCPU "
                "dirtied a page (KVM's dirty bitmap)"
            )
        if not pages_per_second > 0:
            raise ValueError(f"a dirty limit must be positive, not {pages_per_second}")
        with self._lock:
            for v in self._targets(vcpu):
                self._limits[v] = float(pages_per_second)
            self.version += 1

    def cancel_dirty_limit(self, vcpu: int | None) -> None:
        """Lift ``vcpu``'s limit (None: every limit)."""
        with self._lock:
            if vcpu is None:
                self._limits.clear()
            elif vcpu in self._limits:
                del self._limits[vcpu]
            else:
                self._targets(vcpu)  # ValueError for an index out of range
            self.version += 1

    def dirty_limits(self) -> dict[int, float]:
        """vCPU → pages/s, for the vCPUs that have a limit."""
        with self._lock:
            return dict(sorted(self._limits.items()))

    def limit(self, vcpu: int) -> float | None:
        """``vcpu``'s limit; called by its thread every batch (one dict read)."""
        return self._limits.get(vcpu)

    @property
    def period(self) -> float:
        return self._period

    def set_period(self, seconds: float) -> None:
        """The measuring period of :meth:`rates` (QEMU's x-vcpu-dirty-limit-period)."""
        if not PERIOD_MIN <= seconds <= PERIOD_MAX:
            raise ValueError(f"period {seconds} s is outside {PERIOD_MIN}..{PERIOD_MAX} s")
        with self._lock:
            self._period = float(seconds)
            self.version += 1

    def _targets(self, vcpu: int | None) -> list[int]:
        """The vCPU indices ``vcpu`` names; ValueError outside the running workload."""
        if self._vcpus == 0:
            raise ValueError("no workload is running: there are no vCPUs to limit")
        if vcpu is None:
            return list(range(self._vcpus))
        if not 0 <= vcpu < self._vcpus:
            raise ValueError(
                f"vCPU {vcpu} does not exist: the running workload has vCPUs 0..{self._vcpus - 1}"
            )
        return [vcpu]

    # --- the workload -------------------------------------------------------------------------
    def attach(self, vcpus: int) -> None:
        """A workload of ``vcpus`` starts: fresh counters; limits beyond it are dropped."""
        with self._lock:
            dropped = sorted(v for v in self._limits if v >= vcpus)
            for v in dropped:
                del self._limits[v]
            if dropped:
                log.warning(
                    "%s: dirty limits of vCPUs %s dropped: the new workload has %d vCPUs",
                    self.name,
                    dropped,
                    vcpus,
                )
            self._vcpus = vcpus
            self._stored = np.zeros(vcpus, dtype=np.int64)
            self._dirtied = np.zeros(vcpus, dtype=np.int64)
            self._start = self._snap(time.monotonic())
            self._window = None
            self.version += 1

    def detach(self) -> None:
        """The workload stopped; settings stay for the next one."""
        with self._lock:
            self._vcpus = 0
            self._window = None
            self.version += 1

    @property
    def vcpus(self) -> int:
        return self._vcpus

    def record(self, vcpu: int, stored: int, dirtied: int) -> None:
        """``vcpu`` finished a batch (called by its own thread only, so no lock)."""
        self._stored[vcpu] += stored
        self._dirtied[vcpu] += dirtied

    def tick(self, now: float | None = None) -> None:
        """Close the period if its end has passed (cheap when it has not)."""
        now = time.monotonic() if now is None else now
        if now < self._start.time + self._period:
            return
        with self._lock:
            if now < self._start.time + self._period:
                return  # another thread closed it
            snap = self._snap(now)
            self._window = (self._start, snap)
            self._start = snap

    def _snap(self, now: float) -> RingSnapshot:
        return RingSnapshot(now, self._stored.copy(), self._dirtied.copy())

    def snapshot(self) -> RingSnapshot:
        """Copies of the counters now, for a caller to difference with a later snapshot."""
        return self._snap(time.monotonic())

    def rates(self) -> list[VcpuRate]:
        """Each vCPU's rates over the last complete period (0 before one has completed)."""
        self.tick()
        with self._lock:
            window, n, limits = self._window, self._vcpus, dict(self._limits)
        if window is None or window[0].stored.size != n:
            zero = np.zeros(n)
            dirtied = stored = zero
        else:
            first, last = window
            dt = max(last.time - first.time, 1e-9)
            dirtied = (last.dirtied - first.dirtied) / dt
            stored = (last.stored - first.stored) / dt
        return [VcpuRate(v, limits.get(v), float(dirtied[v]), float(stored[v])) for v in range(n)]


class VcpuBrake:
    """One vCPU thread's throttle and dirty-limit sleeps, sized from the settings each batch."""

    def __init__(self, controls: VcpuControls, vcpu: int) -> None:
        self._controls = controls
        self._vcpu = vcpu
        self._limit: float | None = None  # the limit the dirty deadline was sized for
        self._dirty_deadline = 0.0

    def hold(self, deadline: float, ran: float, started: float, dirtied: int) -> float:
        """The earliest start of the next batch.

        ``deadline``: the pacing deadline, the batch's nominal run time ``ran`` already added;
        ``started``: when the batch began; ``dirtied``: the pages it newly dirtied. Returns
        ``deadline`` itself when neither throttle nor limit applies.
        """
        pct = self._controls.throttle
        limit = self._controls.limit(self._vcpu)
        if limit != self._limit:  # a new or changed limit starts from this batch
            self._limit, self._dirty_deadline = limit, started
        if not pct and limit is None:
            return deadline
        hold = deadline
        if pct:  # the sleep after the run, even when the vCPU is behind its pacing
            hold = max(deadline, time.monotonic()) + ran * pct / (100 - pct)
        if limit is not None:
            self._dirty_deadline = max(self._dirty_deadline, started) + dirtied / limit
            hold = max(hold, self._dirty_deadline)
        return hold

    def sleep_until(self, until: float, stopping: threading.Event) -> float:
        """Sleep until ``until``, or less if the VM stops or a setting changes; when it woke."""
        version = self._controls.version
        while (delay := until - time.monotonic()) > 0:
            if stopping.wait(min(delay, WAKE_SLICE)) or self._controls.version != version:
                break
        return min(until, time.monotonic())
