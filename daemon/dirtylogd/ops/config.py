"""Configuration: defaults that depend on who runs the daemon, a TOML file, then flags.

The TOML file takes the same keys as the long flags (``runtime-dir = "/run/x"``); a flag given
on the command line wins over the file, the file over the defaults. Each key's TOML type follows
from its flag (:func:`toml_keys`), and a value of another type is an error, not a conversion:
``demo = "false"`` would otherwise turn the demo on. ``docs/dirtylogd.toml`` lists every key
with its default.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import grp
import json
import math
import os
import pwd
import tomllib
from dataclasses import dataclass, field
from typing import Any

from dirtylogd import __version__
from dirtylogd.ops import logs
from dirtylogd.service.vm import DEFAULT_MAX_CONSUMERS
from kvmshim.s390.harvest_pool import MAX_DEFAULT_THREADS, default_harvest_threads

# Outside Prometheus' allocations (9090-9094 for its own components, 9100-9999 for exporters,
# which is full, later exporters above 10000) and not in /etc/services.
DEFAULT_METRICS_LISTEN = "127.0.0.1:8742"
LOG_LEVELS = ("debug", "info", "warning", "error")
# Clients (qemu.qmp, qmp-shell, dirtylogctl) negotiate right after the greeting, in
# milliseconds; 10 s is a wide margin on a loaded host, and an idle connection lets its slot go
# within 10 s.
DEFAULT_NEGOTIATION_TIMEOUT = 10.0
# A quarter of --max-clients: a migration tool needs a connection or two per VM, so 64 covers
# dozens of concurrent migrations by one user, while at least four users fill the daemon
# before anyone is refused for the general limit.
DEFAULT_MAX_CLIENTS_PER_UID = 64
# Room for an operator's few sessions (dirtylogctl, qmp-shell, a monitor) when the rest is full.
DEFAULT_RESERVED_CLIENTS = 8


class ConfigError(Exception):
    """A setting that cannot be used; the text says which and why."""


@dataclass
class Config:
    socket: str
    runtime_dir: str
    state_dir: str | None
    metrics_listen: tuple[str, int] | None
    allow_uid: list[int] = field(default_factory=list)
    allow_gid: list[int] = field(default_factory=list)
    demo: bool = False
    log_level: str = "info"
    max_message_bytes: int = 1 << 20
    max_reply_bytes: int = 8 << 20
    max_clients: int = 256
    # --- consumers per VM ---
    max_consumers: int = DEFAULT_MAX_CONSUMERS  # besides 'default'; see service/vm.py
    negotiation_timeout: float = DEFAULT_NEGOTIATION_TIMEOUT
    max_clients_per_uid: int = DEFAULT_MAX_CLIENTS_PER_UID
    reserved_clients: int = DEFAULT_RESERVED_CLIENTS
    harvest_threads: int = field(default_factory=default_harvest_threads)


def default_paths(euid: int, env: dict[str, str]) -> tuple[str, str]:
    """(socket, runtime dir): /run/dirtylogd as root, else under $XDG_RUNTIME_DIR."""
    if euid == 0:
        base = "/run/dirtylogd"
    else:
        base = os.path.join(env.get("XDG_RUNTIME_DIR") or f"/tmp/dirtylogd-{euid}", "dirtylogd")
    return os.path.join(base, "qmp.sock"), os.path.join(base, "ram")


def default_state_dir(euid: int, env: dict[str, str]) -> str:
    """/var/lib/dirtylogd as root (StateDirectory=), else $XDG_STATE_HOME/dirtylogd."""
    if euid == 0:
        return "/var/lib/dirtylogd"
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(
        env.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state"), "dirtylogd"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dirtylogd",
        description="Serve dirty-page bitmaps of VMs to live-migration tools over QMP.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with the same keys as the flags")
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="QMP unix socket (default /run/dirtylogd/qmp.sock as root, else "
        "$XDG_RUNTIME_DIR/dirtylogd/qmp.sock, or /tmp/dirtylogd-UID/dirtylogd/qmp.sock "
        "without $XDG_RUNTIME_DIR); ignored under socket activation",
    )
    p.add_argument(
        "--runtime-dir",
        metavar="DIR",
        help="where simulated VMs keep their RAM files (default /run/dirtylogd/ram as root, "
        "else $XDG_RUNTIME_DIR/dirtylogd/ram, or /tmp/dirtylogd-UID/dirtylogd/ram); it must "
        "be memory (tmpfs, hugetlbfs or ramfs): on a disk file system the daemon warns at "
        "start, and guest stores and harvests are many times slower",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="VM definitions and, after a graceful stop, pending bits (default "
        "/var/lib/dirtylogd as root, else $XDG_STATE_HOME/dirtylogd; 'none': "
        "nothing survives a stop)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help=f"Prometheus endpoint (default {DEFAULT_METRICS_LISTEN}; 'none' disables)",
    )
    p.add_argument(
        "--allow-uid",
        metavar="USER",
        action="append",
        help="also admit this user (name or uid); repeatable",
    )
    p.add_argument(
        "--allow-gid",
        metavar="GROUP",
        action="append",
        help="also admit members of this group (name or gid); repeatable",
    )
    p.add_argument(
        "--demo", action="store_true", help="start with a simulated VM and a running workload"
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    p.add_argument("--max-message-bytes", type=int, metavar="N", help="largest request (1 MiB)")
    p.add_argument(
        "--max-reply-bytes",
        type=int,
        metavar="N",
        help="largest inline reply (8 MiB; qemu.qmp refuses lines over 10 MiB)",
    )
    p.add_argument(
        "--max-clients", type=int, metavar="N", help="connected QMP clients at once (256)"
    )
    # --- consumers per VM ---
    p.add_argument(
        "--max-consumers",
        type=int,
        metavar="N",
        help=f"consumers a VM may have besides 'default' ({DEFAULT_MAX_CONSUMERS}); "
        "restored ones are kept, new ones past it refused",
    )
    p.add_argument(
        "--max-clients-per-uid",
        type=int,
        metavar="N",
        help=f"connections one user may hold ({DEFAULT_MAX_CLIENTS_PER_UID}); root and the "
        "daemon's own user are not limited per user",
    )
    p.add_argument(
        "--reserved-clients",
        type=int,
        metavar="N",
        help=f"slots on top of --max-clients that only root and the daemon's own user may take "
        f"({DEFAULT_RESERVED_CLIENTS}), so they get in while others fill the daemon",
    )
    p.add_argument(
        "--negotiation-timeout",
        type=float,
        metavar="SECONDS",
        help="a client that has not sent qmp_capabilities this long after connecting is told "
        f"so and disconnected ({DEFAULT_NEGOTIATION_TIMEOUT:g})",
    )
    p.add_argument(
        "--harvest-threads",
        type=int,
        metavar="N",
        help="threads one s390 harvest splits its chunks over (the usable CPUs, at most "
        f"{MAX_DEFAULT_THREADS}; 1 on a host whose guests keep every core busy); harvests of "
        "different VMs also run side by side",
    )
    p.add_argument("--version", action="version", version=f"dirtylogd {__version__}")
    return p


def load(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    flags = vars(build_parser().parse_args(argv))
    settings: dict[str, Any] = {}
    if "config" in flags:
        settings.update(_read_toml(flags.pop("config")))
    settings.update({k.replace("_", "-"): v for k, v in flags.items()})
    return _resolve(settings, env)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    problems = check_toml(data)
    if problems:
        raise ConfigError(f"config file {path}: " + "; ".join(problems))
    return data


# What a key's value must be in TOML, by the kind of its flag, as the error message says it.
EXPECTED = {
    "boolean": "true or false",
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "names": "a name, a number, or an array of them",
}


def toml_keys(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """Every key the config file takes, in the parser's order, with its kind (see EXPECTED).

    Derived from the flags, so a new flag is a new key; a flag of a kind this function does not
    know raises TypeError (a test builds the table), rather than going unchecked."""
    keys = {}
    for action in (parser or build_parser())._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if not action.option_strings or action.dest == "config":
            continue
        keys[action.dest.replace("_", "-")] = _kind(action)
    return keys


def _kind(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "boolean"
    if isinstance(action, argparse._AppendAction) and action.type is None:
        return "names"  # --allow-uid/--allow-gid: a user or group by name or number
    if isinstance(action, argparse._StoreAction) and action.type in (int, float, None):
        return {int: "integer", float: "number", None: "string"}[action.type]
    raise TypeError(f"{action.option_strings}: no TOML type for a flag of this kind")


def check_toml(data: dict[str, Any]) -> list[str]:
    """What is wrong with a config file's keys and the types of their values, one line each."""
    keys = toml_keys()
    problems = []
    unknown = [k for k in data if k not in keys]
    if unknown:
        hints = [
            f"'{k}' is spelled '{match[0]}'; "
            for k in unknown
            if (match := difflib.get_close_matches(k.replace("_", "-"), keys, n=1))
        ]
        problems.append(f"unknown keys {sorted(unknown)} ({''.join(hints)}known: {sorted(keys)})")
    for key, value in data.items():
        if key not in keys or _has_kind(value, keys[key]):
            continue
        given = describe(value)
        if keys[key] == "names" and isinstance(value, list):  # say which element is wrong
            bad = next(v for v in value if not _name_or_id(v))
            given = f"an array holding {describe(bad)}"
        problems.append(f"{key}: expected {EXPECTED[keys[key]]}, got {given}")
    return problems


def _has_kind(value: Any, kind: str) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "names":
        return all(map(_name_or_id, value)) if isinstance(value, list) else _name_or_id(value)
    if isinstance(value, bool):  # bool is an int to Python, never to TOML
        return False
    if kind == "integer":
        return isinstance(value, int)
    if kind == "number":
        return isinstance(value, int | float)
    return isinstance(value, str)


def _name_or_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def describe(value: Any) -> str:
    """A TOML value as a person reads it in an error: 'the string "false"', 'an array'."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the float {value}"
    if isinstance(value, str):
        return f"the string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return f"the date/time {value.isoformat()}"
    return type(value).__name__


def _resolve(s: dict[str, Any], env: dict[str, str]) -> Config:
    sock_default, runtime_default = default_paths(os.geteuid(), env)
    level = s.get("log-level", "info")
    if level not in LOG_LEVELS:
        raise ConfigError(f"log-level must be one of {LOG_LEVELS}, not {level!r}")
    config = Config(
        socket=str(s.get("socket", sock_default)),
        runtime_dir=str(s.get("runtime-dir", runtime_default)),
        state_dir=_optional_dir(s.get("state-dir", default_state_dir(os.geteuid(), env))),
        metrics_listen=parse_listen(str(s.get("metrics-listen", DEFAULT_METRICS_LISTEN))),
        allow_uid=[_uid(v) for v in _as_list(s.get("allow-uid", []), "allow-uid")],
        allow_gid=[_gid(v) for v in _as_list(s.get("allow-gid", []), "allow-gid")],
        demo=s.get("demo", False) is True,
        log_level=level,
        max_message_bytes=_positive(s.get("max-message-bytes", 1 << 20), "max-message-bytes"),
        max_reply_bytes=_positive(s.get("max-reply-bytes", 8 << 20), "max-reply-bytes"),
        max_clients=_positive(s.get("max-clients", 256), "max-clients"),
        # --- consumers per VM ---
        max_consumers=_positive(s.get("max-consumers", DEFAULT_MAX_CONSUMERS), "max-consumers"),
        negotiation_timeout=_seconds(
            s.get("negotiation-timeout", DEFAULT_NEGOTIATION_TIMEOUT), "negotiation-timeout"
        ),
        max_clients_per_uid=_positive(
            s.get("max-clients-per-uid", DEFAULT_MAX_CLIENTS_PER_UID), "max-clients-per-uid"
        ),
        reserved_clients=_at_least_zero(
            s.get("reserved-clients", DEFAULT_RESERVED_CLIENTS), "reserved-clients"
        ),
        harvest_threads=_positive(
            s.get("harvest-threads", default_harvest_threads()), "harvest-threads"
        ),
    )
    return config


def _optional_dir(value: Any) -> str | None:
    text = str(value)
    return None if text.lower() in ("", "none", "off") else text


def parse_listen(value: str) -> tuple[str, int] | None:
    """'HOST:PORT' (IPv6 as '[::1]:PORT'); 'none' or '' disables."""
    if value.lower() in ("", "none", "off"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics-listen must be HOST:PORT or 'none', not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _as_list(value: Any, key: str) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, str | int):
        return [value]
    raise ConfigError(f"{key} must be a name, a number or a list of them")


def _uid(value: Any) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    try:
        return pwd.getpwnam(str(value)).pw_uid
    except KeyError:
        raise ConfigError(f"allow-uid: no user named {value!r}") from None


def _gid(value: Any) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    try:
        return grp.getgrnam(str(value)).gr_gid
    except KeyError:
        raise ConfigError(f"allow-gid: no group named {value!r}") from None


def _positive(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, not {value!r}")
    return value


def _at_least_zero(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key} must be an integer of 0 or more, not {value!r}")
    return value


def _seconds(value: Any, key: str) -> float:
    """A positive, finite duration; TOML may give it as an integer or a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number of seconds, not {value!r}")
    if not 0 < value < math.inf:
        raise ConfigError(f"{key} must be more than 0 seconds and finite, not {value!r}")
    return float(value)


def configure_logging(level: str) -> None:
    """Log to stderr at ``level``; see :mod:`dirtylogd.ops.logs` for the format."""
    logs.configure(level)
