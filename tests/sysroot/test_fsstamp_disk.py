"""Stamps of real filesystems made with mkfs on files; loop mounts prove a stamp changes.

mkfs-only tests need the mkfs tools; the mount tests need root and loop devices. When
KJUMPD_REQUIRE_VM=1 (CI) a missing prerequisite fails instead of skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from kjumpd.errors import FsStampError
from kjumpd.fsstamp import read_stamp, read_stamp_sealed, scan
from kjumpd.restore.decision import check_stamps
from kjumpd.sysroot import Sysroot
from tests.prereq import need


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


MKFS = {
    "ext4": (["mkfs.ext4", "-q", "-F"], 64),
    "xfs": (["mkfs.xfs", "-q", "-f"], 320),
    "btrfs": (["mkfs.btrfs", "-q", "-f"], 200),
    "vfat": (["mkfs.vfat", "-F", "32"], 300),
}


def make(tmp: Path, fstype: str) -> Path:
    cmd, mib = MKFS[fstype]
    need(shutil.which(cmd[0]) is not None, f"{cmd[0]} is not installed (tools/setup.sh)")
    img = tmp / f"{fstype}.img"
    with open(img, "wb") as f:
        f.truncate(mib << 20)
    run(*cmd, str(img))
    return img


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "vfat"])
def test_stamp_names_the_filesystem_as_blkid_does(tmp_path: Path, fstype: str) -> None:
    img = make(tmp_path, fstype)
    s = read_stamp(img)
    assert s.fstype == fstype
    if shutil.which("blkid"):
        out = run("blkid", "-o", "export", str(img))
        assert f"UUID={s.uuid}" in out.splitlines()
        assert f"TYPE={fstype}" in out.splitlines()
    assert read_stamp(img) == s  # reading changes nothing


def test_ext4_fields_agree_with_dumpe2fs(tmp_path: Path) -> None:
    img = make(tmp_path, "ext4")
    need(shutil.which("dumpe2fs") is not None, "dumpe2fs is not installed")
    out = run("dumpe2fs", "-h", str(img))

    def val(key: str) -> str:
        m = re.search(rf"^{key}:\s+(.*)$", out, re.M)
        assert m, key
        return m.group(1).strip()

    s = read_stamp(img)
    assert s.fields["mount_count"] == int(val("Mount count"))
    assert s.fields["free_blocks"] == int(val("Free blocks"))
    assert s.fields["free_inodes"] == int(val("Free inodes"))
    assert s.uuid == val("Filesystem UUID")


def test_xfs_fields_agree_with_xfs_db(tmp_path: Path) -> None:
    img = make(tmp_path, "xfs")
    need(shutil.which("xfs_db") is not None, "xfs_db is not installed")
    out = run("xfs_db", "-r", "-c", "sb 0", "-c", "p uuid lsn icount ifree fdblocks", str(img))
    kv = dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line)
    s = read_stamp(img)
    assert s.uuid == kv["uuid"]
    for k in ("lsn", "icount", "ifree", "fdblocks"):
        assert s.fields[k] == int(kv[k]), k


def test_a_file_without_a_filesystem_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "zeros"
    f.write_bytes(bytes(1 << 20))
    with pytest.raises(FsStampError) as e:
        read_stamp(f)
    assert "no filesystem" in e.value.what and e.value.fix
    with pytest.raises(FsStampError):
        read_stamp(tmp_path / "missing")


# ---------------------------------------------------------------- with a loop device (root)


class Loop:
    def __init__(self, img: Path, tmp: Path) -> None:
        self.dev = run("losetup", "-f", "--show", str(img)).strip()
        self.mnt = tmp / "mnt"
        self.mnt.mkdir(exist_ok=True)

    def mount(self, *opts: str) -> None:
        run("mount", *opts, self.dev, str(self.mnt))

    def umount(self) -> None:
        run("umount", str(self.mnt))

    def close(self) -> None:
        subprocess.run(["umount", str(self.mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", self.dev], capture_output=True)


@pytest.fixture
def loop_of(tmp_path: Path):
    need(os.geteuid() == 0, "needs root for loop devices and mounts")
    need(shutil.which("losetup") is not None, "losetup is not installed")
    loops: list[Loop] = []

    def make_loop(fstype: str) -> Loop:
        lp = Loop(make(tmp_path, fstype), tmp_path)
        loops.append(lp)
        return lp

    yield make_loop
    for lp in loops:
        lp.close()


@pytest.mark.root
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_a_read_write_mount_changes_the_stamp(loop_of, fstype: str) -> None:
    lp = loop_of(fstype)
    before = read_stamp(lp.dev)
    lp.mount()
    (lp.mnt / "file").write_text("written after the save")
    lp.umount()
    after = read_stamp(lp.dev)
    assert after.changed_since(before), f"{fstype}: a mount+write left the stamp unchanged"


@pytest.mark.root
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_a_mount_without_writes_still_changes_the_stamp(loop_of, fstype: str) -> None:
    lp = loop_of(fstype)
    before = read_stamp(lp.dev)
    lp.mount()
    lp.umount()
    assert read_stamp(lp.dev).changed_since(before)


@pytest.mark.root
def test_ext4_read_only_mount_keeps_the_stamp(loop_of) -> None:
    lp = loop_of("ext4")
    before = read_stamp(lp.dev)
    lp.mount("-o", "ro")
    lp.umount()
    assert read_stamp(lp.dev).changed_since(before) == []


@pytest.mark.root
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_stamp_taken_while_frozen_is_what_the_disk_says_after_power_loss(
    loop_of, tmp_path: Path, fstype: str
) -> None:
    """What the daemon records after FIFREEZE equals what R reads after a power cut."""
    need(shutil.which("fsfreeze") is not None, "fsfreeze is not installed")
    lp = loop_of(fstype)
    lp.mount()
    (lp.mnt / "data").write_bytes(os.urandom(1 << 20))
    run("fsfreeze", "-f", str(lp.mnt))
    try:
        recorded = read_stamp(lp.dev)
        # the disk as it is now, with the filesystem frozen: a power cut would leave this
        snapshot = tmp_path / "after-power-loss.img"
        run("dd", f"if={lp.dev}", f"of={snapshot}", "bs=1M", "iflag=direct", "status=none")
    finally:
        run("fsfreeze", "-u", str(lp.mnt))
    on_disk = read_stamp(snapshot)
    assert on_disk.changed_since(recorded) == [], on_disk.describe_changes(recorded)
    # and the same filesystem used again after the thaw no longer matches
    (lp.mnt / "more").write_text("after resume")
    lp.umount()
    assert read_stamp(lp.dev).changed_since(recorded), "used after the thaw, stamp unchanged"


@pytest.mark.root
def test_scan_finds_a_filesystem_by_uuid_whatever_its_device_name(loop_of) -> None:
    lp = loop_of("ext4")
    want = read_stamp(lp.dev)
    found = scan(Sysroot(Path("/")))
    assert [s.device for s in found[want.key]] == [lp.dev]


def _scatter(img: Path, disk: Path, pieces: int) -> tuple[tuple[int, int, int], ...]:
    """Copy ``img`` onto ``disk`` in ``pieces`` pieces, in reverse order with gaps (as an LV
    in several segments lies on its physical volume); the map (logical, disk, length)."""
    size = img.stat().st_size
    step = -(-size // pieces // 4096) * 4096
    extents = []
    with open(img, "rb") as src, open(disk, "wb") as dst:
        dst.truncate(pieces * (step + (1 << 20)) + (1 << 20))
        for i, lo in enumerate(range(0, size, step)):
            where = (pieces - i) * (step + (1 << 20)) - step
            n = min(step, size - lo)
            src.seek(lo)
            dst.seek(where)
            dst.write(src.read(n))
            extents.append((lo, where, n))
    return tuple(extents)


def _fake_disk(root: Path, name: str, disk: Path) -> Sysroot:
    (root / "sys/block" / name).mkdir(parents=True)
    (root / "sys/block" / name / "size").write_text(f"{disk.stat().st_size // 512}\n")
    (root / "dev").mkdir(exist_ok=True)
    os.symlink(disk, root / "dev" / name)
    return Sysroot(root)


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_a_filesystem_on_a_stacked_device_is_found_through_its_map(
    tmp_path: Path, fstype: str
) -> None:
    """R's view of a filesystem on a linear LV: no device shows it, but its recorded map
    read on the whole disk gives the same stamp as the LV did (xfs: the log head is found
    by bisection through the map); a wrong map finds nothing."""
    img = make(tmp_path, fstype)
    disk = tmp_path / "disk.img"
    extents = _scatter(img, disk, 3)
    sr = _fake_disk(tmp_path / "root", "vdz", disk)
    assert scan(sr) == {}  # the bare disk holds no filesystem at byte 0
    want = read_stamp(img)
    rec = replace(want, device="/dev/dm-3", extents=extents).to_dict()
    found = scan(sr, [rec])[want.key]
    assert len(found) == 1 and found[0].fields == want.fields
    assert found[0].device == "/dev/vdz (mapped)" and not found[0].changed_since(want)
    wrong = tuple((lo, d + 4096, n) for lo, d, n in extents)
    assert scan(sr, [replace(want, extents=wrong).to_dict()]) == {}


#: per-sector byte substitutions of the stand-in cipher below
_SUBST = [bytes((b ^ k) for b in range(256)) for k in range(1, 252)]


def _sector_cipher(data: bytes, sector: int) -> bytes:
    """A stand-in for dm-crypt: each 512-byte sector reversed and XORed with a byte drawn
    from its number, so equal plaintext in a sector gives equal ciphertext, and a change
    anywhere in a sector changes it, as with XTS."""
    return b"".join(
        data[i : i + 512][::-1].translate(_SUBST[(sector + i // 512) % 251])
        for i in range(0, len(data), 512)
    )


def _encrypt_onto(img: Path, disk: Path, extents: tuple[tuple[int, int, int], ...]) -> None:
    """Write ``img``'s bytes, encrypted sector by sector, where ``extents`` put them."""
    with open(img, "rb") as src, open(disk, "r+b") as dst:
        for lo, where, n in extents:
            src.seek(lo)
            dst.seek(where)
            for off in range(0, n, 1 << 20):
                chunk = src.read(min(1 << 20, n - off))
                dst.write(_sector_cipher(chunk, (lo + off) // 512))


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_a_filesystem_below_dm_crypt_is_checked_by_its_ciphertext(
    tmp_path: Path, fstype: str
) -> None:
    """R holds no volume key: A records the CRCs of the ciphertext of every block the
    superblock parser read; R finds them unchanged on the disk, or names how many changed
    after the filesystem's superblock changed (a mount elsewhere)."""
    img = make(tmp_path, fstype)
    disk = tmp_path / "disk.img"
    extents = _scatter(img, disk, 3)
    _encrypt_onto(img, disk, extents)
    sr = _fake_disk(tmp_path / "root", "vdz", disk)
    rec = read_stamp_sealed(str(img), str(disk), extents)
    assert rec.fields["ciphertext"] == "as frozen" and rec.ciphertext
    found = scan(sr, [rec.to_dict()])[rec.key]
    assert len(found) == 1 and not found[0].changed_since(rec)
    assert found[0].device == "/dev/vdz (encrypted, mapped)"
    # the filesystem's superblock changes (one byte of its first region), as a mount does
    off, n, _crc = rec.ciphertext[0]
    with open(img, "r+b") as f:
        f.seek(off + n - 1)
        b = f.read(1)
        f.seek(off + n - 1)
        f.write(bytes([b[0] ^ 0xFF]))
    _encrypt_onto(img, disk, extents)
    now = scan(sr, [rec.to_dict()])
    if len(rec.ciphertext) == 1:  # nothing left that matches: found nowhere as frozen
        assert now == {}
        why = check_stamps([rec.to_dict()], now)
        assert why is not None and "below dm-crypt" in why and "not on any disk" in why
    else:
        changed = now[rec.key][0]
        assert changed.changed_since(rec) == ["ciphertext"]
        assert "ciphertext as frozen -> changed in 1 of" in changed.describe_changes(rec)
        assert check_stamps([rec.to_dict()], now) is not None
    # another disk, or the wrong map, holds none of it: not found
    assert scan(sr, [replace(rec, extents=((0, 0, extents[-1][2]),)).to_dict()]) == {}
