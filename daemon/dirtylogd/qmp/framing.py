"""QMP framing, pure: bytes in, JSON values (or lexical errors) out; values in, bytes out.

Clients may send messages back to back with no separator (qemu.qmp does), so the decoder finds
where each top-level JSON value ends by tracking brackets outside strings, the way QEMU's
json-streamer does, and only then parses it. Rules from docs/interop/qmp-spec.rst:

* An ASCII control character other than TAB, CR, LF — or a 0xFF byte — is a lexical error that
  resets the parser: the partial input is dropped and one parse error is reported, so a client
  can always get back to a known-good state.
* A message over the size limit is fatal for the connection: the decoder yields
  :class:`MessageTooLarge` after the messages before it and then accepts nothing more.
* Output is ASCII JSON terminated by CRLF, and always JSON: no ``Infinity`` or ``NaN``.
* Where a value ends never depends on how the bytes were split into reads: a top-level number
  or keyword ends only at the byte after it, however late that byte arrives.

A number beyond the range of a double (``1e400``) is a parse error, not infinity: RFC 8259 lets
an implementation limit the range of the numbers it accepts, and an infinite value could not be
echoed (the only JSON spelling of it would be a different number) nor be a sane argument. Since
the message is otherwise well-formed, its ``id`` is echoed when it is itself finite, so a client
that matches replies by id (qemu.qmp does) keeps its connection.

A reply member of type :class:`AsciiText` (base64: a bitmap, storage keys) is copied into the
output as it is, not escaped character by character: ``json.dumps`` spends ~3 ns a character
checking what base64 can never hold (44 KB, the bitmap of a 1 GiB slot: 0.13 ms of the loop).

No I/O happens here; tests feed bytes directly.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
DEFAULT_MAX_MESSAGE = 1 << 20

# Outside strings we stop at brackets, quotes and bytes that reset the parser.
_OUTSIDE = re.compile(rb'[{}\[\]"\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
# Inside a string we stop at its end, at escapes, and at reset bytes.
_INSIDE = re.compile(rb'["\\\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
_WHITESPACE = b" \t\r\n"
_SCALAR_END = re.compile(rb'[ \t\r\n{}\[\]"\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
_RESET_BYTES = frozenset(set(range(0x00, 0x20)) - {0x09, 0x0A, 0x0D} | {0xFF})
# "No value finished yet": not None, which is what a top-level ``null`` decodes to.
_MORE: Any = object()


@dataclass(frozen=True)
class ParseError:
    """Input that is not a JSON value; the session answers GenericError, with ``id`` only
    when the message parsed far enough to have one that can be echoed (``has_id``)."""

    desc: str
    id: Any = None
    has_id: bool = False


@dataclass(frozen=True)
class MessageTooLarge:
    """A message exceeded the limit: answer once, then close the connection."""

    limit: int

    @property
    def desc(self) -> str:
        return f"message exceeds the {self.limit}-byte limit"


class AsciiText(str):
    """Text that is its own JSON string body: printable ASCII with no quote and no backslash
    (base64 is). :func:`encode` copies a ``return`` member of this type verbatim."""

    __slots__ = ()


# Stands in for an AsciiText member while the rest of the message is encoded. The NUL (sent
# as \u0000) and a per-process nonce make it a string nothing else in a reply can equal.
_STAND_IN = f"\x00verbatim-{secrets.token_hex(8)}-"


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
        self._scalar_value = False  # ... and it is a top-level number or keyword
        self._dead = False  # after MessageTooLarge nothing more is decoded

    def feed(self, data: bytes) -> list[Any]:
        """Consume ``data``; return the values, ParseErrors and MessageTooLarge it finished."""
        if self._dead:
            return []
        self._buf += data
        out: list[Any] = []
        while True:
            item = self._step()
            if item is _MORE:
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

    def _step(self) -> Any:
        """The next finished value (or ParseError, MessageTooLarge), or _MORE."""
        buf = self._buf
        if not self._started:
            i = 0
            while i < len(buf) and buf[i] in _WHITESPACE:
                i += 1
            del buf[:i]
            if not buf:
                return _MORE
            self._started = True
            self._pos = 0
            if buf[0] in _RESET_BYTES:
                return self._reset(0)
            if buf[0] in b"}]":
                return self._reset(0, f"JSON parse error, stray '{chr(buf[0])}'")
            self._scalar_value = buf[0] not in b'{["'
            self._pos = 1 if self._scalar_value else 0
        if self._scalar_value:  # also when its end arrives in a later read
            return self._scalar()
        while True:
            pattern = _INSIDE if self._in_string else _OUTSIDE
            m = pattern.search(buf, self._pos)
            if m is None:
                self._pos = len(buf)
                return _MORE
            i = m.start()
            c = buf[i]
            if c in _RESET_BYTES:
                return self._reset(i)
            if self._in_string:
                if c == 0x5C:  # backslash: the next byte is escaped ...
                    if i + 1 >= len(buf):
                        self._pos = i  # rescan the escape when more arrives
                        return _MORE
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

    def _scalar(self) -> Any:
        """A top-level number or keyword ends at whitespace or at the next structural byte."""
        m = _SCALAR_END.search(self._buf, self._pos)
        if m is None:
            self._pos = len(self._buf)
            return _MORE
        return self._emit(m.start())

    def _emit(self, end: int) -> Any:
        if end > self.max_message:
            return self._overflow()
        raw = bytes(self._buf[:end])
        del self._buf[:end]
        self._clear_state()
        too_big: list[str] = []

        def parse_float(text: str) -> float:
            value = float(text)
            if not math.isfinite(value):
                too_big.append(text)
            return value

        try:
            value = json.loads(
                raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=parse_float
            )
        except UnicodeDecodeError:
            return ParseError("JSON parse error, input is not valid UTF-8")
        except (ValueError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            return ParseError(f"JSON parse error, {reason.lower()}")
        if too_big:
            return _not_finite(value, too_big[0])
        return value

    def _clear_state(self) -> None:
        self._started = False
        self._scalar_value = False
        self._depth = 0
        self._in_string = False

    def _reset(self, at: int, desc: str | None = None) -> ParseError:
        """Drop everything up to and including ``at``: the QMP parser-reset rule."""
        byte = self._buf[at]
        del self._buf[: at + 1]
        self._clear_state()
        if desc is None:
            desc = f"JSON parse error, stray byte {byte:#04x} (the parser was reset)"
        return ParseError(desc)


def _not_finite(value: Any, text: str) -> ParseError:
    """The error for a message holding a number no double can hold, echoing a finite id."""
    shown = text if len(text) <= 24 else f"{text[:12]}...{text[-8:]}"
    desc = f"JSON parse error, number {shown} is not a finite number (beyond a double's range)"
    if isinstance(value, dict) and "id" in value and _finite(value["id"]):
        return ParseError(desc, value["id"], has_id=True)
    return ParseError(desc)


def _finite(value: Any) -> bool:
    """No infinite or NaN float anywhere in ``value`` (iterative: depth is the client's)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _finite_copy(value: Any) -> Any:
    """``value`` with every infinite or NaN float replaced by None (JSON null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_copy(v) for v in value]
    return value


def encode(message: dict[str, Any]) -> bytes:
    """One server message: ASCII JSON and CRLF (qmp-spec "General Definitions").

    Never ``Infinity`` or ``NaN``, which are not JSON: input cannot carry them (see above), so
    one in a reply or event is the daemon's own arithmetic; it goes out as null, and is logged,
    rather than as a line a strict client cannot parse or an exception that drops the client."""
    body = message.get("return")
    if isinstance(body, dict) and any(type(v) is AsciiText for v in body.values()):
        return _encode_spliced(message, body)
    return _dumps(message).encode("ascii") + b"\r\n"


def _encode_spliced(message: dict[str, Any], body: dict[str, Any]) -> bytes:
    """:func:`encode` with every AsciiText member of ``body`` copied in, not escaped."""
    texts: list[str] = []
    stand_ins = dict(body)
    for key, value in body.items():
        if type(value) is AsciiText:
            stand_ins[key] = f"{_STAND_IN}{len(texts)}"
            texts.append(value)
    rest = _dumps({**message, "return": stand_ins})
    pieces: list[bytes] = []
    for i, text in enumerate(texts):
        before, rest = rest.split(_dumps(f"{_STAND_IN}{i}"), 1)
        pieces += [before.encode("ascii"), b'"', text.encode("ascii"), b'"']
    pieces += [rest.encode("ascii"), b"\r\n"]
    return b"".join(pieces)


def _dumps(message: Any) -> str:
    try:
        text = json.dumps(message, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except ValueError:
        log.warning("a non-finite number in an outgoing message was sent as null: %.200r", message)
        text = json.dumps(
            _finite_copy(message), ensure_ascii=True, separators=(",", ":"), allow_nan=False
        )
    return text
