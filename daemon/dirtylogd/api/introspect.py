"""Renderings of the table: QEMU-style introspection and the protocol reference.

python -m dirtylogd.api > docs/protocol.md

Introspection follows QEMU's qapi/introspect.json and scripts/qapi/introspect.py: a command has
an ``arg-type`` and a ``ret-type``, an event an ``arg-type`` (``q_empty``, the empty object, when
there is nothing); arguments and event data are implicit objects named ``q_obj_NAME-arg``;
arrays are named ``[T]``; only the types in use are listed, builtins too, each once.

Type names are plain, as QEMU's are when built with ``--unmask-non-abi-names``, not numbered:
the same names head the tables of docs/protocol.md, so a client's author can find a type from
either side. QEMU numbers its names to keep clients from depending on them and to save bytes;
here, as there, type names are not part of the protocol (the reference says so), and the whole
schema is a few kilobytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dirtylogd.api.argtypes import Alternate, Arg, ArgType, Enum, List, Object, Union
from dirtylogd.api.command import Command, Event

# --- introspection (query-qmp-schema) ---------------------------------------------------------
# QEMU's builtins and their JSON types (JSONType); ``any`` is any JSON value.
BUILTINS = {
    "str": "string",
    "int": "int",
    "number": "number",
    "bool": "boolean",
    "null": "null",
    "any": "value",
}
EMPTY = "q_empty"  # QEMU's name for the object without members
_ORDER = {"command": 0, "event": 1}  # then the types, in the order they were first used


def qmp_schema(commands: Sequence[Command], events: Sequence[Event]) -> list[dict[str, Any]]:
    """SchemaInfo entries in QEMU's format; raises ValueError if two differ in one name."""
    schema = _Schema()
    for cmd in commands:
        schema.define(
            {
                "name": cmd.name,
                "meta-type": "command",
                "arg-type": schema.implicit(cmd.name, cmd.args),
                "ret-type": schema.returns(cmd.returns),
                "allow-oob": False,
            }
        )
    for ev in events:
        schema.define(
            {"name": ev.name, "meta-type": "event", "arg-type": schema.implicit(ev.name, ev.data)}
        )
    return sorted(schema.entries.values(), key=lambda e: _ORDER.get(e["meta-type"], 2))


class _Schema:
    """SchemaInfo entries by name, each type's entry made the first time it is used."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def define(self, entry: dict[str, Any]) -> None:
        """Add ``entry``; the same name again must mean the same thing (introspect.json: names
        are unique whatever their meta-type)."""
        name = entry["name"]
        known = self.entries.setdefault(name, entry)
        if known != entry:
            raise ValueError(f"two schema entries are named {name!r}: {known} and {entry}")

    def name_of(self, t: ArgType) -> str:
        """The name ``t`` is referred to by, once its entry and those it uses are defined."""
        if isinstance(t, List):
            element = self.name_of(t.item)
            name = f"[{element}]"
            self.define({"name": name, "meta-type": "array", "element-type": element})
            return name
        if isinstance(t, Enum):
            members = [{"name": v} for v in t.values]
            self.define(
                {"name": t.name, "meta-type": "enum", "members": members, "values": list(t.values)}
            )
            return t.name
        if isinstance(t, Object):
            return self.object(t.name, t.fields)
        if isinstance(t, Union):
            entry = self._object_entry(t.name, t.base)
            entry["tag"] = t.tag
            entry["variants"] = [{"case": case, "type": self.name_of(v)} for case, v in t.variants]
            self.define(entry)
            return t.name
        if isinstance(t, Alternate):
            members = [{"type": self.name_of(m)} for m in t.members]
            self.define({"name": t.name, "meta-type": "alternate", "members": members})
            return t.name
        self.define(
            {"name": t.json_name, "meta-type": "builtin", "json-type": BUILTINS[t.json_name]}
        )
        return t.json_name

    def returns(self, t: ArgType | None) -> str:
        """A command's ret-type: its return's type, or the empty object it answers without one."""
        return self.object(EMPTY, ()) if t is None else self.name_of(t)

    def implicit(self, owner: str, fields: Sequence[Arg]) -> str:
        """A command's arguments or an event's data: QEMU's implicit object, or the empty one."""
        return self.object(f"q_obj_{owner}-arg" if fields else EMPTY, fields)

    def object(self, name: str, fields: Sequence[Arg]) -> str:
        self.define(self._object_entry(name, fields))
        return name

    def _object_entry(self, name: str, fields: Sequence[Arg]) -> dict[str, Any]:
        members = []
        for a in fields:
            member: dict[str, Any] = {"name": a.name, "type": self.name_of(a.type)}
            if a.optional:
                member["default"] = None  # introspect.json: present means optional, always null
            members.append(member)
        return {"name": name, "meta-type": "object", "members": members}


# --- the protocol reference -------------------------------------------------------------------
_HEADER = """\
# dirtylogd QMP protocol reference

Generated from `daemon/dirtylogd/api/schema.py` and `replies.py` by
`python -m dirtylogd.api`; do not edit.
Framing, negotiation and error classes follow QEMU's docs/interop/qmp-spec.rst.
Unknown, missing, wrong-typed or out-of-range arguments are rejected with GenericError
before the command does anything.

The greeting's `version` is the object `query-version` returns, QEMU's VersionInfo:
`{"QMP": {"version": {"qemu": {"major": X, "minor": Y, "micro": Z}, "package": "dirtylogd X.Y.Z"},
"capabilities": []}}`. `major`, `minor` and `micro` are dirtylogd's own version numbers, the
X.Y.Z of its release, not a QEMU version: the member is named `qemu` because QMP clients
(qmp-shell, qemu.qmp) read the version there. To know whether a command, member or event
exists, look for it in `query-qmp-schema` rather than compare versions.

Each command's return and each event's data is described below and in `query-qmp-schema`,
under the type names used here (which, as in QEMU, are not part of the protocol). A member
marked optional may be absent; every other member is always sent.
"""

_EVENTS = """\
## Events

Sent to every client past capabilities negotiation, as
`{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": U}}`
(qmp-spec "Asynchronous events"). A client that lets 256 events queue up unread is
disconnected.
"""

Column = Callable[[Arg], str]
Row = tuple[str, str, str, str]


def _presence(a: Arg) -> str:
    return "optional" if a.optional else "always"


def _default(a: Arg) -> str:
    return "required" if not a.optional else f"`{_json_default(a.default)}`"


def render_markdown(commands: Sequence[Command], events: Sequence[Event]) -> str:
    lines = [_HEADER, "## Commands", ""]
    for cmd in commands:
        lines += [f"### `{cmd.name}`", "", cmd.doc, ""]
        if cmd.args:
            lines += _table("argument", "default", _rows(cmd.args, "", _default))
        lines += _returns(cmd.returns)
        if cmd.errors:
            lines += ["Errors: " + "; ".join(cmd.errors) + ".", ""]
    lines += [_EVENTS]
    for ev in events:
        lines += [f"### `{ev.name}`", "", ev.doc, "", "Its `data`:", ""]
        lines += _table("member", "present", _rows(ev.data, "", _presence))
    return "\n".join(lines)


def _returns(t: ArgType | None) -> list[str]:
    if t is None:
        return ["Returns: `{}`", ""]
    if isinstance(t, List):
        head = f"Returns an array of `{t.item.describe()}`:"
        rows = _inner(t.item, "")
    else:
        head = f"Returns `{t.describe()}`:"
        rows = _inner(t, "")
    return [head, "", *_table("member", "present", rows)]


def _table(first: str, column: str, rows: list[Row]) -> list[str]:
    lines = [f"| {first} | type | {column} | meaning |", "| --- | --- | --- | --- |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _rows(fields: Sequence[Arg], prefix: str, column: Column, when: str = "") -> list[Row]:
    """A row per member and, under it, rows for the members inside it (``memslots[].slot``);
    ``when`` qualifies the members of a union's variant, not what is inside them."""
    rows: list[Row] = []
    for a in fields:
        present = column(a) if not when else (f"optional, {when}" if a.optional else when)
        rows.append((f"`{prefix}{a.name}`", a.type.describe(), present, a.doc))
        rows += _inner(a.type, f"{prefix}{a.name}.", column)
    return rows


def _inner(t: ArgType, prefix: str, column: Column = _presence) -> list[Row]:
    """Rows for the members of a value of type ``t`` whose path is ``prefix``."""
    while isinstance(t, List):
        t, prefix = t.item, prefix[:-1] + "[]."
    if isinstance(t, Object):
        return _rows(t.fields, prefix, column)
    if isinstance(t, Union):
        rows = _rows(t.base, prefix, column)
        cases: dict[str, tuple[Object, list[str]]] = {}
        for case, variant in t.variants:
            cases.setdefault(variant.name, (variant, []))[1].append(case)
        for variant, names in cases.values():
            when = f"if `{t.tag}` is " + " or ".join(f'"{n}"' for n in names)
            rows += _rows(variant.fields, prefix, column, when)
        return rows
    return []


def _json_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
