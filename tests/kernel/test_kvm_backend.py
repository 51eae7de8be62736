"""The kvm backend through a real daemon: real guest stores on real vCPUs, real ioctls."""

import base64
import mmap
import time

import numpy as np
import pytest

from tests.integration.daemon_proc import Daemon
from tests.integration.schema_check import Schema
from tests.integration.test_introspection import KVM_ONLY

MiB, GiB = 1 << 20, 1 << 30
SLOTS = [  # 1 MiB, 1 GiB, and 100 pages (not a multiple of 64)
    {"slot": 0, "guest-phys-addr": 0, "size": MiB},
    {"slot": 1, "guest-phys-addr": 4 * GiB, "size": GiB},
    {"slot": 2, "guest-phys-addr": 2 * GiB, "size": 100 * 4096},
]


@pytest.fixture
def kvm_vm(kqmp, request):
    name = request.node.name[:50]
    kqmp("vm-create", name=name, backend="kvm", memslots=SLOTS)
    yield name
    kqmp("vm-remove", vm=name)


def pages(qmp, vm, slot, consumer="default"):
    r = qmp("dirty-log-get", vm=vm, slot=slot, consumer=consumer, encoding="ranges")
    return {p for first, n in r["ranges"] for p in range(first, first + n)}


def test_query_vms_reports_the_backend_and_kernel_capabilities(kqmp, kvm_vm):
    schema = Schema(kqmp("query-qmp-schema"))
    listed = kqmp("query-vms")
    schema.check_return("query-vms", listed)  # exactly the declared members, kvm's ones too
    assert KVM_ONLY - schema.seen == set()
    (vm,) = [v for v in listed if v["name"] == kvm_vm]
    assert vm["backend"] == "kvm"
    caps = vm["capabilities"]
    assert caps["arch"] == "x86_64" and caps["guest-program"] == "x86-64 long mode"
    assert caps["nr-memslots"] > 32 and "manual-dirty-log-protect2" in caps
    assert [m["npages"] for m in vm["memslots"]] == [256, 262144, 100]  # by slot id


def test_dirty_log_equals_the_guest_stores_round_after_round(kqmp, kvm_vm):
    rng = np.random.default_rng(3)
    bases = {s["slot"]: s["guest-phys-addr"] >> 12 for s in SLOTS}
    sizes = {s["slot"]: s["size"] >> 12 for s in SLOTS}
    for round_ in range(1, 9):
        expected = {
            slot: set(rng.choice(n, min(n, 300), replace=False).tolist())
            for slot, n in sizes.items()
        }
        if round_ % 3 == 0:
            expected[2] = set()  # a slot with no stores in this round
        gfns = [bases[s] + p for s, ps in expected.items() for p in ps]
        kqmp("sim-write-pages", vm=kvm_vm, gfns=gfns, value=round_)
        for slot in sizes:
            assert pages(kqmp, kvm_vm, slot) == expected[slot], (round_, slot)


def test_guest_copy_and_host_side_writes(kqmp, kvm_vm):
    data = bytes(range(256)) * 40
    kqmp(
        "sim-write", vm=kvm_vm, guest_phys_addr=4096 - 100, data=base64.b64encode(data).decode()
    )  # guest rep movsb over pages 0..3
    assert pages(kqmp, kvm_vm, 0) == {0, 1, 2, 3}
    back = kqmp("sim-read", vm=kvm_vm, guest_phys_addr=4096 - 100, length=len(data))
    assert base64.b64decode(back["data"]) == data
    kqmp("sim-write-pages", vm=kvm_vm, gfns=[50], value=9, path="dma", report=False)
    assert pages(kqmp, kvm_vm, 0) == set()  # KVM does not see host-side writes either
    kqmp("sim-write-pages", vm=kvm_vm, gfns=[51], value=9, path="dma", report=True)
    assert pages(kqmp, kvm_vm, 0) == {51}  # the daemon's I/O log closes the gap


def test_kernel_errnos_reach_the_qmp_client(kqmp, kvm_vm):
    cls, desc = kqmp.error("dirty-log-get", vm=kvm_vm, slot=7)
    assert cls == "GenericError" and "KVM_GET_DIRTY_LOG failed" in desc
    assert desc.endswith("(ENOENT)")
    kqmp(
        "memslot-set",
        vm=kvm_vm,
        slot=2,
        guest_phys_addr=2 * GiB,
        size=100 * 4096,
        log_dirty_pages=False,
    )
    cls, desc = kqmp.error("dirty-log-get", vm=kvm_vm, slot=2)
    assert "KVM_GET_DIRTY_LOG failed" in desc and desc.endswith("(ENOENT)")
    kqmp("consumer-add", vm=kvm_vm, name="mp", manual_protect=True)
    cls, desc = kqmp.error(
        "dirty-log-clear",
        vm=kvm_vm,
        slot=0,
        first_page=1,
        num_pages=64,
        bitmap=base64.b64encode(bytes(8)).decode(),
        consumer="mp",
    )
    assert "KVM_CLEAR_DIRTY_LOG failed" in desc and desc.endswith("(EINVAL)")
    cls, desc = kqmp.error("memslot-set", vm=kvm_vm, slot=3, guest_phys_addr=0, size=MiB)
    assert "KVM_SET_USER_MEMORY_REGION failed" in desc and desc.endswith("(EEXIST)")


def test_s390_only_operations_say_which_backend_has_them(kqmp, kvm_vm):
    cls, desc = kqmp.error("sim-set-storage-key", vm=kvm_vm, guest_phys_addr=0, key=0x10)
    assert cls == "GenericError" and "backend 'softmmu'" in desc
    cls, desc = kqmp.error("sim-read", vm=kvm_vm, guest_phys_addr=0, length=8, path="guest")
    assert cls == "GenericError" and "backend 'softmmu'" in desc
    cls, desc = kqmp.error("storage-keys-get", vm=kvm_vm, start_gfn=0, count=1)
    assert cls == "GenericError"
    assert desc.startswith(f"vm '{kvm_vm}': this backend has no storage keys: KVM on x86_64")
    vm = next(v for v in kqmp("query-vms") if v["name"] == kvm_vm)
    assert vm["capabilities"]["s390-skeys"] == 0  # KVM_CAP_S390_SKEYS, asked of the kernel


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        ("/nonexistent/kvm", "cannot open /nonexistent/kvm: No such file or directory"),
        ("/dev/null", "/dev/null is not a KVM device"),
    ],
)
def test_vm_create_names_why_kvm_is_unusable(tmp_path, device, reason):
    d = Daemon(tmp_path, metrics=False, env={"DIRTYLOGD_KVM_DEVICE": device})
    try:
        with d.client() as q:
            cls, desc = q.error("vm-create", name="k", backend="kvm")
            assert cls == "GenericError" and reason in desc, desc
            assert q("query-vms") == []
    finally:
        d.stop()


def test_kvm_selftest_method_with_the_workload_running(kqmp, kvm_daemon):
    """kernel-semantics §7.1 on real KVM: two vCPU threads store stamps while we harvest.

    Round k: snapshot the stamps, then harvest. A page whose stamp changed between two
    snapshots must be in one of the two harvests around it; a page reported dirty must carry,
    right after the harvest, a stamp of the previous harvest's generation or later.
    """
    kqmp(
        "vm-create",
        name="selftest",
        backend="kvm",
        memslots=[{"slot": 1, "guest-phys-addr": GiB, "size": 16 * MiB}],
    )
    ram = next(v for v in kqmp("query-vms") if v["name"] == "selftest")["ram-path"]
    region = next(m for v in kqmp("query-vms") if v["name"] == "selftest" for m in v["memslots"])
    f = open(ram, "rb")  # noqa: SIM115 - closed below
    mapped = mmap.mmap(f.fileno(), 16 * MiB, prot=mmap.PROT_READ, offset=region["ram-offset"])
    stamps = np.frombuffer(mapped, "<u8")[::512]

    def harvest():
        r = kqmp("dirty-log-get", vm="selftest", slot=1)
        bits = np.unpackbits(
            np.frombuffer(base64.b64decode(r["bitmap"]), np.uint8), bitorder="little"
        )
        return set(np.flatnonzero(bits).tolist()), r["generation"]

    try:
        kqmp("sim-workload-start", vm="selftest", pages_per_second=40_000, vcpus=2, seed=4)
        prev_snapshot = stamps.copy()
        prev_pages, prev_gen = harvest()
        checked = 0
        for _ in range(25):
            time.sleep(0.02)
            snapshot = stamps.copy()
            cur_pages, cur_gen = harvest()
            after = stamps.copy()
            changed = set(np.flatnonzero(snapshot != prev_snapshot).tolist())
            lost = changed - prev_pages - cur_pages
            assert not lost, f"stored but never reported: {sorted(lost)[:10]}"
            stale = [p for p in cur_pages if after[p] < prev_gen]
            assert not stale, f"reported dirty with old stamps: {stale[:10]}"
            checked += len(changed)
            prev_snapshot, prev_pages, prev_gen = snapshot, cur_pages, cur_gen
        assert checked > 1000
    finally:
        kqmp("sim-workload-stop", vm="selftest")
        kqmp("vm-remove", vm="selftest")
        del stamps
        mapped.close()
        f.close()


def test_a_dead_vcpu_is_reported_not_silently_frozen(kqmp, kvm_daemon):
    """Crash the guest for real: its code becomes ud2, and the #UD has nowhere to go."""
    kqmp(
        "vm-create",
        name="crash",
        backend="kvm",
        memslots=[{"slot": 0, "guest-phys-addr": 4 * GiB, "size": 4 * MiB}],
    )
    try:
        kqmp("sim-workload-start", vm="crash", pages_per_second=5000, vcpus=1, seed=1)
        time.sleep(0.2)
        ram = next(v for v in kqmp("query-vms") if v["name"] == "crash")["ram-path"]
        with open(ram, "r+b") as f:  # the guest program sits at the start of the RAM file
            f.write(b"\x0f\x0b" * 64)
        events = []
        deadline = time.monotonic() + 10
        while not events and time.monotonic() < deadline:
            events = [e for e in kqmp.pull_events(0.5) if e["event"] == "VCPU_FAILED"]
        assert events and events[0]["data"]["vm"] == "crash"
        assert "vcpu 0 stopped: KVM_EXIT_" in events[0]["data"]["error"]
        schema = Schema(kqmp("query-qmp-schema"))
        schema.check_event(events[0])  # the declared VCPU_FAILED: vm, vcpu, error
        listed = kqmp("query-vms")
        schema.check_return("query-vms", listed)  # workload.failed: a string now
        vm = next(v for v in listed if v["name"] == "crash")
        assert "vcpu 0 stopped" in vm["workload"]["failed"]
        assert not vm["workload"]["running"]
    finally:
        kqmp("vm-remove", vm="crash")
