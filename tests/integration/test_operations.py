"""Running the daemon for real: qmp-shell, promtool, systemd units, activation, notify, signals."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dirtylogd import __version__
from dirtylogd.ops import install
from tests.conftest import need, need_tool

from .daemon_proc import Daemon, Qmp

MiB = 1 << 20


def test_qmp_shell_runs_a_command(daemon):
    shell = need_tool("qmp-shell")
    out = subprocess.run(
        [shell, daemon.socket], input="query-version\n", capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert '"package": "dirtylogd' in out.stdout
    # qmp-shell's banner reads the greeting's "qemu" member: dirtylogd's own version numbers.
    assert f"Connected to QEMU {__version__}\n" in out.stdout


def test_metrics_pass_promtool_check(daemon, qmp):
    promtool, curl = need_tool("promtool"), need_tool("curl")
    qmp("vm-create", name="metrics", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
    qmp("sim-write-pages", vm="metrics", gfns=[1, 2], value=1)
    qmp("io-dirty-mark", vm="metrics", ranges=[{"guest-phys-addr": 0, "length": 1}])
    qmp("dirty-log-get", vm="metrics", slot=0)
    out = subprocess.run(
        f"{curl} -sf {daemon.metrics_url} | {promtool} check metrics",
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out
    text = daemon.metrics()
    assert 'dirtylogd_dirty_pages_total{source="uc",vm="metrics"} 2.0' in text
    assert 'dirtylogd_dirty_pages_total{source="io",vm="metrics"} 1.0' in text
    assert 'dirtylogd_qmp_requests_total{command="dirty-log-get",result="ok"}' in text
    assert "dirtylogd_harvest_duration_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text
    qmp("vm-remove", vm="metrics")


def test_metrics_have_every_standard_process_series(daemon):
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
        "process_max_fds",
    ):
        assert daemon.metric(name) > 0, name
    assert time.time() - 600 < daemon.metric("process_start_time_seconds") < time.time()


def test_process_series_survive_proc_subset_pid(tmp_path):
    """The real daemon in a procfs mounted as ProcSubset=pid mounts it: no /proc/stat."""
    unshare = need_tool("unshare")
    probe = subprocess.run(
        [unshare, "-m", "sh", "-c", "mount -t proc -o subset=pid proc /proc"],
        capture_output=True,
        timeout=30,
    )
    need(probe.returncode == 0, f"cannot mount a subset=pid procfs here: {probe.stderr!r}")
    remount = 'mount -t proc -o subset=pid proc /proc && test ! -e /proc/stat && exec "$@"'
    wrapper = (unshare, "-m", "sh", "-c", remount, "sh")  # exec: the daemon gets SIGTERM
    d = Daemon(tmp_path, wrapper=wrapper)
    try:
        for name in ("process_resident_memory_bytes", "process_start_time_seconds"):
            assert d.metric(name) > 0, name
        assert "process_cpu_seconds_total" in d.metrics()
        assert abs(d.metric("process_start_time_seconds") - time.time()) < 600
    finally:
        assert d.stop() == 0, d.output_after_stop()


def _journal_stream(path: Path) -> dict[str, str]:
    """JOURNAL_STREAM naming ``path``, as systemd sets it for a stderr connected to journald."""
    st = os.stat(path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_on_a_journal_stream_every_record_is_one_line_with_its_priority(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "failed.log"
        with open(log, "w") as out:
            r = subprocess.run(
                [
                    *(sys.executable, "-m", "dirtylogd", "--socket", str(tmp_path / "q.sock")),
                    *("--runtime-dir", str(tmp_path / "vms"), "--state-dir", "none"),
                    *("--metrics-listen", f"127.0.0.1:{port}"),
                ],
                stdout=out,
                stderr=out,
                env={**os.environ, **_journal_stream(log)},
                timeout=30,
            )
    assert r.returncode == 1
    errors = [line for line in log.read_text().splitlines() if line.startswith("<3>")]
    assert len(errors) == 1, log.read_text()
    assert f"cannot use 127.0.0.1:{port} for metrics" in errors[0]

    (tmp_path / "d").mkdir()
    log = tmp_path / "d" / "daemon.log"  # Daemon reopens it in place: same inode
    log.touch()
    d = Daemon(tmp_path / "d", env=_journal_stream(log))
    assert d.stop() == 0
    lines = d.output_after_stop().splitlines()
    assert lines and all(re.match(r"<[2-7]>dirtylogd", line) for line in lines), lines
    assert any(line.startswith("<6>") and "listening on" in line for line in lines), lines


def test_a_bad_setting_reaches_the_journal_as_an_error(tmp_path):
    """A config error comes before logging is set up; under a unit it must still be priority 3."""
    log = tmp_path / "bad.log"
    log.touch()
    with open(log, "w") as out:
        r = subprocess.run(
            [sys.executable, "-m", "dirtylogd", "--metrics-listen", "nowhere"],
            stdout=out,
            stderr=out,
            env={**os.environ, **_journal_stream(log)},
            timeout=30,
        )
    assert r.returncode == 2
    (line,) = log.read_text().splitlines()
    assert line.startswith("<3>dirtylogd: ") and "metrics" in line, line


def test_by_hand_log_lines_start_with_a_timestamp(fresh_daemon):
    d = fresh_daemon()
    assert d.stop() == 0  # read after the stop: the socket can precede its log line
    lines = d.output_after_stop().splitlines()
    # The first may be the warning that the RAM directory (under /tmp here) is not memory.
    assert lines and all(
        re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (INFO|WARNING) dirtylogd", line)
        for line in lines
    ), lines


def _units(tmp_path: Path) -> Path:
    """The shipped units as dirtylogd-install-units writes them for the dirtylogd installed
    here (--root: a staging tree); the folder they are in."""
    exe = shutil.which("dirtylogd")
    need(exe is not None, "dirtylogd is not installed on PATH")
    assert install.main(["--root", str(tmp_path), "--executable", str(exe)]) == 0
    return tmp_path / "etc" / "systemd" / "system"


def test_systemd_analyze_verify_is_silent(tmp_path):
    analyze = need_tool("systemd-analyze")
    units = _units(tmp_path)
    out = subprocess.run(
        [analyze, "verify", "dirtylogd.service", "dirtylogd.socket", "run-dirtylogd-ram.mount"],
        cwd=units,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out


def test_systemd_security_exposure_is_at_most_2_5(tmp_path):
    analyze = need_tool("systemd-analyze")
    units = _units(tmp_path)
    out = subprocess.run(
        [analyze, "security", "--offline=yes", "dirtylogd.service"],
        cwd=units,
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for dirtylogd\.service: ([\d.]+)", out.stdout)
    assert m, out.stdout + out.stderr
    print(f"\nsystemd-analyze security --offline=yes: exposure {m.group(1)}")
    assert float(m.group(1)) <= 2.5


def test_socket_activation_starts_the_daemon_on_first_connect(tmp_path):
    activate = need_tool("systemd-socket-activate")
    sock = str(tmp_path / "activated.sock")
    proc = subprocess.Popen(
        [
            activate,
            "-l",
            sock,
            sys.executable,
            "-m",
            "dirtylogd",
            "--runtime-dir",
            str(tmp_path / "vms"),
            "--state-dir",
            str(tmp_path / "state"),
            "--metrics-listen",
            "none",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        with Qmp(sock) as q:  # the first connection starts dirtylogd with LISTEN_FDS=1
            assert q("query-version")["package"].startswith("dirtylogd")
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, output
    assert f"listening on {sock} (from systemd)" in output, output


def test_a_socket_activated_daemon_still_has_its_directories_to_itself(tmp_path):
    """The inherited socket is not probed (it is ours), but the state directory is locked."""
    activate = need_tool("systemd-socket-activate")
    sock, state = str(tmp_path / "activated.sock"), str(tmp_path / "state")
    daemon = [sys.executable, "-m", "dirtylogd", "--state-dir", state, "--metrics-listen", "none"]
    # systemd-socket-activate passes no environment of its own accord: keep the import path.
    keep = ["-E", "PYTHONPATH"] if "PYTHONPATH" in os.environ else []
    proc = subprocess.Popen(
        [activate, *keep, "-l", sock, *daemon, "--runtime-dir", str(tmp_path / "vms")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        with Qmp(sock) as q:
            assert q("query-version")["package"].startswith("dirtylogd")
            holder = Path(state, "dirtylogd.lock").read_text().strip()
            elsewhere = ["--socket", f"{tmp_path}/other.sock", "--runtime-dir", f"{tmp_path}/x"]
            second = subprocess.run(
                [*daemon, *elsewhere],
                capture_output=True,
                text=True,
                timeout=10,
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, output
    assert second.returncode == 1, second.stderr
    assert f"the state directory {state} is in use by another dirtylogd (pid {holder})" in (
        second.stderr
    )


def test_ready_status_watchdog_and_stopping_reach_the_notify_socket(tmp_path):
    notify_path = str(tmp_path / "notify")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(notify_path)
    sink.settimeout(10)
    d = Daemon(
        tmp_path, metrics=False, env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"}
    )
    seen: list[str] = []
    try:
        while seen.count("WATCHDOG=1") < 3:
            seen += sink.recv(4096).decode().split("\n")
        assert "READY=1" in seen
        assert any(s.startswith("STATUS=serving QMP on") for s in seen)
    finally:
        assert d.stop() == 0
    while "STOPPING=1" not in seen:
        seen += sink.recv(4096).decode().split("\n")
    sink.close()


def test_without_a_state_dir_sigterm_removes_the_socket_and_the_ram_files(fresh_daemon):
    d = fresh_daemon("--state-dir", "none", metrics=False)
    with d.client() as q:
        q("vm-create", name="gone", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
        ram = next(v for v in q("query-vms") if v["name"] == "gone")["ram-path"]
    assert os.path.exists(ram)
    assert d.stop() == 0
    assert not os.path.exists(d.socket) and not os.path.exists(ram)


def test_config_file_takes_the_same_keys_as_the_flags(tmp_path):
    sock = tmp_path / "from-toml.sock"
    cfg = tmp_path / "d.toml"
    cfg.write_text(
        f'socket = "{sock}"\nruntime-dir = "{tmp_path / "ram"}"\n'
        f'metrics-listen = "none"\nlog-level = "warning"\nstate-dir = "{tmp_path / "st"}"\n'
    )
    proc = subprocess.Popen([sys.executable, "-m", "dirtylogd", "--config", str(cfg)])
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists()
        assert sock.stat().st_mode & 0o777 == 0o660
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    cfg.write_text('sockett = "/x"\n')
    bad = subprocess.run(
        [sys.executable, "-m", "dirtylogd", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "unknown keys ['sockett']" in bad.stderr


def test_demo_shows_live_numbers(fresh_daemon):
    d = fresh_daemon("--demo")
    with d.client() as q:
        deadline = time.monotonic() + 15
        while not q("query-dirty-rate", vm="demo")["slots"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert q("query-dirty-rate", vm="demo")["dirty-pages-rate"] > 0
    text = d.metrics()
    m = re.search(r'dirtylogd_dirty_pages_total\{source="uc",vm="demo"\} (\S+)', text)
    assert m and float(m.group(1)) > 0


def test_peer_credentials_refuse_other_users_with_a_reason():
    need(os.geteuid() == 0, "needs root to run a client as another user")

    def connect_as_nobody(path: str, groups: tuple[int, ...] = ()) -> str:
        """Fork, become uid/gid 65534 (in ``groups``), connect, report the daemon's first words."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: no pytest machinery from here on
            try:
                os.setgroups(list(groups))
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(10)
                    s.connect(path)
                    os.write(w, s.recv(4096))
            except OSError as exc:
                os.write(w, f"client error: {exc}".encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            said = f.read().decode()
        os.waitpid(pid, 0)
        return said

    # pytest's own temp directories are 0700; the other user must be able to reach the socket.
    base = Path(tempfile.mkdtemp(prefix="dirtylogd-peer-"))
    base.chmod(0o755)
    try:
        refused = Daemon(base / "refused", metrics=False)
        os.chmod(refused.socket, 0o666)  # let the file mode through; SO_PEERCRED must refuse
        assert "access denied: uid 65534" in connect_as_nobody(refused.socket)
        refused.stop()
        assert "refused a client: uid 65534" in refused.output_after_stop()
        allowed = Daemon(base / "allowed", "--allow-uid", "65534", metrics=False)
        os.chmod(allowed.socket, 0o666)
        assert '"QMP"' in connect_as_nobody(allowed.socket)
        allowed.stop()
        # A supplementary group counts: it is read from the socket (SO_PEERGROUPS), so it works
        # under the unit's ProtectProc=invisible, where /proc/<peer> is hidden.
        by_group = Daemon(base / "group", "--allow-gid", "4242", metrics=False)
        os.chmod(by_group.socket, 0o666)
        assert '"QMP"' in connect_as_nobody(by_group.socket, groups=(4241, 4242))
        assert "access denied: uid 65534" in connect_as_nobody(by_group.socket, groups=(4241,))
        by_group.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_both_signals_stop_cleanly(fresh_daemon, signum):
    d = fresh_daemon(metrics=False)
    d.proc.send_signal(signum)
    assert d.proc.wait(20) == 0
