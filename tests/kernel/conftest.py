"""Kernel tests run against the real /dev/kvm; without a usable one they skip (fail in CI)."""

import os
import platform

import pytest

from kvmshim.errors import KvmError
from kvmshim.kvm import KvmDevice
from tests.conftest import need
from tests.integration.daemon_proc import Daemon


def _kvm_usable() -> str | None:
    try:
        dev = KvmDevice()
    except KvmError as exc:
        return str(exc)
    try:
        dev.create_vm().close()
    except KvmError as exc:
        return str(exc)
    finally:
        dev.close()
    return None


_PROBLEM = _kvm_usable()


@pytest.fixture(autouse=True)
def require_kvm():
    need(_PROBLEM is None, f"no usable /dev/kvm: {_PROBLEM}")
    need(platform.machine() == "x86_64", "the guest program is x86-64 only")


@pytest.fixture(scope="module")
def kvm_daemon(tmp_path_factory):
    if _PROBLEM is not None or not os.path.exists("/dev/kvm"):
        pytest.skip("no usable /dev/kvm")
    d = Daemon(tmp_path_factory.mktemp("kvm-daemon"), metrics=False)
    yield d
    assert d.stop() == 0, d.output()


@pytest.fixture
def kqmp(kvm_daemon):
    with kvm_daemon.client() as client:
        yield client
