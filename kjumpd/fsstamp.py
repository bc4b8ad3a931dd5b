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

A filesystem on a device-mapper linear device (LVM) is invisible to R, which assembles no
stacked devices; its record then also carries the device's map onto its whole disk,
``"extents": [[logical, disk_offset, length], ...]`` (bytes, in logical order), and R reads
the superblock through that map on each whole disk (:func:`scan` with ``recorded``). The
map is evidence like the fields: an LV moved since the freeze reads as "not found".

Below dm-crypt R holds no key, so it cannot parse the superblock; but dm-crypt encrypts
each sector in place and deterministically (same key, sector and plaintext: same
ciphertext). The record of such a filesystem also carries ``"ciphertext": [[offset,
length, crc32], ...]``: the raw bytes on the disk, through the map, of every range the
superblock parser read in A (widened to 4 KiB, dm-crypt's largest sector), and its fields
gain ``"ciphertext": "as frozen"``. R compares those CRCs: a mount anywhere changes the
superblock's plaintext, hence its ciphertext.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import uuid as uuidlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kjumpd.errors import FsStampError
from kjumpd.sysroot import Sysroot

STAMP_VERSION = 1
_ALIGN = 4096
_FAT_CRC_LIMIT = 16 << 20
#: the largest ciphertext region a record may name (the FAT read is the largest)
_REGION_LIMIT = _FAT_CRC_LIMIT + _ALIGN
#: regions a record may name (an xfs log bisection reads about 40 blocks)
_REGIONS_MAX = 256
#: extents a map may have (an LV has a handful of segments; R searches them on every read)
_EXTENTS_MAX = 4096

FieldValue = int | str


@dataclass(frozen=True)
class FsStamp:
    """What a filesystem's superblock said at one moment."""

    device: str
    fstype: str
    uuid: str
    fields: dict[str, FieldValue] = field(default_factory=dict)
    #: the filesystem's device mapped onto its whole disk, for a stacked device (LVM)
    extents: tuple[tuple[int, int, int], ...] = ()
    #: below dm-crypt: (offset, length, crc32) of the encrypted bytes the stamp came from
    ciphertext: tuple[tuple[int, int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": STAMP_VERSION,
            "device": self.device,
            "fstype": self.fstype,
            "uuid": self.uuid,
            "fields": dict(sorted(self.fields.items())),
        }
        if self.extents:
            d["extents"] = [list(e) for e in self.extents]
        if self.ciphertext:
            d["ciphertext"] = [list(r) for r in self.ciphertext]
        return d

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
        return cls(
            device=device,
            fstype=fstype,
            uuid=uid,
            fields=dict(fields),
            extents=_extents_of(d.get("extents", [])),
            ciphertext=_regions_of(d.get("ciphertext", [])),
        )

    @property
    def key(self) -> tuple[str, str]:
        """(fstype, uuid): how R finds this filesystem again, whatever its device name."""
        return (self.fstype, self.uuid)

    def changed_since(self, other: FsStamp) -> list[str]:
        """Names of what differs between ``other`` (the older stamp) and this one.

        Empty when the filesystem is unchanged. The device name is not compared (it is a hint).
        A stamp below dm-crypt read in plaintext (R unlocked the volume holding it) is
        compared by its superblock's fields alone: "ciphertext" only says how the other
        stamp was read, and the fields it stands in for are there to compare.
        """
        changed: list[str] = []
        if self.fstype != other.fstype:
            changed.append("fstype")
        if self.uuid != other.uuid:
            changed.append("uuid")
        how = {"ciphertext"} if not (self.ciphertext and other.ciphertext) else set()
        for name in sorted((set(self.fields) | set(other.fields)) - how):
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


def _extents_of(raw: Any) -> tuple[tuple[int, int, int], ...]:
    """A record's ``extents``: [logical, disk offset, length] triples covering 0.. in order."""
    bad = FsStampError(
        "filesystem stamp record has a bad extent map",
        why=f"extents {str(raw)[:80]}",
        fix="re-run the hibernation; the record is damaged",
    )
    if not isinstance(raw, list) or len(raw) > _EXTENTS_MAX:
        raise bad
    out: list[tuple[int, int, int]] = []
    pos = 0
    for e in raw:
        if (
            not isinstance(e, list)
            or len(e) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in e)
            or e[0] != pos
            or e[2] == 0
        ):
            raise bad
        out.append((e[0], e[1], e[2]))
        pos += e[2]
    return tuple(out)


def _regions_of(raw: Any) -> tuple[tuple[int, int, int], ...]:
    """A record's ``ciphertext``: [offset, length, crc32] triples, bounded (R reads them all
    at every boot that finds an image: a damaged or crafted record must not keep it busy)."""
    if not isinstance(raw, list) or not all(
        isinstance(r, list)
        and len(r) == 3
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r)
        and 0 < r[1] <= _REGION_LIMIT
        and r[2] < 1 << 32
        for r in raw
    ):
        raise FsStampError(
            "filesystem stamp record has bad ciphertext regions",
            why=f"ciphertext {str(raw)[:80]}",
            fix="re-run the hibernation; the record is damaged",
        )
    if len(raw) > _REGIONS_MAX or sum(r[1] for r in raw) > 2 * _REGION_LIMIT:
        raise FsStampError(
            "filesystem stamp record names too much ciphertext",
            why=f"{len(raw)} regions, {sum(r[1] for r in raw)} bytes",
            fix="re-run the hibernation; the record is damaged",
        )
    return tuple((r[0], r[1], r[2]) for r in raw)


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


class _MappedReader:
    """Reads of a stacked device's bytes straight from its whole disk, through its map."""

    def __init__(self, disk: _Reader, extents: tuple[tuple[int, int, int], ...]) -> None:
        self.disk = disk
        self.extents = extents

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            ext = next((e for e in self.extents if e[0] <= offset < e[0] + e[2]), None)
            if ext is None:
                break  # past the end, as for a device
            n = min(length, ext[0] + ext[2] - offset)
            piece = self.disk.read(ext[1] + offset - ext[0], n)
            out += piece
            if len(piece) < n:
                break
            offset, length = offset + n, length - n
        return bytes(out)


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


@contextlib.contextmanager
def _opened(device: str, sysroot: Sysroot | None) -> Iterator[_Reader]:
    """A reader of ``device`` (a system path mapped through ``sysroot``); an OSError opening
    or reading it becomes an FsStampError naming the device."""
    real = str(sysroot.path(device)) if sysroot is not None else device
    try:
        reader = _Reader(real)
    except OSError as e:
        raise FsStampError(
            f"cannot open {device} to read its superblock",
            why=e.strerror or str(e),
            fix="check that the device exists and you are root",
            device=device,
        ) from e
    try:
        yield reader
    except OSError as e:
        raise FsStampError(
            f"cannot read the superblock of {device}",
            why=e.strerror or str(e),
            fix="check the device (dmesg)",
            device=device,
        ) from e
    finally:
        reader.close()


def read_stamp(device_path: str | os.PathLike[str], *, sysroot: Sysroot | None = None) -> FsStamp:
    """Read the stamp of the filesystem on ``device_path`` (a block device or an image file).

    With ``sysroot``, ``device_path`` is a system path ("/dev/vda1") mapped through it; the
    stamp records the system path either way.
    """
    name = os.fspath(device_path)
    with _opened(name, sysroot) as reader:
        return parse_stamp(reader.read, name)


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


def read_mapped(
    disk: str, extents: tuple[tuple[int, int, int], ...], *, sysroot: Sysroot | None = None
) -> FsStamp:
    """The stamp of a filesystem on a stacked device, read from ``disk`` through its map."""
    with _opened(disk, sysroot) as reader:
        st = parse_stamp(_MappedReader(reader, extents).read, f"{disk} (mapped)")
    return FsStamp(st.device, st.fstype, st.uuid, st.fields, extents)


def read_stamp_sealed(
    device: str,
    disk: str,
    extents: tuple[tuple[int, int, int], ...],
    *,
    sysroot: Sysroot | None = None,
) -> FsStamp:
    """The stamp of a filesystem below dm-crypt: parsed from ``device`` (plaintext), with
    the CRCs of the ciphertext of what the parser read, from ``disk`` through ``extents``."""
    reads: list[tuple[int, int]] = []
    with _opened(device, sysroot) as reader:

        def read(offset: int, length: int) -> bytes:
            data = reader.read(offset, length)
            if data:
                reads.append((offset, len(data)))
            return data

        st = parse_stamp(read, device)
    ranges = _widen(reads)
    crcs = ciphertext_crcs(disk, extents, ranges, sysroot=sysroot)
    regions = []
    for (off, n), crc in zip(ranges, crcs, strict=True):
        if crc is None:
            raise FsStampError(
                f"the superblock of {device} is not all on {disk} through its map",
                why=f"bytes {off}..{off + n} are outside the map or the disk",
                fix="report this device-mapper table (dmsetup table)",
                device=device,
            )
        regions.append((off, n, crc))
    return FsStamp(
        st.device,
        st.fstype,
        st.uuid,
        {**st.fields, "ciphertext": "as frozen"},
        extents,
        tuple(regions),
    )


def _widen(reads: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges widened to whole 4 KiB blocks, merged, in order."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(reads):
        start = off - off % _ALIGN
        end = -(-(off + n) // _ALIGN) * _ALIGN
        if out and start <= out[-1][0] + out[-1][1]:
            s0 = out[-1][0]
            out[-1] = (s0, max(out[-1][1], end - s0))
        else:
            out.append((start, end - start))
    return out


def ciphertext_crcs(
    disk: str,
    extents: tuple[tuple[int, int, int], ...],
    regions: list[tuple[int, int]],
    *,
    sysroot: Sysroot | None = None,
) -> list[int | None]:
    """CRC-32 of each (offset, length) of a stacked device, read raw from ``disk`` through
    ``extents``; None for a region the disk does not hold whole."""
    with _opened(disk, sysroot) as reader:
        mapped = _MappedReader(reader, extents)
        out: list[int | None] = []
        for off, n in regions:
            data = mapped.read(off, n)
            out.append(zlib.crc32(data) if len(data) == n else None)
        return out


def _sealed_on(disk: str, old: FsStamp, sysroot: Sysroot) -> FsStamp | None:
    """``old`` (a stamp below dm-crypt) as ``disk`` holds it now: unchanged when every
    ciphertext region matches, changed when some do, None when none does (not this disk)."""
    try:
        crcs = ciphertext_crcs(
            disk, old.extents, [(o, n) for o, n, _ in old.ciphertext], sysroot=sysroot
        )
    except FsStampError:
        return None
    same = sum(1 for crc, (_o, _n, want) in zip(crcs, old.ciphertext, strict=True) if crc == want)
    if same == 0:
        return None
    fields = dict(old.fields)
    if same < len(crcs):
        fields["ciphertext"] = f"changed in {len(crcs) - same} of {len(crcs)} regions"
    return FsStamp(
        f"{disk} (encrypted, mapped)", old.fstype, old.uuid, fields, old.extents, old.ciphertext
    )


def scan(
    sysroot: Sysroot, recorded: list[dict[str, Any]] | None = None
) -> dict[tuple[str, str], list[FsStamp]]:
    """Stamps of every filesystem found on the block devices, keyed by (fstype, uuid).

    ``recorded``: stamp records; a record with a map whose filesystem is on no device this
    kernel lists is looked for through its map on every whole disk (/sys/block); one below
    dm-crypt by the CRCs of its ciphertext."""
    found: dict[tuple[str, str], list[FsStamp]] = {}
    for dev in block_devices(sysroot):
        try:
            st = read_stamp(dev, sysroot=sysroot)
        except FsStampError:
            continue
        found.setdefault(st.key, []).append(st)
    for rec in recorded or []:
        try:
            old = FsStamp.from_dict(rec)
        except FsStampError:
            continue  # the decision names a bad record
        if not old.extents or old.key in found:
            continue
        for name in sysroot.listdir("/sys/block"):
            if old.ciphertext:
                got = _sealed_on(f"/dev/{name}", old, sysroot)
                if got is not None:
                    found.setdefault(got.key, []).append(got)
                continue
            try:
                st = read_mapped(f"/dev/{name}", old.extents, sysroot=sysroot)
            except FsStampError:
                continue
            if st.key == old.key:
                found.setdefault(st.key, []).append(st)
    return found
