"""dirtylogctl migrate --auto-converge / --dirty-limit against a real daemon: a guest that
dirties faster than the copy converges once slowed, the slow-down is lifted whatever happens,
and its cost to the guest is reported."""

import json
import signal
import subprocess
import sys
import time

import pytest

from .test_migrate import ctl, migrate, receiver, vm_state

# 64 MiB guest, two vCPUs storing 50,000 pages/s: every round dirties about every page again,
# so at 100 MB/s it never converges unslowed (test_migrate's max-rounds test shows the same).
FAST = 50_000
CAP = ["--max-bandwidth", "100M", "--max-rounds", "12"]


def assert_nothing_left_on(qmp, vm):
    state = vm_state(qmp, vm)
    assert state["cpu-throttle-percentage"] == 0
    assert qmp("query-vcpu-dirty-limit", vm=vm) == []


def test_auto_converge_throttles_a_fast_guest_until_it_converges(daemon, qmp, running_vm, tmp_path):
    vm = running_vm(pps=FAST)
    out, doc = migrate(
        daemon,
        vm,
        str(tmp_path / "image"),
        "--verify",
        "--resume",
        "--auto-converge",
        "--cpu-throttle-initial",
        "99",
        *CAP,
    )
    assert out.returncode == 0, out.stderr
    assert doc["converged"] is True and doc["downtime"] <= 300
    assert doc["verify"]["differing-pages"] == 0
    conv = doc["convergence"]
    assert conv["mode"] == "auto-converge" and conv["cpu-throttle-steps"] == [99]
    rates = conv["guest-stores-per-second"]
    # 99 % asleep: the guest stores about a hundredth; after the lift it runs at full speed
    assert rates["during"] < rates["before"] / 10
    # ... and not faster: a vCPU that was stopped makes up no stores once continued
    assert rates["before"] / 2 < rates["after"] < rates["before"] * 1.3
    assert any("cpu throttle 99 %" in n for n in doc["notes"])
    assert_nothing_left_on(qmp, vm)


def test_dirty_limit_limits_every_vcpu_until_it_converges(daemon, qmp, running_vm, tmp_path):
    vm = running_vm(pps=FAST)
    out, doc = migrate(
        daemon,
        vm,
        str(tmp_path / "image"),
        "--verify",
        "--resume",
        "--dirty-limit",
        "1",
        "--vcpu-dirty-limit-period",
        "300",
        *CAP,
    )
    assert out.returncode == 0, out.stderr
    assert doc["converged"] is True and doc["downtime"] <= 300
    assert doc["verify"]["differing-pages"] == 0
    conv = doc["convergence"]
    assert conv["mode"] == "dirty-limit" and conv["vcpu-dirty-limit"] == 1
    assert conv["dirty-limit-round"] >= 2  # QEMU's rule: the second too-dirty period
    assert conv["vcpu-dirty-limit-period"] == 300
    assert vm_state(qmp, vm)["vcpu-dirty-limit-period"] == 1000  # the VM's own, put back
    assert conv["guest-stores-per-second"]["during"] < conv["guest-stores-per-second"]["before"]
    assert_nothing_left_on(qmp, vm)


def test_without_either_the_same_guest_does_not_converge(daemon, running_vm, tmp_path):
    vm = running_vm(pps=FAST)
    out, doc = migrate(
        daemon, vm, str(tmp_path / "image"), "--resume", *CAP[:2], "--max-rounds", "4"
    )
    assert out.returncode == 0, out.stderr
    assert doc["converged"] is False and "convergence" not in doc


def test_a_failed_migration_lifts_the_throttle(daemon, qmp, running_vm, tmp_path):
    vm = running_vm(pps=FAST)
    with receiver(tmp_path / "remote.img") as (dest, port):
        driver = start_driver(daemon, vm, f"tcp:127.0.0.1:{port}")
        try:
            wait_for_throttle(qmp, vm, driver)
            dest.kill()  # the destination dies after the guest was slowed
            _out, err = driver.communicate(timeout=60)
        finally:
            driver.kill()
    assert driver.returncode == 1, err
    assert "migration failed" in err and "the source VM is running" in err
    assert_nothing_left_on(qmp, vm)
    assert vm_state(qmp, vm)["paused"] is False


def start_driver(daemon, vm, destination):
    """A migration slowed early (90 % at the first firing) that takes long at 20 MB/s."""
    args = ["--json", "migrate", vm, destination, "--auto-converge"]
    args += ["--cpu-throttle-initial", "90", "--max-bandwidth", "20M", "--max-rounds", "50"]
    return subprocess.Popen(
        [sys.executable, "-m", "dirtylogctl.cli", "-s", daemon.socket, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_throttle(qmp, vm, driver):
    deadline = time.monotonic() + 60
    while vm_state(qmp, vm)["cpu-throttle-percentage"] == 0:
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, "the throttle never came"
        time.sleep(0.2)


def test_a_killed_driver_leaves_no_throttle_behind(daemon, qmp, running_vm, tmp_path):
    vm = running_vm(pps=FAST)
    driver = start_driver(daemon, vm, str(tmp_path / "image"))
    try:
        wait_for_throttle(qmp, vm, driver)
        driver.send_signal(signal.SIGKILL)  # no cleanup runs: the daemon must lift it
        driver.wait(10)
        deadline = time.monotonic() + 10
        while vm_state(qmp, vm)["cpu-throttle-percentage"] != 0:
            assert time.monotonic() < deadline, "the daemon kept the dead driver's throttle"
            time.sleep(0.1)
    finally:
        driver.kill()
        driver.communicate()
    assert_nothing_left_on(qmp, vm)


def test_both_at_once_is_refused_in_qemus_words(daemon, running_vm, tmp_path):
    vm = running_vm(pps=1000)
    out = ctl(
        daemon, "migrate", vm, str(tmp_path / "image"), "--auto-converge", "--dirty-limit", "5"
    )
    assert out.returncode == 2
    assert "dirty-limit conflicts with auto-converge" in out.stderr
    assert not (tmp_path / "image").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--cpu-throttle-initial", "100"),
        ("--throttle-trigger-threshold", "0"),
        ("--dirty-limit", "0"),
    ],
)
def test_out_of_range_parameters_are_usage_errors(daemon, running_vm, tmp_path, flag, value):
    vm = running_vm(pps=1000)
    out = ctl(daemon, "migrate", vm, str(tmp_path / "image"), flag, value)
    assert out.returncode == 2 and flag in out.stderr


def test_max_below_initial_gets_qemus_words(daemon, running_vm, tmp_path):
    vm = running_vm(pps=1000)
    out = ctl(
        daemon,
        "migrate",
        vm,
        str(tmp_path / "image"),
        "--auto-converge",
        "--cpu-throttle-initial",
        "50",
        "--max-cpu-throttle",
        "40",
    )
    assert out.returncode == 2
    assert (
        "'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial" in out.stderr
    )


def test_json_report_is_valid_without_convergence(daemon, running_vm, tmp_path):
    vm = running_vm(pps=1000)
    out, doc = migrate(daemon, vm, str(tmp_path / "image"))
    assert out.returncode == 0, out.stderr
    json.dumps(doc)
    assert "convergence" not in doc


def test_a_limit_past_2_to_the_32_mib_per_s_is_refused_not_rounded(qmp, running_vm):
    vm = running_vm(pps=1000)
    cls, desc = qmp.error("set-vcpu-dirty-limit", vm=vm, dirty_rate=(1 << 32) + 1)
    assert cls == "GenericError" and "dirty-rate" in desc
    qmp("set-vcpu-dirty-limit", vm=vm, dirty_rate=1 << 32, cpu_index=0)
    assert qmp("query-vcpu-dirty-limit", vm=vm)[0]["limit-rate"] == 1 << 32  # exact
