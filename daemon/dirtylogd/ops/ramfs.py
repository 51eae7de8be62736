"""Is the RAM directory memory? Guest RAM files on a disk file system get written back.

Simulated guest stores into a RAM file on ext4 cost ~30x those on tmpfs (the page cache's
writeback), and the writeback doubles the harvest's cost inside the daemon. statfs(2) names the
file system's type; tmpfs, hugetlbfs and ramfs are memory. Python has no statfs, so libc's is
called. The daemon still starts on a disk (a test box may have nothing else), but never silently:
the warning is logged at start whatever ``--log-level`` says, with the journal's warning
priority under systemd (see :func:`warn_if_disk`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from dirtylogd.ops import logs

TMPFS_MAGIC = 0x01021994  # linux/magic.h
HUGETLBFS_MAGIC = 0x958458F6
RAMFS_MAGIC = 0x858458F6
MEMORY = {TMPFS_MAGIC: "tmpfs", HUGETLBFS_MAGIC: "hugetlbfs", RAMFS_MAGIC: "ramfs"}
# Disk (and network) file systems a RAM directory is likely to land on, for the message.
DISKS = {
    0xEF53: "ext4",  # also ext2/ext3: one magic
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x794C7630: "overlayfs",
    0x6969: "nfs",
    0xF2F52010: "f2fs",
    0x2FC12FC1: "zfs",
}


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type first; the rest is room the call fills.
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]


def fs_type(path: str) -> int:
    """The f_type of the file system holding ``path`` (its nearest existing ancestor)."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(buf.f_type) & 0xFFFFFFFF


def fs_name(magic: int) -> str:
    """A file system's name from its statfs magic, or the magic in hex."""
    return MEMORY.get(magic) or DISKS.get(magic) or f"type {magic:#x}"


def disk_warning(runtime_dir: str) -> str | None:
    """None if ``runtime_dir`` is memory, else why that is slow and what to do."""
    try:
        magic = fs_type(runtime_dir)
    except OSError as exc:
        return (
            f"cannot tell whether the RAM directory {runtime_dir} is memory (statfs: "
            f"{exc.strerror}); guest RAM must be on tmpfs, hugetlbfs or ramfs "
            "(--runtime-dir DIR)"
        )
    if magic in MEMORY:
        return None
    return (
        f"the RAM directory {runtime_dir} is on {fs_name(magic)}, not memory: guest RAM "
        "files there are written back to disk, which makes guest stores ~30x and harvests "
        "~2x slower; point --runtime-dir (runtime-dir in the config file) at a tmpfs, "
        "hugetlbfs or ramfs, such as a directory in /dev/shm"
    )


def warn_if_disk(runtime_dir: str, log: logging.Logger) -> str | None:
    """Warn at start if ``runtime_dir`` is not memory; the warning returned, or None.

    Logged as a warning, which the journal keeps at priority 4; a ``--log-level`` above
    warning would drop it, so then it goes to stderr directly: never silent."""
    warning = disk_warning(runtime_dir)
    if warning is None:
        return None
    if log.isEnabledFor(logging.WARNING):
        log.warning("%s", warning)
    else:
        logs.print_warning(warning)
    return warning
