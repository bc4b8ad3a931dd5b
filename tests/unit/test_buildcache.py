"""savekernel.buildcache: builders of one cache entry take turns, and an entry that exists is
complete (a killed build leaves only a partial nothing trusts)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from savekernel import buildcache

REPO = Path(__file__).resolve().parents[2]

# A builder that announces it started, then waits for the test's "go" before it writes the
# entry in two steps; every build appends a line to "builds" so the test can count them.
BUILDER = """
import sys, time
from pathlib import Path
from savekernel import buildcache

d = Path(sys.argv[1])
entry = d / "entry"

def build(tmp):
    with open(d / "builds", "a") as f:
        f.write("built\\n")
    tmp.write_text("first half\\n")
    (d / "started").write_text("")
    while not (d / "go").exists():
        time.sleep(0.01)
    with open(tmp, "a") as f:
        f.write("second half\\n")

print("ready", flush=True)
built = buildcache.build_entry(entry, build)
print("built" if built else "waited", entry.read_text().replace("\\n", "|"), flush=True)
"""

COMPLETE = "first half|second half|"


def start(d: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(d)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def wait_for(cond, what: str, limit: float = 60.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def blocked_on_flock(pid: int) -> bool:
    """/proc/locks lists a process waiting for a lock on a '->' line with its pid."""
    lines = Path("/proc/locks").read_text().splitlines()
    return any("->" in ln and "FLOCK" in ln and f" {pid} " in ln for ln in lines)


def test_two_builders_of_one_entry_build_it_once_and_both_see_it_whole(tmp_path):
    first = start(tmp_path)
    wait_for(lambda: (tmp_path / "started").exists(), "the first build to start")
    second = start(tmp_path)
    assert second.stdout.readline() == "ready\n"
    wait_for(lambda: blocked_on_flock(second.pid), "the second run to wait for the lock")
    assert not (tmp_path / "entry").exists()  # nothing published while the build runs
    (tmp_path / "go").write_text("")
    out1, _ = first.communicate(timeout=60)
    out2, _ = second.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0
    assert out1.splitlines()[-1] == f"built {COMPLETE}"
    assert out2.splitlines()[-1] == f"waited {COMPLETE}"
    assert (tmp_path / "builds").read_text() == "built\n"  # once


def test_a_killed_build_leaves_no_entry_and_the_next_build_makes_it_whole(tmp_path):
    victim = start(tmp_path)
    wait_for(lambda: (tmp_path / "started").exists(), "the build to start")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert not (tmp_path / "entry").exists()  # the half written file is not the entry
    partials = list(tmp_path.glob(".entry.partial-*"))
    assert partials and partials[0].read_text() == "first half\n"

    def build(tmp: Path) -> None:
        tmp.write_text("first half\nsecond half\n")

    assert buildcache.build_entry(tmp_path / "entry", build) is True  # the lock died with it
    assert (tmp_path / "entry").read_text().replace("\n", "|") == COMPLETE
    assert not list(tmp_path.glob(".entry.partial-*"))  # the leftover is cleaned


def test_a_failing_build_leaves_nothing_and_an_existing_entry_is_not_rebuilt(tmp_path):
    entry = tmp_path / "dir-entry"

    def fail(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        buildcache.build_entry(entry, fail)
    assert not entry.exists() and not list(tmp_path.glob(".dir-entry.partial-*"))

    def build(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "bzImage").write_text("kernel")

    assert buildcache.build_entry(entry, build) is True
    assert buildcache.build_entry(entry, fail) is False  # complete: used as it is
    assert (entry / "bzImage").read_text() == "kernel"


def test_an_entry_that_is_not_valid_is_built_again(tmp_path):
    entry = tmp_path / "archive"
    entry.write_text("from an older layout")

    def build(tmp: Path) -> None:
        tmp.write_text("new")

    assert buildcache.build_entry(entry, build, valid=lambda p: p.read_text() == "new") is True
    assert entry.read_text() == "new"


def test_a_build_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="wrote nothing"):
        buildcache.build_entry(tmp_path / "e", lambda tmp: None)
