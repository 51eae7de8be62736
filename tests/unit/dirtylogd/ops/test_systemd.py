"""sd_notify and the watchdog on real datagram sockets (socket activation: integration)."""

import os
import socket

from dirtylogd.ops import systemd


def test_notify_reaches_a_path_socket(tmp_path):
    path = str(tmp_path / "n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(path)
        assert systemd.notify("READY=1", "STATUS=ok", env={"NOTIFY_SOCKET": path})
        assert sink.recv(100) == b"READY=1\nSTATUS=ok"


def test_notify_reaches_an_abstract_socket():
    name = f"dirtylogd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind("\0" + name)
        assert systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sink.recv(100) == b"WATCHDOG=1"


def test_without_a_manager_notify_is_a_no_op():
    assert systemd.notify("READY=1", env={}) is False


def test_watchdog_interval_is_half_the_timeout_and_only_for_us():
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert (
        systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
        == 15.0
    )
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({}) is None


def test_listen_fds_for_another_pid_are_ignored():
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert systemd.listen_socket(env) is None
