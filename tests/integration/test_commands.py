"""Every command through qemu.qmp: happy path, exact error class, errno, state unchanged."""

import base64
import os
import stat
import time

import pytest

MiB = 1 << 20


def vm_named(qmp, name):
    return next(v for v in qmp("query-vms") if v["name"] == name)


@pytest.fixture
def vm(qmp, request):
    """A softmmu VM named after the test, slot 0 = [0, 4 MiB) logged, slot 1 = [16, 18 MiB)."""
    name = request.node.name.replace("[", "-").replace("]", "")[:60]
    qmp(
        "vm-create",
        name=name,
        memslots=[
            {"slot": 0, "guest-phys-addr": 0, "size": 4 * MiB},
            {"slot": 1, "guest-phys-addr": 16 * MiB, "size": 2 * MiB},
        ],
        backend="softmmu",
    )
    yield name
    qmp("vm-remove", vm=name)


def pages(qmp, vm, slot=0, **kw):
    r = qmp("dirty-log-get", vm=vm, slot=slot, encoding="ranges", **kw)
    return [p for first, n in r["ranges"] for p in range(first, first + n)]


def test_query_version_is_qemus_version_info_with_dirtylogds_numbers(qmp):
    v = qmp("query-version")
    assert set(v) == {"qemu", "package"}
    assert v["package"] == "dirtylogd {major}.{minor}.{micro}".format(**v["qemu"])


def test_vm_create_shows_in_query_vms(qmp, vm):
    entry = vm_named(qmp, vm)
    assert entry["backend"] == "softmmu" and entry["capabilities"]["esop"] is True
    assert [(m["slot"], m["npages"], m["log-dirty-pages"]) for m in entry["memslots"]] == [
        (0, 1024, True),
        (1, 512, True),
    ]
    assert [c["name"] for c in entry["consumers"]] == ["default"]
    assert stat.S_IMODE(os.stat(entry["ram-path"]).st_mode) == 0o640


def test_vm_create_errors_change_nothing(qmp, vm):
    before = qmp("query-vms")
    assert qmp.error("vm-create", name=vm) == ("GenericError", f"a VM named '{vm}' already exists")
    cls, desc = qmp.error(
        "vm-create",
        name="overlap",
        memslots=[
            {"slot": 0, "guest-phys-addr": 0, "size": MiB},
            {"slot": 1, "guest-phys-addr": 0x80000, "size": MiB},
        ],
    )
    assert cls == "GenericError" and desc.endswith("(EEXIST)") and "slot 1 of vm 'overlap'" in desc
    assert qmp.error("vm-create", name="../etc")[1].startswith("Parameter 'name' expects")
    assert qmp.error("vm-create", name="b", backend="qemu")[1].startswith(
        "Parameter 'backend' must be one of"
    )
    assert qmp.error("vm-create", name="c", memslots=[{"slot": 0, "size": MiB}]) == (
        "GenericError",
        "Parameter 'memslots[0].guest-phys-addr' is missing",
    )
    assert qmp("query-vms") == before


def test_vm_remove_unknown_is_device_not_found(qmp):
    assert qmp.error("vm-remove", vm="nobody") == ("DeviceNotFound", "no VM named 'nobody'")


def test_memslot_set_create_move_flags_delete(qmp, vm):
    qmp("memslot-set", vm=vm, slot=2, guest_phys_addr=32 * MiB, size=MiB)
    qmp("sim-write-pages", vm=vm, gfns=[32 * 256 + 3], value=5)
    qmp("memslot-set", vm=vm, slot=2, guest_phys_addr=64 * MiB, size=MiB)  # move
    assert pages(qmp, vm, 2) == [3]  # dirt follows the slot
    qmp("memslot-set", vm=vm, slot=2, guest_phys_addr=64 * MiB, size=MiB, log_dirty_pages=False)
    assert qmp.error("dirty-log-get", vm=vm, slot=2) == (
        "GenericError",
        f"slot 2 of vm '{vm}': dirty logging is not enabled (ENOENT)",
    )
    qmp("memslot-set", vm=vm, slot=2, guest_phys_addr=0, size=0)  # delete
    assert [m["slot"] for m in vm_named(qmp, vm)["memslots"]] == [0, 1]


@pytest.mark.parametrize(
    ("args", "errno_name"),
    [
        ({"slot": 3, "guest-phys-addr": 123, "size": MiB}, "EINVAL"),  # unaligned
        ({"slot": 3, "guest-phys-addr": 0, "size": MiB}, "EEXIST"),  # overlaps slot 0
        ({"slot": 0, "guest-phys-addr": 0, "size": 8 * MiB}, "EINVAL"),  # resize
        ({"slot": 40, "guest-phys-addr": 64 * MiB, "size": MiB}, "EINVAL"),  # id >= 32 on s390
        ({"slot": 3, "as-id": 1, "guest-phys-addr": 64 * MiB, "size": MiB}, "EINVAL"),
        ({"slot": 9, "guest-phys-addr": 0, "size": 0}, "EINVAL"),  # delete what is not there
    ],
)
def test_memslot_set_errors_carry_the_errno_and_change_nothing(qmp, vm, args, errno_name):
    before = vm_named(qmp, vm)["memslots"]
    cls, desc = qmp.error("memslot-set", vm=vm, **{k.replace("-", "_"): v for k, v in args.items()})
    assert cls == "GenericError" and desc.endswith(f"({errno_name})"), desc
    assert vm_named(qmp, vm)["memslots"] == before


def test_dirty_log_get_encodings_agree(qmp, vm):
    qmp("sim-write-pages", vm=vm, gfns=[0, 1, 2, 700], value=1)
    qmp("consumer-add", vm=vm, name="b", initially_set=False)
    qmp("consumer-add", vm=vm, name="c", initially_set=False)
    bitmap = qmp("dirty-log-get", vm=vm, slot=0)  # harvests into every consumer
    raw = base64.b64decode(bitmap["bitmap"])
    assert len(raw) == 1024 // 8 and raw[0] == 0b111 and raw[700 // 8] == 1 << (700 % 8)
    assert bitmap["dirty-pages"] == 4 and bitmap["npages"] == 1024
    ranges = qmp("dirty-log-get", vm=vm, slot=0, consumer="b", encoding="ranges")
    assert ranges["ranges"] == [[0, 3], [700, 1]]
    fd = os.memfd_create("bm")
    qmp.send_fd(fd)
    qmp("getfd", fdname="bm")
    by_fd = qmp("dirty-log-get", vm=vm, slot=0, consumer="c", encoding="fd", fdname="bm")
    assert "bitmap" not in by_fd and by_fd["dirty-pages"] == 4
    assert os.pread(fd, 128, 0) == raw
    os.close(fd)


def test_dirty_log_get_errors(qmp, vm):
    assert qmp.error("dirty-log-get", vm="nope", slot=0)[0] == "DeviceNotFound"
    assert qmp.error("dirty-log-get", vm=vm, slot=0, consumer="ghost") == (
        "DeviceNotFound",
        f"vm '{vm}' has no consumer named 'ghost'",
    )
    assert qmp.error("dirty-log-get", vm=vm, slot=5)[1].endswith("no such memslot (ENOENT)")
    assert qmp.error("dirty-log-get", vm=vm, slot=40)[1].endswith("(EINVAL)")
    assert qmp.error("dirty-log-get", vm=vm, slot=0, as_id=1)[1].endswith("(EINVAL)")
    assert "needs fdname" in qmp.error("dirty-log-get", vm=vm, slot=0, encoding="fd")[1]
    assert (
        "no file descriptor named"
        in qmp.error("dirty-log-get", vm=vm, slot=0, encoding="fd", fdname="none")[1]
    )
    assert qmp.error("dirty-log-get", vm=vm, slot=-1)[1].startswith("Parameter 'slot' must be")
    assert qmp.error("dirty-log-get", vm=vm, slot="0")[1] == "Parameter 'slot' expects an integer"
    assert qmp.error("dirty-log-get", vm=vm, slot=True)[1] == "Parameter 'slot' expects an integer"
    assert (
        qmp.error("dirty-log-get", vm=vm, slot=0, bogus=1)[1] == "Parameter 'bogus' is unexpected"
    )


def test_failed_get_for_an_unknown_consumer_harvests_nothing(qmp, vm):
    qmp("sim-write-pages", vm=vm, gfns=[5], value=1)
    qmp.error("dirty-log-get", vm=vm, slot=0, consumer="ghost")
    assert pages(qmp, vm) == [5]


def test_inline_answer_too_large_says_to_use_fd(fresh_daemon):
    d = fresh_daemon("--max-reply-bytes", "4096", metrics=False)
    with d.client() as q:
        q("vm-create", name="big", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": 256 * MiB}])
        q("sim-write-pages", vm="big", gfns=[1], value=1)
        cls, desc = q.error("dirty-log-get", vm="big", slot=0)
        assert cls == "GenericError" and "use encoding 'fd'" in desc
        assert q("dirty-log-get", vm="big", slot=0, encoding="ranges")["ranges"] == [[1, 1]]


def test_dirty_log_clear_rules(qmp, vm):
    qmp("consumer-add", vm=vm, name="mp", manual_protect=True)
    everything = base64.b64encode(b"\xff" * 8).decode()
    for first, num, errno_name in [(1, 64, "EINVAL"), (0, 63, "EINVAL"), (1000, 64, "EINVAL")]:
        cls, desc = qmp.error(
            "dirty-log-clear",
            vm=vm,
            slot=0,
            first_page=first,
            num_pages=num,
            bitmap=everything,
            consumer="mp",
        )
        assert cls == "GenericError" and desc.endswith(f"({errno_name})"), desc
    cls, desc = qmp.error(
        "dirty-log-clear",
        vm=vm,
        slot=0,
        first_page=0,
        num_pages=128,
        bitmap=everything,
        consumer="mp",
    )
    assert "must be 16 bytes" in desc and desc.endswith("(EINVAL)")
    assert (
        qmp.error(
            "dirty-log-clear",
            vm=vm,
            slot=0,
            first_page=0,
            num_pages=64,
            bitmap="***",
            consumer="mp",
        )[1]
        == "Parameter 'bitmap' is not valid base64"
    )
    assert qmp("dirty-log-get", vm=vm, slot=0, consumer="mp")["dirty-pages"] == 1024  # unchanged
    qmp(
        "dirty-log-clear",
        vm=vm,
        slot=0,
        first_page=960,
        num_pages=64,
        bitmap=everything,
        consumer="mp",
    )  # the slot's last 64 pages
    assert qmp("dirty-log-get", vm=vm, slot=0, consumer="mp")["dirty-pages"] == 960


def test_io_dirty_mark_is_all_or_nothing(qmp, vm):
    assert qmp(
        "io-dirty-mark", vm=vm, ranges=[{"guest-phys-addr": 4096 + 100, "length": 8000}]
    ) == {"pages": 2}
    cls, desc = qmp.error(
        "io-dirty-mark",
        vm=vm,
        ranges=[
            {"guest-phys-addr": 0, "length": 4096},
            {"guest-phys-addr": 4 * MiB - 4096, "length": 8192},
        ],
    )  # runs past slot 0 into a hole
    assert cls == "GenericError" and desc.endswith("(EFAULT)")
    assert pages(qmp, vm) == [1, 2]  # only the first, successful call


def test_sim_read_write_and_storage_key(qmp, vm):
    data = bytes(range(200))
    qmp("sim-write", vm=vm, guest_phys_addr=16 * MiB + 10, data=base64.b64encode(data).decode())
    back = qmp("sim-read", vm=vm, guest_phys_addr=16 * MiB + 10, length=200)
    assert base64.b64decode(back["data"]) == data
    assert pages(qmp, vm, 1) == [0]
    qmp("sim-set-storage-key", vm=vm, guest_phys_addr=3 * 4096, key=0x30)
    assert pages(qmp, vm) == [3]  # a guest key change is a change of the page
    assert qmp.error("sim-write", vm=vm, guest_phys_addr=8 * MiB, data="AAAA")[1].endswith(
        "is in no memslot (EFAULT)"
    )
    assert qmp.error("sim-read", vm=vm, guest_phys_addr=0, length=1, path="dma")[1].startswith(
        "Parameter 'path' must be one of"
    )


def test_storage_keys_get_reads_the_guests_view_and_dirties_nothing(qmp, vm):
    """[2]: never touched, 0 / [3]: the guest set 0x36 on an unmapped page: ACC/F and R/C from
    the PGSTE / [4]: 0 / [5]: a guest store mapped it: the real key with R|C (0x06)"""
    qmp("sim-set-storage-key", vm=vm, guest_phys_addr=3 * 4096, key=0x36)
    qmp("sim-write-pages", vm=vm, gfns=[5], value=1)
    assert pages(qmp, vm) == [3, 5]  # harvested: from here on, nothing is dirty
    got = qmp("storage-keys-get", vm=vm, start_gfn=2, count=4)
    keys = base64.b64encode(bytes([0x00, 0x36, 0x00, 0x06])).decode()
    assert got == {"start-gfn": 2, "count": 4, "uses-keys": True, "keys": keys}
    assert pages(qmp, vm) == []  # reading keys set no UC
    fd = os.memfd_create("keys")
    try:
        qmp.send_fd(fd)
        qmp("getfd", fdname="keys")
        got = qmp("storage-keys-get", vm=vm, start_gfn=0, count=1024, encoding="fd", fdname="keys")
        assert got == {"start-gfn": 0, "count": 1024, "uses-keys": True}
        written = os.pread(fd, 2048, 0)
        assert len(written) == 1024 and written[3] == 0x36 and written[5] == 0x06
        qmp("closefd", fdname="keys")
    finally:
        os.close(fd)


def test_storage_keys_get_errors_name_the_rule(qmp, vm):
    # slot 0 = gfn [0, 1024), slot 1 = gfn [4096, 4608): [1000, 1100) runs into the gap
    cls, desc = qmp.error("storage-keys-get", vm=vm, start_gfn=1000, count=100)
    assert cls == "GenericError"
    assert desc == f"vm '{vm}': guest address 0x400000 is in no memslot (EFAULT)"
    cls, desc = qmp.error("storage-keys-get", vm=vm, start_gfn=0, count=(1 << 20) + 1)
    assert desc == "Parameter 'count' must be between 1 and 1048576, not 1048577"
    assert qmp.error("storage-keys-get", vm="nobody", start_gfn=0, count=1) == (
        "DeviceNotFound",
        "no VM named 'nobody'",
    )


def test_workload_and_stop_cont_with_events(qmp, vm):
    qmp("sim-workload-start", vm=vm, pages_per_second=20000, vcpus=2, seed=1)
    time.sleep(0.2)
    qmp("stop", vm=vm)
    assert vm_named(qmp, vm)["paused"] is True
    frozen = vm_named(qmp, vm)["workload"]["pages-stored"]
    assert frozen > 0
    qmp("cont", vm=vm)
    events = [e["event"] for e in qmp.pull_events(0.5)]
    assert events[:2] == ["STOP", "RESUME"]
    qmp("sim-workload-stop", vm=vm)
    assert "workload" not in vm_named(qmp, vm)
    assert qmp.error("sim-workload-start", vm=vm, pages_per_second=0)[1].startswith(
        "Parameter 'pages-per-second' must be between 1"
    )


def test_query_dirty_rate_after_harvests(qmp, vm):
    assert qmp("query-dirty-rate", vm=vm)["slots"] == []
    qmp("sim-write-pages", vm=vm, gfns=list(range(100)), value=1)
    qmp("dirty-log-get", vm=vm, slot=0)
    rate = qmp("query-dirty-rate", vm=vm)
    # status, mode and dirty-rate are QEMU's calc-dirty-rate's: no calc ran
    assert rate["status"] == "unstarted" and "dirty-rate" not in rate
    (slot0,) = rate["slots"]
    assert slot0["dirty-pages"] == 100 and slot0["pages-per-second"] > 0
    assert rate["harvest-dirty-rate"] == int(rate["dirty-pages-rate"] * 4096 / MiB)
