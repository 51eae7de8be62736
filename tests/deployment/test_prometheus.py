"""A real Prometheus scrapes the installed daemon with the shipped config, rules and dashboard.

monitoring/ is checked piece by piece elsewhere (promtool, the metric names); here Debian's
prometheus server loads monitoring/prometheus.yml — intervals cut to 1 s, the target moved to
a free port — and scrapes a daemon started from the wheel, whose VM has an idle 'default', an
auto-clearing and a manual-protect consumer (which reads and never clears), a workload, and
clients that keep connecting. Then, on the healthy daemon: every query the dashboard draws
returns data; no alert was pending or firing at any evaluation (Prometheus' own ALERTS series);
every scrape returned the same series, none new (a label per metrics-server thread once added
one a scrape). After a SIGKILL, DirtylogdDown becomes pending.

Run with -s to see the samples per scrape and the time taken: ~17 s on the development machine,
ten of them the scrapes, plus ~12 s for the wheel's build and install (once a session).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need_tool
from tests.deployment.conftest import REPO, InstalledWheel, WheelDaemon

pytestmark = pytest.mark.deployment

MONITORING = REPO / "monitoring"
VM = "mon"
SCRAPES = 10  # healthy scrapes before the checks: enough for every rate window below
# What Grafana would put for the dashboard's variables with a 1 s scrape interval: its
# $__rate_interval is max($__interval + scrape interval, 4 x scrape interval), a few seconds
# for the default hour on a usual screen; $__range is that hour.
RATE_INTERVAL = "5s"
RANGE = "1h"
ALERTS = {
    "DirtylogdDown",
    "DirtylogdHarvestSlow",
    "DirtylogdConsumerNotReading",
    "DirtylogdQmpErrors",
    "DirtylogdPeerRefused",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


class Prometheus:
    """Debian's prometheus on a free loopback port, its storage in ``tmp``; ``stop`` reaps it."""

    def __init__(self, program: str, config: Path, tmp: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = tmp / "prometheus.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [
                program,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            cwd=tmp,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        pytest.fail(f"prometheus was not ready within {timeout} s:\n{self.output()}")

    def api(self, path: str, **params: str | float) -> Any:
        """The ``data`` of one /api/v1 answer; a failed one fails the test with the reason."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            answer = _get(url)
        except urllib.error.HTTPError as exc:
            pytest.fail(f"{url}: {exc.code} {exc.read().decode(errors='replace')}")
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (vector or matrix), at ``at`` or now."""
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        return list(self.api("query", **params)["result"])

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Clients:
    """New connections all the time: dirtylogctl GETs for both named consumers, I/O marks,
    and scrapes of /metrics besides Prometheus' own, in a loop until ``stop``."""

    def __init__(self, daemon: WheelDaemon, metrics_url: str) -> None:
        self.daemon = daemon
        self.metrics_url = metrics_url
        self.rounds = 0
        self.failures: list[str] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="clients", daemon=True)

    def round(self) -> None:
        for args in (
            ("get", VM, "0", "--consumer", "tap"),
            ("get", VM, "0", "--consumer", "copy"),  # manual protect, never cleared
            ("io-mark", VM, "0x3000:8192"),
        ):
            proc = self.daemon.ctl(*args, check=False)
            if proc.returncode != 0:
                self.failures.append(f"dirtylogctl {' '.join(args)}: {proc.stderr.strip()}")
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            r.read()
        self.rounds += 1

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.round()
            except Exception as exc:  # reported by the test, not lost in this thread
                self.failures.append(repr(exc))
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(30)


def scrape_config(metrics_port: int, into: Path) -> Path:
    """monitoring/prometheus.yml with 1 s intervals and the daemon's port, its rules beside it."""
    text = (MONITORING / "prometheus.yml").read_text()
    for old, new in (
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
        ('"127.0.0.1:8742"', f'"127.0.0.1:{metrics_port}"'),
    ):
        assert text.count(old) == 1, f"monitoring/prometheus.yml no longer has {old!r} once"
        text = text.replace(old, new)
    into.mkdir()
    shutil.copy(MONITORING / "dirtylogd-alerts.yml", into)
    config = into / "prometheus.yml"
    config.write_text(text)
    return config


def grafana_regex(value: str) -> str:
    """A multi-value variable as Grafana puts it into PromQL: regex-escaped, in a string."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def dashboard_exprs(instance: str) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """The panels' queries (title, PromQL) and the query variables (name, selector, label),
    with the variables substituted as Grafana would for this instance and VM."""
    dashboard = json.loads((MONITORING / "dirtylogd-dashboard.json").read_text())
    values = {
        "$__rate_interval": RATE_INTERVAL,
        "$__range": RANGE,
        "$instance": grafana_regex(instance),
        "$vm": grafana_regex(VM),
    }

    def substitute(expr: str) -> str:
        for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(name, value)
        assert "$" not in expr, f"a dashboard variable the test does not know: {expr}"
        return expr

    panels = [
        (f"{p['title']} ({t['refId']})", substitute(t["expr"]))
        for p in dashboard["panels"]
        for t in p["targets"]
    ]
    variables = []
    for v in dashboard["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), *(\w+)\)", v["query"])
        assert m, f"variable {v['name']}: not label_values(selector, label): {v['query']}"
        variables.append((v["name"], substitute(m[1]), m[2]))
    return panels, variables


def wait_for(what: str, check: Any, timeout: float, prometheus: Prometheus) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline or prometheus.proc.poll() is not None:
            pytest.fail(f"{what} within {timeout} s; prometheus says:\n{prometheus.output()}")
        time.sleep(0.25)


@pytest.fixture(scope="session")
def prometheus_program() -> str:
    """Session-scoped, so a machine without prometheus skips before the wheel is built."""
    return need_tool("prometheus")


@dataclass
class Rig:
    daemon: WheelDaemon
    prometheus: Prometheus
    clients: Clients
    started: float  # time.monotonic() before the daemon started


@pytest.fixture
def rig(prometheus_program: str, installed_wheel: InstalledWheel, tmp_path: Path) -> Iterator[Rig]:
    """The daemon (a busy VM), Prometheus scraping it and the clients; all stopped at the end,
    whatever happened."""
    started = time.monotonic()
    metrics_port = free_port()
    daemon = WheelDaemon(installed_wheel, tmp_path, f"127.0.0.1:{metrics_port}")
    prometheus = clients = None
    try:
        daemon.ctl("vm", "create", VM, "--slot", "0:0:16M", "--backend", "softmmu")
        daemon.ctl("consumer", "add", VM, "tap", "--not-initially-set")
        daemon.ctl("consumer", "add", VM, "copy", "--manual-protect")
        daemon.ctl("workload", "start", VM, "--pps", "2000", "--vcpus", "2", "--dma-share", "0.1")
        daemon.ctl("dirty-limit", VM, "4", "--cpu-index", "0")  # the vCPU panel's limit series
        clients = Clients(daemon, f"http://127.0.0.1:{metrics_port}/metrics")
        clients.round()  # every series the clients make exists before the first scrape
        clients.start()
        prometheus = Prometheus(
            prometheus_program, scrape_config(metrics_port, tmp_path / "prom"), tmp_path
        )
        prometheus.wait_ready()
        yield Rig(daemon, prometheus, clients, started)
    finally:
        if clients is not None:
            clients.stop()
        if prometheus is not None:
            prometheus.stop()
        daemon.stop()


def test_prometheus_scrapes_rates_alerts_and_bounded_series_of_the_installed_daemon(rig):
    daemon, prometheus, clients = rig.daemon, rig.prometheus, rig.clients
    wait_for(
        f"{SCRAPES} successful scrapes",
        lambda: prometheus.query(f'sum_over_time(up{{job="dirtylogd"}}[1m]) >= {SCRAPES}'),
        SCRAPES * 3,
        prometheus,
    )
    healthy = time.time()
    assert not clients.failures, clients.failures
    (target,) = prometheus.api("targets")["activeTargets"]
    instance = target["labels"]["instance"]
    window = "5m"  # more than Prometheus has: every sample of its fresh storage

    # Every scrape returned the same series: no new one after the first, the same count.
    samples = prometheus.query(f'scrape_samples_scraped{{job="dirtylogd"}}[{window}]', healthy)
    per_scrape = [int(float(v)) for _, v in samples[0]["values"]]
    added = prometheus.query(f'scrape_series_added{{job="dirtylogd"}}[{window}]', healthy)
    new_series = [int(float(v)) for _, v in added[0]["values"]]
    distinct = prometheus.api(
        "series", **{"match[]": '{__name__=~"dirtylogd_.*|process_.*"}'}, start=0, end=healthy
    )
    print(f"\nsamples per scrape: {per_scrape}")
    print(f"new series per scrape: {new_series}")
    print(f"distinct dirtylogd_/process_ series stored: {len(distinct)}")
    assert len(per_scrape) >= SCRAPES and len(set(per_scrape)) == 1, per_scrape
    assert not any(new_series[1:]), f"series added after the first scrape: {new_series}"
    assert len(distinct) == per_scrape[0]
    threads = prometheus.query("dirtylogd_thread_cpu_seconds_total", healthy)
    labels = sorted(s["metric"]["thread"] for s in threads)
    assert labels == sorted(["main", "other", "worker", f"{VM}/vcpu0", f"{VM}/vcpu1"]), labels

    # The rules loaded and evaluated cleanly, and none was pending or firing at any evaluation:
    # not for the idle 'default' consumer, nor for 'copy', which reads but never clears.
    (group,) = prometheus.api("rules", type="alert")["groups"]
    assert {r["name"] for r in group["rules"]} == ALERTS
    assert all(r["health"] == "ok" for r in group["rules"]), group["rules"]
    raised = prometheus.query(f"count_over_time(ALERTS[{window}])", healthy)
    assert not raised, [s["metric"] for s in raised]
    assert prometheus.api("alerts")["alerts"] == []
    # ... though the old rule's condition holds for both (pages pending, none delivered):
    for consumer in ("default", "copy"):
        idle = (
            f'dirtylogd_pending_pages{{consumer="{consumer}"}} > 0 and '
            f'increase(dirtylogd_consumer_delivered_pages_total{{consumer="{consumer}"}}[30m]) == 0'
        )
        assert prometheus.query(idle, healthy), consumer
    reading = prometheus.query("increase(dirtylogd_consumer_reads_total[30m]) > 0", healthy)
    assert {s["metric"]["consumer"] for s in reading} == {"tap", "copy"}

    # Every panel's query and every variable of the dashboard returns data.
    panels, variables = dashboard_exprs(instance)
    empty = []
    for title, expr in panels:
        result = prometheus.query(expr, healthy)
        if not any(math.isfinite(float(s["value"][1])) for s in result):
            empty.append(f"{title}: {expr} -> {result}")
    assert not empty, "dashboard panels without data:\n" + "\n".join(empty)
    expected = {"instance": instance, "vm": VM}
    for name, selector, label in variables:
        found = prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert expected[name] in found, (name, selector, found)

    clients.stop()
    assert not clients.failures, clients.failures
    assert clients.rounds >= 3, f"only {clients.rounds} rounds of clients"

    # A killed daemon: DirtylogdDown is pending (its for: is 2m) on the first failed scrape.
    killed = time.monotonic()
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)

    def down() -> list[dict[str, Any]]:
        return [
            a for a in prometheus.api("alerts")["alerts"] if a["state"] in ("pending", "firing")
        ]

    alerts = wait_for("DirtylogdDown pending", down, 20, prometheus)
    assert [(a["labels"]["alertname"], a["labels"]["instance"]) for a in alerts] == [
        ("DirtylogdDown", instance)
    ], alerts
    print(f"DirtylogdDown pending {time.monotonic() - killed:.1f} s after the SIGKILL")
    print(f"daemon started, scraped, checked, killed: {time.monotonic() - rig.started:.1f} s")
