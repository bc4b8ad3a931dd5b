"""The whole hibernate transaction on a fake system root, a failure injected at every step.

The only fake is the `kexec` executable on PATH (kjump_faketree.FAKE_KEXEC). Every failure
must leave the tree byte-for-byte as it was (trigger files aside, asserted separately;
the image target only changes when the save kernel "ran") and the next request must
succeed. As root, real ext4 and xfs filesystems on loop devices are mounted inside the
tree and really frozen (the fake kexec checks they are frozen during the jump).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from kjump_faketree import build, install_fake_kexec, setup_target_and_bootentry, tree_hash, w

from kjumpd.daemon import config as cfgmod
from kjumpd.daemon.transaction import Hibernation, Outcome
from kjumpd.errors import (
    CancelledError,
    FreezeError,
    FsStampError,
    HookError,
    ImageStateError,
    JumpError,
    KexecError,
    KjumpError,
    PlatformError,
    QuiesceError,
    ShrinkError,
    TaskFreezeError,
    UnsupportedError,
)
from kjumpd.image import store
from kjumpd.job import Job
from kjumpd.sysroot import Sysroot
from tests import prereq

REQUIRE = os.environ.get("KJUMPD_REQUIRE_VM") == "1"
IS_ROOT = os.geteuid() == 0
MiB = 1 << 20


class Rec:
    def __init__(self, cancel: threading.Event | None = None, cancel_at: str = "") -> None:
        self.calls: list[tuple[str, object]] = []
        self.cancel, self.cancel_at = cancel, cancel_at

    def phase(self, name: str, percent: float) -> None:
        self.calls.append(("phase", name))
        if self.cancel is not None and name == self.cancel_at:
            self.cancel.set()

    def prepare_for_sleep(self, active: bool) -> None:
        self.calls.append(("pfs", active))

    def log(self, msg: str) -> None:
        self.calls.append(("log", msg))


@dataclasses.dataclass
class Fx:
    root: Path
    host: Path
    uuid: str
    frozen_expect: list[str]

    @property
    def sr(self) -> Sysroot:
        return Sysroot(self.root)

    def config(self, **over) -> cfgmod.Config:
        return dataclasses.replace(cfgmod.load(self.sr), **over)

    def hib(self, events=None, **over) -> Hibernation:
        h = Hibernation(self.sr, self.config(**over), events or Rec())
        h.settle = 0.2
        return h

    def kexec_calls(self) -> list[list[str]]:
        p = self.host / "kexec.log"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    def hook_log(self) -> list[str]:
        p = self.host / "hooks.log"
        return p.read_text().splitlines() if p.exists() else []

    def header(self):
        dev, _ = store.open_target(self.root / "dev/vda", writable=False, offset=MiB)
        try:
            return store.read_header(dev)
        finally:
            dev.close()

    def job(self) -> Job:
        return Job.from_json((self.host / "job.json").read_text())

    def trigger(self, path: str) -> str:
        return (self.root / path.lstrip("/")).read_text()


# -- real filesystems on loop devices (root) --------------------------------------------------
def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def loopfs(tmp_path_factory):
    """ext4 and xfs on loop devices (root); None when not root (and not required)."""
    if not IS_ROOT or not shutil.which("mkfs.xfs"):
        if REQUIRE:
            pytest.fail("KJUMPD_REQUIRE_VM=1: root and mkfs.xfs are needed for real FIFREEZE")
        yield None
        return
    base = tmp_path_factory.mktemp("loopfs")
    mounted = []
    try:
        out = {}
        for fstype, size in (("ext4", 64 * MiB), ("xfs", 320 * MiB)):
            img = base / f"{fstype}.img"
            with open(img, "wb") as f:
                f.truncate(size)
            _run(
                *(["mkfs.ext4", "-q", "-b", "4096"] if fstype == "ext4" else ["mkfs.xfs", "-q"]),
                str(img),
            )
            mp = base / fstype
            mp.mkdir()
            _run("mount", "-o", "loop", str(img), str(mp))
            mounted.append(mp)
            src = next(
                line.split()[0] for line in open("/proc/mounts") if line.split()[1] == str(mp)
            )
            st = os.stat(mp)
            out[fstype] = (mp, f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", src)
        (out["ext4"][0] / "xfs").mkdir()
        (out["ext4"][0] / "data.txt").write_text("user data\n")
        (out["xfs"][0] / "more.txt").write_text("more user data\n")
        os.sync()
        yield out
    finally:
        for mp in reversed(mounted):
            subprocess.run(["umount", str(mp)], capture_output=True, timeout=60)


def _thaw_quietly(mp: Path) -> None:
    try:
        fd = os.open(mp, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.ioctl(fd, 0xC0045878, 0)
    except OSError:
        pass
    finally:
        os.close(fd)


@pytest.fixture
def fx(tmp_path, monkeypatch, loopfs):
    root, host = tmp_path / "root", tmp_path / "host"
    root.mkdir()
    mounts, binds = [], []
    if loopfs:
        ext_mp, ext_dev, ext_src = loopfs["ext4"]
        xfs_mp, xfs_dev, xfs_src = loopfs["xfs"]
        mounts = [
            ("/mnt/data", ext_dev, "ext4", ext_src),
            ("/mnt/data/xfs", xfs_dev, "xfs", xfs_src),
        ]
    build(root, host / "files", mounts=mounts)
    if loopfs:
        (root / "mnt/data").mkdir(parents=True)
        _run("mount", "--bind", str(loopfs["ext4"][0]), str(root / "mnt/data"))
        binds.append(root / "mnt/data")
        _run("mount", "--bind", str(loopfs["xfs"][0]), str(root / "mnt/data/xfs"))
        binds.append(root / "mnt/data/xfs")
        for _, _, _, src in mounts:
            os.symlink(src, root / src.lstrip("/"))
    uuid = setup_target_and_bootentry(root, host / "files")
    fake = install_fake_kexec(host / "bin")
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    # never let a test reach the real kexec-tools of this machine
    assert shutil.which("kexec") == str(fake)
    monkeypatch.setenv("FAKE_KEXEC_LOG", str(host / "kexec.log"))
    monkeypatch.setenv("FAKE_KEXEC_STATE", str(host / "kexec.state"))
    monkeypatch.setenv("FAKE_KEXEC_JOB", str(host / "job.json"))
    monkeypatch.setenv("FAKE_SYSROOT", str(root))
    monkeypatch.setenv("KJUMP_HOOK_LOG", str(host / "hooks.log"))
    expect = [str(b) for b in reversed(binds)]
    monkeypatch.setenv("FAKE_KEXEC_EXPECT_FROZEN", json.dumps(expect))
    try:
        yield Fx(root, host, uuid, expect)
    finally:
        for b in reversed(binds):
            _thaw_quietly(b)
            subprocess.run(["umount", str(b)], capture_output=True, timeout=60)


def settled(h: Hibernation, *args: str) -> Outcome:
    """h.run(*args), then wait for the housekeeping it leaves running once it has answered
    (unloading B, the one-shot entry, /run): the state a user finds a moment later."""
    out = h.run(*args)
    assert h.wait_housekeeping(60), "the housekeeping did not finish"
    return out


def assert_next_request_works(fx: Fx) -> None:
    """After a failure the daemon runs the next request: mode test, continued."""
    before = tree_hash(fx.root, exclude={"dev/vda"})
    out = settled(fx.hib(), "test")
    assert out.result == "continued" and out.image_state == "INVALID"
    assert fx.header().state.name == "INVALID"
    assert tree_hash(fx.root, exclude={"dev/vda"}) == before


# -- success paths ----------------------------------------------------------------------------
def test_memory_is_reclaimed_with_user_space_frozen_and_filesystems_not(fx, monkeypatch):
    """A running task faults back in what reclaim took from it; a frozen filesystem cannot
    take reclaim's writeback. The shrink comes between the two freezes, as in the kernel's
    hibernation (tasks frozen, then memory preallocated)."""
    from kjumpd.daemon import shrink, taskfreeze

    seen = []
    real = shrink.toward_target

    def recording(sr, *args):
        state = taskfreeze.read_state(sr)  # none in this tree without cgroup v2
        seen.append(state is None or not state.mounts)
        return real(sr, *args)

    monkeypatch.setattr(shrink, "toward_target", recording)
    ev = Rec()
    out = settled(fx.hib(ev), "test")
    assert out.result == "continued" and seen == [True], "no filesystem frozen yet"
    phases = [c[1] for c in ev.calls if c[0] == "phase"]
    assert phases.index("freeze tasks") < phases.index("shrink")
    assert phases.index("shrink") < phases.index("freeze filesystems")


def test_a_reserved_huge_page_pool_is_not_memory_the_size_limit_counts(fx):
    """A database host's pool of 2 MiB pages, 400 MiB of it free: MemFree leaves the pool
    out, but the save kernel leaves its free pages out of the image, so a 200 MiB limit
    holds without reclaiming anything. With the debug zero check B saves them: counted."""
    (fx.root / "sys/kernel/vmcoreinfo").write_text("1e0a000 1024\n")
    pool = fx.root / "sys/kernel/mm/hugepages/hugepages-2048kB"
    pool.mkdir(parents=True)
    (pool / "free_hugepages").write_text("200\n")
    with open(fx.root / "proc/meminfo", "a") as f:
        f.write(f"Hugetlb: {200 * 2048} kB\n")
    out = settled(fx.hib(Rec(), image_size_limit=200 * MiB), "test")
    assert out.result == "continued"
    assert fx.trigger("/sys/fs/cgroup/memory.reclaim") == ""
    with pytest.raises(ShrinkError) as ei:
        fx.hib(Rec(), image_size_limit=200 * MiB, free_page_check=True).run("test")
    assert "400 MiB of it huge pages, which reclaim cannot take" in ei.value.why


def test_test_mode_saves_then_invalidates_and_restores_everything(fx):
    before = tree_hash(fx.root, exclude={"dev/vda"})
    ev = Rec()
    out = settled(fx.hib(ev), "test")
    assert out.result == "continued" and not out.resumed
    assert fx.header().state.name == "INVALID"
    assert tree_hash(fx.root, exclude={"dev/vda"}) == before
    # the jump: load with preserve-context inside the jump area, then -e, then unload
    calls = fx.kexec_calls()
    assert [c[0] for c in calls] == ["-c", "-e", "-u"]
    load = calls[0]
    assert load[:5] == [
        "-c",
        "--load-preserve-context",
        "--mem-min=0x20000000",
        "--mem-max=0x27ffffff",
        "--no-checks",
    ]
    append = next(a for a in load if a.startswith("--append="))
    # B's RAM is the low 512K and the jump area; A's RAM around the area is ACPI data to
    # it, which its jump back maps without a segment on A's memory
    assert append.endswith(
        "memmap=exactmap memmap=512K@0K memmap=511M#1M memmap=393088K#640M "
        "memmap=128M@512M kjump.role=save"
    )
    # the job B received
    job = fx.job()
    assert job.target_uuid == fx.uuid and job.superblock_device_offset == MiB
    assert job.blockmap == [(0, MiB, 32 * MiB)]
    assert job.device_hint == {"devno": "254:0", "name": "vda"}
    assert job.jump_area == (0x20000000, 128 * MiB)
    assert (0x100000, 0x20000000) in job.ranges and (0x28000000, 0x3FFE0000) in job.ranges
    assert all(not (s < 0x28000000 and e > 0x20000000) for s, e in job.ranges)
    assert job.main_kernel["release"] == "6.12.117-kjump" and job.main_kernel["build_id"]
    assert len(job.fs_stamps) == len(fx.frozen_expect)
    assert job.finish == "jump-back"  # mode test: A carries on after the jump back
    # once loaded, the save kernel's initrd (7 MB in tmpfs) is not kept in memory that the
    # image would have to carry: the kernel has its own copy
    assert (fx.host / "job.json.initrd-at-jump").read_text() == "gone"
    # hooks pre then post, PrepareForSleep true then false
    assert fx.hook_log() == ["pre hibernate hibernate", "post hibernate hibernate"]
    pfs = [c for c in ev.calls if c[0] == "pfs"]
    assert pfs == [("pfs", True), ("pfs", False)]
    # the quirk driver was unbound and bound again; nothing left in /run
    assert fx.trigger("/sys/bus/pci/drivers/snd_hda_intel/unbind") == "0000:00:1f.3"
    assert fx.trigger("/sys/bus/pci/drivers/snd_hda_intel/bind") == "0000:00:1f.3"
    assert not (fx.root / "run/kjumpd").exists()
    assert set(out.durations) >= {
        "preflight",
        "freeze tasks",
        "freeze filesystems",
        "load",
        "jump",
        "return",
    }
    assert set(out.stats["steps"]) >= {
        "quiesce apply",
        "initrd copy (thread)",
        "initrd job",
        "kexec load",
        "header read",
        "undo thaw",
    }


def test_the_save_kernel_is_loaded_into_the_top_of_the_area_or_else_all_of_it(fx, monkeypatch):
    # a bzImage that states its init_size (boot protocol 2.10+): its segments go into a window
    # (24 MiB init_size + the small initrd rounded to 2 MiB + 8 MiB slack)
    # at the top of the jump area (kexec-tools backs up every uncovered page of the range)
    kernel = fx.root / "usr/lib/kjumpd/save/bzImage"
    head = bytearray(kernel.read_bytes())
    struct.pack_into("<H", head, 0x206, 0x20F)
    struct.pack_into("<I", head, 0x230, 2 * MiB)
    kernel.write_bytes(bytes(head))
    sha = hashlib.sha256(head).hexdigest()
    out = settled(fx.hib(save_kernel_sha256=sha), "test")
    load = fx.kexec_calls()[0]
    assert out.stats["load_window"] == [0x28000000 - 34 * MiB, 0x28000000]
    assert load[2:4] == [f"--mem-min={0x28000000 - 34 * MiB:#x}", "--mem-max=0x27ffffff"]
    # a kexec that refuses the window gets the whole area, and the hibernation goes on
    monkeypatch.setenv("FAKE_KEXEC_FAIL", "window")
    out = settled(fx.hib(save_kernel_sha256=sha), "test")
    assert out.result == "continued" and out.stats["load_window"] == [0x20000000, 0x28000000]
    loads = [c for c in fx.kexec_calls() if c[0] == "-c"]
    assert [c[2] for c in loads[1:]] == [
        f"--mem-min={0x28000000 - 34 * MiB:#x}",
        "--mem-min=0x20000000",
    ]


def test_checkpoint_keeps_the_saved_image(fx):
    out = settled(fx.hib(), "checkpoint")
    assert out.result == "continued" and fx.header().state.name == "SAVED"
    assert out.stats["raw_bytes"] == 12345


def test_resume_marks_consumed_and_undoes(fx, monkeypatch):
    before = tree_hash(fx.root, exclude={"dev/vda"})
    monkeypatch.setenv("FAKE_KEXEC_RESULT", "restoring")
    ev = Rec()
    out = settled(fx.hib(ev), "platform")
    assert out.result == "resumed" and out.resumed and out.image_state == "CONSUMED"
    assert fx.header().state.name == "CONSUMED"
    assert tree_hash(fx.root, exclude={"dev/vda"}) == before
    assert fx.trigger("/sys/bus/pci/drivers/snd_hda_intel/bind") == "0000:00:1f.3"
    assert [c for c in ev.calls if c[0] == "pfs"][-1] == ("pfs", False)


def test_resume_answers_before_the_save_kernel_is_unloaded(fx, monkeypatch, tmp_path):
    # the client waiting on a resume gets its answer once the image is CONSUMED and the
    # system is thawed and back; unloading B (kexec -u) and the rest of the housekeeping
    # follow, and the next transaction waits for them
    monkeypatch.setenv("FAKE_KEXEC_RESULT", "restoring")
    gate = tmp_path / "unload-gate"
    monkeypatch.setenv("FAKE_KEXEC_UNLOAD_GATE", str(gate))
    h = fx.hib()
    out = h.run("platform")
    assert out.result == "resumed" and out.undo_errors == []
    assert fx.header().state.name == "CONSUMED"
    assert fx.trigger("/sys/bus/pci/drivers/snd_hda_intel/bind") == "0000:00:1f.3"
    assert "undo thaw" in out.stats["steps"] and "undo kexec unload" not in out.stats["steps"]
    assert not h.wait_housekeeping(0), "kexec -u is held at the gate: still running"
    gate.touch()
    assert h.wait_housekeeping(60)
    assert [c[0] for c in fx.kexec_calls()] == ["-c", "-e", "-u"]
    assert not (fx.root / "run/kjumpd").exists()
    monkeypatch.setenv("FAKE_KEXEC_RESULT", "saved")
    assert settled(h, "test").result == "continued"


def test_suspend_on_ac_sleeps_in_ram_then_drops_the_image_on_wake(fx):
    before = tree_hash(fx.root, exclude={"dev/vda"})
    out = settled(fx.hib(), "suspend")
    assert out.result == "woke-from-ram"
    assert fx.trigger("/sys/power/state") == "mem"
    assert fx.header().state.name == "INVALID"
    assert fx.hook_log() == ["pre hybrid-sleep hybrid-sleep", "post hybrid-sleep hybrid-sleep"]
    assert tree_hash(fx.root, exclude={"dev/vda"}) == before


def test_logs_are_held_while_frozen(fx):
    seen: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = H(level=logging.INFO)
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.INFO)
    root.addHandler(h)
    at_jump: list[int] = []

    class Ev(Rec):
        def phase(self, name, pct):
            if name == "jump":
                at_jump.append(len([m for m in seen if m.startswith("phase load")]))
            super().phase(name, pct)

    try:
        fx.hib(Ev()).run("test")
    finally:
        root.removeHandler(h)
        root.setLevel(old)
    assert at_jump == [0], "a log record reached the handler while filesystems were frozen"
    assert any(m.startswith("phase load") for m in seen), "held records were not released"


# -- failures, one per step ---------------------------------------------------------------------
def _mkdir_trigger(fx: Fx, path: str):
    p = fx.root / path.lstrip("/")
    p.unlink()
    p.mkdir()

    def undo():
        p.rmdir()
        p.write_text("")

    return undo


CASES = {
    # name: (inject(fx, monkeypatch) -> cleanup, mode, error, target touched by "B")
    "an OSError (no /run directory) becomes a clean error": (
        lambda fx, mp: _run_is_a_file(fx),
        "test",
        KjumpError,
        False,
    ),
    "preflight: kdump loaded": (
        lambda fx, mp: (
            w(fx.root, "/sys/kernel/kexec_crash_loaded", "1\n"),
            lambda: w(fx.root, "/sys/kernel/kexec_crash_loaded", "0\n"),
        )[1],
        "test",
        UnsupportedError,
        False,
    ),
    "hook pre fails (policy abort)": (
        lambda fx, mp: (
            w(
                fx.root,
                "/etc/kjumpd/sleep.d/90-fail",
                '#!/bin/sh\necho "$1 $2" >> "$KJUMP_HOOK_LOG"; [ "$1" = post ]\n',
                0o755,
            ),
            lambda: (fx.root / "etc/kjumpd/sleep.d/90-fail").unlink(),
        )[1],
        "test",
        HookError,
        False,
    ),
    "shrink cannot reach the limit": (lambda fx, mp: None, "test", ShrinkError, False),
    "quiesce write fails (unbind)": (
        lambda fx, mp: _mkdir_trigger(fx, "/sys/bus/pci/drivers/snd_hda_intel/unbind"),
        "test",
        QuiesceError,
        False,
    ),
    "freeze: mount table names another fs": (
        lambda fx, mp: _add_bad_mount(fx),
        "test",
        FreezeError,
        False,
    ),
    "initrd cannot be written": (lambda fx, mp: _block_initrd(fx), "test", KexecError, False),
    "kexec load fails": (
        lambda fx, mp: mp.setenv("FAKE_KEXEC_FAIL", "load"),
        "test",
        KexecError,
        False,
    ),
    "kexec -e does not jump": (
        lambda fx, mp: mp.setenv("FAKE_KEXEC_RESULT", "nojump"),
        "test",
        JumpError,
        False,
    ),
    "kernel freezer refuses the jump": (
        lambda fx, mp: mp.setenv("FAKE_KEXEC_RESULT", "freezer"),
        "test",
        TaskFreezeError,
        False,
    ),
    "save kernel aborts": (
        lambda fx, mp: mp.setenv("FAKE_KEXEC_RESULT", "aborted"),
        "test",
        ImageStateError,
        True,
    ),
    "platform S4 refused": (lambda fx, mp: None, "platform", PlatformError, True),
    "shutdown does not happen": (lambda fx, mp: None, "shutdown", PlatformError, True),
    "reboot does not happen": (lambda fx, mp: None, "reboot", PlatformError, True),
}


def _run_is_a_file(fx: Fx):
    (fx.root / "run").rmdir()
    (fx.root / "run").write_text("")

    def undo():
        (fx.root / "run").unlink()
        (fx.root / "run").mkdir()

    return undo


def _add_bad_mount(fx: Fx):
    p = fx.root / "proc/self/mountinfo"
    old = p.read_text()
    (fx.root / "srv").mkdir()
    p.write_text(old + "99 22 7:250 / /srv rw,relatime - ext4 /dev/loop250 rw\n")

    def undo():
        p.write_text(old)
        (fx.root / "srv").rmdir()

    return undo


def _block_initrd(fx: Fx):
    from kjumpd.daemon import kexec

    d = fx.root / (kexec.INITRD + ".new").lstrip("/")
    d.mkdir(parents=True)

    def undo():
        d.rmdir()
        (fx.root / kexec.INITRD_DIR.lstrip("/")).rmdir()
        (fx.root / "run/kjumpd").rmdir()

    return undo


@pytest.mark.parametrize("case", list(CASES))
def test_failure_rolls_back_byte_for_byte(fx, monkeypatch, case):
    inject, mode, err, touched = CASES[case]
    cleanup = inject(fx, monkeypatch)
    over = {"image_size_limit": 100 * MiB} if case.startswith("shrink") else {}
    header_before = fx.header()
    before = tree_hash(fx.root, exclude={"dev/vda"} if touched else set())
    ev = Rec()
    with pytest.raises(err) as ei:
        fx.hib(ev, **over).run(mode)
    e = ei.value
    assert e.fix or isinstance(e, CancelledError), "every error says how to fix it"
    assert "\n" not in e.message, "errors are one line"
    if case.startswith("kexec load"):
        assert e.why == "kexec_load failed: Operation not permitted"
    if case == "preflight: kdump loaded":
        # the failed check is named once, with its cause and its own fix
        assert e.message.startswith("hibernation is not possible: jump area: a kdump kernel")
        assert e.message.count("jump area") == 2, e.message  # the check's name and the cause
        assert "kexec -p -u" in e.fix
    if case in ("kexec -e does not jump", "kernel freezer refuses the jump"):
        # the real cause, never "the image is invalid"
        assert "image" not in e.what and "image state" not in e.why, e.message
    if case == "kernel freezer refuses the jump":
        assert "pid 4242 (appender) state D in vfs_write" in e.why, e.message
        assert e.outcome.durations.get("jump") is not None
    assert e.outcome.result == "rolled-back" and e.context["rolled_back"]
    assert tree_hash(fx.root, exclude={"dev/vda"} if touched else set()) == before, case
    assert not (fx.root / "run/kjumpd/quiesce.journal").exists()
    calls = fx.kexec_calls()
    if any(c[0] == "-c" for c in calls) and not case.startswith("kexec load"):
        assert calls[-1] == ["-u"], "a loaded save kernel is unloaded on rollback"
    pfs = [c for c in ev.calls if c[0] == "pfs"]
    assert pfs in ([], [("pfs", True), ("pfs", False)])
    state = fx.header().state.name
    if case == "save kernel aborts":
        assert state == "ABORTED"
    elif touched:
        assert state == "INVALID", "a saved image is invalidated before the thaw"
    else:
        assert fx.header() == header_before
    if case.startswith("shrink"):
        assert fx.trigger("/sys/fs/cgroup/memory.reclaim") != ""
        assert fx.trigger("/proc/sys/vm/drop_caches") == "3"
        assert "limit 100 MiB" in e.why
    if case.startswith("hook"):
        assert "post hibernate" in fx.hook_log(), "hooks that ran get their post call"
    if case.startswith("quiesce"):
        assert fx.trigger("/sys/bus/pci/drivers/snd_hda_intel/bind") == ""
    if mode in ("shutdown", "reboot"):
        # B was told to end the mode itself; its power-off "failed" (this fake B jumps
        # back), so A tried, and its failure rolled everything back
        assert fx.job().finish == {"shutdown": "power-off", "reboot": "reboot"}[mode]
    if mode == "shutdown":
        assert fx.trigger("/proc/sysrq-trigger") == "o"
    if mode == "reboot":
        assert fx.trigger("/proc/sysrq-trigger") == "b"
    if cleanup:
        cleanup()
    for k in ("FAKE_KEXEC_FAIL", "FAKE_KEXEC_RESULT"):
        monkeypatch.delenv(k, raising=False)
    assert_next_request_works(fx)


def test_stamp_failure_after_freeze_thaws(fx, loopfs):
    prereq.need(bool(loopfs), "needs root for real frozen filesystems")
    link = fx.root / "dev" / os.path.basename(loopfs["xfs"][2])
    target = os.readlink(link)
    link.unlink()
    before = tree_hash(fx.root)
    with pytest.raises(FsStampError):
        fx.hib().run("test")
    assert tree_hash(fx.root) == before
    assert fx.kexec_calls() == []
    os.symlink(target, link)
    assert_next_request_works(fx)


@pytest.mark.parametrize("cancel_at", ["", "quiesce", "load"])
def test_cancel_rolls_back(fx, cancel_at):
    before = tree_hash(fx.root)
    cancel = threading.Event()
    if not cancel_at:
        cancel.set()
    ev = Rec(cancel, cancel_at)
    with pytest.raises(CancelledError) as ei:
        fx.hib(ev).run("test", cancel)
    assert ei.value.outcome.result == "rolled-back"
    assert tree_hash(fx.root) == before
    calls = fx.kexec_calls()
    assert not any(c[0] == "-e" for c in calls)
    if cancel_at == "load":
        assert calls[-1] == ["-u"]
    assert_next_request_works(fx)


def test_undo_failure_is_reported_and_the_rest_undone(fx, monkeypatch):
    monkeypatch.setenv("FAKE_KEXEC_RESULT", "aborted")
    monkeypatch.setenv("FAKE_KEXEC_FAIL", "unload")
    before = tree_hash(fx.root, exclude={"dev/vda"})
    with pytest.raises(ImageStateError) as ei:
        fx.hib().run("test")
    assert "kexec unload" in ei.value.context["undo_errors"]
    assert tree_hash(fx.root, exclude={"dev/vda"}) == before


def test_a_second_request_while_running_is_busy(fx):
    from kjumpd.errors import BusyError

    h = fx.hib()
    started, release = threading.Event(), threading.Event()

    class Ev(Rec):
        def phase(self, name, pct):
            if name == "quiesce":
                started.set()
                release.wait(30)

    h.events = Ev()
    t = threading.Thread(target=lambda: h.run("test"))
    t.start()
    try:
        assert started.wait(30)
        with pytest.raises(BusyError):
            h.run("test")
    finally:
        release.set()
        t.join(60)
    assert fx.header().state.name == "INVALID"


def test_real_filesystems_are_frozen_during_the_jump_and_writable_after(fx, loopfs):
    prereq.need(bool(loopfs), "needs root for real frozen filesystems")
    out = settled(fx.hib(), "test")
    assert out.result == "continued"
    assert out.stats["frozen"] == ["/mnt/data/xfs", "/mnt/data"], "leaves first"
    job = fx.job()
    assert sorted(s["fstype"] for s in job.fs_stamps) == ["ext4", "xfs"]
    # thawed: writing works again (a frozen fs would block here)
    for mp in fx.frozen_expect:
        probe = Path(mp) / ".kjumpd-probe"
        probe.write_text("x")
        probe.unlink()
