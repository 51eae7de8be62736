"""The bad-input catalogue: what a client sends, and the QMP error it gets back.

One table serves both the test (test_bad_input.py) and the document docs/bad-input.md:

    python -m tests.integration.bad_input > docs/bad-input.md

A case is sent on a fresh connection to a daemon holding the witness VM below; "negotiate"
says whether qmp_capabilities comes first; "fds" passes that many descriptors of "fd_kind"
(see descriptors.py; a read-only file unless the case says otherwise) with the first message.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20
WITNESS = "witness"
# Slot 0: [0, 1 MiB) logged, 256 pages. Slot 1: [16 MiB, +256 pages) logged. Slot 2: no log.
# (s390 memslots are 1 MiB multiples, so no slot ends inside a 64-page word.)
WITNESS_SLOTS = [
    {"slot": 0, "guest-phys-addr": 0, "size": MiB},
    {"slot": 1, "guest-phys-addr": 16 * MiB, "size": MiB},
    {"slot": 2, "guest-phys-addr": 32 * MiB, "size": MiB, "log-dirty-pages": False},
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def cmd(command: str, /, **arguments: Any) -> bytes:
    return json.dumps(
        {
            "execute": command,
            "arguments": {k.replace("_", "-"): v for k, v in arguments.items()},
            "id": 7,
        }
    ).encode()


@dataclass
class Case:
    what: str  # for the document
    send: bytes
    error_class: str
    desc: str  # a fragment of the desc the client gets
    negotiate: bool = True
    fds: int = 0  # descriptors passed with the first message
    fd_kind: str = "readonly"  # what kind (descriptors.KINDS)
    closes: bool = False  # the daemon closes the connection after answering
    has_id: bool = True  # the reply echoes id 7
    setup: list[bytes] = field(default_factory=list)  # sent first, on the same connection


CASES: list[Case] = [
    # --- framing -------------------------------------------------------------------------------
    Case(
        "invalid JSON",
        b'{"execute": }',
        "GenericError",
        "JSON parse error, expecting value",
        has_id=False,
    ),
    Case(
        "a JSON array, not an object",
        b"[1, 2]",
        "GenericError",
        "QMP input must be a JSON object",
        has_id=False,
    ),
    Case("a bare number", b"42 ", "GenericError", "QMP input must be a JSON object", has_id=False),
    Case(
        "NaN",
        b'{"execute": "query-vms", "id": NaN}',
        "GenericError",
        "JSON parse error, nan is not valid json",
        has_id=False,
    ),
    Case(
        "an id beyond a double (1e400)",
        b'{"execute": "query-vms", "id": 1e400}',
        "GenericError",
        "JSON parse error, number 1e400 is not a finite number (beyond a double's range)",
        has_id=False,
    ),
    Case(
        "an argument beyond a double (the finite id is echoed)",
        b'{"execute": "sim-read", "id": 7, "arguments": {"vm": "witness", "guest-phys-addr": '
        b'-1e400, "length": 8}}',
        "GenericError",
        "JSON parse error, number -1e400 is not a finite number (beyond a double's range)",
    ),
    Case(
        "invalid UTF-8",
        b'{"execute": "query-vms", "id": "\xc3\x28"}',
        "GenericError",
        "input is not valid UTF-8",
        has_id=False,
    ),
    Case(
        "a control character (parser reset)",
        b'{"execute": "quer\x01',
        "GenericError",
        "stray byte 0x01 (the parser was reset)",
        has_id=False,
    ),
    Case(
        "a 0xFF byte (parser reset)",
        b"\xff",
        "GenericError",
        "stray byte 0xff (the parser was reset)",
        has_id=False,
    ),
    Case(
        "a message over 1 MiB",
        b'{"execute": "sim-write", "arguments": {"data": "' + b"A" * (1100 * 1024) + b'"}}',
        "GenericError",
        "message exceeds the 1048576-byte limit; closing the connection",
        closes=True,
        has_id=False,
    ),
    # --- session -------------------------------------------------------------------------------
    Case(
        "a command before qmp_capabilities",
        cmd("query-vms"),
        "CommandNotFound",
        "Expecting capabilities negotiation with 'qmp_capabilities'",
        negotiate=False,
    ),
    Case(
        "qmp_capabilities twice",
        cmd("qmp_capabilities"),
        "CommandNotFound",
        "Capabilities negotiation is already complete, command ignored",
    ),
    Case(
        "an unknown capability",
        cmd("qmp_capabilities", enable=["oob"]),
        "GenericError",
        "Capability 'oob' not available",
        negotiate=False,
    ),
    Case(
        "no 'execute'",
        b'{"arguments": {}, "id": 7}',
        "GenericError",
        "QMP input lacks member 'execute'",
    ),
    Case(
        "'execute' not a string",
        b'{"execute": 3, "id": 7}',
        "GenericError",
        "QMP input member 'execute' must be a string",
    ),
    Case(
        "'arguments' not an object",
        b'{"execute": "query-vms", "arguments": [], "id": 7}',
        "GenericError",
        "QMP input member 'arguments' must be an object",
    ),
    Case(
        "an unknown top-level member",
        b'{"execute": "query-vms", "x": 1, "id": 7}',
        "GenericError",
        "QMP input member 'x' is unexpected",
    ),
    Case(
        "exec-oob",
        b'{"exec-oob": "query-vms", "id": 7}',
        "GenericError",
        "out-of-band execution is not supported",
    ),
    # --- arguments -----------------------------------------------------------------------------
    Case(
        "an unknown command",
        cmd("drop-all-pages"),
        "CommandNotFound",
        "The command drop-all-pages has not been found",
    ),
    Case(
        "an unknown argument",
        cmd("query-dirty-rate", vm=WITNESS, bogus=1),
        "GenericError",
        "Parameter 'bogus' is unexpected",
    ),
    Case(
        "a missing argument",
        cmd("dirty-log-get", vm=WITNESS),
        "GenericError",
        "Parameter 'slot' is missing",
    ),
    Case(
        "a string for an integer",
        cmd("dirty-log-get", vm=WITNESS, slot="0"),
        "GenericError",
        "Parameter 'slot' expects an integer",
    ),
    Case(
        "a boolean for an integer",
        cmd("dirty-log-get", vm=WITNESS, slot=True),
        "GenericError",
        "Parameter 'slot' expects an integer",
    ),
    Case(
        "a non-integer number",
        cmd("dirty-log-get", vm=WITNESS, slot=1.5),
        "GenericError",
        "Parameter 'slot' expects an integer",
    ),
    Case(
        "a negative number",
        cmd("dirty-log-get", vm=WITNESS, slot=-1),
        "GenericError",
        "Parameter 'slot' must be between 0 and 65535, not -1",
    ),
    Case(
        "a number past 2^64",
        cmd("sim-write-pages", vm=WITNESS, gfns=[1], value=2**64),
        "GenericError",
        "Parameter 'value' must be between 0 and 18446744073709551615",
    ),
    Case(
        "an unknown enum value",
        cmd("dirty-log-get", vm=WITNESS, slot=0, encoding="json"),
        "GenericError",
        "Parameter 'encoding' must be one of 'bitmap', 'ranges', 'fd'",
    ),
    Case(
        "a share outside [0, 1]",
        cmd("sim-workload-start", vm=WITNESS, pages_per_second=1, dma_share=1.5),
        "GenericError",
        "Parameter 'dma-share' must be between 0.0 and 1.0",
    ),
    Case(
        "a read longer than 1 MiB",
        cmd("sim-read", vm=WITNESS, guest_phys_addr=0, length=2 * MiB),
        "GenericError",
        "Parameter 'length' must be between 0 and 1048576",
    ),
    Case(
        "more storage keys than KVM_S390_SKEYS_MAX",
        cmd("storage-keys-get", vm=WITNESS, start_gfn=0, count=(1 << 20) + 1),
        "GenericError",
        "Parameter 'count' must be between 1 and 1048576, not 1048577",
    ),
    Case(
        "a name that could be a path",
        cmd("vm-create", name="../etc"),
        "GenericError",
        "Parameter 'name' expects 1-64 of A-Z a-z 0-9 _ . -",
    ),
    Case(
        "malformed base64",
        cmd(
            "dirty-log-clear",
            vm=WITNESS,
            slot=0,
            first_page=0,
            num_pages=64,
            bitmap="***",
            consumer="mp",
        ),
        "GenericError",
        "Parameter 'bitmap' is not valid base64",
    ),
    # --- names ---------------------------------------------------------------------------------
    Case(
        "an unknown VM",
        cmd("dirty-log-get", vm="nobody", slot=0),
        "DeviceNotFound",
        "no VM named 'nobody'",
    ),
    Case(
        "an unknown consumer",
        cmd("dirty-log-get", vm=WITNESS, slot=0, consumer="ghost"),
        "DeviceNotFound",
        "vm 'witness' has no consumer named 'ghost'",
    ),
    Case(
        "a duplicate VM name",
        cmd("vm-create", name=WITNESS),
        "GenericError",
        "a VM named 'witness' already exists",
    ),
    Case(
        "a duplicate consumer name",
        cmd("consumer-add", vm=WITNESS, name="mp"),
        "GenericError",
        "vm 'witness' already has a consumer named 'mp'",
    ),
    Case(
        "removing the default consumer",
        cmd("consumer-remove", vm=WITNESS, name="default"),
        "GenericError",
        "the 'default' consumer belongs to the VM and cannot be removed",
    ),
    # --- the kernel contract ---------------------------------------------------------------------
    Case(
        "an unknown memslot",
        cmd("dirty-log-get", vm=WITNESS, slot=9),
        "GenericError",
        "slot 9 of vm 'witness': no such memslot (ENOENT)",
    ),
    Case(
        "a slot without dirty logging",
        cmd("dirty-log-get", vm=WITNESS, slot=2),
        "GenericError",
        "slot 2 of vm 'witness': dirty logging is not enabled (ENOENT)",
    ),
    Case(
        "an address space that does not exist",
        cmd("dirty-log-get", vm=WITNESS, slot=0, as_id=3),
        "GenericError",
        "(EINVAL)",
    ),
    Case(
        "an overlapping memslot",
        cmd("memslot-set", vm=WITNESS, slot=5, guest_phys_addr=MiB // 2, size=MiB),
        "GenericError",
        "overlaps slot 0 (EEXIST)",
    ),
    Case(
        "an unaligned memslot",
        cmd("memslot-set", vm=WITNESS, slot=5, guest_phys_addr=100, size=MiB),
        "GenericError",
        "is not page aligned (EINVAL)",
    ),
    Case(
        "an s390 memslot that is not a 1 MiB multiple",
        cmd("memslot-set", vm=WITNESS, slot=5, guest_phys_addr=64 * MiB, size=100 * 4096),
        "GenericError",
        "s390 memslots are 1 MiB multiples (size 0x64000) (EINVAL)",
    ),
    Case(
        "resizing a memslot",
        cmd("memslot-set", vm=WITNESS, slot=0, guest_phys_addr=0, size=2 * MiB),
        "GenericError",
        "an existing slot cannot be resized or remapped (EINVAL)",
    ),
    Case(
        "a store outside every memslot",
        cmd("sim-write", vm=WITNESS, guest_phys_addr=64 * MiB, data=b64(b"x")),
        "GenericError",
        "guest address 0x4000000 is in no memslot (EFAULT)",
    ),
    Case(
        "storage keys of frames past a memslot",
        cmd("storage-keys-get", vm=WITNESS, start_gfn=255, count=2),
        "GenericError",
        "guest address 0x100000 is in no memslot (EFAULT)",
    ),
    Case(
        "an I/O range leaving the memslots",
        cmd(
            "io-dirty-mark",
            vm=WITNESS,
            ranges=[
                {"guest-phys-addr": 0, "length": 4096},
                {"guest-phys-addr": MiB - 4096, "length": 8192},
            ],
        ),
        "GenericError",
        "leaves the memslots at 0x100000 (EFAULT)",
    ),
    Case(
        "CLEAR at a page not a multiple of 64",
        cmd(
            "dirty-log-clear",
            vm=WITNESS,
            slot=0,
            first_page=1,
            num_pages=64,
            bitmap=b64(bytes(8)),
            consumer="mp",
        ),
        "GenericError",
        "first-page 1 is not a multiple of 64 (EINVAL)",
    ),
    Case(
        "CLEAR of a short range not a multiple of 64",
        cmd(
            "dirty-log-clear",
            vm=WITNESS,
            slot=0,
            first_page=0,
            num_pages=63,
            bitmap=b64(bytes(8)),
            consumer="mp",
        ),
        "GenericError",
        "num-pages 63 is not a multiple of 64 and does not end at the slot's end "
        "(256 pages) (EINVAL)",
    ),
    Case(
        "a bitmap of the wrong length",
        cmd(
            "dirty-log-clear",
            vm=WITNESS,
            slot=0,
            first_page=0,
            num_pages=128,
            bitmap=b64(bytes(8)),
            consumer="mp",
        ),
        "GenericError",
        "must be 16 bytes (ALIGN(npages, 64) / 8), got 8 (EINVAL)",
    ),
    # --- descriptors ---------------------------------------------------------------------------
    Case(
        "getfd without a descriptor",
        cmd("getfd", fdname="bm"),
        "GenericError",
        "no file descriptor was supplied via SCM_RIGHTS",
    ),
    Case(
        "a descriptor name starting with a digit",
        cmd("getfd", fdname="1bm"),
        "GenericError",
        "Parameter 'fdname' expects a name not starting with a digit",
        fds=1,
    ),
    Case(
        "closefd of an unknown name",
        cmd("closefd", fdname="bm"),
        "GenericError",
        "no file descriptor named 'bm'",
    ),
    Case(
        "encoding 'fd' without a descriptor name",
        cmd("dirty-log-get", vm=WITNESS, slot=0, encoding="fd"),
        "GenericError",
        "encoding 'fd' needs fdname: pass a memfd with getfd first",
    ),
    Case(
        "a descriptor that cannot take the bitmap (read-only)",
        cmd("dirty-log-get", vm=WITNESS, slot=0, consumer="auto", encoding="fd", fdname="ro"),
        "GenericError",
        "descriptor 'ro' is not open for writing (EBADF)",
        fds=1,
        setup=[cmd("getfd", fdname="ro")],
    ),
    Case(
        "a descriptor that cannot take the storage keys (read-only)",
        cmd("storage-keys-get", vm=WITNESS, start_gfn=0, count=256, encoding="fd", fdname="ro"),
        "GenericError",
        "descriptor 'ro' is not open for writing (EBADF)",
        fds=1,
        setup=[cmd("getfd", fdname="ro")],
    ),
    Case(
        "a socket where a file is needed",
        cmd("dirty-log-get", vm=WITNESS, slot=0, encoding="fd", fdname="sock"),
        "GenericError",
        "descriptor 'sock' is not a file or memfd",
        fds=1,
        fd_kind="socket",
        setup=[cmd("getfd", fdname="sock")],
    ),
    Case(
        "a pipe where a file is needed",
        cmd("dirty-log-get", vm=WITNESS, slot=0, consumer="auto", encoding="fd", fdname="pipe"),
        "GenericError",
        "descriptor 'pipe' is not a file or memfd",
        fds=1,
        fd_kind="pipe",
        setup=[cmd("getfd", fdname="pipe")],
    ),
    Case(
        "/dev/null where a file is needed",
        cmd("dirty-log-get", vm=WITNESS, slot=0, consumer="auto", encoding="fd", fdname="null"),
        "GenericError",
        "descriptor 'null' is not a file or memfd",
        fds=1,
        fd_kind="devnull",
        setup=[cmd("getfd", fdname="null")],
    ),
    Case(
        "a file opened with O_APPEND (the bitmap would land at its end)",
        cmd("dirty-log-get", vm=WITNESS, slot=0, consumer="auto", encoding="fd", fdname="app"),
        "GenericError",
        "descriptor 'app' was opened with O_APPEND: the bitmap would land at the file's end, "
        "not at offset 0 where it is read (EINVAL)",
        fds=1,
        fd_kind="append",
        setup=[cmd("getfd", fdname="app")],
    ),
    Case(
        "a memfd sealed against writing",
        cmd("dirty-log-get", vm=WITNESS, slot=0, consumer="auto", encoding="fd", fdname="seal"),
        "GenericError",
        "descriptor 'seal' is sealed against writing (EPERM)",
        fds=1,
        fd_kind="sealed",
        setup=[cmd("getfd", fdname="seal")],
    ),
    Case(
        "a descriptor name with another encoding",
        cmd("dirty-log-get", vm=WITNESS, slot=0, encoding="ranges", fdname="bm"),
        "GenericError",
        "fdname is only used with encoding 'fd'",
    ),
    Case(
        "17 descriptors in one message",
        cmd("query-version"),
        "GenericError",
        "too many file descriptors: at most 16 may be held at once",
        fds=17,
        has_id=False,
    ),
]


def render_markdown() -> str:
    lines = [
        "# What a client gets for bad input",
        "",
        "Generated from `tests/integration/bad_input.py`; each row is a test that also checks",
        "that the daemon's state did not change and that another client is still served.",
        "",
        "| # | input | error class | desc (contains) |",
        "| --- | --- | --- | --- |",
    ]
    for i, case in enumerate(CASES, 1):
        extra = " (the connection is closed)" if case.closes else ""
        lines.append(
            f"| {i} | {case.what} | {case.error_class} | "
            f"`{case.desc.replace('|', chr(92) + '|')}`{extra} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
