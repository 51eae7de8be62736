"""Harvest and guest-store throughput of the vectorised s390 MMU, as ratios to in-run baselines.

Baselines, over the same PGSTE array in the harvest's chunk size: one single-threaded READ pass
(an OR-reduction: the floor for finding UC), and one read-modify-write pass (``pgste &= ~UC``,
the floor for test-and-clear, kept for comparison with earlier figures). Caches are flushed (by
reading a 256 MiB buffer) before every timed run, so all start from DRAM. Each harvest is timed
with 1 thread and with the pool's default (``--threads``), and an empty harvest (nothing stored
since the last one) with the per-chunk hint and with a forced scan.

    python benchmarks/harvest.py            # the README table (16 GiB fractions, 1/16/128 GiB)
    python benchmarks/harvest.py --quick    # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES
from kvmshim.backends.base import WritePath
from kvmshim.backends.softmmu import SoftMmuBackend
from kvmshim.s390 import bits, harvest_pool
from kvmshim.s390.mmu import S390Mmu

GiB = 1 << 30
PAGES_PER_GIB = GiB // 4096
_FLUSH = np.ones(256 << 20 >> 3, dtype=np.uint64)


def flush_caches() -> None:
    _FLUSH.sum()


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        flush_caches()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def baseline_pass(mmu: S390Mmu) -> None:
    not_uc = np.uint64(~bits.PGSTE_UC_BIT & 0xFFFF_FFFF_FFFF_FFFF)
    pg = mmu.pgste
    for start in range(0, mmu.npages, mmu.harvest_chunk):
        chunk = pg[start : start + mmu.harvest_chunk]
        np.bitwise_and(chunk, not_uc, out=chunk)


def read_pass(mmu: S390Mmu) -> None:
    pg = mmu.pgste
    for start in range(0, mmu.npages, mmu.harvest_chunk):
        np.bitwise_or.reduce(pg[start : start + mmu.harvest_chunk])


def dirty_set(npages: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    count = int(npages * fraction)
    if fraction >= 1.0:
        return np.arange(npages, dtype=np.int64)
    return np.sort(rng.choice(npages, count, replace=False))


def time_harvests(mmu: S390Mmu, pages: np.ndarray, out: np.ndarray, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        for i in range(0, pages.size, 1 << 20):  # re-dirty: protection faults set UC again
            mmu.guest_store(pages[i : i + (1 << 20)])
        times += timed(lambda: mmu.harvest(out), 1)
        assert int(np.bitwise_count(out).sum()) == pages.size
    return times


def bench_harvest(
    gib: int, fraction: float, reps: int, threads: int, rng: np.random.Generator
) -> dict:
    npages = gib * PAGES_PER_GIB
    mmu = S390Mmu(npages, esop=True)
    pages = dirty_set(npages, fraction, rng)
    out = np.zeros(npages // 8, dtype=np.uint8)
    for i in range(0, pages.size, 1 << 20):  # map every dirty page writable once
        mmu.guest_store(pages[i : i + (1 << 20)])
    harvest_pool.set_harvest_threads(1)
    one = time_harvests(mmu, pages, out, reps)
    harvest_pool.set_harvest_threads(threads)
    many = time_harvests(mmu, pages, out, reps)
    empty = timed(lambda: mmu.harvest(out), reps)  # nothing stored since: the hint answers

    def scan_empty() -> None:
        mmu._maybe_dirty[:] = True
        mmu.harvest(out)

    scanned = timed(scan_empty, reps)
    read = min(timed(lambda: read_pass(mmu), reps))
    rmw = min(timed(lambda: baseline_pass(mmu), reps))
    h1, hn = min(one), min(many)
    meta = (mmu.pte.nbytes + mmu.pgste.nbytes + mmu.skey.nbytes) / npages
    return {
        "size": f"{gib} GiB",
        "dirty": f"{fraction:.0%}",
        "one_ms": h1 * 1e3,
        "harvest_ms": hn * 1e3,
        "median_ms": statistics.median(many) * 1e3,
        "mpages_s": npages / hn / 1e6,
        "read_ms": read * 1e3,
        "baseline_ms": rmw * 1e3,
        "ratio": hn / read,
        "ratio_rmw": hn / rmw,
        "empty_ms": min(empty) * 1e3,
        "scan_empty_ms": min(scanned) * 1e3,
        "meta_bytes_per_page": meta,
    }


def bench_stores(gib: int, batch: int, total: int, rng: np.random.Generator) -> dict:
    """Random stamp stores through the guest path (faults + data into the RAM file), one thread."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        vm = SoftMmuBackend("bench", tmp)
        vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, gib * GiB)
        npages = gib * PAGES_PER_GIB
        batches = [rng.integers(0, npages, batch) for _ in range(total // batch)]
        words = vm._regions[0].words
        words[::512] = 0  # populate the RAM file: time the model, not tmpfs page allocation
        for gfns in batches[:50]:  # warm up: map pages the way a running guest has them
            vm.write_pages(gfns, 1, WritePath.GUEST)
        vm.get_dirty_log(0)  # protect them again: the timed stores take faults
        stats0 = vm.stats().faults_by_kind
        t0 = time.perf_counter()
        for gen, gfns in enumerate(batches):
            vm.write_pages(gfns, gen, WritePath.GUEST)
        elapsed = time.perf_counter() - t0
        stats1 = vm.stats().faults_by_kind
        faults = sum(stats1.values()) - sum(stats0.values())
        t0 = time.perf_counter()
        for gen, gfns in enumerate(batches):  # bare data scatter: the floor without the MMU
            words[gfns * 512] = np.uint64(gen)
        bare = time.perf_counter() - t0
        vm.close()
    stored = batch * len(batches)
    return {
        "pages_s": stored / elapsed,
        "faults": faults,
        "stored": stored,
        "bare_pages_s": stored / bare,
        "ratio": elapsed / bare,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 and 4 GiB only, fewer repetitions")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        default=max(2, harvest_pool.default_harvest_threads()),
        help="harvest threads to compare with 1 (default: the daemon's default, at least 2)",
    )
    args = ap.parse_args()
    rng = np.random.default_rng(2014)
    reps = 3 if args.quick else args.reps
    big = 4 if args.quick else 16
    cases = [(big, f) for f in (0.01, 0.10, 0.50, 1.00)]
    cases += [(g, 0.01) for g in ((1,) if args.quick else (1, 128))]

    print(
        "Harvest (ptep_test_and_clear_user_dirty over a whole memslot, ESOP), cold caches; "
        f"{args.threads} threads vs 1; ratio = harvest / single-threaded read pass"
    )
    print(
        f"{'size':>8} {'dirty':>6} {'1 thread':>10} {f'{args.threads} thr':>10} "
        f"{'median':>10} {'Mpages/s':>9} {'read':>9} {'ratio':>6} {'rmw':>9} {'/rmw':>6} "
        f"{'empty':>9} {'scanned':>9} {'B/page':>7}"
    )
    rows = {}
    for gib, frac in cases:
        r = bench_harvest(gib, frac, reps, args.threads, rng)
        rows[(gib, frac)] = r
        print(
            f"{r['size']:>8} {r['dirty']:>6} {r['one_ms']:>8.2f}ms {r['harvest_ms']:>8.2f}ms "
            f"{r['median_ms']:>8.2f}ms {r['mpages_s']:>9.0f} {r['read_ms']:>7.2f}ms "
            f"{r['ratio']:>5.2f}x {r['baseline_ms']:>7.2f}ms {r['ratio_rmw']:>5.2f}x "
            f"{r['empty_ms']:>7.3f}ms {r['scan_empty_ms']:>7.2f}ms "
            f"{r['meta_bytes_per_page']:>7.2f}"
        )
    one = rows[(big, 0.01)]["harvest_ms"]
    half = rows[(big, 0.50)]["harvest_ms"]
    print(f"\n50% dirty / 1% dirty at {big} GiB: {half / one:.2f}x")
    per_gib = {g: rows[(g, 0.01)]["harvest_ms"] / g for g, f in rows if f == 0.01}
    spread = max(per_gib.values()) / min(per_gib.values())
    print(
        "cost per GiB at 1% dirty: "
        + ", ".join(f"{g} GiB {v:.3f} ms" for g, v in sorted(per_gib.items()))
        + f" (max/min {spread:.2f})"
    )

    s = bench_stores(1, 4096, 200 * 4096 if not args.quick else 50 * 4096, rng)
    print(
        f"\nBatched random guest stores (4096-page batches, 1 GiB slot, one thread): "
        f"{s['pages_s'] / 1e6:.2f} Mpages/s, {s['faults']} faults in {s['stored']} stores; "
        f"bare scatter {s['bare_pages_s'] / 1e6:.1f} Mpages/s ({s['ratio']:.1f}x)"
    )


if __name__ == "__main__":
    main()
