"""A real Debian bookworm systemd, booted in a container, for tests of the packaged units.

The unit files only prove themselves under the systemd that runs them: sysusers creating the
user, ``SupplementaryGroups=kvm`` resolving, socket activation, the hardening options. A host
without systemd as PID 1 (this project's development machine) cannot show that, so tests boot
Debian's own systemd with ``systemd-nspawn`` and talk to it with ``nsenter``.

``bookworm_tree()`` builds the root tree once per machine with mmdebstrap and caches it outside
any checkout, keyed by a hash of the recipe; every ``BootedContainer`` boots an overlayfs over
it, so each boot starts pristine and the cache is never written.

What the tree holds and why (``essential`` variant, no Recommends, no apt):

- systemd, systemd-sysv: systemd as PID 1.
- udev: not to run (udevd is skipped in a container, /sys is read-only) but because on Debian
  its postinst is what creates group ``kvm`` (``addgroup --system kvm``, here gid 103, next to
  input, sgx, render). bookworm's sysusers basic.conf has no kvm; without udev the group is
  missing until dirtylogd.sysusers.conf's ``m dirtylogd kvm`` creates it implicitly, which no
  real host would show. Costs ~22 MB (hwdb), no boot time.
- python3, python3-venv: ``python3 -m venv`` with pip (from the bundled wheel) for installing
  the project's wheel inside.
- passwd (useradd, groupadd), util-linux (runuser; essential anyway).
- libstdc++6: numpy's wheels link it; any real Debian host has it (apt depends on it).
- No dbus: as root, systemctl talks to PID 1 over /run/systemd/private; systemd-logind is
  skipped by its condition (no dbus.service), not failed, so the system reaches "running".
  ``loginctl``, ``hostnamectl`` and ``busctl`` do not work, and ``systemctl`` as a non-root
  user does not either.
- The merged-usr hook (as debootstrap does for bookworm) instead of the usrmerge package,
  which would pull in perl; man pages, docs (but copyright files), locales and info are left
  out by dpkg path excludes. The tree is ~154 MB, ~5700 inodes.

The tree's own setup: an empty /etc/machine-id (nspawn's container UUID becomes the machine
id of each boot, written to the overlay), hostname ``dirtylogd-test`` with an /etc/hosts
(mmdebstrap writes none, and without nss-myhostname "localhost" would not resolve), and masked
units that do nothing useful in a test container: console-getty.service (a login prompt on a
console nobody types into), dpkg-db-backup.timer and systemd-tmpfiles-clean.timer (periodic jobs
that could fire mid-test). Nothing else needed masking: networkd (so its wait-online) is
disabled, apt timers do not exist without apt, fstrim/getty@tty1/pstore/udevd are skipped by
their conditions in a container. systemd-analyze: startup ~0.2 s in userspace, with or without
the masks (they buy quiet and determinism, not speed).

Booting on this host (no systemd as PID 1, no system D-Bus, cgroup v1 "hybrid" layout):

- ``--register=no`` (machined needs the host's D-Bus) and ``--keep-unit`` (else nspawn asks the
  host's systemd for a scope unit: "Failed to open system bus"). With --keep-unit nspawn stays
  in its caller's cgroup and creates payload/ and supervisor/ beneath it; two containers in one
  cgroup would share a tree, so each nspawn is first moved into a cgroup of its own (v1
  name=systemd and v2 hierarchies) that ``close()`` removes again.
- ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` whenever a cgroup2 hierarchy is mounted: the container
  gets a pure cgroup v2 (as a bookworm host has) rather than mirroring the host's hybrid layout,
  which also works but logs "Failed to create symlink /sys/fs/cgroup/cpu: File exists" (this
  host mounts cpu and cpuacct separately). The v2 hierarchy here has no controllers (all bound
  to v1), so limits such as MemoryMax= are accepted but not enforced.
- ``--private-network``: the container's loopback is its own, so ports never clash.
- ``--link-journal=no`` and ``--timezone=off`` so nothing on the host or in the tree is linked
  or adjusted. nspawn logs 'Attempted to remove disk file system under
  "/run/systemd/nspawn/propagate/..."' at exit because /run is no tmpfs here; harmless.

Timings on the development machine (2 cores, ext4), for
``time python -m pytest -q tests/deployment/test_container.py`` with
``PYTHONPATH=.:daemon`` (two boots: the module's container and a throw-away one for the
teardown test):

- cold (``rm -rf ~/.cache/dirtylogd-tests`` first; mmdebstrap from deb.debian.org): 26 s wall,
  of which the tree build (mmdebstrap ~20 s, alone 19-23 s) is almost all.
- warm (tree cached): 5-6 s wall (pytest reports 4-5 s): a boot to "running" 0.25-0.4 s,
  poweroff and teardown 0.1-0.7 s; ``python3 -m venv`` inside is the slowest test at ~2 s.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from tests.conftest import need, need_tool

SUITE = "bookworm"
MIRROR = os.environ.get("DIRTYLOGD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Bump when the tree's setup below changes in a way the recipe dict does not show.
FORMAT = 1
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "python3",
    "python3-venv",
    "passwd",
    "util-linux",
    # numpy's manylinux wheels link libstdc++; every real Debian host has it (apt needs it),
    # the essential variant does not.
    "libstdc++6",
)
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)
MASKED_UNITS = (
    "console-getty.service",
    "dpkg-db-backup.timer",
    "systemd-tmpfiles-clean.timer",
)
HOSTNAME = "dirtylogd-test"
MERGED_USR_HOOK = Path("/usr/share/mmdebstrap/hooks/merged-usr")

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Every namespace of the container but the user namespace, which nspawn (without -U) shares
# with the host; -r/-w take the container's root and working directory.
NSENTER_NAMESPACES = ("-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w")


def need_container_tools() -> None:
    """Skip (locally) or fail (CI) unless this machine can build and boot the container."""
    need(os.geteuid() == 0, "booting a systemd container needs root")
    for tool in ("mmdebstrap", "systemd-nspawn", "nsenter", "mount", "umount"):
        need_tool(tool)
    need(_have_overlayfs(), "the kernel offers no overlayfs")


def _have_overlayfs() -> bool:
    def listed() -> bool:
        return any(
            line.split()[-1] == "overlay"
            for line in Path("/proc/filesystems").read_text().splitlines()
            if line.strip()
        )

    if not listed() and shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", "overlay"], check=False, capture_output=True)
    return listed()


# --- the cached tree ---------------------------------------------------------------------


def _recipe() -> dict[str, object]:
    """Everything that decides the tree's content; its hash names the cache entry."""
    return {
        "format": FORMAT,
        "suite": SUITE,
        "variant": "essential",
        "packages": sorted(PACKAGES),
        "dpkg": list(DPKG_OPTIONS),
        "merged_usr_hook": MERGED_USR_HOOK.is_dir(),
        "masked": sorted(MASKED_UNITS),
        "hostname": HOSTNAME,
    }


def cache_dir() -> Path:
    """Outside any checkout, so worktrees and fresh clones share one tree."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dirtylogd-tests"


def tree_key() -> str:
    text = json.dumps(_recipe(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def bookworm_tree() -> Path:
    """The cached bookworm root tree, built on first use.

    Built under an flock into a temporary sibling and renamed into place only when complete, so
    an interrupted build is never taken for a cached one and concurrent sessions build once.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    name = f"{SUITE}-{tree_key()}"
    final = root / name
    if final.is_dir():
        return final
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():  # another session built it while this one waited
            return final
        for stale in root.glob(f"{name}.tmp-*"):
            _remove_tree(stale)
        building = root / f"{name}.tmp-{os.getpid()}"
        try:
            _mmdebstrap(building, lock.fileno())
            _set_up_tree(building)
            building.rename(final)
        finally:
            if building.exists():
                _remove_tree(building)
    return final


def _mmdebstrap(target: Path, lock_fd: int) -> None:
    # unshare mode also as root: the build's /proc, /sys and /dev mounts live in a private mount
    # namespace, so a killed build leaves nothing mounted under the temporary directory.
    argv = [
        "mmdebstrap",
        "--mode=unshare",
        "--variant=essential",
        f"--include={','.join(PACKAGES)}",
        "--aptopt=Acquire::Retries 3",
        *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
    ]
    if MERGED_USR_HOOK.is_dir():
        argv.append(f"--hook-dir={MERGED_USR_HOOK}")
    argv += [SUITE, str(target), MIRROR]
    # mmdebstrap inherits the lock: should this process die, a builder still writing keeps the
    # next one waiting instead of having its temporary directory removed under it.
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=(lock_fd,),
        start_new_session=True,  # a timeout kills all of its processes
    )
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}\n"
            f"--- stdout\n{stdout}\n--- stderr\n{stderr[-8000:]}"
        )


def _set_up_tree(tree: Path) -> None:
    """Make the tree boot quickly and quietly as a container (see the module docstring)."""
    etc = tree / "etc"
    (etc / "machine-id").write_text("")
    (etc / "hostname").write_text(f"{HOSTNAME}\n")
    (etc / "hosts").write_text(
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{HOSTNAME}\n"
        "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\t\tip6-allnodes\n"
        "ff02::2\t\tip6-allrouters\n"
    )
    units = etc / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in MASKED_UNITS:
        link = units / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), field)


def _remove_tree(path: Path) -> None:
    """rm -rf, refusing a tree with anything mounted inside (it could reach the host's /dev)."""
    mounts = _mounts_under(path)
    if mounts:
        raise RuntimeError(f"refusing to remove {path}: mounted inside: {mounts}")
    shutil.rmtree(path)


# --- cgroups -----------------------------------------------------------------------------


def _own_cgroup_dirs() -> list[Path]:
    """This process's cgroup in the hierarchies systemd uses: cgroup2, v1 name=systemd."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0":
            own["cgroup2"] = path
        elif "name=systemd" in controllers.split(","):
            own["name=systemd"] = path
    dirs = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        after = fields[fields.index("-") + 1 :]
        fstype, options = after[0], after[2].split(",")
        kind = "cgroup2" if fstype == "cgroup2" else None
        if fstype == "cgroup" and "name=systemd" in options:
            kind = "name=systemd"
        if kind is None or kind not in own:
            continue
        mount_root, point = Path(_unescape(fields[3])), Path(_unescape(fields[4]))
        mine = Path(own.pop(kind))
        if mine.is_relative_to(mount_root):
            dirs.append(point / mine.relative_to(mount_root))
    return dirs


def _has_cgroup2() -> bool:
    return any(
        line.split(" - ", 1)[1].startswith("cgroup2 ")
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


def _remove_cgroup(top: Path, timeout: float = 10.0) -> None:
    """rmdir a cgroup subtree bottom-up; retried while its last processes are reaped."""
    deadline = time.monotonic() + timeout
    while top.exists():
        try:
            for folder, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
                os.rmdir(folder)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- the container -----------------------------------------------------------------------


class ContainerCommandError(subprocess.CalledProcessError):
    """A command in the container failed; the message carries its output and the console's end,
    so a failing test shows why without a rerun."""

    def __init__(
        self, argv: list[str], returncode: int, stdout: str, stderr: str, console_tail: str
    ) -> None:
        super().__init__(returncode, argv, stdout, stderr)
        self.console_tail = console_tail

    def __str__(self) -> str:
        return (
            f"in the container: {' '.join(self.cmd)} exited {self.returncode}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}\n"
            f"--- console (end)\n{self.console_tail}"
        )


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, start time) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    return comm, int(rest[1]), int(rest[19])


def _kill_under_nsenter(nsenter: subprocess.Popen[str]) -> None:
    """Kill a command run by ``run`` (its own process group), nsenter last.

    nsenter forks the command into the container's PID namespace and waits for it. Killed
    first, it would orphan the command to the host's init, not the container's: the command's
    zombie would then stay in the container's PID namespace, and systemd-shutdown waits 10 s for
    it at poweroff. So the rest of the group goes first and nsenter reaps it.
    """
    for _ in range(2):  # again, for anything forked while the first round was killing
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == nsenter.pid:
                continue
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry)) == nsenter.pid:
                    os.kill(int(entry), signal.SIGKILL)
    try:
        nsenter.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(nsenter.pid, signal.SIGKILL)


class BootedContainer:
    """Debian's systemd booted as PID 1 of an nspawn container over a throw-away overlay.

    ``with BootedContainer(bookworm_tree(), workdir) as c: c.run([...])``. ``binds`` maps host
    paths to container paths, bound read-only. Everything set up is torn down on exit, also when
    booting fails half-way; the console log stays in ``workdir``.
    """

    def __init__(
        self,
        tree: Path,
        workdir: Path,
        binds: Mapping[Path | str, str] | None = None,
        *,
        boot_timeout: float = 120.0,
    ) -> None:
        self.tree = tree
        self.workdir = workdir
        self.binds = {Path(host): container for host, container in (binds or {}).items()}
        self.boot_timeout = boot_timeout
        self.name = f"dirtylogd-{secrets.token_hex(4)}"
        self.root = workdir / "root"  # the overlay's merged view, the container's /
        self.upper = workdir / "overlay" / "upper"
        self.overlay_work = workdir / "overlay" / "work"
        self.log_path = workdir / "console.log"
        self.state = ""  # "running" or "degraded" once booted
        self.leader: int | None = None
        self._leader_start: int | None = None
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._cgroups: list[Path] = []
        self._mounted = False

    # - setting up

    def __enter__(self) -> BootedContainer:
        try:
            self._mount_overlay()
            self._start_nspawn()
            self._find_leader()
            self._wait_booted()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _mount_overlay(self) -> None:
        for path in (self.tree, self.upper, self.overlay_work, self.root):
            # mount(8) would split lowerdir=...,upperdir=... at these
            assert not set(str(path)) & set(",:"), f"unusable path for overlayfs: {path}"
        if os.path.ismount(self.root):
            raise RuntimeError(f"{self.root} is already mounted: another container's workdir?")
        for path in (self.upper, self.overlay_work):
            if path.exists():
                _remove_tree(path)
            path.mkdir(parents=True)
        self.root.mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={self.tree},upperdir={self.upper},workdir={self.overlay_work}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)],
            check=True,
            capture_output=True,
            text=True,
        )
        self._mounted = True

    def _start_nspawn(self) -> None:
        argv = [
            "systemd-nspawn",
            "--boot",
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--link-journal=no",
            "--timezone=off",
            "--console=read-only",
            "--setenv=SYSTEMD_COLORS=0",
            "--quiet",
        ]
        for host, container in self.binds.items():
            assert ":" not in f"{host}{container}", f"unusable bind: {host} -> {container}"
            assert host.exists(), f"bind source {host} does not exist"
            argv.append(f"--bind-ro={host.resolve()}:{container}")
        env = {"PATH": os.environ.get("PATH", CONTAINER_PATH), "SYSTEMD_COLORS": "0"}
        if _has_cgroup2():
            env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        for parent in _own_cgroup_dirs():
            own = parent / self.name
            own.mkdir()
            self._cgroups.append(own)
        # A shell moves itself into the new cgroups, then becomes nspawn: every process nspawn
        # starts is born there (moving nspawn after it forked would leave children behind).
        script = 'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done'
        script += '; shift; exec "$@"'
        procs = [str(path / "cgroup.procs") for path in self._cgroups]
        with open(self.log_path, "ab") as log:
            self._nspawn = subprocess.Popen(
                ["sh", "-c", script, "sh", *procs, "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def _find_leader(self) -> None:
        """PID 1 of the container: nspawn's child once it has exec'd systemd."""
        assert self._nspawn is not None
        own_pidns = os.readlink("/proc/self/ns/pid")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self._check_nspawn_alive()
            for entry in os.listdir("/proc"):
                stat = _proc_stat(int(entry)) if entry.isdigit() else None
                if (
                    stat is None
                    or stat[1] != self._nspawn.pid
                    or stat[0] in ("systemd-nspawn", "sh")
                ):
                    continue
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/pid") != own_pidns:
                        self.leader, self._leader_start = int(entry), stat[2]
                        return
            time.sleep(0.02)
        raise RuntimeError(f"no container init under nspawn:\n{self.console_log()[-4000:]}")

    def _check_nspawn_alive(self) -> None:
        assert self._nspawn is not None
        if self._nspawn.poll() is not None:
            raise RuntimeError(
                f"systemd-nspawn exited {self._nspawn.returncode}:\n{self.console_log()[-4000:]}"
            )

    def _wait_booted(self) -> None:
        """Until ``systemctl is-system-running --wait`` answers running or degraded."""
        deadline = time.monotonic() + self.boot_timeout
        while True:
            self._check_nspawn_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the container did not boot:\n{self.console_log()[-4000:]}")
            proc = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left)
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                break
            if state in ("maintenance", "stopping"):  # emergency mode, or already going down
                raise RuntimeError(f"the container is {state}:\n{self.console_log()[-4000:]}")
            # "offline" with "Failed to connect to bus": PID 1 does not listen yet
            time.sleep(0.05)
        self.state = state
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-pager", "--full"], check=False)
            self._note(f"system degraded; systemctl --failed:\n{failed.stdout}{failed.stderr}")

    def _note(self, text: str) -> None:
        """A harness line in the console log (appended, so it interleaves with nspawn's)."""
        with open(self.log_path, "a") as log:
            log.write("".join(f"[harness] {line}\n" for line in text.splitlines()))

    # - using it

    def run(
        self,
        argv: list[str],
        *,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,  # named as subprocess.run names it
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces, a clean environment).

        ``user`` runs it through ``runuser -u``: that user's uid, gid and supplementary groups
        from the container's /etc/group, HOME/USER/LOGNAME/SHELL set. ``check`` raises
        ContainerCommandError on a non-zero exit; a timeout kills the command and raises
        subprocess.TimeoutExpired.
        """
        assert self.leader is not None, "the container is not running"
        command = ["nsenter", "-t", str(self.leader), *NSENTER_NAMESPACES, "--"]
        if user is not None:
            command += ["runuser", "-u", user, "--"]
        command += argv
        environment = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8"}
        if user is None:
            environment["HOME"] = "/root"
        environment.update(env or {})
        # A session of its own, so that a timeout kills nsenter's forked child (the command)
        # along with it, not just nsenter.
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            _kill_under_nsenter(proc)
            stdout, stderr = proc.communicate()
            error = subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
            error.add_note(f"--- console (end)\n{self.console_log()[-4000:]}")
            raise error from exc
        if check and proc.returncode != 0:
            raise ContainerCommandError(
                argv, proc.returncode, stdout, stderr, self.console_log()[-4000:]
            )
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)

    def journal(self, unit: str | None = None, priority: str | int | None = None) -> str:
        """The container's journal (this boot is its only one), for asserts and diagnosis."""
        argv = ["journalctl", "-o", "short-precise", "--no-pager", "-q"]
        if unit is not None:
            argv += ["-u", unit]
        if priority is not None:
            argv += ["-p", str(priority)]
        return self.run(argv).stdout

    def console_log(self) -> str:
        """What PID 1 and nspawn wrote to the console, plus the harness's notes."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # - tearing down

    def close(self, timeout: float = 30.0) -> None:
        """Power off (SIGRTMIN+4 to PID 1; SIGKILL after ``timeout``), then remove the
        cgroups, the overlay mount and its upper layer. Idempotent; every step runs even when an
        earlier one failed, and the first error is raised at the end."""
        errors: list[BaseException] = []
        for step in (self._stop, self._remove_cgroups, self._unmount, self._remove_upper):
            try:
                step(timeout)
            except Exception as exc:  # raised below, once the rest is cleaned up
                errors.append(exc)
        if errors:
            raise errors[0]

    def _leader_alive(self) -> bool:
        if self.leader is None:
            return False
        stat = _proc_stat(self.leader)
        return stat is not None and stat[2] == self._leader_start

    def _stop(self, timeout: float) -> None:
        nspawn = self._nspawn
        if nspawn is None:
            return
        if nspawn.poll() is None:
            # poweroff as machinectl does it; without a booted PID 1, nspawn's own SIGTERM
            # (which it passes on to the container as a halt request)
            if self._leader_alive():
                assert self.leader is not None
                os.kill(self.leader, signal.SIGRTMIN + 4)
            else:
                nspawn.terminate()
            try:
                nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                self._note(f"no poweroff within {timeout} s; killing nspawn and the container")
        if nspawn.poll() is None or self._leader_alive():
            # the container's init first (killing a PID namespace's init kills all of it),
            # then nspawn
            if self._leader_alive():
                assert self.leader is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(nspawn.pid, signal.SIGKILL)
            nspawn.wait(10)
        self._nspawn = None
        self.leader = None

    def _remove_cgroups(self, timeout: float) -> None:
        while self._cgroups:
            _remove_cgroup(self._cgroups[-1], timeout)
            self._cgroups.pop()

    def _unmount(self, timeout: float) -> None:
        if not self._mounted:
            return
        proc = subprocess.run(
            ["umount", str(self.root)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            # something still holds it (a shell cd'ed into it): detach now, freed when let go
            self._note(f"umount {self.root} failed ({proc.stderr.strip()!r}); detaching lazily")
            subprocess.run(["umount", "--lazy", str(self.root)], check=True, capture_output=True)
        self._mounted = False

    def _remove_upper(self, timeout: float) -> None:
        overlay = self.upper.parent
        if overlay.exists():
            _remove_tree(overlay)
