"""Counters the wire keeps for metrics (read at scrape time by :mod:`dirtylogd.ops.metrics`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Why a client was turned away or disconnected: the label values of dropped_clients, all of
# which the metrics export (also while still zero, so alerts can rate() them).
DROP_REASONS = ("too-many-clients", "too-many-from-uid", "negotiation-timeout", "not-reading")


@dataclass
class ServerTelemetry:
    """What happened on the QMP socket."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (command, result)
    clients: int = 0
    refused_peers: int = 0
    dropped_clients: Counter[str] = field(default_factory=Counter)  # by reason
