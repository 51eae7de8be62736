"""The one error root of the daemon: what a QMP client is told when a command fails.

    QmpError                 {"error": {"class": <error_class>, "desc": <desc>}}
     ├── GenericError        bad arguments, kernel-contract errors (desc names the errno)
     ├── CommandNotFound     unknown command, or not allowed in the current phase
     └── DeviceNotFound      unknown vm, memslot or consumer

A failed command changes nothing; handlers raise these before any side effect, or undo.
"""

from __future__ import annotations

import errno


class QmpError(Exception):
    """An error reply. ``desc`` is for people: it says what was wrong and what to do."""

    error_class = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc

    def to_json(self) -> dict[str, str]:
        return {"class": self.error_class, "desc": self.desc}


class GenericError(QmpError):
    error_class = "GenericError"


class CommandNotFound(QmpError):
    error_class = "CommandNotFound"


class DeviceNotFound(QmpError):
    error_class = "DeviceNotFound"


def oserror_text(exc: OSError) -> str:
    """'No space left on device (ENOSPC)': the text and the errno's name."""
    name = errno.errorcode.get(exc.errno or 0, f"errno {exc.errno}")
    return f"{exc.strerror or exc} ({name})"
