"""Log lines: ``<N>`` priorities and one line per record for the journal; timestamps by hand."""

import logging
import os
import re
import sys

import pytest

from dirtylogd.ops import logs


def _record(level: int, msg: str, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("dirtylogd.x", level, __file__, 1, msg, (), exc_info)


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (logging.INFO + 5, 6),
    ],
)
def test_journal_lines_carry_the_syslog_priority(level, priority):
    line = logs.JournalFormatter().format(_record(level, "hello"))
    assert line == f"<{priority}>dirtylogd.x: hello"


def test_a_traceback_is_one_journal_line():
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = _record(logging.ERROR, "it failed", sys.exc_info())
    line = logs.JournalFormatter().format(record)
    assert "\n" not in line
    assert line.startswith("<3>dirtylogd.x: it failed \\n Traceback (most recent call last):")
    assert "ValueError: bad \\n value" in line


def test_by_hand_lines_have_a_timestamp_and_keep_the_traceback_readable():
    try:
        raise ValueError("bad")
    except ValueError:
        record = _record(logging.ERROR, "it failed", sys.exc_info())
    text = logs.ConsoleFormatter().format(record)
    first, *rest = text.splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
    assert re.fullmatch(stamp + r" ERROR dirtylogd\.x: it failed", first)
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: bad"


def test_journal_stream_must_name_the_fd(tmp_path):
    with open(tmp_path / "log", "w") as f, open(tmp_path / "other", "w") as g:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.stderr_is_journal(env, f.fileno())
        assert not logs.stderr_is_journal(env, g.fileno())
        assert not logs.stderr_is_journal({}, f.fileno())
        assert not logs.stderr_is_journal({"JOURNAL_STREAM": "garbage"}, f.fileno())
