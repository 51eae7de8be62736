"""The schema is the single source: handlers, introspection and the protocol docs follow it."""

import asyncio
from pathlib import Path

import pytest

from dirtylogd.api import handlers
from dirtylogd.api.introspect import qmp_schema, render_markdown
from dirtylogd.api.schema import BY_NAME, COMMANDS
from dirtylogd.errors import GenericError

DOC = Path(__file__).resolve().parents[4] / "docs" / "protocol.md"


def test_every_command_has_a_handler_and_every_handler_a_command():
    bound = {c.name: c.handler for c in COMMANDS if c.handler is not None}
    assert set(bound) == set(BY_NAME) - {"qmp_capabilities"}  # the session answers that one
    defined = {
        name
        for name, fn in vars(handlers).items()
        if callable(fn)
        and not name.startswith("_")
        and fn.__module__ == handlers.__name__
        and asyncio.iscoroutinefunction(fn)
    }
    assert {fn.__name__ for fn in bound.values()} == defined


def test_protocol_reference_is_generated_from_the_schema():
    assert DOC.read_text() == render_markdown(COMMANDS), (
        "run: python -m dirtylogd.api > docs/protocol.md"
    )


def test_introspection_refers_only_to_types_it_defines():
    entries = {e["name"]: e for e in qmp_schema(COMMANDS)}
    for e in entries.values():
        if e["meta-type"] == "command":
            assert e["arg-type"] in entries
        for m in e.get("members", []):
            if "type" in m:
                assert m["type"] in entries, m
        if e["meta-type"] == "array":
            assert e["element-type"] in entries
    assert len([e for e in entries.values() if e["meta-type"] == "command"]) == len(COMMANDS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"vm": "a"}, "Parameter 'slot' is missing"),
        ({"vm": "a", "slot": 70000}, "Parameter 'slot' must be between 0 and 65535, not 70000"),
        ({"vm": "a", "slot": 1.0}, "Parameter 'slot' expects an integer"),
        ({"vm": "a", "slot": 1, "encoding": "json"}, "Parameter 'encoding' must be one of"),
        ({"vm": "", "slot": 1}, "Parameter 'vm' expects"),
    ],
)
def test_validation_messages_name_the_parameter(args, message):
    with pytest.raises(GenericError, match=message.replace("(", r"\(")):
        BY_NAME["dirty-log-get"].validate(args)


def test_defaults_are_filled_and_keys_snake_cased():
    got = BY_NAME["dirty-log-get"].validate({"vm": "a", "slot": 2})
    assert got == {
        "vm": "a",
        "slot": 2,
        "as_id": 0,
        "consumer": "default",
        "encoding": "bitmap",
        "fdname": None,
    }


def test_base64_arguments_arrive_decoded():
    got = BY_NAME["sim-write"].validate({"vm": "a", "guest-phys-addr": 0, "data": "aGk="})
    assert got["data"] == b"hi"
