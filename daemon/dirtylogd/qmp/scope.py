"""What one connection leaves behind when it closes, besides its descriptors.

A command may tie state to the connection that asked for it (``until-disconnect`` limits and
throttles: a migration tool that dies must never leave its guest slowed down). The server runs
the callbacks registered here once, when the connection ends, however it ends.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)
_ids = itertools.count(1)


class ConnectionScope:
    """Callbacks to run when one connection closes; ``id`` names the connection."""

    def __init__(self) -> None:
        self.id = next(_ids)
        self._callbacks: dict[object, Callable[[], None]] = {}
        self.closed = False

    def on_close(self, key: object, callback: Callable[[], None]) -> None:
        """Run ``callback`` at close; a later one under the same ``key`` replaces it."""
        self._callbacks[key] = callback

    def discard(self, key: object) -> None:
        """The state under ``key`` was lifted meanwhile: nothing to do at close."""
        self._callbacks.pop(key, None)

    def close(self) -> None:
        """Run every callback once (each failure is logged, none stops the others)."""
        self.closed = True
        callbacks, self._callbacks = list(self._callbacks.values()), {}
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a connection's cleanup failed")
