"""benchmarks/tradeoff.py: what its table says about each generation is what the model does.

A small hand-built trace (512 pages, one scored harvest) pins each number; the recorded
workload, shrunk to 16 MiB, checks the program end to end. No matplotlib needed: the test extra
does not install it, and ``--plot`` without it must say which extra does.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from kvmshim.s390.generations import GENERATIONS, KERNELS

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"
_spec = importlib.util.spec_from_file_location("tradeoff", BENCHMARKS / "tradeoff.py")
assert _spec is not None and _spec.loader is not None
tradeoff = importlib.util.module_from_spec(_spec)
sys.modules["tradeoff"] = tradeoff  # dataclasses look their module up while it loads
_spec.loader.exec_module(tradeoff)
Kind, Op, Trace, Config = tradeoff.Kind, tradeoff.Op, tradeoff.Trace, tradeoff.Config


def pages(first, count):
    return np.arange(first, first + count, dtype=np.int64)


# Round 0 (before the first harvest): [0, 64) stored, [64, 128) read.
# Round 1: DMA into [0, 16) (mapped) and [256, 272) (never mapped); guest stores to [32, 48);
#          guest reads of [48, 64); a new key for [128, 136).
TRACE = Trace(
    512,
    (
        (Op(Kind.STORE, pages(0, 64)), Op(Kind.LOAD, pages(64, 64))),
        (
            Op(Kind.DMA, pages(0, 16)),
            Op(Kind.DMA, pages(256, 16)),
            Op(Kind.STORE, pages(32, 16)),
            Op(Kind.LOAD, pages(48, 16)),
            Op(Kind.KEY, pages(128, 8), 0x30),
        ),
    ),
)


def run(kernel, esop):
    replayed = tradeoff.replay(TRACE, Config(kernel, esop))
    return replayed, tradeoff.score(tradeoff.truth_of(TRACE), replayed.reported)


@pytest.mark.parametrize("esop", [True, False], ids=["esop", "no-esop"])
def test_316_misses_exactly_the_dma_only_pages(esop):
    replayed, score = run("3.16", esop)
    assert score.missed == score.missed_dma == 32
    assert not replayed.reported[1][pages(0, 16)].any()
    assert not replayed.reported[1][pages(256, 16)].any()
    assert replayed.reported[1][pages(32, 16)].all()


def test_315_reports_dma_into_mapped_pages_and_misses_it_into_unmapped_ones():
    replayed, score = run("3.15", True)
    # [0, 16): valid ptes, so the harvest folds the key's change bit into PGSTE_HC
    assert replayed.reported[1][pages(0, 16)].all()
    # [256, 272): no valid pte, so the key is never folded
    assert score.missed == score.missed_dma == 16
    assert not replayed.reported[1][pages(256, 16)].any()


def test_non_esop_reports_pages_the_guest_only_read_and_esop_does_not():
    _, esop = run("3.16", True)
    _, non_esop = run("3.16", False)
    assert esop.false == esop.false_read == 0
    # [48, 64): stored before the first harvest, which invalidated them; a read faults them
    # back in writable, and pgste_set_pte sets UC
    assert non_esop.false == non_esop.false_read == 16


@pytest.mark.parametrize("kernel", ["3.15", "3.16"])
def test_key_changes_are_counted_apart_from_false_positives(kernel):
    _, score = run(kernel, True)
    assert score.key == 8


def test_315_reports_pages_written_before_the_first_harvest_once_more():
    # The first harvest finds the initial PGSTE_HC of every page, so it does not move the key's
    # change bit: the next one does, and reports [16, 32) and [48, 64) again.
    _, score = run("3.15", True)
    assert score.first_sync == 512
    assert score.false == 32
    assert score.false_read == 16


def test_faults_are_counted_from_the_first_harvest_on():
    esop, _ = run("3.16", True)
    non_esop, _ = run("3.16", False)
    # ESOP: the stores to [32, 48) hit protected ptes, the reads of [48, 64) do not fault.
    assert (esop.translation_faults, esop.protection_faults) == (0, 16)
    # Non-ESOP: the harvest invalidated [0, 64): stores and reads fault on translation.
    assert (non_esop.translation_faults, non_esop.protection_faults) == (32, 0)


def test_every_generation_runs_esop_and_not_and_with_1mib_pages_where_it_can():
    configs = tradeoff.configurations()
    for kernel in KERNELS:
        assert Config(kernel, True) in configs and Config(kernel, False) in configs
        huge = getattr(GENERATIONS[kernel], "hugepages", False)
        assert (Config(kernel, True, True) in configs) is huge
    assert len({c.label for c in configs}) == len(configs) // 2


def test_the_recorded_workload_is_the_same_for_the_same_seed():
    one, two = (tradeoff.record_workload(4096, 2, seed=7) for _ in range(2))
    for ops_one, ops_two in zip(one.rounds, two.rounds, strict=True):
        for a, b in zip(ops_one, ops_two, strict=True):
            assert a.kind is b.kind and a.key == b.key
            np.testing.assert_array_equal(a.pages, b.pages)


def test_the_recorded_workload_shows_the_trade():
    trace = tradeoff.record_workload(4096, 3)
    rows = {
        (r.config.label, r.config.esop): r
        for r in tradeoff.compare(trace, tradeoff.configurations(["3.15", "3.16"]), 0)
    }
    esop, non_esop = rows["3.16", True].score, rows["3.16", False].score
    assert esop.missed == esop.missed_dma > 0  # the I/O gap, and only it
    assert non_esop.missed == non_esop.missed_dma
    assert esop.false == 0 < non_esop.false == non_esop.false_read
    assert rows["3.15", True].score.missed_dma < esop.missed_dma
    assert all(r.faults > 0 and r.harvest_ms > 0 for r in rows.values())


def test_the_table_has_a_row_per_configuration(capsys):
    tradeoff.main(["--gib", "0.015625", "--rounds", "2", "--markdown"], flush_bytes=0)
    out = capsys.readouterr().out
    body = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(body) == 2 + len(tradeoff.configurations())  # header, rule, rows
    assert "2 harvests of a 0.015625 GiB slot (4,096 pages)" in out


def test_plot_without_matplotlib_names_the_docs_extra_before_running(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    with pytest.raises(SystemExit) as exit_:
        tradeoff.main(["--plot", "/nonexistent/tradeoff.png"], flush_bytes=0)
    assert "pip install 'dirtylogd[docs]'" in str(exit_.value.code)
    assert capsys.readouterr().out == ""
