"""What each kernel generation's dirty tracking costs and misses, on one recorded workload.

The seed (Linux 3.16) replaced 3.15's hardware change bit (PGSTE_HC, folded from the storage
key at every harvest) with a fault-based software bit (PGSTE_UC). This program records one
workload — guest stores (a hot set plus random cold pages), guest reads, DMA, storage-key
changes, aging — and replays the identical arrays through every generation of
:data:`kvmshim.s390.generations.KERNELS`, ESOP and not (and, for a generation that can back
guest memory with 1 MiB pages, with them too), harvesting once per round as a pre-copy
migration does. Each page's ground truth is the round of its last data write (the stamp of
the KVM selftest), so every report and every silence is checked, not estimated.

    python benchmarks/tradeoff.py                                       # the table
    python benchmarks/tradeoff.py --markdown --plot docs/tradeoff.png   # README's table, picture

``--plot`` needs matplotlib, a docs-only extra: ``pip install 'dirtylogd[docs]'``.
"""

from __future__ import annotations

import argparse
import enum
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvmshim.s390.generations import GENERATIONS, KERNELS
from kvmshim.s390.mmu import S390Mmu

PAGE_SIZE = 4096
PAGES_PER_GIB = (1 << 30) // PAGE_SIZE
MiB = 1 << 20
FLUSH_BYTES = 256 << 20  # read before each timed pass so it starts from DRAM (as harvest.py)


# --- the recorded workload ----------------------------------------------------------------------
class Kind(enum.Enum):
    STORE = "guest store"  # through DAT: faults, UC, key R|C
    LOAD = "guest load"  # through DAT: faults on invalid ptes, key R
    DMA = "dma"  # io_store: key R|C only (the seed's I/O gap)
    KEY = "key change"  # set_guest_storage_key (an intercepted SSKE/PFMF)
    AGE = "aging"  # ptep_test_and_clear_young: reclaim's scan makes ptes old (invalid)


@dataclass(frozen=True)
class Op:
    kind: Kind
    pages: np.ndarray  # int64 page indices, in the order issued
    key: int = 0  # the storage key, for KEY


@dataclass(frozen=True)
class Trace:
    """The recorded workload: ``rounds[0]`` runs before the migration's first harvest (whose
    report the bulk copy absorbs), each later round is followed by one scored harvest."""

    npages: int
    rounds: tuple[tuple[Op, ...], ...]


def record_workload(npages: int, rounds: int, seed: int = 2014) -> Trace:
    """Round 0 (a guest that has run a while, then the first harvest) and ``rounds`` more."""
    guest = _Guest(npages, np.random.default_rng(seed))
    warm_up = (Op(Kind.STORE, np.sort(guest.hot)), Op(Kind.STORE, np.sort(guest.pool)))
    recorded = [warm_up + guest.round(0)] + [guest.round(r) for r in range(1, rounds + 1)]
    return Trace(npages, tuple(recorded))


class _Guest:
    """The recorded guest: a hot set (1/32 of the slot) it keeps writing and reading, a DMA
    buffer pool (1/64) whose buffers it reads after the device fills them, random cold
    accesses, storage-key changes, and the host's reclaim scan aging 1/8 of the slot a round."""

    def __init__(self, npages: int, rng: np.random.Generator) -> None:
        self.npages, self.rng = npages, rng
        self.hot = rng.choice(npages, npages // 32, replace=False)
        self.pool = rng.choice(npages, npages // 64, replace=False)
        self.acc = np.zeros(npages, dtype=np.int64)  # each page's access-control key

    def pick(self, pages: np.ndarray | int, n: int) -> np.ndarray:
        return self.rng.choice(pages, n, replace=False).astype(np.int64)

    def round(self, r: int) -> tuple[Op, ...]:
        """One round's operations, in the order the replay issues them."""
        n = self.npages
        stores = self.pick(self.hot, self.hot.size // 2)
        before_aging, after_aging = stores[: stores.size // 2], stores[stores.size // 2 :]
        dma = self.pick(self.pool, self.pool.size // 4)
        consumed = np.concatenate([dma[: dma.size // 2], self.pick(self.pool, dma.size)])
        clock = (np.arange(n // 8, dtype=np.int64) + r * (n // 8)) % n
        ops = [
            Op(Kind.STORE, before_aging),
            Op(Kind.DMA, dma),
            Op(Kind.LOAD, consumed),
            Op(Kind.LOAD, self.pick(self.hot, self.hot.size)),
            Op(Kind.AGE, clock),
            Op(Kind.STORE, np.concatenate([after_aging, self.pick(n, n // 128)])),
            Op(Kind.LOAD, self.pick(n, n // 32)),
        ]
        return tuple(ops) + self.key_changes(self.pick(n, max(n // 1024, 1)))

    def key_changes(self, pages: np.ndarray) -> tuple[Op, ...]:
        """Each page gets the next access-control key: always a change the kernel must see."""
        self.acc[pages] = (self.acc[pages] + 1) % 16
        return tuple(
            Op(Kind.KEY, pages[self.acc[pages] == a], int(a) << 4)
            for a in np.unique(self.acc[pages])
        )


@dataclass(frozen=True)
class RoundTruth:
    """What one round did to each page (bool arrays), independent of any kernel."""

    written: np.ndarray  # content changed: a guest store or DMA
    stored: np.ndarray  # by a guest store (so the fault-based bit can see it)
    keyed: np.ndarray  # the storage key was set to a new value
    loaded: np.ndarray  # the guest read it


def truth_of(trace: Trace) -> list[RoundTruth]:
    """The stamps' view of every round, from the trace alone."""
    out = []
    for ops in trace.rounds:
        masks = {kind: np.zeros(trace.npages, dtype=bool) for kind in Kind}
        for op in ops:
            masks[op.kind][op.pages] = True
        written = masks[Kind.STORE] | masks[Kind.DMA]
        out.append(RoundTruth(written, masks[Kind.STORE], masks[Kind.KEY], masks[Kind.LOAD]))
    return out


# --- replay -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    kernel: str
    esop: bool
    hugepages: bool = False

    @property
    def label(self) -> str:
        return self.kernel + (" + 1 MiB pages" if self.hugepages else "")


def configurations(kernels: Sequence[str] = KERNELS) -> list[Config]:
    """Every generation ESOP and non-ESOP; a generation with 1 MiB pages also with them."""
    configs = []
    for kernel in kernels:
        hugepages = (False, True) if getattr(GENERATIONS[kernel], "hugepages", False) else (False,)
        configs += [Config(kernel, esop, hp) for hp in hugepages for esop in (True, False)]
    return configs


@dataclass
class Replay:
    """One configuration's harvests: per round the reported pages, and what it cost."""

    reported: list[np.ndarray] = field(default_factory=list)
    harvest_seconds: list[float] = field(default_factory=list)
    translation_faults: int = 0
    protection_faults: int = 0


def make_mmu(config: Config, npages: int) -> S390Mmu:
    extra: dict[str, Any] = {"hugepages": True} if config.hugepages else {}
    return S390Mmu(npages, esop=config.esop, kernel=config.kernel, **extra)


def apply(mmu: S390Mmu, op: Op) -> None:
    if op.kind is Kind.STORE:
        mmu.guest_store(op.pages)
    elif op.kind is Kind.LOAD:
        mmu.guest_load(op.pages)
    elif op.kind is Kind.DMA:
        mmu.io_store(op.pages)
    elif op.kind is Kind.KEY:
        mmu.set_guest_storage_key(op.pages, op.key)
    else:
        mmu.ptep_test_and_clear_young(op.pages)


def replay(trace: Trace, config: Config, flush: Callable[[], object] = lambda: None) -> Replay:
    """Run the trace; faults count from the first (unscored) harvest on; ``flush`` runs before
    each timed harvest."""
    mmu = make_mmu(config, trace.npages)
    out = np.zeros(-(-trace.npages // 64) * 8, dtype=np.uint8)
    result = Replay()
    for r, ops in enumerate(trace.rounds):
        if r == 1:
            result.translation_faults = -mmu.stats.translation_faults
            result.protection_faults = -mmu.stats.protection_faults
        for op in ops:
            apply(mmu, op)
        flush()
        result.harvest_seconds.append(_timed(lambda: mmu.harvest(out)))
        bits = np.unpackbits(out, bitorder="little")[: trace.npages]
        result.reported.append(bits.astype(bool))
    result.translation_faults += mmu.stats.translation_faults
    result.protection_faults += mmu.stats.protection_faults
    return result


# --- scoring against the stamps ------------------------------------------------------------------
@dataclass
class Score:
    """Page counts summed over the scored rounds (each round's harvest against that round)."""

    first_sync: int = 0  # pages the first harvest reported (absorbed by the bulk copy)
    reported: int = 0
    changed: int = 0  # written in the round: the pages a migration must send
    missed: int = 0  # written in the round, not reported by its harvest
    missed_dma: int = 0  # ... of which only DMA wrote them: the I/O gap
    stale: int = 0  # after the last harvest: changed since their last report
    late: int = 0  # reported, not written this round, but written unreported earlier
    key: int = 0  # reported, unchanged, but their key changed since their last report
    false: int = 0  # reported with neither content nor key changed since their last report
    false_read: int = 0  # ... of which the guest read them this round (the non-ESOP re-arm)


def score(truth: Sequence[RoundTruth], reported: Sequence[np.ndarray]) -> Score:
    """Count each scored round's reports against the stamps; round 0 is the first sync."""
    npages = reported[0].size
    s = Score(first_sync=int(np.count_nonzero(reported[0])))
    last_data = np.zeros(npages, dtype=np.int64)  # the bulk copy sent every page at round 0
    last_key = np.zeros(npages, dtype=np.int64)
    last_report = np.zeros(npages, dtype=np.int64)
    for r in range(1, len(reported)):
        t, rep = truth[r], reported[r]
        unwritten = rep & ~t.written
        late = unwritten & (last_data > last_report)
        keyed = unwritten & ~late & (t.keyed | (last_key > last_report))
        false = unwritten & ~late & ~keyed
        s.reported += int(np.count_nonzero(rep))
        s.changed += int(np.count_nonzero(t.written))
        s.missed += int(np.count_nonzero(t.written & ~rep))
        s.missed_dma += int(np.count_nonzero(t.written & ~t.stored & ~rep))
        s.late += int(np.count_nonzero(late))
        s.key += int(np.count_nonzero(keyed))
        s.false += int(np.count_nonzero(false))
        s.false_read += int(np.count_nonzero(false & t.loaded))
        last_data[t.written] = r
        last_key[t.keyed] = r
        last_report[rep] = r
    s.stale = int(np.count_nonzero(last_data > last_report))
    return s


# --- the comparison ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    config: Config
    score: Score
    harvest_ms: float  # median over the scored rounds
    pgste_pass_ms: float  # one read pass over a PGSTE array of the slot, timed beside it
    translation_faults: int
    protection_faults: int
    gib: float

    @property
    def faults(self) -> int:
        return self.translation_faults + self.protection_faults

    @property
    def sent_mib(self) -> float:
        return self.score.reported * PAGE_SIZE / MiB

    @property
    def changed_mib(self) -> float:
        return self.score.changed * PAGE_SIZE / MiB

    @property
    def harvest_ratio(self) -> float:
        return self.harvest_ms / self.pgste_pass_ms

    @property
    def amplification(self) -> float:
        return self.score.reported / self.score.changed if self.score.changed else 0.0


def pgste_pass_ms(npages: int, flush: Callable[[], object], reps: int = 13) -> float:
    """Median ms of one read pass over a PGSTE array of the slot (the harvest's floor)."""
    pgste = np.full(npages, 1, dtype=np.uint64)  # committed memory, not the zero page
    times = []
    for _ in range(reps):
        flush()
        times.append(_timed(lambda: np.bitwise_or.reduce(pgste)))
    return statistics.median(times) * 1e3


def cache_flusher(nbytes: int) -> Callable[[], object]:
    """A pass over ``nbytes`` of other memory: evicts the model's arrays (0: no flush)."""
    buffer = np.ones(nbytes // 8, dtype=np.uint64)
    return buffer.sum


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(
    trace: Trace, configs: Sequence[Config], flush_bytes: int = FLUSH_BYTES
) -> Iterator[Row]:
    """Replay the trace once per configuration and score it; the baseline is timed beside each
    replay, so that a shared machine's drift moves both."""
    truth = truth_of(trace)
    flush = cache_flusher(flush_bytes)
    for config in configs:
        base_ms = pgste_pass_ms(trace.npages, flush)
        run = replay(trace, config, flush)
        yield Row(
            config,
            score(truth, run.reported),
            statistics.median(run.harvest_seconds[1:]) * 1e3,
            base_ms,
            run.translation_faults,
            run.protection_faults,
            trace.npages / PAGES_PER_GIB,
        )


# --- output --------------------------------------------------------------------------------------
COLUMNS: tuple[tuple[str, Callable[[Row], str]], ...] = (
    ("generation", lambda r: r.config.label),
    ("ESOP", lambda r: "yes" if r.config.esop else "no"),
    ("first sync", lambda r: f"{r.score.first_sync:,}"),
    ("reported", lambda r: f"{r.score.reported:,}"),
    ("missed", lambda r: f"{r.score.missed:,}"),
    ("of which DMA", lambda r: f"{r.score.missed_dma:,}"),
    ("stale at end", lambda r: f"{r.score.stale:,}"),
    ("late", lambda r: f"{r.score.late:,}"),
    ("key", lambda r: f"{r.score.key:,}"),
    ("false +", lambda r: f"{r.score.false:,}"),
    ("of which read", lambda r: f"{r.score.false_read:,}"),
    ("sent MiB", lambda r: f"{r.sent_mib:,.1f}"),
    ("sent/changed", lambda r: f"{r.amplification:.2f}x"),
    ("harvest ms", lambda r: f"{r.harvest_ms:.2f}"),
    ("ms/GiB", lambda r: f"{r.harvest_ms / r.gib:.2f}"),
    ("x PGSTE pass", lambda r: f"{r.harvest_ratio:.1f}"),
    ("faults", lambda r: f"{r.faults:,}"),
    ("of which protection", lambda r: f"{r.protection_faults:,}"),
)


def table(rows: Sequence[Row], markdown: bool = False) -> str:
    """Fixed-width text (or a Markdown table): one row per configuration."""
    cells = [[fmt(row) for _, fmt in COLUMNS] for row in rows]
    heads = [name for name, _ in COLUMNS]
    if markdown:
        lines = [heads, ["---", "---"] + ["--:"] * (len(heads) - 2), *cells]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(c) for c in col) for col in zip(heads, *cells, strict=True)]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in [heads, *cells]
    )


def summary(trace: Trace, seed: int) -> str:
    """The workload and its ground truth: the same for every row."""
    truth = truth_of(trace)[1:]
    writes = sum(int(np.count_nonzero(t.written)) for t in truth)
    dma = sum(int(np.count_nonzero(t.written & ~t.stored)) for t in truth)
    keys = sum(int(np.count_nonzero(t.keyed)) for t in truth)
    return (
        f"{len(truth)} harvests of a {trace.npages / PAGES_PER_GIB:g} GiB slot "
        f"({trace.npages:,} pages), seed {seed}. Ground truth, summed over the harvests: "
        f"{writes:,} pages written ({writes * PAGE_SIZE / MiB:,.1f} MiB), "
        f"{dma:,} of them by DMA alone; {keys:,} key changes."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="slot size in GiB (default 1)")
    ap.add_argument("--rounds", type=int, default=12, help="scored harvests (default 12)")
    ap.add_argument("--seed", type=int, default=2014, help="the workload's seed (default 2014)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--plot", metavar="PNG", help="also draw the figure (needs matplotlib)")
    args = ap.parse_args(argv)
    args.npages = int(args.gib * PAGES_PER_GIB)
    if args.npages <= 0 or args.npages % 256 or args.rounds < 1:
        ap.error("--gib must be a positive multiple of 1 MiB and --rounds at least 1")
    return args


def main(argv: Sequence[str] | None = None, flush_bytes: int = FLUSH_BYTES) -> None:
    args = parse_args(argv)
    if args.plot:  # fail before the run, not after it
        from tradeoff_plot import load_pyplot

        load_pyplot()
    trace = record_workload(args.npages, args.rounds, args.seed)
    rows = []
    for row in compare(trace, configurations(), flush_bytes):
        rows.append(row)
        print(f"replayed {row.config.label}, ESOP {row.config.esop}", file=sys.stderr)
    print(summary(trace, args.seed) + "\n")
    print(table(rows, args.markdown))
    if args.plot:
        from tradeoff_plot import plot_rows

        plot_rows(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
