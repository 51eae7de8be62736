"""The process-wide worker pool that splits one harvest's chunks over several cores.

numpy releases the GIL inside its passes, so chunks of one slot harvested by different threads
run on different cores. One pool serves every MMU of the process: harvests of several VMs run in
parallel (each in its caller's thread) and share the workers, so the cores are never
oversubscribed by ``VMs x threads``. The caller works too: ``threads`` = N uses the caller and
N-1 pool threads; 1 is the single-threaded harvest, with no pool at all.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# The CPUs, at most four: on a quiet 2-core host the second thread made dense and large
# harvests 1.2-1.7x faster (README, Performance: harvest); under load it can be slower, so the
# flag exists; past four the pool only adds wake-ups.
MAX_DEFAULT_THREADS = 4
THREAD_PREFIX = "kvmshim-harvest"  # the pool's threads are <prefix>_N (metrics group them)


def default_harvest_threads() -> int:
    """The CPUs this process may run on, at least 1 and at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_THREADS))


_lock = threading.Lock()
_threads = default_harvest_threads()
_pool: ThreadPoolExecutor | None = None


def set_harvest_threads(threads: int) -> None:
    """Use ``threads`` threads per harvest from now on (1: the caller's thread alone)."""
    global _threads, _pool
    if threads < 1:
        raise ValueError("harvest threads must be at least 1")
    with _lock:
        old, _pool, _threads = _pool, None, threads
    if old is not None:
        old.shutdown(wait=False)  # running tasks finish; a harvest in flight keeps its futures


def harvest_threads() -> int:
    """How many threads a harvest uses."""
    return _threads


def run_split(work: Callable[[int, int], T], count: int) -> list[T]:
    """``work(lo, hi)`` over [0, count) split in contiguous parts, one per thread; the results
    in order. The caller's thread takes the first part, so a busy pool never stalls it."""
    parts = min(_threads, count)
    if parts <= 1:
        return [work(0, count)]
    bounds = [count * i // parts for i in range(parts + 1)]
    pool = _get_pool()
    futures: Sequence[Future[T]] = [
        pool.submit(work, bounds[i], bounds[i + 1]) for i in range(1, parts)
    ]
    try:
        first = work(bounds[0], bounds[1])
    finally:  # never return (or raise) while a worker still writes into the caller's arrays
        for f in futures:
            f.exception()
    return [first, *(f.result() for f in futures)]


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, _threads - 1), thread_name_prefix=THREAD_PREFIX)
        return _pool
