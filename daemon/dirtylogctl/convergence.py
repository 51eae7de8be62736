"""dirtylogctl's convergence commands: rate, calc-dirty-rate, dirty-limit.

Each runs QMP commands and returns (the JSON answer, the text a person reads); the CLI prints
one or the other. Rates are QEMU's "MB/s", which are MiB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any

from qemu.qmp import QMPClient

from dirtylogctl.argtypes import non_negative_int

Shown = tuple[Any, str]


class ReplyError(Exception):
    """The daemon's return value does not have the shape the command documents (exit 1)."""


async def _object(client: QMPClient, command: str, args: dict[str, Any]) -> dict[str, Any]:
    reply = await client.execute(command, args)
    if not isinstance(reply, dict):
        raise ReplyError(f"{command} returned {type(reply).__name__}, not a JSON object")
    return reply


async def _rows(client: QMPClient, command: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    reply = await client.execute(command, args)
    if not isinstance(reply, list) or not all(isinstance(r, dict) for r in reply):
        raise ReplyError(f"{command} returned something other than a JSON array of objects")
    return reply


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def describe_calc(vm: str, r: dict[str, Any]) -> str:
    """One line for the last calc-dirty-rate of query-dirty-rate's answer ``r``."""
    if r["status"] == "unstarted":
        return f"{vm}: no calc-dirty-rate yet"
    what = f"{r['mode']}, {r['calc-time']} {r['calc-time-unit']}(s)"
    if r["status"] != "measured":
        return f"{vm}: calc-dirty-rate measuring ({what})"
    line = f"{vm}: calc-dirty-rate {r['dirty-rate']} MiB/s ({what})"
    n, k = r.get("sample-count"), r.get("dirty-samples")
    if n and k:  # the binomial standard error of the changed share, as a rate
        error = r["dirty-rate"] * math.sqrt((1 - k / n) / k)
        line += f", {k} of {n} samples changed, standard error {error:.1f} MiB/s"
    elif n is not None:  # nothing to scale an error from: say what the sample can see
        line += f", 0 of {n} samples changed (too few to see a lower rate: raise --sample-pages)"
    for v in r.get("vcpu-dirty-rate", []):
        line += f"\n  vCPU {v['id']}: {v['dirty-rate']} MiB/s"
    return line


async def rate(client: QMPClient, a: argparse.Namespace) -> Shown:
    r = await _object(client, "query-dirty-rate", {"vm": a.vm})
    human = (
        f"{a.vm}: harvests {r['dirty-pages-rate']:.0f} pages/s ({r['harvest-dirty-rate']} MiB/s)\n"
        + _table(r["slots"], ["slot", "as-id", "dirty-pages", "interval-ms", "pages-per-second"])
        + "\n"
        + describe_calc(a.vm, r)
    )
    return r, human


async def calc_dirty_rate(client: QMPClient, a: argparse.Namespace) -> Shown:
    unit = "second" if a.unit == "s" else "millisecond"
    args: dict[str, Any] = {"vm": a.vm, "calc-time": a.calc_time, "calc-time-unit": unit}
    args["mode"] = a.mode
    if a.sample_pages is not None:
        args["sample-pages"] = a.sample_pages
    await client.execute("calc-dirty-rate", args)
    query = {"vm": a.vm, "calc-time-unit": unit}
    r = await _object(client, "query-dirty-rate", query)
    while not a.no_wait and r["status"] == "measuring":
        await asyncio.sleep(0.05 if unit == "millisecond" else 0.2)
        r = await _object(client, "query-dirty-rate", query)
    return r, describe_calc(a.vm, r)


async def dirty_limit(client: QMPClient, a: argparse.Namespace) -> Shown:
    where: dict[str, Any] = {"vm": a.vm}
    if a.cpu_index is not None:
        where["cpu-index"] = a.cpu_index
    which = "every vCPU" if a.cpu_index is None else f"vCPU {a.cpu_index}"
    if a.cancel:
        return await client.execute("cancel-vcpu-dirty-limit", where), f"{which}: no limit"
    if a.rate is not None:
        await client.execute("set-vcpu-dirty-limit", {**where, "dirty-rate": a.rate})
        said = f"{which}: limited to {a.rate} MiB/s" if a.rate else f"{which}: no limit"
        return {}, said
    rows = await _rows(client, "query-vcpu-dirty-limit", {"vm": a.vm})
    if not rows:
        return rows, f"{a.vm}: no vCPU is limited"
    return rows, _table(rows, ["cpu-index", "limit-rate", "current-rate"]) + "\n(MiB/s)"


MODES = ("page-sampling", "dirty-bitmap", "dirty-ring")


def _mode(text: str) -> str:
    """A calc-dirty-rate mode (not argparse choices: the three names overflow a man line)."""
    if text not in MODES:
        raise argparse.ArgumentTypeError(f"mode must be one of {', '.join(MODES)}, not {text!r}")
    return text


def add_parsers(sub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """rate, calc-dirty-rate and dirty-limit."""
    cmd(
        sub,
        "rate",
        "rate",
        "exact dirty rate of the latest harvests of each slot, and the last calc-dirty-rate",
    ).add_argument("vm")

    q = cmd(
        sub,
        "calc-dirty-rate",
        "calc_dirty_rate",
        "measure a VM's dirty rate as QEMU's calc-dirty-rate does, and print it",
    )
    q.add_argument("vm")
    q.add_argument(
        "--calc-time", type=int, default=1, metavar="N", help="window in --unit (default 1)"
    )
    q.add_argument(
        "--unit", choices=("s", "ms"), default="s", help="of --calc-time: s (default) or ms"
    )
    q.add_argument(
        "--mode",
        type=_mode,
        default="page-sampling",
        metavar="MODE",
        help="page-sampling (default): CRC of random pages at start and end, an estimate "
        "with a standard error of rate*sqrt((1-p)/(p*samples)), p the changed share; "
        "dirty-bitmap: exact, from two harvests of an internal consumer; dirty-ring: exact "
        "per vCPU (softmmu only)",
    )
    q.add_argument(
        "--sample-pages",
        type=int,
        metavar="N",
        help="page-sampling: pages sampled per GiB, 128-16384 (default 512)",
    )
    q.add_argument(
        "--no-wait", action="store_true", help="start it and return (see: dirtylogctl rate)"
    )

    q = cmd(
        sub,
        "dirty-limit",
        "dirty_limit",
        "limit how fast vCPUs newly dirty pages (softmmu); without RATE, show the limits",
    )
    q.add_argument("vm")
    q.add_argument(
        "rate",
        nargs="?",
        type=non_negative_int,
        metavar="RATE",
        help="MiB/s per vCPU; 0 lifts the limit (default: show the limited vCPUs)",
    )
    q.add_argument(
        "--cpu-index", type=non_negative_int, metavar="N", help="one vCPU (default: every vCPU)"
    )
    q.add_argument("--cancel", action="store_true", help="lift the limit")
