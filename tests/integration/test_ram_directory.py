"""The RAM-directory check in the real daemon: a disk file system is warned about at start,
naming the flag, on a terminal and in the journal, whatever the log level; memory is not."""

import os
import tempfile
from pathlib import Path

import pytest

from dirtylogd.ops import ramfs
from tests.integration.daemon_proc import Daemon

WARNING = "not memory"


def started(tmp_path: Path, *extra: str, env: dict | None = None) -> str:
    """The daemon's whole output, start to a clean stop (exit 0): read after the stop, since
    the socket can be there a moment before the line that says so is written."""
    daemon = Daemon(tmp_path, *extra, metrics=False, env=env)
    assert daemon.stop() == 0
    return daemon.output_after_stop()


def on_disk(tmp_path: Path) -> Path:
    if ramfs.fs_type(str(tmp_path)) in ramfs.MEMORY:
        pytest.skip(f"{tmp_path} is memory here: no disk file system to test with")
    return tmp_path


@pytest.fixture
def shm_dir():
    if not os.path.isdir("/dev/shm") or ramfs.fs_type("/dev/shm") != ramfs.TMPFS_MAGIC:
        pytest.skip("/dev/shm is not a tmpfs here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        yield Path(tmp)


def test_a_ram_directory_on_a_disk_file_system_is_warned_at_start_naming_the_flag(tmp_path):
    output = started(on_disk(tmp_path))  # the daemon's --runtime-dir is tmp_path/vms
    lines = [line for line in output.splitlines() if WARNING in line]
    assert len(lines) == 1, output
    assert " WARNING " in lines[0] and "--runtime-dir" in lines[0]
    disk = ramfs.fs_name(ramfs.fs_type(str(tmp_path)))
    assert f"RAM directory {tmp_path / 'vms'} is on {disk}, not memory" in lines[0]
    assert "/dev/shm" in lines[0]


def test_the_warning_has_the_journal_warning_priority_under_systemd(tmp_path):
    on_disk(tmp_path)
    log = tmp_path / "daemon.log"  # the file Daemon sends stderr to: it keeps this inode
    log.touch()
    st = log.stat()
    output = started(tmp_path, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    lines = [line for line in output.splitlines() if WARNING in line]
    assert len(lines) == 1 and lines[0].startswith("<4>dirtylogd"), output


def test_a_log_level_above_warning_does_not_silence_it(tmp_path):
    output = started(on_disk(tmp_path), "--log-level", "error")
    lines = [line for line in output.splitlines() if WARNING in line]
    assert len(lines) == 1 and "--runtime-dir" in lines[0], output


def test_a_ram_directory_on_tmpfs_gets_no_warning(tmp_path, shm_dir):
    output = started(tmp_path, "--runtime-dir", str(shm_dir / "vms"))
    assert "RAM directory" not in output, output
    assert "listening on" in output
