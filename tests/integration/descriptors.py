"""Descriptors of every kind a client might pass with SCM_RIGHTS, for the catalogue and the fuzzer.

Only a regular file or memfd open for writing, without O_APPEND or write seals, can take a
bitmap; every other kind must be refused before anything is harvested.
"""

import fcntl
import os
import socket
from pathlib import Path

# kind -> whether a dirty-log-get with encoding 'fd' can write into it
KINDS = {
    "memfd": True,
    "file": True,  # a regular file, O_RDWR
    "readonly": False,  # a regular file, O_RDONLY
    "append": False,  # a regular file, O_RDWR | O_APPEND
    "sealed": False,  # a memfd sealed against writing
    "pipe": False,  # the write end of a pipe
    "socket": False,  # one end of a unix socket pair
    "devnull": False,  # /dev/null, a character device open for writing
}


def open_descriptor(kind: str, directory: Path) -> int:
    """A new descriptor of ``kind`` (files are made in ``directory``); the caller closes it."""
    if kind == "memfd":
        return os.memfd_create("bm")
    if kind == "sealed":
        fd = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        return fd
    if kind in ("file", "readonly", "append"):
        flags = {"file": os.O_RDWR, "readonly": os.O_RDONLY, "append": os.O_RDWR | os.O_APPEND}
        return os.open(directory / f"{kind}.bin", flags[kind] | os.O_CREAT, 0o600)
    if kind == "pipe":
        read_end, write_end = os.pipe()
        os.close(read_end)
        return write_end
    if kind == "socket":
        one, other = socket.socketpair()
        fd = one.detach()
        other.close()
        return fd
    if kind == "devnull":
        return os.open(os.devnull, os.O_WRONLY)
    raise ValueError(f"no descriptor kind {kind!r}")
