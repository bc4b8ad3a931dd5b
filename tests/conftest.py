"""Project-wide test rules.

In CI (.ci/run sets KJUMPD_REQUIRE_VM=1) no test may skip: a skipped test there would be a
missing prerequisite passed off as green, so every skip is turned into a failure that says
what was missing.

Hypothesis runs without its per-example deadline and its too-slow health check: the machines
this runs on are shared (2 cores, QEMU guests beside the tests), and a slow example is a
scheduling fact, not a finding. Speed is measured by bench/, never asserted here.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("kjumpd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("kjumpd")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("KJUMPD_REQUIRE_VM") == "1"
        and report.skipped
        and not hasattr(report, "wasxfail")
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under KJUMPD_REQUIRE_VM=1 (CI must run every test): {reason}"
