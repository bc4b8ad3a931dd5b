"""The VM tier's end-to-end scenarios: a real CONFIG_KEXEC_JUMP kernel in QEMU (TCG),
the real daemon, CLI, save kernel and restore-first environment, one shared guest image with a
qcow2 overlay per scenario.

Every assertion is the guest's own verdict (the workload's ~200 MiB of seeded data compared
byte for byte with what the seed generates, its counter continuing in the same process, the
image state as kjumpd reads it), plus host-side facts a user would notice (the VM powered off
and came back through the restore-first entry, e2fsck clean). No timing is asserted.

A scenario whose product pieces are missing FAILS naming them. Serial logs of each QEMU run
are kept in artifacts/vm/<test>/.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.vm import assets as vm_assets
from tests.vm import scenarios

pytestmark = pytest.mark.vm


def _run(name: str, assets: vm_assets.Assets, run_dir: Path) -> scenarios.Outcome:
    out = scenarios.run(name, assets, run_dir)
    assert out.passed, out.summary()
    return out


def _console_matches(out: scenarios.Outcome, pattern: str) -> list:
    """Every line of the scenario's serial logs that matches ``pattern``."""
    return out.console(pattern)


#: the restore's first line, R's or B's: where the kernel that restores runs (the low 512
#: KiB, then the jump area, whose start this captures)
RESTORED_FROM = r"kjump-agent: restoring \d+ MiB .*this kernel runs in .*\[(0x[0-9a-f]+), "


def _booted_restore_first(out: scenarios.Outcome) -> bool:
    return out.event("host-boots-R") is not None


def _writers_intact(out: scenarios.Outcome) -> None:
    """The SQLite database and the fsync'd log written all along are whole, with every
    record committed before the request and after it, by the same processes that go on
    (the guest's checks, writers.py), and the guest's filesystem is clean (host e2fsck)."""
    assert out.verdict.get("writers") == "intact", out.summary()
    for kind in ("sqlite", "append"):
        before, after = (int(x) for x in out.verdict[kind].split("->"))
        assert after > before > 0, out.summary()
    assert out.verdict.get("fsck") == "clean", out.summary()


def test_a_test_mode_jumps_back_with_workload_intact(vm_assets_built, run_dir):
    out = _run("test", vm_assets_built, run_dir)
    assert out.verdict.get("data") == "byte-exact", out.summary()
    assert out.verdict.get("image", "").startswith("INVALID"), out.summary()  # test: invalidated
    assert int(out.verdict.get("stored_bytes", "0")) > 0, out.summary()  # written first
    _writers_intact(out)
    # B armed a 10 s watchdog and stopped it before the jump back: A ran on for two of its
    # hardware periods and more without being reset
    assert _console_matches(out, r"kjump-agent: watchdog: /dev/watchdog0 .* armed"), out.summary()
    assert out.verdict.get("watchdog") == "stopped", out.summary()
    # no key in this hibernation: the daemon's memory is not locked, so that the shrink can
    # take its idle pages out of the image
    assert _console_matches(out, r"kjumpd\.daemon\.transaction: save kernel: "), out.summary()
    assert not _console_matches(out, r"kjumpd's memory is locked"), out.summary()


def test_b_shutdown_then_restore_first_boot_continues_workload(vm_assets_built, run_dir):
    out = _run("shutdown", vm_assets_built, run_dir)
    assert _booted_restore_first(out), out.summary()  # the VM really powered off
    assert out.verdict.get("devices", "").endswith("-same"), out.summary()
    # the first run ended in a plain power-off (mode shutdown), not in ACPI S4, done by the
    # save kernel right after SAVED: no jump back to A first
    assert out.mark("power-down", boot=1) and not out.mark("acpi-s4", boot=1), out.summary()
    assert _console_matches(out, r"kjump-agent: image SAVED; power off here"), out.summary()
    first = out.logs[0].read_text(errors="replace")
    assert "kjump-agent: jumping back to the main kernel" not in first, out.logs[0]
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    # one boot to restore: the hibernation confined R to its jump area (grubenv's
    # kjumpd_confine on the entry's line), KASLR put R's kernel there, and R restored the
    # image itself, with no save kernel booted after it
    assert _console_matches(out, r"Command line: kjump\.target=\S+ .*memmap=0x[0-9a-f]+\$0x"), (
        out.summary()
    )
    assert _console_matches(
        out, r"kjumpd-rf: image marked RESTORING\(1\); restoring it in this kernel"
    ), out.summary()
    assert not out.mark("B-restore-up"), out.summary()
    before, after = (int(x) for x in out.verdict["counter"].split("->"))
    assert after > before, out.summary()
    _writers_intact(out)
    # user space was stopped by the cgroup freezer before the filesystems (everything in
    # this guest's root cgroup is parked: it has no service manager)
    parked = _console_matches(
        out,
        r"user space stopped: \d+ cgroup\(s\) frozen, (\d+) "
        r"process\(es\) parked",
    )
    assert parked and int(parked[0].group(1)) >= 4, out.summary()
    # the save left A's free pages out (they came back as zeros) and the workload is intact
    free = _console_matches(
        out,
        r"kjump-agent: free pages: (\d+) \(\d+ MiB\) of A's memory "
        r"skipped",
    )
    assert free and int(free[0].group(1)) > 0, out.summary()
    # A runs without init_on_free: B's restore left the free memory alone (not even read)
    assert _console_matches(
        out,
        r"kjump-agent: free chunks: free records, left as they are "
        r"found",
    ), out.summary()
    left = _console_matches(out, r"kjump-agent: RESTORED .* (\d+) MiB of free memory left")
    assert left and int(left[0].group(1)) > 0, out.summary()
    # right before the jump the daemon drained the per-CPU free lists on the real kernel
    # (stat_refresh + /proc/zoneinfo): kexec's exit leaves ~20 MiB there, B would save them;
    # drained, the lists hold 2 MiB (their minimum here is under 4)
    drained = _console_matches(
        out,
        r"per-CPU free lists (\d+) -> (\d+) MiB \((\d+) pages to "
        r"the buddy allocator; high marks",
    )
    assert drained and int(drained[0].group(2)) <= 4, out.summary()


def test_c_platform_s4_then_restore(vm_assets_built, run_dir):
    out = _run("platform", vm_assets_built, run_dir)
    assert out.mark("acpi-s4", boot=1), out.summary()  # entered ACPI S4, not a plain off
    # A ran with nokaslr and crashkernel=128M@0x20000000: the restore ran in that fixed area
    ran = _console_matches(out, RESTORED_FROM)
    assert ran and int(ran[0].group(1), 16) == 0x20000000, out.summary()
    # every PCI function's configuration header and every link as before (fwts s4's check)
    assert out.verdict.get("devices", "").endswith("-same"), out.summary()
    assert _booted_restore_first(out), out.summary()
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    _writers_intact(out)
    # A runs with init_on_free=1 here: its free pages came back as zeros, none left as found
    assert _console_matches(
        out,
        r"kjump-agent: free chunks: all-zero records, restored as "
        r"zeros",
    ), out.summary()
    left = _console_matches(out, r"kjump-agent: RESTORED .* (\d+) MiB of free memory left")
    assert left and int(left[0].group(1)) == 0, out.summary()
    # the jump area held random bytes at power-on, as DRAM does; the load's window was
    # cleared first, so the pages the jump swapped into A hold zeros and the image skips
    # them instead of carrying the window's size of random bytes
    cleared = _console_matches(
        out, r"jump area 0x([0-9a-f]+)-0x([0-9a-f]+) cleared before the load"
    )
    assert cleared, out.summary()
    window = int(cleared[0].group(2), 16) + 1 - int(cleared[0].group(1), 16)
    saved = _console_matches(
        out, r"kjump-agent: SAVED: .* (\d+) zero pages skipped \((\d+) of them free"
    )
    assert saved, out.summary()
    zero_in_use = (int(saved[0].group(1)) - int(saved[0].group(2))) * 4096
    assert zero_in_use >= window, (zero_in_use, window, out.summary())


def test_d1_suspend_to_both_woken_from_ram_invalidates_image(vm_assets_built, run_dir):
    out = _run("suspend-wake", vm_assets_built, run_dir)
    assert out.event("host-saw-s3") is not None, out.summary()  # QEMU reported "suspended"
    assert not _booted_restore_first(out), out.summary()
    assert out.verdict.get("image", "").startswith("INVALID"), out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()


def test_d2_suspend_to_both_power_lost_restores_from_image(vm_assets_built, run_dir):
    out = _run("suspend-lost", vm_assets_built, run_dir)
    assert out.event("host-saw-s3") is not None, out.summary()
    assert _booted_restore_first(out), out.summary()
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()


def test_e_no_image_restore_first_boots_normal_kernel(vm_assets_built, run_dir):
    out = _run("noimage", vm_assets_built, run_dir)
    assert _booted_restore_first(out), out.summary()
    assert out.verdict.get("stage") == "2", out.summary()  # the normal kernel's init ran


def test_f_failure_before_jump_rolls_back_everything(vm_assets_built, run_dir):
    out = _run("rollback", vm_assets_built, run_dir)
    assert out.verdict.get("data") == "byte-exact", out.summary()
    assert out.event("inject") is not None, out.summary()
    # the refusal hit the load step, with the filesystems already frozen: a full rollback
    rec = out.results[0] if out.results else {}
    assert rec.get("result") == "failed" and rec.get("error_class") == "KexecError", out.summary()
    assert {"freeze tasks", "freeze filesystems", "load"} <= set(rec.get("durations", {})), (
        out.summary()
    )
    assert not rec.get("undo_errors"), rec.get("undo_errors")
    # the writers kept going through the rollback and lost nothing; the disk is clean
    _writers_intact(out)


def test_g_checkpoint_keeps_the_image_and_the_writers_go_on(vm_assets_built, run_dir):
    out = _run("checkpoint", vm_assets_built, run_dir)
    assert not _booted_restore_first(out), out.summary()
    assert out.verdict.get("image") == "SAVED", out.summary()
    assert int(out.verdict.get("stored_bytes", "0")) > 0, out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    _writers_intact(out)


def test_h_daemon_killed_inside_the_frozen_window_leaves_nothing_frozen(vm_assets_built, run_dir):
    out = _run("killed", vm_assets_built, run_dir)
    # PID 1 killed kjumpd with user space and the root filesystem frozen, while it loaded
    # the save kernel; its freeze guard thawed everything
    assert out.verdict.get("killed") == "frozen", out.summary()
    assert out.event("daemon-killed") is not None, out.summary()
    assert _console_matches(out, r"freeze guard: thawed after the death of kjumpd"), out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    _writers_intact(out)


def test_k_kaslr_and_a_jump_area_the_kernel_placed_hibernate_and_restore(vm_assets_built, run_dir):
    """A as distributions boot it (every scenario but c does): KASLR on, a jump area with no
    offset, here in the ranges form a kdump package writes (crashkernel=START-END:SIZE,...,
    the size by the machine's RAM). The save kernel's free-page scan reads A's randomised
    page tables and struct pages; R restores from where the image says A's area was,
    confined there by the hibernation (one boot)."""
    out = _run("kaslr", vm_assets_built, run_dir)
    boot = out.event("kaslr-boot")
    assert boot is not None and boot.fields.get("kaslr") == "on", out.summary()
    assert boot.fields.get("crashkernel") == scenarios.KDUMP_RANGES, out.summary()
    assert boot.fields.get("jump_area_mib") == "128", out.summary()
    area = boot.fields.get("jump_area", "none")
    assert area != "none", out.summary()
    assert _booted_restore_first(out), out.summary()
    ran = _console_matches(out, RESTORED_FROM)
    assert ran and int(ran[0].group(1), 16) == int(area, 16), out.summary()
    assert _console_matches(out, r"restoring it in this kernel"), out.summary()
    assert not out.mark("B-restore-up"), out.summary()
    free = _console_matches(
        out, r"kjump-agent: free pages: (\d+) \(\d+ MiB\) of A's memory skipped"
    )
    assert free and int(free[0].group(1)) > 0, out.summary()
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    _writers_intact(out)


def test_x_a_machine_with_ram_above_4_gib_hibernates_and_restores(vm_assets_built, run_dir):
    """4 GiB of RAM, 1 GiB of it above the 4 GiB line, as on almost every real machine. The
    save kernel's memory map then reaches above 4 GiB (A's RAM is ACPI data to it), which
    makes x86 set up swiotlb: its default 64 MiB pool, taken from a 128 MiB jump area, left
    B unable to unpack its initramfs, and the machine rebooted without an image."""
    out = scenarios.run("shutdown", vm_assets_built, run_dir, memory_mb=4096)
    assert out.passed, out.summary()
    assert _console_matches(out, r"BIOS-e820: \[mem 0x0000000100000000-0x000000013fffffff\] usable")
    b_map = _console_matches(out, r"Command line: .*memmap=1G#4G .*kjump\.role=save")
    assert b_map, out.summary()
    assert _console_matches(out, r"software IO TLB: mapped \[mem 0x[0-9a-f]+-0x[0-9a-f]+\] \(4MB\)")
    assert not _console_matches(out, r"Initramfs unpacking failed"), out.summary()
    assert _booted_restore_first(out), out.summary()
    assert _console_matches(out, r"kjump-agent: restoring \d+ MiB"), out.summary()
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    _writers_intact(out)


def test_x_a_jump_area_above_4_gib_saves_and_restores_in_one_boot(vm_assets_built, run_dir):
    """crashkernel=128M@4.5G on a 4 GiB machine (RAM up to 5 GiB): the save kernel and the
    restore-first environment run above the 4 GiB line, with only the low 512 KiB below it;
    the image is saved there and restored in one boot."""
    out = scenarios.run("high-area", vm_assets_built, run_dir, memory_mb=4096)
    assert out.passed, out.summary()
    start, size = scenarios.HIGH_AREA
    assert _console_matches(
        out, rf"crashkernel reserved: 0x0*{start:x} - 0x0*{start + size:x} \(128 MB\)"
    ), out.summary()
    runs_in = rf"\[0x1000, 0x80000\), \[{start:#x}, {start + size:#x}\)"
    assert _console_matches(out, r"kjumpd-rf: .*restoring it in this kernel"), out.summary()
    assert _console_matches(out, rf"kjump-agent: restoring \d+ MiB .*runs in {runs_in}"), (
        out.summary()
    )
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    _writers_intact(out)


def test_y_a_machine_whose_free_memory_is_fragmented_hibernates(vm_assets_built, run_dir):
    """A's free memory in more single pages than the save kernel has room to map (every
    other page of 5 GiB freed, as after weeks of uptime): the map stays within its share of
    B's memory, keeps what fits (gigabytes still left out), saves the rest as data, and the
    workload comes back byte-exact. The scan of 6 GiB of struct pages takes longer than the
    scenario's 10 s watchdog under emulation: it counts as progress, no reset."""
    out = scenarios.run(
        "test", vm_assets_built, run_dir, memory_mb=6144, append="kjumpvm.fragment=5120"
    )
    assert out.passed, out.summary()
    assert _console_matches(out, r"fragmenter: 5120 MiB touched, every other page freed")
    assert _console_matches(out, r"kjump-agent: watchdog: .* armed: no progress for 10 s")
    free = _console_matches(
        out, r"kjump-agent: free pages: (\d+) \(\d+ MiB\) of A's memory skipped \((\d+) free blocks"
    )
    full = _console_matches(out, r"free page map full at (\d+) ranges")
    assert free and full, (
        "the map had room for every free block: B has more memory than this test was made "
        "for; raise kjumpvm.fragment\n" + out.summary()
    )
    assert int(free[0].group(2)) > int(full[0].group(1)), out.summary()
    assert int(free[0].group(1)) >= 256 * 1024, out.summary()  # 1 GiB at least left out
    assert _console_matches(
        out, r"kjump-agent: free pages: [1-9]\d* more \(\d+ MiB\) saved as data"
    )
    assert out.verdict.get("data") == "byte-exact", out.summary()
    assert out.verdict.get("image", "").startswith("INVALID"), out.summary()
    _writers_intact(out)


def test_z_a_huge_page_pool_s_free_pages_stay_out_and_its_used_pages_come_back(
    vm_assets_built, run_dir
):
    """Huge page pools as a database or virtualisation host reserves them: a 1 GiB page
    reserved at boot and 384 pages of 2 MiB, 256 MiB of those held in a hugetlbfs file and
    512 MiB free but holding what an exited process wrote; the vmemmap optimisation on, so
    a folio's tails' struct pages are copies of its head's. The free ones are left out of
    the image (the 2 MiB ones are random bytes: saved, they would be 512 MiB of it), and not
    counted as memory to reclaim toward the image size target; after a power-off and a
    restore the file is byte-exact, the pool has as many free pages, and a huge page handed
    out reads as zeros."""
    out = scenarios.run(
        "shutdown",
        vm_assets_built,
        run_dir,
        memory_mb=3072,
        append="hugetlb_free_vmemmap=on hugepagesz=1G hugepages=1 hugepagesz=2M "
        "kjumpvm.hugepages=256:512",
    )
    assert out.passed, out.summary()
    assert _console_matches(out, r"HugeTLB: registered 1.00 GiB page size, pre-allocated 1 pages")
    assert _console_matches(out, r"huge pages: 256 MiB held in hugetlbfs, 512 MiB free")
    huge = _console_matches(
        out, r"kjump-agent: free pages: (\d+) MiB of them are free huge pages of A's pool"
    )
    assert huge and int(huge[0].group(1)) == 1024 + 512, out.summary()
    # the pools' free pages are not counted against the image size target (2/5 of RAM): the
    # estimate stays under it and nothing is reclaimed for them
    stats = (out.results[0] if out.results else {}).get("stats", {})
    assert 0 < stats.get("image_estimate_before", 0) < stats.get("image_target", 0), stats
    assert stats["image_estimate_after"] == stats["image_estimate_before"], stats
    assert out.verdict.get("hugetlb") == "intact", out.summary()
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()


def test_w_a_warm_save_kernel_takes_each_job_without_a_boot(vm_assets_built, run_dir):
    """[save_kernel] warm = true: the daemon boots the save kernel once at its start and
    parks it; each hibernation is then one jump into it, the job handed over through the
    target's job slot. After `kexec -u` the next hibernation loads it cold and says why;
    after the resume from a shutdown a new one is warmed up and used."""
    out = _run("warm", vm_assets_built, run_dir)
    v = out.verdict
    assert v.get("parked") == "parked_(warm-up)", out.summary()  # kjumpctl status said so
    assert (v.get("first"), v.get("second"), v.get("unloaded"), v.get("after_cold")) == (
        "warm",
        "warm",
        "cold",
        "warm",
    ), out.summary()
    # two warm hibernations later the save kernel's files (megabytes) are not in the page
    # cache, where every image would save them
    assert int(v.get("save_files_size", "0")) > 8 << 20, out.summary()
    assert int(v.get("save_files_cached", "-1")) < 256 << 10, out.summary()
    # kjumpd warmed a new save kernel up after the resume (after a delay) and said so
    assert v.get("after_resume") == "warm", out.summary()
    assert v.get("parked_again") == "parked_(warm-up)", out.summary()
    # B booted twice in all (at the daemon's start, and after the resume), and parked each
    # time; the cold load after `kexec -u` booted it once more, with a job
    parked = _console_matches(out, r"kjump-agent: parked: target ")
    assert len(parked) == 2, out.summary()
    booted = _console_matches(out, r"kjump-agent: save kernel up: role save")
    assert len(booted) == 3, out.summary()
    taken = _console_matches(out, r"kjump-agent: taking job \d+ from the job slot")
    # first, second, after the cold load, the shutdown, after the resume
    assert len(taken) == 5, out.summary()
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    _writers_intact(out)


def test_l_encrypted_image_through_the_daemon_and_the_passphrase(vm_assets_built, run_dir):
    """An administrator's encryption set-up on the real daemon: `kjumpctl image-key create`,
    `check` refusing the save kernel that cannot encrypt, then the cryptography variants
    (what `kjumpctl install` builds) and `check` passing. kjumpd hibernates (mode shutdown)
    with disk writers; the workload's bytes are nowhere on the powered-off disk; R asks for
    the passphrase, refuses a wrong one, restores with the right one; the workload and the
    writers go on."""
    out = _run("encrypted", vm_assets_built, run_dir)
    assert out.verdict.get("guard") == "refused", out.summary()
    assert out.verdict.get("encryption") == "AES-256-GCM", out.summary()
    assert _console_matches(out, r"kjump-agent: saving \d+ MiB .*AES-256-GCM"), out.summary()
    # the image key passes through the daemon: its memory stays out of swap
    assert _console_matches(out, r"kjumpd's memory is locked until the hibernation is over"), (
        out.summary()
    )
    scan = out.event("host-scanned-disk")
    assert scan is not None and scan.fields.get("plaintext") == "0", out.summary()
    assert _console_matches(out, r"kjumpd-rf: wrong passphrase \(1 of 3\)"), out.summary()
    assert _console_matches(out, r"kjumpd-rf: image key unsealed"), out.summary()
    # typed at R's console, never echoed there (A's boot line carries it: kjumpvm.encrypt=)
    assert scenarios.PASSPHRASE not in out.logs[-1].read_text(errors="replace"), out.logs[-1]
    assert _booted_restore_first(out), out.summary()
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    _writers_intact(out)


def _storage_restored(out: scenarios.Outcome, disk: str = "vdb") -> None:
    """What the storage scenarios prove after the power cycle: R found the target on the
    second disk (``disk``) and restored; the workload and the writers go on; the target
    file reads back through the filesystem exactly as the block map says B wrote it on the
    disk, and the filesystem holding it checks clean offline."""
    assert out.verdict.get("target_disk") == f"/dev/{disk}", out.summary()
    assert _booted_restore_first(out), out.summary()
    assert _console_matches(out, rf"kjumpd-rf: target \S+ found on /dev/{disk}\b"), out.summary()
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    assert out.verdict.get("through_mapping") == "same", out.summary()
    assert out.verdict.get("mapped_disk") == disk, out.summary()
    assert out.verdict.get("file_state") == "CONSUMED", out.summary()
    assert out.verdict.get("fs_check") == "clean", out.summary()
    assert out.verdict.get("notes") == "intact", out.summary()
    _writers_intact(out)


@pytest.mark.parametrize("bus,disk", [("nvme", "nvme0n1"), ("sata", "sda")])
def test_n_target_on_a_partition_of_an_nvme_or_a_sata_disk(bus, disk, vm_assets_built, run_dir):
    """The image target in ext4 on the first partition of the disks real machines have: an
    NVMe namespace (partitions named nvme0n1p1) or a SATA disk behind AHCI. The save kernel
    writes the image there and the restore-first environment reads it back, each with its
    own driver for the disk; the daemon maps the partition onto the whole disk."""
    out = _run(bus, vm_assets_built, run_dir)
    assert _console_matches(out, rf"kjump-agent: target \S+ found on /dev/{disk} at byte"), (
        out.summary()
    )
    _storage_restored(out, disk)


def test_m_target_on_a_linear_lv_in_two_segments(vm_assets_built, run_dir):
    """The image target on ext4 on an LVM logical volume in two segments (another LV
    between them): the daemon maps the file through the LV onto the disk, B writes there,
    R reads the frozen LV filesystem's stamp through its recorded map (R assembles no
    LVM) and restores. A raw LV is claimed as a target at its place on the disk too."""
    out = _run("lvm", vm_assets_built, run_dir)
    assert out.verdict.get("lv_segments") == "2", out.summary()
    assert out.verdict.get("r_checks") == "map", out.summary()
    assert out.verdict.get("raw_lv") == "at-its-extent", out.summary()
    assert int(out.verdict.get("target_extents", "0")) >= 2, out.summary()
    assert _console_matches(out, r"kjumpd-rf: filesystems: .*ext4 \S+ on /dev/vdb \(mapped\)"), (
        out.summary()
    )
    _storage_restored(out)
    # `kjumpctl setup --bootloader` read R's files and wrote its boot files (tens of MiB)
    # and left none of them in the page cache, where the next image would save them
    cached = _console_matches(out, r"KJUMP-CACHED: (\d+) of (\d+) bytes in 4 boot files")
    assert cached and int(cached[0].group(2)) > 10 << 20, out.summary()
    assert int(cached[0].group(1)) < 1 << 20, cached[0].group(0)


def test_u_target_on_a_raw_lv_in_two_segments_on_a_partition(vm_assets_built, run_dir):
    """The image target is a raw LV (no filesystem; `kjumpctl setup --target /dev/mapper/...`),
    in two segments with another LV between them, its PV on a partition from 1 MiB: the
    daemon maps the device through LVM and the partition onto the disk, B writes there, R
    finds it through the recorded map and restores; the LV reads back exactly as the map says
    B wrote it on the disk, and a filesystem frozen on the same volume group checks clean."""
    out = _run("lvm-raw", vm_assets_built, run_dir)
    assert out.verdict.get("lv_segments") == "2", out.summary()
    assert int(out.verdict.get("target_extents", "0")) >= 2, out.summary()
    assert out.verdict.get("r_checks") == "map", out.summary()
    _storage_restored(out)


def test_n_target_on_btrfs_nodatacow(vm_assets_built, run_dir):
    """The image target on a single-device btrfs: `kjumpctl setup` makes it nodatacow, the
    daemon maps its btrfs logical addresses through the chunk tree onto the disk (the
    1 GiB file spans several data chunks), B writes there, R restores; btrfs check is
    clean afterwards."""
    out = _run("btrfs", vm_assets_built, run_dir)
    assert out.verdict.get("nocow") == "yes", out.summary()
    _storage_restored(out)


def test_o_a_frozen_filesystem_on_lvm_inside_luks2_is_checked_without_its_key(
    vm_assets_built, run_dir
):
    """Ubuntu's encrypted layout on the second disk: LUKS2 (its volume key in the kernel
    keyring, as cryptsetup puts it on any distribution kernel), LVM inside, ext4 on an LV
    in two segments, mounted and frozen by the hibernation. R holds no volume key: it finds the
    filesystem by the CRCs of its superblock's ciphertext through the recorded map (LV, then
    dm-crypt, onto the disk), restores, and the filesystem is intact and clean."""
    out = _run("luks", vm_assets_built, run_dir)
    assert out.verdict.get("volume_key") == "keyring", out.summary()
    assert out.verdict.get("r_checks") == "ciphertext", out.summary()
    assert _console_matches(
        out, r"kjumpd-rf: filesystems: .*ext4 \S+ on /dev/vdb \(encrypted, mapped\)"
    ), out.summary()
    assert _booted_restore_first(out), out.summary()
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    assert out.verdict.get("notes") == "intact", out.summary()
    assert out.verdict.get("fs_check") == "clean", out.summary()
    _writers_intact(out)


def test_p_a_changed_filesystem_below_dm_crypt_makes_the_image_stale(vm_assets_built, run_dir):
    """Scenario o's machine, but while it is off the host overwrites the encrypted sector of
    that filesystem's superblock (all one can do without the key, and what a mount
    elsewhere does to it): R refuses the image as stale, naming the filesystem below
    dm-crypt, and boots the normal system, which finds the image INVALID(stale) and the
    writers' data whole."""
    out = _run("luks-stale", vm_assets_built, run_dir)
    assert out.event("host-changed-ciphertext") is not None, out.summary()
    assert _console_matches(
        out, r"kjumpd-rf: decision: Invalidate\(code='stale', detail='ext4 \S+ below dm-crypt"
    ), out.summary()
    assert out.verdict.get("path") == "normal-boot", out.summary()
    assert out.verdict.get("image", "").startswith("INVALID(stale"), out.summary()
    assert out.verdict.get("rf") == "invalid:stale", out.summary()
    assert out.verdict.get("writers") == "intact", out.summary()


def test_q_the_image_target_inside_luks2_is_written_through_the_volume_and_restored(
    vm_assets_built, run_dir
):
    """Ubuntu's encrypted install, with the image inside it: a partition from 1 MiB holds
    LUKS2 (its volume key in the kernel keyring), LVM inside, the target a file on ext4 on
    a two-segment LV. `kjumpctl setup` enrolls a key file in a keyslot of its own; the
    plan says the image is encrypted by the volume. The hibernation hands the volume key
    to the save kernel in memory, which rebuilds the mapping over the disk and writes
    through it: with the machine off the host finds none of the workload's bytes on either
    disk. R, seeing kjumpd's token in the LUKS2 header, asks for the volume's passphrase
    (the host types a wrong one, then the right one), unlocks, finds the target inside and
    restores; after the resume the file read through the filesystem is what its block map
    says is in the volume, the token is gone, the filesystem's file intact and fsck
    clean."""
    out = _run("luks-target", vm_assets_built, run_dir)
    # the volume key passes through the daemon and the job: neither can reach swap
    assert _console_matches(out, r"kjumpd's memory is locked until the hibernation is over"), (
        out.summary()
    )
    assert _console_matches(out, r"the save kernel's initrd is written to a ramfs"), out.summary()
    assert out.verdict.get("volume_key") == "keyring", out.summary()
    assert out.verdict.get("luks_key") == "enrolled", out.summary()
    assert out.verdict.get("keyslots") == "2", out.summary()
    assert out.verdict.get("image_encrypted_by") == "luks", out.summary()
    assert _console_matches(
        out,
        r"\[ok  \] target: \S+ \(file, .* on /dev/dm-\d+ inside LUKS volume \S+ "
        r"\(/dev/vdb1, key file /srv/kjump/luks-\S+\.key\)",
    ), out.summary()
    scanned = out.event("host-scanned-disk")
    assert scanned is not None and scanned.fields.get("plaintext") == "0", out.summary()
    assert _console_matches(out, r"LUKS volume \S+ mapped at /dev/dm-\d+"), out.summary()
    assert _console_matches(out, r"kjumpd-rf: wrong passphrase \(1 of 3\)"), out.summary()
    assert _console_matches(out, r"kjumpd-rf: LUKS volume \S+ unlocked"), out.summary()
    assert _console_matches(out, r"kjumpd-rf: decision: Restore"), out.summary()
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    assert out.verdict.get("through_mapping") == "same", out.summary()
    assert out.verdict.get("mapped_disk", "").startswith("dm-"), out.summary()
    assert out.verdict.get("luks_token") == "removed", out.summary()
    assert out.verdict.get("notes") == "intact", out.summary()
    assert out.verdict.get("fs_check") == "clean", out.summary()
    _writers_intact(out)


#: R's line when the key file the system's initramfs holds opened the target's volume
KEY_FILE_UNLOCKED = r"kjumpd-rf: /dev/vdb1 unlocked with the key file this system's initramfs holds"


def _restored_without_a_prompt(out: scenarios.Outcome, unlocked: str) -> None:
    """R unlocked the target's LUKS volume without asking (``unlocked``: its console line)
    and restored: the data whole, the target read back through its mapping, kjumpd's token
    gone from the header, the writers going on."""
    assert _console_matches(out, unlocked), out.summary()
    assert not _console_matches(out, r"kjumpd: passphrase for disk"), out.summary()
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    assert out.verdict.get("through_mapping") == "same", out.summary()
    assert out.verdict.get("luks_token") == "removed", out.summary()
    _writers_intact(out)


def test_r_unlocks_the_targets_luks2_volume_with_the_key_file_the_initramfs_holds(
    vm_assets_built, run_dir
):
    """Scenario q's machine set up as Debian's encrypted-/boot guide does: crypttab names a
    key file of the volume and cryptsetup-initramfs's KEYFILE_PATTERN puts it in the
    initramfs. The restore-first entry holds the same file (its initramfs root's alone, as
    the normal one is), so R unlocks the volume without a prompt and restores."""
    out = _run("luks-keyfile", vm_assets_built, run_dir)
    assert out.verdict.get("keyslots") == "3", out.summary()
    assert out.verdict.get("r_initrd_mode") == "600", out.summary()
    assert _console_matches(out, r"kjumpd-rf: decision: Restore"), out.summary()
    _restored_without_a_prompt(out, KEY_FILE_UNLOCKED)


def test_t_unlocks_the_targets_luks2_volume_with_the_tpm2_token_systemd_enrolled(
    vm_assets_built, run_dir
):
    """Scenario q's machine with a TPM 2.0 (swtpm, its state kept across the power cycle):
    the user enrolled the volume to the TPM with systemd-cryptenroll (PCR 7, no PIN). R
    carries cryptsetup's systemd-tpm2 plugin, unlocks the volume with the token without a
    prompt, hands the key to B and restores; A's TPM still unseals after the resume."""
    out = _run("luks-tpm2", vm_assets_built, run_dir)
    assert out.verdict.get("tpm2_token") == "enrolled", out.summary()
    assert out.verdict.get("r_token_check") == "ok", out.summary()
    assert out.verdict.get("keyslots") == "3", out.summary()
    assert _console_matches(out, r"kjumpd-rf: decision: Restore"), out.summary()
    _restored_without_a_prompt(out, r"kjumpd-rf: /dev/vdb1 unlocked with its systemd-tpm2 token")
    assert out.verdict.get("tpm_after_resume") == "unseals", out.summary()
    # the TPM started once a power-on (A, then R), never by the save kernel in either role
    for log in out.logs:
        text = log.read_text(errors="replace")
        assert len(re.findall(r"tpm_tis MSFT0101:00: 2\.0 TPM", text)) == 1, log


def test_v_the_root_filesystem_inside_luks2_holds_the_target_and_is_restored(
    vm_assets_built, run_dir
):
    """An encrypted install's layout: the root filesystem inside LUKS2 on a partition, /boot
    on a plaintext disk, the normal initramfs unlocking the root with its key file (crypttab
    + KEYFILE_PATTERN). The image target is a file on that root. kjumpd hibernates with the
    writers going on the root; R unlocks the volume with the same key file, without a prompt,
    finds the target inside it and restores; the target reads back through the filesystem
    as B wrote it, and the token is gone."""
    out = _run("luks-root", vm_assets_built, run_dir)
    assert out.verdict.get("root_on") == "luks", out.summary()
    assert out.verdict.get("luks_key") == "enrolled", out.summary()
    assert out.verdict.get("image_encrypted_by") == "luks", out.summary()
    assert out.verdict.get("r_initrd_mode") == "600", out.summary()
    # the frozen root, recorded below dm-crypt, checked in plaintext through R's mapping
    assert _console_matches(out, r"kjumpd-rf: filesystems: .*ext4 \S+ on /dev/dm-0"), out.summary()
    assert _booted_restore_first(out), out.summary()
    assert out.verdict.get("notes") == "intact", out.summary()
    _restored_without_a_prompt(out, KEY_FILE_UNLOCKED)
