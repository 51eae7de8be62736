"""Every row of the bad-input catalogue: the exact error, nothing changed, others served."""

import json
import os
from pathlib import Path

import pytest

from .bad_input import CASES, WITNESS, WITNESS_SLOTS, render_markdown
from .descriptors import KINDS, open_descriptor
from .raw import Raw

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-input.md"


@pytest.fixture(scope="module")
def witness(daemon):
    """A VM with stamped pages, pending bits in three consumers, and a bystander client.

    The fingerprint below includes every consumer's pending-page count, so a failed answer
    that did not give its bits back (the read-only descriptor row) would show as a change.
    """
    with daemon.client() as q:
        q("vm-create", name=WITNESS, memslots=WITNESS_SLOTS)
        q("consumer-add", vm=WITNESS, name="mp", manual_protect=True)
        q("consumer-add", vm=WITNESS, name="auto", initially_set=False)
        q("sim-write-pages", vm=WITNESS, gfns=[1, 2, 4096 + 3], value=5)
        q("dirty-log-get", vm=WITNESS, slot=0, consumer="mp")  # bits now pending everywhere
    bystander = daemon.client()
    yield bystander
    bystander.close()
    with daemon.client() as q:
        q("vm-remove", vm=WITNESS)


def fingerprint(q):
    vm = next(v for v in q("query-vms") if v["name"] == WITNESS)
    ram = q("sim-read", vm=WITNESS, guest_phys_addr=4096, length=8)["data"]
    return json.dumps(vm, sort_keys=True), ram


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_gets_its_error_and_changes_nothing(daemon, witness, case, tmp_path):
    before = fingerprint(witness)
    raw = Raw(daemon.socket)
    if case.negotiate:
        raw.negotiate()
    else:
        raw.recv()  # greeting
    fds = [open_descriptor(case.fd_kind, tmp_path) for _ in range(case.fds)]
    try:
        for step in case.setup:
            raw.send(step, fds)
            fds_sent, fds = fds, []
            assert "return" in raw.recv(), step
            del fds_sent
        raw.send(case.send, fds)
        reply = raw.recv()
        if case.fds > 16:  # the descriptors are refused, then the command itself runs
            assert reply["error"]["class"] == case.error_class
            assert case.desc in reply["error"]["desc"]
            reply = raw.recv()
            assert "return" in reply
        else:
            assert reply["error"]["class"] == case.error_class, reply
            assert case.desc in reply["error"]["desc"], reply["error"]["desc"]
            assert ("id" in reply) == case.has_id and reply.get("id", 7) == 7
        if case.closes:
            assert raw.closed()
    finally:
        for fd in fds:
            os.close(fd)
        raw.sock.close()
    after = fingerprint(witness)
    if after != before:  # name the difference, not just the fact
        b, a = json.loads(before[0]), json.loads(after[0])
        changed = {k: (b.get(k), a.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        pytest.fail(f"state changed: {changed} ram {before[1]} -> {after[1]}")
    assert witness("query-version")["package"].startswith("dirtylogd")


def test_every_descriptor_kind_that_cannot_take_a_bitmap_has_a_row():
    refused = {kind for kind, writable in KINDS.items() if not writable}
    assert refused <= {c.fd_kind for c in CASES if c.fds and "fdname" in c.send.decode()}


def test_the_catalogue_has_at_least_30_cases_and_its_document_is_current():
    assert len(CASES) >= 30
    assert DOC.read_text() == render_markdown(), (
        "run: python -m tests.integration.bad_input > docs/bad-input.md"
    )
