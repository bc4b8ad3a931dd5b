"""Boot entry renderers and byte formats (grubenv, EFI variables, BLS entries): pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.daemon.bootentry import (
    BLS_KEYS,
    ENTRY_ID,
    GRUBENV_SIZE,
    BootEntry,
    bls_problems,
    efivar_decode,
    efivar_encode,
    grubenv_format,
    grubenv_parse,
    parse_bls_entry,
    render_bls_entry,
    render_grub_snippet,
)
from kjumpd.errors import BootEntryError, ConfigError

CMD = "kjump.target=0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e kjump.offset=1048576 console=ttyS0 quiet"

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)
vals = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters="\\"),
    max_size=40,
)


@given(st.dictionaries(names, vals, max_size=8))
def test_grubenv_round_trips_and_stays_1024_bytes(env: dict) -> None:
    data = grubenv_format(env)
    assert len(data) == GRUBENV_SIZE
    assert grubenv_parse(data) == env


@given(st.binary(max_size=1100))
def test_grubenv_garbage_is_a_clean_error(blob: bytes) -> None:
    try:
        grubenv_parse(blob)
    except BootEntryError as e:
        assert e.fix


def test_grubenv_full_or_unsafe_is_refused() -> None:
    with pytest.raises(BootEntryError):
        grubenv_format({"x": "y" * 1100})
    with pytest.raises(BootEntryError):
        grubenv_format({"a": "line\nbreak"})


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0xD7FF), max_size=40))
def test_efi_variable_round_trips(value: str) -> None:
    data = efivar_encode(value)
    assert data[:4] == b"\x07\x00\x00\x00"
    assert data.endswith(b"\x00\x00")
    assert efivar_decode(data) == value


def test_efi_variable_matches_systemd_boot_layout() -> None:
    # attributes NV|BS|RT, then UTF-16LE "kjumpd-restore.conf" and a NUL character
    assert efivar_encode("ab") == b"\x07\x00\x00\x00a\x00b\x00\x00\x00"
    with pytest.raises(BootEntryError):
        efivar_decode(b"\x07\x00\x00")


def test_grub_snippet_carries_the_entry() -> None:
    s = render_grub_snippet(
        kind="grub",
        fs_uuid="1234-ABCD",
        fstype="vfat",
        kernel="/kjumpd/vmlinuz-restore",
        initrd="/kjumpd/initrd-restore.img",
        cmdline=CMD,
    )
    assert s.startswith("#!/bin/sh")
    assert f"--id {ENTRY_ID}" in s and "insmod fat" in s
    assert "search --no-floppy --fs-uuid --set=root 1234-ABCD" in s
    assert f"linux /kjumpd/vmlinuz-restore {CMD}" in s
    assert "set default" not in s
    rf = render_grub_snippet(
        kind="restore-first",
        fs_uuid="1234-ABCD",
        fstype="ext4",
        kernel="/k",
        initrd="/i",
        cmdline=CMD,
    )
    assert f'set default="{ENTRY_ID}"' in rf and "boot_once" in rf


@pytest.mark.parametrize(
    "cmd",
    [
        "console=ttyS0",
        "kjump.target=x kjump.offset=0 $(reboot)",
        "kjump.target=x kjump.offset=0 'quoted'",
        "kjump.target=x kjump.offset=0 a;b",
    ],
)
def test_unsafe_or_incomplete_command_lines_are_refused(cmd: str) -> None:
    with pytest.raises(ConfigError):
        render_grub_snippet(
            kind="grub", fs_uuid="1234-ABCD", fstype="ext4", kernel="/k", initrd="/i", cmdline=cmd
        )


def test_grub_refuses_what_it_cannot_read() -> None:
    with pytest.raises(BootEntryError):
        render_grub_snippet(
            kind="grub", fs_uuid="u", fstype="ntfs", kernel="/k", initrd="/i", cmdline=CMD
        )


def test_bls_entry_uses_only_the_specifications_keys() -> None:
    text = render_bls_entry(
        kernel="/kjumpd/vmlinuz-restore",
        initrd="/kjumpd/initrd-restore.img",
        cmdline=CMD,
        machine_id="0123456789abcdef0123456789abcdef",
        version="6.12.117",
    )
    entry = parse_bls_entry(text)
    assert set(entry) <= set(BLS_KEYS)
    assert entry["linux"] == ["/kjumpd/vmlinuz-restore"]
    assert entry["options"] == [CMD]
    assert entry["machine-id"] == ["0123456789abcdef0123456789abcdef"]
    assert bls_problems(text) == []
    bare = render_bls_entry(kernel="/k", initrd="/i", cmdline=CMD)
    assert "version" not in parse_bls_entry(bare) and "machine-id" not in parse_bls_entry(bare)
    assert bls_problems(bare) == []


def test_bls_checker_catches_what_the_spec_forbids() -> None:
    assert bls_problems("title x\nkernel /k\n") == [
        "unknown key 'kernel'",
        "neither 'linux' nor 'efi' is set",
    ]
    assert "is not absolute" in bls_problems("linux k\n")[0]
    assert "machine-id" in bls_problems("linux /k\nmachine-id XYZ\n")[0]
    assert "given 2 times" in bls_problems("linux /k\nlinux /j\n")[0]


def test_boot_entry_record_round_trips_and_damage_is_clear() -> None:
    rec = BootEntry(
        kind="grub",
        loader="grub",
        kernel="/boot/kjumpd/v",
        initrd="/boot/kjumpd/i",
        cmdline=CMD,
        files=["/a"],
    )
    assert BootEntry.from_json(rec.to_json()) == rec
    for bad in [
        "{}",
        "[]",
        '{"version": 1, "kind": "lilo", "loader": "grub", "kernel": "k", '
        '"initrd": "i", "cmdline": "c"}',
        "not json",
    ]:
        with pytest.raises(BootEntryError) as e:
            BootEntry.from_json(bad)
        assert "setup" in e.value.fix


@given(
    st.dictionaries(
        st.lists(
            st.text(alphabet="abcdefgh_.-0123456789", min_size=1, max_size=8).filter(
                lambda n: n not in (".", "..")
            ),
            min_size=1,
            max_size=3,
        ).map("/".join),
        st.binary(max_size=300),
        min_size=1,
        max_size=6,
    )
)
def test_r_payload_archive_is_newc_the_other_reader_understands(files: dict) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from kjumpd import cpio
    from kjumpd.daemon.bootentry import newc

    # a name cannot be both a file and a directory
    names = sorted(files)
    if any(b.startswith(a + "/") for a in names for b in names):
        return
    blob = newc(files)
    assert len(blob) % 4 == 0
    got = {e.name: e.data for e in cpio.read(blob) if e.mode & 0o100000}
    assert got == files
