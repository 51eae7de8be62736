import time
import uuid

import pytest

from .daemon_proc import Daemon

MiB = 1 << 20


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon per test module; tests use their own VM names."""
    d = Daemon(tmp_path_factory.mktemp("dirtylogd"))
    yield d
    assert d.stop() == 0, d.output()


@pytest.fixture
def qmp(daemon):
    client = daemon.client()
    yield client
    client.close()


@pytest.fixture
def fresh_daemon(tmp_path):
    """A daemon of this test's own, for tests that restart, limit or inspect it."""
    made = []

    def start(*extra, **kwargs):
        d = Daemon(tmp_path, *extra, **kwargs)
        made.append(d)
        return d

    yield start
    for d in made:
        d.stop()


@pytest.fixture
def running_vm(qmp, request):
    """A 64 MiB softmmu VM (two slots) with two vCPUs storing 20,000 pages/s (the migration
    tests': test_migrate.py, test_migrate_keys.py)."""
    made = []

    def make(esop=True, pps=20_000, dma_share=0.0, dma_report=True, backend="softmmu", **model):
        name = f"mig-{uuid.uuid4().hex[:8]}"
        qmp(
            "vm-create",
            name=name,
            backend=backend,
            esop=esop,
            **model,  # kernel, hugepages
            memslots=[
                {"slot": 0, "guest-phys-addr": 4 << 30, "size": 48 * MiB},
                {"slot": 1, "guest-phys-addr": 8 << 30, "size": 16 * MiB},
            ],
        )
        qmp(
            "sim-workload-start",
            vm=name,
            pages_per_second=pps,
            vcpus=2,
            seed=7,
            dma_share=dma_share,
            dma_report=dma_report,
        )
        time.sleep(0.3)
        made.append(name)
        return name

    yield make
    for name in made:
        qmp("vm-remove", vm=name)
