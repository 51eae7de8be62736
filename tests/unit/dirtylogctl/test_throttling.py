"""QEMU's auto-converge and dirty-limit trigger, as the migration driver applies it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtylogctl.throttling import (
    Action,
    ConvergenceError,
    Mode,
    Params,
    Trigger,
    next_throttle,
)

PAGE = 4096


def test_defaults_are_qemus() -> None:
    p = Params()
    assert (p.throttle_trigger_threshold, p.cpu_throttle_initial, p.cpu_throttle_increment) == (
        50,
        20,
        10,
    )
    assert (p.max_cpu_throttle, p.cpu_throttle_tailslow) == (99, False)
    assert (p.vcpu_dirty_limit, p.vcpu_dirty_limit_period) == (1, 1000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"throttle_trigger_threshold": 0}, "'throttle_trigger_threshold' expects an integer in"),
        ({"throttle_trigger_threshold": 101}, "range of 1 to 100"),
        ({"cpu_throttle_initial": 100}, "'cpu_throttle_initial' expects an integer"),
        ({"cpu_throttle_increment": 0}, "'cpu_throttle_increment' expects"),
        (
            {"cpu_throttle_initial": 40, "max_cpu_throttle": 30},
            "range of cpu_throttle_initial to 99",
        ),
        ({"vcpu_dirty_limit_period": 0}, "'x-vcpu-dirty-limit-period' expects a value between"),
        ({"vcpu_dirty_limit_period": 1001}, "between 1 and 1000"),
        ({"vcpu_dirty_limit": 0}, "'vcpu_dirty_limit' must be greater than 1 MB/s"),
    ],
)
def test_out_of_range_parameters_get_qemus_words(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConvergenceError, match=message):
        Params(**kwargs)  # type: ignore[arg-type]


def test_the_default_throttle_steps_are_20_30_and_so_on_to_99() -> None:
    p, now, seen = Params(mode=Mode.AUTO_CONVERGE), 0, []
    for _ in range(10):
        now = next_throttle(p, now, dirty=10.0, threshold=1.0)
        seen.append(now)
    assert seen == [20, 30, 40, 50, 60, 70, 80, 90, 99, 99]


def test_max_cpu_throttle_caps_the_steps() -> None:
    p = Params(mode=Mode.AUTO_CONVERGE, max_cpu_throttle=45)
    assert next_throttle(p, 40, dirty=10.0, threshold=1.0) == 45


def test_tailslow_steps_no_further_than_the_dirty_share_asks() -> None:
    p = Params(mode=Mode.AUTO_CONVERGE, cpu_throttle_tailslow=True)
    # 60 % throttled: 40 % CPU; dirty only 1.25x the threshold: ideal 32 % CPU, a step of 8
    assert next_throttle(p, 60, dirty=1.25, threshold=1.0) == 68
    # far too dirty: the increment still caps the step
    assert next_throttle(p, 60, dirty=100.0, threshold=1.0) == 70


def _periods(trigger: Trigger, dirty_bytes: list[int], sent_per_period: int) -> list[Action | None]:
    """One sync per 1.5 s period, ``sent_per_period`` bytes transferred in each."""
    out, t, sent = [], 0.0, 0
    for dirty in dirty_bytes:
        t += 1.5
        sent += sent_per_period
        out.append(trigger.sync(t, dirty // PAGE, sent, PAGE))
    return out


def test_auto_converge_fires_on_every_second_too_dirty_period_even_apart() -> None:
    trig = Trigger(Params(mode=Mode.AUTO_CONVERGE), start=0.0)
    high, low = 100 * PAGE, 10 * PAGE  # threshold: 50 % of 100 pages sent = 50 pages
    got = _periods(trig, [high, low, high, high, low, high], sent_per_period=100 * PAGE)
    assert got == [None, None, Action(throttle=20), None, None, Action(throttle=30)]


def test_a_period_is_judged_only_after_a_second() -> None:
    trig = Trigger(Params(mode=Mode.AUTO_CONVERGE), start=0.0)
    # eight syncs 0.26 s apart: periods close at the 4th and 8th, each too dirty
    got = [trig.sync(0.26 * i, 1000, 100 * PAGE * i, PAGE) for i in range(1, 9)]
    assert got == [None] * 7 + [Action(throttle=20)]


def test_dirty_limit_is_applied_once_to_every_vcpu() -> None:
    trig = Trigger(Params(mode=Mode.DIRTY_LIMIT, vcpu_dirty_limit=50), start=0.0)
    got = _periods(trig, [100 * PAGE] * 6, sent_per_period=10 * PAGE)
    assert got == [None, Action(dirty_limit=50), None, None, None, None]


def test_off_never_fires() -> None:
    trig = Trigger(Params(), start=0.0)
    assert _periods(trig, [100 * PAGE] * 6, sent_per_period=PAGE) == [None] * 6


@given(
    st.lists(st.integers(0, 1 << 20), min_size=1, max_size=40),
    st.integers(1, 100),
    st.booleans(),
)
def test_the_throttle_only_rises_and_stays_in_range(
    dirty: list[int], threshold: int, tailslow: bool
) -> None:
    p = Params(
        mode=Mode.AUTO_CONVERGE,
        throttle_trigger_threshold=threshold,
        cpu_throttle_tailslow=tailslow,
    )
    trig, last = Trigger(p, start=0.0), 0
    for action in _periods(trig, [d * PAGE for d in dirty], sent_per_period=1000 * PAGE):
        if action is not None:
            assert action.throttle is not None and last <= action.throttle <= 99
            last = action.throttle
