"""A file system that is (nearly) full, for tests of what happens when a write does not fit.

A tmpfs is mounted for the test and unmounted whatever happens; tests run as root in CI.
"""

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import need


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``path``, unmounted whatever happens."""
    need(os.geteuid() == 0, "mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    done = subprocess.run(mount, capture_output=True, text=True)
    need(done.returncode == 0, f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_leaving(fs: Path, free: int) -> None:
    """Fill the file system at ``fs`` until only ``free`` bytes are left."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = bytes(4096)
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        os.ftruncate(fd, os.fstat(fd).st_size - free)
    finally:
        os.close(fd)
