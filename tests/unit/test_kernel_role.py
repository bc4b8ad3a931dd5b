"""kjumpd.agent.kernel_role: what the save kernel reads from its command line and memory map."""

from __future__ import annotations

import pytest

from kjumpd.agent.kernel_role import BootParams, parse_cmdline
from kjumpd.errors import AgentError
from kjumpd.linux.iomem import parse_system_ram as parse_iomem_ram

B_CMDLINE = (
    "console=ttyS0 nokaslr panic=1 memmap=exactmap memmap=512K@0K memmap=128M@512M "
    "kjump.role=save acpi_rsdp=0xf5260 elfcorehdr=0x27ffe000 "
    "kexec_jump_back_entry=0x3ff5d0d8"
)

B_IOMEM = """00000000-00000fff : Reserved
00001000-0007ffff : System RAM
000a0000-000bffff : PCI Bus 0000:00
000f0000-000fffff : System ROM
20000000-27ffffff : System RAM
  21000000-21e00000 : Kernel code
fec00000-fec003ff : IOAPIC 0
"""


def test_save_role_and_the_entry_kexec_tools_appended() -> None:
    p = parse_cmdline(B_CMDLINE)
    assert p == BootParams(role="save", jump_back_entry=0x3FF5D0D8)


def test_restore_role_names_the_target_by_uuid_and_offset() -> None:
    p = parse_cmdline(
        "console=ttyS0 kjump.role=restore "
        "kjump.target=0F1E2D3C-0000-4000-8000-00000000ABCD kjump.offset=1048576"
    )
    assert p.role == "restore" and p.jump_back_entry is None
    assert p.target_uuid == "0f1e2d3c-0000-4000-8000-00000000abcd"
    assert p.target_offset == 1 << 20


@pytest.mark.parametrize(
    "line, match",
    [
        ("console=ttyS0 root=/dev/sda1", "not started as kjumpd's save kernel"),
        ("kjump.role=hibernate", "not started"),
        ("kjump.role=save kexec_jump_back_entry=zz", "not a number"),
        ("kjump.role=restore kjump.offset=-4096", "negative"),
    ],
)
def test_bad_command_lines_are_refused_with_a_reason(line: str, match: str) -> None:
    with pytest.raises(AgentError, match=match):
        parse_cmdline(line)


def test_own_memory_is_the_top_level_system_ram() -> None:
    assert parse_iomem_ram(B_IOMEM) == [(0x1000, 0x80000), (0x20000000, 0x28000000)]


def test_chunk_size_shrinks_to_fit_the_save_kernels_memory() -> None:
    from kjumpd.agent.kernel_role import bounded_chunk_size

    # 128 MiB jump area with ~90 MiB free and 2 CPUs: 4 MiB chunks would need ~100 MiB
    size = bounded_chunk_size(4 << 20, 90 << 20, 2)
    assert size < 4 << 20 and 16 * size <= 45 << 20
    assert bounded_chunk_size(1 << 20, 2 << 30, 8) == 1 << 20  # plenty: unchanged
    assert bounded_chunk_size(4 << 20, 1 << 20, 2) == 64 * 1024  # never below 64 KiB


def test_own_memory_merges_split_entries(tmp_path) -> None:
    from kjumpd.agent.kernel_role import own_memory
    from kjumpd.sysroot import Sysroot

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "iomem").write_text(
        "00001000-0007ffff : System RAM\n20000000-20000fff : System RAM\n"
        "20001000-27ffffff : System RAM\n"
    )
    assert own_memory(Sysroot(tmp_path)) == [(0x1000, 0x80000), (0x20000000, 0x28000000)]


OWN = [(0x1000, 0x80000), (0x20000000, 0x28000000)]
JA = (0x20000000, 128 << 20)
A_RANGES = [(0x1000, 0x9F000), (0x100000, 0x20000000), (0x28000000, 0x3FFDD000)]


def test_restore_fits_when_run_in_the_saved_jump_area() -> None:
    from kjumpd.agent.kernel_role import check_restore_fits

    assert check_restore_fits(A_RANGES, OWN, JA) == [(0x1000, 0x80000)]
    # a reserved page at the start of the area in this kernel's own map is fine
    split = [(0x1000, 0x80000), (0x20001000, 0x28000000)]
    assert check_restore_fits(A_RANGES, split, JA) == [(0x1000, 0x80000)]


def test_restore_is_refused_in_another_jump_area_or_with_memory_inside_it() -> None:
    from kjumpd.agent.kernel_role import check_restore_fits

    with pytest.raises(AgentError, match="does not run in the image's jump area"):
        check_restore_fits(A_RANGES, [(0x1000, 0x80000), (0x30000000, 0x38000000)], JA)
    with pytest.raises(AgentError, match="does not run in the image's jump area"):
        check_restore_fits(A_RANGES, [(0x1000, 0x80000), (0x20000000, 0x28001000)], JA)
    with pytest.raises(AgentError, match="inside the jump area"):
        check_restore_fits(A_RANGES + [(0x27FFF000, 0x28000000)], OWN, JA)
    scattered = [(0x1000 + i * 0x2000, 0x2000 + i * 0x2000) for i in range(20)]
    with pytest.raises(AgentError, match="too many pieces"):
        check_restore_fits(scattered, OWN, JA)


def test_a_failed_power_off_in_b_returns_for_the_jump_back(monkeypatch, capsys):
    """B powers off itself once SAVED (job finish); when the kernel refuses, finish_here
    returns and says so: the caller jumps back and A powers off instead."""
    import ctypes

    from kjumpd.agent import kernel_role

    calls = []

    class Libc:
        def reboot(self, cmd):
            calls.append(cmd.value)
            return -1

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Libc())
    monkeypatch.setattr(kernel_role.os, "sync", lambda: None)
    kernel_role.finish_here("power-off")
    kernel_role.finish_here("reboot")
    assert calls == [0x4321FEDC, 0x01234567]
    out = capsys.readouterr().out
    assert "power off here, without the jump back" in out
    assert "power-off failed" in out and "jumping back" in out


def test_the_main_kernels_entry_page_is_mapped_when_it_lies_in_acpi_data(tmp_path) -> None:
    """B's jump back needs no segment on A's memory when its map shows A's RAM as ACPI
    data (the kernel maps those regions for every jump); a page only partly inside, or in
    a region of another kind, is not mapped that way."""
    from kjumpd.agent.kernel_role import entry_mapped
    from kjumpd.sysroot import Sysroot

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/iomem").write_text(
        "00001000-0007ffff : System RAM\n"
        "00100000-1fffffff : ACPI Tables\n"
        "  00100000-001fffff : not top level\n"
        "28000000-3ffdffff : ACPI Tables\n"
        "3ffe0000-3fffffff : Reserved\n"
    )
    root = Sysroot(tmp_path)
    assert entry_mapped(root, 0x0A5A30F2)
    assert entry_mapped(root, 0x3FFDF0F2)
    assert not entry_mapped(root, 0x3FFE00F2)  # reserved, not mapped by kexec
    assert not entry_mapped(root, 0x200000F2)  # B's jump area


def test_progress_shows_its_first_line_in_a_kernel_just_booted(monkeypatch, capsys) -> None:
    """A kernel up for less than the meter's interval still shows where its work begins
    (the first line, 0 %), then one line per interval, and 100 % at the end."""
    from kjumpd.agent import kernel_role

    now = [0.4]  # CLOCK_MONOTONIC of a save or restore-first kernel 0.4 s after boot
    monkeypatch.setattr(kernel_role.time, "monotonic", lambda: now[0])
    p = kernel_role.Progress("restoring", 100 << 20, every=2.0)
    p(0)
    now[0] = 1.0
    p(10 << 20)  # within the interval: no line
    now[0] = 2.5
    p(40 << 20)
    p(100 << 20)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "restoring" in ln]
    assert [ln.split("restoring")[1].split("%")[0].strip() for ln in lines] == ["0", "40", "100"]
