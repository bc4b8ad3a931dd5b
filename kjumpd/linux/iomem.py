"""The machine's RAM as the kernel reports it: /proc/iomem and /sys/firmware/memmap.

``/proc/iomem`` lists resources as ``START-END : NAME`` (hex, END inclusive); top-level lines
(no leading blank) named ``System RAM`` are the RAM the kernel manages, children (indented)
are parts of it (kernel code, the crashkernel reservation). Addresses read as 0 without root.

``/sys/firmware/memmap/N/{start,end,type}`` (CONFIG_FIRMWARE_MEMMAP) is the memory map the
firmware handed over (the e820 table on x86), before the kernel's command line (``mem=``,
``memmap=``) or its own reservations changed it: the better witness of which RAM a machine
has, so it is preferred when present.

A RamMap is what an image records about the machine it was saved on, and what the
restore-first environment compares with the machine it runs on: restoring memory into a
machine whose RAM changed (a module added or removed, a firmware setting) would write
pages where there is no RAM or leave the restored kernel blind to RAM it never knew.
Ranges are compared merged (touching ranges joined): kernels split the same RAM into
different top-level resources (setup_data, reserved pieces).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kjumpd.errors import MemoryMapError
from kjumpd.sysroot import Sysroot

IOMEM = "/proc/iomem"
FIRMWARE_MEMMAP = "/sys/firmware/memmap"
SOURCES = ("firmware", "iomem")
#: a recorded map longer than this is not a machine's (hostile or damaged input)
MAX_RANGES = 4096

Range = tuple[int, int]


def top_level(iomem: str, names: tuple[str, ...], nested: bool = False) -> list[Range]:
    """Top-level ranges of an /proc/iomem text named one of ``names``, as [start, end),
    sorted; with ``nested``, child resources (kernel code, Crash kernel, ...) too."""
    out = []
    for line in iomem.splitlines():
        if line.startswith(" ") and not nested:
            continue  # a child resource
        rng, _, name = line.strip().partition(" : ")
        if name.strip() not in names:
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


def parse_system_ram(iomem: str) -> list[Range]:
    """Top-level System RAM ranges of an /proc/iomem text as [start, end), sorted."""
    return top_level(iomem, ("System RAM",))


def read_firmware_entries(sysroot: Sysroot) -> list[tuple[int, int, str]] | None:
    """Every entry of the firmware's memory map as (start, end, type), end exclusive,
    sorted; None without the directory."""
    if not sysroot.exists(FIRMWARE_MEMMAP):
        return None
    out = []
    for n in sysroot.listdir(FIRMWARE_MEMMAP):
        t = sysroot.read_text(f"{FIRMWARE_MEMMAP}/{n}/type", default="").strip()
        try:
            s = int(sysroot.read_text(f"{FIRMWARE_MEMMAP}/{n}/start").strip(), 16)
            e = int(sysroot.read_text(f"{FIRMWARE_MEMMAP}/{n}/end").strip(), 16) + 1
        except ValueError:
            raise MemoryMapError(
                f"{FIRMWARE_MEMMAP}/{n} does not parse",
                fix="report this kernel's firmware memory map",
            ) from None
        out.append((s, e, t))
    return sorted(out)


def read_firmware_memmap(sysroot: Sysroot) -> list[Range] | None:
    """The firmware's System RAM entries as [start, end), or None without the directory."""
    entries = read_firmware_entries(sysroot)
    if entries is None:
        return None
    return [(s, e) for s, e, t in entries if t == "System RAM"]


def subtract(ranges: list[Range], cut: Range) -> list[Range]:
    """``ranges`` without the range ``cut`` (all [start, end))."""
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


def merged(ranges: list[Range]) -> list[Range]:
    """Sorted ranges with touching or overlapping ones joined."""
    out: list[Range] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


@dataclass(frozen=True)
class RamMap:
    """Which RAM a machine has, and which of the two sources said so."""

    source: str  # one of SOURCES
    ranges: tuple[Range, ...]  # merged, sorted

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise MemoryMapError(
                "a RAM map names an unknown source",
                why=f"got {str(self.source)[:40]!r}",
                fix=f"one of {', '.join(SOURCES)}",
            )
        if len(self.ranges) > MAX_RANGES:
            raise MemoryMapError("a RAM map has too many ranges", why=f"{len(self.ranges)}")
        last = -1
        for s, e in self.ranges:
            if not (type(s) is int and type(e) is int and last < s < e < 1 << 64):
                raise MemoryMapError(
                    "a RAM map's ranges are not sorted, disjoint and inside 64 bits",
                    why=f"[{s!r}, {e!r}) after end {last:#x}",
                )
            last = e

    @classmethod
    def of(cls, source: str, ranges: list[Range]) -> RamMap:
        return cls(source, tuple(merged(ranges)))

    @property
    def total(self) -> int:
        return sum(e - s for s, e in self.ranges)

    def describe(self) -> str:
        return f"{self.total >> 20} MiB of RAM in {len(self.ranges)} range(s) ({self.source} map)"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "ranges": [list(r) for r in self.ranges]}

    @classmethod
    def from_dict(cls, d: Any) -> RamMap:
        if not isinstance(d, dict) or set(d) != {"source", "ranges"}:
            raise MemoryMapError("a recorded RAM map is not {source, ranges}")
        raw = d["ranges"]
        if not isinstance(raw, list) or len(raw) > MAX_RANGES:
            raise MemoryMapError("a recorded RAM map's ranges are not a list of [start, end]")
        ranges = []
        for r in raw:
            if not isinstance(r, list) or len(r) != 2:
                raise MemoryMapError("a recorded RAM map's ranges are not a list of [start, end]")
            ranges.append((r[0], r[1]))
        return cls(d["source"], tuple(ranges))


def read(sysroot: Sysroot) -> dict[str, RamMap]:
    """Every RAM map this kernel offers, by source: /proc/iomem's when it shows RAM (it
    shows none without root or without /proc), the firmware's with its directory."""
    maps = {}
    ram = parse_system_ram(sysroot.read_text(IOMEM, default=""))
    if ram and not all(s == 0 for s, _e in ram):
        maps["iomem"] = RamMap.of("iomem", ram)
    fw = read_firmware_memmap(sysroot)
    if fw:
        maps["firmware"] = RamMap.of("firmware", fw)
    return maps


def best(maps: dict[str, RamMap]) -> RamMap:
    """The map to record: the firmware's when the kernel has it."""
    return maps.get("firmware") or maps["iomem"]


def _first_difference(a: tuple[Range, ...], b: tuple[Range, ...]) -> str:
    for x, y in zip(a, b, strict=False):
        if x != y:
            return f"[{x[0]:#x}, {x[1]:#x}) is now [{y[0]:#x}, {y[1]:#x})"
    if len(a) > len(b):
        s, e = a[len(b)]
        return f"[{s:#x}, {e:#x}) is gone"
    s, e = b[len(a)]
    return f"[{s:#x}, {e:#x}) is new"


#: The first MiB is compared by the saved extents alone, not as a map: who booted the kernel
#: changes how its map describes that MiB (a kernel started by kexec-tools, as the
#: restore-first environment starts the normal one, is handed a first range from 0x400
#: where the firmware's starts at 0), and x86 kernels keep it out of their page allocator.
LOW_MEMORY = 1 << 20


def above_low(ranges: tuple[Range, ...]) -> tuple[Range, ...]:
    """The part of a map above LOW_MEMORY."""
    return tuple((max(s, LOW_MEMORY), e) for s, e in ranges if e > LOW_MEMORY)


def changed(saved: RamMap, now: dict[str, RamMap], extents: list[Range]) -> str | None:
    """None when this machine has the RAM an image was saved on; else why not.

    Compared like with like (the same source), above LOW_MEMORY; the saved extents below it
    must lie in RAM here. When this kernel lacks the recorded source, the weaker check
    remains: every saved extent must lie in RAM here."""
    same = now.get(saved.source)
    if same is not None:
        high_saved, high_now = above_low(saved.ranges), above_low(same.ranges)
        if high_saved != high_now:
            return (
                f"saved with {saved.describe()}, this boot has {same.describe()}: "
                f"{_first_difference(high_saved, high_now)}"
            )
        low = [(s, min(e, LOW_MEMORY)) for s, e in extents if s < LOW_MEMORY]
        return outside_ram(low, {same.source: same}) if low else None
    return outside_ram(extents, now)


def outside_ram(extents: list[Range], now: dict[str, RamMap]) -> str | None:
    """None when every saved extent lies in RAM on this boot; else the first that does not."""
    if not now:
        return "this kernel reports no RAM map (/proc/iomem)"
    here = best(now)
    for s, e in extents:
        if not any(hs <= s and e <= he for hs, he in here.ranges):
            return f"saved memory [{s:#x}, {e:#x}) is not RAM here ({here.describe()})"
    return None
