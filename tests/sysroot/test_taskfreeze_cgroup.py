"""The user-space freeze on this machine's real cgroup v2 (root): real processes are
stopped and come back where they were, a task stuck in the kernel is named, and a daemon
killed inside the frozen window leaves nothing frozen.

The fake system root maps /sys/fs/cgroup onto a private subtree of the real cgroup2 mount
(everything the test creates lives there); its /proc has, for each process of the test, the
real stat, comm and wchan and a cgroup file relative to that subtree.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kjumpd.daemon import taskfreeze
from kjumpd.errors import TaskFreezeError
from kjumpd.sysroot import Sysroot
from tests import prereq

FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
MiB = 1 << 20


def cgroup2_mount() -> Path | None:
    for line in open("/proc/self/mountinfo"):
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            return Path(left.split()[4])
    return None


@pytest.fixture
def cg(tmp_path):
    """(fake root, real subtree, helpers) with a private cgroup2 subtree."""
    prereq.need(os.geteuid() == 0, "root is needed to create cgroups")
    mount = cgroup2_mount()
    prereq.need(mount is not None, "no cgroup2 mount on this machine")
    real = mount / f"kjumpd-test-{os.getpid()}-{tmp_path.name}"
    try:
        real.mkdir()
    except OSError as e:
        prereq.need(False, f"cannot create a cgroup under {mount}: {e}")
    prereq.need((real / "cgroup.freeze").exists(), "cgroup.freeze missing (Linux < 5.2)")
    root = tmp_path / "root"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(
        "1 0 254:1 / / rw - ext4 /dev/vda rw\n"
        "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
    )
    (root / "sys/fs").mkdir(parents=True)
    os.symlink(real, root / "sys/fs/cgroup")
    procs: list[subprocess.Popen] = []
    fx = Fx(root, real, procs)
    try:
        yield fx
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # with the children it forked
        for p in procs:
            p.wait()
        for d in sorted((p for p in real.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            (d / "cgroup.freeze").write_text("0")
            d.rmdir()
        (real / "cgroup.freeze").write_text("0")
        deadline = time.monotonic() + 10
        while (real / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)  # killed children not reaped yet
        real.rmdir()


class Fx:
    def __init__(self, root: Path, real: Path, procs: list[subprocess.Popen]) -> None:
        self.root, self.real, self.procs = root, real, procs

    @property
    def sr(self) -> Sysroot:
        return Sysroot(self.root)

    def mkcg(self, rel: str) -> None:
        (self.real / rel).mkdir(parents=True, exist_ok=True)

    def spawn(self, rel: str, script: str, ppid: int = 1) -> subprocess.Popen:
        """A python process in cgroup ``rel`` ("" = the subtree's top), shown in the fake
        /proc with parent ``ppid``."""
        p = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script)], start_new_session=True
        )
        self.procs.append(p)
        (self.real / rel / "cgroup.procs").write_text(str(p.pid))
        self.show(p.pid, rel, ppid)
        return p

    def show(self, pid: int, rel: str, ppid: int) -> None:
        d = self.root / "proc" / str(pid)
        d.mkdir(exist_ok=True)
        for name in ("comm", "wchan"):
            if not (d / name).exists():
                os.symlink(f"/proc/{pid}/{name}", d / name)
        (d / "cgroup").write_text(f"0::/{rel}\n")
        real = open(f"/proc/{pid}/stat").read()
        head, _, tail = real.rpartition(")")
        fields = tail.split()
        fields[1] = str(ppid)
        (d / "stat").write_text(head + ") " + " ".join(fields) + "\n")

    def real_cgroup(self, pid: int) -> str:
        line = next(x for x in open(f"/proc/{pid}/cgroup") if x.startswith("0::"))
        return line[3:].strip()


COUNTER = """
    import os, time
    fd = os.open({path!r}, os.O_RDWR | os.O_CREAT)
    n = 0
    while True:
        n += 1
        os.pwrite(fd, b"%20d" % n, 0)     # fixed width, never truncated: a reader sees a number
        time.sleep(0.005)
"""


def counter(fx: Fx, rel: str, path: Path, ppid: int = 1) -> subprocess.Popen:
    return fx.spawn(rel, COUNTER.format(path=str(path)), ppid)


def moving(path: Path, wait: float = 0.4) -> bool:
    before = path.read_text() if path.exists() else ""
    time.sleep(wait)
    return (path.read_text() if path.exists() else "") != before


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.02)


def test_everything_but_the_daemon_stops_and_comes_back_where_it_was(cg, tmp_path):
    for rel in ("svc/daemon", "svc/db", "user/app/inner", "admin"):
        cg.mkcg(rel)
    (cg.real / "admin/cgroup.freeze").write_text("1")  # someone else's freeze
    daemon = counter(cg, "svc/daemon", tmp_path / "daemon")
    helper = counter(cg, "svc/daemon", tmp_path / "helper", ppid=daemon.pid)  # its child
    shell = counter(cg, "svc/daemon", tmp_path / "shell")  # not its child
    db = counter(cg, "svc/db", tmp_path / "db")
    inner = counter(cg, "user/app/inner", tmp_path / "inner")
    loose = counter(cg, "", tmp_path / "loose")  # straight in the top
    files = {
        p: tmp_path / n
        for p, n in (
            (daemon, "daemon"),
            (helper, "helper"),
            (shell, "shell"),
            (db, "db"),
            (inner, "inner"),
            (loose, "loose"),
        )
    }
    for f in files.values():
        wait_for(f)
    where = {p.pid: cg.real_cgroup(p.pid) for p in files}

    state = taskfreeze.FrozenState()
    tf = taskfreeze.TaskFreezer(cg.sr, state, pid=daemon.pid)
    rep = tf.freeze(timeout=10)
    assert set(rep.frozen) == {"svc/db", "user"} and rep.already_frozen == ["admin"]
    assert rep.parked == 2 and not rep.left_running  # shell and loose
    assert moving(files[daemon]) and moving(files[helper])
    for p in (shell, db, inner, loose):
        assert not moving(files[p]), f"pid {p.pid} still runs"
    # the record any thaw path reads names what was frozen
    rec = taskfreeze.read_state(cg.sr)
    assert rec is not None and sorted(rec.cgroups) == ["svc/db", "user"]
    assert sorted(pid for _, pids in rec.parks for pid in pids) == sorted([shell.pid, loose.pid])

    assert tf.thaw() == []
    for p in files:
        assert moving(files[p]), f"pid {p.pid} did not come back"
        assert cg.real_cgroup(p.pid) == where[p.pid]
    assert not any(p.name == taskfreeze.PARK for p in cg.real.rglob("*"))
    assert (cg.real / "admin/cgroup.freeze").read_text().strip() == "1"  # still theirs


FORKER = """
    import os, time
    fd = os.open({path!r}, os.O_RDWR | os.O_CREAT)
    n = 0
    while True:                            # a shell loop: a short-lived child every ms or so
        n += 1
        if os.fork() == 0:
            time.sleep(0.05)
            os._exit(0)
        os.pwrite(fd, b"%20d" % n, 0)
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
        time.sleep(0.001)
"""


def test_a_parked_process_that_keeps_forking_comes_back_and_leaves_no_park(cg, tmp_path):
    cg.mkcg("svc/daemon")
    daemon = counter(cg, "svc/daemon", tmp_path / "daemon")
    forker = cg.spawn("", FORKER.format(path=str(tmp_path / "forker")))
    wait_for(tmp_path / "forker")
    for _ in range(5):  # the children forked while the park is emptied are the race
        tf = taskfreeze.TaskFreezer(cg.sr, taskfreeze.FrozenState(), pid=daemon.pid)
        rep = tf.freeze(timeout=10)
        assert rep.parked >= 1 and not moving(tmp_path / "forker")
        assert tf.thaw() == []
        assert not (cg.real / taskfreeze.PARK).exists()
        assert moving(tmp_path / "forker", wait=0.1)
        assert cg.real_cgroup(forker.pid) == cg.real_cgroup(daemon.pid).rsplit("/svc/", 1)[0]


@pytest.fixture
def frozen_fs(tmp_path):
    """An ext4 loop filesystem, frozen while the test runs its writer against it."""
    prereq.need(os.geteuid() == 0, "root is needed for loop mounts")
    img, mp = tmp_path / "fs.img", tmp_path / "mnt"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", str(img)], check=True, capture_output=True)
    mp.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mp)], check=True, capture_output=True)
    fd = os.open(mp, os.O_RDONLY)
    state = {"frozen": False}

    def freeze() -> None:
        fcntl.ioctl(fd, FIFREEZE, 0)
        state["frozen"] = True

    def thaw() -> None:
        if state["frozen"]:
            fcntl.ioctl(fd, FITHAW, 0)
            state["frozen"] = False

    try:
        yield mp, freeze, thaw
    finally:
        thaw()
        os.close(fd)
        subprocess.run(["umount", "-l", str(mp)], capture_output=True)


def test_a_task_stuck_in_the_kernel_is_named_and_nothing_stays_frozen(cg, tmp_path, frozen_fs):
    mp, freeze, thaw = frozen_fs
    for rel in ("svc/daemon", "user/editor", "user/other"):
        cg.mkcg(rel)
    daemon = counter(cg, "svc/daemon", tmp_path / "daemon")
    counter(cg, "user/other", tmp_path / "other")
    wait_for(tmp_path / "other")
    freeze()
    # a writer that blocks in the frozen filesystem: uninterruptible, no freezer can stop it
    stuck = cg.spawn(
        "user/editor",
        f"""
        import os
        fd = os.open({str(mp / "file")!r}, os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"x" * 4096)
    """,
    )
    deadline = time.monotonic() + 20
    while open(f"/proc/{stuck.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "D":
        assert time.monotonic() < deadline, "the writer never blocked"
        time.sleep(0.02)
    tf = taskfreeze.TaskFreezer(cg.sr, taskfreeze.FrozenState(), pid=daemon.pid)
    with pytest.raises(TaskFreezeError) as e:
        tf.freeze(timeout=1.0)
    msg = e.value.message
    assert f"pid {stuck.pid} (python" in msg and "state D" in msg, msg
    assert "user" in e.value.context["cgroups"] and e.value.fix
    # everything was thawed before the error reached the caller
    assert moving(tmp_path / "other")
    assert (cg.real / "user/cgroup.freeze").read_text().strip() == "0"
    assert taskfreeze.read_state(cg.sr).cgroups == []
    thaw()
    assert stuck.wait(timeout=20) == 0


DAEMON_SCRIPT = """
import os, sys, time
from kjumpd.daemon import freezeguard, fsfreeze, taskfreeze
from kjumpd.linux import mountinfo
from kjumpd.sysroot import Sysroot
sr = Sysroot(sys.argv[1])
state = taskfreeze.FrozenState(pid=os.getpid())
guard = freezeguard.start(sr, bound=float(sys.argv[2]))
print("guard", guard.pid, flush=True)
sys.stdin.readline()                      # the test shows the guard in the fake /proc first
tf = taskfreeze.TaskFreezer(sr, state)
tf.freeze(timeout=10)
mounts = mountinfo.parse(sr.read_text("/proc/self/mountinfo"))

def before(m):
    state.mounts.append((m.mountpoint, m.devno, m.fstype))
    tf.record()
fsfreeze.freeze(sr, [m for m in mounts if m.mountpoint == "/mnt/data"], before_freeze=before)
print("frozen", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["sigkill", "bound"])
def test_a_daemon_that_dies_or_hangs_in_the_frozen_window_leaves_nothing_frozen(
    cg, tmp_path, frozen_fs, how
):
    mp, _, _ = frozen_fs
    for rel in ("svc/daemon", "user/writer"):
        cg.mkcg(rel)
    writer = counter(cg, "user/writer", tmp_path / "writer")
    wait_for(tmp_path / "writer")
    st = os.stat(mp)
    with open(cg.root / "proc/self/mountinfo", "a") as f:
        f.write(
            f"40 1 {os.major(st.st_dev)}:{os.minor(st.st_dev)} / /mnt/data rw - ext4 "
            f"/dev/loop9 rw\n"
        )
    (cg.root / "mnt").mkdir()
    os.symlink(mp, cg.root / "mnt/data")
    repo = Path(__file__).resolve().parents[2]
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON_SCRIPT, str(cg.root), "600" if how == "sigkill" else "3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=repo,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    cg.procs.append(daemon)
    (cg.real / "svc/daemon/cgroup.procs").write_text(str(daemon.pid))
    cg.show(daemon.pid, "svc/daemon", 1)
    word, guard_pid = daemon.stdout.readline().split()
    assert word == "guard"
    cg.show(int(guard_pid), "svc/daemon", daemon.pid)  # the daemon's child, as in /proc
    daemon.stdin.write("go\n")
    daemon.stdin.flush()
    assert daemon.stdout.readline().strip() == "frozen"
    assert not moving(tmp_path / "writer")
    probe = mp / "probe"
    if how == "sigkill":
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    # within a bounded time the filesystem takes writes and the writer runs again
    t = subprocess.run(
        ["timeout", "20", "sh", "-c", f"echo ok > {probe} && sync {probe}"], capture_output=True
    )
    assert t.returncode == 0 and probe.read_text() == "ok\n"
    assert moving(tmp_path / "writer")
    assert cg.real_cgroup(writer.pid).endswith("/user/writer")
    assert taskfreeze.read_state(cg.sr) is None
