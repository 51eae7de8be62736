"""systemd integration without libsystemd: sd_notify, the watchdog, socket activation.

* ``notify`` sends ``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1`` datagrams to
  $NOTIFY_SOCKET (an abstract socket when it starts with '@').
* The watchdog ping is sent from the event loop itself, so a loop that stops turning stops
  pinging and systemd restarts the service.
* ``listen_socket`` takes the listening socket systemd passed (LISTEN_PID/LISTEN_FDS, fd 3).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)
SD_LISTEN_FDS_START = 3


def notify(*assignments: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``KEY=value`` lines to the service manager; False when not run under one."""
    environ: Mapping[str, str] = os.environ if env is None else env
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(assignments).encode(), address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", environ.get("NOTIFY_SOCKET"), exc)
            return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Half of WATCHDOG_USEC in seconds, if the watchdog is meant for this process."""
    environ: Mapping[str, str] = os.environ if env is None else env
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2 / 1e6


async def watchdog(interval: float) -> None:
    """Ping from the event loop; if the loop stalls, the pings stop."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def listen_socket(env: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The AF_UNIX stream socket passed by socket activation, or None.

    The LISTEN_* variables are removed from ``env`` (default: this process's environment)."""
    environ: MutableMapping[str, str] = os.environ if env is None else env
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(environ.get("LISTEN_FDS", "0"))
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)  # not for our children
    if count < 1:
        return None
    if count > 1:
        log.warning("socket activation passed %d sockets; using the first", count)
    fd = SD_LISTEN_FDS_START
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise RuntimeError("LISTEN_FDS: descriptor 3 is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise RuntimeError("LISTEN_FDS: descriptor 3 is not a unix stream socket")
    os.set_inheritable(fd, False)
    return sock
