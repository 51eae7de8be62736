"""dirtylogctl as a user runs it: a real process against a real daemon."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from dirtylogctl import cli
from kvmshim.bitmap import DirtyBitmap
from tests.conftest import need

from .daemon_proc import Daemon
from .full_fs import fill_leaving, tiny_tmpfs


@pytest.fixture
def ctl(daemon):
    def run(*args, check=True):
        out = subprocess.run(
            [sys.executable, "-m", "dirtylogctl.cli", "-s", daemon.socket, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check:
            assert out.returncode == 0, out.stderr
        return out

    return run


def test_vm_lifecycle_in_tables_and_json(ctl):
    assert (
        "created vm cli"
        in ctl(
            "vm",
            "create",
            "cli",
            "--slot",
            "0:0:4M",
            "--slot",
            "1:16M:1M:nolog",
            "--backend",
            "softmmu",
        ).stdout
    )
    listing = ctl("vm", "list").stdout.splitlines()
    assert listing[0].split() == [
        "NAME",
        "BACKEND",
        "KERNEL",
        "SLOTS",
        "CONSUMERS",
        "PAUSED",
        "GENERATION",
        "WORKLOAD",
    ]
    assert any(line.split()[:4] == ["cli", "softmmu", "3.16", "2"] for line in listing[1:])
    shown = json.loads(ctl("--json", "vm", "show", "cli").stdout)
    assert [m["log-dirty-pages"] for m in shown["memslots"]] == [True, False]
    ctl("vm", "remove", "cli")


def test_get_clear_io_and_get_out_file(ctl, tmp_path):
    ctl("vm", "create", "cli2", "--slot", "0:0:1M", "--backend", "softmmu")
    ctl("qmp", "sim-write-pages", '{"vm": "cli2", "gfns": [1, 2, 3, 200], "value": 9}')
    assert "4 of 256 pages dirty" in ctl("get", "cli2", "0").stdout
    ctl("io-mark", "cli2", "0x5000:8K")
    ctl("consumer", "add", "cli2", "mp", "--manual-protect")
    out = tmp_path / "bitmap"
    ctl("get", "cli2", "0", "--consumer", "mp", "--out", str(out))
    assert DirtyBitmap.from_bytes(256, out.read_bytes()).count() == 256  # initially set
    ctl("clear", "cli2", "0", "0", "256", "--consumer", "mp", "--all")
    ctl("get", "cli2", "0", "--consumer", "mp", "--out", str(out))
    assert DirtyBitmap.from_bytes(256, out.read_bytes()).count() == 0
    assert "5-6" in ctl("get", "cli2", "0").stdout  # the I/O marked pages 5 and 6
    rate = json.loads(ctl("--json", "rate", "cli2").stdout)
    assert rate["status"] == "unstarted" and [s["slot"] for s in rate["slots"]] == [0]
    assert "no calc-dirty-rate yet" in ctl("rate", "cli2").stdout
    ctl("vm", "remove", "cli2")


def test_calc_dirty_rate_and_dirty_limit(ctl):
    ctl("vm", "create", "cli4", "--slot", "0:0:64M", "--backend", "softmmu")
    ctl("workload", "start", "cli4", "--pps", "5000", "--vcpus", "2", "--seed", "1")
    # 4096 per GiB: 256 samples of 64 MiB, of which ~6 % change in 200 ms (P(none) ~ 1e-7)
    out = ctl(
        "calc-dirty-rate", "cli4", "--calc-time", "200", "--unit", "ms", "--sample-pages", "4096"
    ).stdout
    assert re.match(r"cli4: calc-dirty-rate \d+ MiB/s \(page-sampling, 2\d\d millisecond", out)
    assert re.search(r"\d+ of 256 samples changed, standard error", out), out
    ctl("workload", "stop", "cli4")
    out = ctl("calc-dirty-rate", "cli4", "--calc-time", "100", "--unit", "ms").stdout
    assert "0 of 32 samples changed (too few to see a lower rate" in out  # a still guest
    ctl("workload", "start", "cli4", "--pps", "5000", "--vcpus", "2", "--seed", "1")
    out = ctl(
        "calc-dirty-rate", "cli4", "--calc-time", "100", "--unit", "ms", "--mode", "dirty-ring"
    ).stdout
    assert "vCPU 0:" in out and "vCPU 1:" in out
    bad = ctl(
        "calc-dirty-rate", "cli4", "--mode", "dirty-bitmap", "--sample-pages", "256", check=False
    )
    assert bad.returncode == 3 and "sample-pages is used only in page-sampling mode" in bad.stderr
    assert ctl("calc-dirty-rate", "cli4", "--mode", "fast", check=False).returncode == 2
    assert "no vCPU is limited" in ctl("dirty-limit", "cli4").stdout
    assert (
        "vCPU 1: limited to 3 MiB/s" in ctl("dirty-limit", "cli4", "3", "--cpu-index", "1").stdout
    )
    (row,) = json.loads(ctl("--json", "dirty-limit", "cli4").stdout)
    assert row["cpu-index"] == 1 and row["limit-rate"] == 3
    assert "CPU-INDEX" in ctl("dirty-limit", "cli4").stdout
    ctl("dirty-limit", "cli4", "--cancel")
    assert json.loads(ctl("--json", "dirty-limit", "cli4").stdout) == []
    assert "calc-dirty-rate" in ctl("rate", "cli4").stdout
    ctl("vm", "remove", "cli4")


def test_get_out_to_a_full_file_system_fails_before_the_pages_are_taken(ctl, tmp_path):
    """The output's space is reserved before the GET: a disk that cannot hold the 32 KiB
    bitmap is a one-line error, and the consumer still has every page."""
    ctl("vm", "create", "full", "--slot", "0:0:1G", "--backend", "softmmu")
    ctl("qmp", "sim-write-pages", '{"vm": "full", "gfns": [1, 262143], "value": 9}')
    with tiny_tmpfs(tmp_path / "fs", 256 << 10) as fs:
        fill_leaving(fs, 16 << 10)
        out = ctl("get", "full", "0", "--out", str(fs / "bitmap"), check=False)
        assert "2 of 262144 pages dirty" in ctl("get", "full", "0").stdout  # nothing was taken
        assert out.returncode == 1
        assert out.stderr == (
            f"dirtylogctl: cannot write {fs / 'bitmap'}: No space left on device "
            "(nothing was asked of the daemon)\n"
        )
        assert [p.name for p in fs.iterdir()] == ["filler"]
    ctl("vm", "remove", "full")


def test_workload_stop_and_cont(ctl):
    ctl("vm", "create", "cli3", "--slot", "0:0:1M", "--backend", "softmmu")
    ctl("workload", "start", "cli3", "--pps", "5000", "--seed", "1")
    assert "stopped" in ctl("stop", "cli3").stdout
    assert "running" in ctl("cont", "cli3").stdout
    ctl("workload", "stop", "cli3")
    ctl("vm", "remove", "cli3")


def test_exit_codes_separate_usage_qmp_and_connection_errors(ctl, tmp_path):
    usage = ctl("vm", "create", check=False)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    refused = ctl("get", "no-such-vm", "0", check=False)
    assert refused.returncode == 3
    assert refused.stderr.strip() == "dirtylogctl: DeviceNotFound: no VM named 'no-such-vm'"
    gone = subprocess.run(
        [sys.executable, "-m", "dirtylogctl.cli", "-s", str(tmp_path / "none"), "version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 4 and "cannot talk to dirtylogd" in gone.stderr
    assert "is dirtylogd running?" in gone.stderr
    bad_json = ctl("qmp", "query-vms", "{not json", check=False)
    assert bad_json.returncode == 2 and "not JSON" in bad_json.stderr


@pytest.mark.parametrize("arguments", ['{"x": NaN}', '{"x": -Infinity}', '{"x": 1e400}'])
def test_qmp_arguments_that_are_not_json_are_a_usage_error(ctl, arguments):
    """Python's json takes them; sent on, they would be a parse error without an id, which
    qemu.qmp cannot match to the command: it drops the connection, and that used to end in
    "lost the connection to dirtylogd" and a traceback."""
    out = ctl("qmp", "query-vms", arguments, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("dirtylogctl: arguments are not JSON: "), out.stderr
    assert out.stderr.count("\n") == 1


def test_version_is_the_version_info_of_the_daemons_greeting(ctl, daemon):
    with daemon.client() as q:
        greeting = q.client.greeting
        assert greeting is not None
        version = dict(greeting.QMP.version)
    assert json.loads(ctl("--json", "version").stdout) == version
    assert ctl("version").stdout == version["package"] + "\n"


def test_socket_comes_from_the_environment(daemon):
    out = subprocess.run(
        [sys.executable, "-m", "dirtylogctl.cli", "version"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DIRTYLOGD_SOCKET": daemon.socket},
    )
    assert out.returncode == 0 and out.stdout.startswith("dirtylogd ")


def run_ctl(*args, **popen):
    """The real CLI in a child process, as a user runs it (not through the ``ctl`` fixture's
    capture, for tests that need to choose what its stdout is)."""
    return subprocess.run(
        [sys.executable, "-m", "dirtylogctl.cli", *args],
        text=True,
        timeout=60,
        **({"stdout": subprocess.PIPE, "stderr": subprocess.PIPE} | popen),
    )


TCP_FORM = "expected tcp:HOST:PORT (port 1-65535) or a file path"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["migrate", "vm", "tcp:127.0.0.1"], TCP_FORM),
        (["migrate", "vm", "tcp:"], TCP_FORM),
        (["migrate", "vm", "tcp::7700"], TCP_FORM),
        (["migrate", "vm", "tcp:host:port"], TCP_FORM),
        (["migrate", "vm", "tcp:host:0"], TCP_FORM),
        (["migrate", "vm", "tcp:host:65536"], TCP_FORM),
        (["migrate", "vm", "tcp:host:\u0663"], TCP_FORM),  # an Arabic-Indic 3: not a port
        (["migrate", "vm", ""], TCP_FORM),
        (["migrate", "vm", "x.img", "--downtime-limit", "nan"], "expected a finite number"),
        (["migrate", "vm", "x.img", "--downtime-limit", "0"], "expected a number above 0"),
        (["migrate", "vm", "x.img", "--max-rounds", "-1"], "a whole number of 0 or more"),
        (["migrate", "vm", "x.img", "--reconnect-timeout", "inf"], "expected a finite number"),
        (["migrate", "vm", "x.img", "--max-bandwidth", "fast"], "not a size"),
        (["--timeout", "nan", "version"], "expected a finite number"),
        (["--timeout", "0", "version"], "expected a number above 0"),
        (["vm", "create", "x", "--slot", "a:0:1G"], "SLOT:GPA:SIZE[:nolog]"),
        (["vm", "create", "x", "--slot", "0:0"], "SLOT:GPA:SIZE[:nolog]"),
        (["vm", "create", "x", "--slot", "0:0:1Q"], "not a size"),
        (["vm", "create", "x", "--slot", "0:0:1G:log"], "SLOT:GPA:SIZE[:nolog]"),
        (["memslot", "vm", "0", "0", "-1"], "not a size"),
        (["memslot", "vm", "one", "0", "1M"], "invalid int value"),
        (["io-mark", "vm", "0x1000"], "GPA:LENGTH"),
        (["io-mark", "vm", "zz:1"], "not a size"),
        (["workload", "start", "vm", "--pps", "5", "--dma-share", "nan"], "a finite number"),
        (["get", "vm", "zero"], "invalid int value"),
        (["clear", "vm", "0", "0", "64"], "one of the arguments --all --bitmap-file"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_malformed_arguments_are_one_usage_error_never_a_traceback(daemon, args, says):
    """Exit 2 and argparse's usage with one error line that names the expected form; nothing
    reaches the daemon (a NaN would not even be JSON)."""
    out = run_ctl("-s", daemon.socket, *args)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if ": error: " in line]
    assert len(error) == 1 and says in error[0], out.stderr
    assert out.stdout == ""


def _unread_pipe():
    """A pipe whose reader has already gone: what ``| head`` leaves behind."""
    r, w = os.pipe()
    os.close(r)
    return w


@pytest.mark.parametrize("stdout", ["reader-gone", "closed"])
def test_get_takes_no_pages_for_a_stdout_nobody_reads(ctl, daemon, stdout):
    """A GET hands the pages over. With stdout closed, or a pipe whose reader left, nothing is
    asked of the daemon: exit 141 (as a tool killed by SIGPIPE) and no message."""
    ctl("vm", "create", "pipe", "--slot", "0:0:1M", "--backend", "softmmu")
    ctl("qmp", "sim-write-pages", '{"vm": "pipe", "gfns": [1, 2, 3], "value": 9}')
    if stdout == "reader-gone":
        w = _unread_pipe()
        out = run_ctl("-s", daemon.socket, "get", "pipe", "0", stdout=w)
        os.close(w)
    else:
        out = run_ctl(
            "-s",
            daemon.socket,
            "get",
            "pipe",
            "0",
            stdout=None,
            preexec_fn=lambda: os.close(1),
        )
    assert (out.returncode, out.stderr) == (141, "")
    assert "3 of 256 pages dirty" in ctl("get", "pipe", "0").stdout  # still there
    ctl("vm", "remove", "pipe")


@pytest.mark.parametrize("args", [["vm", "list"], ["--json", "vm", "list"], ["version"]])
def test_a_closed_stdout_is_not_a_lost_daemon(daemon, args):
    """Not "lost the connection to dirtylogd" and exit 4, nor a traceback: exit 141, quietly."""
    w = _unread_pipe()
    out = run_ctl("-s", daemon.socket, *args, stdout=w)
    os.close(w)
    assert (out.returncode, out.stderr) == (141, "")


@pytest.mark.parametrize("kind", ["missing", "refused"])
def test_no_daemon_at_the_socket_says_how_to_start_one(tmp_path, kind):
    path = tmp_path / "qmp.sock"
    if kind == "refused":  # a socket file left behind by a daemon that is gone: ECONNREFUSED
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
    out = run_ctl("-s", str(path), "vm", "list")
    reason = "No such file or directory" if kind == "missing" else "Connection refused"
    assert out.returncode == 4
    assert out.stderr == (
        f"dirtylogctl: cannot talk to dirtylogd at {path}: {reason}; is dirtylogd running? "
        "(start it with `dirtylogd`, or give its socket with $DIRTYLOGD_SOCKET or -s)\n"
    )


def ctl_as_nobody(*args):
    """dirtylogctl's main() in a forked child that became uid/gid 65534; (exit code, stderr).

    Forked rather than exec'd: the interpreter lives under /root, which uid 65534 cannot enter,
    so everything is imported before the switch."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on
        code = 99
        try:
            os.close(r)
            os.dup2(w, 2)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - the child's whole life
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = cli.main(list(args))
        except BaseException as exc:  # report anything to the parent
            os.write(2, f"child failed: {exc!r}".encode())
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


@pytest.fixture
def reachable_dir():
    """pytest's own temp directories are 0700; another user must be able to reach a socket."""
    base = Path(tempfile.mkdtemp(prefix="dirtylogctl-peer-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_permission_denied_names_the_socket_mode_and_who_the_daemon_admits(reachable_dir):
    need(os.geteuid() == 0, "needs root to run the client as another user")
    d = Daemon(reachable_dir / "d", metrics=False)  # socket 0660, root:root
    try:
        code, err = ctl_as_nobody("-s", d.socket, "vm", "list")
    finally:
        d.stop()
    assert code == 4
    assert err == (
        f"dirtylogctl: cannot talk to dirtylogd at {d.socket}: Permission denied; the socket "
        "is owner root, group root, mode 0660 and uid 65534 is not in group root. To connect, "
        "the file mode must let you in (e.g. join the group) and the daemon must admit you: "
        "it admits root, its own user and those given --allow-uid/--allow-gid\n"
    )


def test_a_refused_peer_is_told_the_daemons_reason(reachable_dir):
    need(os.geteuid() == 0, "needs root to run the client as another user")
    d = Daemon(reachable_dir / "d", metrics=False)
    os.chmod(d.socket, 0o666)  # the file mode lets uid 65534 in; the daemon does not
    try:
        code, err = ctl_as_nobody("-s", d.socket, "vm", "list")
    finally:
        d.stop()
    assert code == 4
    assert err.startswith(
        f"dirtylogctl: dirtylogd at {d.socket} refused this client: access denied: uid 65534 "
        "(gid 65534, pid "
    ), err
    assert err.endswith(") is not allowed (--allow-uid/--allow-gid)\n") and err.count("\n") == 1


def _one_message(conn):
    """One JSON value from a client that, like qemu.qmp, sends no newline after it."""
    data = b""
    while True:
        data += conn.recv(4096)
        try:
            return json.loads(data)
        except ValueError:
            continue


def test_a_reply_the_client_cannot_match_is_one_line_not_a_traceback(tmp_path):
    """An error without an id (a server parse error) makes qemu.qmp drop the connection and
    re-raise at disconnect, which used to end the command in a traceback after its message."""
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn:
            greeting = {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0}}}}
            greeting["QMP"] |= {"capabilities": []}
            greeting["QMP"]["version"]["package"] = "fake"
            conn.sendall(json.dumps(greeting).encode() + b"\r\n")
            negotiate = _one_message(conn)  # qemu.qmp sends it without an id
            reply = {"return": {}} | ({"id": negotiate["id"]} if "id" in negotiate else {})
            conn.sendall(json.dumps(reply).encode() + b"\r\n")
            _one_message(conn)
            conn.sendall(b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n')
            while conn.recv(4096):  # until the client hangs up
                pass

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        out = run_ctl("-s", path, "version")
    finally:
        listener.close()
    assert out.returncode == 4
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("dirtylogctl: lost the connection to dirtylogd: ")
    assert out.stderr.count("\n") == 1, out.stderr


def test_ctrl_c_is_exit_130_with_one_line_for_any_command(tmp_path):
    """Interrupted while waiting for a daemon that never greets: no KeyboardInterrupt trace."""
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)  # accepted by the kernel, never answered
        proc = subprocess.Popen(
            [sys.executable, "-m", "dirtylogctl.cli", "-s", path, "version"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        listener.settimeout(30)
        conn, _ = listener.accept()  # the client is in its event loop, awaiting the greeting
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        conn.close()
    assert (proc.returncode, out, err) == (130, "", "dirtylogctl: interrupted\n")
