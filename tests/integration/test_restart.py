"""Restarts: a graceful stop keeps every consumer's pending bits; a kill makes them all dirty."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from .daemon_proc import Daemon
from .raw import Raw

MiB = 1 << 20


def dirty(q, vm, consumer="default", slot=0):
    r = q("dirty-log-get", vm=vm, slot=slot, consumer=consumer, encoding="ranges")
    return [p for first, n in r["ranges"] for p in range(first, first + n)], r["npages"]


def setup_vm(q):
    q(
        "vm-create",
        name="keep",
        memslots=[
            {"slot": 0, "guest-phys-addr": 0, "size": MiB},
            {"slot": 1, "guest-phys-addr": 16 * MiB, "size": MiB, "log-dirty-pages": False},
        ],
    )
    q("consumer-add", vm="keep", name="slow", initially_set=False)
    q("consumer-add", vm="keep", name="mp", manual_protect=True)
    q("sim-write-pages", vm="keep", gfns=[1, 2, 3], value=11)
    assert dirty(q, "keep")[0] == [1, 2, 3]  # default takes them; slow and mp keep them
    q("sim-write-pages", vm="keep", gfns=[7], value=12)  # not harvested before the stop


def test_sigterm_keeps_every_consumers_pending_bits_across_a_restart(tmp_path):
    d = Daemon(tmp_path, metrics=False)
    with d.client() as q:
        setup_vm(q)
    assert d.stop() == 0
    record = json.loads((tmp_path / "state" / "vms" / "keep.json").read_text())
    assert record["clean"] is True
    d = Daemon(tmp_path, metrics=False)
    try:
        with d.client() as q:
            vm = next(v for v in q("query-vms") if v["name"] == "keep")
            assert [m["log-dirty-pages"] for m in vm["memslots"]] == [True, False]
            assert {c["name"] for c in vm["consumers"]} == {"default", "slow", "mp"}
            assert dirty(q, "keep")[0] == [7]  # the stop harvested page 7 into every consumer
            assert dirty(q, "keep", "slow")[0] == [1, 2, 3, 7]
            pages, npages = dirty(q, "keep", "mp")
            assert pages == list(range(npages))  # initially set, never cleared: still all
            data = base64.b64decode(
                q("sim-read", vm="keep", guest_phys_addr=4096, length=8)["data"]
            )
            assert int.from_bytes(data, "little") == 11  # the RAM came back
            q("sim-write-pages", vm="keep", gfns=[9], value=13)
            assert dirty(q, "keep")[0] == [9]  # and tracking goes on
    finally:
        d.stop()
    record = json.loads((tmp_path / "state" / "vms" / "keep.json").read_text())
    assert not (tmp_path / "state" / "vms" / "keep.pending").exists() or record["clean"]


def test_after_sigkill_every_consumer_starts_all_dirty(tmp_path):
    d = Daemon(tmp_path, metrics=False)
    with d.client() as q:
        setup_vm(q)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    d.log.close()
    d = Daemon(tmp_path, metrics=False)
    try:
        with d.client() as q:
            for consumer in ("default", "slow", "mp"):
                pages, npages = dirty(q, "keep", consumer)
                assert pages == list(range(npages)), consumer  # when in doubt, dirty
            data = base64.b64decode(
                q("sim-read", vm="keep", guest_phys_addr=7 * 4096, length=8)["data"]
            )
            assert int.from_bytes(data, "little") == 12
        assert "every page dirty: the daemon was not stopped cleanly" in d.output()
    finally:
        d.stop()


def keys_of(q, vm, npages):
    got = q("storage-keys-get", vm=vm, start_gfn=0, count=npages)
    return base64.b64decode(got["keys"])


@pytest.mark.parametrize("model", [{}, {"kernel": "3.15"}, {"kernel": "4.19", "hugepages": True}])
def test_sigterm_keeps_the_models_storage_keys_and_dirties_nothing(tmp_path, model):
    """The model's keys live in the daemon (a real kernel would keep them): a graceful stop
    saves them beside the record and the restart gives them back, changing no dirty state."""
    d = Daemon(tmp_path, metrics=False)
    with d.client() as q:
        q("vm-create", name="k", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}], **model)
        q("sim-write-pages", vm="k", gfns=[1, 2, 300 % 256], value=5)  # R/C into real keys
        for gfn, key in ((2, 0x30), (9, 0xF8), (200, 0x16)):
            q("sim-set-storage-key", vm="k", guest_phys_addr=gfn * 4096, key=key)
        dirty(q, "k")  # nothing pending for default
        before = keys_of(q, "k", 256)
        assert before[9] == 0xF8 and before[200] & 0xF0 == 0x10
    assert d.stop() == 0
    assert (tmp_path / "state" / "vms" / "k.skeys" / "0").stat().st_size == 256
    d = Daemon(tmp_path, metrics=False)
    try:
        with d.client() as q:
            assert keys_of(q, "k", 256) == before
            # putting keys back is not a change of any page (3.15's fresh tables start HR|HC:
            # every page once, keys or not)
            fresh = list(range(256)) if model.get("kernel") == "3.15" else []
            assert dirty(q, "k")[0] == fresh
        assert not (tmp_path / "state" / "vms" / "k.skeys").exists()  # good for one restore
    finally:
        d.stop()


def test_after_sigkill_the_models_keys_are_said_to_start_at_zero(tmp_path):
    d = Daemon(tmp_path, metrics=False)
    with d.client() as q:
        q("vm-create", name="k", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
        q("sim-set-storage-key", vm="k", guest_phys_addr=9 * 4096, key=0xF8)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    d.log.close()
    d = Daemon(tmp_path, metrics=False)
    try:
        with d.client() as q:
            assert keys_of(q, "k", 256) == bytes(256)
        assert "storage keys of slot(s) 0 were not saved" in d.output()
    finally:
        d.stop()


def test_pause_and_workload_come_back(tmp_path):
    d = Daemon(tmp_path, metrics=False)
    with d.client() as q:
        q("vm-create", name="busy", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
        q("sim-workload-start", vm="busy", pages_per_second=5000, seed=2)
        q("vm-create", name="held", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
        q("stop", vm="held")
    assert d.stop() == 0
    d = Daemon(tmp_path, metrics=False)
    try:
        with d.client() as q:
            vms = {v["name"]: v for v in q("query-vms")}
            assert vms["held"]["paused"] is True and vms["busy"]["paused"] is False
            assert vms["busy"]["workload"]["pages-per-second"] == 5000
            time.sleep(0.3)
            busy = next(v for v in q("query-vms") if v["name"] == "busy")
            assert busy["workload"]["pages-stored"] > 0
            q("vm-remove", vm="held")
        assert not (tmp_path / "state" / "vms" / "held.json").exists()
    finally:
        d.stop()


def test_a_migration_that_spans_a_daemon_kill_still_ends_byte_identical(tmp_path):
    """SIGKILL the daemon mid-migration and start it again: the driver reconnects, its
    consumer comes back all dirty, everything is sent again, and the image verifies."""
    import subprocess
    import sys

    d = Daemon(tmp_path, metrics=False)
    with d.client() as q:
        q(
            "vm-create",
            name="span",
            memslots=[{"slot": 0, "guest-phys-addr": 4 << 30, "size": 64 * MiB}],
        )
        # slow enough that 20 MB/s converges: the point is the restart, not the race
        q("sim-workload-start", vm="span", pages_per_second=1_000, vcpus=2, seed=5)
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dirtylogctl.cli",
            "-s",
            d.socket,
            "--json",
            "migrate",
            "span",
            str(tmp_path / "image"),
            "--verify",
            "--max-bandwidth",
            "20M",
            "--max-rounds",
            "8",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # round 0 (64 MiB at 20 MB/s) is under way
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    d.log.close()
    d = Daemon(tmp_path, metrics=False)
    try:
        out, err = driver.communicate(timeout=120)
        assert driver.returncode == 0, err
        doc = json.loads(out)
        assert doc["verify"]["differing-pages"] == 0
        assert any("reconnected to the daemon" in n for n in doc["notes"])
        assert doc["ram"]["normal"] > 16384  # pages were sent again after the restart
    finally:
        d.stop()


def test_sigterm_while_an_answer_is_half_written_keeps_its_pages(tmp_path):
    """Stopping cancels the write; the answer returns to its consumer before the state is saved."""
    d = Daemon(tmp_path, metrics=False)
    with d.client() as q:
        q("vm-create", name="half", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": 8 << 30}])
        q("consumer-add", vm="half", name="lazy", initially_set=False)
        q("sim-write-pages", vm="half", gfns=[5, 1 << 20], value=1)
    raw = Raw(d.socket)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.negotiate()
    raw.send(
        {"execute": "dirty-log-get", "arguments": {"vm": "half", "slot": 0, "consumer": "lazy"}}
    )
    time.sleep(0.5)  # the ~350 KB answer fills the buffers and waits
    assert d.stop() == 0
    raw.close()
    d = Daemon(tmp_path, metrics=False)
    try:
        with d.client() as q:
            assert dirty(q, "half", "lazy")[0] == [5, 1 << 20]
            q("vm-remove", vm="half")
    finally:
        d.stop()


def test_a_restart_with_a_lower_consumer_limit_keeps_every_saved_consumer(tmp_path):
    """Nothing lost: consumers that were saved all come back with their pending pages, even
    past a lower --max-consumers; only new ones are refused until enough are removed."""
    d = Daemon(tmp_path, "--max-consumers", "4", metrics=False)
    with d.client() as q:
        q("vm-create", name="many", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
        for i in range(4):
            q("consumer-add", vm="many", name=f"c{i}", initially_set=False)
        q("sim-write-pages", vm="many", gfns=[5, 6], value=1)
    assert d.stop() == 0
    d = Daemon(tmp_path, "--max-consumers", "2", metrics=False)
    try:
        with d.client() as q:
            vm = next(v for v in q("query-vms") if v["name"] == "many")
            assert [c["name"] for c in vm["consumers"]] == ["default", "c0", "c1", "c2", "c3"]
            for i in range(4):
                assert dirty(q, "many", f"c{i}")[0] == [5, 6]
            cls, desc = q.error("consumer-add", vm="many", name="new")
            assert cls == "GenericError"
            assert desc.startswith("vm 'many' has 4 consumers besides 'default', the most allowed")
            assert "(--max-consumers 2)" in desc
            q("consumer-remove", vm="many", name="c0")
            q("consumer-remove", vm="many", name="c1")
            q("consumer-remove", vm="many", name="c2")
            q("consumer-add", vm="many", name="new")
    finally:
        assert d.stop() == 0


def start_another(socket_path: str, state_dir: str, runtime_dir: str):
    """Run a second daemon to completion (it must refuse to start); its CompletedProcess."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dirtylogd",
            "--socket",
            socket_path,
            "--state-dir",
            state_dir,
            "--runtime-dir",
            runtime_dir,
            "--metrics-listen",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=10,  # refusing takes well under a second; one that starts serves forever
    )


def test_a_second_daemon_never_takes_over_a_live_daemons_socket(tmp_path):
    d = Daemon(tmp_path / "first", metrics=False)
    try:
        with d.client() as q:
            q("vm-create", name="mine", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
        before = os.stat(d.socket).st_ino
        other = tmp_path / "second"
        second = start_another(d.socket, str(other / "state"), str(other / "vms"))
        assert second.returncode == 1, second.stderr
        assert f"another daemon (pid {d.proc.pid}) is serving {d.socket}" in second.stderr
        assert os.stat(d.socket).st_ino == before  # not unlinked, not re-bound
        with d.client() as q:  # the first still answers, with its VM
            assert [v["name"] for v in q("query-vms")] == ["mine"]
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("shared", ["state directory", "runtime directory"])
def test_a_second_daemon_on_the_same_directories_is_refused_naming_the_lock(tmp_path, shared):
    """Two daemons must never restore the same VMs onto the same RAM files."""
    d = Daemon(tmp_path / "first", metrics=False)
    try:
        with d.client() as q:
            q("vm-create", name="mine", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
            q("sim-write-pages", vm="mine", gfns=[3], value=7)
        other = tmp_path / "second"
        state = d.state_dir if shared == "state directory" else str(other / "state")
        runtime = d.runtime_dir if shared == "runtime directory" else str(other / "vms")
        second = start_another(str(other / "qmp.sock"), state, runtime)
        assert second.returncode == 1, second.stderr
        directory = state if shared == "state directory" else runtime
        assert (
            f"the {shared} {directory} is in use by another dirtylogd (pid {d.proc.pid}), "
            f"which holds {directory}/dirtylogd.lock" in second.stderr
        )
        assert "listening" not in second.stderr and "restored" not in second.stderr
        assert not (other / "qmp.sock").exists()
        with d.client() as q:  # the first is untouched: same VM, same pending page
            assert dirty(q, "mine")[0] == [3]
    finally:
        assert d.stop() == 0


def test_a_stale_socket_left_by_a_killed_daemon_does_not_prevent_a_restart(tmp_path):
    d = Daemon(tmp_path, metrics=False)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    d.log.close()
    assert os.path.exists(d.socket)  # stale: nothing listens on it, the lock went with the pid
    d = Daemon(tmp_path, metrics=False)
    try:
        with d.client() as q:
            assert q("query-version")["package"].startswith("dirtylogd")
        assert "replacing the stale socket" in d.output()
        with open(os.path.join(d.state_dir, "dirtylogd.lock")) as f:
            assert f.read() == f"{d.proc.pid}\n"
    finally:
        assert d.stop() == 0


def test_a_file_that_is_not_a_socket_is_never_replaced(tmp_path):
    (tmp_path / "qmp.sock").write_text("someone's data")
    refused = start_another(
        str(tmp_path / "qmp.sock"), str(tmp_path / "state"), str(tmp_path / "vms")
    )
    assert refused.returncode == 1
    assert "qmp.sock exists and is not a socket; not replacing it" in refused.stderr
    assert (tmp_path / "qmp.sock").read_text() == "someone's data"
