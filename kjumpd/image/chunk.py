"""Chunk codec: zero-page elision + lz4 block compression + CRC (record layout in format.py).

``encode_chunk`` and ``decode_chunk`` are pure functions called on worker threads;
lz4.block and zlib.crc32 release the GIL on large buffers, so a thread pool uses every core.

Standard library + lz4 only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

from dataclasses import dataclass

import lz4.block

from kjumpd.errors import ImageCorruptError, ImageFormatError
from kjumpd.image.format import (ENC_LZ4, ENC_RAW, ENC_ZERO, PAGE_SIZE, ChunkHeader, crc32)

ZERO_PAGE = bytes(PAGE_SIZE)
COMPRESSIONS = ("lz4", "none")


@dataclass
class EncodedChunk:
    index: int
    phys: int
    raw_length: int
    head: bytes          # record header + zero-page bitmap
    payload: bytes       # stored bytes
    crc: int             # CRC of bitmap + payload (also in the record header)
    zero_pages: int

    @property
    def record_length(self) -> int:
        return len(self.head) + len(self.payload)


_ZERO_PROBE = bytes(32)


def find_zero_pages(data: bytes) -> list[int]:
    """Indices of the all-zero pages of ``data`` (the last page may be partial).

    bytes.find() looks for a run of 32 zero bytes in C; Python only looks at the pages where
    such a run starts (each zero page, and pages that merely contain one), not at every page.
    """
    n = len(data)
    full = n // PAGE_SIZE
    end = full * PAGE_SIZE
    out = []
    pos = 0
    while pos < end:
        i = data.find(_ZERO_PROBE, pos, end)
        if i < 0:
            break
        page = i // PAGE_SIZE
        o = page * PAGE_SIZE
        if data.startswith(ZERO_PAGE, o):
            out.append(page)
        pos = o + PAGE_SIZE
    if n > end and data.startswith(ZERO_PAGE[:n - end], end):
        out.append(full)
    return out


def encode_chunk(index: int, phys: int, data: bytes | bytearray | memoryview,
                 compression: str = "lz4", tag: int = 0) -> EncodedChunk:
    """Encode ``data`` (the memory at ``phys``) as one chunk record."""
    if not isinstance(data, bytes):
        data = bytes(data)               # slicing bytes is the fast zero test
    n = len(data)
    pages = (n + PAGE_SIZE - 1) // PAGE_SIZE
    bitmap = bytearray((pages + 7) // 8)
    zero = 0
    if data[:PAGE_SIZE] == ZERO_PAGE[:min(n, PAGE_SIZE)] and data == bytes(n):
        zero = pages
        for i in range(pages):
            bitmap[i >> 3] |= 1 << (i & 7)
        payload_raw = b""
    else:
        zero_at = find_zero_pages(data)
        zero = len(zero_at)
        for i in zero_at:
            bitmap[i >> 3] |= 1 << (i & 7)
        if zero == 0:
            payload_raw = data
        else:
            # the stored pages are the runs between zero pages: one slice per run
            mv = memoryview(data)
            keep = []
            pos = 0
            for i in zero_at:
                o = i * PAGE_SIZE
                if o > pos:
                    keep.append(mv[pos:o])
                pos = o + PAGE_SIZE
            if pos < n:
                keep.append(mv[pos:])
            payload_raw = b"".join(keep)
    if zero == pages:
        enc, payload = ENC_ZERO, b""
    elif compression == "lz4":
        payload = lz4.block.compress(payload_raw, store_size=False)
        enc = ENC_LZ4
        if len(payload) >= len(payload_raw):
            enc, payload = ENC_RAW, payload_raw
    else:
        enc, payload = ENC_RAW, payload_raw
    bm = bytes(bitmap)
    body_crc = crc32(payload, crc32(bm))
    head = ChunkHeader(encoding=enc, pages=pages, index=index, phys=phys, raw_length=n,
                       payload_length=len(payload), crc=body_crc, tag=tag).pack() + bm
    return EncodedChunk(index=index, phys=phys, raw_length=n, head=head, payload=payload,
                        crc=body_crc, zero_pages=zero)


#: for every bitmap byte value: the bit positions of its stored (non-zero) pages
_STORED = [tuple(b for b in range(8) if not v & (1 << b)) for v in range(256)]


def stored_pages(bitmap: bytes, pages: int) -> list[int]:
    """Indices of the pages that are stored (not zero), in order."""
    out = [base + b for base, v in zip(range(0, 8 * len(bitmap), 8), bitmap)
           for b in _STORED[v]]
    while out and out[-1] >= pages:      # padding bits of the last bitmap byte
        out.pop()
    return out


def check_chunk(ch: ChunkHeader, bitmap: bytes, payload: bytes, offset: int) -> None:
    """Raise ImageCorruptError when the bitmap + payload do not match the record's CRC."""
    if crc32(payload, crc32(bitmap)) != ch.crc:
        raise ImageCorruptError(f"chunk {ch.index} at byte offset {offset} is corrupt",
                                why="payload checksum mismatch",
                                fix="the image cannot be used; boot normally and hibernate again",
                                structure="chunk", offset=offset, chunk=ch.index)


def decode_chunk(ch: ChunkHeader, bitmap: bytes, payload: bytes, offset: int
                 ) -> bytes | bytearray:
    """Check and decode a record into its ``raw_length`` bytes (zero pages as zeros)."""
    check_chunk(ch, bitmap, payload, offset)
    stored = stored_pages(bitmap, ch.pages)
    nz = len(stored)
    # the last page may be partial; it is stored short when it is not a zero page
    tail_short = ch.pages * PAGE_SIZE - ch.raw_length
    last_stored = bool(stored) and stored[-1] == ch.pages - 1
    expect = nz * PAGE_SIZE - (tail_short if last_stored else 0)

    def bad(why: str) -> ImageCorruptError:
        return ImageCorruptError(f"chunk {ch.index} at byte offset {offset} is corrupt", why=why,
                                 fix="the image cannot be used; boot normally and hibernate again",
                                 structure="chunk", offset=offset, chunk=ch.index)

    if ch.encoding == ENC_ZERO:
        if nz:
            raise bad("an all-zero chunk has non-zero pages in its bitmap")
        return bytes(ch.raw_length)
    if ch.encoding == ENC_RAW:
        raw = payload
    elif ch.encoding == ENC_LZ4:
        try:
            raw = lz4.block.decompress(payload, uncompressed_size=expect)
        except lz4.block.LZ4BlockError:
            raise bad("lz4 payload does not decompress") from None
    else:  # pragma: no cover - ChunkHeader.unpack refuses unknown encodings
        raise ImageFormatError(f"chunk {ch.index}: unknown encoding {ch.encoding}")
    if len(raw) != expect:
        raise bad(f"payload holds {len(raw)} bytes, the bitmap says {expect}")
    if nz == ch.pages:
        return raw
    out = bytearray(ch.raw_length)
    src = memoryview(raw)
    if last_stored and tail_short:
        stored.pop()
        o = (ch.pages - 1) * PAGE_SIZE
        out[o:] = src[expect - (ch.raw_length - o):]
    sp = 0
    for i in stored:
        o = i * PAGE_SIZE
        out[o:o + PAGE_SIZE] = src[sp:sp + PAGE_SIZE]
        sp += PAGE_SIZE
    return out
