"""calc-dirty-rate's argument checks follow QEMU 8.2's order, and the state's answers."""

import pytest

from dirtylogd.errors import GenericError
from dirtylogd.service.dirtyrate import check_request
from dirtylogd.service.vmstate import CalcRequest, DirtyRateCalc, Result


def refused(*args):
    with pytest.raises(GenericError) as caught:
        check_request(*args)
    return caught.value.desc


def test_qemus_order_measuring_first_then_time_then_sample_pages_then_mode():
    # Every argument is wrong: the first check in QEMU's order speaks.
    assert refused(True, 0, "second", 1, "dirty-ring", False) == (
        "the dirty rate is already being measured."
    )
    assert refused(False, 0, "second", 1, "dirty-ring", False).startswith("Calculation time")
    assert refused(False, 1, "second", 1, "dirty-ring", False) == (
        "sample-pages is used only in page-sampling mode"
    )
    assert (
        refused(False, 1, "second", 1, None, False) == "sample-pages is out of range[128, 16384]."
    )
    assert refused(False, 1, "second", None, "dirty-ring", False).startswith(
        "mode dirty-ring is not enabled, use other method instead. (The kvm backend reads"
    )


@pytest.mark.parametrize(
    ("time", "unit", "ok"),
    [
        (49, "millisecond", False),
        (50, "millisecond", True),
        (60, "second", True),
        (61, "second", False),
        (60_000, "millisecond", True),
        (-1, "second", False),
    ],
)
def test_the_window_is_50_ms_to_60_s_after_the_unit(time, unit, ok):
    if ok:
        assert check_request(False, time, unit, None, None, False).mode == "page-sampling"
    else:
        assert refused(False, time, unit, None, None, False).startswith("Calculation time")


def test_defaults_and_answers():
    assert check_request(False, 1, "second", None, None, True) == CalcRequest(
        1000, "page-sampling", 512
    )
    calc = DirtyRateCalc()
    assert calc.info("millisecond") == {
        "status": "unstarted",
        "mode": "page-sampling",
        "start-time": 0,
        "calc-time": 0,
        "calc-time-unit": "millisecond",
        "sample-pages": 0,
    }
    calc.status, calc.calc_ms, calc.result = (
        "measured",
        1999,
        Result(7, samples=10, dirty_samples=2),
    )
    info = calc.info("second")
    assert info["calc-time"] == 1 and info["dirty-rate"] == 7 and info["sample-count"] == 10
