"""FdRegistry: every descriptor handed to it is held or closed, even when a close fails."""

import os

from dirtylogd.qmp.fds import FdRegistry


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_every_descriptor_is_held_or_closed_even_when_one_close_fails():
    r, w = os.pipe()
    spare_r, spare_w = os.pipe()
    os.close(spare_r)  # a number whose close fails (EBADF), as close on a network file can
    registry = FdRegistry(max_held=1)
    assert registry.hold([r, spare_r, w]) == 2
    assert is_open(r) and not is_open(w)  # the one past the failing close was closed too
    registry.close_all()
    assert not is_open(r)
    os.close(spare_w)
