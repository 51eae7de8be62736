"""Log records on stderr: one journal entry per record under systemd, timestamps by hand.

Under a unit, stderr is a stream into journald (``JOURNAL_STREAM`` names it, see
systemd.exec(5)); a line starting with ``<N>`` gets syslog priority N (sd-daemon(3)), and
every line is an entry of its own, so a traceback is folded into the record's one line.
"""

from __future__ import annotations

import logging
import os
import sys

# Separator that stands for a newline inside a journal entry; visible, and kept ASCII.
NEWLINE = " \\n "


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between the standard ones round down)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>name: message``, traceback and all on one line; journald adds time and level."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"<{syslog_priority(record.levelno)}>" + NEWLINE.join(text.splitlines())


class ConsoleFormatter(logging.Formatter):
    """``2026-12-04 09:41:02.123 ERROR name: message`` in local time, tracebacks as they are."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        )


def stderr_is_journal(env: dict[str, str] | None = None, fd: int = 2) -> bool:
    """Whether ``fd`` is the journal stream systemd connected (``JOURNAL_STREAM=DEV:INO``)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure(level: str) -> None:
    """Log to stderr at ``level``, formatted for the journal or for a person."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if stderr_is_journal() else ConsoleFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])


def print_error(text: str) -> None:
    """An error from before logging is configured (a bad flag or config file): one line,
    with priority 3 when stderr is the journal, so ``journalctl -p err`` shows why it failed."""
    _print(3, text)


def print_warning(text: str) -> None:
    """A warning that must be seen even when the log level hides warnings: one line, with
    priority 4 when stderr is the journal."""
    _print(4, text)


def _print(priority: int, text: str) -> None:
    prefix = f"<{priority}>" if stderr_is_journal() else ""
    print(prefix + "dirtylogd: " + NEWLINE.join(text.splitlines()), file=sys.stderr)
