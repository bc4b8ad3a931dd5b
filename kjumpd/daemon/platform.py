"""Leaving the main kernel after an image is SAVED: S4, power-off, reboot, S3, RTC alarm.

* platform (ACPI S4): /dev/snapshot, SNAPSHOT_PLATFORM_SUPPORT(1) then SNAPSHOT_POWER_OFF:
  hibernation_platform_enter() without any kernel image (kernel/power/user.c).
* shutdown / reboot: "o" / "b" written to /proc/sysrq-trigger: kernel_power_off() or an
  emergency restart straight from the kernel, no userspace shutdown, the filesystems stay
  frozen (the image is already durable). Going through a /proc file keeps this on the
  Sysroot (a fake tree records the request instead of powering the test machine off).
* suspend (S3): "mem" to /sys/power/state; the write returns after the wake.
* RTC: /sys/class/rtc/rtc0/wakealarm (seconds since the epoch, "0" clears) and since_epoch.

Each entry that "returns" after ``settle`` seconds did not leave the kernel: it raises
PlatformError, and the transaction invalidates the image and rolls back.
The suspend-to-both decision is a pure function (:func:`decide`) over the battery and the
RTC; :func:`suspend_to_both` is its thin loop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from kjumpd.daemon import battery as batterymod
from kjumpd.errors import KjumpError, PlatformError
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

SNAPSHOT_PLATFORM_SUPPORT = 0x330F  # _IO('3', 15)
SNAPSHOT_POWER_OFF = 0x3310  # _IO('3', 16)
RTC = "/sys/class/rtc/rtc0"


def enter_s4(sysroot: Sysroot, settle: float) -> None:
    try:
        fd = os.open(sysroot.path("/dev/snapshot"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise PlatformError(
            "cannot open /dev/snapshot for ACPI S4",
            why=e.strerror or str(e),
            fix="enable CONFIG_HIBERNATION_SNAPSHOT_DEV or use mode shutdown",
        ) from None
    try:
        fcntl.ioctl(fd, SNAPSHOT_PLATFORM_SUPPORT, 1)
        fcntl.ioctl(fd, SNAPSHOT_POWER_OFF, 0)
    except OSError as e:
        raise PlatformError(
            "the kernel refused to enter ACPI S4",
            why=e.strerror or str(e),
            fix="check /sys/power/disk lists 'platform', or use mode shutdown",
        ) from None
    finally:
        os.close(fd)
    time.sleep(settle)
    raise PlatformError(
        "ACPI S4 was requested but the machine is still running",
        fix="use mode shutdown on this machine",
    )


def _sysrq(sysroot: Sysroot, key: str, what: str, settle: float) -> None:
    try:
        sysroot.write_text("/proc/sysrq-trigger", key)
    except KjumpError as e:
        raise PlatformError(
            f"cannot {what}",
            why=e.why or e.message,
            fix="enable CONFIG_MAGIC_SYSRQ, or use mode platform",
        ) from None
    time.sleep(settle)
    raise PlatformError(
        f"{what} was requested but the machine is still running",
        fix="check dmesg; use another mode",
    )


def power_off(sysroot: Sysroot, settle: float) -> None:
    _sysrq(sysroot, "o", "power off", settle)


def reboot(sysroot: Sysroot, settle: float) -> None:
    _sysrq(sysroot, "b", "reboot", settle)


def suspend_to_ram(sysroot: Sysroot) -> None:
    states = sysroot.read_text("/sys/power/state", default="").split()
    if "mem" not in states:
        raise PlatformError(
            "suspend to RAM is not available",
            why=f"/sys/power/state offers {states or 'nothing'}",
            fix="use mode platform or shutdown",
        )
    try:
        sysroot.write_text("/sys/power/state", "mem")
    except KjumpError as e:
        raise PlatformError(
            "suspend to RAM failed",
            why=e.why or e.message,
            fix="check dmesg for the device that refused to suspend",
        ) from None


def rtc_now(sysroot: Sysroot) -> int:
    v = sysroot.read_text(f"{RTC}/since_epoch", default="").strip()
    if not v.isdigit():
        raise PlatformError(
            "the RTC cannot be read",
            why=f"{RTC}/since_epoch is missing",
            fix="enable CONFIG_RTC_DRV_CMOS (or your RTC driver)",
        )
    return int(v)


def rtc_arm(sysroot: Sysroot, at: int) -> None:
    try:
        sysroot.write_text(f"{RTC}/wakealarm", "0")
        sysroot.write_text(f"{RTC}/wakealarm", str(at))
    except KjumpError as e:
        raise PlatformError(
            "cannot set the RTC wake alarm",
            why=e.why or e.message,
            fix="check that rtc0 supports alarms",
        ) from None


def rtc_clear(sysroot: Sysroot) -> None:
    try:
        sysroot.write_text(f"{RTC}/wakealarm", "0")
    except KjumpError as e:
        log.warning("cannot clear the RTC alarm: %s", e.message)


# -- suspend to both ----------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    action: str  # "sleep" (S3, alarm at .alarm or none), "poweroff", "woke"
    alarm: int | None = None
    why: str = ""


def decide(
    bat: batterymod.Battery, now: int, floor: float, min_rearm: int, last_alarm: int | None
) -> Decision:
    """Pure: what to do now. ``last_alarm`` is the alarm of the S3 we just left (None before
    the first sleep). A wake before the alarm is the user's: the image is dropped."""
    if last_alarm is not None and now < last_alarm:
        return Decision("woke", why="woken before the battery alarm: the user is back")
    secs = bat.seconds_to_floor(floor)
    if secs is None:
        why = "on AC" if bat.on_ac else ("no battery" if not bat.present else "no estimate")
        return Decision("sleep", None, why=f"{why}: stay in RAM")
    if secs <= 0:
        return Decision(
            "poweroff",
            why=f"battery at {bat.percent:.0f}% <= floor {floor:g}%: "
            "power off (the image is saved)",
        )
    return Decision(
        "sleep", now + max(int(secs), min_rearm), why=f"battery reaches {floor:g}% in {int(secs)} s"
    )


def suspend_to_both(
    sysroot: Sysroot,
    floor: float,
    min_rearm: int,
    settle: float,
    on_decision: Callable[[Decision], None] | None = None,
) -> str:
    """Sleep in RAM with the image saved. Returns "woke" (the user woke the machine: the
    caller invalidates the image and thaws). Powers off when the battery runs low."""
    last_alarm: int | None = None
    while True:
        d = decide(batterymod.read(sysroot), rtc_now(sysroot), floor, min_rearm, last_alarm)
        log.info("suspend-to-both: %s (%s)", d.action, d.why)
        if on_decision:
            on_decision(d)
        if d.action == "woke":
            if last_alarm is not None:
                rtc_clear(sysroot)
            return "woke"
        if d.action == "poweroff":
            power_off(sysroot, settle)
        if d.alarm is not None:
            rtc_arm(sysroot, d.alarm)
        suspend_to_ram(sysroot)
        if d.alarm is None:
            return "woke"
        last_alarm = d.alarm
