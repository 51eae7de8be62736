"""Where the client looks for the daemon's socket: a documented contract, computed here.

The daemon's defaults (:func:`dirtylogd.ops.config.default_paths`) and these must agree; a test
checks it. The client does not import the server to find out: the two may be installed apart.

    $DIRTYLOGD_SOCKET                       if set
    /run/dirtylogd/qmp.sock                 as root
    $XDG_RUNTIME_DIR/dirtylogd/qmp.sock     as any other user
    /tmp/dirtylogd-<uid>/dirtylogd/qmp.sock without $XDG_RUNTIME_DIR
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SOCKET_ENV = "DIRTYLOGD_SOCKET"
# The default for every user, as the man page says it (--help names the running user's).
DEFAULT_SOCKET_RULE = (
    "/run/dirtylogd/qmp.sock as root, $XDG_RUNTIME_DIR/dirtylogd/qmp.sock as another user "
    "(/tmp/dirtylogd-UID/dirtylogd/qmp.sock without $XDG_RUNTIME_DIR)"
)


def default_socket(euid: int, env: Mapping[str, str]) -> str:
    """The socket the daemon listens on by default for ``euid`` (ignoring $DIRTYLOGD_SOCKET)."""
    if euid == 0:
        base = "/run/dirtylogd"
    else:
        base = os.path.join(env.get("XDG_RUNTIME_DIR") or f"/tmp/dirtylogd-{euid}", "dirtylogd")
    return os.path.join(base, "qmp.sock")


def socket_path(euid: int, env: Mapping[str, str]) -> str:
    """$DIRTYLOGD_SOCKET if set, else :func:`default_socket`."""
    return env.get(SOCKET_ENV) or default_socket(euid, env)
