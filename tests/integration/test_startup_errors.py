"""A daemon that cannot start says what it could not have and which flag chooses another."""

import socket
import subprocess
import sys


def start(tmp_path, *flags):
    args = [sys.executable, "-m", "dirtylogd", "--socket", str(tmp_path / "q.sock")]
    args += ["--runtime-dir", str(tmp_path / "vms"), *flags]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def test_a_metrics_port_in_use_names_the_address_and_the_flag(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = start(tmp_path, "--state-dir", "none", "--metrics-listen", f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert f"cannot use 127.0.0.1:{port} for metrics: Address already in use (EADDRINUSE)" in (
        r.stderr
    )
    assert "choose another with --metrics-listen HOST:PORT, or 'none'" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_unusable_state_directory_names_the_flag(tmp_path):
    # What a user without $XDG_RUNTIME_DIR whose $HOME is not theirs meets (EACCES there);
    # a path under a plain file fails the same way for root too (ENOTDIR).
    (tmp_path / "file").write_text("")
    r = start(tmp_path, "--state-dir", str(tmp_path / "file" / "state"), "--metrics-listen", "none")
    assert r.returncode == 1
    assert f"cannot use the state directory {tmp_path}/file/state: Not a directory (ENOTDIR)" in (
        r.stderr
    )
    assert "choose another with --state-dir (or 'none')" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_unusable_socket_path_names_the_flag(tmp_path):
    (tmp_path / "file").write_text("")
    args = [sys.executable, "-m", "dirtylogd", "--socket", str(tmp_path / "file" / "q.sock")]
    args += ["--runtime-dir", str(tmp_path / "vms"), "--state-dir", "none"]
    r = subprocess.run(
        [*args, "--metrics-listen", "none"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 1
    assert "cannot use the socket" in r.stderr and "choose another with --socket PATH" in r.stderr
