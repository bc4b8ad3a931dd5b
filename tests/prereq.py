"""The one rule for a missing test prerequisite (a tool, root, a kernel feature).

Outside CI the test is skipped with the reason; under KJUMPD_REQUIRE_VM=1 (.ci/run) it fails,
so CI never passes a test it did not run. tests/conftest.py enforces the same for any skip.
"""

from __future__ import annotations

import os

import pytest


def required() -> bool:
    return os.environ.get("KJUMPD_REQUIRE_VM") == "1"


def need(ok: bool, why: str) -> None:
    """Carry on when ``ok``; otherwise skip, or fail under KJUMPD_REQUIRE_VM=1."""
    if ok:
        return
    if required():
        pytest.fail(f"prerequisite missing (KJUMPD_REQUIRE_VM=1): {why}", pytrace=False)
    pytest.skip(f"prerequisite missing: {why}")
