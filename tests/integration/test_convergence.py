"""Convergence over the real socket: calc-dirty-rate against the exact harvest rate in each
mode, QEMU's errors, the vCPU dirty limit and throttle, and until-disconnect.

The exact reference is a consumer of the test's own harvesting around the calc's window: the
pages its second GET reports over the time between the two GETs (taken at each GET's middle).
"""

import math
import threading
import time
import uuid

import pytest

from .schema_check import Schema

MiB = 1 << 20
SLOT_MIB = 512
PPS = 20_000  # stores/s of the random workload: ~70 MiB/s newly dirtied in a 1 s window


@pytest.fixture
def busy_vm(qmp):
    """A 512 MiB softmmu VM, two vCPUs storing PPS random pages/s, a consumer 'ref'."""
    name = f"conv-{uuid.uuid4().hex[:8]}"
    qmp(
        "vm-create",
        name=name,
        backend="softmmu",
        memslots=[{"slot": 0, "guest-phys-addr": 0, "size": SLOT_MIB * MiB}],
    )
    qmp("consumer-add", vm=name, name="ref", initially_set=False)
    qmp("sim-workload-start", vm=name, pages_per_second=PPS, vcpus=2, seed=11)
    time.sleep(0.3)
    yield name
    qmp("vm-remove", vm=name)


def ref_get(qmp, vm):
    """A GET of 'ref' and the moment it harvested (the middle of the call)."""
    before = time.monotonic()
    r = qmp("dirty-log-get", vm=vm, slot=0, consumer="ref")
    return r["dirty-pages"], (before + time.monotonic()) / 2


def wait_measured(qmp, vm, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (info := qmp("query-dirty-rate", vm=vm))["status"] != "measured":
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    return info


def calc_beside_reference(qmp, vm, **args):
    """One 1 s calc; (its answer, the exact MiB/s 'ref' saw over the same second)."""
    ref_get(qmp, vm)
    _, t0 = ref_get(qmp, vm)  # the first one only empties what came before
    qmp("calc-dirty-rate", vm=vm, calc_time=1, **args)
    assert qmp("query-dirty-rate", vm=vm)["status"] == "measuring"
    time.sleep(1.0 - (time.monotonic() - t0))
    pages, t1 = ref_get(qmp, vm)
    return wait_measured(qmp, vm), pages * 4096 / MiB / (t1 - t0)


def test_query_dirty_rate_before_any_calc_is_qemus_unstarted_plus_the_harvest_figures(qmp, busy_vm):
    info = qmp("query-dirty-rate", vm=busy_vm)
    Schema(qmp("query-qmp-schema")).check_return("query-dirty-rate", info)
    assert {k: info[k] for k in ("status", "mode", "start-time", "calc-time", "sample-pages")} == {
        "status": "unstarted",
        "mode": "page-sampling",
        "start-time": 0,
        "calc-time": 0,
        "sample-pages": 0,
    }
    assert info["calc-time-unit"] == "second" and "dirty-rate" not in info
    assert info["slots"] == [] and info["harvest-dirty-rate"] == 0
    ref_get(qmp, busy_vm)
    time.sleep(0.2)
    ref_get(qmp, busy_vm)
    info = qmp("query-dirty-rate", vm=busy_vm, calc_time_unit="millisecond")
    assert info["status"] == "unstarted" and info["calc-time-unit"] == "millisecond"
    assert info["harvest-dirty-rate"] > 0 and info["slots"][0]["dirty-pages"] > 0


def test_page_sampling_agrees_with_the_harvests_within_its_binomial_error(qmp, busy_vm):
    info, exact = calc_beside_reference(qmp, busy_vm, sample_pages=16384)
    n, k = info["sample-count"], info["dirty-samples"]
    assert n == SLOT_MIB * 16384 // 1024 and info["sample-pages"] == 16384
    p = k / n
    # 3 standard errors of the binomial share, 1 MiB/s of QEMU's floor, 3 % of timing.
    allowed = 3 * exact * math.sqrt((1 - p) / (p * n)) + 1 + 0.03 * exact
    print(f"page-sampling {info['dirty-rate']} MiB/s, exact {exact:.1f}, allowed {allowed:.1f}")
    assert abs(info["dirty-rate"] - exact) <= allowed
    assert info["mode"] == "page-sampling" and info["calc-time"] == 1


def test_dirty_bitmap_agrees_tightly_and_leaves_no_consumer(qmp, busy_vm):
    info, exact = calc_beside_reference(qmp, busy_vm, mode="dirty-bitmap")
    print(f"dirty-bitmap {info['dirty-rate']} MiB/s, exact {exact:.1f}")
    assert abs(info["dirty-rate"] - exact) <= 0.05 * exact + 1
    assert info["sample-pages"] == 0 and "sample-count" not in info
    (vm,) = [v for v in qmp("query-vms") if v["name"] == busy_vm]
    assert [c["name"] for c in vm["consumers"]] == ["default", "ref"]


def test_dirty_ring_agrees_tightly_per_vcpu(qmp, busy_vm):
    info, exact = calc_beside_reference(qmp, busy_vm, mode="dirty-ring")
    vcpus = info["vcpu-dirty-rate"]
    print(f"dirty-ring {info['dirty-rate']} MiB/s ({vcpus}), exact {exact:.1f}")
    assert [v["id"] for v in vcpus] == [0, 1]
    assert info["dirty-rate"] == sum(v["dirty-rate"] for v in vcpus)
    assert abs(info["dirty-rate"] - exact) <= 0.05 * exact + 2  # two floors
    assert min(v["dirty-rate"] for v in vcpus) > 0.3 * exact


def test_a_concurrent_dirty_bitmap_calc_takes_nothing_from_a_user_consumer(qmp):
    """The same stores, read by a user consumer with and without a calc in between."""
    name = f"conv-{uuid.uuid4().hex[:8]}"
    qmp(
        "vm-create",
        name=name,
        backend="softmmu",
        memslots=[{"slot": 0, "guest-phys-addr": 0, "size": 4 * MiB}],
    )
    try:
        qmp("consumer-add", vm=name, name="user", initially_set=False)
        seen = []
        for with_calc in (False, True):
            qmp("dirty-log-get", vm=name, slot=0, consumer="user")
            qmp("sim-write-pages", vm=name, gfns=[1, 2, 3], value=5)
            if with_calc:
                qmp(
                    "calc-dirty-rate",
                    vm=name,
                    calc_time=300,
                    calc_time_unit="millisecond",
                    mode="dirty-bitmap",
                )
                time.sleep(0.1)  # after its first harvest
                (vm,) = [v for v in qmp("query-vms") if v["name"] == name]
                assert [c["name"] for c in vm["consumers"]] == ["default", "user"]
            qmp("sim-write-pages", vm=name, gfns=[7, 900], value=6)
            if with_calc:
                info = wait_measured(qmp, name)
                assert info["dirty-rate"] >= 0
            r = qmp("dirty-log-get", vm=name, slot=0, consumer="user", encoding="ranges")
            seen.append(r["ranges"])
        assert seen[0] == seen[1] == [[1, 3], [7, 1], [900, 1]]
    finally:
        qmp("vm-remove", vm=name)


def test_calc_errors_are_qemus_and_change_nothing(qmp, busy_vm):
    def error(**args):
        cls, desc = qmp.error("calc-dirty-rate", vm=busy_vm, **args)
        assert cls == "GenericError"
        return desc

    assert error(calc_time=0) == "Calculation time is out of range [50ms, 60000ms]."
    assert error(calc_time=49, calc_time_unit="millisecond").startswith("Calculation time")
    assert error(calc_time=61).startswith("Calculation time")
    assert error(calc_time=1, mode="dirty-bitmap", sample_pages=512) == (
        "sample-pages is used only in page-sampling mode"
    )
    assert error(calc_time=1, sample_pages=127) == "sample-pages is out of range[128, 16384]."
    assert error(calc_time=1, sample_pages=16385).startswith("sample-pages is out of range")
    assert qmp("query-dirty-rate", vm=busy_vm)["status"] == "unstarted"
    qmp("calc-dirty-rate", vm=busy_vm, calc_time=2)
    # QEMU checks "measuring" first: a second calc is refused whatever its arguments.
    assert error(calc_time=0) == "the dirty rate is already being measured."
    info = qmp("query-dirty-rate", vm=busy_vm)
    assert info["status"] == "measuring" and info["calc-time"] == 2 and "dirty-rate" not in info
    assert info["sample-pages"] == 512
    wait_measured(qmp, busy_vm)
    qmp("calc-dirty-rate", vm=busy_vm, calc_time=60, calc_time_unit="millisecond")  # again: fine
    assert wait_measured(qmp, busy_vm)["calc-time"] == 0  # floored to seconds


def harvest_in_background(daemon, vm, stop):
    """A migration's stand-in: harvest 'ref' every 100 ms, so pages can be newly dirtied again."""
    with daemon.client() as c:
        while not stop.is_set():
            c("dirty-log-get", vm=vm, slot=0, consumer="ref")
            time.sleep(0.1)


def test_a_dirty_limit_holds_the_vcpu_near_it_and_cancel_restores_the_rate(daemon, qmp, busy_vm):
    stop = threading.Event()
    harvester = threading.Thread(target=harvest_in_background, args=(daemon, busy_vm, stop))
    harvester.start()
    try:
        assert qmp("query-vcpu-dirty-limit", vm=busy_vm) == []
        qmp("set-vcpu-dirty-limit", vm=busy_vm, cpu_index=0, dirty_rate=10)
        time.sleep(2.5)  # one period to brake, one to measure
        (info,) = qmp("query-vcpu-dirty-limit", vm=busy_vm)
        print("limited vCPU 0:", info)
        assert info["cpu-index"] == 0 and info["limit-rate"] == 10
        assert 8 <= info["current-rate"] <= 12
        free = qmp("query-dirty-rate", vm=busy_vm)["harvest-dirty-rate"]
        qmp("cancel-vcpu-dirty-limit", vm=busy_vm)
        assert qmp("query-vcpu-dirty-limit", vm=busy_vm) == []
        time.sleep(1.5)
        after = qmp("query-dirty-rate", vm=busy_vm)["harvest-dirty-rate"]
        print(f"VM rate with vCPU 0 limited {free} MiB/s, after cancel {after} MiB/s")
        assert after > free + 10  # vCPU 0 dirties at full speed again
    finally:
        stop.set()
        harvester.join()


def test_limit_errors_and_until_disconnect(daemon, qmp, busy_vm):
    _, desc = qmp.error("set-vcpu-dirty-limit", vm=busy_vm, cpu_index=2, dirty_rate=5)
    assert desc == f"incorrect cpu index specified (VM '{busy_vm}' runs 2 vCPUs)"
    assert qmp.error("cancel-vcpu-dirty-limit", vm=busy_vm, cpu_index=-1)[1].startswith(
        "incorrect cpu index specified"
    )
    holder = daemon.client()
    holder("set-vcpu-dirty-limit", vm=busy_vm, dirty_rate=20, until_disconnect=True)
    holder("cpu-throttle-set", vm=busy_vm, percentage=30, until_disconnect=True)
    assert [i["limit-rate"] for i in qmp("query-vcpu-dirty-limit", vm=busy_vm)] == [20, 20]
    _, desc = qmp.error("set-vcpu-dirty-limit", vm=busy_vm, dirty_rate=5)
    assert desc.startswith("can't set dirty page rate limit while migration is running")
    _, desc = qmp.error("cancel-vcpu-dirty-limit", vm=busy_vm)
    assert desc.startswith("can't cancel dirty page rate limit while migration is running")
    assert qmp.error("cpu-throttle-set", vm=busy_vm, percentage=0)[1].startswith(
        "can't set cpu throttle"
    )
    (vm,) = [v for v in qmp("query-vms") if v["name"] == busy_vm]
    assert vm["cpu-throttle-percentage"] == 30 and vm["vcpu-dirty-limit-period"] == 1000
    assert qmp.error("vcpu-dirty-limit-period-set", vm=busy_vm, period=50)[1].startswith("period")
    qmp("vcpu-dirty-limit-period-set", vm=busy_vm, period=500)
    (vm,) = [v for v in qmp("query-vms") if v["name"] == busy_vm]
    assert vm["vcpu-dirty-limit-period"] == 500
    holder.close()  # the socket closes: the daemon lifts both
    deadline = time.monotonic() + 5
    while qmp("query-vcpu-dirty-limit", vm=busy_vm):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (vm,) = [v for v in qmp("query-vms") if v["name"] == busy_vm]
    assert vm["cpu-throttle-percentage"] == 0
    qmp("set-vcpu-dirty-limit", vm=busy_vm, dirty_rate=5)  # free for anyone again
    qmp("set-vcpu-dirty-limit", vm=busy_vm, dirty_rate=0)  # QEMU: 0 cancels
    assert qmp("query-vcpu-dirty-limit", vm=busy_vm) == []


def test_the_throttle_slows_the_stores(qmp, busy_vm):
    def stored_rate():
        first = qmp("query-vms")
        time.sleep(1.0)
        second = qmp("query-vms")
        n = [
            next(v for v in q if v["name"] == busy_vm)["workload"]["pages-stored"]
            for q in (first, second)
        ]
        return n[1] - n[0]

    free = stored_rate()
    qmp("cpu-throttle-set", vm=busy_vm, percentage=75)
    time.sleep(0.2)
    slowed = stored_rate()
    qmp("cpu-throttle-set", vm=busy_vm, percentage=0)
    print(f"stores/s free {free}, at 75 % throttle {slowed}")
    assert slowed < 0.4 * free


def test_a_calc_on_a_removed_vm_ends_and_its_consumer_is_not_saved(fresh_daemon, tmp_path):
    d = fresh_daemon()
    with d.client() as q:
        q(
            "vm-create",
            name="keep",
            backend="softmmu",
            memslots=[{"slot": 0, "guest-phys-addr": 0, "size": 4 * MiB}],
        )
        q(
            "vm-create",
            name="gone",
            backend="softmmu",
            memslots=[{"slot": 0, "guest-phys-addr": 0, "size": 4 * MiB}],
        )
        q("calc-dirty-rate", vm="keep", calc_time=60, mode="dirty-bitmap")
        q("calc-dirty-rate", vm="gone", calc_time=60, mode="dirty-bitmap")
        time.sleep(0.2)
        started = time.monotonic()
        q("vm-remove", vm="gone")  # the calc is cancelled, not waited out
        assert time.monotonic() - started < 5
    assert d.stop() == 0, d.output()  # a graceful stop in the middle of a calc
    d = fresh_daemon()
    with d.client() as q:
        (vm,) = q("query-vms")
        assert [c["name"] for c in vm["consumers"]] == ["default"]
        assert q("query-dirty-rate", vm="keep")["status"] == "unstarted"
        q(
            "calc-dirty-rate",
            vm="keep",
            calc_time=100,
            calc_time_unit="millisecond",
            mode="dirty-bitmap",
        )
        assert wait_measured(q, "keep")["dirty-rate"] == 0
