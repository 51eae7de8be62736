"""A byte-level QMP client: sends exactly what it is given, reads CRLF-terminated replies.

qemu.qmp is the independent client for well-formed use; this one is for what qemu.qmp will not
send — broken JSON, garbage bytes, descriptors with odd messages, clients that never read.
"""

from __future__ import annotations

import array
import json
import socket
from typing import Any


def _not_json(name: str) -> Any:
    """Python's json accepts Infinity and NaN; JSON, and so a QMP client, does not."""
    raise ValueError(f"the daemon sent {name}, which is not JSON")


class Raw:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def recv(self) -> Any:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return json.loads(line, parse_constant=_not_json)

    def send(self, raw: bytes | dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
        if fds:
            rights = array.array("i", fds).tobytes()
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        else:
            self.sock.sendall(data)

    def ask(self, raw: bytes | dict[str, Any]) -> Any:
        self.send(raw)
        return self.recv()

    def negotiate(self) -> None:
        """Read the greeting and leave capabilities negotiation."""
        assert "QMP" in self.recv()
        assert self.ask({"execute": "qmp_capabilities"}) == {"return": {}}

    def closed(self) -> bool:
        """True once the daemon has closed its end."""
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
