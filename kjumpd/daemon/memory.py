"""The memory extent list: which physical ranges of A the save kernel saves.

System RAM comes from the top-level "System RAM" lines of /proc/iomem (addresses need
root), page aligned inwards, minus the jump area (B's own memory: never saved, never
written back). Cross-checked with /sys/firmware/memmap when the kernel provides it
(CONFIG_FIRMWARE_MEMMAP): every saved range must lie inside a firmware "System RAM" entry.
The excluded ranges are listed with their reason so what B must not write back is explicit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kjumpd.daemon.jumparea import JumpArea
from kjumpd.errors import MemoryMapError
from kjumpd.sysroot import Sysroot

PAGE = 4096


@dataclass(frozen=True)
class Excluded:
    start: int
    end: int
    reason: str


@dataclass(frozen=True)
class MemoryPlan:
    ranges: list[tuple[int, int]]  # [start, end) to save, sorted
    excluded: list[Excluded] = field(default_factory=list)
    firmware_checked: bool = False

    @property
    def total(self) -> int:
        return sum(e - s for s, e in self.ranges)


def parse_system_ram(iomem: str) -> list[tuple[int, int]]:
    """Top-level System RAM ranges as [start, end) (end exclusive, as read)."""
    out = []
    for line in iomem.splitlines():
        if line.startswith(" "):
            continue  # a child resource (kernel code, Crash kernel, ...)
        rng, _, name = line.partition(" : ")
        if name.strip() != "System RAM":
            continue
        s, _, e = rng.strip().partition("-")
        try:
            out.append((int(s, 16), int(e, 16) + 1))
        except ValueError:
            raise MemoryMapError(
                "/proc/iomem has a line that does not parse",
                why=repr(line),
                fix="report this kernel's /proc/iomem",
            ) from None
    return sorted(out)


def parse_firmware_memmap(sysroot: Sysroot) -> list[tuple[int, int]] | None:
    base = "/sys/firmware/memmap"
    if not sysroot.exists(base):
        return None
    out = []
    for n in sysroot.listdir(base):
        t = sysroot.read_text(f"{base}/{n}/type", default="").strip()
        if t != "System RAM":
            continue
        s = int(sysroot.read_text(f"{base}/{n}/start").strip(), 16)
        e = int(sysroot.read_text(f"{base}/{n}/end").strip(), 16) + 1
        out.append((s, e))
    return sorted(out)


def subtract(ranges: list[tuple[int, int]], cut: tuple[int, int]) -> list[tuple[int, int]]:
    out = []
    cs, ce = cut
    for s, e in ranges:
        if e <= cs or ce <= s:
            out.append((s, e))
            continue
        if s < cs:
            out.append((s, cs))
        if ce < e:
            out.append((ce, e))
    return out


def plan(
    ram: list[tuple[int, int]], area: JumpArea, firmware: list[tuple[int, int]] | None
) -> MemoryPlan:
    """Pure: RAM ranges -> what to save and what is excluded, with reasons."""
    if not ram:
        raise MemoryMapError(
            "no System RAM found in /proc/iomem",
            why="the file is empty or hides addresses (not root)",
            fix="run kjumpd as root",
        )
    excluded: list[Excluded] = []
    aligned = []
    for s, e in ram:
        a, b = -(-s // PAGE) * PAGE, e // PAGE * PAGE
        if a > s:
            excluded.append(Excluded(s, min(a, e), "partial page at the start of a RAM range"))
        if b < e and b >= a:
            excluded.append(Excluded(b, e, "partial page at the end of a RAM range"))
        if a < b:
            aligned.append((a, b))
    if not any(s <= area.start and area.end <= e for s, e in aligned):
        raise MemoryMapError(
            "the jump area is not inside System RAM",
            why=f"[{area.start:#x}, {area.end:#x}) is not in any RAM range",
            fix="check the crashkernel= reservation",
        )
    ranges = subtract(aligned, (area.start, area.end))
    excluded.append(
        Excluded(
            area.start,
            area.end,
            "jump area: the save kernel's own memory, never saved or written back",
        )
    )
    if firmware is not None:
        for s, e in ranges:
            if not any(fs <= s and e <= fe for fs, fe in firmware):
                raise MemoryMapError(
                    "/proc/iomem and /sys/firmware/memmap disagree",
                    why=f"System RAM [{s:#x}, {e:#x}) is not firmware RAM",
                    fix="report this machine's memory maps; hibernation is not safe on it",
                )
    return MemoryPlan(
        ranges=ranges,
        excluded=sorted(excluded, key=lambda x: x.start),
        firmware_checked=firmware is not None,
    )


def build(sysroot: Sysroot, area: JumpArea) -> MemoryPlan:
    iomem = sysroot.read_text("/proc/iomem")
    ram = parse_system_ram(iomem)
    if ram and all(s == 0 and e == 1 for s, e in ram):
        raise MemoryMapError(
            "/proc/iomem hides its addresses", why="not running as root", fix="run kjumpd as root"
        )
    return plan(ram, area, parse_firmware_memmap(sysroot))
