"""The save kernel's hardware watchdog: a stalled save or restore resets the machine.

A save kernel that hangs (a disk that stops answering, a driver deadlock) would otherwise
sit there until someone holds the power button. With ``kjump.watchdog=SECONDS`` on B's
command line (kjumpd's ``[save_kernel] watchdog``), the agent opens the first watchdog
device (/dev/watchdog0), sets its timeout and keeps it fed from a thread for as long as the
image keeps moving: when neither the save nor the restore has advanced for SECONDS, the
feeding stops and the hardware resets the machine within ``hardware_timeout`` more. The
restore-first entry then finds the image incomplete (WRITING: INVALID, the normal system
boots) or still RESTORING (another attempt, up to its limit).

A kernel that hangs outright stops the thread too, so the same reset covers it. Before B
jumps anywhere (back to A, or to A's restored memory) the watchdog is stopped with the
driver's magic close ('V'), so A never inherits a running timer it does not know about.

No watchdog device (none in the machine, or no driver in the save kernel): a line on the
console says a hang would need a power cycle, and nothing else changes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kjumpd.sysroot import Sysroot

log = logging.getLogger("kjumpd.agent.watchdog")

DEVICES = ("/dev/watchdog0", "/dev/watchdog")
#: the longest hardware timeout asked for: a kernel hang resets within this (plus the stall)
HARDWARE_TIMEOUT_MAX = 30
#: the shortest hardware timeout worth arming; a device that accepts nothing above is unused
HARDWARE_TIMEOUT_MIN = 2

# linux/watchdog.h: _IOR('W', 0, struct watchdog_info), _IOR('W', 4..7, int), _IOWR('W', 6, int)
WDIOC_GETSUPPORT = 0x80285700
WATCHDOG_INFO = struct.Struct("<II32s")  # options, firmware_version, identity
WDIOC_SETOPTIONS = 0x80045704
WDIOC_KEEPALIVE = 0x80045705
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707
WDIOS_DISABLECARD = 0x0001


class Device(Protocol):
    """What the feeder needs of a watchdog device (a fake in the unit tests)."""

    name: str

    def set_timeout(self, seconds: int) -> int: ...

    def keepalive(self) -> None: ...

    def disarm(self) -> None: ...


# ------------------------------------------------------------------------------------ pure


def hardware_timeouts(stall: int) -> list[int]:
    """The hardware timeouts to try, best first: the stall timeout capped at
    HARDWARE_TIMEOUT_MAX, then halved down to HARDWARE_TIMEOUT_MIN (devices differ in range:
    the i6300esb takes up to 2046 s, some iTCO generations far less)."""
    t = max(min(stall, HARDWARE_TIMEOUT_MAX), HARDWARE_TIMEOUT_MIN)
    out = [t]
    while t // 2 >= HARDWARE_TIMEOUT_MIN:
        t //= 2
        out.append(t)
    return out


def feed_interval(hardware_timeout: int) -> float:
    """How often to feed: a quarter of the hardware timeout, so a late wake-up of the feeder
    thread on a busy machine is not taken for a hang."""
    return max(hardware_timeout / 4, 0.25)


def should_feed(now: float, last_progress: float, stall: float) -> bool:
    """Feed while the work advanced within the last ``stall`` seconds."""
    return now - last_progress < stall


# ---------------------------------------------------------------------------- the edge


def identity(fd: int) -> str:
    """The driver's name for the device (WDIOC_GETSUPPORT: no sysfs attributes needed)."""
    try:
        info = fcntl.ioctl(fd, WDIOC_GETSUPPORT, bytes(WATCHDOG_INFO.size))
    except OSError:
        return "unknown"
    name = WATCHDOG_INFO.unpack(info)[2].split(b"\0", 1)[0]
    return name.decode("ascii", "replace").strip() or "unknown"


class LinuxWatchdog:
    """A /dev/watchdog* device: opening it starts the timer."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name

    @classmethod
    def open(cls, sysroot: Sysroot) -> LinuxWatchdog | None:
        for dev in DEVICES:
            try:
                fd = os.open(sysroot.path(dev), os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("%s: cannot open (%s)", dev, e.strerror or e)
                continue
            return cls(fd, f"{dev} ({identity(fd)})")
        return None

    def set_timeout(self, seconds: int) -> int:
        got = fcntl.ioctl(self.fd, WDIOC_SETTIMEOUT, struct.pack("i", seconds))
        return int(struct.unpack("i", got)[0])

    def keepalive(self) -> None:
        fcntl.ioctl(self.fd, WDIOC_KEEPALIVE, struct.pack("i", 0))

    def disarm(self) -> None:
        if self.fd < 0:
            return
        try:
            fcntl.ioctl(self.fd, WDIOC_SETOPTIONS, struct.pack("i", WDIOS_DISABLECARD))
        except OSError as e:
            if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                log.warning("%s: WDIOS_DISABLECARD failed (%s)", self.name, e.strerror or e)
        try:
            os.write(self.fd, b"V")  # the magic close: the driver stops the timer on close
        finally:
            fd, self.fd = self.fd, -1
            os.close(fd)


@dataclass
class Armed:
    hardware_timeout: int
    stall: int


class Watchdog:
    """Feeds ``device`` from a thread while ``progress()`` is called often enough."""

    def __init__(
        self,
        device: Device,
        stall: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device, self.stall, self.clock = device, stall, clock
        self.last_progress = clock()
        self.armed: Armed | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def arm(self) -> Armed | None:
        """Set the hardware timeout and start feeding; None when the device takes none."""
        for t in hardware_timeouts(self.stall):
            try:
                got = self.device.set_timeout(t)
            except OSError as e:
                log.info("%s: timeout %d s refused (%s)", self.device.name, t, e.strerror or e)
                continue
            self.armed = Armed(hardware_timeout=got or t, stall=self.stall)
            break
        if self.armed is None:
            return None
        self.progress()
        self.device.keepalive()
        self._thread = threading.Thread(target=self._feed, name="watchdog", daemon=True)
        self._thread.start()
        return self.armed

    def progress(self) -> None:
        """The work advanced (a chunk saved or restored, a phase finished)."""
        self.last_progress = self.clock()

    def _feed(self) -> None:
        assert self.armed is not None
        interval = feed_interval(self.armed.hardware_timeout)
        while not self._stop.wait(interval):
            if not should_feed(self.clock(), self.last_progress, self.stall):
                log.warning("no progress for %d s: the watchdog will reset the machine", self.stall)
                return
            try:
                self.device.keepalive()
            except OSError as e:
                log.warning("%s: keepalive failed (%s)", self.device.name, e.strerror or e)

    def disarm(self) -> None:
        """Stop feeding and stop the hardware timer (before any jump out of this kernel)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None
        try:
            self.device.disarm()
        except OSError as e:
            log.warning("%s: could not stop the watchdog (%s)", self.device.name, e.strerror or e)


def start(sysroot: Sysroot, stall: int, say: Callable[[str], None]) -> Watchdog | None:
    """Arm the first watchdog device for a stall of ``stall`` seconds (0: none)."""
    if stall <= 0:
        return None
    dev = LinuxWatchdog.open(sysroot)
    if dev is None:
        say("watchdog: no watchdog device here; a hang of this kernel needs a power cycle")
        return None
    wd = Watchdog(dev, stall)
    armed = wd.arm()
    if armed is None:
        dev.disarm()
        say(f"watchdog: {dev.name} takes no timeout; a hang of this kernel needs a power cycle")
        return None
    say(
        f"watchdog: {dev.name} armed: no progress for {stall} s resets the machine "
        f"(hardware timeout {armed.hardware_timeout} s)"
    )
    return wd


def stop_any(sysroot: Sysroot) -> None:
    """Stop a watchdog a dead agent left running (B's rescue path): open and magic close."""
    dev = LinuxWatchdog.open(sysroot)
    if dev is not None:
        try:
            dev.disarm()
        except OSError as e:
            log.warning("%s: could not stop the watchdog (%s)", dev.name, e.strerror or e)
