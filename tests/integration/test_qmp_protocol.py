"""QMP as qmp-spec.rst defines it, over a raw unix socket to a real daemon."""

import os
import time

import pytest

from .daemon_proc import Qmp
from .raw import Raw


@pytest.fixture
def raw(daemon):
    r = Raw(daemon.socket)
    yield r
    r.close()


def test_greeting_has_version_and_no_capabilities(raw):
    greeting = raw.recv()
    version = greeting["QMP"]["version"]
    assert set(version["qemu"]) == {"major", "minor", "micro"}
    assert version["package"].startswith("dirtylogd ")
    assert greeting["QMP"]["capabilities"] == []


def test_commands_before_negotiation_are_command_not_found(raw):
    raw.recv()
    reply = raw.ask({"execute": "query-vms", "id": 1})
    assert reply == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        "id": 1,
    }
    assert raw.ask({"execute": "qmp_capabilities"}) == {"return": {}}
    assert "return" in raw.ask({"execute": "query-vms"})
    again = raw.ask({"execute": "qmp_capabilities", "id": "x"})
    assert again["error"]["class"] == "CommandNotFound" and again["id"] == "x"


def test_unknown_capability_is_refused(raw):
    raw.recv()
    reply = raw.ask({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
    assert reply["error"] == {"class": "GenericError", "desc": "Capability 'oob' not available"}


@pytest.mark.parametrize("id_", [0, -7, 2**70, 1.5, "a\u00e9b", None, [1, {"x": []}], {"k": 2}])
def test_id_is_echoed_exactly(raw, id_):
    raw.recv()
    raw.ask({"execute": "qmp_capabilities"})
    assert raw.ask({"execute": "query-version", "id": id_})["id"] == id_
    assert raw.ask({"execute": "no-such-command", "id": id_})["id"] == id_


@pytest.mark.parametrize(
    ("message", "id_"),
    [
        (b'{"execute": "query-version", "id": 1e400}', None),
        (b'{"execute": "query-version", "id": -1e400}', None),
        (b'{"execute": "query-version", "id": [1, 1e999]}', None),
        (b'{"execute": "query-vms", "id": 3, "arguments": {"x": 1e400}}', 3),
        (b'{"execute": "query-vms", "id": 1e308}', 1e308),
    ],
)
def test_every_reply_is_valid_json_whatever_numbers_the_request_holds(raw, message, id_):
    """1e400 is JSON, but no double: it is refused by name (Raw parses strictly, so an
    "Infinity" would fail here), with the id echoed whenever the id is itself finite."""
    raw.negotiate()
    reply = raw.ask(message)
    if id_ == 1e308:
        assert reply == {"return": reply["return"], "id": 1e308}
    else:
        assert reply["error"]["desc"].endswith("is not a finite number (beyond a double's range)")
        assert reply.get("id") == id_ and ("id" in reply) == (id_ is not None)
    assert raw.ask({"execute": "query-version", "id": 9})["id"] == 9  # still served


def test_a_top_level_number_split_from_its_end_does_not_swallow_the_next_command(raw):
    """The same bytes in one read and in two get the same two replies."""
    raw.negotiate()
    for chunks in (
        [b'42 {"execute": "query-version", "id": 1}'],
        [b"42", b' {"execute": "query-version", "id": 1}'],
    ):
        for chunk in chunks:
            raw.send(chunk)
            time.sleep(0.05)  # separate reads
        assert raw.recv()["error"]["desc"] == "QMP input must be a JSON object"
        assert raw.recv()["id"] == 1


def test_no_id_in_the_reply_when_the_request_had_none(raw):
    raw.recv()
    assert "id" not in raw.ask({"execute": "qmp_capabilities"})
    assert "id" not in raw.ask({"execute": "nope"})


@pytest.mark.parametrize(
    ("message", "desc"),
    [
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b"42 ", "QMP input must be a JSON object"),
        (b'{"id": 3}', "QMP input lacks member 'execute'"),
        (b'{"execute": 5, "id": 3}', "QMP input member 'execute' must be a string"),
        (
            b'{"execute": "query-vms", "arguments": [], "id": 3}',
            "QMP input member 'arguments' must be an object",
        ),
        (
            b'{"execute": "query-vms", "extra": 1, "id": 3}',
            "QMP input member 'extra' is unexpected",
        ),
        (b'{"exec-oob": "query-vms", "id": 3}', "out-of-band execution is not supported"),
        (b'{"execute": }', "JSON parse error, expecting value"),
    ],
)
def test_malformed_input_gets_a_generic_error(raw, message, desc):
    raw.recv()
    raw.ask({"execute": "qmp_capabilities"})
    reply = raw.ask(message)
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith(desc)
    assert raw.ask({"execute": "query-version", "id": 9})["id"] == 9  # still served


def test_control_character_resets_the_parser(raw):
    raw.recv()
    raw.ask({"execute": "qmp_capabilities"})
    raw.send(b'{"execute": "query-vm')  # truncated
    reply = raw.ask(b'\x01{"execute": "query-version", "id": 1}')
    assert reply["error"]["class"] == "GenericError" and "reset" in reply["error"]["desc"]
    assert raw.recv()["id"] == 1


def test_messages_back_to_back_in_one_write(raw):
    raw.recv()
    raw.send(
        b'{"execute":"qmp_capabilities","id":1}{"execute":"query-version","id":2}'
        b'{"execute":"query-commands","id":3}'
    )
    assert [raw.recv()["id"] for _ in range(3)] == [1, 2, 3]


def test_oversized_message_gets_an_error_then_the_connection_closes(fresh_daemon):
    d = fresh_daemon("--max-message-bytes", "4096", metrics=False)
    r = Raw(d.socket)
    r.recv()
    r.send(b'{"execute": "sim-write", "arguments": {"data": "' + b"A" * 8192 + b'"}}')
    reply = r.recv()
    assert "exceeds the 4096-byte limit" in reply["error"]["desc"]
    with pytest.raises(EOFError):
        r.recv()
    r.close()
    with d.client() as q:  # the daemon keeps serving others
        assert q("query-vms") == []


def test_getfd_takes_a_descriptor_passed_with_scm_rights(qmp):
    assert qmp.error("getfd", fdname="x") == (
        "GenericError",
        "no file descriptor was supplied via SCM_RIGHTS",
    )
    fd = os.memfd_create("t")
    qmp.send_fd(fd)
    assert qmp("getfd", fdname="bm") == {}
    assert qmp("closefd", fdname="bm") == {}
    assert qmp.error("closefd", fdname="bm")[0] == "GenericError"
    assert qmp.error("getfd", fdname="1abc")[1].startswith("Parameter 'fdname' expects")
    os.close(fd)


def test_query_commands_and_schema_come_from_the_same_table(qmp):
    from dirtylogd.api.schema import COMMANDS

    names = [c["name"] for c in qmp("query-commands")]
    assert names == [c.name for c in COMMANDS]
    schema = {e["name"]: e for e in qmp("query-qmp-schema")}
    get = schema["dirty-log-get"]
    assert get["meta-type"] == "command"
    members = {m["name"]: m for m in schema[get["arg-type"]]["members"]}
    assert members["vm"]["type"] == "str" and "default" not in members["vm"]
    assert members["encoding"]["type"] == "Encoding" and "default" in members["encoding"]
    assert schema["Encoding"]["values"] == ["bitmap", "ranges", "fd"]


def test_qemu_qmp_client_without_negotiation_gets_command_not_found(daemon):
    with Qmp(daemon.socket, negotiate=False) as q:
        assert q.error("query-vms")[0] == "CommandNotFound"
