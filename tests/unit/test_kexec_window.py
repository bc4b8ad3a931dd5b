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
