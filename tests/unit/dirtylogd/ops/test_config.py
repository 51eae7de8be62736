"""Configuration: per-user defaults, TOML with the flags' keys, flags win, clear errors."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dirtylogd.__main__ import main
from dirtylogd.ops import config as config_module
from dirtylogd.ops.config import (
    EXPECTED,
    ConfigError,
    build_parser,
    default_paths,
    load,
    parse_listen,
    toml_keys,
)

REPO = Path(__file__).resolve().parents[4]
EXAMPLE = REPO / "docs" / "dirtylogd.toml"


def test_default_paths_for_root_and_for_users():
    assert default_paths(0, {}) == ("/run/dirtylogd/qmp.sock", "/run/dirtylogd/ram")
    assert default_paths(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == (
        "/run/user/1000/dirtylogd/qmp.sock",
        "/run/user/1000/dirtylogd/ram",
    )
    assert default_paths(1000, {})[0] == "/tmp/dirtylogd-1000/dirtylogd/qmp.sock"


def test_metrics_default_to_loopback_8742():
    assert load([], env={}).metrics_listen == ("127.0.0.1", 8742)


def test_toml_then_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'socket = "/a.sock"\nlog-level = "debug"\nallow-uid = ["root", 7]\n'
        'metrics-listen = "[::1]:9999"\n'
    )
    c = load(["--config", str(cfg), "--socket", "/b.sock"], env={})
    assert c.socket == "/b.sock" and c.log_level == "debug"
    assert c.allow_uid == [0, 7] and c.metrics_listen == ("::1", 9999)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("nope = 1\n", "unknown keys ['nope']"),
        ('log-level = "loud"\n', "log-level must be one of"),
        ('metrics-listen = "localhost"\n', "metrics-listen must be HOST:PORT"),
        ('allow-gid = ["no-such-group-x"]\n', "no group named 'no-such-group-x'"),
        ("max-reply-bytes = 0\n", "max-reply-bytes must be a positive integer"),
        ("max-consumers = 0\n", "max-consumers must be a positive integer"),
        ("negotiation-timeout = 0\n", "negotiation-timeout must be more than 0 seconds"),
        ("negotiation-timeout = inf\n", "negotiation-timeout must be more than 0 seconds"),
        (
            'negotiation-timeout = "10"\n',
            'negotiation-timeout: expected a number, got the string "10"',
        ),
        ("max-clients-per-uid = 0\n", "max-clients-per-uid must be a positive integer"),
        ("reserved-clients = -1\n", "reserved-clients must be an integer of 0 or more"),
        ("socket = \n", "not valid TOML"),
    ],
)
def test_bad_settings_say_what_is_wrong(tmp_path, toml, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(["--config", str(cfg)], env={})


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(["--config", str(tmp_path / "absent.toml")], env={})


def test_listen_none_disables_metrics():
    assert parse_listen("none") is None and parse_listen("") is None


def test_consumers_per_vm_default_to_64_from_toml_or_flag(tmp_path):
    assert load([], env={}).max_consumers == 64
    cfg = tmp_path / "c.toml"
    cfg.write_text("max-consumers = 8\n")
    assert load(["--config", str(cfg)], env={}).max_consumers == 8
    assert load(["--config", str(cfg), "--max-consumers", "3"], env={}).max_consumers == 3


def test_slots_cannot_be_locked_up_by_default():
    """Idle connections are closed within 30 s; one user may not take every slot; the
    operator has slots of their own."""
    c = load([], env={})
    assert 0 < c.negotiation_timeout <= 30
    assert c.max_clients_per_uid < c.max_clients
    assert c.reserved_clients > 0


def test_connection_limits_from_toml_and_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("negotiation-timeout = 2\nmax-clients-per-uid = 5\nreserved-clients = 0\n")
    c = load(["--config", str(cfg), "--negotiation-timeout", "0.25"], env={})
    assert (c.negotiation_timeout, c.max_clients_per_uid, c.reserved_clients) == (0.25, 5, 0)


# --- types in the config file -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('demo = "false"\n', 'demo: expected true or false, got the string "false"'),
        ("demo = 1\n", "demo: expected true or false, got the integer 1"),
        ("socket = 12\n", "socket: expected a string, got the integer 12"),
        ("runtime-dir = true\n", "runtime-dir: expected a string, got the boolean true"),
        ('state-dir = ["/a"]\n', "state-dir: expected a string, got an array"),
        ("metrics-listen = 8742\n", "metrics-listen: expected a string, got the integer 8742"),
        ("log-level = 1\n", "log-level: expected a string, got the integer 1"),
        ('max-clients = "256"\n', 'max-clients: expected an integer, got the string "256"'),
        ("max-clients = 1.5\n", "max-clients: expected an integer, got the float 1.5"),
        ("max-consumers = true\n", "max-consumers: expected an integer, got the boolean true"),
        (
            "negotiation-timeout = false\n",
            "negotiation-timeout: expected a number, got the boolean",
        ),
        ("allow-uid = true\n", "allow-uid: expected a name, a number, or an array of them, got"),
        (
            "allow-gid = [0, false]\n",
            "allow-gid: expected a name, a number, or an array of them, "
            "got an array holding the boolean false",
        ),
        ('allow-gid = [["x"]]\n', "got an array holding an array"),
        ("socket = 1979-05-27\n", "socket: expected a string, got the date/time 1979-05-27"),
        ("[socket]\npath = 1\n", "socket: expected a string, got a table"),
        (
            "runtime_dir = '/x'\n",
            "unknown keys ['runtime_dir'] ('runtime_dir' is spelled 'runtime-dir'",
        ),
        ("config = 'other.toml'\n", "unknown keys ['config']"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key_the_type_and_the_value(tmp_path, toml, message):
    """No conversion: `demo = "false"` once turned the demo on, `socket = 12` became "12"."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as raised:
        load(["--config", str(cfg)], env={})
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"config file {cfg}: ")


def test_every_wrong_key_is_named_at_once(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('demo = "yes"\nnope = 1\nsocket = 12\n')
    with pytest.raises(ConfigError) as raised:
        load(["--config", str(cfg)], env={})
    text = str(raised.value)
    assert "unknown keys ['nope']" in text and "demo: expected" in text and "socket: " in text


def test_values_of_the_right_type_pass_as_they_are(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "demo = true\nnegotiation-timeout = 3\nallow-uid = 7\nallow-gid = [0, 'root']\n"
        "max-clients = 9\n"
    )
    c = load(["--config", str(cfg)], env={})
    assert (c.demo, c.negotiation_timeout, c.allow_uid, c.allow_gid) == (True, 3.0, [7], [0, 0])
    assert c.max_clients == 9


def test_every_flag_has_a_toml_type():
    """toml_keys() raises for a flag of a kind it cannot type: a new flag cannot go unchecked."""
    keys = toml_keys()
    assert set(keys.values()) <= set(EXPECTED)
    flags = {
        a.option_strings[-1].removeprefix("--")
        for a in build_parser()._actions
        if a.option_strings and a.dest not in ("help", "version", "config")
    }
    assert set(keys) == flags


def test_a_flag_of_an_unknown_kind_has_no_toml_type():
    parser = build_parser()
    parser.add_argument("--ratio", type=lambda text: float(text))
    with pytest.raises(TypeError, match="--ratio"):
        toml_keys(parser)


def test_a_bad_config_file_exits_2_and_starts_nothing(tmp_path, capsys):
    sock, vms, state = tmp_path / "q.sock", tmp_path / "vms", tmp_path / "state"
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'socket = "{sock}"\nruntime-dir = "{vms}"\nstate-dir = "{state}"\n'
        'metrics-listen = "none"\ndemo = "false"\n'
    )
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f'dirtylogd: config file {cfg}: demo: expected true or false, got the string "false"\n'
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


# --- the example config file ------------------------------------------------------------------
def uncommented(text: str) -> str:
    """The example with every commented-out key (``# key = value``) set."""
    return re.sub(r"(?m)^# ([a-z][a-z-]* = )", r"\1", text)


def test_the_example_config_has_every_key_in_the_parsers_order():
    keys = list(tomllib.loads(uncommented(EXAMPLE.read_text())))
    assert keys == list(toml_keys()), "docs/dirtylogd.toml and dirtylogd's flags differ"


def test_the_example_config_gives_the_defaults(tmp_path, monkeypatch):
    """Its values are the defaults as root: loaded through the real loader, nothing changes."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    # harvest-threads follows the CPUs: the example shows a host with eight or more.
    monkeypatch.setattr(config_module, "default_harvest_threads", lambda: 4)
    cfg = tmp_path / "dirtylogd.toml"
    cfg.write_text(uncommented(EXAMPLE.read_text()))
    assert load(["--config", str(cfg)], env={}) == load([], env={})


def test_the_example_config_as_shipped_changes_nothing():
    assert tomllib.loads(EXAMPLE.read_text()) == {}
    assert load(["--config", str(EXAMPLE)], env={}) == load([], env={})


# --- standard output that nobody reads --------------------------------------------------------
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_into_a_pipe_nobody_reads_are_quiet(flag):
    """`dirtylogd --help | head -1`: no traceback, no BrokenPipeError at exit."""
    r, w = os.pipe()
    os.close(r)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dirtylogd", flag],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(w)
    assert done.stderr == ""
    assert done.returncode == 0


def test_help_piped_to_head_prints_one_line_and_nothing_else():
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f'"{sys.executable}" -m dirtylogd --help | head -1'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("usage: dirtylogd ") and done.stdout.count("\n") == 1
