"""Pure pieces of the VM tier (no QEMU): the workload's data and verdict line, the grub.cfg
reader the host uses as the VM's boot loader, the guest image cache key."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from kjumpd.daemon.bootentry import grubenv_format, grubenv_parse
from tests.vm import rootfs, scenarios, workload


def test_workload_data_is_deterministic_distinct_and_sized():
    a = b"".join(workload.expected_chunks(7, (3 << 20) + 4096))
    b = b"".join(workload.expected_chunks(7, (3 << 20) + 4096))
    c = b"".join(workload.expected_chunks(8, (3 << 20) + 4096))
    assert a == b and a != c
    assert len(a) == (3 << 20) + 4096
    pages = {a[i : i + 4096] for i in range(0, len(a), 4096)}
    assert len(pages) == len(a) // 4096  # no two pages alike: zero elision/dedup can't cheat
    digest = workload.expected_digest(7, len(a))
    assert digest == workload.digest_of(a) and len(digest) == 4 * 8  # a CRC for each MiB
    # one changed byte is named by the MiB it is in
    changed = a[: (2 << 20) + 5] + bytes([a[(2 << 20) + 5] ^ 1]) + a[(2 << 20) + 6 :]
    assert workload.differing_mib(workload.digest_of(changed), digest) == [2]


def _status(counter: int, digest: str, pid: int = 10, start: float = 1.0) -> workload.Status:
    return workload.Status(
        pid=pid, start_time=start, counter=counter, size=4096, seed=1, mlocked=True, digest=digest
    )


def test_verdict_passes_only_for_same_process_same_data_counter_moving():
    good = "ab" * 32
    ok, line = workload.verdict("b", _status(5, good), _status(9, good), good)
    assert ok and line.startswith("KJUMP-VERDICT: PASS")
    ok, line = workload.verdict(
        "b", _status(5, good), _status(9, good[:8] + "cdcdcdcd" + good[16:]), good
    )
    assert not ok and "data differs from the seed in 1 of 8 MiB (the first at MiB 1)" in line
    ok, line = workload.verdict("b", _status(5, good), _status(5, good), good)
    assert not ok and "counter did not continue" in line
    ok, line = workload.verdict("b", _status(5, good), _status(9, good, pid=11), good)
    assert not ok and "different process" in line
    ok, line = workload.verdict("b", _status(5, good), None, good)
    assert not ok and "not reachable" in line


_word = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters='"='),
    min_size=1,
    max_size=20,
)


@given(
    extra=st.dictionaries(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), _word, max_size=5),
    problems=st.lists(
        st.text(
            st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters='"'),
            min_size=1,
            max_size=30,
        ),
        max_size=3,
    ),
)
def test_verdict_line_round_trips(extra, problems):
    extra.pop("scenario", None)
    extra.pop("reason", None)
    ok, line = workload.verdict("x", None, _status(1, "00"), "00", dict(extra), problems)
    parsed = workload.parse_verdict("noise before " + line)
    assert parsed is not None
    passed, fields = parsed
    assert passed == ok == (not problems)
    assert fields["scenario"] == "x"
    for k, v in extra.items():
        assert fields[k] == v
    if problems:
        assert fields["reason"] == "; ".join(problems).replace('"', "'")


def test_parse_verdict_ignores_other_lines():
    assert workload.parse_verdict("kjump-agent: SAVED: 10 MiB") is None


GRUB_CFG = """\
menuentry 'Debian' --id debian {
\tlinux /boot/vmlinuz root=/dev/vda ro
\tinitrd /boot/initrd.img
}
menuentry 'kjumpd: resume from hibernation' --class kjumpd --id kjumpd-restore {
\tinsmod ext2
\tsearch --no-floppy --fs-uuid --set=root 1234
\tlinux /boot/kjumpd/vmlinuz-restore kjump.target=0b7c kjump.offset=2768 'memmap=0x1000$0x80000'
\tinitrd /boot/kjumpd/initrd-restore.img
}
"""


def test_grub_entry_reader_takes_the_restore_entry_not_the_first():
    assert scenarios.parse_grub_entry(GRUB_CFG) == (
        "/boot/kjumpd/vmlinuz-restore",
        "/boot/kjumpd/initrd-restore.img",
        # the quotes are GRUB's (a "$" in a word), not the kernel's
        "kjump.target=0b7c kjump.offset=2768 memmap=0x1000$0x80000",
    )
    assert scenarios.parse_grub_entry(GRUB_CFG, "nope") is None
    # what GRUB does with the entry's $kjumpd_confine, set in grubenv or not
    confined = GRUB_CFG.replace("'memmap=0x1000$0x80000'", "$kjumpd_confine")
    env = grubenv_parse(grubenv_format({"kjumpd_confine": "memmap=0x1$0x2 memmap=0x3$0x4"}))
    assert scenarios.parse_grub_entry(confined, env=env)[2].endswith(
        "kjump.offset=2768 memmap=0x1$0x2 memmap=0x3$0x4"
    )
    assert scenarios.parse_grub_entry(confined)[2].endswith("kjump.offset=2768")
    assert scenarios.parse_grub_entry("menuentry 'x' --id kjumpd-restore {\n linux /k\n}\n") is None


def test_guest_image_key_follows_every_payload_byte(tmp_path: Path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    p = rootfs.Payload()
    p.add("/usr/lib/python3/dist-packages/pkg", pkg)
    first = p.digest()
    assert p.digest() == first
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    assert p.digest() == first  # caches do not rebuild the image
    (pkg / "a.py").write_text("x = 2\n")
    assert p.digest() != first


def test_tree_key_changes_with_the_package_list(monkeypatch):
    key = rootfs.tree_key("http://m/debian")
    monkeypatch.setattr(rootfs, "PACKAGES", rootfs.PACKAGES + ("strace",))
    assert rootfs.tree_key("http://m/debian") != key


def _aged(path: Path, hours_ago: float, now: float, size: int = 1) -> Path:
    import os

    path.write_bytes(b"x" * size)
    os.utime(path, (now - hours_ago * 3600, now - hours_ago * 3600))
    return path


def test_old_guest_images_are_pruned_with_their_prepared_layers(tmp_path: Path):
    """A day of changes under kjumpd/ made dozens of 2.5 GiB images and filled the disk."""
    from tests.vm import rootfs

    now = 1_000_000.0
    ages = {"a": 0.1, "b": 0.2, "c": 0.5, "d": 1.0, "e": 3.0, "f": 5.0}  # hours since last use
    for key, h in ages.items():
        _aged(tmp_path / f"image-{key}.raw", h, now)
        _aged(tmp_path / f"image-{key}.prepared.qcow2", h, now)
        (tmp_path / f"image-{key}.prepare").mkdir()
    gone = rootfs.prune_images(tmp_path, now=now)
    # the four newest stay (all used within PRUNE_AGE); the two old ones go, with their layers
    assert sorted(p.name for p in gone) == ["image-e.raw", "image-f.raw"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(
        f"image-{k}{ext}" for k in "abcd" for ext in (".raw", ".prepared.qcow2", ".prepare")
    )
    # never more than MAX_IMAGES, even when all are in use: the oldest go first
    for key in "ghi":
        _aged(tmp_path / f"image-{key}.raw", 0.01, now)
    gone = rootfs.prune_images(tmp_path, now=now)
    assert sorted(p.name for p in gone) == ["image-b.raw", "image-c.raw", "image-d.raw"]
    assert len(list(tmp_path.glob("image-*.raw"))) == rootfs.MAX_IMAGES
    # two images, however old, are kept: a session that comes back the next day boots at once
    for p in tmp_path.glob("image-*.raw"):
        _aged(p, 48, now)
    rootfs.prune_images(tmp_path, now=now)
    assert len(list(tmp_path.glob("image-*.raw"))) == 2


def test_old_initramfs_archives_are_pruned_per_name(tmp_path: Path):
    from savekernel import initramfs

    now = 1_000_000.0
    for i, h in enumerate([0.1, 0.5, 3, 4, 5]):
        _aged(tmp_path / f"save-{i:04x}abcd.cpio.lz4", h, now)
        _aged(tmp_path / f"save-{i:04x}abcd.json", h, now)
    _aged(tmp_path / "save-extra-0000aaaa.cpio.lz4", 9, now)  # another name: not touched
    _aged(tmp_path / "restore-0000bbbb.cpio.lz4", 9, now)
    gone = initramfs.prune_cache(tmp_path, "save", now=now)
    assert sorted(p.name for p in gone) == [
        "save-0002abcd.cpio.lz4",
        "save-0003abcd.cpio.lz4",
        "save-0004abcd.cpio.lz4",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "restore-0000bbbb.cpio.lz4",
        "save-0000abcd.cpio.lz4",
        "save-0000abcd.json",
        "save-0001abcd.cpio.lz4",
        "save-0001abcd.json",
        "save-extra-0000aaaa.cpio.lz4",
    ]
