"""QMP framing without sockets: back-to-back values, splits, resets, limits, output."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtylogd.qmp.framing import JsonStreamDecoder, MessageTooLarge, ParseError, encode


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


messages = st.lists(
    st.dictionaries(
        st.text(max_size=5),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=3), inner, max_size=3)
            ),
            max_leaves=6,
        ),
        max_size=4,
    ),
    min_size=1,
    max_size=4,
)


@given(messages, st.data())
def test_any_split_of_the_stream_yields_the_same_values(msgs, data):
    stream = b"".join(json.dumps(m, ensure_ascii=data.draw(st.booleans())).encode() for m in msgs)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    out, dec = feed_all(chunks)
    assert out == msgs
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
