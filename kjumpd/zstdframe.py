"""Reading the framing of a zstd stream (no decompression): where a frame ends and the content
size its header declares. Used for initramfs archives compressed with zstd (the kernel's
CONFIG_RD_ZSTD): the jump area is sized from the unpacked size, and an archive followed by
another (B's initramfs + the job, R's base + payload) is read up to the end of its frame.

Byte format (RFC 8878, section 3.1.1; version: the magic):

    frame        := magic(4: 28 B5 2F FD) frame_header block+ [checksum(4)]
    frame_header := descriptor(1) [window(1)] [dict_id(0|1|2|4)] [content_size(0|1|2|4|8)]
        descriptor bits 7-6: content size field code, bit 5: single segment (no window byte;
        code 0 then means a 1-byte size), bit 2: checksum present, bits 1-0: dict id code
        content_size: little-endian; a 2-byte field holds size - 256
    block        := header(3, little-endian: bit 0 last, bits 2-1 type, bits 23-3 size) body
        body: type 0 raw = size bytes, 1 RLE = 1 byte, 2 compressed = size bytes, 3 reserved
"""

from __future__ import annotations

from dataclasses import dataclass

from kjumpd.errors import ImageFormatError

MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class Frame:
    length: int  # bytes of the frame, magic to checksum
    content_size: int | None  # declared uncompressed size, None when the header omits it


def frame(blob: bytes, *, scan: bool = True) -> Frame:
    """The first zstd frame of ``blob``. With scan=False only the header is read (length 0)."""
    if blob[:4] != MAGIC:
        raise ImageFormatError("not a zstd frame", why=f"magic {blob[:4].hex() or 'missing'}")
    if len(blob) < 5:
        raise ImageFormatError("truncated zstd frame header")
    desc = blob[4]
    fcs_code, single, checksum, did_code = desc >> 6, bool(desc & 0x20), bool(desc & 0x04), desc & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_code]
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_code]
    if pos + fcs_len > len(blob):
        raise ImageFormatError("truncated zstd frame header")
    size = int.from_bytes(blob[pos : pos + fcs_len], "little") if fcs_len else None
    if size is not None and fcs_len == 2:
        size += 256
    pos += fcs_len
    if not scan:
        return Frame(0, size)
    while True:
        if pos + 3 > len(blob):
            raise ImageFormatError("truncated zstd frame", why=f"no block header at byte {pos}")
        hdr = int.from_bytes(blob[pos : pos + 3], "little")
        last, kind, bsize = hdr & 1, (hdr >> 1) & 3, hdr >> 3
        if kind == 3:
            raise ImageFormatError("corrupt zstd frame", why=f"reserved block type at byte {pos}")
        pos += 3 + (1 if kind == 1 else bsize)
        if last:
            break
    pos += 4 if checksum else 0
    if pos > len(blob):
        raise ImageFormatError("truncated zstd frame", why=f"ends at byte {pos} of {len(blob)}")
    return Frame(pos, size)
