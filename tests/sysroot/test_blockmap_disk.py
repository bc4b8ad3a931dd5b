"""FIEMAP, extent validation and device translation for real, on loop devices (root).

Each test makes a filesystem on a loop device, creates a target through kjumpd.daemon.blockmap
and checks what it claims against a raw O_DIRECT read of the device. Without root (or
mkfs) the tests skip, unless KJUMPD_REQUIRE_VM=1, where they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kjumpd.daemon import blockmap
from kjumpd.errors import BlockMapError, TargetError
from kjumpd.image import store
from kjumpd.image.device import ImageDevice
from kjumpd.linux import btrfs
from kjumpd.sysroot import Sysroot
from tests import prereq

MiB = 1 << 20


def need(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    prereq.need(os.geteuid() == 0 and not missing, f"needs root and {', '.join(tools)}")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout


@contextlib.contextmanager
def loop(img: Path, offset: int = 0, size: int | None = None):
    args = ["losetup", "-f", "--show"]
    if offset:
        args += ["-o", str(offset)]
    if size:
        args += ["--sizelimit", str(size)]
    dev = run(*args, str(img)).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


@contextlib.contextmanager
def mounted(dev: str, mp: Path, fstype: str):
    mkfs = {
        "ext4": ["mkfs.ext4", "-q", "-b", "4096"],
        "xfs": ["mkfs.xfs", "-q", "-f"],
        "btrfs": ["mkfs.btrfs", "-q", "-f"],
    }[fstype]
    run(*mkfs, dev)
    mp.mkdir(parents=True, exist_ok=True)
    run("mount", dev, str(mp))
    try:
        yield mp
    finally:
        subprocess.run(["umount", str(mp)], capture_output=True, timeout=60)


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _fill(mp: Path, prefix: str, size: int, cap: int) -> int:
    import errno

    block = os.urandom(size)
    n = 0
    while n < cap:
        try:
            with open(mp / f"{prefix}{n}", "wb") as f:
                f.write(block)
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            (mp / f"{prefix}{n}").unlink(missing_ok=True)
            break
        n += 1
    return n


def fragment_free_space(mp: Path, size: int = 256 << 10) -> None:
    """Fill the filesystem until it is full (big files, then small ones for what is left),
    then delete every other big one: what is free afterwards is holes of ``size`` bytes."""
    n = _fill(mp, "fill", size, 4096)
    _fill(mp, "small", 16 << 10, 20000)
    where = []
    for i in range(n):  # by position on the device: xfs spreads files over AGs
        fd = os.open(mp / f"fill{i}", os.O_RDONLY)
        try:
            where.append((blockmap.fiemap(fd, size)[0].physical, i))
        finally:
            os.close(fd)
    for _, i in sorted(where)[::2]:
        (mp / f"fill{i}").unlink()
    os.sync()


def check_against_raw(disk: str, target: blockmap.Target, path: Path) -> int:
    """Write a pattern through the file, read it back from the raw disk through the block
    map with O_DIRECT; returns the number of extents checked."""
    size = target.size
    pattern = {}
    with open(path, "r+b") as f:
        for i, lo in enumerate(range(128 << 10, size, 512 << 10)):
            data = (f"kjumpd block {i} at {lo} ".encode() * 200)[:4096]
            f.seek(lo)
            f.write(data)
            pattern[lo] = data
        f.flush()
        os.fsync(f.fileno())
    with ImageDevice(disk, target.block_extents(), writable=False) as dev:
        assert dev.direct, "the raw read must bypass the page cache"
        for lo, data in pattern.items():
            assert dev.read(lo, 4096) == data, f"logical {lo} is not where the block map says"
        # and the superblock is at the first extent's device offset
        sb = store.read_superblock(dev)
    assert [(e.logical, e.device_offset, e.length) for e in sb.blockmap] == target.blockmap
    return len(target.blockmap)


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_file_target_extents_match_the_raw_device(tmp_path, fstype):
    need("mkfs." + fstype, "losetup")
    img = sparse(tmp_path / "disk.img", (300 if fstype == "xfs" else 64) * MiB)
    with loop(img) as dev, mounted(dev, tmp_path / "mnt", fstype) as mp:
        fragment_free_space(mp)
        path = mp / "kjumpd" / "image"
        target, uuid = blockmap.setup(Sysroot(Path("/")), str(path), 8 * MiB)
        st = os.stat(path)
        assert st.st_mode & 0o777 == 0o600 and st.st_uid == 0
        assert target.kind == "file" and target.disk == dev and target.size == 8 * MiB
        if fstype == "ext4":  # xfs found contiguous room despite the holes (see report)
            assert len(target.blockmap) > 1, "fragmented free space must give several extents"
        assert check_against_raw(dev, target, path) == len(target.blockmap)
        # a second look finds the same map and the same UUID (nothing to re-stamp)
        again, uuid2 = blockmap.current(Sysroot(Path("/")), str(path), restamp=False)
        assert again == target and uuid2 == uuid


def test_partition_translation_with_real_fiemap(tmp_path):
    """A filesystem on a partition at 1 MiB of a disk: the file's FIEMAP offsets (relative
    to the partition) become whole-disk offsets, proven by reading the whole disk.
    The partition is a loop device over the disk image at 1 MiB; sysfs describes it as
    sdz1 of sdz in a tree whose /dev/sdz is the whole-disk loop device."""
    need("mkfs.ext4", "losetup")
    img = sparse(tmp_path / "disk.img", 96 * MiB)
    root = tmp_path / "root"
    with loop(img) as whole, loop(img, offset=MiB, size=94 * MiB) as part:
        pst = os.stat(part)
        pdev = f"{os.major(pst.st_rdev)}:{os.minor(pst.st_rdev)}"
        sdz = root / "sys/devices/virtual/block/sdz"
        (sdz / "sdz1").mkdir(parents=True)
        (sdz / "dev").write_text("8:240\n")
        (sdz / "size").write_text(f"{96 * MiB // 512}\n")
        (sdz / "sdz1/dev").write_text(pdev + "\n")
        (sdz / "sdz1/partition").write_text("1\n")
        (sdz / "sdz1/start").write_text("2048\n")
        (sdz / "sdz1/size").write_text(f"{94 * MiB // 512}\n")
        (root / "sys/class/block").mkdir(parents=True)
        os.symlink("../../devices/virtual/block/sdz", root / "sys/class/block/sdz")
        os.symlink("../../devices/virtual/block/sdz/sdz1", root / "sys/class/block/sdz1")
        (root / "sys/dev/block").mkdir(parents=True)
        os.symlink("../../devices/virtual/block/sdz/sdz1", root / f"sys/dev/block/{pdev}")
        (root / "dev").mkdir()
        os.symlink(whole, root / "dev/sdz")
        (root / "proc").mkdir()
        (root / "proc/swaps").write_text("Filename Type Size Used Priority\n")
        with mounted(part, root / "data", "ext4") as mp:
            fragment_free_space(mp)
            sr = Sysroot(root)
            target, uuid = blockmap.setup(sr, "/data/image", 6 * MiB)
            assert target.disk == "/dev/sdz" and target.disk_devno == "8:240"
            fie = blockmap.translate(Sysroot(Path("/")), str(mp / "image"))
            assert [(lo, d + MiB, ln) for lo, d, ln in fie.blockmap] == target.blockmap
            assert check_against_raw(whole, target, mp / "image") >= 1
            # the save kernel's view: superblock found on the whole disk by content
            dev, sb = store.open_target(whole, writable=False, offset=target.superblock_offset)
            dev.close()
            assert sb.uuid_str == uuid


def test_raw_device_target(tmp_path):
    need("losetup")
    img = sparse(tmp_path / "raw.img", 16 * MiB)
    with loop(img) as dev:
        target, uuid = blockmap.setup(Sysroot(Path("/")), dev, 0)
        assert target.kind == "disk" and target.blockmap == [(0, 0, 16 * MiB)]
        with store.open_target(dev, writable=False)[0] as d:
            assert store.read_header(d).state.name == "EMPTY"


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_unsafe_files_are_refused(tmp_path, fstype):
    need("mkfs." + fstype, "losetup", "fallocate")
    img = sparse(tmp_path / "disk.img", (320 if fstype == "xfs" else 64) * MiB)
    root = Sysroot(Path("/"))
    with loop(img) as dev, mounted(dev, tmp_path / "mnt", fstype) as mp:
        holes = mp / "sparse"
        sparse(holes, 4 * MiB)
        holes.chmod(0o600)
        with pytest.raises(BlockMapError, match="sparse"):
            blockmap.translate(root, str(holes))
        pre = mp / "prealloc"
        run("fallocate", "-l", str(4 * MiB), str(pre))
        pre.chmod(0o600)
        with pytest.raises(BlockMapError, match="unwritten"):
            blockmap.translate(root, str(pre))
        fresh = mp / "fresh"
        with open(fresh, "wb") as f:  # no fsync: delalloc until FIEMAP_FLAG_SYNC
            f.write(b"x" * (1 * MiB))
        fresh.chmod(0o600)
        t = blockmap.translate(root, str(fresh))
        assert sum(ln for _, _, ln in t.blockmap) == 1 * MiB
        fresh.chmod(0o644)
        with pytest.raises(TargetError, match="readable by others"):
            blockmap.translate(root, str(fresh))
        if fstype == "xfs":
            ref = mp / "reflinked"
            run("cp", "--reflink=always", str(fresh), str(ref))
            ref.chmod(0o600)
            with pytest.raises(BlockMapError, match="shared"):
                blockmap.translate(root, str(ref))


def test_a_copy_on_write_btrfs_file_is_refused_with_the_reason(tmp_path):
    need("mkfs.btrfs", "losetup")
    img = sparse(tmp_path / "disk.img", 1536 * MiB)
    with loop(img) as dev, mounted(dev, tmp_path / "mnt", "btrfs") as mp:
        f = mp / "image"
        f.write_bytes(b"\0" * MiB)
        f.chmod(0o600)
        with pytest.raises(BlockMapError, match="copy-on-write file on btrfs") as ei:
            blockmap.translate(Sysroot(Path("/")), str(f))
        assert "checksums" in ei.value.why and "kjumpctl setup" in ei.value.fix


def test_btrfs_target_is_nodatacow_and_mapped_through_the_chunk_tree(tmp_path):
    """`setup` on btrfs makes the file nodatacow; its btrfs logical addresses become
    offsets on the loop device through the chunk tree (the file spans several data chunks,
    each mapped on its own), proven by reading the raw device where the map says."""
    need("mkfs.btrfs", "losetup", "lsattr")
    img = sparse(tmp_path / "disk.img", 1536 * MiB)
    with loop(img) as dev, mounted(dev, tmp_path / "mnt", "btrfs") as mp:
        path = mp / "kjumpd" / "image"
        target, uuid = blockmap.setup(Sysroot(Path("/")), str(path), 400 * MiB)
        assert "C" in run("lsattr", str(path)).split()[0]
        assert target.disk == dev and target.size == 400 * MiB
        fd = os.open(path, os.O_RDONLY)
        try:
            logical = [e.physical for e in blockmap.fiemap(fd, target.size)]
            chunks = btrfs.chunk_map(fd)
        finally:
            os.close(fd)
        data = [c for c in chunks if c.logical <= max(logical) < c.logical + c.length]
        assert data and all(c.profile == "single" for c in data)
        spanned = {
            c.logical for c in chunks for a in logical if c.logical <= a < c.logical + c.length
        }
        assert len(spanned) >= 2, "a 400 MiB file on this filesystem spans several chunks"
        assert min(d for _, d, _ in target.blockmap) != min(logical), "offsets were translated"
        assert check_against_raw(dev, target, path) == len(target.blockmap)
        again, uuid2 = blockmap.current(Sysroot(Path("/")), str(path), restamp=False)
        assert again == target and uuid2 == uuid


def test_a_btrfs_target_lives_in_its_own_subvolume_out_of_snapshots(tmp_path):
    """setup makes the target's new directory a subvolume: a snapshot of the filesystem's
    top (what snapper or Timeshift take) leaves the target out, so it keeps its own blocks
    and stays usable; a target inside a snapshotted subvolume shares its blocks and is
    refused with that reason."""
    need("mkfs.btrfs", "losetup", "btrfs")
    img = sparse(tmp_path / "disk.img", 1536 * MiB)
    sr = Sysroot(Path("/"))
    with loop(img) as dev, mounted(dev, tmp_path / "mnt", "btrfs") as mp:
        target, _uuid = blockmap.setup(sr, str(mp / "kjumpd" / "image"), 16 * MiB)
        assert os.stat(mp / "kjumpd").st_ino == 256, "the directory is a subvolume's root"
        assert (mp / "kjumpd").stat().st_mode & 0o777 == 0o700
        (mp / "plain").mkdir()
        blockmap.setup(sr, str(mp / "plain" / "image"), 16 * MiB)
        run("btrfs", "subvolume", "snapshot", str(mp), str(mp / "snap"))
        again, _ = blockmap.current(sr, str(mp / "kjumpd" / "image"), restamp=False)
        assert again == target
        with pytest.raises(BlockMapError, match="shares blocks with a btrfs snapshot") as ei:
            blockmap.translate(sr, str(mp / "plain" / "image"))
        assert "subvolume" in ei.value.fix


def test_btrfs_dup_data_is_refused_and_the_new_file_removed(tmp_path):
    need("mkfs.btrfs", "losetup")
    img = sparse(tmp_path / "disk.img", 1536 * MiB)
    run("mkfs.btrfs", "-q", "-f", "-d", "dup", "-m", "dup", str(img))
    with loop(img) as dev:
        (tmp_path / "mnt").mkdir()
        run("mount", dev, str(tmp_path / "mnt"))
        try:
            with pytest.raises(BlockMapError, match="DUP profile") as ei:
                blockmap.setup(Sysroot(Path("/")), str(tmp_path / "mnt/image"), 8 * MiB)
            assert "dconvert=single" in ei.value.fix and "removed" in ei.value.fix
            assert not (tmp_path / "mnt/image").exists()
        finally:
            subprocess.run(["umount", str(tmp_path / "mnt")], capture_output=True, timeout=60)


def test_a_moved_file_is_restamped_before_use(tmp_path):
    need("mkfs.ext4", "losetup")
    img = sparse(tmp_path / "disk.img", 64 * MiB)
    sr = Sysroot(Path("/"))
    with loop(img) as dev, mounted(dev, tmp_path / "mnt", "ext4") as mp:
        path = mp / "image"
        target, uuid = blockmap.setup(sr, str(path), 4 * MiB)
        shutil.copyfile(path, mp / "copy")  # same bytes, other blocks
        os.chmod(mp / "copy", 0o600)
        os.replace(mp / "copy", path)
        os.sync()
        with pytest.raises(TargetError) as ei:
            blockmap.current(sr, str(path), restamp=False)
        assert ei.value.context["moved"]
        moved, uuid2 = blockmap.current(sr, str(path), restamp=True)
        assert uuid2 == uuid and moved.blockmap != target.blockmap
        assert check_against_raw(dev, moved, path) >= 1
        assert blockmap.current(sr, str(path), restamp=False) == (moved, uuid)


def test_btrfs_subvolume_mounts_are_frozen_and_thawed(tmp_path):
    """btrfs shows the filesystem's device in mountinfo and the subvolume's in st_dev:
    freezing must still find it, and a fake btrfs entry on a plain directory is refused."""
    need("mkfs.btrfs", "losetup", "btrfs")
    from kjumpd.daemon import fsfreeze
    from kjumpd.errors import FreezeError

    img = sparse(tmp_path / "disk.img", 256 * MiB)
    root = tmp_path / "root"
    (root / "mnt/sv").mkdir(parents=True)
    (root / "plain").mkdir()
    with loop(img) as dev, mounted(dev, tmp_path / "top", "btrfs") as top:
        run("btrfs", "subvolume", "create", str(top / "sv"))
        run("mount", "-o", "subvol=sv", dev, str(root / "mnt/sv"))
        try:
            line = next(
                x for x in open("/proc/self/mountinfo") if x.split()[4] == str(root / "mnt/sv")
            )
            devno = line.split()[2]
            st = os.stat(root / "mnt/sv")
            assert f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" != devno
            sr = Sysroot(root)
            m = fsfreeze.Mount(44, devno, "/mnt/sv", "btrfs", dev, "rw")
            done = fsfreeze.freeze(sr, [m])
            try:
                assert done == [m]
                fd = os.open(root / "mnt/sv", os.O_RDONLY)
                try:  # frozen: a second FIFREEZE says EBUSY
                    with pytest.raises(OSError) as ei:
                        import fcntl

                        fcntl.ioctl(fd, fsfreeze.FIFREEZE, 0)
                    assert ei.value.errno == 16
                finally:
                    os.close(fd)
            finally:
                assert fsfreeze.thaw(sr, done) == []
            (root / "mnt/sv/after-thaw").write_text("writable again")
            fake = fsfreeze.Mount(45, devno, "/plain", "btrfs", dev, "rw")
            with pytest.raises(FreezeError, match="not the filesystem"):
                fsfreeze.freeze(sr, [fake])
        finally:
            subprocess.run(["umount", str(root / "mnt/sv")], capture_output=True, timeout=60)
