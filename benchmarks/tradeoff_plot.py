"""The picture of benchmarks/tradeoff.py: one small bar chart per metric, every generation.

matplotlib is a docs-only extra (``pip install 'dirtylogd[docs]'``), so it is imported here,
and only when ``--plot`` asks for a picture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tradeoff import Row

PLOT_EXTRA = "pip install 'dirtylogd[docs]'"
COLOURS = ("tab:blue", "tab:orange", "tab:green")
CLIP_SPREAD = 8  # a generation whose bars outgrow every other's this much is cut at the top


def load_pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend; SystemExit naming the extra when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            f"--plot needs matplotlib, a docs-only extra of dirtylogd: {PLOT_EXTRA}"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    parts: tuple[str, ...]  # the stacked parts of each bar, bottom first
    values: Callable[[Row], tuple[float, ...]]
    label: Callable[[Row], str] = lambda r: ""  # printed on top of the bar


PANELS = (
    Panel(
        "Writes missed by their round's harvest",
        "pages",
        ("DMA only", "guest stores"),
        lambda r: (r.score.missed_dma, r.score.missed - r.score.missed_dma),
        lambda r: compact(r.score.missed),
    ),
    Panel(
        "Wrong at the destination after the last harvest",
        "pages",
        ("stale",),
        lambda r: (r.score.stale,),
        lambda r: compact(r.score.stale),
    ),
    Panel(
        "Reported without a change of data",
        "pages",
        ("read this round", "not read", "key changed"),
        lambda r: (r.score.false_read, r.score.false - r.score.false_read, r.score.key),
        lambda r: compact(r.score.false + r.score.key),
    ),
    Panel(
        "Data sent (dashed: data changed)",
        "MiB",
        ("sent",),
        lambda r: (r.sent_mib,),
        lambda r: f"{r.amplification:.2f}x",
    ),
    Panel(
        "Harvest, median (dashed: PGSTE read pass)",
        "ms per harvest",
        ("harvest",),
        lambda r: (r.harvest_ms,),
        lambda r: f"{r.harvest_ms:.2f}",
    ),
    Panel(
        "Guest faults taken",
        "faults",
        ("translation", "protection"),
        lambda r: (r.translation_faults, r.protection_faults),
        lambda r: compact(r.faults),
    ),
)


def compact(n: float) -> str:
    """A count short enough to sit above a bar: 727, 4,262, 12.0k, 3.05M."""
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}k"
    return f"{n:,.0f}"


def plot_rows(rows: Sequence[Row], path: str) -> None:
    """Small multiples: generations on x, ESOP (solid) and non-ESOP (hatched) side by side."""
    plt = load_pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=80, layout="constrained")
    for ax, panel in zip(axes.flat, PANELS, strict=True):
        _draw(ax, rows, panel)
    first = rows[0]
    axes.flat[3].axhline(first.changed_mib, color="black", linestyle="--", linewidth=1)
    base_ms = float(np.median([r.pgste_pass_ms for r in rows]))
    axes.flat[4].axhline(base_ms, color="black", linestyle="--", linewidth=1)
    fig.suptitle(
        f"One recorded workload on a {first.gib:g} GiB slot, summed over its harvests: "
        "left bar ESOP, right bar (hatched) non-ESOP"
    )
    fig.savefig(path)
    plt.close(fig)


def _draw(ax: Any, rows: Sequence[Row], panel: Panel) -> None:
    labels = list(dict.fromkeys(r.config.label for r in rows))
    tops: list[tuple[float, float, str, str]] = []  # x, height, label, generation
    for offset, esop in ((-0.2, True), (0.2, False)):
        mine = [r for r in rows if r.config.esop is esop]
        at = np.array([labels.index(r.config.label) for r in mine]) + offset
        stacks = np.array([panel.values(r) for r in mine], dtype=float).reshape(len(mine), -1)
        bottom = np.zeros(len(mine))
        for i, part in enumerate(panel.parts):
            ax.bar(
                at,
                stacks[:, i],
                0.38,
                bottom=bottom,
                color=COLOURS[i],
                hatch="" if esop else "//",
                edgecolor="white",
                label=part if esop else None,
            )
            bottom += stacks[:, i]
        for a, t, r in zip(at, bottom, mine, strict=True):
            tops.append((float(a), float(t), panel.label(r), r.config.label))
    ceiling = _ceiling(tops)
    for x, top, text, _ in tops:
        if ceiling is not None and top > ceiling:  # the true value, down the cut bar
            ax.annotate(
                text + " (cut)",
                (x, ceiling * 1.15),
                xytext=(0, -4),
                textcoords="offset points",
                ha="center",
                va="top",
                rotation=90,
                fontsize=8,
                color="white",
                weight="bold",
            )
            continue
        ax.annotate(
            text,
            (x, top),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_ylim(0, (ceiling or max(t for _, t, _, _ in tops) or 1) * 1.15)
    ticks = [label.replace(" + ", "\n+ ") for label in labels]
    ax.set_xticks(np.arange(len(labels)), ticks, fontsize=9)
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.unit)
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:,.0f}" if v >= 10 else f"{v:g}")
    if len(panel.parts) > 1:
        ax.legend(fontsize=8, loc="best")


def _ceiling(tops: list[tuple[float, float, str, str]]) -> float | None:
    """Where to cut the axis so that one outgrown generation leaves the others readable: just
    above the second tallest generation, if the tallest is CLIP_SPREAD times higher; else None.
    """
    tallest: dict[str, float] = {}
    for _, top, _, generation in tops:
        tallest[generation] = max(tallest.get(generation, 0.0), top)
    ranked = sorted(tallest.values())
    if len(ranked) < 2 or ranked[-1] <= CLIP_SPREAD * max(ranked[-2], 1.0):
        return None
    return ranked[-2] * 1.25
