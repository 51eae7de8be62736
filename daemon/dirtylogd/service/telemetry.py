"""Counters the service keeps for metrics: plain ints and bucket counts, no prometheus here.

The metrics collector reads these at scrape time; nothing on a hot path calls into a metrics
library.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field

# Harvest durations: 100 µs .. 10 s.
HARVEST_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)


@dataclass
class DurationHistogram:
    """Cumulative-at-read histogram of durations in seconds."""

    buckets: tuple[float, ...] = HARVEST_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.total += seconds
            self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs ending with +Inf, as the exposition format wants."""
        with self._lock:
            out, running = [], 0
            for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
                running += n
                out.append((bound, running))
            return out


@dataclass
class VmTelemetry:
    """What happened to one VM's dirty pages."""

    harvests: int = 0
    shared_harvests: int = 0  # GETs answered from a harvest that began while they waited
    harvest_seconds: DurationHistogram = field(default_factory=DurationHistogram)
    dirty_pages: Counter[str] = field(default_factory=Counter)  # by source: uc, io
    io_marked_pages: int = 0
    # Pages another slot's s390 harvest consumed one gfn past its end, marked dirty here.
    overreach_pages: int = 0
