"""Jump area: crashkernel= parsing, boot loader command line edits (pure)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.daemon.jumparea import (
    JumpArea,
    edit_bls_entry,
    edit_default_grub,
    parse_crashkernel,
    parse_iomem_crash,
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
