"""The schema is the single source: handlers, introspection and the protocol docs follow it."""

import ast
import asyncio
from pathlib import Path

import pytest

from dirtylogd.api import convergence, handlers
from dirtylogd.api.argtypes import Arg, Enum, Int, List, Null, Object, Str, Union
from dirtylogd.api.command import Command, Event
from dirtylogd.api.introspect import EMPTY, qmp_schema, render_markdown
from dirtylogd.api.schema import BY_NAME, COMMANDS, EVENTS
from dirtylogd.errors import GenericError

ROOT = Path(__file__).resolve().parents[4]
DOC = ROOT / "docs" / "protocol.md"
SERVICE = ROOT / "daemon" / "dirtylogd" / "service"


def test_every_command_has_a_handler_and_every_handler_a_command():
    bound = {c.name: c.handler for c in COMMANDS if c.handler is not None}
    assert set(bound) == set(BY_NAME) - {"qmp_capabilities"}  # the session answers that one
    defined = {
        name
        for module in (handlers, convergence)
        for name, fn in vars(module).items()
        if callable(fn)
        and not name.startswith("_")
        and fn.__module__ == module.__name__
        and asyncio.iscoroutinefunction(fn)
    }
    assert {fn.__name__ for fn in bound.values()} == defined


def test_protocol_reference_is_generated_from_the_schema():
    assert DOC.read_text() == render_markdown(COMMANDS, EVENTS), (
        "run: python -m dirtylogd.api > docs/protocol.md"
    )


def test_introspection_refers_only_to_types_it_defines_each_once():
    listed = qmp_schema(COMMANDS, EVENTS)
    entries = {e["name"]: e for e in listed}
    assert len(entries) == len(listed)
    referred = set()
    for e in entries.values():
        referred |= {e[k] for k in ("arg-type", "ret-type", "element-type") if k in e}
        referred |= {m["type"] for m in e.get("members", []) if "type" in m}
        referred |= {v["type"] for v in e.get("variants", [])}
    types = {n for n, e in entries.items() if e["meta-type"] not in ("command", "event")}
    assert referred == types  # every reference defined, every type referred to
    kinds = [e["meta-type"] for e in listed]
    assert kinds.count("command") == len(COMMANDS) and kinds.count("event") == len(EVENTS)


def test_introspection_has_qemus_builtins_empty_object_and_array_names():
    entries = {e["name"]: e for e in qmp_schema(COMMANDS, EVENTS)}
    assert entries["any"] == {"name": "any", "meta-type": "builtin", "json-type": "value"}
    assert entries[EMPTY] == {"name": "q_empty", "meta-type": "object", "members": []}
    assert entries["stop"]["ret-type"] == EMPTY
    assert entries["query-version"]["arg-type"] == EMPTY
    assert entries["query-vms"]["ret-type"] == "[VmInfo]"
    assert entries["[VmInfo]"] == {
        "name": "[VmInfo]",
        "meta-type": "array",
        "element-type": "VmInfo",
    }
    assert entries["dirty-log-get"]["arg-type"] == "q_obj_dirty-log-get-arg"
    assert entries["STOP"] == {"name": "STOP", "meta-type": "event", "arg-type": "q_obj_STOP-arg"}
    vm_info = entries["VmInfo"]
    assert vm_info["tag"] == "status" and [m["name"] for m in vm_info["members"]] == [
        "name",
        "status",
    ]
    assert {v["case"]: v["type"] for v in vm_info["variants"]} == {
        "ok": "VmInfoServed",
        "ram-lost": "VmInfoUnavailable",
        "unrestorable": "VmInfoUnavailable",
    }
    assert entries["StrOrNull"]["members"] == [{"type": "str"}, {"type": "null"}]


def test_two_types_of_one_name_are_refused():
    one = Object("Info", (Arg("a", Int(), "a"),))
    other = Object("Info", (Arg("b", Int(), "b"),))
    commands = [
        Command("x", None, "x", returns=one),
        Command("y", None, "y", returns=List(other)),
    ]
    with pytest.raises(ValueError, match="two schema entries are named 'Info'"):
        qmp_schema(commands, [])
    with pytest.raises(ValueError, match="named 'STOP'"):  # names are unique across kinds
        qmp_schema([Command("STOP", None, "s")], [Event("STOP", "s")])


def test_a_union_has_a_variant_for_each_value_of_its_enum_tag():
    base = (Arg("kind", Enum("Kind", ("a", "b")), "which"),)
    empty = Object("Nothing", ())
    with pytest.raises(ValueError, match="one variant for each value of Kind"):
        Union("U", base, "kind", (("a", empty),))
    with pytest.raises(ValueError, match="mandatory enum member"):
        Union("U", (Arg("kind", Str(), "which"),), "kind", (("a", empty), ("b", empty)))


def test_types_that_only_describe_replies_refuse_to_check_an_argument():
    with pytest.raises(TypeError, match="describes replies"):
        Null().check(None, "x")


def test_the_declared_events_are_the_ones_the_service_emits():
    """Each ``emit_event`` call names its event with a literal; the table has exactly those."""
    emitted = set()
    for path in SERVICE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            parts = [node.func, *node.args]
            for i, part in enumerate(parts[:-1]):
                after = parts[i + 1]
                if isinstance(part, ast.Attribute) and part.attr == "emit_event":
                    assert isinstance(after, ast.Constant), ast.unparse(node)
                    emitted.add(after.value)
    assert emitted == {e.name for e in EVENTS}


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
