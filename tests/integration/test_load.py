"""The load benchmark, CI-sized: many clients and a storing guest, and not one page lost.

The documented run (64 clients, 4 GiB, 200,000 pages/s, 30 s) is
``python benchmarks/load.py``; this runs the same program smaller and checks its verdict.
"""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_sixteen_clients_looping_gets_on_a_storing_guest_lose_nothing():
    run = subprocess.run(
        [sys.executable, "load.py", "--clients", "16", "--gib", "1", "--seconds", "3", "--json"],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)
    assert result["errors"] == 0, result
    assert result["lost_pages"] == 0 and result["stale_pages"] == 0, result
    assert result["changed_pages"] > 100_000, result  # the guest really stored, widely
    assert result["fewest_gets"] >= 3, result  # every client really looped
