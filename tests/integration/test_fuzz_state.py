"""Fuzz the state directory: whatever damage hypothesis does to it, a restart loses no page.

One graceful stop saves two VMs; each example copies that state, damages it (records rewritten
with values of any JSON type, files planted among the saved bits, saved bitmaps cut short or
grown, a RAM file deleted, temporary files left), starts a daemon on it and checks:

* the daemon starts and serves; every VM is listed as served, "ram-lost" or "unrestorable";
* nothing is lost: every consumer of a served VM has at least the pages it had at the stop;
* nothing is deleted: the record of every VM that is not served is still on disk.
"""

import json
import os
import shutil
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .daemon_proc import Daemon
from .test_fuzz import EXAMPLES
from .test_restart import dirty, setup_vm

MiB = 1 << 20
# What the stop saved: slot 0 of 'keep' (256 pages), per consumer; 'other' had a fresh default.
TRUTH = {"default": {7}, "slow": {1, 2, 3, 7}, "mp": set(range(256))}

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
RECORD_KEYS = [
    "version",
    "name",
    "backend",
    "esop",
    "ram-path",
    "memslots",
    "consumers",
    "paused",
    "workload",
    "clean",
]
NAMES = st.text(string.ascii_letters + string.digits + "@.-_+", min_size=1, max_size=12)
DAMAGE = st.one_of(
    st.tuples(
        st.just("field"), st.sampled_from(["keep", "other"]), st.sampled_from(RECORD_KEYS), JSON
    ),
    st.tuples(st.just("record"), st.sampled_from(["keep", "other"]), JSON),
    st.tuples(st.just("plant"), NAMES, st.binary(max_size=64)),
    st.tuples(st.just("resize"), st.sampled_from(["default", "slow", "mp"]), st.integers(0, 80)),
    st.tuples(st.just("drop-ram"), st.sampled_from(["keep", "other"])),
    st.tuples(st.just("tmp"), st.sampled_from(["keep.json.tmp", "other.json.tmp"])),
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The state and RAM files that one graceful stop left."""
    root = tmp_path_factory.mktemp("pristine")
    d = Daemon(root, metrics=False)
    with d.client() as q:
        setup_vm(q)
        q("vm-create", name="other", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
    assert d.stop() == 0
    return root


def damage(root, what):
    vms = root / "state" / "vms"
    kind = what[0]
    if kind in ("field", "record"):
        path = vms / f"{what[1]}.json"
        if kind == "record":
            record = what[2]
        else:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                return  # an earlier damage replaced the whole record
            record[what[2]] = what[3]
        path.write_text(json.dumps(record))
    elif kind == "plant":
        planted = vms / "keep.pending" / what[1]
        if not planted.is_dir():
            planted.write_bytes(what[2])
    elif kind == "resize":
        path = vms / "keep.pending" / f"{what[1]}@0"
        raw = path.read_bytes() if path.is_file() else b""
        path.write_bytes((raw + b"\xff" * 80)[: what[2]])
    elif kind == "drop-ram":
        (root / "vms" / f"{what[1]}.ram").unlink(missing_ok=True)
    else:
        (vms / what[1]).write_text("{")


@settings(
    max_examples=max(8, EXAMPLES // 20),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(damages=st.lists(DAMAGE, min_size=1, max_size=3))
def test_damaged_state_never_loses_a_page_nor_a_record(pristine, tmp_path_factory, damages):
    root = tmp_path_factory.mktemp("damaged")
    shutil.copytree(pristine / "state", root / "state")
    shutil.copytree(pristine / "vms", root / "vms")
    for what in damages:
        damage(root, what)
    d = Daemon(root, metrics=False)
    try:
        with d.client() as q:
            listed = {v["name"]: v for v in q("query-vms")}
            for name, vm in listed.items():
                assert vm["status"] in ("ok", "ram-lost", "unrestorable"), vm
                if vm["status"] != "ok":
                    assert os.path.exists(vm["record"]), vm  # listed, never deleted
                    continue
                if name != "keep" or not any(m["slot"] == 0 for m in vm["memslots"]):
                    continue
                for c in vm["consumers"]:
                    if c["name"] in TRUTH:
                        pages = set(dirty(q, "keep", c["name"])[0])
                        lost = TRUTH[c["name"]] - pages
                        assert not lost, (c["name"], sorted(lost)[:10], damages)
        assert "Traceback" not in d.output(), d.output()
    finally:
        assert d.stop() == 0
