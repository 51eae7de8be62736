"""The shipped alert rules and dashboard: valid, tested, and about metrics the daemon exports."""

import json
import re
import subprocess
import time
from pathlib import Path

from tests.conftest import need_tool

MON = Path(__file__).resolve().parents[2] / "monitoring"
MiB = 1 << 20


def test_alert_rules_check_and_pass_their_unit_tests():
    promtool = need_tool("promtool")
    for args in (
        ["check", "rules", "dirtylogd-alerts.yml"],
        ["test", "rules", "dirtylogd-alerts.test.yml"],
        ["check", "config", "prometheus.yml"],  # the scrape-config example, with the rules
    ):
        out = subprocess.run([promtool, *args], cwd=MON, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_windows_follow_the_scrape_interval_and_panels_filter_by_instance():
    """A fixed [1m] is empty at a 1m scrape interval and coarse at 1s; $__rate_interval is
    Grafana's answer. Every query selects the $instance variable's targets."""
    dashboard = json.loads((MON / "dirtylogd-dashboard.json").read_text())
    assert "instance" in {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            windows = re.findall(r"\b(?:rate|increase)\([^\[]*\[([^\]]+)\]", expr)
            assert set(windows) <= {"$__rate_interval", "$__range"}, (panel["title"], expr)
            selectors = re.findall(r"\b(?:dirtylogd|process)_[a-z_]+(\{[^}]*\})?", expr)
            assert selectors, (panel["title"], expr)
            assert all('instance=~"$instance"' in s for s in selectors), (panel["title"], expr)


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b((?:dirtylogd|process)_[a-z_]+)", text))


def test_dashboard_and_rules_only_use_exported_metrics(daemon, qmp):
    qmp("vm-create", name="mon", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
    qmp("dirty-log-get", vm="mon", slot=0)
    # The vCPU panel's series: a running workload, one vCPU limited, a period measured.
    qmp("sim-workload-start", vm="mon", pages_per_second=1000, vcpus=1)
    qmp("set-vcpu-dirty-limit", vm="mon", dirty_rate=1)
    time.sleep(1.2)
    exported = daemon.metrics()
    exported_names = _metric_names(exported)
    dashboard = json.loads((MON / "dirtylogd-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = _metric_names("\n".join(exprs)) | _metric_names(
        (MON / "dirtylogd-alerts.yml").read_text()
    )
    assert used, "no metrics referenced"
    assert used <= exported_names, sorted(used - exported_names)
    qmp("vm-remove", vm="mon")
