"""QMP types: each argument type checks a JSON value and returns the Python value handlers get.

Errors say which parameter is wrong and why, in QEMU's phrasing ("Parameter 'slot' expects an
integer"), and are raised before any handler runs.

A few kinds only describe what the daemon sends (:class:`Null`, :class:`Alternate`,
:class:`Union`): the daemon builds its replies and events itself, so nothing checks them on the
way out; introspection and the protocol reference render them, and the integration tests hold
the live replies to them.

Checks run on the event loop, before the handler. Long lists of integers (``sim-write-pages``
gfns: up to 131,072) and of integer-only objects (``io-dirty-mark`` ranges) are checked with
numpy and C-level iterators instead of one Python call per item; the first bad item is then
checked again by the per-item check, so the error text is exactly the one it would give.
"""

from __future__ import annotations

import base64
import binascii
import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import compress, count, repeat
from typing import Any

import numpy as np

from dirtylogd.errors import GenericError

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
MISSING: Any = object()
# Lists at least this long are checked vectorised. Below it the fixed cost of the numpy path
# (a few array calls, ~10 us) is more than the per-item check (~0.2 us an item) would take.
VECTOR_MIN_ITEMS = 64


class ArgType:
    """A JSON type with its constraints; ``check`` returns the Python value or raises.

    ``json_name`` is the QAPI builtin it travels as; this base class is QEMU's ``any``."""

    json_name = "any"

    def check(self, value: Any, where: str) -> Any:
        return value

    def check_items(self, values: list[Any], where: str) -> list[Any]:
        """Check the items of a list argument ``where``; the first bad one raises."""
        return check_each(self, values, where)

    def describe(self) -> str:
        return self.json_name


@dataclass(frozen=True)
class Str(ArgType):
    max_len: int = 256
    pattern: str | None = None
    hint: str = ""
    json_name = "str"

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, str):
            raise GenericError(f"Parameter '{where}' expects a string")
        if len(value) > self.max_len:
            raise GenericError(f"Parameter '{where}' is longer than {self.max_len} characters")
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise GenericError(f"Parameter '{where}' expects {self.hint or self.pattern}")
        return value

    def describe(self) -> str:
        return f"string ({self.hint})" if self.hint else "string"


@dataclass(frozen=True)
class Int(ArgType):
    lo: int = 0
    hi: int = U64_MAX
    json_name = "int"

    def check(self, value: Any, where: str) -> Any:
        # JSON true/false are not integers, although Python's bool is an int.
        if isinstance(value, bool) or not isinstance(value, int):
            raise GenericError(f"Parameter '{where}' expects an integer")
        if not self.lo <= value <= self.hi:
            raise GenericError(
                f"Parameter '{where}' must be between {self.lo} and {self.hi}, not {value}"
            )
        return value

    def check_items(self, values: list[Any], where: str) -> list[Any]:
        if len(values) < VECTOR_MIN_ITEMS:
            return check_each(self, values, where)
        bad = self.first_suspect(values)
        if bad == len(values):
            return list(values)
        return _raise_or_go_on(self, values, where, bad, list(values[:bad]))

    def first_suspect(self, values: list[Any]) -> int:
        """Index of the first item ``check`` might refuse (``len(values)`` if none): one not
        exactly an int (bool, float, anything else), or an int outside lo..hi."""
        odd = first_not_of_type(values, int)
        ints = values if odd == len(values) else values[:odd]
        if not ints:
            return odd
        array = _int_array(ints)
        outside = np.flatnonzero((array < self.lo) | (array > self.hi))
        return int(outside[0]) if outside.size else odd

    def describe(self) -> str:
        hi = "2^64-1" if self.hi == U64_MAX else ("2^32-1" if self.hi == U32_MAX else self.hi)
        return f"integer {self.lo}..{hi}"


@dataclass(frozen=True)
class Num(ArgType):
    lo: float = 0.0
    hi: float = 1.0
    json_name = "number"

    def check(self, value: Any, where: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GenericError(f"Parameter '{where}' expects a number")
        if not self.lo <= value <= self.hi:
            raise GenericError(f"Parameter '{where}' must be between {self.lo} and {self.hi}")
        return float(value)

    def describe(self) -> str:
        return "number" if self.hi == math.inf else f"number {self.lo}..{self.hi}"


@dataclass(frozen=True)
class Bool(ArgType):
    json_name = "bool"

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, bool):
            raise GenericError(f"Parameter '{where}' expects a boolean")
        return value

    def describe(self) -> str:
        return "boolean"


@dataclass(frozen=True)
class Enum(ArgType):
    name: str
    values: tuple[str, ...]
    json_name = "str"

    def check(self, value: Any, where: str) -> Any:
        if value not in self.values:
            choices = ", ".join(f"'{v}'" for v in self.values)
            raise GenericError(f"Parameter '{where}' must be one of {choices}")
        return value

    def describe(self) -> str:
        return " \\| ".join(f'"{v}"' for v in self.values)


@dataclass(frozen=True)
class Base64(ArgType):
    max_bytes: int = 1 << 20
    json_name = "str"

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, str):
            raise GenericError(f"Parameter '{where}' expects a base64 string")
        if len(value) > (self.max_bytes + 2) // 3 * 4:
            raise GenericError(f"Parameter '{where}' decodes to more than {self.max_bytes} bytes")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise GenericError(f"Parameter '{where}' is not valid base64") from None

    def describe(self) -> str:
        return "string (base64)"


@dataclass(frozen=True)
class List(ArgType):
    item: ArgType
    max_items: int = 1 << 16
    min_items: int = 0
    json_name = "array"

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, list):
            raise GenericError(f"Parameter '{where}' expects an array")
        if not self.min_items <= len(value) <= self.max_items:
            raise GenericError(
                f"Parameter '{where}' must have {self.min_items} to {self.max_items} elements"
            )
        return self.item.check_items(value, where)

    def describe(self) -> str:
        return f"array of {self.item.describe()}"


@dataclass(frozen=True)
class Arg:
    name: str  # kebab-case on the wire
    type: ArgType
    doc: str
    default: Any = MISSING  # MISSING: required; anything else (None too): optional

    @property
    def optional(self) -> bool:
        return self.default is not MISSING

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


@dataclass(frozen=True)
class Object(ArgType):
    name: str
    fields: tuple[Arg, ...]
    json_name = "object"

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise GenericError(f"Parameter '{where}' expects an object")
        return check_members(self.fields, value, f"{where}.")

    def check_items(self, values: list[Any], where: str) -> list[Any]:
        """Objects whose members are all integers (``IoRange``) are checked column-wise."""
        ints = [a.type for a in self.fields if isinstance(a.type, Int)]
        if len(values) < VECTOR_MIN_ITEMS or not ints or len(ints) != len(self.fields):
            return check_each(self, values, where)
        # Suspect: not a dict, or not exactly every member (unexpected, missing, or an
        # optional one left out, which check_members would fill in).
        bad = first_not_of_type(values, dict)
        rows = values[:bad]
        # As many members as fields, and every field among them: exactly the fields.
        sizes = repeat(len(self.fields))
        bad = min(bad, _first_false(lambda: map(operator.eq, map(len, rows), sizes), bad))
        for arg in self.fields:
            has = partial(map, operator.contains, rows, repeat(arg.name))
            bad = min(bad, _first_false(has, bad))
        rows = rows[:bad]
        columns = []
        for arg, kind in zip(self.fields, ints, strict=True):
            column = list(map(operator.itemgetter(arg.name), rows))
            bad = min(bad, kind.first_suspect(column))
            columns.append(column)
        # {key: value, ...} per row, built from (key, value) pairs without a Python-level loop.
        pairs = (zip(repeat(a.key), c[:bad]) for a, c in zip(self.fields, columns, strict=True))
        good = list(map(dict, zip(*pairs, strict=True)))
        if bad == len(values):
            return good
        return _raise_or_go_on(self, values, where, bad, good)

    def describe(self) -> str:
        return self.name


class _DescribesReplies(ArgType):
    """A kind no argument may use: it has no check, and an unchecked argument is a bug."""

    def check(self, value: Any, where: str) -> Any:
        raise TypeError(f"{self.describe()} describes replies; parameter '{where}' cannot use it")


@dataclass(frozen=True)
class Null(_DescribesReplies):
    """JSON null, as the branch of an :class:`Alternate` (QEMU's builtin ``null``)."""

    json_name = "null"

    def describe(self) -> str:
        return "null"


@dataclass(frozen=True)
class Alternate(_DescribesReplies):
    """One of several types told apart by their JSON type (QAPI's alternate), e.g. StrOrNull."""

    name: str
    members: tuple[ArgType, ...]

    def describe(self) -> str:
        return " or ".join(m.describe() for m in self.members)


@dataclass(frozen=True)
class Union(_DescribesReplies):
    """QAPI's flat union: members every value has, one of them (``tag``, an :class:`Enum`)
    naming the variant whose members come with them. Each enum value has a variant."""

    name: str
    base: tuple[Arg, ...]
    tag: str
    variants: tuple[tuple[str, Object], ...]  # (tag value, its members)

    def __post_init__(self) -> None:
        tag = next((a for a in self.base if a.name == self.tag), None)
        if tag is None or tag.optional or not isinstance(tag.type, Enum):
            raise ValueError(f"{self.name}: the tag '{self.tag}' must be a mandatory enum member")
        if sorted(case for case, _ in self.variants) != sorted(tag.type.values):
            raise ValueError(f"{self.name}: one variant for each value of {tag.type.name}")

    def describe(self) -> str:
        return self.name


def check_each(item: ArgType, values: list[Any], where: str, start: int = 0) -> list[Any]:
    """The per-item check of ``values[start:]``: the reference the vectorised checks match."""
    return [item.check(values[i], f"{where}[{i}]") for i in range(start, len(values))]


def _raise_or_go_on(
    item: ArgType, values: list[Any], where: str, bad: int, checked: list[Any]
) -> list[Any]:
    """Check the suspect ``values[bad]`` item by item (raising its exact message); a suspect
    that passes (an int subclass, an optional member left out) means the rest goes item by
    item too. ``checked`` holds the results for ``values[:bad]``."""
    checked.append(item.check(values[bad], f"{where}[{bad}]"))
    return checked + check_each(item, values, where, bad + 1)


def first_not_of_type(values: list[Any], kind: type) -> int:
    """Index of the first item whose type is not exactly ``kind`` (bool is not int), or
    ``len(values)``; C-level iteration, no Python call per item."""
    return _first_false(lambda: map(operator.is_, map(type, values), repeat(kind)), len(values))


def _first_false(flags: Callable[[], Iterable[bool]], n: int) -> int:
    """Index of the first false one of the ``n`` flags ``flags()`` yields, or ``n``.

    The common case, every flag true, costs one C-level count; only a list with a bad item
    is walked again to find where."""
    if operator.countOf(flags(), True) == n:
        return n
    return next(compress(count(), map(operator.not_, flags())), n)


def _int_array(ints: list[int]) -> np.ndarray:
    """Exact Python ints as an array: int64, else uint64, else (beyond 64 bits) objects,
    which numpy compares with Python's own arbitrary-precision comparison."""
    for dtype in (np.int64, np.uint64):
        try:
            return np.fromiter(ints, dtype=dtype, count=len(ints))
        except OverflowError:
            continue
    return np.array(ints, dtype=object)


def check_members(fields: Sequence[Arg], given: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check an object's members against ``fields``; fill defaults; snake_case the keys."""
    known = {a.name: a for a in fields}
    for key in given:
        if key not in known:
            raise GenericError(f"Parameter '{prefix}{key}' is unexpected")
    out: dict[str, Any] = {}
    for arg in fields:
        if arg.name in given:
            out[arg.key] = arg.type.check(given[arg.name], prefix + arg.name)
        elif arg.optional:
            out[arg.key] = arg.default
        else:
            raise GenericError(f"Parameter '{prefix}{arg.name}' is missing")
    return out
