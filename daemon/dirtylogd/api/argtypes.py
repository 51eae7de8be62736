"""QMP argument types: each checks a JSON value and returns the Python value handlers get.

Errors say which parameter is wrong and why, in QEMU's phrasing ("Parameter 'slot' expects an
integer"), and are raised before any handler runs.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dirtylogd.errors import GenericError

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
MISSING: Any = object()


class ArgType:
    """A JSON type with its constraints; ``check`` returns the Python value or raises."""

    json_name = "value"

    def check(self, value: Any, where: str) -> Any:
        return value

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
        return f"number {self.lo}..{self.hi}"


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
        return [self.item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]

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

    def describe(self) -> str:
        return self.name


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
