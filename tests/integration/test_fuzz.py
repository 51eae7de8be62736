"""Property-based fuzzing of a running daemon: raw bytes and QMP-shaped messages.

Invariants after every example: the daemon is alive, every reply is valid QMP (exactly one of
return/error, an error has a known class and a text, the id comes back unchanged), input that
was rejected changed nothing, and the daemon's memory stays bounded.

In CI each property runs a bounded number of examples. The long run documented in
docs/reliability.md sets DIRTYLOGD_FUZZ_EXAMPLES (e.g. 60000: over 100,000 messages) and
prints the figures:

    DIRTYLOGD_FUZZ_EXAMPLES=60000 python -m pytest -q -s tests/integration/test_fuzz.py
"""

import json
import os
import time
from collections import Counter

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirtylogd.api.schema import COMMANDS

from .bad_input import WITNESS, WITNESS_SLOTS
from .raw import Raw

EXAMPLES = int(os.environ.get("DIRTYLOGD_FUZZ_EXAMPLES", "250"))
CLASSES = {"GenericError", "CommandNotFound", "DeviceNotFound"}
# Commands that would build big VMs or churn them are covered by the bad-input catalogue;
# the fuzzer aims everything else at the witness VM.
SKIP = {"vm-create", "memslot-set", "vm-remove", "sim-workload-start", "qmp_capabilities"}
FUZZED = [c for c in COMMANDS if c.name not in SKIP]
STATS: Counter[str] = Counter()


class Client(Raw):
    """Counts what it sends and receives for the figures."""

    def __init__(self, path):
        super().__init__(path, timeout=30)
        self.negotiate()

    def recv(self):
        STATS["replies"] += 1
        return super().recv()

    def send(self, data, fds=()):
        STATS["messages"] += 1
        super().send(data, fds)

    def call(self, message: dict):
        """Send one message and return its reply; events (STOP, RESUME) are skipped."""
        reply = self.ask(message)
        while "event" in reply:
            STATS["events"] += 1
            reply = self.recv()
        return reply


def valid_reply(reply, message=None):
    assert isinstance(reply, dict)
    if "event" in reply:
        STATS["events"] += 1
        return
    assert ("return" in reply) != ("error" in reply), reply
    if "error" in reply:
        error = reply["error"]
        assert set(error) == {"class", "desc"} and error["class"] in CLASSES, reply
        assert isinstance(error["desc"], str) and error["desc"]
        STATS[error["class"]] += 1
    else:
        STATS["ok"] += 1
    if message is not None:  # the id comes back unchanged, and only if one was sent
        assert ("id" in reply) == ("id" in message), (message, reply)
        assert reply.get("id") == message.get("id"), (message, reply)


@pytest.fixture(scope="module")
def target(daemon):
    with daemon.client() as q:
        q("vm-create", name=WITNESS, memslots=WITNESS_SLOTS)
        q("consumer-add", vm=WITNESS, name="mp", manual_protect=True)
    client = Client(daemon.socket)
    process = psutil.Process(daemon.proc.pid)
    rss_start = process.memory_info().rss
    started = time.monotonic()
    yield client, process
    client.close()
    rss_end = process.memory_info().rss
    print(
        f"\nfuzz: {STATS['messages']} messages, {STATS['replies']} replies "
        f"({STATS['ok']} ok, {STATS['GenericError']} GenericError, "
        f"{STATS['CommandNotFound']} CommandNotFound, {STATS['DeviceNotFound']} "
        f"DeviceNotFound, {STATS['events']} events) in {time.monotonic() - started:.0f} s; "
        f"daemon RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB"
    )
    assert rss_end - rss_start < 128 * 2**20, "the daemon's memory grew without bound"
    with daemon.client() as q:
        q("vm-remove", vm=WITNESS)


def fingerprint(client):
    reply = client.call({"execute": "query-vms", "id": "fp"})
    assert reply.get("id") == "fp", reply
    vm = next(v for v in reply["return"] if v["name"] == WITNESS)
    return json.dumps(vm, sort_keys=True)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


@st.composite
def qmp_messages(draw):
    command = draw(st.sampled_from(FUZZED))
    names = [a.name for a in command.args]
    key = st.sampled_from(names) | st.text(max_size=8) if names else st.text(max_size=8)
    keys = draw(st.lists(key, max_size=6, unique=True))
    args = {}
    for key in keys:
        if key == "vm":
            args[key] = draw(st.sampled_from([WITNESS, "nobody", "", 5]))
        else:
            args[key] = draw(st.integers(-2, 300) | json_values)
    message = {"execute": command.name, "arguments": args}
    if draw(st.booleans()):
        message["id"] = draw(json_values)
    return message


fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@fuzz
@given(st.binary(max_size=600))
def test_raw_bytes_never_break_the_daemon(target, data):
    client, _ = target
    # Garbage, then a reset byte and a sentinel: every reply up to the sentinel must be QMP.
    client.send(data + b'\x01{"execute": "query-version", "id": "sentinel"}')
    while True:
        reply = client.recv()
        valid_reply(reply)
        if reply.get("id") == "sentinel" and "return" in reply:
            break


@fuzz
@given(qmp_messages())
def test_qmp_shaped_messages_are_answered_and_rejections_change_nothing(target, message):
    client, _ = target
    before = fingerprint(client)
    reply = client.call(message)
    valid_reply(reply, message)
    if "error" in reply:
        assert fingerprint(client) == before, (message, reply)
    if message["execute"] == "stop" and "return" in reply:  # keep the witness running
        reply = client.call({"execute": "cont", "arguments": {"vm": WITNESS}, "id": "cont"})
        assert reply == {"return": {}, "id": "cont"}
