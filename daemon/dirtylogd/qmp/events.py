"""Where the service's events go: a fan-out the service is given as a plain callable.

The service calls ``hub.publish(name, data)`` without knowing who listens; the socket server
subscribes and sends each event, in the envelope the session builds, to its negotiated clients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

EventSink = Callable[[str, dict[str, Any]], None]


class EventHub:
    def __init__(self) -> None:
        self._subscribers: list[EventSink] = []

    def subscribe(self, sink: EventSink) -> None:
        self._subscribers.append(sink)

    def publish(self, name: str, data: dict[str, Any]) -> None:
        """Hand an event to every subscriber (on the event loop's thread)."""
        for sink in self._subscribers:
            sink(name, data)
