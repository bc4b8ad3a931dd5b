"""Device-mapper through its ioctls (/dev/mapper/control), for the save kernel and the
restore-first environment, which have no dmsetup: create a device from a one-line table,
read a device's table back, remove it.

The ioctl buffer (include/uapi/linux/dm-ioctl.h, interface version 4), native endian::

    struct dm_ioctl                      312 bytes
        u32 version[3]                   4, 0, 0 in; the kernel's out
        u32 data_size                    the whole buffer
        u32 data_start                   where the payload starts (312)
        u32 target_count
        s32 open_count
        u32 flags                        DM_SECURE_DATA: the kernel wipes its copy (keys)
        u32 event_nr
        u32 padding
        u64 dev                          out: the device number (huge_encode_dev)
        char name[128]
        char uuid[129]
        char data[7]
    then, for DM_TABLE_LOAD, one struct dm_target_spec per target:
        u64 sector_start, u64 length, s32 status, u32 next (from this spec to the next,
        8-aligned), char target_type[16], then the parameters, NUL-terminated.

A device is created (DM_DEV_CREATE), given its table (DM_TABLE_LOAD) and activated
(DM_DEV_SUSPEND without the suspend flag, which is how dmsetup resumes). devtmpfs makes its
node, /dev/dm-N.

DM_TABLE_STATUS with DM_STATUS_TABLE_FLAG answers with the live table: target_count specs
from data_start, each ``next`` counted from data_start, parameters as dmsetup's ``table
--showkeys`` prints them (a dm-crypt key in hex unless it sits in the kernel keyring). A
buffer too small for the answer comes back with DM_BUFFER_FULL_FLAG set.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

from kjumpd.errors import VolumeError

CONTROL = "/dev/mapper/control"
HEADER = struct.Struct("=3I I I I i I I I Q 128s 129s 7s")
SPEC = struct.Struct("=Q Q i I 16s")
assert HEADER.size == 312 and SPEC.size == 40

_IOWR = 3 << 30
DM_DEV_CREATE = _IOWR | (HEADER.size << 16) | (0xFD << 8) | 3
DM_DEV_REMOVE = _IOWR | (HEADER.size << 16) | (0xFD << 8) | 4
DM_DEV_SUSPEND = _IOWR | (HEADER.size << 16) | (0xFD << 8) | 6
DM_TABLE_LOAD = _IOWR | (HEADER.size << 16) | (0xFD << 8) | 9
DM_TABLE_STATUS = _IOWR | (HEADER.size << 16) | (0xFD << 8) | 12
DM_STATUS_TABLE_FLAG = 1 << 4
DM_BUFFER_FULL_FLAG = 1 << 8
DM_SECURE_DATA_FLAG = 1 << 15
VERSION = (4, 0, 0)


@dataclass(frozen=True)
class TableLine:
    """One target of a table, as dmsetup writes it: start and length in 512-byte sectors."""

    start: int
    length: int
    target_type: str
    params: str

    def __post_init__(self) -> None:
        if self.start < 0 or self.length <= 0:
            raise VolumeError(f"a device-mapper target of {self.length} sectors")
        if not self.target_type or len(self.target_type.encode()) > 15:
            raise VolumeError(f"device-mapper target type {self.target_type!r}")


def pack(
    name: str, flags: int = 0, table: list[TableLine] | None = None, room: int = 0
) -> bytearray:
    """The ioctl buffer for device ``name`` with ``table`` (for DM_TABLE_LOAD), and ``room``
    bytes more for the kernel's answer."""
    raw = name.encode()
    if not raw or len(raw) >= 128 or "/" in name:
        raise VolumeError(f"device-mapper name {name!r}", why="1 to 127 bytes, no '/'")
    payload = b""
    for t in table or []:
        params = t.params.encode() + b"\0"
        size = SPEC.size + len(params)
        size += -size % 8
        spec = SPEC.pack(t.start, t.length, 0, size, t.target_type.encode())
        payload += (spec + params).ljust(size, b"\0")
    total = HEADER.size + len(payload) + room
    head = HEADER.pack(
        *VERSION,
        total,
        HEADER.size,
        len(table or []),
        0,
        flags,
        0,
        0,
        0,
        raw,
        b"",
        b"",
    )
    return bytearray(head + payload + bytes(room))


def unpack_dev(buf: bytes | bytearray) -> tuple[int, int]:
    """(major, minor) from a buffer the kernel filled (huge_encode_dev)."""
    dev = HEADER.unpack_from(buf)[10]
    return (dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def unpack_table(buf: bytes | bytearray) -> list[TableLine]:
    """The targets of a DM_TABLE_STATUS answer."""
    fields = HEADER.unpack_from(buf)
    size, start, count = fields[3], fields[4], fields[5]
    if size > len(buf) or start > size:
        raise VolumeError("device-mapper's answer does not fit its buffer")
    data = bytes(buf[start:size])
    lines, at = [], 0
    for _ in range(count):
        if at + SPEC.size > len(data):
            raise VolumeError("device-mapper's table answer is cut short")
        sector, length, _status, nxt, kind = SPEC.unpack_from(data, at)
        end = data.find(b"\0", at + SPEC.size)
        if end < 0:
            raise VolumeError("device-mapper's table answer is cut short")
        params = data[at + SPEC.size : end].decode("ascii", "replace")
        lines.append(TableLine(sector, length, kind.split(b"\0", 1)[0].decode(), params))
        if nxt <= at:
            break
        at = nxt
    return lines


def _ioctl(request: int, buf: bytearray, what: str, control: str) -> bytearray:
    try:
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise VolumeError(
            f"cannot open {control}",
            why=e.strerror or str(e),
            fix="this kernel needs device-mapper (CONFIG_BLK_DEV_DM) and devtmpfs",
        ) from None
    try:
        fcntl.ioctl(fd, request, buf, True)
    except OSError as e:
        raise VolumeError(
            f"device-mapper refused to {what}",
            why=e.strerror or str(e),
            fix="the kernel log (dmesg) names the reason; a crypt table needs "
            "CONFIG_DM_CRYPT and the cipher (e.g. CONFIG_CRYPTO_XTS, CONFIG_CRYPTO_AES)",
        ) from None
    finally:
        os.close(fd)
    return buf


def create(name: str, table: list[TableLine], control: str = CONTROL) -> tuple[int, int]:
    """Create, load and activate device ``name``; its (major, minor). The buffer holding
    the table (which may carry a key) is overwritten before it is dropped; the kernel wipes
    its own copy (DM_SECURE_DATA)."""
    buf = _ioctl(DM_DEV_CREATE, pack(name, DM_SECURE_DATA_FLAG), f"create {name}", control)
    devno = unpack_dev(buf)
    loaded = pack(name, DM_SECURE_DATA_FLAG, table)
    try:
        _ioctl(DM_TABLE_LOAD, loaded, f"load the table of {name}", control)
        _ioctl(DM_DEV_SUSPEND, pack(name, DM_SECURE_DATA_FLAG), f"activate {name}", control)
    except VolumeError:
        remove(name, control)
        raise
    finally:
        loaded[:] = bytes(len(loaded))
    return devno


def table(name: str, control: str = CONTROL) -> list[TableLine]:
    """The live table of device ``name`` (with its keys: the caller wipes what it keeps)."""
    room = 16384
    while True:
        buf = _ioctl(
            DM_TABLE_STATUS,
            pack(name, DM_STATUS_TABLE_FLAG | DM_SECURE_DATA_FLAG, room=room),
            f"show the table of {name}",
            control,
        )
        try:
            if not HEADER.unpack_from(buf)[7] & DM_BUFFER_FULL_FLAG:
                return unpack_table(buf)
        finally:
            buf[:] = bytes(len(buf))
        if room >= 1 << 20:
            raise VolumeError(f"the table of {name} is over 1 MiB")
        room *= 4


def remove(name: str, control: str = CONTROL) -> None:
    """Remove device ``name`` (not open anywhere)."""
    _ioctl(DM_DEV_REMOVE, pack(name), f"remove {name}", control)
