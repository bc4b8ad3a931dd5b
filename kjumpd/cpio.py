"""The cpio "newc" archive: what the kernel unpacks as an initramfs.

Byte format (the kernel's own, Documentation/driver-api/early-userspace/buffer-format.rst);
its version is the magic: only ``070701`` (newc, no checksum) is written or read here.

    entry   := header name NUL pad4 data pad4
    header  := "070701" + 13 fields of 8 upper-case hex digits:
               ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
               namesize(with the NUL) check(0)
    pad4    := NULs up to the next multiple of 4 from the start of the archive
    archive := entry* trailer      trailer := an entry named "TRAILER!!!", all fields 0

The kernel accepts several archives concatenated (each may be gzip'd or not, with NUL
padding between them): that is how the job travels to the save kernel (``Job.to_cpio``
appended to B's initramfs, read back by ``read_concatenated``). Directories must come before
their contents; this writer emits missing parent directories itself. The one writer and
reader of the format: B's and R's initramfs builders, the job, R's per-machine archive.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from kjumpd.errors import ImageFormatError

MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
_FIELDS = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
)
_HEX_FIELDS = re.compile(rb"[0-9A-Fa-f]{%d}" % (8 * len(_FIELDS)))


@dataclass(frozen=True)
class Entry:
    """One archive member: a regular file, a directory, a symlink (data = target) or a node."""

    name: str
    mode: int
    data: bytes = b""
    mtime: int = 0
    uid: int = 0
    gid: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0

    @staticmethod
    def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
        return Entry(name, stat.S_IFREG | perm, data)

    @staticmethod
    def directory(name: str, perm: int = 0o755) -> Entry:
        return Entry(name, stat.S_IFDIR | perm)

    @staticmethod
    def symlink(name: str, target: str) -> Entry:
        return Entry(name, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def chardev(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return Entry(name, stat.S_IFCHR | perm, rdevmajor=major, rdevminor=minor)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ImageFormatError(
            f"cpio member name {name!r} is not a relative path inside the archive",
            fix="use names like 'usr/bin/python3'",
        )
    return "/".join(parts)


def _header(ino: int, e: Entry, namesize: int) -> bytes:
    values = (
        ino,
        e.mode,
        e.uid,
        e.gid,
        2 if stat.S_ISDIR(e.mode) else 1,
        e.mtime,
        len(e.data),
        0,
        0,
        e.rdevmajor,
        e.rdevminor,
        namesize,
        0,
    )
    for field, v in zip(_FIELDS, values):
        if not 0 <= v <= 0xFFFFFFFF:
            raise ImageFormatError(f"cpio field {field} of {e.name!r} out of range", value=v)
    return MAGIC + b"".join(b"%08X" % v for v in values)


def write(entries: Iterable[Entry]) -> bytes:
    """The archive bytes (uncompressed) for entries, parents first, names made unique."""
    out = bytearray()
    seen: set[str] = set()
    ino = 0

    def emit(e: Entry) -> None:
        nonlocal ino
        ino += 1
        name = e.name.encode()
        out.extend(_header(ino, e, len(name) + 1))
        out.extend(name + b"\0")
        out.extend(_pad(len(out)))
        out.extend(e.data)
        out.extend(_pad(len(out)))

    for e in entries:
        name = _clean(e.name)
        if name in seen:
            raise ImageFormatError(f"cpio member {name!r} given twice", fix="give each path once")
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in seen:
                seen.add(parent)
                emit(Entry.directory(parent))
        seen.add(name)
        if stat.S_ISDIR(e.mode) and e.data:
            raise ImageFormatError(f"cpio directory {name!r} has data")
        emit(Entry(name, e.mode, e.data, e.mtime, e.uid, e.gid, e.rdevmajor, e.rdevminor))
    emit(Entry(TRAILER, 0))
    return bytes(out)


def read(blob: bytes) -> list[Entry]:
    """Parse one uncompressed newc archive (up to its trailer); raise ImageFormatError if bad."""
    return _read_one(blob, 0)[0]


def read_concatenated(blob: bytes) -> list[Entry]:
    """Every member of concatenated uncompressed archives (NUL padding between them allowed,
    as the kernel allows it); ImageFormatError when one is bad or cut short."""
    entries: list[Entry] = []
    pos = 0
    while pos < len(blob):
        if blob[pos] == 0:
            pos += 1
            continue
        part, pos = _read_one(blob, pos)
        entries += part
    return entries


def _read_one(blob: bytes, pos: int) -> tuple[list[Entry], int]:
    """The members of the archive starting at ``pos``, and the offset just past it."""
    entries: list[Entry] = []
    while True:
        if pos + HEADER_SIZE > len(blob):
            raise ImageFormatError(
                "cpio archive truncated", why="no trailer before the end", offset=pos
            )
        if blob[pos : pos + 6] != MAGIC:
            raise ImageFormatError(
                "not a cpio newc archive",
                why=f"bad magic at offset {pos}",
                offset=pos,
                magic=blob[pos : pos + 6].hex(),
            )
        # eight hex digits each: int(..., 16) alone would take "-0000070" and walk backwards
        if not _HEX_FIELDS.fullmatch(blob, pos + 6, pos + HEADER_SIZE):
            raise ImageFormatError("cpio header has a non-hex field", offset=pos)
        f = {k: int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i, k in enumerate(_FIELDS)}
        name_start = pos + HEADER_SIZE
        name_end = name_start + f["namesize"]
        if f["namesize"] < 1 or name_end > len(blob) or blob[name_end - 1] != 0:
            raise ImageFormatError("cpio member name is malformed", offset=pos)
        try:
            name = blob[name_start : name_end - 1].decode()
        except UnicodeDecodeError:
            raise ImageFormatError("cpio member name is not UTF-8", offset=pos) from None
        data_start = name_end + (-name_end % 4)
        data_end = data_start + f["filesize"]
        if data_end > len(blob):
            raise ImageFormatError("cpio member data truncated", offset=pos, name=name)
        next_pos = data_end + (-data_end % 4)
        if name == TRAILER:
            return entries, next_pos
        entries.append(
            Entry(
                name,
                f["mode"],
                bytes(blob[data_start:data_end]),
                f["mtime"],
                f["uid"],
                f["gid"],
                f["rdevmajor"],
                f["rdevminor"],
            )
        )
        pos = next_pos


def regular_files(entries: Iterable[Entry]) -> dict[str, bytes]:
    """name -> data of the regular files among ``entries`` (a later one wins)."""
    return {e.name: e.data for e in entries if stat.S_ISREG(e.mode)}
