"""Simulated vCPUs that keep storing generation stamps into guest pages, at a target rate.

Each vCPU is a thread that draws a batch of guest frame numbers (random, sequential or hot-set),
reads the VM's current generation, and hands the batch to the backend's batched store, which
puts the little-endian u64 stamp into the first 8 bytes of every page. The stamp is what lets a
checker apply the KVM selftest method: a page reported dirty must carry a recent stamp, and a page
whose stamp changed must have been reported.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvmshim.backends.base import IoReporter, Pattern, WorkloadSpec, WritePath
from kvmshim.backends.vcpu_control import VcpuBrake, VcpuControls

log = logging.getLogger(__name__)

BATCHES_PER_SECOND = 100  # per vCPU; sets the batch size from the target rate
MAX_BATCH = 8192
HOT_SHARE = 0.9  # hot-set: this share of stores goes to the hot pages

# (gfns, stamp, path) → the pages the stores newly dirtied, or None where the backend cannot
# tell (KVM's bitmap).
StoreBatch = Callable[[np.ndarray, int, WritePath], int | None]


@dataclass(frozen=True)
class GfnLayout:
    """The guest's pages as one index space: index i ↔ a gfn in one of the slots."""

    bases: np.ndarray  # first gfn of each slot, int64
    starts: np.ndarray  # first index of each slot in the joined space
    total: int

    @classmethod
    def from_slots(cls, slots: list[tuple[int, int]]) -> GfnLayout:
        """``slots``: (base_gfn, npages) pairs."""
        bases = np.array([s[0] for s in slots], dtype=np.int64)
        sizes = np.array([s[1] for s in slots], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1])) if len(slots) else sizes
        return cls(bases, starts.astype(np.int64), int(sizes.sum()))

    def gfns(self, index: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self.starts, index, side="right") - 1
        gfns: np.ndarray = self.bases[which] + (index - self.starts[which])
        return gfns


class RunGate:
    """stop/cont for vCPU threads: ``pause`` returns only once no batch is in flight."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._paused = False
        self._busy = 0
        self.resumes = 0  # a vCPU that sees it change was stopped: it makes up no lost time

    @property
    def paused(self) -> bool:
        return self._paused

    def enter(self, stopping: threading.Event) -> bool:
        """Wait while paused; False when the vCPU should exit instead."""
        with self._cond:
            while self._paused and not stopping.is_set():
                self._cond.wait(0.1)
            if stopping.is_set():
                return False
            self._busy += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            self._paused = True
            while self._busy:
                self._cond.wait()

    def resume(self) -> None:
        with self._cond:
            if self._paused:
                self.resumes += 1
            self._paused = False
            self._cond.notify_all()


class Workload:
    """The vCPU threads of one VM."""

    def __init__(
        self,
        spec: WorkloadSpec,
        layout: Callable[[], GfnLayout],
        store: StoreBatch,
        generation: Callable[[], int],
        gate: RunGate,
        report: IoReporter | None = None,
        name: str = "vm",
        on_failure: Callable[[int, BaseException], None] | None = None,
        controls: VcpuControls | None = None,
    ) -> None:
        if spec.pages_per_second <= 0 or spec.vcpus <= 0:
            raise ValueError("pages-per-second and vcpus must be positive")
        self.spec = spec
        self._layout = layout
        self._store = store
        self._generation = generation
        self._gate = gate
        self._report = report
        self._on_failure = on_failure
        # The VM's convergence controls (throttle, dirty limits, per-vCPU counters).
        self.controls = controls if controls is not None else VcpuControls(name)
        self.controls.attach(spec.vcpus)
        self._stopping = threading.Event()
        self.pages_stored = 0
        self.failure: BaseException | None = None
        seed = spec.seed if spec.seed is not None else int(time.monotonic_ns())
        self._seed = seed
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"{name}/vcpu{i}", daemon=True)
            for i in range(spec.vcpus)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stopping.set()
        for t in self._threads:
            t.join()

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _run(self, vcpu: int) -> None:
        try:
            self._loop(vcpu)
        except BaseException as exc:  # a dead vCPU must be visible, not a silent freeze
            self.failure = exc
            log.exception("vcpu%d of the workload died", vcpu)
            if self._on_failure is not None:
                self._on_failure(vcpu, exc)

    def _loop(self, vcpu: int) -> None:
        spec = self.spec
        rng = np.random.default_rng([self._seed, vcpu])
        rate = spec.pages_per_second / spec.vcpus
        batch = int(min(MAX_BATCH, max(1, rate // BATCHES_PER_SECOND)))
        cursor = 0
        deadline = time.monotonic()
        brake = VcpuBrake(self.controls, vcpu)
        resumes = self._gate.resumes
        while self._gate.enter(self._stopping):
            started, dirtied = time.monotonic(), 0
            if self._gate.resumes != resumes:  # stopped and continued: a real vCPU
                resumes, deadline = self._gate.resumes, started  # does not catch up on stores
            try:
                layout = self._layout()
                if layout.total:
                    index = self._draw(rng, layout, vcpu, cursor, batch)
                    cursor += batch
                    dirtied = self._store_batch(rng, layout.gfns(index), vcpu)
            finally:
                self._gate.leave()
            self.controls.tick()
            deadline += batch / rate
            hold = brake.hold(deadline, batch / rate, started, dirtied)
            if hold > deadline:  # throttled or limited: no catch-up burst after the sleep
                deadline = brake.sleep_until(hold, self._stopping)
                continue
            delay = deadline - time.monotonic()
            if delay > 0:
                self._stopping.wait(delay)
            elif delay < -1.0:  # far behind (paused, or slower than asked): do not burst
                deadline = time.monotonic()

    def _draw(
        self, rng: np.random.Generator, layout: GfnLayout, vcpu: int, cursor: int, n: int
    ) -> np.ndarray:
        spec = self.spec
        if spec.pattern is Pattern.SEQUENTIAL:
            lo = layout.total * vcpu // spec.vcpus
            hi = max(lo + 1, layout.total * (vcpu + 1) // spec.vcpus)
            return lo + (cursor + np.arange(n, dtype=np.int64)) % (hi - lo)
        if spec.pattern is Pattern.HOT_SET:
            hot = max(1, int(layout.total * spec.hot_fraction))
            # The hot set is a fixed pseudo-random spread: page k of it is (k * step) mod total.
            step = _coprime_step(layout.total, self._seed)
            pick_hot = rng.random(n) < HOT_SHARE
            index = rng.integers(0, layout.total, n, dtype=np.int64)
            hot_index = (rng.integers(0, hot, n, dtype=np.int64) * step) % layout.total
            return np.where(pick_hot, hot_index, index)
        return rng.integers(0, layout.total, n, dtype=np.int64)

    def _store_batch(self, rng: np.random.Generator, gfns: np.ndarray, vcpu: int) -> int:
        """Store one batch; the pages it newly dirtied (0 where the backend cannot tell)."""
        stamp = self._generation()
        spec = self.spec
        total = gfns.size
        dirtied = 0
        if spec.dma_share > 0:
            device = rng.random(gfns.size) < spec.dma_share
            dma = gfns[device]
            gfns = gfns[~device]
            if dma.size:
                dirtied += self._store(dma, stamp, WritePath.DMA) or 0
                if spec.dma_report and self._report is not None:
                    self._report(dma)
        if gfns.size:
            dirtied += self._store(gfns, stamp, WritePath.GUEST) or 0
        self.pages_stored += total
        self.controls.record(vcpu, total, dirtied)
        return dirtied


def _coprime_step(total: int, seed: int) -> int:
    """A step coprime to ``total`` so that multiples of it spread over the whole space."""
    step = (seed * 2654435761 + 97) % total or 1
    while math.gcd(step, total) != 1:
        step += 1
    return step
