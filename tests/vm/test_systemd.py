"""Scenario s: the path most users take. Debian's systemd is PID 1 (journald, logind, udev),
the kernel command line is a distribution's (KASLR on, no crashkernel= until the install
adds one), and kjumpd is installed the way the README says: pip installs the wheel,
`kjumpctl setup --target`, `kjumpctl install --save-kernel`, reboot, `kjumpctl install`,
`kjumpctl check`; logind's CanHibernate says "na" while check fails (no restore-first entry
yet) and "yes" once it passes. Then hibernation is asked of systemd (`systemctl hibernate`)
and of logind (login1's Hibernate through busctl, what desktops call): each powers the
machine off, the boot loader's default entry (restore-first) restores it, and the system is
running with no failed unit, the journal has the hibernation, the workload and disk writers
went on, a user's system-sleep hook ran once each way and a delay inhibitor was told first.
Then a kernel package is installed (Debian's postinst.d hooks), the command line changed, and
the boot loader's crashkernel= edited (first too small: check fails for the next boot; then
larger: install keeps it): `kjumpctl check` follows each, one more hibernation restores, and
a boot with no image starts the new kernel with the current command line and the new jump
area, placed anew by the kernel. There one more hibernation restores through that area,
`systemctl hybrid-sleep` saves an image and sleeps in RAM (the host wakes the guest: the
image is discarded), and `systemctl suspend-then-hibernate` does the same but the power is
lost in RAM (the host cuts it: the next boot restores the image).
"""

from __future__ import annotations

import pytest

from tests.vm import scenarios

pytestmark = pytest.mark.vm


def test_s_systemd_machine_installed_by_the_readme_hibernates_through_systemctl_and_logind(
    vm_assets_built, run_dir
):
    out = scenarios.run_systemd(vm_assets_built, run_dir)
    assert out.passed, out.summary()
    boots = [e for e in out.events if e.name == "sd-boot"]
    stages = [e.fields.get("stage") for e in boots]
    assert stages == ["install", "cycles", "moved"], out.summary()
    assert all(e.fields.get("pid1") == "systemd" for e in boots), out.summary()
    assert all(e.fields.get("kaslr") == "on" for e in boots), out.summary()
    # the install put a reservation the kernel places on the boot loader's command line,
    # and the host booted it as GRUB would
    installed = out.event("sd-installed")
    assert installed is not None, out.summary()
    size = installed.fields.get("grub_crashkernel", "none")
    assert size != "none" and "@" not in size, out.summary()
    a = out.event("host-boots-A")
    assert a is not None and f"crashkernel={size}" in a.fields.get("append", ""), out.summary()
    # three hibernations restored through the restore-first entry, one boot with none, then
    # two more restores (hibernate, suspend-then-hibernate with the power lost in RAM)
    assert len([e for e in out.events if e.name == "host-boots-R"]) == 6, out.summary()
    assert len([e for e in out.events if e.name == "host-wakeup"]) == 1, out.summary()
    assert len([e for e in out.events if e.name == "host-power-lost"]) == 1, out.summary()
    v = out.verdict
    # logind offered hibernation exactly when kjumpctl check passed
    assert v.get("can_hibernate_before") == "na", out.summary()
    assert v.get("can_hibernate") == "yes", out.summary()
    for how in ("systemctl", "login1", "upgraded", "moved", "hybrid", "then-hibernate"):
        want = "INVALID" if how == "hybrid" else "CONSUMED"  # woken from RAM: discarded
        assert v.get(f"image_{how}", "").startswith(want), out.summary()
        assert v.get(f"system_{how}") == "running", out.summary()
        assert v.get(f"journal_{how}") == "recorded", out.summary()
        assert v.get(f"writers_{how}") == "intact", out.summary()
    assert v.get("data") == "byte-exact", out.summary()
    assert v.get("kjumpd_restarts") == "0", out.summary()  # Type=notify, watchdog: no restart
    # the kernel hook pointed the entry at the new kernel; a changed command line made
    # check fail until the entry was refreshed; R then booted the new kernel with it
    assert v.get("entry_kernel", "").endswith("-kjumpvm"), out.summary()
    assert v.get("check_stale_cmdline") not in (None, "rc0"), out.summary()
    assert v.get("cmdline") == "current", out.summary()
    upgraded = out.event("sd-upgraded")
    assert upgraded is not None, out.summary()
    booted = out.console(r"kjumpd-rf: \$ kexec -l --no-checks \S+ --append=(.*)")
    assert booted and "kjumpvm.cmdline=changed" in booted[-1].group(1), out.summary()
    # a boot loader asking for too small a jump area failed check; a larger one was kept,
    # booted, reserved where the kernel placed it, and R restored into it
    assert v.get("check_small_area") == "rc3", out.summary()
    assert v.get("check_bigger_area") not in (None, "rc0"), out.summary()
    assert v.get("grub_crashkernel") == "160M", out.summary()
    moved = next(e for e in boots if e.fields.get("stage") == "moved")
    assert int(moved.fields.get("jump_size", "0"), 16) == 160 << 20, out.summary()
    # five restores (by R in one boot, or by the save kernel R loaded), the last two from
    # the moved area
    ran = out.console(r"kjump-agent: restoring \d+ MiB .*this kernel runs in .*\[(0x[0-9a-f]+), ")
    assert len(ran) == 5, out.summary()
    area = int(moved.fields["jump_area"], 16)
    assert all(int(m.group(1), 16) == area for m in ran[3:]), out.summary()
    assert v.get("fsck") == "clean", out.summary()
