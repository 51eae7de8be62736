"""List argument checks: the vectorised path says exactly what the per-item check says."""

import pytest

from dirtylogd.api.argtypes import (
    U64_MAX,
    VECTOR_MIN_ITEMS,
    Arg,
    Int,
    List,
    Object,
    check_each,
)
from dirtylogd.api.schema import BY_NAME, IO_RANGE
from dirtylogd.errors import GenericError

GFN = Int(0, (1 << 52) - 1)  # sim-write-pages gfns
ITEM_TYPES = [GFN, Int(1, U64_MAX), Int(0, 0xFFFF), Int(-5, 5)]
BAD_INTS = [True, False, 1.0, 2.5, "3", None, [], {}, -1, -(2**70), 2**52, 2**64, 2**70]
N = 1000


class Sub(int):
    """Not something JSON gives, but the per-item check takes it: so must the fast path."""


def message(check, *args) -> str:
    with pytest.raises(GenericError) as info:
        check(*args)
    return info.value.desc


def good_ints(item: Int, n: int = N) -> list[int]:
    return [item.lo + i % 7 for i in range(n)]


@pytest.mark.parametrize("item", ITEM_TYPES, ids=str)
@pytest.mark.parametrize("bad", BAD_INTS, ids=repr)
@pytest.mark.parametrize("at", [0, 1, VECTOR_MIN_ITEMS - 1, 500, N - 1])
def test_the_first_bad_integer_gets_the_per_item_message(item, bad, at):
    values = good_ints(item)
    values[at] = bad
    if type(bad) is int and item.lo <= bad <= item.hi:  # fine for this item: make it bad
        values[at] = item.hi + 1
    expected = message(check_each, item, values, "gfns")
    assert message(List(item, max_items=1 << 17).check, values, "gfns") == expected
    assert f"'gfns[{at}]'" in expected


@pytest.mark.parametrize(("first", "second"), [(-1, 1.5), (True, 2**64), ("x", -1), (2**70, None)])
def test_of_two_bad_items_the_earlier_is_named_whatever_its_kind(first, second):
    for a, b in ((10, 700), (700, 10)):
        values = good_ints(GFN)
        values[a], values[b] = first, second
        expected = message(check_each, GFN, values, "gfns")
        assert message(GFN.check_items, values, "gfns") == expected
        assert f"'gfns[{min(a, b)}]'" in expected


def test_a_valid_list_comes_back_unchanged_at_every_width():
    for item, values in [
        (GFN, list(range(131072))),
        (Int(0, U64_MAX), [U64_MAX - i for i in range(N)]),  # beyond int64: uint64
        (Int(-(2**80), 2**80), [(-1) ** i * 2**70 for i in range(N)]),  # beyond 64 bits
    ]:
        assert item.check_items(values, "x") == check_each(item, values, "x") == values


def test_an_int_subclass_passes_as_it_does_item_by_item():
    values = good_ints(GFN)
    values[5] = Sub(3)
    values[900] = -1
    assert message(GFN.check_items, values, "g") == message(check_each, GFN, values, "g")
    values[900] = 4
    assert GFN.check_items(values, "g") == values


def test_long_lists_do_not_call_the_per_item_check(monkeypatch):
    """131,072 gfns cost one Python call per item before (58 ms on the loop); now none, and
    one for a bad item (which then says what is wrong)."""
    calls = []
    per_item = Int.check

    def counting(self, value, where):
        calls.append(where)
        return per_item(self, value, where)

    monkeypatch.setattr(Int, "check", counting)
    gfns = list(range(1 << 17))
    args = {"vm": "a", "gfns": gfns, "value": 1}
    assert BY_NAME["sim-write-pages"].validate(args)["gfns"] == gfns
    assert calls == ["value"]
    calls.clear()
    gfns[77777] = True
    assert message(BY_NAME["sim-write-pages"].validate, args) == (
        "Parameter 'gfns[77777]' expects an integer"
    )
    assert calls == ["gfns[77777]"]


def test_short_lists_are_checked_item_by_item():
    values = [1, 2, True]
    assert len(values) < VECTOR_MIN_ITEMS
    assert message(GFN.check_items, values, "g") == "Parameter 'g[2]' expects an integer"


# --- lists of integer objects (io-dirty-mark ranges) ------------------------------------------
def ranges(n: int = N) -> list[dict]:
    return [{"guest-phys-addr": i * 8192, "length": 4096 + i} for i in range(n)]


BAD_RANGES = [
    7,
    None,
    [1, 2],
    {},
    {"guest-phys-addr": 0},
    {"length": 1},
    {"guest-phys-addr": 0, "length": 1, "extra": 2},
    {"extra": 2, "guest-phys-addr": 0, "length": 1},
    {"guest-phys-addr": 0, "lenght": 1},
    {"guest-phys-addr": True, "length": 1},
    {"guest-phys-addr": 0, "length": 0},
    {"guest-phys-addr": 0, "length": 1.0},
    {"guest-phys-addr": -1, "length": 1},
    {"guest-phys-addr": 2**64, "length": "1"},
    {"length": -1, "guest-phys-addr": 0.5},
]


@pytest.mark.parametrize("bad", BAD_RANGES, ids=repr)
@pytest.mark.parametrize("at", [0, 63, N - 1])
def test_the_first_bad_range_gets_the_per_item_message(bad, at):
    values = ranges()
    values[at] = bad
    expected = message(check_each, IO_RANGE, values, "ranges")
    assert message(IO_RANGE.check_items, values, "ranges") == expected
    assert f"'ranges[{at}]" in expected


def test_valid_ranges_arrive_as_the_per_item_check_gives_them():
    values = ranges(1 << 16)
    got = BY_NAME["io-dirty-mark"].validate({"vm": "a", "ranges": values})["ranges"]
    assert got == check_each(IO_RANGE, values, "ranges")
    assert got[3] == {"guest_phys_addr": 3 * 8192, "length": 4099}


def test_an_optional_member_left_out_is_filled_in_as_item_by_item():
    obj = Object("O", (Arg("a", Int(0, 9), "a"), Arg("b-c", Int(0, 9), "b", 5)))
    values = [{"a": 1, "b-c": 2}] * N
    values[10] = {"a": 3}
    assert obj.check_items(values, "o") == check_each(obj, values, "o")
    assert obj.check_items(values, "o")[10] == {"a": 3, "b_c": 5}
    values[600] = {"a": 10}
    assert message(obj.check_items, values, "o") == message(check_each, obj, values, "o")


def test_objects_with_other_members_are_checked_item_by_item():
    memslots = BY_NAME["vm-create"].args[1].type
    values = [{"slot": 0, "guest-phys-addr": 0, "size": 4096}] * 100
    values[70] = {"slot": 0, "guest-phys-addr": 0, "size": 4096, "log-dirty-pages": 1}
    assert message(memslots.check, values, "memslots") == (
        "Parameter 'memslots[70].log-dirty-pages' expects a boolean"
    )
