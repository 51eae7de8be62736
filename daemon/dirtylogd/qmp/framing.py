"""QMP framing, pure: bytes in, JSON values (or lexical errors) out; values in, bytes out.

Clients may send messages back to back with no separator (qemu.qmp does), so the decoder finds
where each top-level JSON value ends by tracking brackets outside strings, the way QEMU's
json-streamer does, and only then parses it. Rules from docs/interop/qmp-spec.rst:

* An ASCII control character other than TAB, CR, LF — or a 0xFF byte — is a lexical error that
  resets the parser: the partial input is dropped and one parse error is reported, so a client
  can always get back to a known-good state.
* A message over the size limit is fatal for the connection: the decoder yields
  :class:`MessageTooLarge` after the messages before it and then accepts nothing more.
* Output is ASCII JSON terminated by CRLF.

No I/O happens here; tests feed bytes directly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_MESSAGE = 1 << 20

# Outside strings we stop at brackets, quotes and bytes that reset the parser.
_OUTSIDE = re.compile(rb'[{}\[\]"\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
# Inside a string we stop at its end, at escapes, and at reset bytes.
_INSIDE = re.compile(rb'["\\\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
_WHITESPACE = b" \t\r\n"
_SCALAR_END = re.compile(rb'[ \t\r\n{}\[\]"\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
_RESET_BYTES = frozenset(set(range(0x00, 0x20)) - {0x09, 0x0A, 0x0D} | {0xFF})


@dataclass(frozen=True)
class ParseError:
    """Input that is not a JSON value; the session answers GenericError without an id."""

    desc: str


@dataclass(frozen=True)
class MessageTooLarge:
    """A message exceeded the limit: answer once, then close the connection."""

    limit: int

    @property
    def desc(self) -> str:
        return f"message exceeds the {self.limit}-byte limit"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class JsonStreamDecoder:
    """Splits a byte stream into top-level JSON values."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._pos = 0  # scan position within _buf
        self._depth = 0
        self._in_string = False
        self._started = False  # a value has begun at _buf[0]
        self._dead = False  # after MessageTooLarge nothing more is decoded

    def feed(self, data: bytes) -> list[Any]:
        """Consume ``data``; return the values, ParseErrors and MessageTooLarge it finished."""
        if self._dead:
            return []
        self._buf += data
        out: list[Any] = []
        while True:
            item = self._step()
            if item is None:
                break
            out.append(item)
            if isinstance(item, MessageTooLarge):
                return out
        if self._started and len(self._buf) > self.max_message:
            out.append(self._overflow())
        return out

    def _overflow(self) -> MessageTooLarge:
        self._dead = True
        self._buf.clear()
        return MessageTooLarge(self.max_message)

    @property
    def pending(self) -> int:
        """Bytes of an unfinished message held."""
        return len(self._buf) if self._started else 0

    def _step(self) -> Any | ParseError | None:
        buf = self._buf
        if not self._started:
            i = 0
            while i < len(buf) and buf[i] in _WHITESPACE:
                i += 1
            del buf[:i]
            if not buf:
                return None
            self._started = True
            self._pos = 0
            if buf[0] in _RESET_BYTES:
                return self._reset(0)
            if buf[0] in b"}]":
                return self._reset(0, f"JSON parse error, stray '{chr(buf[0])}'")
            if buf[0] not in b'{["':
                return self._scalar()
        while True:
            pattern = _INSIDE if self._in_string else _OUTSIDE
            m = pattern.search(buf, self._pos)
            if m is None:
                self._pos = len(buf)
                return None
            i = m.start()
            c = buf[i]
            if c in _RESET_BYTES:
                return self._reset(i)
            if self._in_string:
                if c == 0x5C:  # backslash: the next byte is escaped ...
                    if i + 1 >= len(buf):
                        self._pos = i  # rescan the escape when more arrives
                        return None
                    if buf[i + 1] in _RESET_BYTES:  # ... unless it is a reset byte
                        return self._reset(i + 1)
                    self._pos = i + 2
                    continue
                self._in_string = False  # closing quote
                self._pos = i + 1
                if self._depth == 0:
                    return self._emit(i + 1)
                continue
            self._pos = i + 1
            if c == 0x22:
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    return self._emit(i + 1)
                if self._depth < 0:
                    return self._reset(i, f"JSON parse error, stray '{chr(c)}'")

    def _scalar(self) -> Any | ParseError | None:
        """A top-level number or keyword ends at whitespace or at the next structural byte."""
        m = _SCALAR_END.search(self._buf, 1)
        if m is None:
            return None
        return self._emit(m.start())

    def _emit(self, end: int) -> Any:
        if end > self.max_message:
            return self._overflow()
        raw = bytes(self._buf[:end])
        del self._buf[:end]
        self._started = False
        self._depth = 0
        self._in_string = False
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            return ParseError("JSON parse error, input is not valid UTF-8")
        except (ValueError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            return ParseError(f"JSON parse error, {reason.lower()}")

    def _reset(self, at: int, desc: str | None = None) -> ParseError:
        """Drop everything up to and including ``at``: the QMP parser-reset rule."""
        byte = self._buf[at]
        del self._buf[: at + 1]
        self._started = False
        self._depth = 0
        self._in_string = False
        if desc is None:
            desc = f"JSON parse error, stray byte {byte:#04x} (the parser was reset)"
        return ParseError(desc)


def encode(message: dict[str, Any]) -> bytes:
    """One server message: ASCII JSON and CRLF (qmp-spec "General Definitions")."""
    return json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\r\n"
