"""The daemon's steps one by one on fake trees (and, read-only, on this machine's /sys)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kjump_faketree import MiB, build, setup_target_and_bootentry, tree_hash, w

from kjumpd.daemon import (
    battery,
    hooks,
    jumparea,
    kexec,
    memory,
    platform,
    preflight,
    quiesce,
    shrink,
)
from kjumpd.daemon import config as cfgmod
from kjumpd.errors import (
    HookError,
    JumpAreaError,
    MemoryMapError,
    PlatformError,
    QuiesceError,
    ShrinkError,
    SysrootError,
)
from kjumpd.job import job_from_cpio
from kjumpd.sysroot import Sysroot


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    build(root, tmp_path / "files")
    return root


@pytest.fixture
def full(tree, tmp_path):
    setup_target_and_bootentry(tree, tmp_path / "files")
    return tree


def cfg(root: Path, **over) -> cfgmod.Config:
    return dataclasses.replace(cfgmod.load(Sysroot(root)), **over)


# -- jump area ------------------------------------------------------------------------------
def test_jump_area_found_and_sized(tree):
    sr = Sysroot(tree)
    need = jumparea.required_size(sr, cfg(tree))
    assert need == 112 * MiB  # 24M init_size + 4 x initramfs + 64M agent + 16M, to 16M
    a = jumparea.find(sr, cfg(tree), need)
    assert (a.start, a.size) == (0x20000000, 128 * MiB)


def test_jump_area_sized_from_a_zstd_initramfs_declared_size(tree):
    # a zstd frame header (single segment off, window byte, 4-byte content size) then one
    # raw block: the kernel unpacks 39 MiB from it, so the area must hold them
    frame = (
        b"\x28\xb5\x2f\xfd\x80\x48"
        + (39 * MiB).to_bytes(4, "little")
        + (1 | (5 << 3)).to_bytes(3, "little")
        + b"hello"
    )
    w(tree, "/usr/lib/kjumpd/save/initramfs.cpio.gz", frame)
    need = jumparea.required_size(Sysroot(tree), cfg(tree))
    assert need == 144 * MiB  # 24M init_size + 18 bytes + 39M unpacked + 64M + 16M, to 16M


@pytest.mark.parametrize(
    "change,expect",
    [
        ({"/proc/cmdline": "quiet\n"}, "add crashkernel=128M@512M"),
        ({"/proc/cmdline": "crashkernel=256M,high\n"}, "above 4 GiB"),
        ({"/proc/cmdline": "crashkernel=256M,high\n"}, "replace it with crashkernel=128M"),
        ({"/proc/cmdline": "crashkernel=256M\n"}, "differs from the command line"),
        ({"/proc/cmdline": "crashkernel=512M-:256M\n"}, "differs from the command line"),
        ({"/proc/cmdline": "crashkernel=512M-:128M@256M\n"}, "differs from the command line"),
        (
            {
                "/proc/cmdline": "crashkernel=2G-64G:256M,64G-:512M\n",
                "/proc/iomem": "00100000-3ffdffff : System RAM\n",
                "/sys/kernel/kexec_crash_size": "0\n",
            },
            "none of its ranges holds this machine's 1022 MiB of RAM",
        ),
        ({"/sys/kernel/kexec_crash_loaded": "1\n"}, "kdump"),
        ({"/sys/kernel/kexec_crash_size": "67108864\n"}, "shrunk"),
        (
            {
                "/proc/iomem": "00100000-3ffdffff : System RAM\n",
                "/sys/kernel/kexec_crash_size": "0\n",
            },
            "nothing is reserved",
        ),
    ],
)
def test_jump_area_errors_say_which_command_line_to_add(tree, change, expect):
    for p, text in change.items():
        w(tree, p, text)
    with pytest.raises(JumpAreaError) as ei:
        jumparea.find(Sysroot(tree), cfg(tree), 112 * MiB)
    assert expect in str(ei.value)


@pytest.mark.parametrize(
    "cmdline",
    [
        "crashkernel=512M-2G:128M,2G-64G:256M,64G-:512M",  # a kdump package's ranges
        "crashkernel=512M-:128M@512M",
        "crashkernel=128M@512M crashkernel=256M,high",  # the plain one is obeyed
    ],
)
def test_the_ranges_form_and_a_plain_value_beside_a_high_one_are_one_jump_area(tree, cmdline):
    w(tree, "/proc/cmdline", f"ro {cmdline} quiet\n")
    a = jumparea.find(Sysroot(tree), cfg(tree), 112 * MiB)
    assert (a.start, a.size) == (0x20000000, 128 * MiB)


def test_jump_area_too_small_names_the_size_needed(tree):
    c = cfg(tree, agent_memory=200 * MiB)
    need = jumparea.required_size(Sysroot(tree), c)
    with pytest.raises(JumpAreaError) as ei:
        jumparea.find(Sysroot(tree), c, need)
    assert f"crashkernel={need >> 20}M@512M" in ei.value.fix


def test_bootloader_edits_show_a_diff_and_write_only_when_applied(tree):
    w(tree, "/etc/default/grub", 'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX="ro quiet"\n')
    w(tree, "/boot/loader/entries/debian.conf", "title Debian\noptions root=/dev/vda2 ro\n")
    sr = Sysroot(tree)
    edits = jumparea.plan_bootloader_edits(sr, "crashkernel=128M@512M")
    assert [e.path for e in edits] == ["/etc/default/grub", "/boot/loader/entries/debian.conf"]
    assert '+GRUB_CMDLINE_LINUX="ro quiet crashkernel=128M@512M"' in edits[0].diff()
    assert (tree / "etc/default/grub").read_text().count("crashkernel") == 0
    jumparea.apply_edits(sr, edits)
    assert "crashkernel=128M@512M" in (tree / "boot/loader/entries/debian.conf").read_text()
    assert jumparea.plan_bootloader_edits(sr, "crashkernel=128M@512M") == []


# -- memory -------------------------------------------------------------------------------------
def test_memory_plan_from_the_tree_with_firmware_memmap(tree):
    for i, (s, e, t) in enumerate(
        [
            (0, 0x9FBFF, "System RAM"),
            (0x9FC00, 0x9FFFF, "Reserved"),
            (0x100000, 0x3FFDFFFF, "System RAM"),
        ]
    ):
        w(tree, f"/sys/firmware/memmap/{i}/start", f"{s:#x}\n")
        w(tree, f"/sys/firmware/memmap/{i}/end", f"{e:#x}\n")
        w(tree, f"/sys/firmware/memmap/{i}/type", t + "\n")
    p = memory.build(Sysroot(tree), jumparea.JumpArea(0x20000000, 128 * MiB))
    assert p.firmware_checked
    assert p.ranges == [(0x1000, 0x9F000), (0x100000, 0x20000000), (0x28000000, 0x3FFE0000)]


def test_memory_plan_needs_root_addresses(tree):
    w(tree, "/proc/iomem", "00000000-00000000 : System RAM\n")
    with pytest.raises(MemoryMapError, match="not running as root"):
        memory.build(Sysroot(tree), jumparea.JumpArea(0x20000000, 128 * MiB))


# -- quiesce ------------------------------------------------------------------------------------
def test_quiesce_plan_apply_undo(tree):
    sr = Sysroot(tree)
    before = tree_hash(tree)
    p = quiesce.plan(sr, cfg(tree), "platform")
    paths = [x.path for x in p.writes]
    pci = "/sys/devices/pci0000:00"
    assert f"{pci}/0000:00:02.0/power/control" in paths
    assert f"{pci}/0000:00:03.0/power/control" not in paths  # already "on"
    assert "/sys/devices/pnp0/00:01/power/control" not in paths  # no runtime PM
    assert f"{pci}/0000:00:02.0/power/wakeup" in paths
    assert f"{pci}/0000:00:04.0/usb1/1-1/power/wakeup" not in paths  # keep_wakeup
    assert "/sys/devices/pnp0/00:01/power/wakeup" in paths  # RTC: not suspend
    assert ("/sys/class/net/eth0/flags", "0x1002") in [(x.path, x.value) for x in p.writes]
    assert not any("/net/lo/" in x for x in paths)
    assert paths[-1] == "/sys/bus/pci/drivers/snd_hda_intel/unbind"
    j = quiesce.Journal(sr)
    quiesce.apply(sr, p, j)
    assert (tree / f"{pci.lstrip('/')}/0000:00:02.0/power/control").read_text() == "on"
    # one line saying whose journal it is, then one per write
    assert len((tree / "run/kjumpd/quiesce.journal").read_text().splitlines()) == 1 + len(p.writes)
    assert quiesce.undo(sr, j) == []
    (tree / "run/kjumpd").rmdir()
    assert tree_hash(tree) == before


def test_quiesce_keeps_the_rtc_awake_in_suspend_mode(tree):
    p = quiesce.plan(Sysroot(tree), cfg(tree), "suspend")
    assert "/sys/devices/pnp0/00:01/power/wakeup" not in [x.path for x in p.writes]
    assert any("RTC" in n for n in p.notes)


def test_quiesce_failure_midway_undoes_what_was_written(tree):
    sr = Sysroot(tree)
    before = tree_hash(tree)
    p = quiesce.plan(sr, cfg(tree), "platform")
    bad = tree / "sys/class/net/eth0/flags"
    bad.unlink()
    bad.mkdir()  # the kernel refuses this write
    with pytest.raises(QuiesceError, match="eth0") as ei:
        quiesce.apply(sr, p, quiesce.Journal(sr))
    assert "undo completed" in ei.value.fix
    bad.rmdir()
    bad.write_text("0x1003\n")
    (tree / "run/kjumpd").rmdir()
    assert tree_hash(tree) == before


def test_sysfs_walk_enumerates_what_pyudev_does_on_this_machine():
    import pyudev  # a dependency: never skipped

    got = set(quiesce.device_dirs(Sysroot(Path("/"))))
    udev = {
        d.sys_path
        for d in pyudev.Context().list_devices()
        if d.sys_path.startswith("/sys/devices/")
    }
    assert got, "no devices enumerated"
    # quiesce walks /sys/devices instead of importing pyudev: same devices, none missed
    assert got == udev


def test_quiesce_plan_on_this_machine_matches_every_attribute_read():
    # plan() reads only the power/ attributes the directory lists; reading all of them for
    # every device (the slow way) must give the same writes
    sr = Sysroot(Path("/"))
    c = cfg(Path("/"))
    expected = []
    for dev in quiesce.device_dirs(sr):
        raw = sr.read_text(f"{dev}/power/control", default="")
        status = sr.read_text(f"{dev}/power/runtime_status", default="").strip()
        if c.runtime_pm_on and raw.strip() == "auto" and status != "unsupported":
            expected.append(f"{dev}/power/control")
        if (
            c.disable_wakeup
            and sr.read_text(f"{dev}/power/wakeup", default="").strip() == "enabled"
            and not quiesce._kept(dev, c.keep_wakeup)
        ):
            expected.append(f"{dev}/power/wakeup")
    got = [
        w.path for w in quiesce.plan(sr, c, "platform").writes if w.path.startswith("/sys/devices/")
    ]
    assert got == expected


# -- hooks --------------------------------------------------------------------------------------
def test_hooks_run_like_systemd_sleep(tree, tmp_path, monkeypatch):
    log = tmp_path / "hooks.log"
    monkeypatch.setenv("KJUMP_HOOK_LOG", str(log))
    w(
        tree,
        "/etc/kjumpd/sleep.d/50-record",
        '#!/bin/sh\necho "etc $1 $2" >> "$KJUMP_HOOK_LOG"\n',
        0o755,
    )  # overrides /usr/lib
    w(tree, "/etc/kjumpd/sleep.d/10-not-executable", "#!/bin/sh\nexit 1\n", 0o644)
    w(tree, "/etc/kjumpd/sleep.d/20-slow", "#!/bin/sh\nsleep 5\n", 0o755)
    c = cfg(tree)
    res = hooks.run(Sysroot(tree), c.hook_dirs, "pre", "suspend", timeout=0.5)
    assert [r.name for r in res] == ["20-slow", "50-record"]
    assert log.read_text() == "etc pre hybrid-sleep\n"
    assert res[0].returncode == -1 and "timed out" in res[0].output
    with pytest.raises(HookError, match="20-slow"):
        hooks.check_policy(res, "abort")
    chatty = hooks.HookResult(
        "90-chatty", "/etc/kjumpd/sleep.d/90-chatty", 3, "a\nb\nwhy it failed\n"
    )
    with pytest.raises(HookError) as ei:
        hooks.check_policy([chatty], "abort")
    assert "\n" not in ei.value.message and ei.value.why.endswith("why it failed")
    assert [r.name for r in hooks.check_policy(res, "continue")] == ["20-slow"]


# -- shrink -------------------------------------------------------------------------------------
def test_shrink_not_needed_writes_nothing(tree):
    r = shrink.shrink(Sysroot(tree), 600 * MiB, 5)
    assert r.before == 512 * MiB and r.steps == []
    assert (tree / "sys/fs/cgroup/memory.reclaim").read_text() == ""


def test_shrink_refuses_with_figures_and_never_more(tree):
    with pytest.raises(ShrinkError) as ei:
        shrink.shrink(Sysroot(tree), 256 * MiB, 5)
    assert ei.value.context["before"] == 512 * MiB and ei.value.context["limit"] == 256 * MiB
    assert (tree / "sys/fs/cgroup/memory.reclaim").read_text() == str(256 * MiB)
    assert (tree / "proc/sys/vm/drop_caches").read_text() == "3"


def _huge_pool(tree, free_2m: int, total_2m: int, free_1g: int = 0) -> None:
    """Huge page pools in sysfs and in /proc/meminfo's Hugetlb (MemFree leaves them out)."""
    for name, free in (("hugepages-2048kB", free_2m), ("hugepages-1048576kB", free_1g)):
        d = tree / "sys/kernel/mm/hugepages" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "free_hugepages").write_text(f"{free}\n")
    with open(tree / "proc/meminfo", "a") as f:
        f.write(f"Hugetlb: {(total_2m * 2048) + free_1g * 1048576} kB\n")


def test_a_huge_page_pool_s_free_pages_are_not_counted_as_memory_the_image_holds(tree):
    # 512 MiB in use by MemFree's count, of which 50 of the pool's 100 pages of 2 MiB are free
    _huge_pool(tree, free_2m=50, total_2m=100, free_1g=0)
    sr = Sysroot(tree)
    assert shrink.free_huge_bytes(sr) == 100 * MiB
    assert shrink.estimate(sr, free_huge_out=True).used == 412 * MiB
    assert shrink.estimate(sr).used == 512 * MiB  # the save kernel keeps them: counted
    # the hard limit: below it once the free huge pages are not counted, nothing reclaimed
    r = shrink.shrink(sr, 450 * MiB, 5, free_huge_out=True)
    assert r.before == 412 * MiB and r.steps == []
    assert (tree / "sys/fs/cgroup/memory.reclaim").read_text() == ""


def test_a_limit_that_huge_pages_in_use_keep_out_of_reach_says_so(tree):
    _huge_pool(tree, free_2m=0, total_2m=100)
    with pytest.raises(ShrinkError) as ei:
        shrink.shrink(Sysroot(tree), 256 * MiB, 5, free_huge_out=True)
    assert "200 MiB of it huge pages, which reclaim cannot take" in ei.value.why


# -- battery ----------------------------------------------------------------------------------
def test_battery_from_sysfs(tree):
    ps = "/sys/class/power_supply"
    w(tree, f"{ps}/AC/type", "Mains\n")
    w(tree, f"{ps}/AC/online", "0\n")
    w(tree, f"{ps}/hidpp_battery_0/type", "Battery\n")
    w(tree, f"{ps}/hidpp_battery_0/scope", "Device\n")
    w(tree, f"{ps}/BAT0/type", "Battery\n")
    w(tree, f"{ps}/BAT0/present", "1\n")
    w(tree, f"{ps}/BAT0/status", "Discharging\n")
    w(tree, f"{ps}/BAT0/energy_now", "25000000\n")
    w(tree, f"{ps}/BAT0/energy_full", "50000000\n")
    w(tree, f"{ps}/BAT0/power_now", "10000000\n")
    b = battery.read(Sysroot(tree))
    assert b.present and not b.on_ac and b.percent == 50.0 and b.seconds_left == 9000.0
    assert b.seconds_to_floor(10) == pytest.approx(7200.0)
    w(tree, f"{ps}/AC/online", "1\n")
    assert battery.read(Sysroot(tree)).seconds_to_floor(10) is None


def test_battery_agrees_with_psutil_on_this_machine():
    import psutil  # a dependency: never skipped

    ours = battery.read(Sysroot(Path("/")))
    theirs = psutil.sensors_battery()
    assert (theirs is not None) == ours.present
    if theirs is not None:
        assert abs(theirs.percent - ours.percent) < 1.0
        assert bool(theirs.power_plugged) == ours.on_ac


# -- platform -----------------------------------------------------------------------------------
def test_s4_on_a_file_that_is_not_dev_snapshot_fails_cleanly(tree):
    with pytest.raises(PlatformError, match="refused to enter ACPI S4"):
        platform.enter_s4(Sysroot(tree), 0)


def test_suspend_to_both_arms_the_rtc_and_a_user_wake_returns(tree):
    ps = "/sys/class/power_supply/BAT0"
    for k, v in (
        ("type", "Battery"),
        ("status", "Discharging"),
        ("energy_now", "25000000"),
        ("energy_full", "50000000"),
        ("power_now", "10000000"),
    ):
        w(tree, f"{ps}/{k}", v + "\n")
    seen = []
    got = platform.suspend_to_both(Sysroot(tree), 10, 300, 0, on_decision=seen.append)
    assert got == "woke"
    assert [d.action for d in seen] == ["sleep", "woke"]
    assert seen[0].alarm == 1764000000 + 7200
    assert (tree / "sys/power/state").read_text() == "mem"
    assert (tree / "sys/class/rtc/rtc0/wakealarm").read_text() == "0"  # cleared on wake


def test_power_off_and_reboot_go_through_sysrq(tree):
    with pytest.raises(PlatformError, match="still running"):
        platform.power_off(Sysroot(tree), 0)
    assert (tree / "proc/sysrq-trigger").read_text() == "o"
    with pytest.raises(PlatformError, match="still running"):
        platform.reboot(Sysroot(tree), 0)
    assert (tree / "proc/sysrq-trigger").read_text() == "b"


# -- kexec helpers ------------------------------------------------------------------------------
def small_job(**extra):
    """A valid job for one small range (``extra``: more fields)."""
    from kjumpd.job import Job

    return Job(
        target_uuid="0b5e7c1a-6f6e-4c1e-9a77-3d2f1e0c9b8a",
        superblock_device_offset=MiB,
        device_hint={"devno": "254:0", "name": "vda"},
        blockmap=[(0, MiB, 32 * MiB)],
        ranges=[(0x1000, 0x9F000)],
        mode="test",
        compression="lz4",
        chunk_size=MiB,
        main_kernel={"release": "x", "build_id": ""},
        save_kernel_hash="sha256:" + "0" * 64,
        jump_area=(0x20000000, 128 * MiB),
        created=1,
        **extra,
    )


def test_initrd_is_the_initramfs_then_the_job(tree):
    job = small_job()
    sr = Sysroot(tree)
    path = kexec.write_initrd(sr, "/usr/lib/kjumpd/save/initramfs.cpio.gz", job)
    blob = sr.path(path).read_bytes()
    base = (tree / "usr/lib/kjumpd/save/initramfs.cpio.gz").read_bytes()
    assert blob.startswith(base) and sr.path(path).stat().st_mode & 0o777 == 0o600
    tail = -(-len(base) // 512) * 512
    assert blob[len(base) : tail] == bytes(tail - len(base))
    assert job_from_cpio(blob[tail:]) == job
    kexec.remove_initrd(sr)
    assert not sr.path(path).exists()
    from kjumpd.errors import KexecError

    with pytest.raises(KexecError, match="changed since the preflight"):
        kexec.write_initrd(sr, "/usr/lib/kjumpd/save/initramfs.cpio.gz", job, "0" * 64)
    assert not sr.path(path).exists() and not sr.path(path + ".new").exists()


def test_save_kernel_command_line(tree):
    line = kexec.save_cmdline(cfg(tree), jumparea.JumpArea(0x20000000, 128 * MiB))
    # no legacy ptys in B: their 512 devices cost ~0.8 s of a TCG boot (pty_init); a 4 MiB
    # bounce buffer pool, not the 64 MiB x86 takes once RAM reaches above 4 GiB; the
    # watchdog's stall from the config (default 120 s)
    assert line == (
        "console=ttyS0 nokaslr panic=1 kjump.watchdog=120 pty.legacy_count=0 swiotlb=2048,1 "
        "initcall_blacklist=init_tis,crb_acpi_driver_init memmap=exactmap "
        "memmap=512K@0K memmap=128M@512M kjump.role=save"
    )


def test_identity_of_this_kernel():
    ident = kexec.main_kernel_identity(Sysroot(Path("/")))
    assert ident["release"] == os.uname().release
    if Path("/sys/kernel/notes").exists():
        assert len(ident["build_id"]) in (0, 40)


# -- preflight -----------------------------------------------------------------------------------
def test_preflight_all_ok_on_a_prepared_tree(full):
    rep = preflight.run(Sysroot(full), cfg(full), "test")
    assert rep.ok, rep.text()
    assert {i.name for i in rep.items} >= {
        "kernel",
        "lockdown",
        "kexec_load",
        "save kernel",
        "save initramfs",
        "jump area",
        "memory map",
        "target",
        "boot entry",
    }


def test_check_says_what_happens_without_the_cgroup_v2_freezer(full):
    sr = Sysroot(full)
    item = next(
        i for i in preflight.run(sr, cfg(full), "test").items if i.name == "user-space freeze"
    )
    # no cgroup2 in this tree's mount table: a warning that says what it means, not a failure
    assert not item.ok and not item.fatal and item.fix
    assert "not stopped before the filesystems are frozen" in item.detail
    mi = full / "proc/self/mountinfo"
    mi.write_text(mi.read_text() + "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    w(full, "/sys/fs/cgroup/system.slice/cgroup.procs", "")
    item = next(
        i for i in preflight.run(sr, cfg(full), "test").items if i.name == "user-space freeze"
    )
    assert not item.ok and "Linux 5.2 or later" in item.detail  # no cgroup.freeze
    w(full, "/sys/fs/cgroup/system.slice/cgroup.freeze", "0\n")
    item = next(
        i for i in preflight.run(sr, cfg(full), "test").items if i.name == "user-space freeze"
    )
    assert item.ok and item.detail == "cgroup v2 freezer at /sys/fs/cgroup"


@pytest.mark.parametrize(
    "path,text,item",
    [
        ("/sys/kernel/security/lockdown", "none [integrity] confidentiality\n", "lockdown"),
        ("/proc/sys/kernel/kexec_load_disabled", "1\n", "kexec_load"),
        ("/usr/lib/kjumpd/save/bzImage", "another kernel", "save kernel"),
        ("/sys/kernel/kexec_crash_loaded", "1\n", "jump area"),
    ],
)
def test_preflight_names_what_fails(full, path, text, item):
    w(full, path, text)
    rep = preflight.run(Sysroot(full), cfg(full), "test")
    assert not rep.ok
    assert [i.name for i in rep.failed()] == [item] and rep.failed()[0].fix


@pytest.mark.parametrize("how", ["in place", "replaced"])
def test_preflight_sees_a_save_kernel_changed_after_its_hash_was_cached(full, monkeypatch, how):
    # the daemon keeps the hashes of unchanged files (stat compared); a changed file is
    # hashed again, also when it keeps its size (same-size rewrite, or a new inode)
    monkeypatch.setattr(preflight, "SETTLED_SECONDS", -1.0)  # cache even fresh files
    sr = Sysroot(full)
    assert preflight.run(sr, cfg(full), "test").ok
    path = sr.path("/usr/lib/kjumpd/save/bzImage")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    time.sleep(0.05)  # past the clock tick of the first stat: a ctime that can change
    if how == "in place":
        with open(path, "r+b") as f:
            f.seek(len(data) - 1)
            f.write(data[-1:])
    else:
        path.with_name("new").write_bytes(bytes(data))
        os.replace(path.with_name("new"), path)
    rep = preflight.run(sr, cfg(full), "test")
    assert [i.name for i in rep.failed()] == ["save kernel"]


def test_preflight_kernel_without_kexec_jump(full):
    import gzip

    w(full, "/proc/config.gz", gzip.compress(b"CONFIG_KEXEC=y\n# CONFIG_KEXEC_JUMP is not set\n"))
    rep = preflight.run(Sysroot(full), cfg(full), "test")
    assert [i.name for i in rep.failed()] == ["kernel"]


def test_preflight_missing_hash_suggests_the_line(full):
    c = cfg(full, save_kernel_sha256="")
    rep = preflight.run(Sysroot(full), c, "test")
    item = next(i for i in rep.items if i.name == "save kernel")
    assert not item.ok and not item.fatal and 'kernel_sha256 = "' in item.fix
    assert rep.ok, "a missing hash is advice, a wrong one is a refusal"


# -- kjumpctl check / plan / setup ----------------------------------------------------------
def kjumpctl(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from kjumpd.cli import main; sys.exit(main())",
            "--sysroot",
            str(root),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_kjumpctl_check_ok_and_failing(full):
    r = kjumpctl(full, "check")
    assert r.returncode == 0 and "hibernation is possible" in r.stdout, r.stdout + r.stderr
    w(full, "/proc/cmdline", "quiet\n")
    r = kjumpctl(full, "check", "--json")
    assert r.returncode == 3
    d = json.loads(r.stdout)
    bad = [i for i in d["items"] if not i["ok"]]
    assert bad[0]["name"] == "jump area" and "crashkernel=" in bad[0]["fix"]


def test_kjumpctl_plan_changes_nothing(full):
    before = tree_hash(full)
    r = kjumpctl(full, "plan", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["save_cmdline"].endswith("memmap=128M@512M kjump.role=save")
    assert any(q["path"].endswith("/unbind") for q in plan["quiesce"])
    assert plan["target"]["disk"] == "/dev/vda"
    assert plan["image_encryption"].startswith("none (no image key")
    r = kjumpctl(full, "plan")
    assert "quiesce (in order; undone in reverse)" in r.stdout
    assert "image: none (no image key" in r.stdout
    assert tree_hash(full) == before


def test_kjumpctl_plan_says_how_r_checks_each_frozen_filesystem(full):
    """plan names, by mount point, how R finds each frozen filesystem again: one on md RAID
    it cannot check."""
    _blockdev(full, "md0", "9:0", md__level="raid1")
    info = full / "proc/self/mountinfo"
    (full / "data").mkdir(exist_ok=True)
    info.write_text(
        info.read_text() + "61 22 9:0 / /data rw,relatime shared:10 - xfs /dev/md0 rw\n"
    )
    w(full, "/dev/md0", "")
    plan = json.loads(kjumpctl(full, "plan", "--json").stdout)
    assert plan["freeze"] == ["/data"]
    assert plan["freeze_checked_by_r"]["/data"] == "R cannot check it (md RAID)"


def test_a_btrfs_on_md_raid_fails_check_by_its_source_device(full):
    """btrfs mounts show an anonymous device number in mountinfo (0:N, not in sysfs): the
    check finds the device by the mount's source, and refuses md RAID there too."""
    _blockdev(full, "md0", "9:0", md__level="raid1")
    w(full, "/dev/md0", "")
    (full / "data").mkdir(exist_ok=True)
    info = full / "proc/self/mountinfo"
    info.write_text(
        info.read_text() + "61 22 0:48 / /data rw,relatime shared:10 - btrfs /dev/md0 rw\n"
    )
    r = kjumpctl(full, "check", "--mode", "test")
    line = next(ln for ln in r.stdout.splitlines() if "] filesystems:" in ln)
    assert line.startswith("[FAIL]") and "/data on md0 (md RAID)" in line, r.stdout


def test_kjumpctl_setup_jump_area_diff_then_yes(tree):
    """The running kernel reserves 128M at the pinned start, more than the 112M needed: that
    reservation is what goes into the boot loader's configuration (not moved, not shrunk)."""
    w(tree, "/etc/default/grub", 'GRUB_CMDLINE_LINUX="ro"\n')
    r = kjumpctl(tree, "setup", "--jump-area")
    assert r.returncode == 0 and '+GRUB_CMDLINE_LINUX="ro crashkernel=128M@512M"' in r.stdout
    assert "is kept (reserved on this boot)" in r.stdout
    assert (
        "not written" in r.stdout and "crashkernel" not in (tree / "etc/default/grub").read_text()
    )
    r = kjumpctl(tree, "setup", "--jump-area", "--yes")
    assert r.returncode == 0 and "crashkernel=128M@512M" in (tree / "etc/default/grub").read_text()


def test_kjumpctl_setup_writes_a_size_the_kernel_places_unless_a_start_is_pinned(tree):
    """A machine without crashkernel=: the size the save kernel needs, no offset (a fixed
    offset fails at the boots of a KASLR kernel that lands there); with [jump_area] start
    set, at that start."""
    w(tree, "/etc/default/grub", 'GRUB_CMDLINE_LINUX="ro quiet"\n')
    w(tree, "/proc/cmdline", "ro quiet\n")
    r = kjumpctl(tree, "setup", "--jump-area", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "crashkernel=112M@512M" in (tree / "etc/default/grub").read_text()
    conf = tree / "etc/kjumpd/kjumpd.toml"
    conf.write_text(conf.read_text().replace('start = "0x20000000"\n', ""))
    w(tree, "/etc/default/grub", 'GRUB_CMDLINE_LINUX="ro quiet"\n')
    r = kjumpctl(tree, "setup", "--jump-area", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    grub = (tree / "etc/default/grub").read_text()
    assert grub == 'GRUB_CMDLINE_LINUX="ro quiet crashkernel=112M"\n', grub
    with pytest.raises(JumpAreaError) as ei:
        jumparea.find(Sysroot(tree), cfg(tree, jump_area_start=None), 112 * MiB)
    assert "add crashkernel=128M to the kernel command line" in ei.value.fix


def test_kjumpctl_setup_errors_are_one_line(tree):
    r = kjumpctl(tree, "setup", "--target", "/var/lib/kjumpd/image", "--size", "4M")
    # the file lands on this machine's filesystem, whose device the fake /sys does not list
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("kjumpctl: ") and "fix:" in r.stderr
    assert "was removed" in r.stderr and not (tree / "var/lib/kjumpd/image").exists()
    r = kjumpctl(tree, "setup")
    assert r.returncode == 2 and "needs something to do" in r.stderr
    assert r.stderr.startswith("usage: kjumpctl")


def test_kjumpctl_setup_bootloader_installs_the_entry(tree, tmp_path):
    from kjumpd.daemon import blockmap

    blockmap.setup(Sysroot(tree), "/dev/vda1", 0)
    r = kjumpctl(
        tree,
        "setup",
        "--bootloader",
        "bls",
        "--restore-kernel",
        str(tmp_path / "files/vmlinuz"),
        "--restore-initrd",
        str(tmp_path / "files/initrd.img"),
    )
    assert r.returncode == 0, r.stderr
    entry = (tree / "boot/efi/loader/entries").iterdir().__next__().read_text()
    assert f"kjump.offset={MiB}" in entry and "kjump.target=" in entry


# -- held logs ----------------------------------------------------------------------------------
def test_held_logs_without_any_handler_do_not_reach_stderr_until_released(capsys):
    import logging

    from kjumpd.daemon.fsfreeze import HeldLogs

    root = logging.getLogger()
    saved = root.handlers[:]
    for h in saved:
        root.removeHandler(h)
    try:
        held = HeldLogs()
        held.hold()
        logging.getLogger("kjumpd.test").warning("while frozen")
        assert "while frozen" not in capsys.readouterr().err
        held.release()
        assert "while frozen" in capsys.readouterr().err
        assert root.handlers == []
    finally:
        for h in saved:
            root.addHandler(h)


# -- device stacks (sysfs topology of a fake tree; the dm table text is given) ---------------------
def _blockdev(tree: Path, name: str, devno: str, parent: str = "", **attrs: str) -> None:
    base = f"/sys/devices/virtual/block/{parent + '/' if parent else ''}{name}"
    w(tree, f"{base}/dev", devno + "\n")
    for k, v in attrs.items():
        w(tree, f"{base}/{k.replace('__', '/')}", v + "\n")
    rel = "../../devices/virtual/block/" + (f"{parent}/" if parent else "") + name
    for d in ("/sys/class/block", "/sys/dev/block"):
        (tree / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
    os.symlink(rel, tree / f"sys/class/block/{name}")
    if not (tree / f"sys/dev/block/{devno}").exists():
        os.symlink(rel, tree / f"sys/dev/block/{devno}")


def test_lvm_linear_is_translated_through_its_table(tree):
    from kjumpd.daemon import blockmap

    _blockdev(tree, "sdb", "8:16", size="4194304")
    _blockdev(tree, "sdb2", "8:18", parent="sdb", partition="2", start="4096", size="2097152")
    _blockdev(tree, "dm-0", "253:0", dm__uuid="LVM-abcdef", dm__name="vg-swap")
    table = "0 2048 linear 8:18 10240\n2048 4096 linear 8:18 409600\n"
    sr = Sysroot(tree)
    disk, ext = blockmap.to_disk(
        sr,
        blockmap.device_by_devno(sr, "253:0"),
        [(0, 512 * 1024, 2 * MiB)],
        dm_table=lambda s, d: table,
    )
    assert disk.name == "sdb"
    # LV bytes [512K, 1M) -> first segment, [1M, 2.5M) -> second segment; + partition start
    part = 4096 * 512
    assert ext == [
        (0, part + 10240 * 512 + 512 * 1024, 512 * 1024),
        (512 * 1024, part + 409600 * 512, 3 * 512 * 1024),
    ]


@pytest.mark.parametrize(
    "attrs,word",
    [
        ({"dm__uuid": "CRYPT-LUKS2-1234-root"}, "dm-crypt"),
        ({"md__level": "raid1"}, "md RAID"),
    ],
)
def test_encrypted_and_raid_devices_are_refused(tree, attrs, word):
    from kjumpd.daemon import blockmap
    from kjumpd.errors import BlockMapError

    _blockdev(tree, "dm-1", "253:1", **attrs)
    sr = Sysroot(tree)
    with pytest.raises(BlockMapError, match=word) as ei:
        blockmap.to_disk(
            sr,
            blockmap.device_by_devno(sr, "253:1"),
            [(0, 0, MiB)],
            dm_table=lambda s, d: "0 2048 linear 8:18 0\n",
        )
    assert ei.value.why and ei.value.fix


def test_an_active_swap_partition_is_refused(tree):
    from kjumpd.daemon import blockmap
    from kjumpd.errors import BlockMapError

    w(tree, "/proc/swaps", "Filename Type Size Used Priority\n/dev/vda1 partition 32764 0 -2\n")
    with pytest.raises(BlockMapError, match="active swap"):
        blockmap.translate(Sysroot(tree), "/dev/vda1")


def test_jump_area_sized_from_an_lz4_legacy_initramfs(tree):
    """lz4 -l (what the save kernel's initramfs is built with) declares no size: the area is
    sized from its blocks, 8 MiB unpacked each but the last, which is unpacked to measure it
    (not from a 3x guess that overshoots by megabytes)."""
    import lz4.block

    raw = bytes(range(256)) * (17 * MiB // 256 + 1000)  # 17 MiB + 250 KiB
    blob = bytearray(b"\x02\x21\x4c\x18")
    for o in range(0, len(raw), 8 * MiB):
        block = lz4.block.compress(raw[o : o + 8 * MiB], store_size=False)
        blob += len(block).to_bytes(4, "little") + block
    blob += bytes(4) + b"070701" + bytes(100)  # end marker, then another archive
    w(tree, "/usr/lib/kjumpd/save/initramfs.cpio.gz", bytes(blob))
    from kjumpd.initrd import lz4_legacy_size

    assert lz4_legacy_size(tree / "usr/lib/kjumpd/save/initramfs.cpio.gz") == len(raw)
    need = jumparea.required_size(Sysroot(tree), cfg(tree))
    # 24M init_size + the small archive + 17.25M unpacked + 64M + 16M -> 128M (x3 would be
    # the same here only because the archive compresses so well)
    assert need == 128 * MiB
    w(tree, "/usr/lib/kjumpd/save/initramfs.cpio.gz", b"\x02\x21\x4c\x18" + b"\xff" * 64)
    assert jumparea.required_size(Sysroot(tree), cfg(tree)) == 112 * MiB  # x3 fallback


def _meminfo(tree, swap_free_mib: int) -> None:
    kb = 1024
    (tree / "proc/meminfo").write_text(
        f"MemTotal: {1024 * kb} kB\nMemFree: {512 * kb} kB\nActive(file): {60 * kb} kB\n"
        f"Inactive(file): {40 * kb} kB\nMapped: {20 * kb} kB\nAnonPages: {300 * kb} kB\n"
        f"Mlocked: {200 * kb} kB\nSwapFree: {swap_free_mib * kb} kB\n"
    )


@pytest.mark.parametrize("swap_free, asked", [(0, 80), (1024, 180), (10, 90)])
def test_image_size_auto_reclaims_what_the_save_kernel_would_read_beyond_two_fifths(
    tree, swap_free, asked
):
    # the fake machine: MemTotal 1 GiB, MemFree 512 MiB, a 128 MiB jump area ("Crash kernel");
    # reclaimable: 80 MiB of unmapped page cache, 100 MiB of unlocked anon if swap has room
    _meminfo(tree, swap_free)
    r = shrink.toward_target(Sysroot(tree), shrink.AUTO)
    est = shrink.estimate(Sysroot(tree))
    assert est.used == 512 * MiB and est.kexec_backup == 128 * MiB
    assert r.limit == 1024 * MiB * 2 // 5 and r.before == est.total
    assert est.total - r.limit > asked * MiB, "never more than reclaim can take"
    assert (tree / "sys/fs/cgroup/memory.reclaim").read_text() == str(asked * MiB)
    assert (tree / "proc/sys/vm/drop_caches").read_text() == "", "a target never drops caches"


class _ReclaimKernel(Sysroot):
    """A fake kernel's memory.reclaim: it takes the request from the page cache first, mapped
    pages too (it can unmap clean ones), then unlocked anonymous memory into swap; it frees
    what it took and answers EAGAIN (OSError) when it took less than asked."""

    def __init__(self, root, *, total, free, file, mapped, anon, locked, swap, cap=None):
        super().__init__(root)
        self.m = dict(total=total, free=free, file=file, mapped=mapped, anon=anon)
        self.locked, self.swap, self.asks, self.cap = locked, swap, [], cap
        self._meminfo()

    def _meminfo(self):
        m = self.m
        (self.root / "proc/meminfo").write_text(
            "".join(
                f"{k}: {v // 1024} kB\n"
                for k, v in [
                    ("MemTotal", m["total"]),
                    ("MemFree", m["free"]),
                    ("Inactive(file)", m["file"]),
                    ("Mapped", min(m["mapped"], m["file"])),
                    ("AnonPages", m["anon"]),
                    ("Inactive(anon)", m["anon"] - self.locked),
                    ("Unevictable", self.locked),
                    ("Mlocked", self.locked),
                    ("SwapFree", self.swap),
                ]
            )
        )

    def write_text(self, p, value):
        if p != shrink.RECLAIM:
            return super().write_text(p, value)
        ask = int(value)
        self.asks.append(ask)
        m = self.m
        can = ask if self.cap is None else min(ask, self.cap)
        cache = min(can, m["file"])
        anon = min(can - cache, m["anon"] - self.locked, self.swap)
        m["file"] -= cache
        m["anon"] -= anon
        self.swap -= anon
        m["free"] += cache + anon
        self._meminfo()
        if cache + anon < ask:  # as Sysroot.write_text reports the kernel's EAGAIN
            raise SysrootError(
                f"cannot write {value!r} to {p}", why="Resource temporarily unavailable", path=p
            )


def test_image_size_reclaims_again_while_the_target_is_unmet_and_reclaim_still_takes(tree):
    """memory.reclaim filled its first request from page cache the estimate did not count
    (mapped pages); the unlocked anonymous memory it left goes to swap in a second round,
    as the kernel's own hibernation keeps reclaiming until its image fits."""
    from pathlib import Path

    sr = _ReclaimKernel(
        Path(tree),
        total=1024 * MiB,
        free=100 * MiB,
        file=300 * MiB,
        mapped=100 * MiB,
        anon=300 * MiB,
        locked=200 * MiB,
        swap=1024 * MiB,
    )
    r = shrink.toward_target(sr, shrink.AUTO, 0)
    # 924 MiB in use against a target of 2/5 of 1 GiB; the first ask is what the estimate
    # counts as reclaimable (200 MiB of unmapped cache + 100 MiB of unlocked anon), which the
    # kernel fills from the cache alone; the second takes the anonymous 100 MiB
    assert sr.asks == [300 * MiB, 100 * MiB], r.steps
    assert sr.m["anon"] == 200 * MiB, "only locked anonymous memory is left"
    assert r.before - r.after == 400 * MiB and r.after > r.limit, "best effort, no refusal"
    assert r.steps[-2] == "nothing reclaimable", r.steps
    assert r.steps[-1].startswith("left: page cache 0 MiB"), "the log says what stayed"
    # nothing left to take: the rounds end, best effort, without refusing
    sr2 = _ReclaimKernel(
        Path(tree),
        total=1024 * MiB,
        free=100 * MiB,
        file=0,
        mapped=0,
        anon=900 * MiB,
        locked=880 * MiB,
        swap=1024 * MiB,
    )
    r2 = shrink.toward_target(sr2, shrink.AUTO, 0)
    assert r2.after > r2.limit and len(sr2.asks) == 1 and sr2.asks[0] == 20 * MiB, r2.steps
    assert r2.steps[-2] == "nothing reclaimable", r2.steps
    # the kernel gives up short of the request (EAGAIN): no further round, no refusal
    sr3 = _ReclaimKernel(
        Path(tree),
        total=1024 * MiB,
        free=100 * MiB,
        file=300 * MiB,
        mapped=0,
        anon=300 * MiB,
        locked=300 * MiB,
        swap=0,
        cap=50 * MiB,
    )
    r3 = shrink.toward_target(sr3, shrink.AUTO, 0)
    assert sr3.asks == [300 * MiB] and r3.before - r3.after == 50 * MiB, r3.steps
    assert r3.steps[-2] == "memory.reclaim 300 MiB: Resource temporarily unavailable"


def test_reclaimable_anon_counts_pages_already_in_the_swap_cache():
    """After a reclaim pass, anonymous pages written to swap and unmapped leave AnonPages but
    stay in memory on the anon lists until freed: they are still reclaimable, without new
    swap space."""
    kb = 1024
    info = {
        "Inactive(file)": 0,
        "AnonPages": 1030 * MiB,
        "Mlocked": 1024 * MiB,
        "Unevictable": 1024 * MiB,
        "Inactive(anon)": 58 * MiB,  # 6 MiB mapped + 52 MiB in the swap cache
        "SwapCached": 52 * MiB,
        "SwapFree": 4 * kb,
    }
    assert shrink.reclaimable(info) == 52 * MiB + 4 * kb
    info["SwapFree"] = 4096 * MiB
    assert shrink.reclaimable(info) == 58 * MiB
    del info["Inactive(anon)"]  # a kernel without the LRU lines: mapped anon beyond the locked
    assert shrink.reclaimable(info) == 6 * MiB


class _PcpKernel(Sysroot):
    """A fake kernel's per-CPU free lists (Linux 6.7+, decay_pcp_high): each stat_refresh
    write lowers a list's high mark by an eighth, not below its minimum, and frees what the
    list holds above the mark."""

    def __init__(self, root, counts, highs, minimum):
        super().__init__(root)
        self.counts, self.highs, self.minimum = list(counts), list(highs), minimum
        self.refreshes = 0
        self._zoneinfo()

    def _zoneinfo(self):
        body = "".join(
            f"    cpu: {i}\n              count:    {c}\n              high:     "
            f"{h}\n              batch:    63\n              high_min: "
            f"{self.minimum}\n"
            for i, (c, h) in enumerate(zip(self.counts, self.highs))
        )
        (self.root / "proc/zoneinfo").write_text(
            "Node 0, zone    DMA32\n  pages free     1000\n  pagesets\n" + body
        )

    def write_text(self, p, value):
        super().write_text(p, value)
        if p == shrink.STAT_REFRESH:
            self.refreshes += 1
            self.highs = [max(h - h // 8, self.minimum) for h in self.highs]
            self.counts = [min(c, h) for c, h in zip(self.counts, self.highs)]
            self._zoneinfo()


def test_per_cpu_free_lists_are_drained_toward_their_minimum(tree):
    """Pages freed onto the per-CPU lists are not buddy-free: B would save them. The daemon
    drains them with stat_refresh writes while they shrink, and stops when they do not."""
    from pathlib import Path

    (tree / "proc/sys/vm").mkdir(parents=True, exist_ok=True)
    (tree / "proc/sys/vm/stat_refresh").write_text("")
    # auto-tuned high marks far above the counts: nothing is freed in the first rounds
    sr = _PcpKernel(Path(tree), [2400, 2000], [16000, 9000], minimum=256)
    said = shrink.drain_pcp(sr)
    assert sr.counts == [256, 256], f"drained to the minimum: {said}"
    assert f"{2400 + 2000 - 512} pages to the buddy allocator" in said, said
    assert sr.refreshes <= shrink.PCP_ROUNDS
    # nothing above the minimum: one refresh, then it stops
    sr2 = _PcpKernel(Path(tree), [256, 256], [256, 256], minimum=256)
    assert "(0 pages" in shrink.drain_pcp(sr2) and sr2.refreshes == 1
    # no stat_refresh (an old kernel or a container): says so, writes nothing
    (tree / "proc/sys/vm/stat_refresh").unlink()
    assert "not drained" in shrink.drain_pcp(Sysroot(tree))


def test_image_size_target_is_best_effort_and_never_refuses(tree):
    _meminfo(tree, 0)
    (tree / "sys/fs/cgroup/memory.reclaim").unlink()
    r = shrink.toward_target(Sysroot(tree), 64 * MiB)  # far below what is in use
    assert r.after > r.limit and "no cgroup v2 memory.reclaim" in r.steps
    (tree / "proc/meminfo").write_text("nothing useful\n")
    assert shrink.toward_target(Sysroot(tree), shrink.AUTO).limit == 0


def test_image_size_above_the_estimate_or_off_writes_nothing(tree):
    for size in (0, 4096 * MiB):
        r = shrink.toward_target(Sysroot(tree), size)
        assert r.after == r.before
    assert (tree / "sys/fs/cgroup/memory.reclaim").read_text() == ""


def test_image_size_counts_the_kexec_load_window_not_the_whole_jump_area(tree):
    import struct as _struct

    from kjumpd.daemon.jumparea import JumpArea

    head = bytearray(0x270)
    head[0x202:0x206] = b"HdrS"
    _struct.pack_into("<H", head, 0x206, 0x20F)
    _struct.pack_into("<I", head, 0x230, 2 * MiB)  # kernel_alignment
    _struct.pack_into("<I", head, 0x260, 14 * MiB)  # init_size
    w(tree, "/boot/kjump/bzImage", "")
    (tree / "boot/kjump/bzImage").write_bytes(bytes(head))
    (tree / "boot/kjump/initrd").write_bytes(bytes(8 * MiB))
    area = JumpArea(0x20000000, 128 * MiB)
    copy = shrink.kexec_copy_bytes(Sysroot(tree), "/boot/kjump/bzImage", "/boot/kjump/initrd", area)
    assert copy == (14 + 8) * MiB + kexec_window_slack()
    _meminfo(tree, 0)
    r = shrink.toward_target(Sysroot(tree), shrink.AUTO, copy)
    assert r.before == 512 * MiB + copy
    assert (
        shrink.kexec_copy_bytes(Sysroot(tree), "/boot/kjump/none", "/boot/kjump/initrd", area)
        == 128 * MiB
    ), "not a bzImage: the whole area"
    assert (
        shrink.kexec_copy_bytes(Sysroot(tree), "/boot/kjump/bzImage", "/boot/kjump/none", area)
        == 128 * MiB
    ), "no initrd: the whole area, at most"


def kexec_window_slack() -> int:
    from kjumpd.daemon import kexec

    return kexec.WINDOW_SLACK


def test_check_says_whether_a_hung_save_kernel_resets_itself(full):
    sr = Sysroot(full)

    def item(config=None):
        rep = preflight.run(sr, config or cfg(full), "test")
        return next(i for i in rep.items if i.name == "save kernel watchdog")

    none = item()
    # no watchdog seen: a warning naming the consequence and the drivers, not a failure
    assert not none.ok and not none.fatal
    assert "power cycle" in none.detail and "iTCO_wdt" in none.fix
    w(full, "/sys/class/watchdog/watchdog0/identity", "iTCO_wdt\n")
    found = item()
    assert found.ok and found.detail.startswith("watchdog0 (iTCO_wdt)")
    assert "after 120 s without progress" in found.detail
    off = item(dataclasses.replace(cfg(full), save_kernel_watchdog=0))
    assert off.ok and "off" in off.detail and "power cycle" in off.detail


def test_a_jump_area_the_kernel_placed_is_found_wherever_it_is(tree):
    """crashkernel=SIZE (no offset): what a KASLR kernel needs, since a fixed offset fails
    whenever the randomly placed kernel lies there. The area is wherever the kernel put it."""
    w(tree, "/proc/cmdline", "quiet crashkernel=128M\n")
    iomem = (tree / "proc/iomem").read_text()
    w(
        tree,
        "/proc/iomem",
        iomem.replace("20000000-27ffffff : Crash kernel", "30000000-37ffffff : Crash kernel"),
    )
    a = jumparea.find(Sysroot(tree), cfg(tree, jump_area_start=None), 112 * MiB)
    assert (a.start, a.size) == (0x30000000, 128 * MiB)
    # a config that pins the area still says where it is not
    with pytest.raises(JumpAreaError, match="not where the config expects it"):
        jumparea.find(Sysroot(tree), cfg(tree, jump_area_start=0x20000000), 112 * MiB)


def test_kjumpctl_setup_keeps_a_jump_area_the_kernel_places(tree):
    """crashkernel=SIZE (KASLR's form) large enough and no start pinned: setup leaves the
    boot loader alone instead of pinning the area at an offset KASLR may collide with."""
    conf = tree / "etc/kjumpd/kjumpd.toml"
    conf.write_text(conf.read_text().replace('start = "0x20000000"\n', ""))
    w(tree, "/etc/default/grub", 'GRUB_CMDLINE_LINUX="ro crashkernel=128M"\n')
    w(tree, "/proc/cmdline", "ro crashkernel=128M\n")
    r = kjumpctl(tree, "setup", "--jump-area", "--yes")
    assert r.returncode == 0 and "crashkernel=128M is kept" in r.stdout, r.stdout
    assert (tree / "etc/default/grub").read_text() == 'GRUB_CMDLINE_LINUX="ro crashkernel=128M"\n'
    # the user asked the boot loader for a larger area: kept for the next boot, not reverted
    w(tree, "/etc/default/grub", 'GRUB_CMDLINE_LINUX="ro crashkernel=160M"\n')
    r = kjumpctl(tree, "setup", "--jump-area", "--yes")
    grub = (tree / "etc/default/grub").read_text()
    assert r.returncode == 0 and grub == 'GRUB_CMDLINE_LINUX="ro crashkernel=160M"\n', grub
    assert "already has it" in r.stdout, r.stdout
    # too small, both on this boot and in the boot loader: replaced, still placed
    w(tree, "/proc/cmdline", "ro crashkernel=64M\n")
    w(tree, "/etc/default/grub", 'GRUB_CMDLINE_LINUX="ro crashkernel=64M"\n')
    r = kjumpctl(tree, "setup", "--jump-area", "--yes")
    grub = (tree / "etc/default/grub").read_text()
    assert r.returncode == 0 and grub == 'GRUB_CMDLINE_LINUX="ro crashkernel=112M"\n', grub


def test_a_filesystem_on_lvm_or_raid_fails_check_before_any_jump(full):
    """R assembles no device-mapper or md device: a frozen filesystem on md RAID, or on a
    device-mapper device whose map kjumpd cannot read (here: no dmsetup table for it), could
    never be found again, and the image would be refused as stale after the power-off. check
    says so first, naming the mount point and the device; plain partitions pass."""
    ok = kjumpctl(full, "check", "--mode", "test")
    line = next(ln for ln in ok.stdout.splitlines() if "] filesystems:" in ln)
    assert line.startswith("[ok  ]") and "where R can check it" in line, ok.stdout
    _blockdev(full, "dm-0", "253:0", dm__uuid="LVM-abcdef", dm__name="vg-root")
    _blockdev(full, "md0", "9:0", md__level="raid1")
    info = full / "proc/self/mountinfo"
    (full / "home").mkdir(exist_ok=True)
    (full / "data").mkdir(exist_ok=True)
    info.write_text(
        info.read_text()
        + "60 22 253:0 / /home rw,relatime shared:9 - ext4 /dev/mapper/vg-root rw\n"
        + "61 22 9:0 / /data rw,relatime shared:10 - xfs /dev/md0 rw\n"
    )
    r = kjumpctl(full, "check", "--mode", "test")
    assert r.returncode == 3, r.stdout
    lines = r.stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if "] filesystems:" in ln)
    assert lines[i].startswith("[FAIL]"), r.stdout
    assert "/home on dm-0 (device-mapper: " in lines[i], lines[i]
    assert "/data on md0 (md RAID)" in lines[i], lines[i]
    assert "refuse the image as stale" in lines[i] and "unmount them" in lines[i + 1]


# -- image encryption ---------------------------------------------------------------------------
def _check_line(stdout: str, item: str) -> tuple[str, str]:
    """The `check` line of ``item`` and the line after it (the fix)."""
    lines = stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if f"] {item}:" in ln)
    return lines[i], lines[i + 1] if i + 1 < len(lines) else ""


def test_image_encryption_follows_the_key_and_the_root_filesystem(full, tmp_path):
    """No key on a plain machine: plaintext, said so. Root on LUKS (under LVM) without a key:
    refused before anything is frozen, naming the device and the command that fixes it. A
    key whose save kernel cannot encrypt: refused, naming `kjumpctl install`. Then the job
    carries a fresh image key sealed to the machine's key, which the passphrase opens."""
    import gzip
    import hashlib

    from kjumpd import cpio
    from kjumpd.daemon import encryption
    from kjumpd.daemon.install import set_save_kernel_hashes
    from kjumpd.image import seal

    line, _ = _check_line(kjumpctl(full, "check", "--mode", "test").stdout, "image encryption")
    assert line.startswith("[ok  ]") and "none (no image key at" in line, line
    # / on an LV inside a LUKS volume (Ubuntu's encrypted install)
    _blockdev(full, "dm-0", "253:0", dm__uuid="CRYPT-LUKS2-0123-luks", dm__name="luks-0123")
    _blockdev(full, "dm-1", "253:1", dm__uuid="LVM-abc", dm__name="vgubuntu-root")
    (full / "sys/devices/virtual/block/dm-1/slaves").mkdir()
    (full / "sys/devices/virtual/block/dm-1/slaves/dm-0").symlink_to("../../dm-0")
    info = full / "proc/self/mountinfo"
    original = info.read_text()
    info.write_text(
        original.replace(
            "22 1 0:21 / / rw,relatime shared:1 - tmpfs rootfs rw",
            "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/mapper/vgubuntu-root rw",
        )
    )
    r = kjumpctl(full, "check", "--mode", "test")
    assert r.returncode == 3, r.stdout
    line, fix = _check_line(r.stdout, "image encryption")
    assert line.startswith("[FAIL]") and "root filesystem is encrypted" in line, line
    assert "luks-0123" in line and "kjumpctl image-key create" in fix, (line, fix)
    info.write_text(original)  # the rest on a plain root again
    # the key is created; the installed save kernel's initramfs predates it
    (tmp_path / "pass").write_text("correct horse\n")
    r = kjumpctl(full, "image-key", "create", "--passphrase-file", str(tmp_path / "pass"))
    assert r.returncode == 0 and "kjumpctl install" in r.stdout, r.stdout + r.stderr
    key_path = full / "etc/kjumpd/image-key.json"
    assert key_path.stat().st_mode & 0o777 == 0o600
    r = kjumpctl(full, "image-key", "create", "--passphrase-file", str(tmp_path / "pass"))
    assert r.returncode != 0 and "--force" in r.stderr, r.stderr
    r = kjumpctl(full, "check", "--mode", "test")
    line, fix = _check_line(r.stdout, "image encryption")
    assert line.startswith("[FAIL]") and "cannot encrypt images" in line, line
    assert "kjumpctl install" in fix, fix
    entry, entry_fix = _check_line(r.stdout, "boot entry")
    assert "no key to open them" in entry + entry_fix, r.stdout
    # a save initramfs that holds the cryptography package (what `install` builds now)
    initrd = gzip.compress(
        cpio.write([cpio.Entry.file("usr/lib/python3.11/cryptography/__init__.py", b"", 0o644)])
    )
    w(full, "/usr/lib/kjumpd/save/initramfs.cpio.gz", initrd)
    toml = full / "etc/kjumpd/kjumpd.toml"
    kernel_sha = hashlib.sha256((full / "usr/lib/kjumpd/save/bzImage").read_bytes()).hexdigest()
    toml.write_text(
        set_save_kernel_hashes(toml.read_text(), kernel_sha, hashlib.sha256(initrd).hexdigest())
    )
    r = kjumpctl(full, "check", "--mode", "test")
    line, _ = _check_line(r.stdout, "image encryption")
    kf = seal.KeyFile.load(key_path)
    assert line.startswith("[ok  ]") and f"key id {kf.key_id}" in line, line
    # what the job carries: a fresh key per hibernation, sealed to the machine's key
    plan = encryption.plan(Sysroot(full), cfg(full))
    a, b = plan.job_fields(), plan.job_fields()
    assert a["image_key"] != b["image_key"]
    job = small_job(**a)
    assert a["image_key"] not in repr(job)  # never in a log line
    private = kf.unlock("correct horse")
    assert seal.unseal_key(private, kf.public, job.seal).hex() == a["image_key"]
    # [encryption] mode = "off": plaintext, whatever the key
    toml.write_text(toml.read_text() + '\n[encryption]\nmode = "off"\n')
    line, _ = _check_line(kjumpctl(full, "check", "--mode", "test").stdout, "image encryption")
    assert line.startswith("[ok  ]") and "off" in line, line
