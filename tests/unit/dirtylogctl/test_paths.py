"""The client finds the daemon where the daemon listens, without importing the server."""

import pytest

from dirtylogctl.paths import DEFAULT_SOCKET_RULE, SOCKET_ENV, default_socket, socket_path
from dirtylogd.ops.config import default_paths, load

ENVS = [
    {},
    {"XDG_RUNTIME_DIR": "/run/user/1000"},
    {"XDG_RUNTIME_DIR": ""},  # set but empty: the fallback, as an unset one
    {"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/u", "XDG_STATE_HOME": "/s"},
]


@pytest.mark.parametrize("euid", [0, 1000, 65534])
@pytest.mark.parametrize("env", ENVS)
def test_client_default_socket_agrees_with_the_daemons(euid, env):
    assert default_socket(euid, env) == default_paths(euid, env)[0]


@pytest.mark.parametrize("euid", [0, 1000])
def test_daemon_listens_where_the_client_looks_by_default(euid, monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: euid)
    env = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert load([], env=env).socket == default_socket(euid, env)


def test_dirtylogd_socket_overrides_the_default():
    assert socket_path(1000, {SOCKET_ENV: "/x/q.sock"}) == "/x/q.sock"
    assert socket_path(0, {SOCKET_ENV: ""}) == "/run/dirtylogd/qmp.sock"


def test_the_documented_rule_is_the_rule():
    """The man page's words for every user's default (DEFAULT_SOCKET_RULE) name the paths."""
    assert DEFAULT_SOCKET_RULE.startswith(f"{default_socket(0, {})} as root, ")
    user = default_socket(1000, {"XDG_RUNTIME_DIR": "$XDG_RUNTIME_DIR"})
    assert f"{user} as another user" in DEFAULT_SOCKET_RULE
    fallback = default_socket(1000, {}).replace("1000", "UID")
    assert f"({fallback} without $XDG_RUNTIME_DIR)" in DEFAULT_SOCKET_RULE
