"""A VM's convergence state, which VmState owns and the modules that act on it fill in.

Kept apart from service/dirtyrate.py and service/limits.py, which act on a whole VmState, so
that vm.py can hold the state without importing them (no import loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dirtylogd.errors import GenericError

log = logging.getLogger("dirtylogd.service.dirtyrate")

HELD = "{verb} while migration is running (another QMP connection holds it until it disconnects)"
LIMIT, THROTTLE = "limit", "throttle"


@dataclass
class Holds:
    """Which connection (its scope id) holds the VM's dirty limits and its cpu throttle."""

    limit: int | None = None
    throttle: int | None = None

    def check(self, what: str, owner: int, verb: str) -> None:
        held = getattr(self, what)
        if held is not None and held != owner:
            raise GenericError(HELD.format(verb=verb))


@dataclass(frozen=True)
class CalcRequest:
    """A checked calc-dirty-rate: the window in ms, the mode, sampled pages per GiB."""

    calc_ms: int
    mode: str
    sample_pages: int


@dataclass
class Result:
    """What a measured calc found (besides the rate)."""

    rate: int  # MiB/s
    seconds: float | None = None  # the window measured (QEMU's calc_time_ms, at the wait's end)
    vcpus: list[dict[str, int]] | None = None  # dirty-ring: [{id, dirty-rate}]
    samples: int | None = None  # page-sampling: sampled pages and how many changed
    dirty_samples: int | None = None


@dataclass
class DirtyRateCalc:
    """One VM's last calc-dirty-rate (QEMU's DirtyStat and CalculatingState)."""

    status: str = "unstarted"
    mode: str = "page-sampling"
    start_time: int = 0  # seconds of the monotonic clock, as QEMU_CLOCK_REALTIME / 1000
    calc_ms: int = 0  # asked for while measuring, then the actual window
    sample_pages: int = 0
    result: Result | None = None
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def measuring(self) -> bool:
        return self.status == "measuring"

    def info(self, unit: str) -> dict[str, Any]:
        """QEMU's DirtyRateInfo: dirty-rate only once measured; calc-time floored to ``unit``."""
        out: dict[str, Any] = {
            "status": self.status,
            "mode": self.mode,
            "start-time": self.start_time,
            "calc-time": self.calc_ms // 1000 if unit == "second" else self.calc_ms,
            "calc-time-unit": unit,
            "sample-pages": self.sample_pages,
        }
        if self.status == "measured" and self.result is not None:
            out["dirty-rate"] = self.result.rate
            if self.result.vcpus is not None:
                out["vcpu-dirty-rate"] = self.result.vcpus
            if self.result.samples is not None:
                out["sample-count"] = self.result.samples
                out["dirty-samples"] = self.result.dirty_samples
        return out

    def start(
        self, request: CalcRequest, measure: Callable[[CalcRequest], Awaitable[Result]]
    ) -> None:
        """Begin a measurement (``measure`` is the mode's coroutine function); returns at once."""
        self.status, self.mode, self.result = "measuring", request.mode, None
        self.start_time = int(time.monotonic())
        self.calc_ms, self.sample_pages = request.calc_ms, request.sample_pages
        self._task = asyncio.create_task(self._run(request, measure))

    async def _run(
        self, request: CalcRequest, measure: Callable[[CalcRequest], Awaitable[Result]]
    ) -> None:
        began = time.monotonic()
        try:
            result = await measure(request)
        except asyncio.CancelledError:  # the VM goes: a calc after an undone removal may start
            self.result, self.status = Result(-1), "measured"
            raise
        except Exception as exc:  # QEMU goes to measured with rate -1; say why in the log
            log.error("calc-dirty-rate failed: %s", exc)
            result = Result(-1)
        elapsed = result.seconds if result.seconds is not None else time.monotonic() - began
        self.calc_ms = int(elapsed * 1000)
        if request.mode != "page-sampling":
            self.sample_pages = 0  # as QEMU reports it in the other modes
        self.result, self.status = result, "measured"

    async def stop(self) -> None:
        """Cancel a measurement in flight and wait until its thread work is done (vm-remove)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
