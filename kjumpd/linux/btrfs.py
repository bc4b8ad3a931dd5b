"""btrfs addresses for a raw writer: the chunk tree, the devices, the nodatacow attribute.

FIEMAP on btrfs reports *btrfs logical* addresses, not device offsets: every byte of a
btrfs filesystem lives in a chunk, and the chunk tree (tree 3) maps each chunk's logical
range onto one stripe per copy: (device id, byte offset on that device). A file the save
kernel may write raw must therefore be

* nodatacow (``chattr +C`` before its first byte): btrfs keeps no checksum for its data
  and rewrites it in place, so the blocks B writes are the file's blocks and read back as
  written in A;
* in chunks of the "single" profile (one stripe): with DUP, RAID1, RAID10 or parity
  profiles a raw write reaches one copy and the others go stale, and btrfs may read either;
* on one device, which ``BTRFS_IOC_DEV_INFO`` names.

The kernel's layouts read here (include/uapi/linux/btrfs.h, btrfs_tree.h; little endian):

``btrfs_ioctl_search_args`` (4096 bytes): key (104 bytes: tree_id, min/max objectid,
min/max offset, min/max transid as u64; min/max type, nr_items, unused as u32; 4 unused
u64), then results: per item a 32-byte header (transid, objectid, offset u64; type, len
u32) followed by ``len`` bytes.

``btrfs_chunk`` item (key objectid 256, type 228, offset = logical start): length, owner,
stripe_len, type (u64); io_align, io_width, sector_size (u32); num_stripes, sub_stripes
(u16); then ``num_stripes`` stripes of 32 bytes: devid, offset (u64), dev_uuid (16).

Pure parsing and mapping here; :func:`chunk_map`, :func:`device_paths`, :func:`nocow`
and :func:`set_nocow` are the thin ioctl edge.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from kjumpd.errors import BlockMapError

SUPER_MAGIC = 0x9123683E
CHUNK_TREE = 3
FIRST_CHUNK_TREE_OBJECTID = 256
CHUNK_ITEM_KEY = 228

# _IOWR(0x94, 17, 4096), _IOR(0x94, 31, 1024), _IOWR(0x94, 30, 4096), _IOW(0x94, 14, 4096)
IOC_TREE_SEARCH = 0xD0009411
IOC_SUBVOL_CREATE = 0x5000940E
IOC_FS_INFO = 0x8400941F
IOC_DEV_INFO = 0xD000941E
# _IOR('f', 1, long), _IOW('f', 2, long): the flags are an int
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000

_SEARCH_KEY = struct.Struct("<7Q4I4Q")  # 104 bytes
_SEARCH_HDR = struct.Struct("<3Q2I")  # 32 bytes
_CHUNK = struct.Struct("<4Q3I2H")  # 48 bytes
_STRIPE = struct.Struct("<2Q16s")  # 32 bytes
SEARCH_ARGS_SIZE = 4096
_U64_MAX = (1 << 64) - 1

BLOCK_GROUP_DATA = 0x1
BLOCK_GROUP_SYSTEM = 0x2
BLOCK_GROUP_METADATA = 0x4
#: profiles with more than one copy or stripe, by name (block group type bits)
PROFILES = {
    0x8: "RAID0",
    0x10: "RAID1",
    0x20: "DUP",
    0x40: "RAID10",
    0x80: "RAID5",
    0x100: "RAID6",
    0x200: "RAID1C3",
    0x400: "RAID1C4",
}


@dataclass(frozen=True)
class Stripe:
    devid: int
    offset: int  # bytes on the device


@dataclass(frozen=True)
class Chunk:
    logical: int
    length: int
    type: int
    stripes: tuple[Stripe, ...]

    @property
    def profile(self) -> str:
        names = [n for bit, n in PROFILES.items() if self.type & bit]
        return "+".join(names) or "single"

    @property
    def is_data(self) -> bool:
        return bool(self.type & BLOCK_GROUP_DATA)


def search_key(tree_id: int, objectid: int, item_type: int, min_offset: int, nr: int) -> bytes:
    """The 104-byte search key: items of one objectid and type from ``min_offset`` on."""
    return _SEARCH_KEY.pack(
        tree_id, objectid, objectid, min_offset, _U64_MAX, 0, _U64_MAX,
        item_type, item_type, nr, 0, 0, 0, 0, 0,
    )  # fmt: skip


def parse_search(buf: bytes | bytearray, nr_items: int) -> list[tuple[int, int, int, bytes]]:
    """(objectid, type, offset, item bytes) of the ``nr_items`` results in a search buffer."""
    out = []
    pos = _SEARCH_KEY.size
    for _ in range(nr_items):
        if pos + _SEARCH_HDR.size > len(buf):
            raise BlockMapError(
                "the btrfs tree search returned a truncated result",
                why=f"item header at {pos} past {len(buf)} bytes",
                fix="report this kernel version",
            )
        _transid, objectid, offset, typ, length = _SEARCH_HDR.unpack_from(buf, pos)
        pos += _SEARCH_HDR.size
        if pos + length > len(buf):
            raise BlockMapError(
                "the btrfs tree search returned a truncated item",
                why=f"{length} bytes at {pos} past {len(buf)}",
                fix="report this kernel version",
            )
        out.append((objectid, typ, offset, bytes(buf[pos : pos + length])))
        pos += length
    return out


def parse_chunk(logical: int, data: bytes) -> Chunk:
    """One chunk item (the key's offset is its logical start)."""
    if len(data) < _CHUNK.size:
        raise BlockMapError(
            "a btrfs chunk item is too short",
            why=f"{len(data)} bytes at logical {logical}",
            fix="check the filesystem (btrfs check)",
        )
    length, _owner, _stripe_len, typ, _a, _w, _s, num, _sub = _CHUNK.unpack_from(data, 0)
    if num == 0 or len(data) < _CHUNK.size + num * _STRIPE.size:
        raise BlockMapError(
            "a btrfs chunk item has a bad stripe count",
            why=f"{num} stripes in {len(data)} bytes at logical {logical}",
            fix="check the filesystem (btrfs check)",
        )
    stripes = tuple(
        Stripe(*_STRIPE.unpack_from(data, _CHUNK.size + i * _STRIPE.size)[:2]) for i in range(num)
    )
    return Chunk(logical, length, typ, stripes)


def map_extents(
    chunks: list[Chunk], extents: list[tuple[int, int, int]], path: str = "target"
) -> tuple[int, list[tuple[int, int, int]]]:
    """(file offset, btrfs logical, length) -> (device id, [(file offset, device offset,
    length)]). Every byte must be in a single-profile data chunk on one device."""
    ordered = sorted(chunks, key=lambda c: c.logical)
    devid: int | None = None
    out: list[tuple[int, int, int]] = []
    for lo, addr, ln in extents:
        while ln > 0:
            chunk = next((c for c in ordered if c.logical <= addr < c.logical + c.length), None)
            if chunk is None:
                raise BlockMapError(
                    f"{path}: btrfs logical address {addr} is in no chunk",
                    why="the chunk tree does not cover the file's extents (it changed "
                    "while it was read?)",
                    fix="try again; if it persists, check the filesystem (btrfs check)",
                )
            if not chunk.is_data:
                raise BlockMapError(
                    f"{path}: btrfs logical address {addr} is in a chunk without data",
                    why=f"chunk at {chunk.logical} has type {chunk.type:#x}",
                    fix="check the filesystem (btrfs check)",
                )
            if len(chunk.stripes) != 1 or chunk.type & sum(PROFILES):
                raise BlockMapError(
                    f"{path} is in a btrfs chunk of the {chunk.profile} profile",
                    why="the save kernel writes one copy of each block; with several "
                    "copies or stripes btrfs could read another one",
                    fix="convert the data to the single profile (btrfs balance start "
                    "-dconvert=single) or put the target on another filesystem",
                )
            stripe = chunk.stripes[0]
            if devid is not None and stripe.devid != devid:
                raise BlockMapError(
                    f"{path} spans several btrfs devices",
                    why=f"devices {devid} and {stripe.devid}",
                    fix="put the target on a single-device btrfs or another filesystem",
                )
            devid = stripe.devid
            n = min(ln, chunk.logical + chunk.length - addr)
            out.append((lo, stripe.offset + addr - chunk.logical, n))
            lo, addr, ln = lo + n, addr + n, ln - n
    if devid is None:
        raise BlockMapError(f"{path} has no extents", fix="recreate it with `kjumpctl setup`")
    return devid, out


# -- the ioctl edge ----------------------------------------------------------------------------
def _ioctl_error(what: str, e: OSError) -> BlockMapError:
    return BlockMapError(
        f"cannot read {what} of the btrfs filesystem",
        why=e.strerror or str(e),
        fix="run kjumpd as root on a kernel with btrfs",
    )


def chunk_map(fd: int) -> list[Chunk]:
    """Every chunk of the filesystem that ``fd`` (any file on it) is on."""
    chunks: list[Chunk] = []
    offset = 0
    while True:
        buf = bytearray(SEARCH_ARGS_SIZE)
        buf[: _SEARCH_KEY.size] = search_key(
            CHUNK_TREE, FIRST_CHUNK_TREE_OBJECTID, CHUNK_ITEM_KEY, offset, 4096
        )
        try:
            fcntl.ioctl(fd, IOC_TREE_SEARCH, buf, True)
        except OSError as e:
            raise _ioctl_error("the chunk tree", e) from None
        nr = _SEARCH_KEY.unpack_from(buf, 0)[9]
        if nr == 0:
            return chunks
        items = parse_search(buf, nr)
        for objectid, typ, off, data in items:
            if objectid == FIRST_CHUNK_TREE_OBJECTID and typ == CHUNK_ITEM_KEY:
                chunks.append(parse_chunk(off, data))
        last = items[-1][2]
        if last == _U64_MAX:
            return chunks
        offset = last + 1


def device_paths(fd: int) -> dict[int, str]:
    """Device id -> the path btrfs knows it by, for every device of the filesystem."""
    info = bytearray(1024)
    try:
        fcntl.ioctl(fd, IOC_FS_INFO, info, True)
    except OSError as e:
        raise _ioctl_error("the device list", e) from None
    max_id = struct.unpack_from("<Q", info, 0)[0]
    out: dict[int, str] = {}
    for devid in range(1, max_id + 1):
        args = bytearray(4096)
        struct.pack_into("<Q", args, 0, devid)
        try:
            fcntl.ioctl(fd, IOC_DEV_INFO, args, True)
        except OSError as e:
            if e.errno == errno.ENODEV:  # a removed device leaves a gap in the ids
                continue
            raise _ioctl_error(f"device {devid}", e) from None
        out[devid] = bytes(args[3072:]).split(b"\0", 1)[0].decode(errors="replace")
    return out


def _flags(fd: int) -> int:
    buf = bytearray(8)
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return int(struct.unpack_from("<i", buf, 0)[0]) & 0xFFFFFFFF


def nocow(fd: int) -> bool:
    """Whether the file is nodatacow (``chattr +C``)."""
    try:
        return bool(_flags(fd) & FS_NOCOW_FL)
    except OSError as e:
        raise _ioctl_error("the file attributes", e) from None


def set_nocow(fd: int) -> None:
    """Make an empty file nodatacow (btrfs honours it only before the first byte)."""
    flags = _flags(fd) | FS_NOCOW_FL
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("<I", flags))


def create_subvolume(parent: str, name: str) -> None:
    """Create subvolume ``name`` in directory ``parent`` (``btrfs subvolume create``).
    ``btrfs_ioctl_vol_args``: fd (s64, unused here), then the name, NUL-padded to 4096."""
    raw = name.encode()
    if not raw or b"/" in raw or len(raw) > 4087:
        raise ValueError(f"not a subvolume name: {name!r}")
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        args = bytearray(struct.pack("<q", 0) + raw.ljust(4088, b"\0"))  # over ioctl's 1 KiB copy
        fcntl.ioctl(fd, IOC_SUBVOL_CREATE, args, True)
    finally:
        os.close(fd)


def fs_magic(fd: int) -> int:
    """f_type of statfs(2) (os.fstatvfs does not expose it); 0 when it cannot be read."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = (ctypes.c_long * 16)()
    if libc.fstatfs(fd, buf) != 0:
        return 0
    return int(buf[0]) & 0xFFFFFFFF


def is_btrfs(fd: int) -> bool:
    return fs_magic(fd) == SUPER_MAGIC


__all__ = [
    "Chunk",
    "create_subvolume",
    "Stripe",
    "chunk_map",
    "device_paths",
    "is_btrfs",
    "map_extents",
    "nocow",
    "parse_chunk",
    "parse_search",
    "set_nocow",
]
