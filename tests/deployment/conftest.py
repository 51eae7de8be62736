"""The project as a user gets it: one wheel per session, installed into a fresh venv.

The rest of the suite runs an editable checkout, where every source file is importable whether
or not packaging ships it; a forgotten package (kvmshim.x86 once) or a dependency declared only
in an extra (qemu.qmp once) stays invisible there. Tests here run the venv's programs from an
empty directory with PYTHONPATH removed, so only what the wheel and its declared dependencies
provide can be imported. Fixtures for other deployment tests (systemd, Prometheus) build on
``installed_wheel``.

Timings on the development machine, measured with --durations (the session fixtures: pip wheel
~4 s, venv with pip ~3 s, pip install of the wheel and its dependencies the rest):
cold (PIP_CACHE_DIR pointed at an empty directory) fixtures 11-17 s, whole module 15-23 s;
warm (pip's default cache, filled by an earlier run) fixtures 10-13 s, whole module 14-16 s.
Most dependencies come from a local index on that machine; from pypi.org a cold run downloads
the dependencies (~19 MB, 17 of them numpy) on top.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# What a build must not see: VCS data, caches, and earlier build output. setuptools ships
# whatever an old build/lib holds, so an in-tree build can hide a package that packaging
# forgets (checked: a stale build/lib/kvmshim/x86 ended up in a wheel whose config dropped it).
_NOT_SOURCE_AT_ROOT = {".git", "build", "dist", ".venv"}
_NOT_SOURCE_ANYWHERE = shutil.ignore_patterns(
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
    "*.ram",
)


def _not_source(folder: str, names: list[str]) -> set[str]:
    ignored = set(_NOT_SOURCE_ANYWHERE(folder, names))
    if Path(folder) == REPO:
        ignored |= _NOT_SOURCE_AT_ROOT.intersection(names)
    return ignored


def source_packages() -> dict[str, Path]:
    """Top-level import packages of the source tree and their folders (folder name = import name).

    kvmshim at the root; every package under daemon/, so one added there is checked too.
    """
    packages = {"kvmshim": REPO / "kvmshim"}
    for folder in sorted((REPO / "daemon").iterdir()):
        if (folder / "__init__.py").is_file():
            packages[folder.name] = folder
    return packages


def user_env(venv: Path | None = None) -> dict[str, str]:
    """This process's environment minus anything that could reach the checkout or steer the
    programs (PYTHONPATH, PYTHONHOME, DIRTYLOGD_*); with ``venv``, that venv activated."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("DIRTYLOGD_")
    }
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _checked(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc.stdout


@dataclass(frozen=True)
class InstalledWheel:
    """The wheel built from this checkout, installed with its dependencies into a fresh venv."""

    wheel_path: Path
    venv: Path
    workdir: Path  # empty, outside the repo: the default working directory of every run

    @property
    def python(self) -> Path:
        return self.bin("python")

    def bin(self, name: str) -> Path:
        """A program the venv installed (console scripts, python); never one from $PATH."""
        path = self.venv / "bin" / name
        assert path.is_file(), f"the venv has no {name} ({path})"
        return path

    @property
    def env(self) -> dict[str, str]:
        return user_env(self.venv)

    def argv(self, program: str | Path, *args: str | Path) -> list[str]:
        """A bare name is the venv's program; a path is used as given."""
        exe = self.bin(program) if isinstance(program, str) and "/" not in program else program
        return [str(exe), *map(str, args)]

    def cwd(self, cwd: Path | None) -> Path:
        """``cwd``, or the empty default; never inside the checkout, whose files could import."""
        where = (cwd or self.workdir).resolve()
        assert not where.is_relative_to(REPO), f"{where} is inside the checkout {REPO}"
        return where

    def run(
        self,
        program: str | Path,
        *args: str | Path,
        cwd: Path | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a program with the user's environment; ``check`` fails with its output."""
        argv = self.argv(program, *args)
        proc = subprocess.run(
            argv,
            cwd=self.cwd(cwd),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"{' '.join(argv)} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def popen(
        self, program: str | Path, *args: str | Path, cwd: Path | None = None, **kwargs: Any
    ) -> subprocess.Popen[str]:
        """Start a program with the user's environment (a daemon); the caller reaps it."""
        return subprocess.Popen(
            self.argv(program, *args), cwd=self.cwd(cwd), env=self.env, text=True, **kwargs
        )

    def owns(self, path: str | Path) -> bool:
        """Whether a file (a module's ``__file__``) lies inside the venv."""
        return Path(path).resolve().is_relative_to(self.venv.resolve())


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheel per session, built by pip (with build isolation) from a clean copy of the
    checkout, as uncommitted work stands; the checkout gets no build/ or egg-info."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(REPO, src, ignore=_not_source)
    out = base / "dist"
    _checked(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(src)],
        cwd=base,
        env=user_env(),
        timeout=600,
    )
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel, got {wheels}"
    return wheels[0]


@pytest.fixture(scope="session")
def installed_wheel(built_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    """A fresh venv (no system site-packages, so not the editable install either) holding the
    wheel and the runtime dependencies pip resolves from the index; no extras."""
    base = tmp_path_factory.mktemp("venv")
    venv = base / "venv"
    workdir = base / "cwd"
    workdir.mkdir()
    _checked([sys.executable, "-m", "venv", str(venv)], cwd=workdir, env=user_env(), timeout=300)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    _checked(
        [str(venv / "bin" / "python"), "-m", "pip", "install", str(built_wheel)],
        cwd=workdir,
        env=user_env(venv),
        timeout=900,
    )
    return InstalledWheel(built_wheel, venv, workdir)


class WheelDaemon:
    """The venv's ``dirtylogd`` on a private socket, nothing persisted, no metrics listener
    unless ``metrics_listen`` names one (HOST:PORT)."""

    def __init__(self, wheel: InstalledWheel, tmp: Path, metrics_listen: str = "none") -> None:
        self.wheel = wheel
        self.tmp = tmp
        self.socket = tmp / "qmp.sock"
        self.log_path = tmp / "dirtylogd.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the daemon
        self.proc = wheel.popen(
            "dirtylogd",
            "--socket",
            self.socket,
            "--runtime-dir",
            tmp / "vms",
            "--state-dir",
            "none",
            "--metrics-listen",
            metrics_listen,
            cwd=tmp,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_listening()

    def _wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"dirtylogd exited {self.proc.returncode}:\n{self.output()}")
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(self.socket))
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        pytest.fail(f"dirtylogd did not listen on {self.socket}:\n{self.output()}")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The venv's ``dirtylogctl`` against this daemon."""
        return self.wheel.run("dirtylogctl", "-s", self.socket, *args, cwd=self.tmp, check=check)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; the exit status (0 when it shut down cleanly)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def wheel_daemon(installed_wheel: InstalledWheel, tmp_path: Path) -> Iterator[WheelDaemon]:
    daemon = WheelDaemon(installed_wheel, tmp_path)
    yield daemon
    running = daemon.proc.poll() is None
    status = daemon.stop()
    assert not running or status == 0, f"dirtylogd exited {status}:\n{daemon.log_path.read_text()}"
