"""Standard output that may have gone away: ``dirtylogctl get | head`` and friends.

A closed stdout is not a lost daemon. Every write goes through :func:`write`, which flushes at
once (so the failure is met here, not at interpreter exit) and turns a broken pipe into
:class:`StdoutClosed`; the command then exits 141 — what a shell reports for a tool killed by
SIGPIPE, so ``set -o pipefail`` treats it like ``yes | head`` — and prints nothing, as such a
tool does. Python ignores SIGPIPE, and must here: the same signal would also kill the client
for a write to the daemon's socket.

Commands that take something from the daemon (``get`` clears a consumer's bits) ask
:func:`stdout_gone` first, so output that could not reach anyone is never paid for.
"""

from __future__ import annotations

import errno
import os
import select
import sys

EXIT_STDOUT_CLOSED = 128 + 13  # 128 + SIGPIPE


class StdoutClosed(Exception):
    """Standard output is closed, or nobody reads it any more."""


def stdout_gone() -> bool:
    """True if nothing written to stdout can reach a reader now: fd 1 was closed at start
    (Python then sets ``sys.stdout`` to None), or it is a pipe or socket whose reader is gone
    (poll reports POLLERR for a pipe without readers). A file, a terminal or a full pipe with a
    live reader is not gone. A reader may still leave after this answer."""
    if sys.stdout is None:
        return True
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # replaced by something without a descriptor: trust it
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(
        events & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, events in poller.poll(0)
    )


def write(text: str) -> None:
    """Print ``text`` and a newline to stdout now; StdoutClosed if it cannot be delivered."""
    if sys.stdout is None:
        raise StdoutClosed
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise StdoutClosed from None
    except OSError as exc:
        if exc.errno in (errno.EPIPE, errno.EBADF):
            raise StdoutClosed from None
        raise


def discard_stdout() -> None:
    """Point fd 1 at /dev/null, so the interpreter's flush at exit does not fail again."""
    if sys.stdout is None:
        return
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
