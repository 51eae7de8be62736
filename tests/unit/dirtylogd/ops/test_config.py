"""Configuration: per-user defaults, TOML with the flags' keys, flags win, clear errors."""

import pytest

from dirtylogd.ops.config import ConfigError, default_paths, load, parse_listen


def test_default_paths_for_root_and_for_users():
    assert default_paths(0, {}) == ("/run/dirtylogd/qmp.sock", "/run/dirtylogd/vms")
    assert default_paths(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == (
        "/run/user/1000/dirtylogd/qmp.sock",
        "/run/user/1000/dirtylogd/vms",
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
        ('negotiation-timeout = "10"\n', "negotiation-timeout must be a number of seconds"),
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
