"""The RAM-directory check against real file systems: a tmpfs this test mounts, and the disk."""

import os
import subprocess

import pytest

from dirtylogd.ops import ramfs


def test_a_tmpfs_is_memory_and_a_missing_subfolder_is_judged_by_its_parent(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "t", str(tmp_path)], check=True)
    try:
        assert ramfs.fs_type(str(tmp_path)) == ramfs.TMPFS_MAGIC
        assert ramfs.disk_warning(str(tmp_path / "not" / "yet")) is None
    finally:
        subprocess.run(["umount", str(tmp_path)], check=True)


def test_a_disk_file_system_gets_a_warning_naming_the_flag(tmp_path):
    if ramfs.fs_type(str(tmp_path)) in ramfs.MEMORY:
        pytest.skip(f"{tmp_path} is memory here")
    warning = ramfs.disk_warning(str(tmp_path / "vms"))
    assert warning is not None and "--runtime-dir" in warning and str(tmp_path) in warning
