"""Jump area: crashkernel= parsing, boot loader command line edits (pure)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.daemon.config import Config
from kjumpd.daemon.jumparea import (
    CrashRanges,
    JumpArea,
    RamRange,
    cmdline_value,
    edit_bls_entry,
    edit_default_grub,
    parse_crashkernel,
    parse_crashkernel_ranges,
    parse_iomem_crash,
    value_serves,
)

MiB = 1 << 20


@pytest.mark.parametrize(
    "value,area",
    [
        ("128M@512M", JumpArea(512 * MiB, 128 * MiB)),
        ("128M@0x20000000", JumpArea(0x20000000, 128 * MiB)),
        ("192M@16M", JumpArea(16 * MiB, 192 * MiB)),
        ("256M", None),  # no fixed offset
        ("512M-2G:64M,2G-:128M", None),  # ranges
        ("128M,high", None),
    ],
)
def test_parse_crashkernel(value, area):
    assert parse_crashkernel(value) == area


GiB = 1 << 30
#: what Fedora's kdump setup writes
FEDORA = "1G-4G:192M,4G-64G:256M,64G-:512M"


@pytest.mark.parametrize(
    "value,ranges",
    [
        (
            FEDORA,
            CrashRanges(
                (
                    RamRange(GiB, 4 * GiB, 192 * MiB),
                    RamRange(4 * GiB, 64 * GiB, 256 * MiB),
                    RamRange(64 * GiB, None, 512 * MiB),
                ),
                None,
            ),
        ),
        ("512M-:128M@16M", CrashRanges((RamRange(512 * MiB, None, 128 * MiB),), 16 * MiB)),
        ("0x20000000-:64M", CrashRanges((RamRange(512 * MiB, None, 64 * MiB),), None)),
        ("256M", None),  # the simple forms
        ("128M@512M", None),
        ("1G-:256M,high", None),
        ("2G-1G:64M", None),  # the kernel refuses END <= START
        ("1G:64M", None),  # no '-'
        ("1G-2G", None),  # no size
        ("x-:64M", None),
        ("1G-:64M@", None),
    ],
)
def test_parse_crashkernel_ranges(value, ranges):
    assert parse_crashkernel_ranges(value) == ranges


@pytest.mark.parametrize(
    "ram,size",
    [
        (GiB - 2 * MiB, 192 * MiB),  # firmware keeps some back: rounded up to 1 GiB
        (GiB - 130 * MiB, 0),  # below every range: nothing is reserved
        (4 * GiB - 1, 256 * MiB),  # rounds up to 4 GiB, the second range's start
        (16 * GiB, 256 * MiB),
        (64 * GiB, 512 * MiB),
        (1 << 42, 512 * MiB),
    ],
)
def test_the_range_holding_the_machine_s_ram_gives_the_size(ram, size):
    r = parse_crashkernel_ranges(FEDORA)
    assert r is not None and r.size_for(ram) == size


_SIZE_M = st.integers(min_value=1, max_value=1 << 16)


@given(
    st.lists(st.tuples(_SIZE_M, _SIZE_M), min_size=1, max_size=5),
    st.booleans(),
    st.one_of(st.none(), _SIZE_M),
)
def test_ranges_written_as_the_kernel_reads_them_parse_back(steps, open_end, offset):
    bounds, entries, start = [], [], 0
    for gap, size in steps:
        bounds.append((start, start + gap, size))
        start += gap
    for i, (lo, hi, size) in enumerate(bounds):
        end = None if open_end and i == len(bounds) - 1 else hi
        entries.append(RamRange(lo * MiB, None if end is None else end * MiB, size * MiB))
    text = ",".join(
        f"{lo}M-{'' if open_end and i == len(bounds) - 1 else f'{hi}M'}:{size}M"
        for i, (lo, hi, size) in enumerate(bounds)
    ) + (f"@{offset}M" if offset is not None else "")
    assert parse_crashkernel_ranges(text) == CrashRanges(
        tuple(entries), None if offset is None else offset * MiB
    )


@pytest.mark.parametrize(
    "cmdline,value",
    [
        ("ro crashkernel=128M quiet", "128M"),
        ("crashkernel=64M crashkernel=128M@512M", "128M@512M"),  # the last one
        ("crashkernel=128M crashkernel=512M,high crashkernel=72M,low", "128M"),
        ("crashkernel=512M,high crashkernel=72M,low", "72M,low"),  # only suffixed ones
        ("ro quiet", None),
    ],
)
def test_the_crashkernel_value_the_kernel_obeys(cmdline, value):
    assert cmdline_value(cmdline) == value


def test_a_ranges_value_serves_by_the_size_this_machine_s_ram_gives():
    free, pinned = Config(), Config(jump_area_start=512 * MiB)
    assert value_serves(FEDORA, free, 192 * MiB, system_ram=2 * GiB)
    assert not value_serves(FEDORA, free, 200 * MiB, system_ram=2 * GiB)
    assert value_serves(FEDORA, free, 200 * MiB, system_ram=8 * GiB)
    assert not value_serves(FEDORA, free, 64 * MiB, system_ram=512 * MiB)  # nothing reserved
    assert not value_serves(FEDORA, free, 200 * MiB)  # RAM unknown: the smallest must serve
    assert not value_serves(FEDORA, pinned, 128 * MiB, system_ram=2 * GiB)  # not at the start
    assert value_serves(FEDORA + "@512M", pinned, 128 * MiB, system_ram=2 * GiB)


def test_system_ram_is_unknown_when_iomem_hides_its_addresses():
    from kjumpd.daemon.jumparea import _system_ram

    shown = "00001000-0009fbff : System RAM\n00100000-3ffdffff : System RAM\n"
    assert _system_ram(shown) == 0x9EC00 + 0x3FEE0000
    hidden = "00000000-00000000 : System RAM\n00000000-00000000 : System RAM\n"
    assert _system_ram(hidden) is None


def test_iomem_crash_kernel_line_and_hidden_addresses():
    text = "00100000-3ffdffff : System RAM\n  20000000-27ffffff : Crash kernel\n"
    assert parse_iomem_crash(text) == JumpArea(0x20000000, 128 * MiB)
    hidden = "00000000-00000000 : System RAM\n  00000000-00000000 : Crash kernel\n"
    assert parse_iomem_crash(hidden) is None


def test_kernel_arg_round_trips():
    a = JumpArea(512 * MiB, 128 * MiB)
    assert a.kernel_arg == "crashkernel=128M@512M"
    assert parse_crashkernel(a.kernel_arg.split("=", 1)[1]) == a


def test_grub_edit_replaces_an_old_crashkernel_and_keeps_the_rest():
    text = (
        'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
        'GRUB_CMDLINE_LINUX="root=/dev/sda1 crashkernel=256M ro"\n'
    )
    new = edit_default_grub(text, "crashkernel=128M@512M")
    assert 'GRUB_CMDLINE_LINUX="root=/dev/sda1 ro crashkernel=128M@512M"\n' in new
    assert 'GRUB_CMDLINE_LINUX_DEFAULT="quiet"' in new and new.startswith("GRUB_DEFAULT=0\n")
    assert edit_default_grub(new, "crashkernel=128M@512M") == new  # idempotent


def test_grub_edit_adds_the_line_when_missing():
    new = edit_default_grub("GRUB_TIMEOUT=5", "crashkernel=128M@512M")
    assert new == 'GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX="crashkernel=128M@512M"\n'


def test_bls_edit():
    text = "title Debian\nlinux /vmlinuz\noptions root=UUID=x ro crashkernel=64M\n"
    new = edit_bls_entry(text, "crashkernel=128M@512M")
    assert new == "title Debian\nlinux /vmlinuz\noptions root=UUID=x ro crashkernel=128M@512M\n"


@given(st.lists(st.from_regex(r"[a-z_]{1,8}(=[a-z0-9/]{1,8})?", fullmatch=True), max_size=8))
def test_grub_edit_keeps_every_other_word(words):
    line = " ".join(words)
    new = edit_default_grub(f'GRUB_CMDLINE_LINUX="{line}"\n', "crashkernel=128M@512M")
    got = new.split('"')[1].split()
    assert got[-1] == "crashkernel=128M@512M"
    assert got[:-1] == [w for w in words if not w.startswith("crashkernel=")]


_WORD = st.from_regex(r"[a-z][a-z0-9_.]{0,8}(=[a-zA-Z0-9@,]{1,6})?", fullmatch=True)


@given(st.lists(_WORD, max_size=8), st.sampled_from([None, "crashkernel=auto"]))
def test_reverting_the_jump_area_gives_back_the_command_line(words, previous) -> None:
    from kjumpd.daemon.jumparea import _set_arg, changed_arg, revert_arg

    line = " ".join(words + ([previous] if previous else [])) + "\n"
    arg = "crashkernel=128M@512M"
    edited = _set_arg(line.strip(), arg) + "\n"
    assert changed_arg(line, edited) == previous
    back = revert_arg(edited, arg, previous)
    assert back.split() == line.split() and back.endswith("\n")
    grub = edit_default_grub(f'GRUB_CMDLINE_LINUX="{line.strip()}"\n', arg)
    assert revert_arg(grub, arg, previous) == f'GRUB_CMDLINE_LINUX="{line.strip()}"\n'
