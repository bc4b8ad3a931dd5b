"""R confined to the jump area (kjumpd.confine): the memmap= ranges, the fit, the run-time check."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd import confine
from kjumpd.errors import ConfigError

MIB = 1 << 20
GIB = 1 << 30
RAM = "System RAM"

#: a PC's e820: low RAM, the legacy hole (reserved), RAM to 2 GiB with a reserved page and
#: ACPI data in it, the PCI hole (not described), RAM above 4 GiB
PC = [
    (0, 0x9F000, RAM),
    (0x9F000, 0x100000, "Reserved"),
    (0x100000, 0x40000000, RAM),
    (0x40000000, 0x40200000, "Reserved"),
    (0x40200000, 0x7FF00000, RAM),
    (0x7FF00000, 0x80000000, "ACPI Tables"),
    (0x100000000, 0x480000000, RAM),
]
AREA = (0x20000000, 0x30000000)  # 256 MiB at 512 MiB


def test_a_pc_is_confined_in_three_ranges_that_skip_the_area_and_the_pci_hole() -> None:
    got = confine.confine(PC, AREA)
    assert got == [(0x80000, 0x20000000), (0x30000000, 0x7FF00000), (0x100000000, 0x480000000)]
    assert confine.boot_words(got) == [
        "memmap=0x1ff80000$0x80000",
        "memmap=0x4ff00000$0x30000000",
        "memmap=0x380000000$0x100000000",
        "rootfstype=ramfs",  # no tmpfs cap at half of R's RAM
    ]


def test_a_gap_the_firmware_does_not_describe_is_never_reserved() -> None:
    ram = [(0, 0x9F000, RAM), (0x100000, 0x40000000, RAM), (0x50000000, 0x60000000, RAM)]
    got = confine.confine(ram, AREA)
    # [0x9f000, 1 MiB) and [1 GiB, 0x50000000) are holes: the ranges stop at them
    assert got == [
        (0x80000, 0x9F000),
        (0x100000, 0x20000000),
        (0x30000000, 0x40000000),
        (0x50000000, 0x60000000),
    ]


def test_more_ranges_than_the_kernel_honours_is_refused_with_the_count() -> None:
    ram = [(i * GIB, i * GIB + 512 * MIB, RAM) for i in range(6)]
    with pytest.raises(ConfigError) as e:
        confine.confine(ram, (0x4000000, 0x8000000))
    # six RAM ranges, the first split in two by the area
    assert "7 separate ranges" in e.value.why and "at most 4" in e.value.why


def test_an_area_that_is_not_ram_is_refused() -> None:
    with pytest.raises(ConfigError, match="not RAM"):
        confine.confine(PC, (0x80000000, 0x90000000))


@given(
    st.lists(
        st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([RAM, "Reserved"])),
        min_size=1,
        max_size=8,
    ),
    st.integers(0, 40),
    st.integers(1, 16),
)
def test_the_ranges_cover_all_ram_outside_the_area_and_never_touch_it(
    spec: list[tuple[int, int, str]], area_at: int, area_len: int
) -> None:
    entries, pos = [], 0
    for gap, size, kind in spec:  # entries of 16 MiB units, with holes between them
        pos += gap - 1
        entries.append((pos * 16 * MIB, (pos + size) * 16 * MIB, kind))
        pos += size
    area = (area_at * 16 * MIB + MIB, (area_at + area_len) * 16 * MIB + MIB)
    try:
        got = confine.confine(entries, area)
    except ConfigError:
        return
    assert len(got) <= confine.MAX_RANGES
    for s, e in got:
        assert e <= area[0] or s >= area[1], "a reserved range covers the jump area"
        assert s >= confine.LOW_KEEP
    for s, e, kind in entries:
        if kind != RAM:
            continue
        for lo, hi in ((max(s, confine.LOW_KEEP), min(e, area[0])), (max(s, area[1]), e)):
            if lo < hi:
                assert any(a <= lo and hi <= b for a, b in got), f"RAM [{lo:#x}, {hi:#x}) left"


def test_fit_refuses_an_initrd_the_kernel_would_panic_on() -> None:
    why = confine.fit_problem(128 * MIB, 64 * MIB, 100 * MIB, 0)
    assert "half of the jump area" in why


def test_fit_counts_the_normal_kernel_staged_for_kexec() -> None:
    assert confine.fit_problem(128 * MIB, 26 * MIB, 40 * MIB, 8 * MIB) == ""
    why = confine.fit_problem(128 * MIB, 26 * MIB, 40 * MIB, 70 * MIB)
    assert "R needs about 220 MiB" in why and "the jump area has 128 MiB" in why
    # kexec holds two copies at once: 30 MiB would fit once beside R's files, not twice
    assert confine.fit_problem(128 * MIB, 26 * MIB, 40 * MIB, 30 * MIB) != ""


IOMEM_INSIDE = """\
00000000-00000fff : Reserved
00001000-0007ffff : System RAM
00080000-1fffffff : Reserved
20000000-2fffffff : System RAM
  22000000-22ffffff : Kernel code
  23000000-233fffff : Kernel rodata
  23400000-237fffff : Kernel data
  23c00000-23ffffff : Kernel bss
30000000-3fffffff : Reserved
"""


def test_a_kernel_inside_the_area_is_told_so() -> None:
    assert confine.outside_area(IOMEM_INSIDE, AREA) == ""


def test_a_kernel_left_where_the_boot_loader_put_it_is_told_where() -> None:
    text = IOMEM_INSIDE.replace(
        "22000000-22ffffff : Kernel code", "01000000-01ffffff : Kernel code"
    )
    assert "kernel image lies at [0x1000000, 0x2000000)" in confine.outside_area(text, AREA)


def test_ram_outside_the_area_means_not_confined() -> None:
    text = IOMEM_INSIDE.replace("30000000-3fffffff : Reserved", "30000000-3fffffff : System RAM")
    assert "its RAM includes [0x30000000, 0x40000000)" in confine.outside_area(text, AREA)


def test_no_kernel_image_in_iomem_is_not_taken_as_inside() -> None:
    text = "00001000-0007ffff : System RAM\n20000000-2fffffff : System RAM\n"
    assert "does not show where its kernel image is" in confine.outside_area(text, AREA)


def test_only_reserving_memmap_words_count_as_a_confinement() -> None:
    assert confine.requested("kjump.target=x memmap=0x1000$0x80000 console=ttyS0")
    assert not confine.requested("memmap=exactmap memmap=512K@0K memmap=815M#1M kjump.role=save")
