"""Fixtures for the VM tier (marker ``vm``).

Environment prerequisites (root, qemu-system-x86_64, qemu-img, e2fsck) skip the tier when
absent, except when KJUMPD_REQUIRE_VM=1 (CI): then a missing prerequisite FAILS the test.
Missing *product* pieces (kernel, B's or R's initramfs, guest image, daemon, CLI) always fail:
the scenario names what is missing.

Serial logs of every QEMU run stay under artifacts/vm/<test>/ in the checkout (or
$KJUMPD_ARTIFACTS/vm/<test>/); the qcow2 overlays are deleted after the test unless
KJUMPD_KEEP_DISKS=1.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import assets as vm_assets

REPO = Path(__file__).resolve().parents[2]


def unavailable(reason: str) -> None:
    """Skip, or fail when the VM tier is required (CI): the harness' rule."""
    from tests.vm.harness import missing_prereq

    missing_prereq(reason)


def environment_problems() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("not root (debootstrap, mkfs -d with ownership)")
    for tool in ("qemu-system-x86_64", "qemu-img", "e2fsck", "debugfs", "debootstrap"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not on PATH (tools/setup.sh installs it)")
    return problems


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def vm_env() -> None:
    problems = environment_problems()
    if problems:
        unavailable("; ".join(problems))


@pytest.fixture(scope="session")
def vm_assets_built(vm_env: None) -> vm_assets.Assets:
    """Every asset for this checkout (cached: seconds when nothing changed, so a scenario
    never boots a guest image older than the code under test)."""
    return vm_assets.build_all()


@pytest.fixture
def run_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    base = Path(os.environ.get("KJUMPD_ARTIFACTS") or REPO / "artifacts") / "vm"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    d = base / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    yield d
    if os.environ.get("KJUMPD_KEEP_DISKS") != "1":  # logs stay, disk overlays (GiBs) go
        for disk in d.glob("*.qcow2"):
            disk.unlink()
