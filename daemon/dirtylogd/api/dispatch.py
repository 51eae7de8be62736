"""The command table bound to one connection: what the wire's session dispatches through."""

from __future__ import annotations

from typing import Any

from dirtylogd.api.command import Context
from dirtylogd.api.schema import BY_NAME, COMMANDS, EVENTS
from dirtylogd.qmp.fds import FdRegistry
from dirtylogd.qmp.scope import ConnectionScope
from dirtylogd.service.registry import Service


class BoundCommands:
    """:class:`dirtylogd.qmp.session.Commands` over :data:`COMMANDS`, for one connection."""

    def __init__(
        self,
        service: Service,
        fds: FdRegistry,
        max_reply_bytes: int,
        scope: ConnectionScope | None = None,
    ) -> None:
        self.context = Context(
            service, fds, max_reply_bytes, COMMANDS, EVENTS, scope or ConnectionScope()
        )

    def known(self, name: str) -> bool:
        return name in BY_NAME

    def validate(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return BY_NAME[name].validate(arguments)

    async def run(self, name: str, arguments: dict[str, Any]) -> Any:
        handler = BY_NAME[name].handler
        if handler is None:  # only qmp_capabilities, which the session answers itself
            raise AssertionError(f"{name} has no handler")
        return await handler(self.context, arguments)
