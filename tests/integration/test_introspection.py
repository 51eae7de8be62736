"""query-qmp-schema against the real daemon: what it declares is exactly what it sends.

A fresh daemon with two VMs it cannot restore (one whose RAM file is gone, one whose record is
broken) and one it serves, with consumers, memslots and a workload, runs every command in the
table through qemu.qmp; each return, and each event that arrives meanwhile, is held member by
member to the types the daemon's own introspection declares (tests/integration/schema_check.py).
"""

import json
import os
import time

import pytest
from qemu.qmp import QMPClient

from .daemon_proc import Qmp
from .schema_check import Mismatch, Schema

MiB = 1 << 20

# Declared members only the kvm backend sends; tests/kernel/test_kvm_backend.py sees them.
KVM_ONLY = {
    ("BackendCapabilities", m)
    for m in (
        "multi-address-space",
        "nr-vcpus",
        "arch",
        "manual-protect",
        "initially-set",
        "guest-program",
    )
}


class Checked:
    """A qemu.qmp client whose every return is checked against the schema, command by command."""

    def __init__(self, qmp: Qmp, schema: Schema, ran: set[str]) -> None:
        self.qmp, self.schema, self.ran = qmp, schema, ran

    def __call__(self, command: str, **arguments):
        value = self.qmp(command, **arguments)
        self.schema.check_return(command, value)
        self.ran.add(command)
        return value


@pytest.fixture
def daemon_with_unavailable_vms(fresh_daemon, tmp_path):
    """A daemon listing 'lost' (its RAM file is gone) and 'broken' (a record it cannot use)."""
    d = fresh_daemon(metrics=False)
    with d.client() as q:
        for name in ("lost", "broken"):
            q("vm-create", name=name, memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
    assert d.stop() == 0
    os.unlink(tmp_path / "vms" / "lost.ram")
    record = tmp_path / "state" / "vms" / "broken.json"
    record.write_text(json.dumps(json.loads(record.read_text()) | {"memslots": "all of them"}))
    return fresh_daemon(metrics=False)


@pytest.fixture
def schema(daemon):
    with daemon.client() as q:
        return Schema(q("query-qmp-schema"))


def test_every_name_the_schema_refers_to_is_defined_exactly_once(schema):
    assert schema.duplicates == []
    assert schema.references() - set(schema.entries) == set()
    # Like QEMU's, the schema lists only the types in use: every type is referred to.
    types = {n for n, e in schema.entries.items() if e["meta-type"] not in ("command", "event")}
    assert types - schema.references() == set()
    builtins = schema.of("builtin")
    assert builtins["any"] == {"name": "any", "meta-type": "builtin", "json-type": "value"}
    assert set(builtins) == {"any", "str", "int", "number", "bool", "null"}


def test_every_return_and_event_has_exactly_the_declared_members(daemon_with_unavailable_vms):
    d = daemon_with_unavailable_vms
    with d.client() as q, Qmp(d.socket, negotiate=False) as unnegotiated:
        schema = Schema(q("query-qmp-schema"))
        ran: set[str] = set()
        qmp = Checked(q, schema, ran)
        Checked(unnegotiated, schema, ran)("qmp_capabilities")
        qmp("query-qmp-schema")  # the schema describes itself too: SchemaInfo
        qmp("query-version")
        assert [c["name"] for c in qmp("query-commands")] == list(schema.of("command"))

        memslots = [
            {"slot": 0, "guest-phys-addr": 0, "size": MiB},
            {"slot": 1, "guest-phys-addr": 4 * MiB, "size": MiB},
        ]
        qmp("vm-create", name="vm", memslots=memslots)
        qmp("memslot-set", vm="vm", slot=2, guest_phys_addr=8 * MiB, size=MiB)
        qmp("consumer-add", vm="vm", name="mig", manual_protect=True)
        qmp("consumer-add", vm="vm", name="brief")
        qmp("consumer-remove", vm="vm", name="brief")
        assert qmp("query-dirty-rate", vm="vm")["slots"] == []

        qmp("sim-write", vm="vm", guest_phys_addr=4096, data="aGVsbG8=")
        qmp("sim-write-pages", vm="vm", gfns=[0, 5, 1025], value=7)
        qmp("sim-set-storage-key", vm="vm", guest_phys_addr=0, key=0x10)
        assert qmp("storage-keys-get", vm="vm", start_gfn=0, count=2)["keys"] == "EAY="  # 0x10, R|C
        assert qmp("sim-read", vm="vm", guest_phys_addr=4096, length=5)["data"] == "aGVsbG8="
        ranges = [{"guest-phys-addr": 6 * 4096, "length": 4096}]
        assert qmp("io-dirty-mark", vm="vm", ranges=ranges) == {"pages": 1}

        qmp("sim-workload-start", vm="vm", pages_per_second=2000, vcpus=2, seed=1)
        qmp("calc-dirty-rate", vm="vm", calc_time=50, calc_time_unit="millisecond")
        qmp("set-vcpu-dirty-limit", vm="vm", cpu_index=1, dirty_rate=4)
        qmp("cpu-throttle-set", vm="vm", percentage=10)
        qmp("vcpu-dirty-limit-period-set", vm="vm", period=500)
        assert [i["cpu-index"] for i in qmp("query-vcpu-dirty-limit", vm="vm")] == [1]
        qmp("cancel-vcpu-dirty-limit", vm="vm")
        qmp("cpu-throttle-set", vm="vm", percentage=0)
        time.sleep(0.1)
        assert qmp("query-dirty-rate", vm="vm")["status"] == "measured"  # with sample-count
        qmp(
            "calc-dirty-rate",
            vm="vm",
            calc_time=50,
            calc_time_unit="millisecond",
            mode="dirty-ring",
        )
        time.sleep(0.1)
        assert "vcpu-dirty-rate" in qmp("query-dirty-rate", vm="vm")
        qmp("stop", vm="vm")
        qmp("cont", vm="vm")
        listed = {v["name"]: v for v in qmp("query-vms")}
        assert {n: v["status"] for n, v in listed.items()} == {
            "vm": "ok",
            "lost": "ram-lost",
            "broken": "unrestorable",
        }
        served = listed["vm"]
        assert [c["name"] for c in served["consumers"]] == ["default", "mig"]
        assert len(served["memslots"]) == 3 and served["workload"]["failed"] is None
        qmp("sim-workload-stop", vm="vm")
        assert "workload" not in qmp("query-vms")[0]

        assert "bitmap" in qmp("dirty-log-get", vm="vm", slot=0)
        assert "ranges" in qmp("dirty-log-get", vm="vm", slot=1, consumer="mig", encoding="ranges")
        fd = os.memfd_create("bitmap")
        try:
            q.send_fd(fd)
            qmp("getfd", fdname="bm")
            got = qmp("dirty-log-get", vm="vm", slot=0, encoding="fd", fdname="bm")
            assert "bitmap" not in got and "ranges" not in got
            qmp("closefd", fdname="bm")
        finally:
            os.close(fd)
        clear = {"first-page": 0, "num-pages": 64, "bitmap": "AQAAAAAAAAA="}
        qmp("dirty-log-clear", vm="vm", slot=1, consumer="mig", **clear)
        assert qmp("query-dirty-rate", vm="vm")["slots"] != []
        qmp("vm-remove", vm="vm")

        events = q.pull_events(0.5)
    assert ran == set(schema.of("command")), "every command's return was checked"

    # Events: every one that arrived is declared, with exactly its declared data.
    for message in events:
        schema.check_event(message)
    assert [(e["event"], e["data"]) for e in events] == [
        ("STOP", {"vm": "vm"}),
        ("RESUME", {"vm": "vm"}),
    ]
    # VCPU_FAILED needs a guest that crashes: tests/kernel/test_kvm_backend.py checks it.
    assert set(schema.of("event")) == {"STOP", "RESUME", "VCPU_FAILED"}

    # And the other way round: nothing is declared that the daemon was never seen to send.
    roots = [e["ret-type"] for e in schema.of("command").values()]
    roots += [schema.entries[n]["arg-type"] for n in ("STOP", "RESUME")]
    assert schema.members_reachable(roots) - schema.seen - KVM_ONLY == set()


def test_the_checker_refuses_an_undeclared_or_missing_member(schema):
    """The check the test above relies on fails where it should (the test's own test)."""
    version = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "dirtylogd 0.1.0"}
    schema.check_return("query-version", version)
    with pytest.raises(Mismatch, match=r"undeclared members \['dirtylogd'\]"):
        schema.check_return("query-version", version | {"dirtylogd": version["qemu"]})
    with pytest.raises(Mismatch, match=r"missing members \['package'\]"):
        schema.check_return("query-version", {"qemu": version["qemu"]})
    unavailable = {"name": "x", "status": "ram-lost", "reason": "gone"}
    with pytest.raises(Mismatch, match=r"missing members \['record'\]"):
        schema.check_return("query-vms", [unavailable])
    with pytest.raises(Mismatch, match="is none of"):
        schema.check(1, "StrOrNull", "failed")


def test_greeting_and_query_version_are_the_same_version_info(daemon):
    """qmp-spec "Server Greeting": the version has query-version's format; qemu.qmp parses it."""
    with daemon.client() as q:
        greeting = q.client.greeting
        assert isinstance(q.client, QMPClient) and greeting is not None
        version = dict(greeting.QMP.version)
        assert version == q("query-version")
    assert set(version) == {"qemu", "package"}
    triple = version["qemu"]
    assert set(triple) == {"major", "minor", "micro"}
    assert version["package"] == "dirtylogd {major}.{minor}.{micro}".format(**triple)
