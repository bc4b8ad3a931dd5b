"""Byte formats of a kjumpd target and of the image inside it (format version 1).

All integers are little-endian. All checksums are CRC-32 (zlib.crc32). All offsets are
*logical* offsets into the target; the block map in the superblock turns them into device
offsets (see kjumpd.image.device).

Target layout::

    0        64 KiB  target superblock (TargetSuperblock)
    64 KiB    4 KiB  header slot 0 (Header)
    68 KiB    4 KiB  header slot 1 (Header)
    72 KiB   ...     image metadata (Metadata), then, at Header.data_offset, chunk records

The superblock's 64 KiB end with a 4 KiB job slot (kjumpd.image.jobslot) when its block
map leaves them free.

Target superblock (at logical 0, at most 64 KiB)::

    0   8  magic b"KJUMPTGT"
    8   2  format version (1)
    10  2  flags (0)
    12  4  block size (bytes; 512 or 4096)
    16 16  target UUID (raw bytes)
    32  8  target size (bytes of logical space)
    40  4  extent count N (1 <= N <= MAX_EXTENTS)
    44  4  reserved (0)
    48 24N block map: N x (logical u64, device_offset u64, length u64)
    .   4  CRC-32 of bytes [0, 48 + 24N)

Header slot (4 KiB; the valid slot with the highest sequence wins)::

    0   8  magic b"KJUMPHDR"
    8   2  format version (1)
    10  1  state (ImageState)
    11  1  reserved (0)
    12  4  restore attempt
    16  8  sequence number
    24 16  target UUID
    40  8  created (unix time, float64)
    48  8  saved (unix time, float64; 0 = never)
    56  8  updated (unix time, float64)
    64  8  jump area start      72 8 jump area size
    80  8  jump-back entry
    88  4  flags (FLAG_*: 1 zero elision, 2 verified, 4 encrypted; a reader refuses others)
    92  4  chunk size
    96  8  metadata offset     104 8 metadata length    112 4 metadata CRC
    116 4  data CRC (CRC-32 over the little-endian u32 CRCs of every chunk record, in order)
    120 8  data offset         128 8 data length
    136 8  stats: raw bytes    144 8 zero pages        152 8 stored bytes   160 8 chunk count
    168 .  five strings, each u16 length + UTF-8 bytes: mode, compression, main kernel id,
           save kernel hash, reason
    .  32  only with FLAG_ENCRYPTED (added within version 1): the authentication tag of the
           header's fixed fields and the metadata (kjumpd.image.seal, which also describes
           the encrypted records and the key); a reader without it refuses the flag
    .   4  CRC-32 of every byte before it

Metadata (at Header.metadata_offset; its CRC is also in the header)::

    0   8  magic b"KJUMPMET"
    8   2  format version (1)
    10  2  reserved
    12  4  extent count E
    16  4  page size (4096)
    20  4  identity length J
    24 16E extents: E x (physical start u64, length u64), sorted, non-overlapping
    .   J  identity: UTF-8 JSON object (fs stamps, kernel ids, jump area, jump-back entry...)
    .   4  CRC-32 of every byte before it

Chunk record (records follow each other from Header.data_offset, unaligned)::

    0   4  magic b"KJCH"
    4   1  encoding: 0 = lz4 block, 1 = raw (incompressible), 2 = all zero (no payload),
           3 = free (no payload): every page was free in the main kernel, whose allocator
           does not look at a free page's contents (no init_on_free), so a restore leaves
           that memory as it finds it; checked like an all-zero record, read back as zeros
           (added within version 1: a reader without it refuses the record as an unknown
           encoding, so no image is misread)
    5   1  reserved
    6   2  page count P (pages of the chunk, the last one may be partial)
    8   4  chunk index
    12  8  physical address of the chunk's first byte
    20  4  raw length (bytes covered, zero pages included)
    24  4  payload length (stored bytes)
    28  4  CRC-32 of bitmap + payload
    32  4  image tag: CRC-32 of (target UUID + created time as float64) of the image's header,
           so a record left over from an earlier image is refused before it is written
    36  4  CRC-32 of bytes [0, 36) of this record header
    40  ceil(P/8)  zero-page bitmap (bit i set = page i is all zero and not stored)
    .   payload: the non-zero pages, concatenated, lz4-compressed (or raw)

The memory covered by chunk i is fixed by the extent table and the chunk size: each extent
is cut into chunk-size pieces from its start, in order. A reader checks every record against
that expectation, so a missing, repeated or misplaced chunk is refused.
"""

from __future__ import annotations

import enum
import json
import struct
import uuid as uuidlib
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, overload

from kjumpd.errors import ImageCorruptError, ImageFormatError

FORMAT_VERSION = 1
PAGE_SIZE = 4096

SUPERBLOCK_OFFSET = 0
SUPERBLOCK_SIZE = 64 * 1024
HEADER_SLOT_SIZE = 4096
HEADER_SLOT_OFFSETS = (64 * 1024, 68 * 1024)
METADATA_OFFSET = 72 * 1024
DATA_ALIGN = 64 * 1024

SUPERBLOCK_MAGIC = b"KJUMPTGT"
HEADER_MAGIC = b"KJUMPHDR"
METADATA_MAGIC = b"KJUMPMET"
CHUNK_MAGIC = b"KJCH"

_SB_FIXED = struct.Struct("<8sHHI16sQII")  # 48 bytes
_EXTENT3 = struct.Struct("<QQQ")
MAX_EXTENTS = (SUPERBLOCK_SIZE - _SB_FIXED.size - 4) // _EXTENT3.size


def superblock_length(extents: int) -> int:
    """Bytes a superblock with ``extents`` block-map extents takes, its CRC included."""
    return _SB_FIXED.size + extents * _EXTENT3.size + 4


_HDR_FIXED = struct.Struct("<8sHBBIQ16sdddQQQIIQQIIQQQQQQ")  # 168 bytes
_STR_LEN = struct.Struct("<H")
_MAX_STR = 1024

_META_FIXED = struct.Struct("<8sHHIII")  # 24 bytes
_EXTENT2 = struct.Struct("<QQ")

_CHUNK_HDR = struct.Struct("<4sBBHIQIIII")  # 36 bytes, + CRC u32
CHUNK_HEADER_SIZE = _CHUNK_HDR.size + 4

_CRC = struct.Struct("<I")

FLAG_ZERO_ELISION = 1
FLAG_VERIFIED = 2
FLAG_ENCRYPTED = 4
KNOWN_FLAGS = FLAG_ZERO_ELISION | FLAG_VERIFIED | FLAG_ENCRYPTED
AUTH_SIZE = 32

ENC_LZ4 = 0
ENC_RAW = 1
ENC_ZERO = 2
ENC_FREE = 3
_ENCODINGS = (ENC_LZ4, ENC_RAW, ENC_ZERO, ENC_FREE)
#: encodings without a payload: every page is a zero page in the bitmap
EMPTY_ENCODINGS = (ENC_ZERO, ENC_FREE)

MAX_CHUNK_SIZE = 64 * 1024 * 1024


def crc32(data: Any, start: int = 0) -> int:
    return zlib.crc32(data, start) & 0xFFFFFFFF


class ImageState(enum.IntEnum):
    EMPTY = 0
    WRITING = 1
    SAVED = 2
    RESTORING = 3
    CONSUMED = 4
    ABORTED = 5
    INVALID = 6


def _bad(structure: str, offset: int, what: str, fix: str = "") -> ImageFormatError:
    return ImageFormatError(
        f"{structure} at byte offset {offset} is not valid",
        why=what,
        fix=fix or "the target holds no usable image; save a new one",
        structure=structure,
        offset=offset,
    )


def _corrupt(structure: str, offset: int, what: str) -> ImageCorruptError:
    return ImageCorruptError(
        f"{structure} at byte offset {offset} is corrupt",
        why=what,
        fix="the image cannot be used; boot normally and hibernate again",
        structure=structure,
        offset=offset,
    )


# ---------------------------------------------------------------------------- superblock


@dataclass(frozen=True)
class BlockExtent:
    """A piece of the target: logical bytes [logical, logical+length) live at device_offset."""

    logical: int
    device_offset: int
    length: int


@dataclass(frozen=True)
class TargetSuperblock:
    uuid: bytes
    size: int
    block_size: int
    blockmap: tuple[BlockExtent, ...]
    version: int = FORMAT_VERSION
    flags: int = 0

    @property
    def uuid_str(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))

    def pack(self) -> bytes:
        validate_blockmap(self.blockmap, self.size, self.block_size)
        if len(self.uuid) != 16:
            raise _bad("target superblock", 16, "the UUID must be 16 bytes")
        body = _SB_FIXED.pack(
            SUPERBLOCK_MAGIC,
            self.version,
            self.flags,
            self.block_size,
            self.uuid,
            self.size,
            len(self.blockmap),
            0,
        )
        body += b"".join(_EXTENT3.pack(e.logical, e.device_offset, e.length) for e in self.blockmap)
        return body + _CRC.pack(crc32(body))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, base: int = 0) -> TargetSuperblock:
        """Parse a superblock; ``base`` is its offset on the device, for error messages."""
        name = "target superblock"
        data = bytes(data[:SUPERBLOCK_SIZE])
        if len(data) < _SB_FIXED.size + 4:
            raise _bad(name, base, f"only {len(data)} bytes (truncated)")
        magic, version, flags, bsize, uid, size, n, _ = _SB_FIXED.unpack_from(data)
        if magic != SUPERBLOCK_MAGIC:
            raise _bad(
                name,
                base,
                f"magic is {magic!r}, not {SUPERBLOCK_MAGIC!r}",
                fix="run `kjumpctl setup` to prepare a target",
            )
        if version != FORMAT_VERSION:
            raise _bad(
                name,
                base + 8,
                f"format version {version} is not supported "
                f"(this kjumpd reads version {FORMAT_VERSION})",
                fix="use the kjumpd release that wrote it, or run `kjumpctl setup` again",
            )
        if not 1 <= n <= MAX_EXTENTS:
            raise _bad(name, base + 40, f"extent count {n} is out of range 1..{MAX_EXTENTS}")
        end = _SB_FIXED.size + n * _EXTENT3.size
        if len(data) < end + 4:
            raise _bad(name, base, f"only {len(data)} bytes for {n} extents (truncated)")
        (stored,) = _CRC.unpack_from(data, end)
        if crc32(data[:end]) != stored:
            raise _corrupt(name, base + end, "checksum mismatch")
        bm = tuple(
            BlockExtent(*_EXTENT3.unpack_from(data, _SB_FIXED.size + i * _EXTENT3.size))
            for i in range(n)
        )
        sb = cls(uuid=uid, size=size, block_size=bsize, blockmap=bm, version=version, flags=flags)
        try:
            validate_blockmap(bm, size, bsize)
        except ImageFormatError as e:
            raise _bad(name, base + 48, e.why) from None
        return sb


def validate_blockmap(
    blockmap: tuple[BlockExtent, ...] | list[BlockExtent], size: int, block_size: int
) -> None:
    """Extents must cover logical [0, size) in order, without overlap, block-aligned."""
    if block_size not in (512, 1024, 2048, 4096):
        raise _bad("block map", 0, f"block size {block_size} is not 512..4096")
    if not blockmap:
        raise _bad("block map", 0, "no extents")
    if len(blockmap) > MAX_EXTENTS:
        raise _bad("block map", 0, f"{len(blockmap)} extents, at most {MAX_EXTENTS} fit")
    pos = 0
    spans = []
    for i, e in enumerate(blockmap):
        if e.logical != pos:
            raise _bad("block map", 0, f"extent {i} starts at logical {e.logical}, expected {pos}")
        if e.length <= 0 or e.length % block_size or e.device_offset % block_size:
            raise _bad("block map", 0, f"extent {i} is empty or not aligned to {block_size}")
        if e.device_offset < 0:
            raise _bad("block map", 0, f"extent {i} has a negative device offset")
        pos += e.length
        spans.append((e.device_offset, e.device_offset + e.length))
    if pos != size:
        raise _bad("block map", 0, f"extents cover {pos} bytes, the target is {size}")
    spans.sort()
    for (_, a_end), (b_start, _) in zip(spans, spans[1:]):
        if b_start < a_end:
            raise _bad("block map", 0, "two extents overlap on the device")


# ---------------------------------------------------------------------------- header


@dataclass(frozen=True)
class Header:
    state: ImageState = ImageState.EMPTY
    seq: int = 0
    uuid: bytes = bytes(16)
    attempt: int = 0
    created: float = 0.0
    saved: float = 0.0
    updated: float = 0.0
    jump_area_start: int = 0
    jump_area_size: int = 0
    jump_back_entry: int = 0
    flags: int = 0
    chunk_size: int = 0
    metadata_offset: int = 0
    metadata_length: int = 0
    metadata_crc: int = 0
    data_crc: int = 0
    data_offset: int = 0
    data_length: int = 0
    raw_bytes: int = 0
    zero_pages: int = 0
    stored_bytes: int = 0
    chunk_count: int = 0
    mode: str = ""
    compression: str = ""
    main_kernel: str = ""
    save_kernel_hash: str = ""
    reason: str = ""
    #: with FLAG_ENCRYPTED: the authentication tag (kjumpd.image.seal), else empty
    auth: bytes = b""
    version: int = FORMAT_VERSION

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    def evolve(self, **changes: Any) -> Header:
        return replace(self, **changes)

    def pack(self) -> bytes:
        body = _HDR_FIXED.pack(
            HEADER_MAGIC,
            self.version,
            int(self.state),
            0,
            self.attempt,
            self.seq,
            self.uuid,
            self.created,
            self.saved,
            self.updated,
            self.jump_area_start,
            self.jump_area_size,
            self.jump_back_entry,
            self.flags,
            self.chunk_size,
            self.metadata_offset,
            self.metadata_length,
            self.metadata_crc,
            self.data_crc,
            self.data_offset,
            self.data_length,
            self.raw_bytes,
            self.zero_pages,
            self.stored_bytes,
            self.chunk_count,
        )
        for s in (
            self.mode,
            self.compression,
            self.main_kernel,
            self.save_kernel_hash,
            self.reason,
        ):
            raw = s.encode("utf-8")
            if len(raw) > _MAX_STR:
                raise _bad("header", 0, f"text field of {len(raw)} bytes is longer than {_MAX_STR}")
            body += _STR_LEN.pack(len(raw)) + raw
        if len(self.auth) != (AUTH_SIZE if self.encrypted else 0):
            raise _bad(
                "header",
                0,
                f"an {'encrypted' if self.encrypted else 'unencrypted'} image's header has an "
                f"authentication tag of {len(self.auth)} bytes",
                fix="internal: set auth with FLAG_ENCRYPTED only",
            )
        body += self.auth
        body += _CRC.pack(crc32(body))
        if len(body) > HEADER_SLOT_SIZE:
            raise _bad("header", 0, "header does not fit its 4 KiB slot")
        return body + bytes(HEADER_SLOT_SIZE - len(body))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, base: int = 0) -> Header:
        name = "header slot"
        data = bytes(data[:HEADER_SLOT_SIZE])
        if len(data) < _HDR_FIXED.size + 4:
            raise _bad(name, base, f"only {len(data)} bytes (truncated)")
        f = _HDR_FIXED.unpack_from(data)
        if f[0] != HEADER_MAGIC:
            raise _bad(name, base, f"magic is {f[0][:8]!r}, not {HEADER_MAGIC!r}")
        if f[1] != FORMAT_VERSION:
            raise _bad(
                name,
                base + 8,
                f"format version {f[1]} is not supported (this kjumpd "
                f"reads version {FORMAT_VERSION})",
                fix="restore with the kjumpd release that saved it, or boot normally",
            )
        pos = _HDR_FIXED.size
        strings = []
        for _ in range(5):
            if pos + 2 > len(data) - 4:
                raise _bad(name, base + pos, "text fields run past the slot")
            (n,) = _STR_LEN.unpack_from(data, pos)
            pos += 2
            if n > _MAX_STR or pos + n > len(data) - 4:
                raise _bad(name, base + pos, f"text field length {n} runs past the slot")
            strings.append(data[pos : pos + n])
            pos += n
        flags = f[13]
        auth = b""
        if flags & FLAG_ENCRYPTED:
            if pos + AUTH_SIZE > len(data) - 4:
                raise _bad(name, base + pos, "the authentication tag runs past the slot")
            auth = data[pos : pos + AUTH_SIZE]
            pos += AUTH_SIZE
        (stored,) = _CRC.unpack_from(data, pos)
        if crc32(data[:pos]) != stored:
            raise _corrupt(name, base + pos, "checksum mismatch")
        if flags & ~KNOWN_FLAGS:
            raise _bad(
                name,
                base + 88,
                f"unknown flags {flags & ~KNOWN_FLAGS:#x}",
                fix="restore with the kjumpd release that saved it, or boot normally",
            )
        try:
            state = ImageState(f[2])
        except ValueError:
            raise _bad(name, base + 10, f"unknown state {f[2]}") from None
        try:
            text = [s.decode("utf-8") for s in strings]
        except UnicodeDecodeError:
            raise _bad(name, base + _HDR_FIXED.size, "a text field is not UTF-8") from None
        return cls(
            state=state,
            attempt=f[4],
            seq=f[5],
            uuid=f[6],
            created=f[7],
            saved=f[8],
            updated=f[9],
            jump_area_start=f[10],
            jump_area_size=f[11],
            jump_back_entry=f[12],
            flags=f[13],
            chunk_size=f[14],
            metadata_offset=f[15],
            metadata_length=f[16],
            metadata_crc=f[17],
            data_crc=f[18],
            data_offset=f[19],
            data_length=f[20],
            raw_bytes=f[21],
            zero_pages=f[22],
            stored_bytes=f[23],
            chunk_count=f[24],
            mode=text[0],
            compression=text[1],
            main_kernel=text[2],
            save_kernel_hash=text[3],
            reason=text[4],
            auth=auth,
            version=f[1],
        )

    @property
    def state_text(self) -> str:
        """State as users see it: SAVED, RESTORING(2), ABORTED(cancelled)..."""
        if self.state == ImageState.RESTORING:
            return f"RESTORING({self.attempt})"
        if self.state in (ImageState.ABORTED, ImageState.INVALID):
            return f"{self.state.name}({self.reason})"
        return self.state.name

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["state"] = self.state.name
        d["state_text"] = self.state_text
        d["uuid"] = str(uuidlib.UUID(bytes=self.uuid))
        d["auth"] = self.auth.hex()
        return d


def pick_header(slots: list[Header | None]) -> tuple[int, Header]:
    """The valid slot with the highest sequence number (index, header)."""
    best: tuple[int, Header] | None = None
    for i, h in enumerate(slots):
        if h is not None and (best is None or h.seq > best[1].seq):
            best = (i, h)
    if best is None:
        raise ImageFormatError(
            "no valid image header",
            why="both header slots are unreadable",
            fix="run `kjumpctl setup` to prepare the target again",
            structure="header slot",
            offset=HEADER_SLOT_OFFSETS[0],
        )
    return best


# ---------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class MemoryExtent:
    """Physical memory [start, start+length) saved in the image."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Metadata:
    extents: tuple[MemoryExtent, ...]
    identity: dict[str, Any] = field(default_factory=dict)
    page_size: int = PAGE_SIZE
    version: int = FORMAT_VERSION

    @property
    def raw_bytes(self) -> int:
        return sum(e.length for e in self.extents)

    def pack(self) -> bytes:
        validate_extents(self.extents)
        try:
            ident = json.dumps(
                self.identity, sort_keys=True, separators=(",", ":"), allow_nan=False
            ).encode()
        except (TypeError, ValueError) as e:
            raise _bad(
                "image metadata",
                METADATA_OFFSET,
                f"identity is not JSON: {e}",
                fix="internal: pass plain JSON values in identity",
            ) from None
        body = _META_FIXED.pack(
            METADATA_MAGIC, self.version, 0, len(self.extents), self.page_size, len(ident)
        )
        body += b"".join(_EXTENT2.pack(e.start, e.length) for e in self.extents) + ident
        return body + _CRC.pack(crc32(body))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, base: int = METADATA_OFFSET) -> Metadata:
        name = "image metadata"
        data = bytes(data)
        if len(data) < _META_FIXED.size + 4:
            raise _bad(name, base, f"only {len(data)} bytes (truncated)")
        magic, version, _, n, page, jlen = _META_FIXED.unpack_from(data)
        if magic != METADATA_MAGIC:
            raise _bad(name, base, f"magic is {magic!r}, not {METADATA_MAGIC!r}")
        if version != FORMAT_VERSION:
            raise _bad(name, base + 8, f"format version {version} is not supported")
        end = _META_FIXED.size + n * _EXTENT2.size + jlen
        if len(data) < end + 4:
            raise _bad(name, base, f"{len(data)} bytes, the structure says {end + 4} (truncated)")
        (stored,) = _CRC.unpack_from(data, end)
        if crc32(data[:end]) != stored:
            raise _corrupt(name, base + end, "checksum mismatch")
        if page != PAGE_SIZE:
            raise _bad(name, base + 16, f"page size {page} is not {PAGE_SIZE}")
        ext = tuple(
            MemoryExtent(*_EXTENT2.unpack_from(data, _META_FIXED.size + i * 16)) for i in range(n)
        )
        try:
            # NaN and Infinity are not JSON: pack() never writes them, and echoed by
            # `kjumpctl image info --json` they would make its output unparseable
            ident = json.loads(
                data[end - jlen : end].decode("utf-8"), parse_constant=_not_json_constant
            )
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise _bad(name, base + end - jlen, "identity is not UTF-8 JSON") from None
        if not isinstance(ident, dict):
            raise _bad(name, base + end - jlen, "identity is not a JSON object")
        try:
            validate_extents(ext)
        except ImageFormatError as e:
            raise _bad(name, base + 24, e.why) from None
        return cls(extents=ext, identity=ident, page_size=page, version=version)


def _not_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def validate_extents(extents: tuple[MemoryExtent, ...] | list[MemoryExtent]) -> None:
    prev_end = -1
    for i, e in enumerate(extents):
        if e.start < 0 or e.length <= 0:
            raise _bad("extent table", 0, f"extent {i} is empty or negative")
        if e.start < prev_end:
            raise _bad("extent table", 0, f"extent {i} overlaps or is out of order")
        prev_end = e.end


# ---------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class ChunkHeader:
    encoding: int
    pages: int
    index: int
    phys: int
    raw_length: int
    payload_length: int
    crc: int  # CRC-32 of bitmap + payload
    tag: int = 0  # image_tag() of the image the record belongs to

    @property
    def bitmap_length(self) -> int:
        return (self.pages + 7) // 8

    @property
    def record_length(self) -> int:
        return CHUNK_HEADER_SIZE + self.bitmap_length + self.payload_length

    def pack(self) -> bytes:
        body = _CHUNK_HDR.pack(
            CHUNK_MAGIC,
            self.encoding,
            0,
            self.pages,
            self.index,
            self.phys,
            self.raw_length,
            self.payload_length,
            self.crc,
            self.tag,
        )
        return body + _CRC.pack(crc32(body))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, base: int = 0) -> ChunkHeader:
        name = "chunk record header"
        if len(data) < CHUNK_HEADER_SIZE:
            raise _corrupt(name, base, f"only {len(data)} bytes (truncated image)")
        head = bytes(data[:CHUNK_HEADER_SIZE])
        magic, enc, _, pages, index, phys, raw, plen, crc, tag = _CHUNK_HDR.unpack_from(head)
        (stored,) = _CRC.unpack_from(head, _CHUNK_HDR.size)
        if magic != CHUNK_MAGIC:
            raise _corrupt(name, base, f"magic is {magic!r}, not {CHUNK_MAGIC!r}")
        if crc32(head[: _CHUNK_HDR.size]) != stored:
            raise _corrupt(name, base + _CHUNK_HDR.size, "checksum mismatch")
        if enc not in _ENCODINGS:
            raise _corrupt(name, base + 4, f"unknown encoding {enc}")
        if (
            raw > MAX_CHUNK_SIZE
            or plen > MAX_CHUNK_SIZE
            or pages != (raw + PAGE_SIZE - 1) // PAGE_SIZE
        ):
            raise _corrupt(
                name, base + 6, f"lengths do not agree (pages {pages}, raw {raw}, payload {plen})"
            )
        return cls(
            encoding=enc,
            pages=pages,
            index=index,
            phys=phys,
            raw_length=raw,
            payload_length=plen,
            crc=crc,
            tag=tag,
        )


def image_tag(uuid: bytes, created: float) -> int:
    """The tag every chunk record of the image with this header carries."""
    return crc32(struct.pack("<16sd", uuid, created))


class ChunkPlan(Sequence[tuple[int, int, int]]):
    """(index, phys, length) of every chunk of ``extents``, in image order, computed on
    demand: a plan is read by position while a save runs, and a plan kept as a list costs
    about 150 bytes a chunk, which on a large machine the save kernel's few MiB cannot spare
    (a machine with 256 GiB of RAM has 262,144 chunks of 1 MiB). This one keeps 8 bytes
    per extent."""

    def __init__(
        self, extents: tuple[MemoryExtent, ...] | list[MemoryExtent], chunk_size: int
    ) -> None:
        if chunk_size <= 0 or chunk_size % PAGE_SIZE or chunk_size > MAX_CHUNK_SIZE:
            raise ImageFormatError(
                f"chunk size {chunk_size} is not valid",
                why=f"it must be a multiple of {PAGE_SIZE} up to {MAX_CHUNK_SIZE}",
                fix="use the default chunk size",
            )
        self.extents = tuple(e for e in extents if e.length > 0)
        self.chunk_size = chunk_size
        # the plan position of each extent's first chunk, and one past the last chunk
        self._first = array("Q", [0])
        for e in self.extents:
            self._first.append(self._first[-1] + _chunks_in(e, chunk_size))

    def __len__(self) -> int:
        return self._first[-1]

    @overload
    def __getitem__(self, pos: int) -> tuple[int, int, int]: ...
    @overload
    def __getitem__(self, pos: slice) -> list[tuple[int, int, int]]: ...
    def __getitem__(self, pos: int | slice) -> tuple[int, int, int] | list[tuple[int, int, int]]:
        if isinstance(pos, slice):
            return [self[i] for i in range(*pos.indices(len(self)))]
        if pos < 0:
            pos += len(self)
        if not 0 <= pos < len(self):
            raise IndexError(pos)
        k = bisect_right(self._first, pos) - 1
        e = self.extents[k]
        phys = e.start + (pos - self._first[k]) * self.chunk_size
        return pos, phys, min(self.chunk_size, e.end - phys)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        i, cs = 0, self.chunk_size
        for e in self.extents:
            for phys in range(e.start, e.end, cs):
                yield i, phys, min(cs, e.end - phys)
                i += 1


def chunk_plan(
    extents: tuple[MemoryExtent, ...] | list[MemoryExtent], chunk_size: int
) -> ChunkPlan:
    """(index, phys, length) of every chunk, in image order."""
    return ChunkPlan(extents, chunk_size)


def chunk_count(extents: tuple[MemoryExtent, ...] | list[MemoryExtent], chunk_size: int) -> int:
    return sum(_chunks_in(e, chunk_size) for e in extents)


def _chunks_in(extent: MemoryExtent, chunk_size: int) -> int:
    return -(-extent.length // chunk_size)


def data_offset_for(metadata_length: int) -> int:
    end = METADATA_OFFSET + metadata_length
    return (end + DATA_ALIGN - 1) // DATA_ALIGN * DATA_ALIGN


#: the longest reason a header records (its text fields share one 4 KiB slot)
MAX_REASON_BYTES = 400


def clip_reason(reason: str) -> str:
    raw = reason.encode("utf-8")
    if len(raw) <= MAX_REASON_BYTES:
        return reason
    return raw[: MAX_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."
