import pytest

from .daemon_proc import Daemon


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
