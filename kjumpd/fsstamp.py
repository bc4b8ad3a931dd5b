"""Filesystem superblock stamps: the evidence for the stale-image guard (invariant I3).

When A freezes its filesystems for a hibernation, the daemon records one :class:`FsStamp` per
frozen filesystem (call :func:`read_stamp` AFTER FIFREEZE: freezing writes the superblock, so a
stamp taken before the freeze would differ from the disk). The restore-first environment R reads
the same fields again straight from the disk; any difference means the filesystem was mounted or
written after the memory snapshot, and restoring the image would corrupt it.

Stamps are read from the raw block device bytes (O_DIRECT where the device supports it, so the
page cache never answers for the disk), never through a mount:

ext2/3/4 (superblock at 1024, little endian)
    mount_count (s_mnt_count, +1 on every read-write mount), mtime (s_mtime + s_mtime_hi, last
    mount), wtime (s_wtime + s_wtime_hi, last superblock write), kbytes_written, state (s_state),
    feature_incompat (the needs_recovery bit is set by a read-write mount), free_blocks,
    free_inodes, last_orphan, error_count.
xfs (superblock at 0, big endian)
    lsn (sb_lsn, LSN of the last superblock write), icount, ifree, fdblocks, frextents, qflags,
    features_incompat, features_log_incompat, and for an internal log its head: log_cycle (the
    cycle number of the log's first block) and log_head (the first block whose cycle differs,
    found by bisection as xfs's own log recovery does). Every log write (a transaction, the
    unmount record of a read-write mount) moves the head or bumps the cycle.
btrfs (primary superblock at 64 KiB, little endian)
    generation (+1 on every transaction commit), log_root, bytes_used, root, chunk_root.
vfat (boot sector at 0)
    state (the dirty bit Linux sets on a read-write mount), fsinfo_free and fsinfo_next (FAT32
    FSInfo), fat_crc (CRC-32 of the first FAT, at most 16 MiB of it). vfat has no mount counter:
    a rewrite in place of existing clusters that changes no allocation and leaves the volume clean
    is NOT detected.

The record (``to_dict``) is JSON-ready and versioned::

    {"version": 1, "device": "/dev/vda1", "fstype": "ext4", "uuid": "...",
     "fields": {"mount_count": 3, ...}}

``device`` is only a hint (names differ between kernels): R finds a filesystem by fstype + uuid.
"""

from __future__ import annotations

import mmap
import os
import struct
import uuid as uuidlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kjumpd.errors import FsStampError
from kjumpd.sysroot import Sysroot

STAMP_VERSION = 1
_ALIGN = 4096
_FAT_CRC_LIMIT = 16 << 20

FieldValue = int | str


@dataclass(frozen=True)
class FsStamp:
    """What a filesystem's superblock said at one moment."""

    device: str
    fstype: str
    uuid: str
    fields: dict[str, FieldValue] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STAMP_VERSION,
            "device": self.device,
            "fstype": self.fstype,
            "uuid": self.uuid,
            "fields": dict(sorted(self.fields.items())),
        }

    @classmethod
    def from_dict(cls, d: Any) -> FsStamp:
        if not isinstance(d, dict):
            raise FsStampError(
                "filesystem stamp record is not an object",
                fix="re-run the hibernation; the job or image metadata is damaged",
            )
        version = d.get("version")
        if version != STAMP_VERSION:
            raise FsStampError(
                f"filesystem stamp record has version {version!r}",
                why=f"this kjumpd reads version {STAMP_VERSION}",
                fix="restore with the kjumpd version that saved the image",
            )
        try:
            device, fstype, uid, fields = d["device"], d["fstype"], d["uuid"], d["fields"]
        except KeyError as e:
            raise FsStampError(
                f"filesystem stamp record lacks {e.args[0]!r}",
                fix="re-run the hibernation; the record is damaged",
            ) from None
        if not all(isinstance(x, str) for x in (device, fstype, uid)) or not isinstance(
            fields, dict
        ):
            raise FsStampError(
                "filesystem stamp record has fields of the wrong type",
                fix="re-run the hibernation; the record is damaged",
            )
        for k, v in fields.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, str)):
                raise FsStampError(
                    f"filesystem stamp field {k!r} is not an integer or string",
                    fix="re-run the hibernation; the record is damaged",
                )
        return cls(device=device, fstype=fstype, uuid=uid, fields=dict(fields))

    @property
    def key(self) -> tuple[str, str]:
        """(fstype, uuid): how R finds this filesystem again, whatever its device name."""
        return (self.fstype, self.uuid)

    def changed_since(self, other: FsStamp) -> list[str]:
        """Names of what differs between ``other`` (the older stamp) and this one.

        Empty when the filesystem is unchanged. The device name is not compared (it is a hint).
        """
        changed: list[str] = []
        if self.fstype != other.fstype:
            changed.append("fstype")
        if self.uuid != other.uuid:
            changed.append("uuid")
        for name in sorted(set(self.fields) | set(other.fields)):
            if self.fields.get(name) != other.fields.get(name):
                changed.append(name)
        return changed

    def describe_changes(self, other: FsStamp) -> str:
        """One line for a user: "ext4 UUID on /dev/vda1: mount_count 3 -> 4, ..."."""
        parts = []
        for name in self.changed_since(other):
            if name in ("fstype", "uuid"):
                parts.append(f"{name} {getattr(other, name)} -> {getattr(self, name)}")
            else:
                parts.append(f"{name} {other.fields.get(name)} -> {self.fields.get(name)}")
        return f"{other.fstype} {other.uuid} on {self.device}: " + (", ".join(parts) or "unchanged")


# ---------------------------------------------------------------- reading the device


class _Reader:
    """Aligned reads from a block device (O_DIRECT) or a plain file."""

    def __init__(self, path: str) -> None:
        self.path = path
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        self.direct = False
        try:
            self.fd = os.open(path, flags | getattr(os, "O_DIRECT", 0))
            self.direct = hasattr(os, "O_DIRECT")
        except OSError as e:
            if e.errno != 22:  # EINVAL: the filesystem holding a file has no O_DIRECT
                raise
            self.fd = os.open(path, flags)

    def close(self) -> None:
        os.close(self.fd)

    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset >= self.size():
            return b""  # past the end (a superblock field may point anywhere)
        start = offset - offset % _ALIGN
        end = -(-(offset + length) // _ALIGN) * _ALIGN
        buf = mmap.mmap(-1, end - start)
        try:
            try:
                n = os.preadv(self.fd, [buf], start)
            except OSError as e:
                if e.errno != 22 or not self.direct:
                    raise
                # a device with a logical block size above 4 KiB, or a file: buffered read
                self.direct = False
                os.close(self.fd)
                self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                n = os.preadv(self.fd, [buf], start)
            data = bytes(buf[:n])
        finally:
            buf.close()
        return data[offset - start : offset - start + length]


def _u(fmt: str, data: bytes, off: int) -> int:
    return int(struct.unpack_from(fmt, data, off)[0])


# ext2/3/4 -----------------------------------------------------------------

_EXT_MAGIC = 0xEF53


def _parse_ext(read: Callable[[int, int], bytes]) -> tuple[str, str, dict[str, FieldValue]]:
    sb = read(1024, 1024)
    if len(sb) < 1024 or _u("<H", sb, 0x38) != _EXT_MAGIC:
        raise _NotThis()
    compat, incompat = _u("<I", sb, 0x5C), _u("<I", sb, 0x60)
    if incompat & 0x8:
        raise _NotThis()  # an external journal device, not a filesystem
    if incompat & (0x40 | 0x80 | 0x200):
        fstype = "ext4"  # extents, 64bit or flex_bg
    elif compat & 0x4:
        fstype = "ext3"  # has_journal
    else:
        fstype = "ext2"
    fields: dict[str, FieldValue] = {
        "mount_count": _u("<H", sb, 0x34),
        "mtime": _u("<I", sb, 0x2C) | (sb[0x275] << 32),
        "wtime": _u("<I", sb, 0x30) | (sb[0x274] << 32),
        "kbytes_written": _u("<Q", sb, 0x178),
        "state": _u("<H", sb, 0x3A),
        "feature_incompat": incompat,
        "free_blocks": _u("<I", sb, 0x0C) | (_u("<I", sb, 0x158) << 32),
        "free_inodes": _u("<I", sb, 0x10),
        "last_orphan": _u("<I", sb, 0xE8),
        "error_count": _u("<I", sb, 0x194),
    }
    return fstype, str(uuidlib.UUID(bytes=sb[0x68:0x78])), fields


# xfs ----------------------------------------------------------------------

_XFS_MAGIC = b"XFSB"
_XLOG_HEADER_MAGIC = 0xFEEDBABE
_BB = 512


def _xfs_log_head(read: Callable[[int, int], bytes], start: int, nblocks: int) -> tuple[int, int]:
    """(cycle of the first log block, first block whose cycle differs from it; 0 if none)."""

    def cycle(blk: int) -> int:
        b = read(start + blk * _BB, 8)
        if len(b) < 8:
            raise FsStampError(
                "xfs log is beyond the end of the device",
                fix="check the filesystem with xfs_repair -n",
            )
        first = _u(">I", b, 0)
        return _u(">I", b, 4) if first == _XLOG_HEADER_MAGIC else first

    first_cycle = cycle(0)
    if nblocks <= 1 or cycle(nblocks - 1) == first_cycle:
        # the whole log is in one cycle: the head is at the wrap point
        return first_cycle, 0
    lo, hi = 0, nblocks - 1  # cycle(lo) == first_cycle, cycle(hi) != first_cycle
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cycle(mid) == first_cycle:
            lo = mid
        else:
            hi = mid
    return first_cycle, hi


def _parse_xfs(read: Callable[[int, int], bytes]) -> tuple[str, str, dict[str, FieldValue]]:
    sb = read(0, 512)
    if len(sb) < 264 or sb[0:4] != _XFS_MAGIC:
        raise _NotThis()
    blocksize = _u(">I", sb, 4)
    logstart = _u(">Q", sb, 48)
    agblocks = _u(">I", sb, 84)
    logblocks = _u(">I", sb, 96)
    version = _u(">H", sb, 100) & 0xF
    agblklog = sb[124]
    fields: dict[str, FieldValue] = {
        "icount": _u(">Q", sb, 128),
        "ifree": _u(">Q", sb, 136),
        "fdblocks": _u(">Q", sb, 144),
        "frextents": _u(">Q", sb, 152),
        "qflags": _u(">H", sb, 176),
    }
    if version >= 5:
        fields["features_incompat"] = _u(">I", sb, 216)
        fields["features_log_incompat"] = _u(">I", sb, 220)
        fields["lsn"] = _u(">Q", sb, 240)
    if logstart and blocksize and 0 < agblklog < 64:
        agno, agbno = logstart >> agblklog, logstart & ((1 << agblklog) - 1)
        start = (agno * agblocks + agbno) * blocksize
        nbb = logblocks * blocksize // _BB
        fields["log_cycle"], fields["log_head"] = _xfs_log_head(read, start, nbb)
    return "xfs", str(uuidlib.UUID(bytes=sb[32:48])), fields


# btrfs --------------------------------------------------------------------

_BTRFS_OFFSET = 64 << 10
_BTRFS_MAGIC = b"_BHRfS_M"


def _parse_btrfs(read: Callable[[int, int], bytes]) -> tuple[str, str, dict[str, FieldValue]]:
    sb = read(_BTRFS_OFFSET, 4096)
    if len(sb) < 4096 or sb[64:72] != _BTRFS_MAGIC:
        raise _NotThis()
    fields: dict[str, FieldValue] = {
        "generation": _u("<Q", sb, 72),
        "root": _u("<Q", sb, 80),
        "chunk_root": _u("<Q", sb, 88),
        "log_root": _u("<Q", sb, 96),
        "bytes_used": _u("<Q", sb, 120),
    }
    return "btrfs", str(uuidlib.UUID(bytes=sb[32:48])), fields


# vfat ---------------------------------------------------------------------


def _parse_vfat(read: Callable[[int, int], bytes]) -> tuple[str, str, dict[str, FieldValue]]:
    bs = read(0, 512)
    if len(bs) < 512 or bs[510:512] != b"\x55\xaa":
        raise _NotThis()
    bytes_per_sector = _u("<H", bs, 11)
    sectors_per_cluster = bs[13]
    reserved = _u("<H", bs, 14)
    nfats = bs[16]
    fatsz16 = _u("<H", bs, 22)
    if (
        bytes_per_sector not in (512, 1024, 2048, 4096)
        or sectors_per_cluster == 0
        or sectors_per_cluster & (sectors_per_cluster - 1)
        or reserved == 0
        or nfats == 0
    ):
        raise _NotThis()
    fat32 = fatsz16 == 0
    if fat32:
        if bs[0x52:0x57] != b"FAT32":
            raise _NotThis()
        fatsz = _u("<I", bs, 36)
        volid, state = _u("<I", bs, 0x43), bs[0x41]
    else:
        if bs[0x36:0x39] != b"FAT":
            raise _NotThis()
        fatsz = fatsz16
        volid, state = _u("<I", bs, 0x27), bs[0x25]
    fields: dict[str, FieldValue] = {"state": state}
    if fat32:
        fsinfo_sector = _u("<H", bs, 48)
        if 0 < fsinfo_sector < reserved:
            fi = read(fsinfo_sector * bytes_per_sector, 512)
            if len(fi) == 512 and fi[0:4] == b"RRaA" and fi[484:488] == b"rrAa":
                fields["fsinfo_free"] = _u("<I", fi, 488)
                fields["fsinfo_next"] = _u("<I", fi, 492)
    fat_len = min(fatsz * bytes_per_sector, _FAT_CRC_LIMIT)
    fat = read(reserved * bytes_per_sector, fat_len)
    fields["fat_crc"] = zlib.crc32(fat)
    return "vfat", f"{volid >> 16:04X}-{volid & 0xFFFF:04X}", fields


class _NotThis(Exception):
    """Internal: the bytes are not this filesystem."""


_PARSERS = (_parse_ext, _parse_xfs, _parse_btrfs, _parse_vfat)

#: filesystem types a stamp can be taken of
SUPPORTED = ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat")


def parse_stamp(read: Callable[[int, int], bytes], device: str) -> FsStamp:
    """The stamp of the filesystem that ``read(offset, length)`` returns bytes of (pure)."""
    for parser in _PARSERS:
        try:
            fstype, uid, fields = parser(read)
        except _NotThis:
            continue
        except (struct.error, IndexError, ValueError) as e:
            raise FsStampError(
                f"the superblock on {device} does not parse",
                why=str(e),
                fix="check the filesystem (fsck)",
                device=device,
            ) from e
        return FsStamp(device=device, fstype=fstype, uuid=uid, fields=fields)
    raise FsStampError(
        f"{device} holds no filesystem kjumpd can stamp",
        why="no ext2/3/4, xfs, btrfs or vfat superblock found",
        fix="exclude it from the hibernation or use a supported filesystem",
        device=device,
    )


def read_stamp(device_path: str | os.PathLike[str], *, sysroot: Sysroot | None = None) -> FsStamp:
    """Read the stamp of the filesystem on ``device_path`` (a block device or an image file).

    With ``sysroot``, ``device_path`` is a system path ("/dev/vda1") mapped through it; the
    stamp records the system path either way.
    """
    name = os.fspath(device_path)
    real = str(sysroot.path(name)) if sysroot is not None else name
    try:
        reader = _Reader(real)
    except OSError as e:
        raise FsStampError(
            f"cannot open {name} to read its superblock",
            why=e.strerror or str(e),
            fix="check that the device exists and you are root",
            device=name,
        ) from e
    try:
        return parse_stamp(reader.read, name)
    except OSError as e:
        raise FsStampError(
            f"cannot read the superblock of {name}",
            why=e.strerror or str(e),
            fix="check the device (dmesg)",
            device=name,
        ) from e
    finally:
        reader.close()


def block_devices(sysroot: Sysroot) -> list[str]:
    """Every block device and partition the kernel lists in /sys/class/block, as /dev paths.

    Loop and ram devices without a backing are skipped (size 0). Order: by name.
    """
    out = []
    for name in sysroot.listdir("/sys/class/block"):
        size = sysroot.read_text(f"/sys/class/block/{name}/size", default="0").strip()
        if not size.isdigit() or int(size) == 0:
            continue
        out.append(f"/dev/{name}")
    return out


def scan(sysroot: Sysroot) -> dict[tuple[str, str], list[FsStamp]]:
    """Stamps of every filesystem found on the block devices, keyed by (fstype, uuid)."""
    found: dict[tuple[str, str], list[FsStamp]] = {}
    for dev in block_devices(sysroot):
        try:
            st = read_stamp(dev, sysroot=sysroot)
        except FsStampError:
            continue
        found.setdefault(st.key, []).append(st)
    return found
