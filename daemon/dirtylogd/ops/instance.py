"""One daemon per directory: the state and runtime directories are locked for the process's life.

Two daemons restoring the same VM records onto the same RAM files would run two sets of vCPUs
over one guest memory and save two different ideas of every consumer's pending bits: a dirty
page could be lost with neither noticing. So, before any VM is restored, the daemon takes an
exclusive ``flock`` on ``dirtylogd.lock`` in each directory and keeps it until it exits; a second
daemon is refused with the directory and the holder's pid (written into the file).

flock belongs to the open file, and the kernel drops it however the holder ends — SIGKILL
included — so a killed daemon leaves no stale lock behind: the file stays, the lock does not.
The descriptor is close-on-exec, so no child could keep it alive.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterable, Iterator

LOCK_NAME = "dirtylogd.lock"


class DirectoryInUse(Exception):
    """Another process holds the lock of a directory this daemon needs for itself."""


class StartupError(Exception):
    """Something the daemon needs at start cannot be had; the text names the flag to change."""


# The flag that chooses each directory, for errors that must say what to do next.
FLAGS = {"state directory": "--state-dir", "runtime directory": "--runtime-dir"}


def unusable(what: str, exc: OSError, flag: str) -> StartupError:
    """'cannot use the state directory X: Permission denied (EACCES); choose another with ...'"""
    name = errno.errorcode.get(exc.errno or 0, "")
    return StartupError(
        f"cannot use {what}: {exc.strerror or exc}{f' ({name})' if name else ''}; "
        f"choose another with {flag}"
    )


def lock_directory(directory: str, role: str) -> int:
    """Lock ``directory`` (created 0750 if missing) for this process; the descriptor holds it."""
    os.makedirs(directory, mode=0o750, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise DirectoryInUse(
            f"the {role} {directory} is in use by another dirtylogd{holder}, which holds "
            f"{path}: two daemons must not restore the same VMs onto the same RAM files; stop "
            "it first, or give this one other directories"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """' (pid N)' from the lock file, or '' if the holder has not written it yet."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f" (pid {text})" if text.isdigit() else ""


@contextlib.contextmanager
def holding(directories: Iterable[tuple[str, str]]) -> Iterator[None]:
    """Lock every (directory, role) for the duration; a directory named twice is locked once
    (flock would refuse this process its own second lock)."""
    roles: dict[str, tuple[str, list[str]]] = {}
    for directory, role in directories:
        try:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        except OSError as exc:
            flag = FLAGS.get(role, "its flag")
            hint = f"{flag} (or 'none')" if flag == "--state-dir" else flag
            raise unusable(f"the {role} {directory}", exc, hint) from None
        real = os.path.realpath(directory)
        roles.setdefault(real, (directory, []))[1].append(role)
    with contextlib.ExitStack() as held:
        for directory, named in roles.values():
            held.callback(os.close, lock_directory(directory, " and ".join(named)))
        yield
