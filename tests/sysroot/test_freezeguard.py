"""The freeze guard as a process: what it holds and how it answers, with a real daemon-like
process starting it (the thaw itself, on a real cgroup, is in test_taskfreeze_cgroup.py).

The guard lives through every hibernation and the image saves its memory: it must be a
small process of its own, not a copy of the daemon's heap, hold no descriptor of the
daemon's but its pipe, and take a termination signal however early it comes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20

#: a daemon with a large heap of python objects that starts the guard, prints its pid, then
#: on "stop" ends it (or, on "exit", leaves without a word: its death closes the pipe)
DAEMON = """
import os, sys
from kjumpd.daemon import freezeguard
from kjumpd.sysroot import Sysroot
heap = [str(i) * 8 for i in range(int(sys.argv[2]))]
spare = os.open("/dev/null", os.O_RDONLY)
os.set_inheritable(spare, True)          # a descriptor the daemon left inheritable
guard = freezeguard.start(Sysroot(sys.argv[1]), bound=600)
print(guard.pid, spare, flush=True)
if sys.stdin.readline().strip() == "stop":
    guard.stop()
    print("stopped", flush=True)
    sys.stdin.readline()
"""


def start_daemon(root: Path, objects: int = 1) -> tuple[subprocess.Popen[str], int, int]:
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(root), str(objects)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert daemon.stdout is not None
    guard, spare = (int(w) for w in daemon.stdout.readline().split())
    return daemon, guard, spare


def status(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert m, text
    return int(m.group(1)) << 10


def gone(pid: int, timeout: float = 20.0) -> bool:
    """The guard exited (it is the daemon's child: a zombie until reaped counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def settled_fds(pid: int, timeout: float = 20.0) -> set[int]:
    """The guard's descriptors once it has started (it closes strays as it starts)."""
    deadline = time.monotonic() + timeout
    fds: set[int] = set()
    while time.monotonic() < deadline:
        fds = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
        if len(fds) <= 4:
            break
        time.sleep(0.05)
    return fds


def finish(daemon: subprocess.Popen[str]) -> None:
    """The daemon ends the guard (``Guard.stop``), then exits."""
    assert daemon.stdin is not None and daemon.stdout is not None
    daemon.stdin.write("stop\n")
    daemon.stdin.flush()
    assert daemon.stdout.readline().strip() == "stopped"
    daemon.stdin.write("done\n")
    daemon.stdin.flush()
    daemon.wait(timeout=30)


def test_the_guard_is_a_small_process_of_its_own_not_a_copy_of_the_daemons_heap(tmp_path):
    daemon, guard, _ = start_daemon(tmp_path, objects=1_500_000)  # about 100 MiB of heap
    try:
        assert status(daemon.pid, "RssAnon") > 80 * MiB
        settled_fds(guard)
        # a fork would show the daemon's resident heap here (shared copy-on-write, then
        # copied page by page as either process touches it)
        assert status(guard, "RssAnon") < 16 * MiB, Path(f"/proc/{guard}/status").read_text()
        assert int(Path(f"/proc/{guard}/stat").read_text().rsplit(")", 1)[1].split()[1]) == (
            daemon.pid
        )  # the daemon's child: the user-space freeze leaves it running
    finally:
        finish(daemon)
    assert gone(guard)


def test_the_guard_holds_only_its_pipe_and_the_standard_descriptors(tmp_path):
    daemon, guard, _ = start_daemon(tmp_path)
    try:
        extra = settled_fds(guard) - {0, 1, 2}
        assert len(extra) == 1, extra  # the pipe, not the daemon's inheritable descriptor
        assert os.readlink(f"/proc/{guard}/fd/{extra.pop()}").startswith("pipe:")
        assert os.getsid(guard) == guard  # its own session: a hang-up of the daemon's is not its
    finally:
        finish(daemon)
    assert gone(guard)


def test_a_termination_signal_at_once_is_taken_and_thaws(tmp_path):
    daemon, guard, _ = start_daemon(tmp_path)
    # before the guard's python has even started: the signal waits, blocked from the spawn
    os.kill(guard, signal.SIGTERM)
    try:
        assert gone(guard)
    finally:
        finish(daemon)
    assert daemon.stderr is not None
    said = daemon.stderr.read()
    assert "freeze guard: thawed after SIGTERM for the freeze guard" in said, said


def test_the_daemons_death_makes_the_guard_thaw(tmp_path):
    daemon, guard, _ = start_daemon(tmp_path)
    daemon.kill()
    daemon.wait(timeout=30)
    assert gone(guard)
    assert daemon.stderr is not None
    said = daemon.stderr.read()
    assert "thawed after the death of kjumpd inside the frozen window" in said, said
