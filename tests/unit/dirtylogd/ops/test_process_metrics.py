"""process_* series where the unit's ProcSubset=pid hides /proc/stat but not /proc/self."""

import os
import resource
import time
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dirtylogd.ops.metrics import UnitProcessCollector

NAMES = {
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
}


def _unit_procfs(tmp_path: Path) -> str:
    """A procfs as the unit sees it: this process's files, and no /proc/stat."""
    proc = tmp_path / "proc"
    me = proc / "self"
    me.mkdir(parents=True)
    for name in ("stat", "status", "limits"):
        (me / name).write_bytes(Path("/proc/self", name).read_bytes())
    (me / "fd").symlink_to("/proc/self/fd")
    assert not (proc / "stat").exists()
    return str(proc)


def _scrape(registry: CollectorRegistry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_library_collector_exports_nothing_there(tmp_path):
    registry = CollectorRegistry()
    ProcessCollector(proc=_unit_procfs(tmp_path), registry=registry)
    assert not NAMES & _scrape(registry).keys()


def test_every_process_series_is_exported_with_sane_values(tmp_path):
    registry = CollectorRegistry()
    UnitProcessCollector(proc=_unit_procfs(tmp_path), registry=registry)
    got = _scrape(registry)
    assert got.keys() >= NAMES
    me = psutil.Process()
    assert abs(got["process_start_time_seconds"] - me.create_time()) < 2
    assert got["process_start_time_seconds"] < time.time()
    assert got["process_resident_memory_bytes"] > 1 << 20
    assert got["process_virtual_memory_bytes"] >= got["process_resident_memory_bytes"]
    assert 0 < got["process_cpu_seconds_total"] <= sum(me.cpu_times()[:2]) + 1
    assert 3 <= got["process_open_fds"] <= len(os.listdir("/proc/self/fd")) + 5
    assert got["process_max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
