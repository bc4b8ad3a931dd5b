"""Quiesce devices through sysfs: plan (pure), apply (journaled), undo (reverse).

Policy (from [quiesce] in the config):
* runtime PM: every device whose power/control is "auto" (and whose runtime_status is not
  "unsupported") is set to "on", so no device runtime-suspends around the jump and the
  save kernel finds it powered;
* wake-up sources (``disable_wakeup``): power/wakeup "enabled" -> "disabled", except the
  devices named in ``keep_wakeup`` (sysfs name or path suffix) and, in suspend mode, the
  RTC that must wake the machine for the battery check;
* network links (``network_down``): interfaces with IFF_UP in /sys/class/net/X/flags get it
  cleared (links down), restored afterwards; loopback is left alone;
* quirks (``[[quiesce.unbind]]``): a device bound to the named driver is unbound through
  /sys/bus/BUS/drivers/DRIVER/unbind and bound again through .../bind.

Devices come from a walk of /sys/devices that keeps what udev enumerates (a uevent file
and a subsystem link; tests/sysroot/test_steps.py checks it gives pyudev's set on the real
root). pyudev is not used here and the walk is one scandir per directory: planning is a
few hundred sysfs reads, and through pyudev/pathlib each costs far more than the read
itself. Attributes (paths mapped by the Sysroot) are read only when their power/ directory
lists them, power/control only where runtime_status is not "unsupported" (one read for most
devices), by real path (no Path per read). Every write is
recorded (with the value it replaced) before the next one, in memory and in
/run/kjumpd/quiesce.journal, and undone in reverse.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from kjumpd.daemon.config import Config
from kjumpd.errors import KjumpError, QuiesceError
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

JOURNAL = "/run/kjumpd/quiesce.journal"
IFF_UP = 0x1


@dataclass(frozen=True)
class Write:
    path: str  # sysfs path written
    value: str
    undo_path: str  # where the undo writes (same path, or .../bind)
    undo_value: str
    why: str

    def describe(self) -> str:
        return (
            f"{self.path} <- {self.value!r}  "
            f"(undo: {self.undo_path} <- {self.undo_value!r}; {self.why})"
        )


@dataclass
class Plan:
    writes: list[Write] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    devices: int = 0  # device directories enumerated
    scan_seconds: float = 0.0  # time spent enumerating them (the rest of plan() is reads)

    def describe(self) -> str:
        lines = [w.describe() for w in self.writes]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines) if lines else "(nothing to do)"


def _scan(real: str, out: list[tuple[str, frozenset[str]]]) -> None:
    """Append (real path, names in its power/ directory) for each device dir under real."""
    try:
        with os.scandir(real) as it:
            entries = {e.name: e for e in it}
    except OSError:
        return
    sub = entries.get("subsystem")
    if "uevent" in entries and sub is not None and sub.is_symlink():
        power = entries.get("power")
        attrs: frozenset[str] = frozenset()
        if power is not None and power.is_dir(follow_symlinks=False):
            try:
                attrs = frozenset(os.listdir(power.path))
            except OSError:
                pass
        out.append((real, attrs))
    for name, e in entries.items():
        if name != "power" and e.is_dir(follow_symlinks=False):
            _scan(e.path, out)


def scan(sysroot: Sysroot) -> list[tuple[str, frozenset[str]]]:
    """(real path, power/ attribute names) of every device directory under /sys/devices,
    unsorted: the enumeration plan() needs (it depends on which devices exist, not on their
    state: a caller may make it a moment earlier)."""
    out: list[tuple[str, frozenset[str]]] = []
    _scan(str(sysroot.path("/sys/devices")), out)
    return out


def _unmapper(sysroot: Sysroot) -> Callable[[str], str]:
    """real path -> system path, by string (Sysroot.unmap builds two Paths a call)."""
    root = str(sysroot.path("/"))
    if root == "/":
        return lambda real: real
    n = len(root.rstrip("/"))
    return lambda real: real[n:] or "/"


def devices(sysroot: Sysroot) -> list[tuple[str, frozenset[str]]]:
    """(system path, power/ attribute names) of every device directory under /sys/devices
    (what udev enumerates: directories with a uevent file and a subsystem link), sorted."""
    unmap = _unmapper(sysroot)
    return sorted((unmap(real), attrs) for real, attrs in scan(sysroot))


def device_dirs(sysroot: Sysroot) -> list[str]:
    """System paths of every device directory under /sys/devices."""
    return [dev for dev, _ in devices(sysroot)]


def _read(real: str) -> str:
    """A sysfs attribute's text by real path, "" when it cannot be read (a plain read: a
    fraction of a pathlib one, which counts over the ~1000 reads of a plan)."""
    try:
        fd = os.open(real, os.O_RDONLY)
    except OSError:
        return ""
    try:
        return os.read(fd, 4096).decode(errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def _attr(sysroot: Sysroot, path: str) -> str:
    """A sysfs attribute's text by system path, "" when it cannot be read."""
    return _read(str(sysroot.path(path)))


def _rtc_device(sysroot: Sysroot) -> str | None:
    link = sysroot.path("/sys/class/rtc/rtc0/device")
    if not link.exists():
        return None
    return sysroot.unmap(os.path.realpath(link))


def _kept(dev: str, keep: tuple[str, ...]) -> bool:
    return any(
        dev == k or dev.endswith("/" + k.strip("/")) or os.path.basename(dev) == k for k in keep
    )


def plan(
    sysroot: Sysroot,
    config: Config,
    mode: str,
    found: list[tuple[str, frozenset[str]]] | None = None,
) -> Plan:
    """What quiesce would write, read from the current sysfs state (no writes). ``found``:
    a scan() made moments earlier (the attributes are read here, now, either way)."""
    p = Plan()
    rtc = _rtc_device(sysroot) if mode == "suspend" else None
    t0 = time.monotonic()
    if found is None:
        found = scan(sysroot)
    p.devices, p.scan_seconds = len(found), time.monotonic() - t0
    unmap = _unmapper(sysroot)
    for real, attrs in sorted(found):
        dev = ""
        # runtime_status first: most devices (all virtual ones) have no runtime PM and say
        # "unsupported", which settles them in one read instead of two (control is "auto"
        # by default everywhere)
        if (
            config.runtime_pm_on
            and "control" in attrs
            and (
                "runtime_status" not in attrs
                or _read(real + "/power/runtime_status").strip() != "unsupported"
            )
        ):
            raw = _read(real + "/power/control")
            if raw.strip() == "auto":
                dev = unmap(real)
                p.writes.append(
                    Write(
                        f"{dev}/power/control",
                        "on",
                        f"{dev}/power/control",
                        raw,
                        "runtime PM off around the jump",
                    )
                )
        if config.disable_wakeup and "wakeup" in attrs:
            raw = _read(real + "/power/wakeup")
            dev = dev or unmap(real)
            if raw.strip() == "enabled":
                if _kept(dev, config.keep_wakeup):
                    p.notes.append(f"{dev} keeps wake-up (keep_wakeup)")
                elif rtc and (dev == rtc or rtc.startswith(dev + "/")):
                    p.notes.append(f"{dev} keeps wake-up (RTC alarm for the battery check)")
                else:
                    p.writes.append(
                        Write(
                            f"{dev}/power/wakeup",
                            "disabled",
                            f"{dev}/power/wakeup",
                            raw,
                            "wake-up source",
                        )
                    )
    if config.network_down:
        for ifname in sysroot.listdir("/sys/class/net"):
            if ifname == "lo":
                continue
            raw = sysroot.read_text(f"/sys/class/net/{ifname}/flags", default="")
            try:
                flags = int(raw.strip(), 16)
            except ValueError:
                continue
            if flags & IFF_UP:
                path = f"/sys/class/net/{ifname}/flags"
                p.writes.append(Write(path, hex(flags & ~IFF_UP), path, raw, f"link {ifname} down"))
    for q in config.unbind:
        drv = f"/sys/bus/{q.bus}/devices/{q.device}/driver"
        link = sysroot.path(drv)
        if not link.exists():
            p.notes.append(f"quirk {q.bus}/{q.device}: no driver bound, nothing to unbind")
            continue
        bound = os.path.basename(os.path.realpath(link))
        if bound != q.driver:
            p.notes.append(
                f"quirk {q.bus}/{q.device}: bound to {bound}, not {q.driver}; left alone"
            )
            continue
        base = f"/sys/bus/{q.bus}/drivers/{q.driver}"
        p.writes.append(
            Write(f"{base}/unbind", q.device, f"{base}/bind", q.device, f"quirk: unbind {q.driver}")
        )
    return p


class Journal:
    """Applied writes, newest last; mirrored to /run/kjumpd/quiesce.journal."""

    def __init__(self, sysroot: Sysroot) -> None:
        self.sysroot = sysroot
        self.done: list[Write] = []
        self._file = sysroot.path(JOURNAL)

    def record(self, w: Write) -> None:
        self.done.append(w)
        self._file.parent.mkdir(parents=True, exist_ok=True)
        with open(self._file, "a") as f:
            if not self.done[:-1]:
                # whose journal it is: a later kjumpd leaves a living owner's writes alone
                f.write(json.dumps({"owner": os.getpid()}) + "\n")
            f.write(json.dumps(asdict(w)) + "\n")

    def clear(self) -> None:
        self.done.clear()
        try:
            self._file.unlink()
        except FileNotFoundError:
            pass


def apply(sysroot: Sysroot, p: Plan, journal: Journal) -> None:
    """Write each step in order, journaling it; on failure undo what was done and raise."""
    for w in p.writes:
        try:
            sysroot.write_text(w.path, w.value)
        except KjumpError as e:
            errors = undo(sysroot, journal)
            raise QuiesceError(
                f"quiesce step failed: {w.path}",
                why=e.why or e.message,
                fix="add the device to keep_wakeup or fix the quirk list; "
                "undo " + ("failed for: " + "; ".join(errors) if errors else "completed"),
                path=w.path,
            ) from None
        journal.record(w)


def recover(sysroot: Sysroot) -> list[str]:
    """Undo the writes a kjumpd that died between quiesce and its undo left in the journal
    (at start-up and in ``kjumpd --recover``); a journal whose owner still runs is left to
    it. Lines that do not parse, or that would write outside /sys, are skipped with a log
    line. Returns what could not be undone."""
    from kjumpd.daemon.taskfreeze import pid_alive

    text = sysroot.read_text(JOURNAL, default="")
    if not text:
        return []
    journal = Journal(sysroot)
    for line in text.splitlines():
        try:
            d = json.loads(line)
            if "owner" in d:
                owner = int(d["owner"])
                if owner != os.getpid() and pid_alive(sysroot, owner):
                    log.info("kjumpd (pid %d) has devices quiesced: it undoes them", owner)
                    return []
                continue
            w = Write(**d)
        except (ValueError, TypeError) as e:
            log.warning("quiesce journal: skipped a line that does not parse (%s)", e)
            continue
        if not all(isinstance(v, str) for v in asdict(w).values()) or not w.undo_path.startswith(
            "/sys/"
        ):
            log.warning("quiesce journal: skipped a write outside /sys: %r", w.undo_path[:80])
            continue
        journal.done.append(w)
    log.warning("undoing %d device write(s) an earlier kjumpd left", len(journal.done))
    return undo(sysroot, journal)


def undo(sysroot: Sysroot, journal: Journal) -> list[str]:
    """Undo every journaled write in reverse; returns the failures (all are attempted)."""
    errors = []
    for w in reversed(journal.done):
        try:
            sysroot.write_text(w.undo_path, w.undo_value)
        except KjumpError as e:
            errors.append(f"{w.undo_path}: {e.why or e.message}")
    journal.clear()
    for e in errors:
        log.error("quiesce undo failed: %s", e)
    return errors
