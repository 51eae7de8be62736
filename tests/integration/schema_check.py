"""Live replies and events held to the schema the daemon itself declares in query-qmp-schema.

The check reads the introspection a client gets, not the Python table, and is strict where QMP
clients are lenient: an object must have every mandatory member the schema declares and no
member it does not (its variant's members included, picked by the tag's value). Every member
seen is recorded, so a test can also ask which declared members it never saw sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "value": lambda v: True,
}


class Mismatch(AssertionError):
    """A value that does not have the declared shape; the text names where and how."""


class Schema:
    """query-qmp-schema's entries by name, and the (type, member) pairs seen in values."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.entries = {e["name"]: e for e in entries}
        names = [e["name"] for e in entries]
        self.duplicates = sorted({n for n in names if names.count(n) > 1})
        self.seen: set[tuple[str, str]] = set()

    # --- the schema on its own ----------------------------------------------------------------
    def references(self) -> set[str]:
        """Every type name some entry refers to."""
        out = set()
        for e in self.entries.values():
            for key in ("arg-type", "ret-type", "element-type"):
                if key in e:
                    out.add(e[key])
            out.update(m["type"] for m in e.get("members", []) if "type" in m)
            out.update(v["type"] for v in e.get("variants", []))
        return out

    def of(self, meta_type: str) -> dict[str, dict[str, Any]]:
        return {n: e for n, e in self.entries.items() if e["meta-type"] == meta_type}

    def members_reachable(self, roots: Iterable[str]) -> set[tuple[str, str]]:
        """(object type, member) of every object type a value of ``roots`` may contain."""
        todo, done, out = list(roots), set(), set()
        while todo:
            name = todo.pop()
            if name in done:
                continue
            done.add(name)
            e = self.entries[name]
            if e["meta-type"] == "array":
                todo.append(e["element-type"])
            for m in e.get("members", []):
                if "name" in m and e["meta-type"] == "object":
                    out.add((name, m["name"]))
                if "type" in m:
                    todo.append(m["type"])
            todo += [v["type"] for v in e.get("variants", [])]
        return out

    # --- values -------------------------------------------------------------------------------
    def check_return(self, command: str, value: Any) -> None:
        entry = self.entries[command]
        assert entry["meta-type"] == "command", entry
        self.check(value, entry["ret-type"], command)

    def check_event(self, message: dict[str, Any]) -> None:
        """A whole event message: envelope (qmp-spec "Asynchronous events") and data."""
        name = message["event"]
        if set(message) != {"event", "data", "timestamp"}:
            raise Mismatch(f"event {name}: members {sorted(message)}")
        stamp = message["timestamp"]
        if set(stamp) != {"seconds", "microseconds"} or not all(
            _JSON_TYPES["int"](v) for v in stamp.values()
        ):
            raise Mismatch(f"event {name}: timestamp {stamp}")
        entry = self.entries.get(name)
        if entry is None or entry["meta-type"] != "event":
            raise Mismatch(f"event {name} is not declared")
        self.check(message["data"], entry["arg-type"], f"{name}.data")

    def check(self, value: Any, type_name: str, where: str) -> None:
        """``value`` is of the declared type ``type_name``, or Mismatch says where it is not."""
        e = self.entries.get(type_name)
        if e is None:
            raise Mismatch(f"{where}: type {type_name!r} is not defined")
        meta = e["meta-type"]
        if meta == "builtin":
            if not _JSON_TYPES[e["json-type"]](value):
                raise Mismatch(f"{where}: {value!r} is not a JSON {e['json-type']}")
        elif meta == "enum":
            if value not in e["values"]:
                raise Mismatch(f"{where}: {value!r} is not one of {e['values']}")
        elif meta == "array":
            if not isinstance(value, list):
                raise Mismatch(f"{where}: {value!r} is not an array")
            for i, item in enumerate(value):
                self.check(item, e["element-type"], f"{where}[{i}]")
        elif meta == "alternate":
            self._check_alternate(value, e, where)
        elif meta == "object":
            self._check_object(value, e, where)
        else:
            raise Mismatch(f"{where}: {type_name!r} is a {meta}, not a type")

    def _check_alternate(self, value: Any, e: dict[str, Any], where: str) -> None:
        for member in e["members"]:
            before = set(self.seen)
            try:
                self.check(value, member["type"], where)
            except Mismatch:
                self.seen = before  # what a branch that does not fit saw was not seen
                continue
            return
        raise Mismatch(f"{where}: {value!r} is none of {[m['type'] for m in e['members']]}")

    def _check_object(self, value: Any, e: dict[str, Any], where: str) -> None:
        if not isinstance(value, dict):
            raise Mismatch(f"{where}: {value!r} is not an object")
        declared = [(e["name"], m) for m in e["members"]]
        if "tag" in e:
            case = value.get(e["tag"])
            variant = next((v["type"] for v in e["variants"] if v["case"] == case), None)
            if variant is None:
                raise Mismatch(f"{where}: tag {e['tag']}={case!r} has no variant")
            v = self.entries[variant]
            declared += [(variant, m) for m in v["members"]]
        names = {m["name"] for _, m in declared}
        extra = sorted(set(value) - names)
        mandatory = {m["name"] for _, m in declared if "default" not in m}
        missing = sorted(mandatory - set(value))
        if extra or missing:
            raise Mismatch(
                f"{where} ({e['name']}): undeclared members {extra}, missing members {missing}"
            )
        for owner, m in declared:
            if m["name"] in value:
                self.seen.add((owner, m["name"]))
                self.check(value[m["name"]], m["type"], f"{where}.{m['name']}")
