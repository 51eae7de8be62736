"""Saved state under attack: what a crash or a full disk leaves never costs a VM or a page.

Each test plants what a crash, a reboot or a stranger leaves in the state directory (rather than
racing a kill), or fills the state file system, and checks the restore policy of
``dirtylogd.service.registry.Service.restore`` and the all-or-nothing commands.
"""

import json
import os
import subprocess
import threading
import time

import pytest

from .daemon_proc import Daemon
from .full_fs import fill_leaving, tiny_tmpfs
from .test_restart import dirty, setup_vm

MiB = 1 << 20


def stopped_with_keep(tmp_path):
    """A daemon that saved vm 'keep' (consumers default, slow, mp) on a graceful stop."""
    d = Daemon(tmp_path, metrics=False)
    with d.client() as q:
        setup_vm(q)
    assert d.stop() == 0
    return tmp_path / "state" / "vms"


def all_pages(q, consumer):
    pages, npages = dirty(q, "keep", consumer)
    return pages == list(range(npages))


# --- item 3: leftovers of an interrupted save ----------------------------------------------------
def test_leftover_temporary_files_never_cost_a_vm(tmp_path):
    vms = stopped_with_keep(tmp_path)
    (vms / "keep.pending" / "slow@0.tmp").write_bytes(b"\x01")  # a save cut short
    (vms / "keep.json.tmp").write_text("{")  # a record write cut short
    d = Daemon(tmp_path, metrics=False)
    try:
        with d.client() as q:
            assert [v["status"] for v in q("query-vms")] == ["ok"]
            assert dirty(q, "keep")[0] == [7]  # default's saved bits are trusted
            assert all_pages(q, "slow")  # slow's cannot be: when in doubt, dirty
            assert all_pages(q, "mp")
        assert "never completed" in d.output()
    finally:
        d.stop()


def test_an_unexpected_entry_among_saved_bits_makes_every_consumer_all_dirty(tmp_path):
    vms = stopped_with_keep(tmp_path)
    (vms / "keep.pending" / "lost+found").mkdir()
    d = Daemon(tmp_path, metrics=False)
    try:
        with d.client() as q:
            for consumer in ("default", "slow", "mp"):
                assert all_pages(q, consumer), consumer
    finally:
        d.stop()


# --- item 4: records the daemon did not write, RAM that is gone ----------------------------------
BAD_RECORDS = {
    "a JSON array": [],
    "null": None,
    "memslots of the wrong type": "memslots",
    "another VM's name": "name",
    "a slot number out of range": "slot",
}


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_one_bad_record_is_listed_and_the_others_are_served(tmp_path, kind):
    d = Daemon(tmp_path, metrics=False)
    with d.client() as q:
        setup_vm(q)
        q("vm-create", name="other", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
    assert d.stop() == 0
    path = tmp_path / "state" / "vms" / "other.json"
    record = json.loads(path.read_text())
    bad = BAD_RECORDS[kind]
    if bad == "memslots":
        record["memslots"] = "all of them"
    elif bad == "name":
        record["name"] = "keep"
    elif bad == "slot":
        record["memslots"][0]["slot"] = 1 << 40
    else:
        record = bad
    path.write_text(json.dumps(record))
    d = Daemon(tmp_path, metrics=False)
    try:
        with d.client() as q:
            listed = {v["name"]: v for v in q("query-vms")}
            assert listed["keep"]["status"] == "ok"
            assert dirty(q, "keep", "slow")[0] == [1, 2, 3, 7]  # served, bits as saved
            assert listed["other"]["status"] == "unrestorable"
            cls, desc = q.error("dirty-log-get", vm="other", slot=0)
            assert cls == "GenericError" and "only query-vms and vm-remove" in desc
            assert q.error("vm-create", name="other", memslots=[])[1].endswith("vm-remove it first")
            assert path.exists()  # nothing was deleted ...
            q("vm-remove", vm="other")  # ... until asked
            assert not path.exists()
            assert [v["name"] for v in q("query-vms")] == ["keep"]
    finally:
        d.stop()


def test_a_vm_whose_ram_is_gone_keeps_its_record_and_saved_bits_until_removed(tmp_path):
    vms = stopped_with_keep(tmp_path)
    os.unlink(tmp_path / "vms" / "keep.ram")  # what a reboot does to a tmpfs
    d = Daemon(tmp_path, metrics=False)
    try:
        with d.client() as q:
            (vm,) = q("query-vms")
            assert vm["status"] == "ram-lost" and "keep.ram is gone" in vm["reason"]
            cls, desc = q.error("sim-read", vm="keep", guest_phys_addr=0, length=8)
            assert cls == "GenericError" and "keep.ram is gone" in desc
            assert (vms / "keep.json").exists() and (vms / "keep.pending").is_dir()
            q("vm-remove", vm="keep")
            assert not (vms / "keep.json").exists() and not (vms / "keep.pending").exists()
            setup_vm(q)  # the name is free again
    finally:
        d.stop()


def test_a_ram_file_no_record_names_is_left_in_place(tmp_path):
    stopped_with_keep(tmp_path)
    ghost = tmp_path / "vms" / "ghost.ram"
    ghost.write_bytes(b"guest memory")
    d = Daemon(tmp_path, metrics=False)
    try:
        with d.client() as q:  # answered once the restore is done (the socket is bound before)
            assert [v["name"] for v in q("query-vms")] == ["keep"]
        assert ghost.read_bytes() == b"guest memory"
        assert "ghost.ram belongs to no saved VM" in d.output()
    finally:
        d.stop()


# --- item 5: a state file system that is full, or read-only ---------------------------------------
def test_state_changing_commands_are_all_or_nothing_on_a_full_disk(tmp_path):
    with tiny_tmpfs(tmp_path / "state" / "vms", 256 << 10):
        d = Daemon(tmp_path, metrics=False)
        try:
            with d.client() as q:
                setup_vm(q)
                before = q("query-vms")
                fill_leaving(tmp_path / "state" / "vms", 0)
                for command, args in [
                    ("vm-create", {"name": "new", "memslots": []}),
                    ("consumer-add", {"vm": "keep", "name": "late"}),
                    ("consumer-remove", {"vm": "keep", "name": "slow"}),
                    (
                        "memslot-set",
                        {
                            "vm": "keep",
                            "slot": 2,
                            "guest_phys_addr": 64 * MiB,
                            "size": MiB,
                            "log_dirty_pages": True,
                        },
                    ),
                    (
                        "memslot-set",
                        {
                            "vm": "keep",
                            "slot": 0,
                            "guest_phys_addr": 0,
                            "size": 0,
                            "log_dirty_pages": True,
                        },
                    ),
                    (
                        "memslot-set",
                        {
                            "vm": "keep",
                            "slot": 0,
                            "guest_phys_addr": 0,
                            "size": MiB,
                            "log_dirty_pages": False,
                        },
                    ),
                ]:
                    cls, desc = q.error(command, **args)
                    assert cls == "GenericError" and "(ENOSPC)" in desc, (command, desc)
                    assert "nothing was changed" in desc
                after = q("query-vms")
                assert after == before  # memslots, consumers and pending pages, unchanged
                assert not os.path.exists(tmp_path / "vms" / "new.ram")
                leftovers = [p for p in os.listdir(tmp_path / "state" / "vms") if ".tmp" in p]
                assert leftovers == []
                assert dirty(q, "keep", "slow")[0] == [1, 2, 3, 7]  # its bits are still there
                os.unlink(tmp_path / "state" / "vms" / "filler")
                q("consumer-add", vm="keep", name="late")  # with room, it works
        finally:
            d.stop()


def test_a_graceful_save_that_meets_a_full_disk_costs_no_vm_and_no_page(tmp_path):
    with tiny_tmpfs(tmp_path / "state" / "vms", 256 << 10):
        d = Daemon(tmp_path, metrics=False)
        with d.client() as q:
            setup_vm(q)
            fill_leaving(tmp_path / "state" / "vms", 0)
        assert d.stop() == 0  # SIGTERM: the save fails, the daemon still stops cleanly
        assert "could not be saved" in d.output_after_stop()
        os.unlink(tmp_path / "state" / "vms" / "filler")
        assert not [p for p in os.listdir(tmp_path / "state" / "vms") if ".tmp" in p]
        d = Daemon(tmp_path, metrics=False)
        try:
            with d.client() as q:
                assert [v["status"] for v in q("query-vms")] == ["ok"]
                for consumer in ("default", "slow", "mp"):
                    assert all_pages(q, consumer), consumer  # unclean: every page dirty
        finally:
            d.stop()


def test_stop_and_cont_take_effect_without_a_disk_and_mark_the_record_unclean(tmp_path):
    # The records' directory is the mount: the daemon's lock file, open for writing one level
    # up, would keep a remount read-only from succeeding.
    with tiny_tmpfs(tmp_path / "state" / "vms", 256 << 10):
        d = Daemon(tmp_path)
        try:
            with d.client() as q:
                setup_vm(q)
                subprocess.run(
                    ["mount", "-o", "remount,ro", str(tmp_path / "state" / "vms")], check=True
                )
                q("stop", vm="keep")
                assert [e["event"] for e in q.pull_events()] == ["STOP"]
                assert next(v for v in q("query-vms") if v["name"] == "keep")["paused"]
                cls, desc = q.error("vm-remove", vm="keep")  # the record cannot go: VM stays
                assert cls == "GenericError" and "(EROFS)" in desc and "the VM stays" in desc
                q("cont", vm="keep")
                assert d.metric('dirtylogd_state_write_failures_total{vm="keep"}') >= 2
                subprocess.run(
                    ["mount", "-o", "remount,rw", str(tmp_path / "state" / "vms")], check=True
                )
        finally:
            assert d.stop() == 0
        record = json.loads((tmp_path / "state" / "vms" / "keep.json").read_text())
        assert record["clean"] is False  # a write was lost: the next start trusts nothing saved
        d = Daemon(tmp_path, metrics=False)
        try:
            with d.client() as q:
                assert all_pages(q, "slow") and all_pages(q, "default")
        finally:
            d.stop()


# --- item 10: vm-remove racing the commands that use the VM -------------------------------------
def test_vm_remove_racing_stores_and_gets_never_answers_an_internal_error(tmp_path):
    d = Daemon(tmp_path, metrics=False)
    errors: list[tuple[str, str]] = []
    try:
        for round_ in range(12):
            name = f"race{round_}"
            with d.client() as q:
                q(
                    "vm-create",
                    name=name,
                    memslots=[{"slot": 0, "guest-phys-addr": 0, "size": 256 * MiB}],
                )
            stop = threading.Event()

            def hammer(name=name, stop=stop):
                with d.client() as c:
                    while not stop.is_set():
                        for command, args in (
                            (
                                "sim-write-pages",
                                {"vm": name, "gfns": list(range(0, 65536, 3)), "value": 5},
                            ),
                            ("dirty-log-get", {"vm": name, "slot": 0, "encoding": "ranges"}),
                        ):
                            try:
                                c(command, **args)
                            except Exception as exc:  # collected and checked below
                                cls = getattr(exc, "error_class", type(exc).__name__)
                                errors.append((cls, str(exc)))
                                if cls == "DeviceNotFound":
                                    return

            workers = [threading.Thread(target=hammer) for _ in range(2)]
            for w in workers:
                w.start()
            with d.client() as q:
                time.sleep(0.02 * (round_ % 4))  # land the remove at different points
                q("vm-remove", vm=name)
            stop.set()
            for w in workers:
                w.join(30)
        assert errors and {cls for cls, _ in errors} == {"DeviceNotFound"}, errors[:5]
        assert d.proc.poll() is None and "Traceback" not in d.output()
    finally:
        d.stop()
