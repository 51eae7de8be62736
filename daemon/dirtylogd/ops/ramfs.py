"""Is the RAM directory memory? Guest RAM files on a disk file system get written back.

Simulated guest stores into a RAM file on ext4 cost ~30x those on tmpfs (the page cache's
writeback), and the writeback doubles the harvest's cost inside the daemon. statfs(2) names the
file system's type; tmpfs and hugetlbfs are memory. Python has no statfs, so libc's is called.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

TMPFS_MAGIC = 0x01021994  # linux/magic.h
HUGETLBFS_MAGIC = 0x958458F6
RAMFS_MAGIC = 0x858458F6
MEMORY = {TMPFS_MAGIC: "tmpfs", HUGETLBFS_MAGIC: "hugetlbfs", RAMFS_MAGIC: "ramfs"}


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


def disk_warning(runtime_dir: str) -> str | None:
    """None if ``runtime_dir`` is memory, else why that is slow and what to do."""
    magic = fs_type(runtime_dir)
    if magic in MEMORY:
        return None
    return (
        f"the RAM directory {runtime_dir} is not on tmpfs or hugetlbfs (file system type "
        f"{magic:#x}): guest RAM files there are written back to disk, which makes simulated "
        "stores and harvests many times slower; point --runtime-dir at a tmpfs"
    )
