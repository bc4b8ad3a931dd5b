"""The memory extent list: which physical ranges of A the save kernel saves.

System RAM comes from the top-level "System RAM" lines of /proc/iomem (addresses need
root), page aligned inwards, minus the jump area (B's own memory: never saved, never
written back). Cross-checked with /sys/firmware/memmap when the kernel provides it
(CONFIG_FIRMWARE_MEMMAP): every saved range must lie inside a firmware "System RAM" entry.
The excluded ranges are listed with their reason so what B must not write back is explicit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kjumpd.daemon.jumparea import JumpArea
from kjumpd.errors import MemoryMapError
from kjumpd.linux import iomem
from kjumpd.linux.iomem import RamMap, parse_system_ram
from kjumpd.sysroot import Sysroot

__all__ = ["Excluded", "MemoryPlan", "build", "parse_system_ram", "plan"]

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
    #: the machine's RAM as recorded in the image (the restore-first environment compares it)
    ram_map: RamMap | None = None

    @property
    def total(self) -> int:
        return sum(e - s for s, e in self.ranges)


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
    ranges = iomem.subtract(aligned, (area.start, area.end))
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
    ram = parse_system_ram(sysroot.read_text(iomem.IOMEM))
    if ram and all(s == 0 and e == 1 for s, e in ram):
        raise MemoryMapError(
            "/proc/iomem hides its addresses", why="not running as root", fix="run kjumpd as root"
        )
    firmware = iomem.read_firmware_memmap(sysroot)
    out = plan(ram, area, firmware)
    maps = {"iomem": RamMap.of("iomem", ram)}
    if firmware is not None:
        maps["firmware"] = RamMap.of("firmware", firmware)
    return replace(out, ram_map=iomem.best(maps))
