"""Where the save kernel's segments go inside the jump area (kjumpd.daemon.kexec.segment_window)."""

from __future__ import annotations

import struct
from pathlib import Path

from kjumpd.daemon import kexec
from kjumpd.daemon.jumparea import JumpArea

MiB = 1 << 20
AREA = JumpArea(0x20000000, 128 * MiB)


def bzimage(path: Path, *, init_size: int, align: int = 2 * MiB, protocol: int = 0x20F) -> Path:
    head = bytearray(0x1000)
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, protocol)
    struct.pack_into("<I", head, 0x230, align)
    struct.pack_into("<I", head, 0x260, init_size)
    path.write_bytes(bytes(head) + bytes(3 * MiB))
    return path


def test_the_window_is_the_top_of_the_area_sized_for_kernel_initrd_and_slack(tmp_path):
    k = bzimage(tmp_path / "bzImage", init_size=15052800)  # B's 6.12 kernel
    start, end = kexec.segment_window(k, 8_100_000, AREA)
    assert end == AREA.end and start % (2 * MiB) == 0
    # init_size rounds to 16 MiB, the initrd to 8 MiB, plus the slack
    assert end - start == 16 * MiB + 8 * MiB + kexec.WINDOW_SLACK
    assert AREA.contains(start, end)


def test_the_whole_area_when_the_kernel_cannot_say(tmp_path):
    whole = (AREA.start, AREA.end)
    assert kexec.segment_window(tmp_path / "missing", MiB, AREA) == whole
    (tmp_path / "notakernel").write_bytes(b"\0" * 8192)
    assert kexec.segment_window(tmp_path / "notakernel", MiB, AREA) == whole
    old = bzimage(tmp_path / "old", init_size=15052800, protocol=0x209)  # no init_size field
    assert kexec.segment_window(old, MiB, AREA) == whole
    big = bzimage(tmp_path / "big", init_size=100 * MiB)  # does not fit
    assert kexec.segment_window(big, 30 * MiB, AREA) == whole


def test_the_main_kernels_ram_is_acpi_data_to_the_save_kernel_outside_its_own():
    area = JumpArea(0x2000_0000, 128 << 20)
    ram = [(0x1000, 0x9F000), (0x10_0000, 0x3FFE_0000), (0x1_0000_0000, 0x1_4000_0000)]
    assert kexec.main_memory_words(area, ram) == [
        "memmap=511M#1M",
        "memmap=393088K#640M",
        "memmap=1G#4G",
    ]


def test_a_ram_map_too_long_for_the_command_line_is_left_out(caplog):
    from kjumpd.daemon.config import Config

    area = JumpArea(0x2000_0000, 128 << 20)
    many = [
        (0x1_0000_0000 + i * 0x20_0000, 0x1_0000_0000 + i * 0x20_0000 + 0x10_0000)
        for i in range(200)
    ]
    line = kexec.save_cmdline(Config(), area, main_ram=many)
    assert "#" not in line and line.endswith("memmap=128M@512M kjump.role=save")
    assert len(kexec.save_cmdline(Config(), area, main_ram=many[:3])) < kexec.CMDLINE_MAX
