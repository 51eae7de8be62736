"""Prometheus metrics: one collector that reads the service's counters at scrape time.

Nothing on a hot path touches prometheus_client: the service and its backends keep plain ints,
and :class:`DirtylogdCollector` turns them into metric families when Prometheus scrapes. The
registry is always injected; the library's global one is never used.
"""

from __future__ import annotations

import platform
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dirtylogd import __version__
from dirtylogd.ops.vcpu_metrics import vcpu_metrics
from dirtylogd.qmp.telemetry import DROP_REASONS, ServerTelemetry
from dirtylogd.service.registry import Service
from kvmshim.s390.harvest_pool import THREAD_PREFIX

P = "dirtylogd_"


class DirtylogdCollector(Collector):
    def __init__(self, service: Service, server: ServerTelemetry) -> None:
        self.service = service
        self.server = server
        self._threads = ThreadCpu(psutil.Process())

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            P + "build_info", "dirtylogd version; always 1", labels=["version", "python"]
        )
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        yield from self._vm_metrics()
        yield from vcpu_metrics(list(self.service.vms.values()))
        yield from self._server_metrics()
        yield from self._thread_metrics()

    def _vm_metrics(self) -> Iterator[Metric]:
        vms = list(self.service.vms.values())
        count = GaugeMetricFamily(P + "vms", "VMs served")
        count.add_metric([], len(vms))
        harvests = CounterMetricFamily(P + "harvests", "Harvests of a memslot", labels=["vm"])
        durations = HistogramMetricFamily(
            P + "harvest_duration_seconds",
            "Time to harvest a memslot and append it to the slot's log (shared GETs not counted)",
            labels=["vm"],
        )
        dirty = CounterMetricFamily(
            P + "dirty_pages",
            "Dirty pages harvested, by source (uc: PGSTE_UC or the KVM log; io: reported I/O)",
            labels=["vm", "source"],
        )
        pending = GaugeMetricFamily(
            P + "pending_pages", "Pages waiting for a consumer", labels=["vm", "consumer"]
        )
        reads = CounterMetricFamily(
            P + "consumer_reads",
            "GET answers that reached a consumer's reader (manual-protect ones too)",
            labels=["vm", "consumer"],
        )
        delivered = CounterMetricFamily(
            P + "consumer_delivered_pages",
            "Dirty pages in GET answers that reached an auto-clearing consumer's reader",
            labels=["vm", "consumer"],
        )
        faults = CounterMetricFamily(
            P + "guest_faults", "Guest faults in the s390 model", labels=["vm", "kind"]
        )
        ipte = CounterMetricFamily(P + "ipte_notifications", "IPTE notifier calls", labels=["vm"])
        writes = CounterMetricFamily(
            P + "written_pages", "Pages stored, by path", labels=["vm", "path"]
        )
        io_marked = CounterMetricFamily(
            P + "io_marked_pages", "Pages reported by I/O", labels=["vm"]
        )
        overreach = CounterMetricFamily(
            P + "overreach_pages",
            "Pages an s390 harvest of a neighbouring slot consumed, counted dirty for safety",
            labels=["vm"],
        )
        failed = CounterMetricFamily(P + "vcpu_failures", "vCPU threads that died", labels=["vm"])
        rate = GaugeMetricFamily(
            P + "dirty_pages_per_second", "Dirty rate of the latest harvests", labels=["vm"]
        )
        unsaved = CounterMetricFamily(
            P + "state_write_failures",
            "VM records the state directory refused (a full or read-only disk)",
            labels=["vm"],
        )
        for name, n in sorted(self.service.state_write_failures.items()):
            unsaved.add_metric([name], n)
        for vm in vms:
            t = vm.telemetry
            harvests.add_metric([vm.name], t.harvests)
            durations.add_metric([vm.name], t.harvest_seconds.cumulative(), t.harvest_seconds.total)
            for source in ("uc", "io"):
                dirty.add_metric([vm.name, source], t.dirty_pages[source])
            io_marked.add_metric([vm.name], t.io_marked_pages)
            overreach.add_metric([vm.name], t.overreach_pages)
            with vm.lock:
                consumers = [
                    (c.name, c.pending_pages(), c.reads, c.delivered_pages)
                    for c in vm.consumers.values()
                    if not c.internal
                ]
            for name, n, read, given in consumers:
                pending.add_metric([vm.name, name], n)
                reads.add_metric([vm.name, name], read)
                delivered.add_metric([vm.name, name], given)
            stats = vm.backend.stats()
            for kind, n in stats.faults_by_kind.items():
                faults.add_metric([vm.name, kind], n)
            ipte.add_metric([vm.name], stats.ipte_notifications)
            failed.add_metric([vm.name], vm.backend.vcpu_failures)
            for path, n in stats.writes_by_path.items():
                writes.add_metric([vm.name, path], n)
            rate.add_metric([vm.name], _number(vm.dirty_rate()["dirty-pages-rate"]))
        yield from (
            count,
            harvests,
            durations,
            dirty,
            pending,
            reads,
            delivered,
            faults,
            ipte,
            overreach,
            failed,
            writes,
            io_marked,
            rate,
            unsaved,
        )

    def _server_metrics(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            P + "qmp_requests", "QMP commands by result", labels=["command", "result"]
        )
        for (command, result), n in sorted(self.server.requests.items()):
            requests.add_metric([command, result], n)
        clients = GaugeMetricFamily(P + "qmp_clients", "Connected QMP clients")
        clients.add_metric([], self.server.clients)
        refused = CounterMetricFamily(
            P + "qmp_refused_peers", "Connections refused by peer credentials"
        )
        refused.add_metric([], self.server.refused_peers)
        dropped = CounterMetricFamily(
            P + "qmp_dropped_clients",
            "Clients disconnected or turned away by the server's limits",
            labels=["reason"],
        )
        for reason in DROP_REASONS:
            dropped.add_metric([reason], self.server.dropped_clients[reason])
        yield from (requests, clients, refused, dropped)

    def _thread_metrics(self) -> Iterator[Metric]:
        """CPU time by thread role (see :class:`ThreadCpu`): a fixed set of series."""
        cpu = CounterMetricFamily(
            P + "thread_cpu_seconds",
            "CPU time of the daemon's threads by role: main, worker, state, <vm>/vcpuN; "
            "other is the rest of the process, exited threads included",
            labels=["thread"],
        )
        for label, seconds in sorted(self._threads.read().items()):
            cpu.add_metric([label], seconds)
        yield cpu


# Thread names the daemon gives, and the label each role is exported under. Every other thread —
# the metrics server's, one per scrape (socketserver names them Thread-N), a library's — is
# "other": a label per such thread would be a new series per scrape.
MAIN_THREAD = "MainThread"
WORKER_PREFIX = "dirtylogd-worker"  # the loop's default executor: harvests, encoding, queries
STATE_PREFIX = "dirtylogd-state"  # the state store's one thread
HARVEST_PREFIX = THREAD_PREFIX  # kvmshim's harvest pool: the chunks a worker hands off
POOL_LABELS = {WORKER_PREFIX: "worker", STATE_PREFIX: "state", HARVEST_PREFIX: "harvest"}
OTHER = "other"
_VCPU = re.compile(r".+/vcpu[0-9]+")  # kvmshim.backends.workload names them <vm>/vcpuN
_POOL_THREAD = re.compile(r"(.+)_[0-9]+")  # ThreadPoolExecutor names them <prefix>_N


def thread_label(name: str) -> str:
    """The role a thread's CPU is exported under; a pool's interchangeable threads share one."""
    if name == MAIN_THREAD:
        return "main"
    if _VCPU.fullmatch(name):
        return name
    pool = _POOL_THREAD.fullmatch(name)
    if pool and pool[1] in POOL_LABELS:
        return POOL_LABELS[pool[1]]
    return OTHER


def _python_thread_names() -> dict[int, str]:
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


class ThreadCpu:
    """CPU seconds per thread label, each a counter that never goes down while it is exported.

    A label's value is the CPU of its live threads plus the last-seen CPU of its threads that
    have exited since (a worker pool that shrinks does not go down); once none of its threads
    is left, its series ends, and a thread of the same name later (a workload restarted)
    starts it again from 0, which Prometheus reads as a counter reset, as for a new process.

    ``other`` is the process's total CPU (the kernel keeps exited threads' share in it) minus
    every other label: threads without a role, live or exited, and what a named thread used
    between the last scrape and its exit. Clock ticks are counted per thread and per process
    separately, so the difference can dip by a tick; it is held at its highest value instead.
    """

    def __init__(
        self,
        process: psutil.Process,
        names: Callable[[], dict[int, str]] = _python_thread_names,
    ) -> None:
        self._process = process
        self._names = names
        self._lock = threading.Lock()  # scrapes run in threads of their own, maybe two at once
        self._last: dict[int, tuple[str, float]] = {}  # tid: (label, CPU) at the last read
        self._retired: dict[str, float] = {}  # by live label: CPU of its exited threads
        self._ended = 0.0  # CPU of labels whose series have ended
        self._other = 0.0

    def read(self) -> dict[str, float]:
        """Seconds by label, ``other`` always among them."""
        with self._lock:
            names = self._names()
            seen: dict[int, tuple[str, float]] = {}
            for t in self._process.threads():
                label = thread_label(names.get(t.id, ""))
                if label != OTHER:
                    seen[t.id] = (label, t.user_time + t.system_time)
            total = sum(self._process.cpu_times()[:2])  # after the threads: it covers them
            for tid, (label, cpu) in self._last.items():
                now = seen.get(tid)
                if now is None or now[0] != label or now[1] < cpu:  # gone (or its id reused)
                    self._retired[label] = self._retired.get(label, 0.0) + cpu
            self._last = seen
            values: dict[str, float] = {}
            for label, cpu in seen.values():
                values[label] = values.get(label, 0.0) + cpu
            for label in [label for label in self._retired if label not in values]:
                self._ended += self._retired.pop(label)
            for label, cpu in self._retired.items():
                values[label] += cpu
            self._other = max(self._other, total - sum(values.values()) - self._ended)
            values[OTHER] = self._other
            return values


def _number(value: object) -> float:
    """A numeric entry of a QMP-shaped ``dict[str, object]`` answer, as a float."""
    if not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


class UnitProcessCollector(ProcessCollector):
    """prometheus_client's process_* series, with the boot time taken from CLOCK_BOOTTIME.

    The library reads the boot time from /proc/stat and exports nothing without it; the unit's
    ProcSubset=pid hides /proc/stat, while /proc/self (stat, limits, fd) stays visible.
    """

    def _boot_time(self) -> float:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def make_registry(
    service: Service, server: ServerTelemetry, proc: str = "/proc"
) -> CollectorRegistry:
    """The collectors /metrics serves; ``proc`` is where procfs is (a test gives a copy)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(DirtylogdCollector(service, server))
    UnitProcessCollector(proc=proc, registry=registry)
    return registry


def serve(registry: CollectorRegistry, host: str, port: int) -> Any:
    """Start the /metrics HTTP endpoint in a thread; returns the server (call .shutdown())."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
