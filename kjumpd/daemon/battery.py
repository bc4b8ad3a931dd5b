"""Battery state from /sys/class/power_supply and the time until it reaches a floor.

The same figures psutil.sensors_battery() derives (energy_now/power_now, or
charge_now/current_now), read through the Sysroot so tests can give a battery to a fake
tree. Used by the suspend-to-both policy in kjumpd.daemon.platform.
"""

from __future__ import annotations

from dataclasses import dataclass

from kjumpd.sysroot import Sysroot

PS = "/sys/class/power_supply"


@dataclass(frozen=True)
class Battery:
    present: bool
    on_ac: bool
    percent: float | None
    discharging: bool
    seconds_left: float | None  # until empty, at the present drain

    def seconds_to_floor(self, floor_percent: float) -> float | None:
        """Seconds until ``floor_percent``; None when not discharging or unknown;
        0 when already at or below it."""
        if not self.present or self.on_ac or not self.discharging or self.percent is None:
            return None
        if self.percent <= floor_percent:
            return 0.0
        if self.seconds_left is None or self.percent <= 0:
            return None
        return self.seconds_left * (self.percent - floor_percent) / self.percent


def _num(sysroot: Sysroot, path: str) -> int | None:
    v = sysroot.read_text(path, default="").strip()
    try:
        return int(v)
    except ValueError:
        return None


def read(sysroot: Sysroot) -> Battery:
    on_ac = False
    bats = []
    for name in sysroot.listdir(PS):
        base = f"{PS}/{name}"
        kind = sysroot.read_text(f"{base}/type", default="").strip()
        if kind == "Mains" and _num(sysroot, f"{base}/online") == 1:
            on_ac = True
        elif kind == "Battery" and _num(sysroot, f"{base}/present") != 0:
            if sysroot.read_text(f"{base}/scope", default="").strip() == "Device":
                continue  # a mouse's battery, not the machine's
            bats.append(base)
    if not bats:
        return Battery(False, on_ac, None, False, None)
    base = bats[0]
    status = sysroot.read_text(f"{base}/status", default="").strip()
    now = _num(sysroot, f"{base}/energy_now")
    full = _num(sysroot, f"{base}/energy_full")
    rate = _num(sysroot, f"{base}/power_now")
    if now is None:
        now = _num(sysroot, f"{base}/charge_now")
        full = _num(sysroot, f"{base}/charge_full")
        rate = _num(sysroot, f"{base}/current_now")
    percent: float | None
    if now is not None and full:
        percent = min(100.0, 100.0 * now / full)
    else:
        cap = _num(sysroot, f"{base}/capacity")
        percent = float(cap) if cap is not None else None
    discharging = status == "Discharging"
    if status in ("Charging", "Full") or status == "Not charging":
        on_ac = True
    left = None
    if discharging and now is not None and rate:
        left = now / abs(rate) * 3600.0
    return Battery(True, on_ac, percent, discharging, left)
