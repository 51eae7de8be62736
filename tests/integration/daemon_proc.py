"""A real dirtylogd process on a temporary socket, and a synchronous qemu.qmp client for tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """``python -m dirtylogd`` in a subprocess; stopped with SIGTERM, which must exit 0."""

    def __init__(
        self,
        tmp: Path,
        *extra: str,
        metrics: bool = True,
        env: dict | None = None,
        wrapper: tuple[str, ...] = (),
    ):
        tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / "daemon.log"
        self.socket = str(tmp / "qmp.sock")
        self.runtime_dir = str(tmp / "vms")
        self.port = free_port() if metrics else None
        self.state_dir = str(tmp / "state")
        args = [
            *wrapper,
            sys.executable,
            "-m",
            "dirtylogd",
            "--socket",
            self.socket,
            "--runtime-dir",
            self.runtime_dir,
            "--state-dir",
            self.state_dir,
            "--log-level",
            "info",
            "--metrics-listen",
            f"127.0.0.1:{self.port}" if metrics else "none",
            *extra,
        ]
        self.log = open(self.log_path, "w+")  # noqa: SIM115 - lives as long as the daemon
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.wait_for_socket()

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def metrics(self) -> str:
        """One scrape of /metrics, as Prometheus would get it.

        The QMP socket is bound before the endpoint is served, so right after start a refused
        connection is retried for a while.
        """
        deadline = time.monotonic() + 10
        while True:
            try:
                return urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
            except urllib.error.URLError as exc:
                refused = isinstance(exc.reason, ConnectionRefusedError)
                if not refused or time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def metric(self, sample: str) -> float:
        """The value of one exposition line, named with its labels: 'name{label="v"}'."""
        for line in self.metrics().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{sample} is not exported")

    def wait_for_socket(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dirtylogd exited early:\n{self.output()}")
            if os.path.exists(self.socket):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(self.socket)
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"dirtylogd did not listen:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def output_after_stop(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def client(self) -> Qmp:
        return Qmp(self.socket)


async def _settle(tasks: set[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


class Qmp:
    """qemu.qmp's QMPClient, driven synchronously (tests need no asyncio plugin)."""

    def __init__(self, path: str, negotiate: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("test")
        self.client.negotiate = negotiate
        self.loop.run_until_complete(self.client.connect(path))
        self.events: list[dict[str, Any]] = []

    # No command of the tests takes this long: past it the daemon is stuck, and the test says so
    # instead of hanging.
    timeout = 60.0

    def __call__(self, command: str, **arguments: Any) -> Any:
        args = {k.replace("_", "-"): v for k, v in arguments.items()}
        return self.loop.run_until_complete(
            asyncio.wait_for(self.client.execute(command, args), self.timeout)
        )

    def error(self, command: str, **arguments: Any) -> tuple[str, str]:
        """Run a command that must fail; (error class, desc)."""
        try:
            self(command, **arguments)
        except ExecuteError as exc:
            return exc.error_class, exc.error.error.desc
        raise AssertionError(f"{command} {arguments} succeeded but should have failed")

    def send_fd(self, fd: int) -> None:
        self.client.send_fd_scm(fd)

    def pull_events(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Collect events until none arrives for ``timeout`` seconds."""

        async def pull() -> None:
            while True:
                try:
                    event = await asyncio.wait_for(self.client.events.get(), timeout)
                except TimeoutError:
                    return
                self.events.append(dict(event))

        self.loop.run_until_complete(pull())
        return self.events

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect and finish every task of the client's loop before closing it."""
        loop = self.loop
        loop.run_until_complete(self.client.disconnect())
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(_settle(leftovers))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
