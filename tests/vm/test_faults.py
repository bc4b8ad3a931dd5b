"""The VM tier's fault matrix: power cut during the save and during the restore, every
restore attempt lost, RAM changed between save and restore, a disk failing under the target.

Each case is asserted from inside the guest (its verdict after the next boot: the image
state and reason as `kjumpctl status` shows them, R's note on the normal kernel's command
line, every record the disk writers had committed before the request on the disk) and from
the disk (e2fsck after the last power-off), never by timing. A save kernel that hangs (its disk
throttled to a trickle by the host) must be reset by its hardware watchdog.

A power cut is QEMU quitting: every write the guest had issued is on the disk (the overlay
is cache=unsafe, so the guest's flushes are not what makes them durable), nothing after.
"""

from __future__ import annotations

import re

import pytest

from tests.vm import scenarios

pytestmark = pytest.mark.vm


def _console(out: scenarios.Outcome, pattern: str) -> list[re.Match[str]]:
    return out.console(pattern)


def _normal_boot_after_cut(out: scenarios.Outcome) -> None:
    """The power cut happened, the next boot was a normal one, nothing committed was lost,
    the filesystems are clean."""
    assert out.passed, out.summary()
    assert out.event("host-power-cut") is not None, out.summary()
    assert out.verdict.get("path") == "normal-boot", out.summary()  # not a restore
    assert out.verdict.get("writers") == "intact", out.summary()
    for kind in ("sqlite", "append"):
        before, after = (int(x) for x in out.verdict[kind].split("->"))
        assert after >= before > 0, out.summary()
    assert out.verdict.get("fsck") == "clean", out.summary()


@pytest.mark.parametrize("point", ["up", "start", "mid"])
def test_power_cut_during_the_save_boots_normally_and_loses_nothing(
    point: str, vm_assets_built, run_dir
) -> None:
    out = scenarios.run(f"lost-save-{point}", vm_assets_built, run_dir)
    _normal_boot_after_cut(out)
    # never restored: the header was not committed; once B began writing, R refuses it
    assert not _console(out, r"kjump-agent: RESTORED"), out.summary()
    assert not out.verdict.get("image", "").startswith(("SAVED", "RESTORING")), out.summary()
    if point != "up":
        assert out.verdict.get("image", "").startswith("INVALID(incomplete"), out.summary()
        assert out.verdict.get("rf") == "invalid:incomplete", out.summary()


def test_power_cut_during_the_restore_is_retried_and_resumes(vm_assets_built, run_dir) -> None:
    out = scenarios.run("lost-restore", vm_assets_built, run_dir)
    assert out.passed, out.summary()
    assert out.verdict.get("path") == "resumed", out.summary()
    assert out.verdict.get("image") == "CONSUMED", out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()
    assert out.verdict.get("writers") == "intact", out.summary()
    assert out.verdict.get("fsck") == "clean", out.summary()
    # two attempts cut, the third restored
    assert _console(out, r"image marked RESTORING\(3\)"), out.summary()
    assert len(_console(out, r"kjump-agent: RESTORED")) == 1, out.summary()


def test_every_restore_attempt_lost_gives_up_and_shows_why(vm_assets_built, run_dir) -> None:
    out = scenarios.run("restore-attempts", vm_assets_built, run_dir)
    _normal_boot_after_cut(out)
    assert out.verdict.get("image", "").startswith("INVALID(attempts"), out.summary()
    assert out.verdict.get("rf") == "invalid:attempts", out.summary()


def test_ram_changed_between_save_and_restore_is_refused_with_the_reason(
    vm_assets_built, run_dir
) -> None:
    out = scenarios.run("ram-changed", vm_assets_built, run_dir)
    assert out.passed, out.summary()
    assert out.verdict.get("path") == "normal-boot", out.summary()
    image = out.verdict.get("image", "")
    assert image.startswith("INVALID(memory"), out.summary()
    assert "1279_MiB" in image, out.summary()  # the reason says what the machine has now
    assert out.verdict.get("writers") == "intact", out.summary()
    assert out.verdict.get("fsck") == "clean", out.summary()


def test_write_errors_on_the_target_abort_the_save_and_roll_back(vm_assets_built, run_dir):
    out = scenarios.run("io-error-save", vm_assets_built, run_dir)
    assert out.passed, out.summary()
    assert out.verdict.get("image", "").startswith("ABORTED"), out.summary()
    assert out.verdict.get("rc") not in (None, "0"), out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()  # the system went on
    assert out.verdict.get("writers") == "intact", out.summary()
    assert out.verdict.get("fsck") == "clean", out.summary()
    assert _console(out, r"kjump-agent: save failed: .*(I/O|Input/output)"), out.summary()


def test_a_save_kernel_that_cannot_reach_the_target_says_why_and_a_rolls_back(
    vm_assets_built, run_dir
):
    """B boots without its disk driver (initcall_blacklist=virtio_blk_init), as a save
    kernel built without the target disk's controller: it cannot write the image header,
    so it says why in the answer page A lent it. A's error is B's, not a jump that failed."""
    out = scenarios.run("b-no-disk", vm_assets_built, run_dir)
    assert out.passed, out.summary()
    assert out.verdict.get("rc") not in (None, "0"), out.summary()
    assert out.verdict.get("data") == "byte-exact", out.summary()  # the system went on
    assert out.verdict.get("writers") == "intact", out.summary()
    assert out.verdict.get("fsck") == "clean", out.summary()
    assert _console(out, r"kjump-agent: save failed: the image target .* is on none of"), (
        out.summary()
    )
    assert _console(out, r"kjump-agent: the main kernel's answer page 0x[0-9a-f]+ says why"), (
        out.summary()
    )
    [result] = [r for r in out.results if r.get("result") == "failed"]
    assert result["message"].startswith("the save kernel could not save: the image target")
    assert "did not happen" not in result["message"]
    assert "driver for the target's disk" in result["message"]


def test_read_errors_on_the_target_at_restore_boot_normally(vm_assets_built, run_dir):
    out = scenarios.run("io-error-restore", vm_assets_built, run_dir)
    assert out.passed, out.summary()
    assert out.verdict.get("path") == "normal-boot", out.summary()
    assert out.verdict.get("image", "").startswith("INVALID"), out.summary()
    assert not _console(out, r"kjump-agent: RESTORED"), out.summary()  # no wrong memory
    assert out.verdict.get("writers") == "intact", out.summary()
    assert out.verdict.get("fsck") == "clean", out.summary()


def test_daemon_killed_at_each_step_and_failing_hooks_leave_nothing_behind(
    vm_assets_built, run_dir
) -> None:
    out = scenarios.run("killed-steps", vm_assets_built, run_dir)
    assert out.passed, out.summary()
    assert out.verdict.get("killed") == "5", out.summary()  # one kill per step
    assert out.verdict.get("hooks") == "refused", out.summary()
    assert out.verdict.get("rc") == "0", out.summary()  # and it still hibernates
    assert out.verdict.get("data") == "byte-exact", out.summary()
    assert out.verdict.get("writers") == "intact", out.summary()
    assert out.verdict.get("fsck") == "clean", out.summary()
    kills = _console(out, r"killed kjumpd at the start of its phase '([a-z ]+)'")
    assert [m.group(1) for m in kills] == [
        "preflight",
        "announce",
        "quiesce",
        "boot entry",
        "freeze tasks",
    ], out.summary()


def test_save_kernel_panic_resets_into_the_normal_system_undamaged(vm_assets_built, run_dir):
    out = scenarios.run("b-panic", vm_assets_built, run_dir)
    assert out.event("host-saw-b-panic") is not None, out.summary()
    assert out.passed, out.summary()
    assert out.verdict.get("path") == "normal-boot", out.summary()
    assert not out.verdict.get("image", "").startswith(("SAVED", "RESTORING")), out.summary()
    assert out.verdict.get("writers") == "intact", out.summary()
    assert out.verdict.get("fsck") == "clean", out.summary()


def test_a_hanging_save_kernel_is_reset_by_its_watchdog_and_the_normal_system_boots(
    vm_assets_built, run_dir
):
    out = scenarios.run("b-hang", vm_assets_built, run_dir)
    assert out.event("host-stalled-disk") is not None, out.summary()
    assert _console(out, r"kjump-agent: watchdog: /dev/watchdog\d? .*armed"), out.summary()
    fired = out.event("host-saw-watchdog")
    assert fired is not None and fired.fields.get("action") == "reset", out.summary()
    assert out.passed, out.summary()
    assert out.verdict.get("path") == "normal-boot", out.summary()
    assert out.verdict.get("image", "").startswith("INVALID"), out.summary()
    assert out.verdict.get("rf") == "invalid:incomplete", out.summary()
    assert out.verdict.get("writers") == "intact", out.summary()
    assert out.verdict.get("fsck") == "clean", out.summary()
