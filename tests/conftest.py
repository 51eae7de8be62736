"""Shared test switches.

Tests that need something from the system (promtool, /dev/kvm, systemd tools, root) skip with a
reason when it is absent — unless DIRTYLOGD_REQUIRE_ALL=1, which CI sets: there, a missing tool
is a failure, so a green run means every test ran.
"""

import os
import shutil

import hypothesis
import pytest

# Imported and configured at start-up, not lazily inside a test: CPython 3.11.7 can fail
# ("AST constructor recursion depth mismatch") when pytest rewrites modules imported deep in a
# test's stack. No deadline: CI machines are shared and noisy.
hypothesis.settings.register_profile("dirtylogd", deadline=None, print_blob=True)
hypothesis.settings.load_profile("dirtylogd")

REQUIRE_ALL = os.environ.get("DIRTYLOGD_REQUIRE_ALL") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (CI) when a prerequisite is missing."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"prerequisite missing in CI: {reason}")
    pytest.skip(reason)


def need_tool(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"{name} is not installed")
    assert path is not None
    return path
