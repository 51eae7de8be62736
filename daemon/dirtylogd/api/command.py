"""What a command and an event are: their entries in the table, the handler's signature and
what a handler may touch.

Kept apart from the table (:mod:`dirtylogd.api.schema`) and the handlers
(:mod:`dirtylogd.api.handlers`) so that the table can import the handlers, and the handlers
(which render the table for ``query-qmp-schema``) need not import the table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dirtylogd.api.argtypes import Arg, ArgType, check_members
from dirtylogd.qmp.fds import FdRegistry
from dirtylogd.qmp.scope import ConnectionScope
from dirtylogd.service.registry import Service


@dataclass
class Context:
    """What a handler may touch: the service, its connection's descriptors and close hooks
    (``until-disconnect``), the table itself (commands and events, which query-commands and
    query-qmp-schema render)."""

    service: Service
    fds: FdRegistry
    max_reply_bytes: int
    commands: Sequence[Command]
    events: Sequence[Event]
    scope: ConnectionScope = field(default_factory=ConnectionScope)


Handler = Callable[[Context, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    """One command: its name, what it does, its arguments, what it returns and the handler
    that runs it."""

    name: str
    handler: Handler | None  # None: the session itself answers (qmp_capabilities)
    doc: str
    args: tuple[Arg, ...] = ()
    returns: ArgType | None = None  # None: the empty object {}, as for QEMU's commands
    errors: tuple[str, ...] = ()

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        return check_members(self.args, arguments)


@dataclass(frozen=True)
class Event:
    """One asynchronous event: its name, when it is sent, and the members of its ``data``."""

    name: str
    doc: str
    data: tuple[Arg, ...] = ()
