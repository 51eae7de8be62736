"""Convergence on a real /dev/kvm VM: no dirty ring (KVM's bitmap attributes no page to a
vCPU), so limits and dirty-ring calcs are refused with QEMU's words; page-sampling and
dirty-bitmap calcs work, and the cpu throttle slows the guest."""

import threading
import time

import pytest

MiB = 1 << 20
VM = "kvm-conv"


@pytest.fixture
def busy_kvm_vm(kqmp, kvm_daemon):
    """A 256 MiB kvm VM with two vCPUs storing, and a consumer harvested every 100 ms (a
    migration's stand-in: it advances the stamp, so re-stored pages change)."""
    kqmp(
        "vm-create",
        name=VM,
        backend="kvm",
        memslots=[{"slot": 0, "guest-phys-addr": 0, "size": 256 * MiB}],
    )
    kqmp("consumer-add", vm=VM, name="mig", initially_set=False)
    kqmp("sim-workload-start", vm=VM, pages_per_second=20_000, vcpus=2, seed=5)
    stop = threading.Event()

    def harvest():
        with kvm_daemon.client() as c:
            while not stop.is_set():
                c("dirty-log-get", vm=VM, slot=0, consumer="mig")
                time.sleep(0.1)

    harvester = threading.Thread(target=harvest)
    harvester.start()
    try:
        time.sleep(0.3)
        yield VM
    finally:
        stop.set()
        harvester.join()
        kqmp("vm-remove", vm=VM)


def measured(kqmp, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (info := kqmp("query-dirty-rate", vm=VM))["status"] != "measured":
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    return info


def test_limits_and_dirty_ring_are_refused_without_a_ring(kqmp, busy_kvm_vm):
    cls, desc = kqmp.error("set-vcpu-dirty-limit", vm=VM, dirty_rate=10)
    assert cls == "GenericError"
    assert desc.startswith(
        "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set"
    )
    kqmp("cancel-vcpu-dirty-limit", vm=VM)  # QEMU: succeeds silently without a ring
    assert kqmp("query-vcpu-dirty-limit", vm=VM) == []
    cls, desc = kqmp.error("calc-dirty-rate", vm=VM, calc_time=1, mode="dirty-ring")
    assert desc.startswith("mode dirty-ring is not enabled, use other method instead. (The kvm")
    assert kqmp("query-dirty-rate", vm=VM)["status"] == "unstarted"


def test_page_sampling_and_dirty_bitmap_measure_the_guest(kqmp, busy_kvm_vm):
    kqmp("calc-dirty-rate", vm=VM, calc_time=1, mode="dirty-bitmap")
    bitmap = measured(kqmp)["dirty-rate"]
    kqmp("calc-dirty-rate", vm=VM, calc_time=1, sample_pages=16384)
    info = measured(kqmp)
    print(
        f"kvm: dirty-bitmap {bitmap} MiB/s, page-sampling {info['dirty-rate']} MiB/s "
        f"({info['dirty-samples']} of {info['sample-count']})"
    )
    assert bitmap > 10  # 2 x 10,000 stores/s of 4 KiB pages, most of them distinct
    assert info["sample-count"] == 4096 and 0.5 * bitmap <= info["dirty-rate"] <= 1.5 * bitmap


def test_the_cpu_throttle_slows_the_guest(kqmp, busy_kvm_vm):
    def stores_per_second():
        def stored():
            return next(v for v in kqmp("query-vms") if v["name"] == VM)["workload"]["pages-stored"]

        first = stored()
        time.sleep(1.0)
        return stored() - first

    free = stores_per_second()
    kqmp("cpu-throttle-set", vm=VM, percentage=75)
    time.sleep(0.2)
    slowed = stores_per_second()
    kqmp("cpu-throttle-set", vm=VM, percentage=0)
    print(f"kvm stores/s: free {free}, 75 % throttle {slowed}")
    assert slowed < 0.4 * free
    vm = next(v for v in kqmp("query-vms") if v["name"] == VM)
    assert vm["cpu-throttle-percentage"] == 0
