"""Why dirtylogctl could not talk to dirtylogd, said so that the user knows what to do next.

qemu.qmp reports every failure to connect as one ConnectError around a root cause. The causes
a user meets, and what each needs:

* ENOENT / ECONNREFUSED: nothing listens there — start the daemon, or point at its socket.
* EACCES: the socket's file mode keeps the user out; even once let in, the daemon itself admits
  only root, its own user and ``--allow-uid``/``--allow-gid`` — so both are named.
* The daemon answered with an error instead of a greeting: it refused this peer (or has too
  many clients) and said why. qemu.qmp keeps only "did not understand the greeting", so the
  reason is read again on a plain socket (:func:`daemon_refusal`); the daemon logs that second
  refusal too.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import socket
import stat

from dirtylogctl.paths import SOCKET_ENV

PROBE_SECONDS = 5.0


def root_cause(exc: BaseException) -> BaseException:
    """The innermost ``exc`` attribute of qemu.qmp's wrapping errors (ConnectError etc.)."""
    seen = 0
    while isinstance(getattr(exc, "exc", None), BaseException) and seen < 8:
        exc = exc.exc  # type: ignore[attr-defined]
        seen += 1
    return exc


def explain(path: str, exc: BaseException, timeout: float) -> str:
    """One line for a failed connection to ``path``: what happened and what to do next."""
    prefix = f"cannot talk to dirtylogd at {path}"
    cause = root_cause(exc)
    if isinstance(cause, OSError) and cause.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return (
            f"{prefix}: {cause.strerror}; is dirtylogd running? (start it with `dirtylogd`, "
            f"or give its socket with ${SOCKET_ENV} or -s)"
        )
    if isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM):
        return f"{prefix}: {cause.strerror}; {permissions(path)}"
    if isinstance(exc, TimeoutError) or isinstance(cause, TimeoutError):
        return f"{prefix}: no answer within {timeout:g} s (is the daemon stuck? see --timeout)"
    refusal = daemon_refusal(path, min(timeout, PROBE_SECONDS))
    if refusal is not None:
        return f"dirtylogd at {path} refused this client: {refusal}"
    return f"{prefix}: {exc}"


def permissions(path: str) -> str:
    """Who may open the socket and who the daemon admits, beside who the user is."""
    me = f"uid {os.getuid()}"
    needs = (
        "To connect, the file mode must let you in (e.g. join the group) and the daemon must "
        "admit you: it admits root, its own user and those given --allow-uid/--allow-gid"
    )
    try:
        st = os.stat(path)
    except OSError:
        return f"a directory above the socket is not searchable by {me}. {needs}"
    owner, group = _user(st.st_uid), _group(st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    member = st.st_gid == os.getgid() or st.st_gid in os.getgroups()
    return (
        f"the socket is owner {owner}, group {group}, mode {mode:04o} and {me} is "
        f"{'' if member else 'not '}in group {group}. {needs}"
    )


def daemon_refusal(path: str, timeout: float) -> str | None:
    """The desc of an error the daemon sends in place of its greeting, if it sends one."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            line = b""
            while b"\n" not in line and len(line) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                line += chunk
    except OSError:
        return None
    try:
        message = json.loads(line.split(b"\n", 1)[0])
        desc = message["error"]["desc"]
    except (ValueError, TypeError, KeyError):
        return None
    return desc if isinstance(desc, str) else None


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
