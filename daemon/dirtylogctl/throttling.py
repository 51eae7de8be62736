"""When a migration slows its guest down, and by how much: QEMU's rules, as a driver applies them.

QEMU decides inside its migration thread; here the migration is another process, so the driver
decides with the same rules and asks the daemon to act (``cpu-throttle-set``,
``set-vcpu-dirty-limit``). Sources, QEMU 8.2 (migration/ram.c, migration/options.c):

- ``migration_bitmap_sync`` adds each sync's dirty pages to a *period*, and only once more than
  1000 ms have passed since the period began does it judge it (``migration_trigger_throttle``)
  and start a new one.
- ``migration_trigger_throttle``: the period is too dirty if the bytes it dirtied exceed the bytes
  it transferred x ``throttle-trigger-threshold`` %; the 2nd too-dirty period (counting every one
  since the last firing, consecutive or not: the counter is never reset by a calm period) fires,
  and the counter starts again.
- Firing with ``auto-converge``: ``mig_throttle_guest_down`` — ``cpu-throttle-initial`` the first
  time, then the current percentage + ``cpu-throttle-increment`` (or, with
  ``cpu-throttle-tailslow``, the smaller of that increment and what would bring the guest's CPU
  share down to the threshold's share), never above ``max-cpu-throttle``.
- Firing with ``dirty-limit``: ``migration_dirty_limit_guest`` — every vCPU limited to
  ``vcpu-dirty-limit`` MB/s (MiB/s, as all of QEMU's dirty rates).
- The two exclude each other (``migrate_caps_check``).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dirtylogctl.wireformat import PAGE_SIZE

PERIOD_SECONDS = 1.0  # migration_bitmap_sync: a period is judged once it is longer than 1000 ms
TRIGGER_COUNT = 2  # migration_trigger_throttle: ++dirty_rate_high_cnt >= 2
THROTTLE_MIN, THROTTLE_MAX = 1, 99  # cpu-throttle.c CPU_THROTTLE_PCT_MIN/MAX
MODEL_MIN_PERIOD_MS = 100  # the model's vCPUs measure no shorter window (QEMU's floor is 1)


class ConvergenceError(ValueError):
    """Parameters QEMU would refuse; the message is QEMU's."""


class Mode(enum.StrEnum):
    OFF = "off"
    AUTO_CONVERGE = "auto-converge"
    DIRTY_LIMIT = "dirty-limit"


@dataclass(frozen=True)
class Params:
    """QEMU's migration parameters for the two capabilities, with its defaults (options.c)."""

    mode: Mode = Mode.OFF
    throttle_trigger_threshold: int = 50
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    cpu_throttle_tailslow: bool = False
    max_cpu_throttle: int = 99
    vcpu_dirty_limit: int = 1  # MiB/s per vCPU
    vcpu_dirty_limit_period: int = 1000  # ms; QEMU's x-vcpu-dirty-limit-period

    def __post_init__(self) -> None:
        """migrate_params_check's ranges and texts (its names use underscores)."""
        checks = [
            ("throttle_trigger_threshold", self.throttle_trigger_threshold, 1, 100, None),
            ("cpu_throttle_initial", self.cpu_throttle_initial, 1, 99, None),
            ("cpu_throttle_increment", self.cpu_throttle_increment, 1, 99, None),
            (
                "max_cpu_throttle",
                self.max_cpu_throttle,
                self.cpu_throttle_initial,
                99,
                "cpu_throttle_initial",
            ),
        ]
        for name, value, lo, hi, lo_name in checks:
            if not lo <= value <= hi:
                raise ConvergenceError(
                    f"Parameter '{name}' expects an integer in the range of {lo_name or lo} to {hi}"
                )
        if not 1 <= self.vcpu_dirty_limit_period <= 1000:
            raise ConvergenceError(
                "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"
            )
        if self.vcpu_dirty_limit < 1:
            raise ConvergenceError("Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s")


@dataclass(frozen=True)
class Action:
    """What a firing asks of the daemon: a new throttle percentage, or a limit on every vCPU."""

    throttle: int | None = None  # percent
    dirty_limit: int | None = None  # MiB/s per vCPU


class Trigger:
    """migration_bitmap_sync's period bookkeeping and migration_trigger_throttle's decision."""

    def __init__(self, params: Params, start: float, transferred: int = 0) -> None:
        self.params = params
        self.throttle = 0  # percent now in force
        self.limited = False
        self.fired = 0
        self._period_start = start
        self._period_dirty = 0  # pages
        self._transferred_before = transferred
        self._high = 0  # dirty_rate_high_cnt

    def sync(self, now: float, dirty_pages: int, transferred: int, page_size: int) -> Action | None:
        """One harvest of ``dirty_pages`` at ``now``, with ``transferred`` bytes sent so far."""
        self._period_dirty += dirty_pages
        if now - self._period_start <= PERIOD_SECONDS:
            return None
        dirty = self._period_dirty * page_size
        threshold = (transferred - self._transferred_before) * (
            self.params.throttle_trigger_threshold / 100
        )
        self._period_start, self._period_dirty = now, 0
        self._transferred_before = transferred
        if self.params.mode is Mode.OFF or dirty <= threshold:
            return None
        self._high += 1
        if self._high < TRIGGER_COUNT:
            return None
        self._high = 0
        self.fired += 1
        if self.params.mode is Mode.AUTO_CONVERGE:
            self.throttle = next_throttle(self.params, self.throttle, dirty, threshold)
            return Action(throttle=self.throttle)
        if self.limited:  # migration_dirty_limit_guest: already in service, same quota
            return None
        self.limited = True
        return Action(dirty_limit=self.params.vcpu_dirty_limit)


def next_throttle(params: Params, now: int, dirty: float, threshold: float) -> int:
    """mig_throttle_guest_down: the percentage after one more firing (cpu_throttle_set then
    clamps it to 1..99)."""
    if now == 0:
        wanted = params.cpu_throttle_initial
    else:
        step = params.cpu_throttle_increment
        if params.cpu_throttle_tailslow:
            cpu_now = 100 - now
            cpu_ideal = int(cpu_now * (threshold / dirty))  # QEMU keeps it in a uint64
            step = min(cpu_now - cpu_ideal, step)
        wanted = min(now + step, params.max_cpu_throttle)
    return max(THROTTLE_MIN, min(THROTTLE_MAX, wanted))


Execute = Callable[[str, dict[str, Any]], Awaitable[Any]]
AFTER_SECONDS = 1.0  # how long a resumed guest's stores are counted after the migration


@dataclass
class StoreRates:
    """The guest's stores per second around the slow-down (its workload's counter): before the
    first firing, while slowed, and after it was lifted (only if the source was resumed)."""

    before: float | None = None
    during: float | None = None
    after: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return {k: None if v is None else round(v, 1) for k, v in vars(self).items()}


class Brake:
    """Applies the Trigger's actions to one VM through the daemon, lifts them whatever happens,
    and counts what they cost the guest.

    Every action is set with until-disconnect, so a driver that dies (kill -9 included) never
    leaves its guest slowed: the daemon lifts it when the connection closes. A daemon that
    restarts forgets it too; ``lost()`` makes the next sync set it again.
    """

    def __init__(
        self, params: Params, vm: str, execute: Execute, note: Callable[[str], None]
    ) -> None:
        self.params = params
        self.vm = vm
        self._execute = execute
        self._note = note
        self.trigger: Trigger | None = None
        self.throttle_steps: list[int] = []
        self.limited_at: int | None = None  # the round the dirty limit came in
        self.rates = StoreRates()
        self._samples: dict[str, tuple[float, int]] = {}
        self._applied: Action | None = None
        self._reapply = False
        self._period_before: int | None = None  # the VM's own period, put back by lift()

    @property
    def active(self) -> bool:
        return self.params.mode is not Mode.OFF

    async def setup(self, vm_info: dict[str, Any], transferred: int, now: float) -> None:
        """QEMU's capability checks (migrate_caps_check), then the first store sample."""
        if not self.active:
            return
        caps = vm_info.get("capabilities", {})
        if self.params.mode is Mode.DIRTY_LIMIT:
            if not caps.get("vcpu-dirty-ring"):
                raise ConvergenceError(
                    "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set: "
                    f"vm '{self.vm}' ({vm_info.get('backend')} backend) attributes no page to a "
                    "vCPU; use --auto-converge"
                )
            period = max(MODEL_MIN_PERIOD_MS, self.params.vcpu_dirty_limit_period)
            if period != vm_info.get("vcpu-dirty-limit-period", period):
                self._period_before = vm_info["vcpu-dirty-limit-period"]
                await self._execute(
                    "vcpu-dirty-limit-period-set", {"vm": self.vm, "period": period}
                )
        self.trigger = Trigger(self.params, now, transferred)
        await self._sample("start")

    def lost(self) -> None:
        """The daemon connection was replaced: whatever was set went with it."""
        self._reapply = self._applied is not None

    async def sync(self, number: int, now: float, dirty_pages: int, transferred: int) -> None:
        """One round's harvest: judge it as QEMU's bitmap sync does, act if it fires."""
        if self.trigger is None:
            return
        if self._reapply and self._applied is not None:
            self._reapply = False
            await self._apply(self._applied)
        action = self.trigger.sync(now, dirty_pages, transferred, PAGE_SIZE)
        if action is None:
            return
        if self._applied is None:
            await self._sample("on")
        await self._apply(action)
        if action.throttle is not None:
            self.throttle_steps.append(action.throttle)
            self._note(
                f"round {number}: dirtying outpaces the copy; cpu throttle {action.throttle} %"
            )
        else:
            self.limited_at = number
            self._note(
                f"round {number}: dirtying outpaces the copy; every vCPU limited to "
                f"{action.dirty_limit} MiB/s"
            )

    async def stopped(self) -> None:
        """The source was stopped for the switch-over: the slowed span ends here."""
        if self.trigger is not None:
            await self._sample("stop")

    async def lift(self) -> None:
        """Take the slow-down off (cpu_throttle_stop / qmp_cancel_vcpu_dirty_limit); errors only
        noted — the daemon lifts it anyway when this connection closes."""
        applied, self._applied = self._applied, None
        period, self._period_before = self._period_before, None
        try:
            if period is not None:  # the migration's period was its own, like its limit
                await self._execute(
                    "vcpu-dirty-limit-period-set", {"vm": self.vm, "period": period}
                )
            if applied is None:
                return
            if applied.throttle is not None:
                await self._execute("cpu-throttle-set", {"vm": self.vm, "percentage": 0})
            else:
                await self._execute("cancel-vcpu-dirty-limit", {"vm": self.vm})
        except Exception as exc:  # the migration's outcome matters more
            self._note(f"could not lift the slow-down ({exc}); it ends when this client exits")

    async def resumed(self) -> None:
        """The source runs again after the migration: count its stores for AFTER_SECONDS."""
        if self.trigger is None or "on" not in self._samples:
            return
        await self._sample("resumed")
        await asyncio.sleep(AFTER_SECONDS)
        await self._sample("after")
        self.rates.after = self._rate("resumed", "after")

    def finish(self) -> None:
        """Rates from the samples taken: before the first firing and while slowed."""
        slowed = "on" in self._samples
        self.rates.before = self._rate("start", "on" if slowed else "stop")
        if slowed:
            self.rates.during = self._rate("on", "stop")

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.params.mode.value,
            "cpu-throttle-percentage": self.throttle_steps[-1] if self.throttle_steps else 0,
            "cpu-throttle-steps": self.throttle_steps,
            "vcpu-dirty-limit": self.params.vcpu_dirty_limit
            if self.params.mode is Mode.DIRTY_LIMIT
            else None,
            "dirty-limit-round": self.limited_at,
            "vcpu-dirty-limit-period": max(MODEL_MIN_PERIOD_MS, self.params.vcpu_dirty_limit_period)
            if self.params.mode is Mode.DIRTY_LIMIT
            else None,
            "guest-stores-per-second": self.rates.to_json(),
        }

    async def _apply(self, action: Action) -> None:
        if action.throttle is not None:
            await self._execute(
                "cpu-throttle-set",
                {"vm": self.vm, "percentage": action.throttle, "until-disconnect": True},
            )
        else:
            await self._execute(
                "set-vcpu-dirty-limit",
                {"vm": self.vm, "dirty-rate": action.dirty_limit, "until-disconnect": True},
            )
        self._applied = action

    async def _sample(self, name: str) -> None:
        """The workload's store counter now (none: a VM without a simulated workload)."""
        vms = await self._execute("query-vms", {})
        for vm in vms:
            if vm.get("name") == self.vm and vm.get("workload"):
                self._samples[name] = (time.monotonic(), int(vm["workload"]["pages-stored"]))

    def _rate(self, a: str, b: str) -> float | None:
        if a not in self._samples or b not in self._samples:
            return None
        (t0, n0), (t1, n1) = self._samples[a], self._samples[b]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None
