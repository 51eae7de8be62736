"""One QMP session: greeting, capabilities negotiation, id echo, every envelope.

The session turns each decoded value into exactly one reply, and builds the event envelope. It
knows nothing of sockets (the server feeds it values and writes what it returns) nor of VMs:
commands come from a :class:`Commands` table it is given (see qmp-spec "Capabilities
Negotiation", "Issuing Commands", "Commands Responses", "Asynchronous events").
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dirtylogd import VERSION, __version__
from dirtylogd.errors import CommandNotFound, GenericError, QmpError
from dirtylogd.qmp.framing import ParseError
from dirtylogd.qmp.telemetry import ServerTelemetry

log = logging.getLogger(__name__)
_NO_ID: Any = object()
_MEMBERS = frozenset({"execute", "arguments", "id"})


class Phase(enum.Enum):
    NEGOTIATION = "negotiation"
    COMMAND = "command"


class Commands(Protocol):
    """The command table as the session sees it: names, argument checks, execution."""

    def known(self, name: str) -> bool: ...

    def validate(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """Checked arguments under snake_case names; raises QmpError."""
        ...

    async def run(self, name: str, arguments: dict[str, Any]) -> Any: ...


@dataclass
class Deferred:
    """A return value whose delivery matters: ``undo`` runs if it cannot be delivered,
    ``done`` once it was (what is counted as delivered is then true, and never taken back)."""

    value: Any
    undo: Callable[[], None]
    done: Callable[[], None] | None = None


@dataclass
class Reply:
    message: dict[str, Any]
    undo: Callable[[], None] | None = None  # run if the message cannot be delivered
    done: Callable[[], None] | None = None  # run once it was written whole


def version_info() -> dict[str, Any]:
    """QEMU's VersionInfo, for the greeting and query-version alike: qmp-spec "Server Greeting"
    wants one format for both. ``qemu`` holds dirtylogd's own numbers, because QMP clients
    (qmp-shell) read the version there."""
    major, minor, micro = VERSION
    return {
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": f"dirtylogd {__version__}",
    }


def greeting() -> dict[str, Any]:
    """The server greeting: the version, and no capabilities (no out-of-band execution)."""
    return {"QMP": {"version": version_info(), "capabilities": []}}


def event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """An asynchronous event, stamped now (qmp-spec "Asynchronous events")."""
    now = time.time()
    stamp = {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}
    return {"event": name, "data": data, "timestamp": stamp}


def error(desc: str) -> dict[str, Any]:
    """An error reply outside any command (refused peer, oversized message)."""
    return {"error": GenericError(desc).to_json()}


class Session:
    def __init__(self, commands: Commands, telemetry: ServerTelemetry) -> None:
        self.commands = commands
        self.telemetry = telemetry
        self.phase = Phase.NEGOTIATION

    async def handle(self, item: Any) -> Reply:
        if isinstance(item, ParseError):
            return self._error(GenericError(item.desc), item.id if item.has_id else _NO_ID)
        if not isinstance(item, dict):
            return self._error(GenericError("QMP input must be a JSON object"), _NO_ID)
        id_ = item.get("id", _NO_ID)
        name = item.get("execute")  # for counting and logging; may not be a string
        try:
            command, args = self._check_envelope(item)
            result = await self._dispatch(command, args)
        except QmpError as exc:
            self._count(name, exc.error_class)
            return self._error(exc, id_)
        except Exception as exc:  # a bug must cost one reply, not the daemon
            log.exception("command %r failed unexpectedly", name)
            self._count(name, "InternalError")
            return self._error(GenericError(f"internal error in '{name}': {exc!r}"), id_)
        self._count(name, "ok")
        undo = done = None
        if isinstance(result, Deferred):
            result, undo, done = result.value, result.undo, result.done
        message: dict[str, Any] = {"return": result}
        if id_ is not _NO_ID:
            message["id"] = id_
        return Reply(message, undo, done)

    def _check_envelope(self, item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The command name and its arguments, once the envelope is valid; raises QmpError."""
        for key in item:
            if key == "exec-oob":
                raise GenericError("out-of-band execution is not supported (no 'oob' capability)")
            if key not in _MEMBERS:
                raise GenericError(f"QMP input member '{key}' is unexpected")
        if "execute" not in item:
            raise GenericError("QMP input lacks member 'execute'")
        name = item["execute"]
        if not isinstance(name, str):
            raise GenericError("QMP input member 'execute' must be a string")
        args = item.get("arguments", {})
        if not isinstance(args, dict):
            raise GenericError("QMP input member 'arguments' must be an object")
        return name, args

    async def _dispatch(self, name: str, raw_args: dict[str, Any]) -> Any:
        if self.phase is Phase.NEGOTIATION and name != "qmp_capabilities":
            raise CommandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'")
        if not self.commands.known(name):
            raise CommandNotFound(f"The command {name} has not been found")
        args = self.commands.validate(name, raw_args)
        if name == "qmp_capabilities":
            if self.phase is Phase.COMMAND:
                raise CommandNotFound(
                    "Capabilities negotiation is already complete, command ignored"
                )
            for capability in args["enable"] or []:
                raise GenericError(f"Capability '{capability}' not available")
            self.phase = Phase.COMMAND
            return {}
        return await self.commands.run(name, args)

    def _error(self, exc: QmpError, id_: Any) -> Reply:
        message: dict[str, Any] = {"error": exc.to_json()}
        if id_ is not _NO_ID:
            message["id"] = id_
        return Reply(message)

    def _count(self, name: Any, result: str) -> None:
        label = name if isinstance(name, str) and self.commands.known(name) else "unknown"
        self.telemetry.requests[(label, result)] += 1
