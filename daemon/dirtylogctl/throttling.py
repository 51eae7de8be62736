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

import enum
from dataclasses import dataclass

PERIOD_SECONDS = 1.0  # migration_bitmap_sync: a period is judged once it is longer than 1000 ms
TRIGGER_COUNT = 2  # migration_trigger_throttle: ++dirty_rate_high_cnt >= 2
THROTTLE_MIN, THROTTLE_MAX = 1, 99  # cpu-throttle.c CPU_THROTTLE_PCT_MIN/MAX


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
