"""QMP framing without sockets: back-to-back values, splits, resets, limits, output."""

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtylogd.qmp.framing import AsciiText, JsonStreamDecoder, MessageTooLarge, ParseError, encode


def feed_all(chunks, limit=1 << 20):
    dec = JsonStreamDecoder(limit)
    out = []
    for chunk in chunks:
        out += dec.feed(chunk)
    return out, dec


def test_back_to_back_objects_without_separator():
    out, _ = feed_all([b'{"execute":"a"}{"execute":"b","id":7}'])
    assert out == [{"execute": "a"}, {"execute": "b", "id": 7}]


def test_brackets_and_escaped_quotes_inside_strings_do_not_count():
    out, _ = feed_all([b'{"a":"}]\\"{[","b":["x\\\\"]}  {"c":1}'])
    assert out == [{"a": '}]"{[', "b": ["x\\"]}, {"c": 1}]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
# Top-level values of every kind: commands, and the scalars and arrays a peer may send instead.
top_level = st.dictionaries(st.text(max_size=5), json_values, max_size=4) | json_values
WHITESPACE = ["", " ", "\n", "\r\n", "\t "]


def _bare(value):
    """A number or keyword: it ends only where the next byte says so."""
    return not isinstance(value, str | list | dict)


@given(st.lists(top_level, min_size=1, max_size=5), st.data())
def test_framing_does_not_depend_on_how_the_bytes_are_split(values, data):
    """Objects, arrays, strings, numbers and keywords at top level, back to back or spaced, in
    any split into reads, decode exactly as sent — as they do in one read."""
    parts = []
    for i, value in enumerate(values):
        parts.append(json.dumps(value, ensure_ascii=data.draw(st.booleans())))
        following = values[i + 1] if i + 1 < len(values) else None
        needs_space = _bare(value) and (following is None or _bare(following))
        spaces = WHITESPACE[1:] if needs_space else WHITESPACE
        parts.append(data.draw(st.sampled_from(spaces)))
    stream = "".join(parts).encode()
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    out, dec = feed_all(chunks)
    assert out == values
    assert feed_all([stream])[0] == values
    assert dec.pending == 0


@pytest.mark.parametrize("scalar", [b"42", b"-1.5e3", b"true", b"false", b"null"])
def test_a_top_level_scalar_ending_in_a_later_read_does_not_swallow_the_next_command(scalar):
    """(null decoded to None, which the decoder once took for "nothing yet".)"""
    out, dec = feed_all([scalar, b' {"execute":"query-version","id":1}'])
    assert out == [json.loads(scalar), {"execute": "query-version", "id": 1}]
    assert dec.pending == 0


@pytest.mark.parametrize("reset", [b"\x01", b"\x1b", b"\xff", b"\x00"])
def test_control_character_resets_the_parser_with_one_error(reset):
    out, _ = feed_all([b'{"execute": "qu', reset, b'{"execute":"x"}'])
    assert len(out) == 2
    assert isinstance(out[0], ParseError) and "reset" in out[0].desc
    assert out[1] == {"execute": "x"}


def test_tab_cr_lf_are_whitespace_not_resets():
    out, _ = feed_all([b'\r\n\t{"execute":\t"x"}\r\n'])
    assert out == [{"execute": "x"}]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"execute": }', "expecting value"),
        (b'{"a": NaN}', "nan is not valid json"),
        (b'{"a": "\xc3\x28"}', "not valid utf-8"),
        (b"}", "stray '}'"),
    ],
)
def test_invalid_input_is_a_parse_error(raw, fragment):
    out, _ = feed_all([raw])
    assert isinstance(out[0], ParseError)
    assert fragment in out[0].desc.lower()


def test_top_level_scalars_and_arrays_are_values_for_the_session_to_reject():
    out, _ = feed_all([b'42 [1,2] "s"'])
    assert out == [42, [1, 2], "s"]


def test_oversized_message_is_fatal_after_the_messages_before_it():
    dec = JsonStreamDecoder(max_message=64)
    assert dec.feed(b'{"ok":1}') == [{"ok": 1}]
    out = dec.feed(b'{"ok":2}{"data":"' + b"x" * 100 + b'"}{"ok":3}')
    assert out == [{"ok": 2}, MessageTooLarge(64)]
    assert dec.feed(b'{"ok":4}') == []  # the connection is over


def test_unfinished_message_over_the_limit_is_fatal():
    dec = JsonStreamDecoder(max_message=64)
    assert dec.feed(b'{"data":"' + b"x" * 100) == [MessageTooLarge(64)]


def _strict(raw: bytes):
    """json.loads that refuses Infinity and NaN, as a conforming JSON parser does."""
    return json.loads(raw, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


@pytest.mark.parametrize(
    "number",
    ["1e400", "-1e400", "1" + "0" * 400 + ".0", "2e308"],
    ids=["1e400", "-", "long", "2e308"],
)
def test_a_number_beyond_a_double_is_a_parse_error_that_still_echoes_a_finite_id(number):
    in_id = f'{{"execute":"x","id":{number}}}'
    in_arguments = f'{{"execute":"x","id":"a","arguments":{{"n":[{number}]}}}}'
    out, _ = feed_all([(in_id + in_arguments).encode()])
    assert [type(item) for item in out] == [ParseError, ParseError]
    assert "is not a finite number" in out[0].desc and not out[0].has_id
    assert out[1].has_id and out[1].id == "a"


def test_output_is_always_json_even_with_a_non_finite_number_in_it():
    raw = encode({"return": {"rate": float("inf"), "x": [float("nan"), -float("inf"), 1.5]}})
    assert _strict(raw) == {"return": {"rate": None, "x": [None, None, 1.5]}}


def test_output_is_ascii_json_with_crlf():
    raw = encode({"return": {"name": "vm\u00e9"}, "id": [1, "x"]})
    assert raw.endswith(b"\r\n")
    raw.decode("ascii")
    assert json.loads(raw) == {"return": {"name": "vm\u00e9"}, "id": [1, "x"]}


def test_a_reset_byte_right_after_a_backslash_still_resets():
    # Found by the fuzzer: '"yq\x81\xfd\\' then \x01 — the escape must not swallow the reset.
    out, _ = feed_all([b'"yq\x81\xfd\\', b'\x01{"execute": "query-version", "id": 1}'])
    assert isinstance(out[0], ParseError) and "reset" in out[0].desc
    assert out[1] == {"execute": "query-version", "id": 1}


@given(
    st.lists(st.binary(max_size=64), min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8) | st.integers(), max_size=3),
)
def test_ascii_text_members_encode_exactly_as_json_dumps_would(blobs, others):
    """The verbatim copy of base64 members is byte for byte what escaping would have given."""
    body: dict = dict(others)
    for i, blob in enumerate(blobs):
        body[f"b64-{i}"] = AsciiText(base64.b64encode(blob).decode("ascii"))
    message = {"return": body, "id": "\x00verbatim-0"}  # an id like the stand-in is left alone
    plain = json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode() + b"\r\n"
    assert encode(message) == plain
