"""Descriptors a client passes with SCM_RIGHTS, per connection.

They are held in arrival order until ``getfd`` names one (qemu.qmp sends the descriptor with a
single space, then the getfd command), and closed with the connection if never claimed. A
connection may hold only a few, named or not, so a client cannot pin the daemon's fd table.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque

from dirtylogd.errors import GenericError

MAX_HELD_FDS = 16


class FdRegistry:
    def __init__(self, max_held: int = MAX_HELD_FDS) -> None:
        self.max_held = max_held
        self._held: deque[int] = deque()
        self._named: dict[str, int] = {}

    def hold(self, fds: list[int]) -> int:
        """Keep received descriptors for getfd; returns how many were refused (and closed)."""
        refused = 0
        for fd in fds:
            if len(self._held) + len(self._named) >= self.max_held:
                _close(fd)
                refused += 1
            else:
                self._held.append(fd)
        return refused

    def claim(self, name: str) -> None:
        if not self._held:
            raise GenericError("no file descriptor was supplied via SCM_RIGHTS")
        fd = self._held.popleft()
        old = self._named.pop(name, None)
        if old is not None:
            os.close(old)
        self._named[name] = fd

    def lookup(self, name: str) -> int:
        fd = self._named.get(name)
        if fd is None:
            raise GenericError(f"no file descriptor named '{name}' (pass one with getfd)")
        return fd

    def close(self, name: str) -> None:
        os.close(self.lookup(name))
        del self._named[name]

    def close_all(self) -> None:
        for fd in [*self._held, *self._named.values()]:
            _close(fd)
        self._held.clear()
        self._named.clear()


def _close(fd: int) -> None:
    """Close a client's descriptor. Linux frees the number even when close reports an error
    (EIO from a network file, say), so an error must not stop the others from being closed."""
    with contextlib.suppress(OSError):
        os.close(fd)
