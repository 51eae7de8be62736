"""Directory locks: one holder, named with its pid; released with the descriptor; a directory
named twice is locked once."""

import os

import pytest

from dirtylogd.ops.instance import DirectoryInUse, holding, lock_directory


def test_a_locked_directory_is_refused_naming_it_and_the_holders_pid(tmp_path):
    fd = lock_directory(str(tmp_path / "state"), "state directory")
    try:
        assert (tmp_path / "state" / "dirtylogd.lock").read_text() == f"{os.getpid()}\n"
        # flock conflicts between two opens of the file, even within one process.
        with pytest.raises(DirectoryInUse) as refused:
            lock_directory(str(tmp_path / "state"), "state directory")
        assert str(refused.value).startswith(
            f"the state directory {tmp_path}/state is in use by another dirtylogd "
            f"(pid {os.getpid()}), which holds {tmp_path}/state/dirtylogd.lock"
        )
    finally:
        os.close(fd)
    os.close(lock_directory(str(tmp_path / "state"), "state directory"))  # released with it


def test_holding_locks_each_directory_once_and_releases_them_all(tmp_path):
    same = str(tmp_path / "both")
    both = [(same, "state directory"), (same + "/", "runtime directory")]
    again = [(same, "state directory")]
    with holding(both), pytest.raises(DirectoryInUse):  # no conflict with itself, but held
        lock_directory(same, "runtime directory")
    with holding(again):
        pass


def test_a_failed_lock_releases_the_ones_already_taken(tmp_path):
    state, vms = str(tmp_path / "state"), str(tmp_path / "vms")
    taken = lock_directory(vms, "runtime directory")
    try:
        both = holding([(state, "state directory"), (vms, "runtime directory")])
        with pytest.raises(DirectoryInUse, match="runtime directory"), both:
            pass  # pragma: no cover - the runtime directory is taken
        with holding([(state, "state directory")]):
            pass  # the state directory's lock went when the runtime directory's failed
    finally:
        os.close(taken)
