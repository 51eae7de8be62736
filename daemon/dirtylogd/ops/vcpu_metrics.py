"""Prometheus metrics of the convergence controls: per-vCPU dirty rates, limits, throttle.

Read from the backend's :class:`~kvmshim.backends.vcpu_control.VcpuControls` at scrape time, in
base units (bytes/s, ratio). The dirtied counter and the dirty rate need the model's dirty ring
(softmmu): on the kvm backend only the stored counter and the throttle are exported.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dirtylogd.service.vm import VmState
from kvmshim.abi import PAGE_SIZE

P = "dirtylogd_"


def vcpu_metrics(vms: Iterable[VmState]) -> Iterator[Metric]:
    """The families of every VM's vCPU controls (one scrape)."""
    throttle = GaugeMetricFamily(
        P + "cpu_throttle_ratio",
        "Share of time every vCPU is made to sleep (cpu-throttle-set; 0-0.99)",
        labels=["vm"],
    )
    limit = GaugeMetricFamily(
        P + "vcpu_dirty_limit_bytes_per_second",
        "A limited vCPU's dirty limit (set-vcpu-dirty-limit)",
        labels=["vm", "vcpu"],
    )
    rate = GaugeMetricFamily(
        P + "vcpu_dirty_rate_bytes_per_second",
        "Bytes a vCPU newly dirtied per second over the last period",
        labels=["vm", "vcpu"],
    )
    dirtied = CounterMetricFamily(
        P + "vcpu_dirtied_pages",
        "Pages a vCPU newly dirtied (its dirty ring's entries); reset when a workload starts",
        labels=["vm", "vcpu"],
    )
    stored = CounterMetricFamily(
        P + "vcpu_stored_pages",
        "Pages a vCPU stored to; reset when a workload starts",
        labels=["vm", "vcpu"],
    )
    for vm in vms:
        backend = vm.backend
        ring = backend.has_dirty_ring
        throttle.add_metric([vm.name], backend.vcpu_controls.throttle / 100)
        for r in backend.vcpu_rates():
            labels = [vm.name, str(r.vcpu)]
            if r.limit is not None:
                limit.add_metric(labels, r.limit * PAGE_SIZE)
            if ring:
                rate.add_metric(labels, r.current * PAGE_SIZE)
        snapshot = backend.dirty_ring_snapshot()
        if snapshot is not None:
            for vcpu, (n_stored, n_dirtied) in enumerate(
                zip(snapshot.stored.tolist(), snapshot.dirtied.tolist(), strict=True)
            ):
                stored.add_metric([vm.name, str(vcpu)], n_stored)
                if ring:
                    dirtied.add_metric([vm.name, str(vcpu)], n_dirtied)
    yield from (throttle, limit, rate, dirtied, stored)
