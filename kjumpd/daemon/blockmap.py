"""Block map of the image target: FIEMAP, validation, device translation, target setup.

A target is a fully written file on a local filesystem, or a raw partition/disk. The save
kernel writes the raw disk, so the daemon turns the target into a list of extents
(logical offset in the target, byte offset on the *whole disk*, length):

* file: FIEMAP (with FIEMAP_FLAG_SYNC, so nothing is delalloc) gives extents relative to
  the filesystem's block device; every extent must be plain (no inline, encoded,
  encrypted, shared/reflinked, delalloc, unknown, unwritten, not-aligned flags), aligned
  to 4 KiB, and together they must cover the file without holes (never sparse).
* the filesystem's device is translated to the whole disk through sysfs:
  partition -> ``start`` sector; device-mapper "linear" targets (LVM) through their table
  (``dmsetup table``); md RAID is refused (B writes one disk); an active swap area is
  refused.
* a LUKS volume (dm-crypt) ends the walk: the block map is in the volume's plaintext, and
  the target records the volume (kjumpd.linux.luks.Volume) so that the save kernel
  rebuilds its mapping over the disk with the volume key and writes through it.
* btrfs: FIEMAP gives btrfs logical addresses; the chunk tree turns them into offsets on
  the filesystem's one device (kjumpd.linux.btrfs). The file must be nodatacow and in
  single-profile data chunks, which `kjumpctl setup` makes sure of.
* partition/disk: one extent at the partition's start.

After translation the superblock (magic + target UUID + this block map) is written at
logical 0 and read back from the whole disk at the translated offset with O_DIRECT: the
save kernel finds the target by that content, never by device name.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kjumpd.errors import BlockMapError, KjumpError, TargetError, UsageError
from kjumpd.image.format import BlockExtent
from kjumpd.linux import btrfs, luks
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

BLOCK = 4096
SECTOR = 512
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_HDR = struct.Struct("=QQIIII")  # 32 bytes
_FIEMAP_EXT = struct.Struct("=QQQQQIIII")  # 56 bytes
FE_LAST = 0x1
BAD_FLAGS = {
    0x2: "unknown location",
    0x4: "delayed allocation",
    0x8: "encoded (compressed)",
    0x80: "encrypted",
    0x100: "not block aligned",
    0x200: "inline in metadata",
    0x400: "packed tail",
    0x800: "unwritten (preallocated, never written)",
    0x2000: "shared (reflinked or snapshotted)",
}


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int = 0


@dataclass(frozen=True)
class Target:
    """A target translated to the whole disk."""

    path: str  # as configured (system path)
    kind: str  # "file" | "partition" | "disk"
    disk: str  # "/dev/vda": the whole disk B writes
    disk_devno: str  # "254:0"
    size: int
    blockmap: list[tuple[int, int, int]] = field(default_factory=list)  # whole-disk offsets
    #: the LUKS volume whose mapping ``disk`` is (the block map is in its plaintext), and
    #: the volume's device here (what cryptsetup unlocks)
    volume: luks.Volume | None = None
    volume_node: str = ""

    @property
    def superblock_offset(self) -> int:
        return self.blockmap[0][1]

    def block_extents(self) -> list[BlockExtent]:
        return [BlockExtent(lo, dev, ln) for lo, dev, ln in self.blockmap]


# -- FIEMAP ------------------------------------------------------------------------------
def fiemap(fd: int, size: int, batch: int = 256) -> list[Extent]:
    """All extents of the open file ``fd`` (FIEMAP_FLAG_SYNC), in logical order."""
    out: list[Extent] = []
    start = 0
    while start < size:
        buf = bytearray(_FIEMAP_HDR.size + batch * _FIEMAP_EXT.size)
        _FIEMAP_HDR.pack_into(buf, 0, start, size - start, FIEMAP_FLAG_SYNC, 0, batch, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        except OSError as e:
            raise BlockMapError(
                "FIEMAP is not supported for the target",
                why=e.strerror or str(e),
                fix="put the target on ext4 or xfs, or use a raw partition",
            ) from None
        mapped = _FIEMAP_HDR.unpack_from(buf, 0)[3]
        if mapped == 0:
            break
        last = False
        for i in range(mapped):
            lo, ph, ln, _, _, flags, *_ = _FIEMAP_EXT.unpack_from(
                buf, _FIEMAP_HDR.size + i * _FIEMAP_EXT.size
            )
            out.append(Extent(lo, ph, ln, flags))
            last = bool(flags & FE_LAST)
        start = out[-1].logical + out[-1].length
        if last:
            break
    return out


def validate_extents(extents: list[Extent], size: int, path: str = "target") -> list[Extent]:
    """Refuse unsafe extents and holes; return them merged and clipped to ``size``."""
    pos = 0
    merged: list[Extent] = []
    for e in extents:
        bad = [why for bit, why in BAD_FLAGS.items() if e.flags & bit]
        if bad:
            raise BlockMapError(
                f"{path} has an extent that cannot be written raw",
                why=f"extent at {e.logical} is {', '.join(bad)}",
                fix="recreate it with `kjumpctl setup` (a fully written file on "
                "ext4/xfs without reflinks or compression)",
                logical=e.logical,
                flags=e.flags,
            )
        if e.logical != pos:
            raise BlockMapError(
                f"{path} is sparse",
                why=f"hole at byte {pos}",
                fix="recreate it with `kjumpctl setup` (it writes every byte)",
            )
        if (
            e.logical % BLOCK
            or e.physical % BLOCK
            or (e.length % BLOCK and e.logical + e.length < size)
        ):
            raise BlockMapError(
                f"{path} has an extent not aligned to {BLOCK} bytes",
                why=f"logical {e.logical}, physical {e.physical}, length {e.length}",
                fix="use a filesystem with 4 KiB blocks",
            )
        pos = e.logical + e.length
        if merged and merged[-1].physical + merged[-1].length == e.physical:
            p = merged[-1]
            merged[-1] = Extent(p.logical, p.physical, p.length + e.length)
        else:
            merged.append(Extent(e.logical, e.physical, e.length))
    if pos < size:
        raise BlockMapError(
            f"{path} is sparse",
            why=f"extents end at {pos}, size is {size}",
            fix="recreate it with `kjumpctl setup`",
        )
    last = merged[-1]
    if last.logical + last.length > size:  # the tail block of the last extent
        merged[-1] = Extent(last.logical, last.physical, size - last.logical)
    return merged


# -- device translation ---------------------------------------------------------------------
@dataclass(frozen=True)
class BlockDev:
    name: str  # sysfs name ("vda1", "dm-0", "loop3")
    devno: str  # "MAJ:MIN"


def _sys_block_dir(sysroot: Sysroot, devno: str) -> str:
    """/sys/class/block/<name> of a device number, as a system path."""
    link = sysroot.path(f"/sys/dev/block/{devno}")
    if not link.exists():
        raise BlockMapError(
            f"block device {devno} is not in sysfs",
            why=f"/sys/dev/block/{devno} is missing",
            fix="the target must be on a local block device",
        )
    name = os.path.basename(os.path.realpath(link))
    return f"/sys/class/block/{name}"


def device_by_devno(sysroot: Sysroot, devno: str) -> BlockDev:
    return BlockDev(os.path.basename(_sys_block_dir(sysroot, devno)), devno)


def device_by_name(sysroot: Sysroot, name: str) -> BlockDev:
    devno = sysroot.read_text(f"/sys/class/block/{name}/dev", default="").strip()
    if not devno:
        raise BlockMapError(
            f"/dev/{name} is not a block device the kernel lists",
            why=f"/sys/class/block/{name}/dev is missing",
            fix="give a partition or disk path, or a file on a local filesystem",
        )
    return BlockDev(name, devno)


def parse_dm_table(text: str, through_crypt: bool = False) -> list[tuple[int, int, str, int]]:
    """'start len linear MAJ:MIN offset' lines (sectors) -> [(start, len, devno, offset)] bytes.

    ``through_crypt``: also 'start len crypt CIPHER KEY IV_OFFSET MAJ:MIN offset ...' lines
    (dm-crypt keeps every sector where it is, so its ciphertext lies at the same offsets on
    the device below: what R reads, without the key, to see whether it changed)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 5 and parts[2] == "linear":
            dev, off = parts[3], parts[4]
        elif through_crypt and len(parts) >= 8 and parts[2] == "crypt":
            dev, off = parts[6], parts[7]
        else:
            kind = parts[2] if len(parts) > 2 else "?"
            raise BlockMapError(
                f"device-mapper target {kind!r} is not supported",
                why="only linear mappings (plain LVM) can be written raw by the save kernel",
                fix="put the target on a plain partition or a linear LV",
            )
        if ":" not in dev:
            raise BlockMapError(
                "device-mapper table names a device by path", why=line, fix="report this table"
            )
        out.append((int(parts[0]) * SECTOR, int(parts[1]) * SECTOR, dev, int(off) * SECTOR))
    return out


def _dm_table(sysroot: Sysroot, dev: BlockDev) -> str:
    tool = shutil.which("dmsetup")
    if tool is None:
        raise BlockMapError(
            f"cannot read the device-mapper table of {dev.name}",
            why="dmsetup is not installed",
            fix="apt-get install dmsetup",
        )
    maj, mnr = dev.devno.split(":")
    r = subprocess.run(
        [tool, "table", "--major", maj, "--minor", mnr],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if r.returncode != 0:
        raise BlockMapError(
            f"dmsetup table failed for {dev.name}",
            why=" | ".join(r.stderr.strip().splitlines()[-2:]),
            fix="check device-mapper (dmsetup ls)",
        )
    return r.stdout


def to_disk(
    sysroot: Sysroot,
    dev: BlockDev,
    extents: list[tuple[int, int, int]],
    depth: int = 0,
    dm_table: Callable[[Sysroot, BlockDev], str] | None = None,
    through_crypt: bool = False,
    stop_at_crypt: bool = False,
) -> tuple[BlockDev, list[tuple[int, int, int]]]:
    """(logical, offset on ``dev``, length) -> (whole disk, offsets on it).
    ``dm_table`` returns a device-mapper table's text (default: ``dmsetup table``).
    ``through_crypt``: map through dm-crypt too (to read ciphertext; never to write).
    ``stop_at_crypt``: a dm-crypt device ends the walk and stands for the disk (the save
    kernel rebuilds that mapping and writes plaintext through it)."""
    if depth > 8:
        raise BlockMapError("device stack is too deep", fix="use a plain partition")
    base = f"/sys/class/block/{dev.name}"
    if sysroot.exists(f"{base}/md"):
        level = sysroot.read_text(f"{base}/md/level", default="?").strip()
        raise BlockMapError(
            f"the target is on md RAID ({dev.name}, {level})",
            why="the save kernel writes one disk; RAID members would diverge",
            fix="put the target on a plain partition outside the array",
        )
    if sysroot.exists(f"{base}/dm"):
        uuid = sysroot.read_text(f"{base}/dm/uuid", default="").strip()
        if uuid.startswith("CRYPT-") and stop_at_crypt:
            return dev, list(extents)
        if uuid.startswith("CRYPT-") and not through_crypt:
            raise BlockMapError(
                f"the target is on dm-crypt ({dev.name})",
                why="the save kernel holds no volume key and would write the image below "
                "the encryption, where the filesystem reads it as garbage",
                fix="put the target on an unencrypted partition or LV; with an image key "
                "(kjumpctl image-key create) kjumpd encrypts the image itself",
            )
        table = parse_dm_table((dm_table or _dm_table)(sysroot, dev), through_crypt)
        out: list[tuple[int, int, int]] = []
        lower: BlockDev | None = None
        for lo, off, ln in extents:
            while ln > 0:
                seg = next((t for t in table if t[0] <= off < t[0] + t[1]), None)
                if seg is None:
                    raise BlockMapError(f"offset {off} of {dev.name} is outside its dm table")
                s_start, s_len, s_dev, s_off = seg
                if lower is not None and lower.devno != s_dev:
                    raise BlockMapError(
                        f"{dev.name} spans several devices",
                        fix="use a linear LV on one physical volume",
                    )
                lower = lower or device_by_devno(sysroot, s_dev)
                n = min(ln, s_start + s_len - off)
                out.append((lo, s_off + off - s_start, n))
                lo, off, ln = lo + n, off + n, ln - n
        assert lower is not None
        return to_disk(sysroot, lower, out, depth + 1, dm_table, through_crypt, stop_at_crypt)
    if sysroot.exists(f"{base}/partition"):
        start = int(sysroot.read_text(f"{base}/start").strip()) * SECTOR
        disk_name = os.path.basename(os.path.dirname(os.path.realpath(sysroot.path(base))))
        disk = device_by_name(sysroot, disk_name)
        return disk, [(lo, off + start, ln) for lo, off, ln in extents]
    return dev, list(extents)


def sysfs_name(sysroot: Sysroot, node: str) -> str | None:
    """The sysfs name of a device node ("/dev/mapper/vg-lv" -> "dm-3"): by its number when
    it is a block device (a node LVM made itself, without udev, is not named as sysfs names
    it), else (a fake tree, where /dev/NAME stands in for the device) by the name it
    resolves to. None for a block device this tree's sysfs does not list."""
    real = sysroot.path(node)
    try:
        st = os.stat(real)
    except OSError:
        return os.path.basename(os.path.realpath(real))
    if stat.S_ISBLK(st.st_mode):
        link = sysroot.path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        return os.path.basename(os.path.realpath(link)) if link.exists() else None
    return os.path.basename(os.path.realpath(real))


@dataclass(frozen=True)
class StackedMap:
    """A device-mapper device's bytes on its whole disk."""

    disk: str  # "/dev/vdb"
    extents: tuple[tuple[int, int, int], ...]  # (logical, whole-disk offset, length)
    #: the dm-crypt device in the stack, if any: the disk holds ciphertext there
    crypt: str | None = None


def stacked_map(
    sysroot: Sysroot,
    device: str,
    dm_table: Callable[[Sysroot, BlockDev], str] | None = None,
) -> StackedMap | None:
    """How R, which assembles no stacked devices, reads a device-mapper device: its map onto
    the whole disk, through linear and dm-crypt layers. None for any other device (R finds
    partitions and disks itself). Raises BlockMapError for a stack R cannot read through
    (several physical volumes, targets other than linear and crypt)."""
    name = sysfs_name(sysroot, device)
    if name is None or not sysroot.exists(f"/sys/class/block/{name}/dm"):
        return None
    dev = device_by_name(sysroot, name)
    sectors = sysroot.read_text(f"/sys/class/block/{dev.name}/size", default="").strip()
    if not sectors.isdigit():
        raise BlockMapError(
            f"the size of {dev.name} is unknown",
            why=f"/sys/class/block/{dev.name}/size reads {sectors!r}",
            fix="report this device",
        )
    size = int(sectors) * SECTOR
    disk, ext = to_disk(sysroot, dev, [(0, 0, size)], dm_table=dm_table, through_crypt=True)
    return StackedMap(f"/dev/{disk.name}", tuple(_merge(ext)), encrypted_device(sysroot, dev.devno))


def encrypted_device(sysroot: Sysroot, devno: str, depth: int = 0) -> str | None:
    """The dm-crypt device (its dm name) that ``devno`` is, or lies on (through LVM or
    md), or None."""
    base = sysroot.path(f"/sys/dev/block/{devno}")
    uuid = sysroot.read_text(f"/sys/dev/block/{devno}/dm/uuid", default="").strip()
    if uuid.startswith("CRYPT-"):
        name = sysroot.read_text(f"/sys/dev/block/{devno}/dm/name", default="").strip()
        return name or os.path.basename(os.path.realpath(base))
    if depth > 8 or not (base / "slaves").is_dir():
        return None
    for slave in sorted(os.listdir(base / "slaves")):
        dev = sysroot.read_text(f"/sys/class/block/{slave}/dev", default="").strip()
        if dev:
            found = encrypted_device(sysroot, dev, depth + 1)
            if found:
                return found
    return None


def check_not_swap(sysroot: Sysroot, path: str, devname: str | None) -> None:
    for line in sysroot.read_text("/proc/swaps", default="").splitlines()[1:]:
        name = line.split()[0] if line.split() else ""
        if name and (name == path or (devname and name == f"/dev/{devname}")):
            raise BlockMapError(
                f"{path} is an active swap area",
                why=f"listed in /proc/swaps as {name}",
                fix=f"swapoff {name} and remove it from /etc/fstab first",
            )


def _merge(ext: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for lo, dev, ln in ext:
        if out and out[-1][1] + out[-1][2] == dev and out[-1][0] + out[-1][2] == lo:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + ln)
        else:
            out.append((lo, dev, ln))
    return out


def translate(sysroot: Sysroot, path: str) -> Target:
    """The target at system path ``path`` mapped onto its whole disk (no writes)."""
    real = sysroot.path(path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise TargetError(
            f"target {path} does not exist",
            why=e.strerror or str(e),
            fix="create it with `kjumpctl setup --target PATH --size SIZE`",
        ) from None
    if stat.S_ISBLK(st.st_mode) or (not sysroot.is_real and path.startswith("/dev/")):
        if stat.S_ISBLK(st.st_mode):
            dev = device_by_devno(sysroot, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        else:  # a fake tree: /dev/NAME is a plain file standing in for the device
            dev = device_by_name(sysroot, os.path.basename(os.path.realpath(real)))
        check_not_swap(sysroot, path, dev.name)
        sectors = int(sysroot.read_text(f"/sys/class/block/{dev.name}/size").strip())
        size = sectors * SECTOR // BLOCK * BLOCK
        kind = "partition" if sysroot.exists(f"/sys/class/block/{dev.name}/partition") else "disk"
        disk, ext = to_disk(sysroot, dev, [(0, 0, size)], stop_at_crypt=True)
        vol, node = _volume_if_crypt(sysroot, disk)
        return Target(path, kind, f"/dev/{disk.name}", disk.devno, size, _merge(ext), vol, node)
    if not stat.S_ISREG(st.st_mode):
        raise TargetError(
            f"target {path} is neither a file nor a block device",
            fix="give a file path or a partition",
        )
    check_not_swap(sysroot, path, None)
    if st.st_mode & 0o077 or st.st_uid != 0:
        raise TargetError(
            f"target {path} is readable by others or not owned by root",
            why=f"mode {st.st_mode & 0o777:o}, uid {st.st_uid}: it will hold all of memory",
            fix=f"chown root:root {path}; chmod 600 {path}",
        )
    fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
    try:
        on_btrfs = btrfs.is_btrfs(fd)
        raw_extents = fiemap(fd, st.st_size)
        if on_btrfs:
            _require_nocow(fd, path)
            _refuse_snapshotted(raw_extents, path)
        extents = validate_extents(raw_extents, st.st_size, path)
        triples = [(e.logical, e.physical, e.length) for e in extents]
        if on_btrfs:
            dev, triples = _btrfs_to_device(sysroot, fd, path, triples)
        else:
            dev = device_by_devno(sysroot, f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    finally:
        os.close(fd)
    disk, ext = to_disk(sysroot, dev, triples, stop_at_crypt=True)
    vol, node = _volume_if_crypt(sysroot, disk)
    return Target(
        path,
        "file",
        f"/dev/{disk.name}",
        disk.devno,
        st.st_size // BLOCK * BLOCK,
        _merge([(lo, d, ln) for lo, d, ln in ext if lo < st.st_size // BLOCK * BLOCK]),
        vol,
        node,
    )


def _volume_if_crypt(
    sysroot: Sysroot, dev: BlockDev, dm_table: Callable[[Sysroot, BlockDev], str] | None = None
) -> tuple[luks.Volume | None, str]:
    if not sysroot.exists(f"/sys/class/block/{dev.name}/dm"):
        return None, ""
    return volume_of(sysroot, dev, dm_table)


def volume_of(
    sysroot: Sysroot, dev: BlockDev, dm_table: Callable[[Sysroot, BlockDev], str] | None = None
) -> tuple[luks.Volume, str]:
    """The LUKS volume whose dm-crypt mapping ``dev`` is, located on its whole disk, and
    its device node here. Refused: plain dm-crypt (no header R could unlock), a volume that
    is not one contiguous piece of one disk."""
    uuid = sysroot.read_text(f"/sys/class/block/{dev.name}/dm/uuid", default="").strip()
    kind = uuid.split("-")[1] if uuid.count("-") >= 2 else "PLAIN"
    if kind not in ("LUKS1", "LUKS2"):
        raise BlockMapError(
            f"the target is on {kind.lower()} dm-crypt ({dev.name}), not a LUKS volume",
            why="without a LUKS header the restore environment has nothing to unlock the "
            "volume with",
            fix="put the target in a LUKS volume, or outside the encryption with an image "
            "key (kjumpctl image-key create)",
        )
    lines = [ln for ln in (dm_table or _dm_table)(sysroot, dev).splitlines() if ln.strip()]
    parts = lines[0].split() if len(lines) == 1 else []
    if (
        len(parts) < 8
        or parts[2] != "crypt"
        or not all(p.isdigit() for p in parts[5:6] + parts[7:8])
    ):
        raise BlockMapError(
            f"the dm-crypt table of {dev.name} is not one crypt target",
            why=f"{len(lines)} lines: {lines[0][:80] if lines else ''}",
            fix="report this table (dmsetup table)",
        )
    _s, length, _t, cipher, key, iv_offset, devno, offset, *rest = parts
    options = tuple(rest[1 : 1 + int(rest[0])]) if rest and rest[0].isdigit() else ()
    key_size = int(key[1:].split(":", 1)[0]) if key.startswith(":") else len(key) // 2
    lower = device_by_devno(sysroot, devno)
    lsize = int(sysroot.read_text(f"/sys/class/block/{lower.name}/size", "0").strip() or 0)
    disk, ext = to_disk(sysroot, lower, [(0, 0, lsize * SECTOR)], dm_table=dm_table)
    ext = _merge(ext)
    if len(ext) != 1:
        raise BlockMapError(
            f"LUKS volume {dev.name} is not one contiguous piece of {disk.name}",
            why=f"its device {lower.name} maps in {len(ext)} pieces",
            fix="put the target in a LUKS volume on a partition or a whole disk",
        )
    header_offset = ext[0][1]
    try:
        with open(sysroot.path(f"/dev/{disk.name}"), "rb") as f:
            f.seek(header_offset)
            got = luks.header_uuid(f.read(4096))
    except OSError as e:
        raise BlockMapError(
            f"cannot read the LUKS header of {dev.name} on {disk.name}", why=e.strerror or str(e)
        ) from None
    if got is None or got[1].replace("-", "") not in uuid.replace("-", ""):
        raise BlockMapError(
            f"no LUKS header of {dev.name} at byte {header_offset} of {disk.name}",
            why=f"device-mapper names it {uuid}",
            fix="report this device stack (lsblk, dmsetup table)",
        )
    try:
        vol = luks.Volume(
            got[1], header_offset, cipher, key_size, int(iv_offset), int(offset),
            int(length), options,
        )  # fmt: skip
    except KjumpError as e:
        raise BlockMapError(
            f"the dm-crypt mapping of {dev.name} cannot be rebuilt by the save kernel",
            why=f"{e.what}: {e.why}",
            fix="report this table (dmsetup table)",
        ) from None
    return vol, f"/dev/{lower.name}"


def _require_nocow(fd: int, path: str) -> None:
    if not btrfs.nocow(fd):
        raise BlockMapError(
            f"target {path} is a copy-on-write file on btrfs",
            why="btrfs checksums and relocates such a file's data, so the blocks the save "
            "kernel writes raw would not be the file's (or would fail their checksums)",
            fix=f"remove {path} and run `kjumpctl setup` again: it creates the file "
            "nodatacow (chattr +C) on btrfs",
        )


def _refuse_snapshotted(extents: list[Extent], path: str) -> None:
    shared = next((e for e in extents if e.flags & 0x2000), None)
    if shared is not None:
        raise BlockMapError(
            f"{path} shares blocks with a btrfs snapshot",
            why=f"extent at {shared.logical} is shared: the file's next write would move "
            "it, and a raw write would change the snapshot's copy",
            fix="delete the snapshots that hold it, or recreate the target with `kjumpctl "
            "setup` in a new directory (setup makes that a subvolume of its own, which "
            "snapshots of the subvolume above leave out)",
        )


def _btrfs_to_device(
    sysroot: Sysroot, fd: int, path: str, extents: list[tuple[int, int, int]]
) -> tuple[BlockDev, list[tuple[int, int, int]]]:
    """A btrfs file's extents (btrfs logical addresses) as offsets on its one device."""
    devid, mapped = btrfs.map_extents(btrfs.chunk_map(fd), extents, path)
    node = btrfs.device_paths(fd).get(devid, "")
    try:
        st = os.stat(sysroot.path(node)) if node else None
    except OSError:
        st = None
    if st is None or not stat.S_ISBLK(st.st_mode):
        raise BlockMapError(
            f"cannot find btrfs device {devid} of {path}",
            why=f"btrfs names it {node or 'nothing'}, which is not a block device here",
            fix="check `btrfs filesystem show`",
        )
    return device_by_devno(sysroot, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"), mapped


# -- setup and verification --------------------------------------------------------------------
def stamp(sysroot: Sysroot, target: Target, uuid: str | None = None) -> str:
    """Write the superblock (with the whole-disk block map) at the target's logical 0, then
    read it back from the whole disk with O_DIRECT; returns the target UUID."""
    from kjumpd.image import store
    from kjumpd.image.device import ImageDevice

    real = sysroot.path(target.path)
    if target.kind == "file":
        dev = ImageDevice(real, writable=True)
    else:
        dev = ImageDevice(sysroot.path(target.disk), target.block_extents(), writable=True)
    with dev:
        sb = store.stamp_superblock(dev, target.block_extents(), uuid=uuid)
    verify_on_disk(sysroot, target, sb.uuid_str)
    return sb.uuid_str


def verify_on_disk(sysroot: Sysroot, target: Target, uuid: str) -> None:
    """Read the superblock from the whole disk at the translated offset: magic, UUID, map."""
    from kjumpd.image import store

    try:
        dev, sb = store.open_target(
            sysroot.path(target.disk), writable=False, offset=target.superblock_offset
        )
    except KjumpError as e:
        raise BlockMapError(
            "the target superblock is not where the block map says",
            why=f"{target.disk} at {target.superblock_offset}: {e.message}",
            fix="run `kjumpctl setup` again",
        ) from None
    dev.close()
    if sb.uuid_str != uuid or [tuple(vars(e).values()) for e in sb.blockmap] != [
        tuple(x) for x in target.blockmap
    ]:
        raise BlockMapError(
            "the superblock on disk does not match the target",
            why=f"UUID {sb.uuid_str} vs {uuid}, or another block map",
            fix="run `kjumpctl setup` again",
        )


def _make_target_dir(path: Path) -> None:
    """The target's directory, mode 0700. On btrfs a subvolume of its own: a snapshot of
    the subvolume above (snapper, Timeshift) leaves it out, so it never shares the target's
    blocks, which the save kernel could then not write raw."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        on_btrfs = btrfs.is_btrfs(fd)
    finally:
        os.close(fd)
    if on_btrfs:
        try:
            btrfs.create_subvolume(str(path.parent), path.name)
            os.chmod(path, 0o700)
            log.info("created btrfs subvolume %s for the target", path)
            return
        except OSError as e:
            log.warning("cannot create a btrfs subvolume at %s (%s): a plain directory", path, e)
    path.mkdir(mode=0o700)


def _refuse_to_overwrite(real: os.PathLike[str], path: str) -> None:
    """Setup re-creates a target, or fills an empty file; any other file is the user's and
    is not overwritten."""
    from kjumpd.image import store
    from kjumpd.image.device import ImageDevice

    try:
        st = os.stat(real)
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            return
        with ImageDevice(real, writable=False) as dev:
            store.read_superblock(dev)
    except (OSError, KjumpError) as e:
        raise TargetError(
            f"{path} exists and is not a kjumpd target",
            why=e.strerror or str(e) if isinstance(e, OSError) else e.message,
            fix=f"choose another path, or remove {path} yourself if nothing in it matters",
            path=path,
        ) from None


def setup(sysroot: Sysroot, path: str, size: int) -> tuple[Target, str]:
    """Create (file) or claim (partition) a target, stamp and verify it; (Target, UUID)."""
    from kjumpd.image import store
    from kjumpd.image.device import ImageDevice

    real = sysroot.path(path)
    is_dev = path.startswith("/dev/")
    if not is_dev:
        if size <= 0:
            raise UsageError(
                "setup needs --size for a file target",
                fix="pass --size, e.g. --size 8G (about your RAM in use)",
            )
        parent = real.parent
        if not parent.is_dir():
            _make_target_dir(parent)
        existed = os.path.lexists(real)
        if existed:
            _refuse_to_overwrite(real, path)
        sb = store.create_target(real, size)
        try:
            os.chmod(real, 0o600)
            target = translate(sysroot, path)
            return target, stamp(sysroot, target, sb.uuid_str)
        except KjumpError as e:
            # a file the kernel cannot hold the image in (a refused filesystem, an unknown
            # device) is not left behind as if it were a target; one the user had stays
            if existed:
                raise
            store.discard_new_file(real)
            removed = f"the new file {path} was removed"
            fix = f"{e.fix}; {removed}" if e.fix else removed
            raise type(e)(e.what, why=e.why, fix=fix, **e.context) from None
    target = translate(sysroot, path)
    with ImageDevice(sysroot.path(target.disk), target.block_extents(), writable=True) as dev:
        import uuid as uuidlib

        new_uuid = str(uuidlib.uuid4())
        sb = store.stamp_superblock(dev, target.block_extents(), uuid=new_uuid)
        store.init_header(dev, sb.uuid)
    verify_on_disk(sysroot, target, sb.uuid_str)
    return target, sb.uuid_str


def current(sysroot: Sysroot, path: str, restamp: bool = True) -> tuple[Target, str]:
    """Translate the target again and make sure its superblock matches; re-stamp a file
    target whose extents moved (only with ``restamp``: before anything is frozen)."""
    from kjumpd.image import store
    from kjumpd.image.device import ImageDevice

    target = translate(sysroot, path)
    if target.kind == "file":
        with ImageDevice(sysroot.path(path), writable=False) as dev:
            try:
                sb = store.read_superblock(dev)
            except KjumpError as e:
                raise TargetError(
                    f"{path} is not a kjumpd target", why=e.message, fix="run `kjumpctl setup`"
                ) from None
    else:
        try:
            dev, sb = store.open_target(
                sysroot.path(target.disk), writable=False, offset=target.superblock_offset
            )
            dev.close()
        except KjumpError as e:
            raise TargetError(
                f"{path} is not a kjumpd target", why=e.message, fix="run `kjumpctl setup`"
            ) from None
    recorded = [(e.logical, e.device_offset, e.length) for e in sb.blockmap]
    if recorded != target.blockmap:
        if target.kind != "file" or not restamp:
            raise TargetError(
                f"the superblock of {path} records another block map",
                why="the file's extents moved since it was stamped"
                if target.kind == "file"
                else "the partition changed",
                fix="a hibernation stamps the new map before it freezes anything"
                if target.kind == "file"
                else "run `kjumpctl setup` again",
                moved=target.kind == "file",
            )
        log.info("target %s moved on disk; stamping its new block map", path)
        return target, stamp(sysroot, target, sb.uuid_str)
    verify_on_disk(sysroot, target, sb.uuid_str)
    return target, sb.uuid_str
