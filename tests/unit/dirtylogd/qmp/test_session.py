"""The QMP session without sockets: negotiation, ids, envelope checks, the bug barrier."""

import asyncio
import dataclasses

import pytest

from dirtylogd import VERSION, __version__
from dirtylogd.api import schema
from dirtylogd.api.dispatch import BoundCommands
from dirtylogd.qmp.fds import FdRegistry
from dirtylogd.qmp.framing import ParseError
from dirtylogd.qmp.session import Phase, Session, greeting
from dirtylogd.qmp.telemetry import ServerTelemetry
from dirtylogd.service.registry import Service


@pytest.fixture
def session(tmp_path):
    telemetry = ServerTelemetry()
    service = Service(str(tmp_path))
    s = Session(BoundCommands(service, FdRegistry(), 1 << 20), telemetry)
    yield s
    asyncio.run(service.shutdown())


def ask(session, item):
    return asyncio.run(session.handle(item)).message


def test_greeting_names_the_daemon_in_qemu_version_fields():
    g = greeting()["QMP"]
    assert g["capabilities"] == [] and g["version"]["package"].startswith("dirtylogd")


def test_greeting_and_query_version_have_one_format(session):
    """qmp-spec "Server Greeting": the version is in query-version's format (VersionInfo)."""
    ask(session, {"execute": "qmp_capabilities"})
    version = ask(session, {"execute": "query-version"})["return"]
    assert version == greeting()["QMP"]["version"]
    major, minor, micro = VERSION
    assert version == {
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": f"dirtylogd {__version__}",
    }


def test_negotiation_then_commands(session):
    assert ask(session, {"execute": "query-vms", "id": 1})["error"]["class"] == "CommandNotFound"
    assert session.phase is Phase.NEGOTIATION
    assert ask(session, {"execute": "qmp_capabilities", "id": 2}) == {"return": {}, "id": 2}
    assert session.phase is Phase.COMMAND
    assert ask(session, {"execute": "query-vms"}) == {"return": []}


def test_parse_errors_and_non_objects_have_no_id(session):
    assert ask(session, ParseError("JSON parse error, x")) == {
        "error": {"class": "GenericError", "desc": "JSON parse error, x"}
    }
    assert "id" not in ask(session, [1])


def test_arguments_are_checked_before_the_handler_runs(session):
    ask(session, {"execute": "qmp_capabilities"})
    reply = ask(session, {"execute": "vm-create", "arguments": {"name": "a", "esop": "yes"}})
    assert reply["error"]["desc"] == "Parameter 'esop' expects a boolean"
    assert ask(session, {"execute": "query-vms"}) == {"return": []}


def test_a_handler_bug_costs_one_reply_not_the_session(session, monkeypatch):
    async def broken(ctx, args):
        raise KeyError("oops")

    entry = schema.BY_NAME["query-vms"]
    monkeypatch.setitem(schema.BY_NAME, "query-vms", dataclasses.replace(entry, handler=broken))
    ask(session, {"execute": "qmp_capabilities"})
    reply = ask(session, {"execute": "query-vms", "id": 5})
    assert reply["id"] == 5 and reply["error"]["desc"].startswith("internal error in 'query-vms'")
    assert ask(session, {"execute": "query-version"})["return"]


def test_requests_are_counted_by_command_and_result(session):
    ask(session, {"execute": "qmp_capabilities"})
    ask(session, {"execute": "query-version"})
    ask(session, {"execute": "made-up"})
    ask(session, {"execute": "vm-remove", "arguments": {"vm": "x"}})
    counts = session.telemetry.requests
    assert counts[("query-version", "ok")] == 1
    assert counts[("unknown", "CommandNotFound")] == 1  # client-chosen names never become labels
    assert counts[("vm-remove", "DeviceNotFound")] == 1
