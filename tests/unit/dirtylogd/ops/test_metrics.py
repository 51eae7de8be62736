"""CPU per thread role: a fixed set of labels, each a counter that never goes down.

Real threads of this process burn real CPU; ThreadCpu reads them from /proc as the daemon does.
"""

import threading
import time

import psutil
import pytest

from dirtylogd.ops.metrics import OTHER, STATE_PREFIX, WORKER_PREFIX, ThreadCpu, thread_label


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("MainThread", "main"),
        ("demo/vcpu0", "demo/vcpu0"),
        ("a/b/vcpu12", "a/b/vcpu12"),
        (f"{WORKER_PREFIX}_0", "worker"),
        (f"{WORKER_PREFIX}_31", "worker"),
        (f"{STATE_PREFIX}_0", "state"),
        ("Thread-164 (process_request_thread)", OTHER),  # one per scrape
        ("Thread-1 (serve_forever)", OTHER),
        ("asyncio_0", OTHER),
        (WORKER_PREFIX, OTHER),
        ("demo/vcpu", OTHER),
        ("", OTHER),  # not a Python thread
    ],
)
def test_thread_label_is_a_role_or_other(name, label):
    assert thread_label(name) == label


class Burner:
    """A thread that burns ``seconds`` of CPU, then waits to be let go before it exits."""

    def __init__(self, name: str, seconds: float) -> None:
        self.burnt = threading.Event()
        self.go = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(seconds,), name=name)
        self.thread.start()
        assert self.burnt.wait(30)

    def _run(self, seconds: float) -> None:
        start = time.thread_time()
        while time.thread_time() - start < seconds:
            pass
        self.burnt.set()
        self.go.wait(30)

    def exit(self) -> None:
        self.go.set()
        self.thread.join(30)


@pytest.fixture
def cpu():
    return ThreadCpu(psutil.Process())


def test_a_named_threads_series_ends_with_it_and_other_does_not_inherit_its_cpu(cpu):
    vcpu = Burner("t/vcpu0", 0.3)
    before = cpu.read()
    assert before["t/vcpu0"] >= 0.25
    vcpu.exit()
    after = cpu.read()
    assert "t/vcpu0" not in after
    # Only what it used since the last read (nothing: it was waiting) may move to 'other'.
    assert before[OTHER] <= after[OTHER] < before[OTHER] + 0.1


def test_other_keeps_the_cpu_of_threads_that_exited(cpu):
    cpu.read()
    burners = [Burner(f"Thread-{i} (process_request_thread)", 0.1) for i in range(3)]
    during = cpu.read()
    for b in burners:
        b.exit()
    after = cpu.read()
    assert set(after) == set(during)
    assert after[OTHER] >= during[OTHER] >= 0.25


def test_a_pool_that_loses_a_thread_does_not_go_down(cpu):
    first, second = (Burner(f"{WORKER_PREFIX}_{i}", 0.2) for i in range(2))
    both = cpu.read()["worker"]
    assert both >= 0.35
    first.exit()
    assert cpu.read()["worker"] >= both
    second.exit()
    assert "worker" not in cpu.read()


def test_overlapping_readers_each_see_counters_that_only_grow(cpu):
    """Scrapes run in threads of their own, and may overlap."""
    went_down: list[tuple[str, float, float]] = []

    def scrape() -> None:
        last: dict[str, float] = {}
        for _ in range(50):
            got = cpu.read()
            went_down.extend((k, last[k], v) for k, v in got.items() if v < last.get(k, v))
            last = got

    readers = [threading.Thread(target=scrape) for _ in range(4)]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    assert not went_down
