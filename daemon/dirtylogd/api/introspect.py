"""Renderings of the command table: QEMU-style introspection and the protocol reference.

python -m dirtylogd.api > docs/protocol.md
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dirtylogd.api.argtypes import Arg, ArgType, Enum, List, Object
from dirtylogd.api.command import Command

# --- introspection (query-qmp-schema) ---------------------------------------------------------
_BUILTINS = {"str": "string", "int": "int", "number": "number", "bool": "boolean", "value": "value"}


def qmp_schema(commands: Sequence[Command]) -> list[dict[str, Any]]:
    """SchemaInfo entries in QEMU's format (names are not masked)."""
    entries: dict[str, dict[str, Any]] = {}

    def type_name(t: ArgType) -> str:
        if isinstance(t, Enum):
            entries.setdefault(
                t.name,
                {
                    "name": t.name,
                    "meta-type": "enum",
                    "members": [{"name": v} for v in t.values],
                    "values": list(t.values),
                },
            )
            return t.name
        if isinstance(t, List):
            inner = type_name(t.item)
            name = f"[{inner}]"
            entries.setdefault(name, {"name": name, "meta-type": "array", "element-type": inner})
            return name
        if isinstance(t, Object):
            object_entry(t.name, t.fields)
            return t.name
        return t.json_name

    def object_entry(name: str, fields: Sequence[Arg]) -> None:
        members = []
        for a in fields:
            member: dict[str, Any] = {"name": a.name, "type": type_name(a.type)}
            if a.optional:
                member["default"] = None
            members.append(member)
        entries.setdefault(name, {"name": name, "meta-type": "object", "members": members})

    out = []
    for cmd in commands:
        arg_type = f"q_obj_{cmd.name}-arg"
        object_entry(arg_type, cmd.args)
        out.append(
            {
                "name": cmd.name,
                "meta-type": "command",
                "arg-type": arg_type,
                "ret-type": "any",
                "allow-oob": False,
            }
        )
    out += entries.values()
    out += [{"name": n, "meta-type": "builtin", "json-type": j} for n, j in _BUILTINS.items()]
    return out


# --- the protocol reference -------------------------------------------------------------------
def render_markdown(commands: Sequence[Command]) -> str:
    lines = [
        "# dirtylogd QMP protocol reference",
        "",
        "Generated from `daemon/dirtylogd/api/schema.py` by",
        "`python -m dirtylogd.api`; do not edit.",
        "Framing, negotiation and error classes follow QEMU's docs/interop/qmp-spec.rst.",
        "Unknown, missing, wrong-typed or out-of-range arguments are rejected with GenericError",
        "before the command does anything.",
        "",
    ]
    for cmd in commands:
        lines += [f"## `{cmd.name}`", "", cmd.doc, ""]
        if cmd.args:
            lines += ["| argument | type | default | meaning |", "| --- | --- | --- | --- |"]
            for a in cmd.args:
                default = "required" if not a.optional else f"`{_json_default(a.default)}`"
                lines.append(f"| `{a.name}` | {a.type.describe()} | {default} | {a.doc} |")
                if isinstance(a.type, List) and isinstance(a.type.item, Object):
                    for f in a.type.item.fields:
                        d = "required" if not f.optional else f"`{_json_default(f.default)}`"
                        lines.append(
                            f"| `{a.name}[].{f.name}` | {f.type.describe()} | {d} | {f.doc} |"
                        )
            lines.append("")
        lines += [f"Returns: `{cmd.returns}`", ""]
        if cmd.errors:
            lines += ["Errors: " + "; ".join(cmd.errors) + ".", ""]
    return "\n".join(lines)


def _json_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
