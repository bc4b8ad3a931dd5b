"""The machine's RAM map (kjumpd/linux/iomem.py) and the restore-first guard built on it:
an image saved on other RAM is refused, with a reason that says what changed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.errors import MemoryMapError
from kjumpd.linux.iomem import RamMap, changed, merged, outside_ram, parse_system_ram, read
from kjumpd.restore.decision import Invalidate, Restore, check_ram, decide
from kjumpd.sysroot import Sysroot
from tests.unit.test_restorefirst import AREA, EXP, evidence, header

IOMEM = """00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000f0000-000fffff : Reserved
00100000-1fffffff : System RAM
  01000000-01ffffff : Kernel code
20000000-27ffffff : System RAM
  20000000-27ffffff : Crash kernel
28000000-3ffdffff : System RAM
"""
GIB = 1 << 30


def test_iomem_ram_is_merged_and_children_ignored() -> None:
    ram = parse_system_ram(IOMEM)
    assert ram[0] == (0x1000, 0x9FC00)
    m = RamMap.of("iomem", ram)
    # three touching top-level ranges are one: kernels split the same RAM differently
    assert m.ranges == ((0x1000, 0x9FC00), (0x100000, 0x3FFE0000))


def test_same_ram_passes_and_more_ram_is_named() -> None:
    saved = RamMap.of("iomem", parse_system_ram(IOMEM))
    assert changed(saved, {"iomem": saved}, []) is None
    bigger = RamMap.of("iomem", [(0x1000, 0x9FC00), (0x100000, 0x4FFE0000)])
    why = changed(saved, {"iomem": bigger}, [])
    assert why is not None and "1023 MiB" in why and "1279 MiB" in why
    assert "[0x100000, 0x3ffe0000) is now [0x100000, 0x4ffe0000)" in why


def test_without_the_recorded_source_the_extents_must_be_ram() -> None:
    saved = RamMap.of("firmware", [(0x1000, 0x9FC00), (0x100000, GIB)])
    here = {"iomem": RamMap.of("iomem", [(0x100000, GIB // 2)])}
    assert changed(saved, here, [(0x100000, 0x200000)]) is None
    why = changed(saved, here, [(0x100000, GIB)])
    assert why is not None and "is not RAM here" in why
    assert outside_ram([(0, 1)], {}) is not None  # no map at all: not RAM as far as known


def test_a_ram_map_refuses_what_no_machine_has() -> None:
    for bad in (
        {"source": "bios", "ranges": []},
        {"source": "iomem", "ranges": [[5, 5]]},
        {"source": "iomem", "ranges": [[0, 10], [5, 20]]},
        {"source": "iomem", "ranges": [[0, 1 << 64]]},
        {"source": "iomem", "ranges": [[0, "10"]]},
        {"source": "iomem"},
        ["iomem"],
    ):
        with pytest.raises(MemoryMapError):
            RamMap.from_dict(bad)


@given(st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(1, 1 << 30)), max_size=20))
def test_round_trip_of_any_merged_map(pairs: list[tuple[int, int]]) -> None:
    m = RamMap.of("firmware", [(s, s + n) for s, n in pairs])
    assert RamMap.from_dict(m.to_dict()) == m
    assert changed(m, {"firmware": m}, []) is None
    assert merged(list(m.ranges)) == list(m.ranges)


def test_read_prefers_nothing_and_hides_nothing(tmp_path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/iomem").write_text(IOMEM)
    fw = tmp_path / "sys/firmware/memmap/0"
    fw.mkdir(parents=True)
    (fw / "start").write_text("0x100000\n")
    (fw / "end").write_text("0x3ffdffff\n")
    (fw / "type").write_text("System RAM\n")
    maps = read(Sysroot(str(tmp_path)))
    assert set(maps) == {"iomem", "firmware"}
    assert maps["firmware"].ranges == ((0x100000, 0x3FFE0000),)
    # without root /proc/iomem shows zeros: no map rather than a map of nothing
    (tmp_path / "proc/iomem").write_text("00000000-00000000 : System RAM\n")
    assert set(read(Sysroot(str(tmp_path)))) == {"firmware"}


def test_r_refuses_an_image_saved_on_other_ram() -> None:
    saved = RamMap.of("iomem", [(0x100000, GIB)])
    now = {"iomem": RamMap.of("iomem", [(0x100000, GIB + GIB // 4)])}
    # A's memory around its jump area (AREA: 128M at 512M), as a saved image has it
    outside = [(0x100000, 0x20000000), (0x28000000, GIB)]
    ev = evidence(ram_saved=saved.to_dict(), ram_now=now, extents=outside)
    d = decide(ev, EXP)
    assert isinstance(d, Invalidate) and d.code == "memory"
    assert "1023 MiB" in d.reason and "1279 MiB" in d.reason
    ok = evidence(ram_saved=saved.to_dict(), ram_now={"iomem": saved}, extents=outside)
    assert decide(ok, EXP) == Restore(1, AREA)


def test_r_refuses_a_recorded_map_it_cannot_compare_or_read() -> None:
    saved = RamMap.of("iomem", [(0x100000, GIB)]).to_dict()
    assert "no RAM map" in (check_ram(evidence(ram_saved=saved, ram_now={})) or "")
    assert "unreadable" in (check_ram(evidence(ram_saved={"source": "x"}, ram_now={})) or "")


def test_an_image_without_a_recorded_map_needs_its_extents_in_ram() -> None:
    now = {"iomem": RamMap.of("iomem", [(0x100000, GIB)])}
    assert check_ram(evidence(ram_now=now, extents=[(0x100000, GIB)])) is None
    assert check_ram(evidence(ram_now=now, extents=[(0x100000, 2 * GIB)])) is not None
    assert check_ram(evidence()) is None  # nothing recorded, nothing read


def test_less_ram_is_named_as_the_cause_even_when_the_jump_area_went_with_it() -> None:
    """A KASLR-placed area near the top of RAM is gone on a machine with less memory: the
    user is told the RAM changed, the cause, not that the jump area is missing."""
    area = (0x37000000, 128 << 20)
    saved = RamMap.of("iomem", [(0x100000, GIB)])
    now = {"iomem": RamMap.of("iomem", [(0x100000, GIB // 2)])}
    outside = [(0x100000, 0x37000000)]
    ev = evidence(
        header=header(jump_area=area), ram_saved=saved.to_dict(), ram_now=now, extents=outside
    )
    d = decide(ev, EXP)
    assert isinstance(d, Invalidate) and d.code == "memory", d
    assert "1023 MiB" in d.reason and "511 MiB" in d.reason


def test_the_first_mib_as_a_kexecd_kernel_sees_it_is_the_same_ram() -> None:
    """The normal kernel R starts with kexec is handed a map whose first range starts at
    0x400; R, started by the firmware, sees it from 0. Same machine: the image restores.
    A change above the first MiB, or a saved low extent that is not RAM here, still refuses."""
    kexecd = RamMap.of("firmware", [(0x400, 0x9FC00), (0x100000, 0x3FFE0000)])
    firmware = RamMap.of("firmware", [(0x0, 0x9FC00), (0x100000, 0x3FFE0000)])
    low_extent = [(0x1000, 0x9F000), (0x100000, 0x3FFE0000)]
    assert changed(kexecd, {"firmware": firmware}, low_extent) is None
    assert changed(firmware, {"firmware": kexecd}, low_extent) is None
    shrunk = RamMap.of("firmware", [(0x0, 0x9FC00), (0x100000, 0x3EFE0000)])
    why = changed(kexecd, {"firmware": shrunk}, low_extent)
    assert why is not None and "[0x100000, 0x3ffe0000) is now [0x100000, 0x3efe0000)" in why
    no_low = RamMap.of("firmware", [(0x80000, 0x9FC00), (0x100000, 0x3FFE0000)])
    why = changed(kexecd, {"firmware": no_low}, low_extent)
    assert why is not None and "saved memory [0x1000, 0x9f000) is not RAM here" in why
