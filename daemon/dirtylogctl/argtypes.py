"""argparse types for numbers that must make sense before anything is sent.

``float("nan")`` and ``float("inf")`` parse, and a negative count parses, so without these a
typo travels on: NaN would even reach the daemon as ``NaN``, which is not JSON, and cost the
connection. A bad value is a usage error (exit 2) naming what is expected.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def finite_float(text: str) -> float:
    """Any finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number above zero (a limit or a timeout that must let something happen)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, not {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number, zero or more."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, not {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number, zero or more."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of 0 or more, not {text!r}")
    return value


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """A whole number from lo to hi (QEMU's percentages and periods)."""

    def parse(text: str) -> int:
        value = non_negative_int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected {lo} to {hi}, not {text!r}")
        return value

    return parse


def channel_count(text: str) -> int:
    """A number of TCP channels: 1 to the format's MAX_CHANNELS (16)."""
    from dirtylogctl.wireformat import MAX_CHANNELS

    value = non_negative_int(text)
    if not 1 <= value <= MAX_CHANNELS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_CHANNELS} channels, not {text!r}")
    return value
