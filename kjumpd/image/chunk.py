"""Chunk codec: zero-page elision + lz4 block compression + CRC (record layout in format.py).

``encode_chunk`` and ``decode_chunk`` are called on worker threads; lz4.block and
zlib.crc32 release the GIL on large buffers, so a thread pool uses every core. Their only
state is per thread: scratch buffers, and whether the thread's last payload compressed. In
a run of memory that lz4 cannot shrink, a payload that a sample shows to be incompressible
is stored raw without compressing it (see PROBE_PAGES); the bytes decoded are the same
either way.

``decode_into`` decompresses with liblz4's LZ4_decompress_safe through ctypes when the
library is there (the save kernel has liblz4.so.1): straight into the caller's buffer, or a
per-thread scratch one, instead of a fresh bytes object per chunk (fresh memory is paid
for in page faults, dearly under emulation) and a copy out of it. Same check: the output
must be exactly the size the bitmap says. lz4.block is the fallback. Stored pages are copied
and zero pages filled through kjumpd.image.memops, with the GIL released: under emulation a
1 MiB copy into A's memory takes milliseconds, which the other threads of the restore (the
record reader, the other workers) should not spend waiting.

Standard library + lz4 only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import lz4.block

from kjumpd.errors import ImageCorruptError, ImageFormatError
from kjumpd.image.format import (
    EMPTY_ENCODINGS,
    ENC_FREE,
    ENC_LZ4,
    ENC_RAW,
    ENC_ZERO,
    PAGE_SIZE,
    ChunkHeader,
    crc32,
)
from kjumpd.image.memops import copy_into, is_zero, zero_fill

ZERO_PAGE = bytes(PAGE_SIZE)
COMPRESSIONS = ("lz4", "none")


@dataclass
class EncodedChunk:
    index: int
    phys: int
    raw_length: int
    head: bytes  # record header + zero-page bitmap
    payload: bytes | memoryview  # stored bytes (a view only of ``lent`` or a borrowed view)
    crc: int  # CRC of bitmap + payload (also in the record header)
    zero_pages: int
    cpu: float = 0.0  # CPU seconds this thread spent encoding it
    #: the caller's buffer the payload is a view of (encode_chunk with ``lend``): it must
    #: not be refilled before the record is written
    lent: bytearray | None = None

    @property
    def record_length(self) -> int:
        return len(self.head) + len(self.payload)


#: bytes of every page looked at first: a page with any of them non-zero is not a zero page
_SAMPLES = (0, 8, 1032, 2056, 3080, 4088)


def find_zero_pages(data: bytes | bytearray | memoryview, length: int | None = None) -> list[int]:
    """Indices of the all-zero pages of the first ``length`` bytes of ``data`` (default: all
    of it; the last page may be partial). ``data`` is any byte buffer, read in place.

    Strided slices pick a few bytes of every page in C (``data[k:end:4096]``); only the pages
    where all of them are zero are compared in full, so Python never scans the other pages.
    """
    mv = memoryview(data).cast("B")
    n = len(mv) if length is None else length
    full = n // PAGE_SIZE
    end = full * PAGE_SIZE
    out = []
    if full:
        acc = 0
        for k in _SAMPLES:
            acc |= int.from_bytes(mv[k:end:PAGE_SIZE].tobytes(), "little")
        if acc == 0 and is_zero(mv[:end]):  # wholly zero: one comparison
            out = list(range(full))
        else:
            candidates = acc.to_bytes(full, "little")  # byte i is 0: page i may be zero
            i = candidates.find(0)
            while i >= 0:
                o = i * PAGE_SIZE
                if mv[o : o + PAGE_SIZE].tobytes() == ZERO_PAGE:
                    out.append(i)
                i = candidates.find(0, i + 1)
    if n > end and mv[end:n].tobytes() == ZERO_PAGE[: n - end]:
        out.append(full)
    return out


def all_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether every byte of ``data`` is zero (its first page looked at before the rest)."""
    mv = memoryview(data).cast("B")
    head = mv[:PAGE_SIZE].tobytes()
    return head == ZERO_PAGE[: len(head)] and (len(mv) <= PAGE_SIZE or is_zero(mv))


#: all-zero buffers by length (a chunk size and the odd tail): compared against, never copied
_ZEROS: dict[int, bytes] = {}
_scratch = threading.local()


def zeros(n: int) -> bytes:
    """A shared all-zero bytes object of length ``n`` (cached for the few sizes in use)."""
    z = _ZEROS.get(n)
    if z is None:
        z = bytes(n)
        if len(_ZEROS) < 16:
            _ZEROS[n] = z
    return z


def _scratch_buffer(n: int) -> bytearray:
    """This thread's reusable buffer of at least ``n`` bytes (fresh memory costs page faults)."""
    buf: bytearray | None = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < n:
        buf = _scratch.buf = bytearray(n)
    return buf


#: Memory that lz4 cannot shrink (encrypted or already compressed data, keys, media) costs
#: a full compression pass for nothing. Such memory comes in runs, so after a payload that
#: lz4 shrank by less than 1/PROBE_MIN_GAIN, the thread's next payload of at least
#: PROBE_MIN_PAGES pages is judged by a sample first: PROBE_PAGES of its pages, compressed
#: together (a sixteenth of the work). If the sample does not shrink either, the payload is
#: stored raw uncompressed. Memory that compresses never pays for a sample.
PROBE_PAGES = 16
PROBE_MIN_PAGES = 2 * PROBE_PAGES
PROBE_MIN_GAIN = 32


def _poor_gain(packed: int, raw: int) -> bool:
    return packed * PROBE_MIN_GAIN > raw * (PROBE_MIN_GAIN - 1)


def _skip_lz4(payload: bytes | bytearray | memoryview) -> bool:
    """True in a run of memory that lz4 does not shrink, when the payload's sample agrees."""
    return bool(getattr(_scratch, "poor", False)) and incompressible(payload)


def incompressible(payload: bytes | bytearray | memoryview) -> bool:
    """True when lz4 would not shrink ``payload`` usefully, judged by a sample of its pages
    (False for payloads too small to sample)."""
    pages = len(payload) // PAGE_SIZE
    if pages < PROBE_MIN_PAGES:
        return False
    step = pages // PROBE_PAGES
    # one page from each sixteenth, at a position that moves, so that memory laid out with
    # a period (every other page, every 16th) cannot hide from the sample
    at = [i * step + (i * 7) % step for i in range(PROBE_PAGES)]
    mv = memoryview(payload)
    sample = b"".join(mv[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] for p in at)
    return _poor_gain(len(lz4.block.compress(sample, store_size=False)), len(sample))


def encode_chunk(
    index: int,
    phys: int,
    data: bytes | bytearray | memoryview,
    compression: str = "lz4",
    tag: int = 0,
    length: int | None = None,
    lend: bool = False,
    borrowed: bool = False,
) -> EncodedChunk:
    """Encode the first ``length`` bytes of ``data`` (the memory at ``phys``) as one record.

    ``data`` (any byte buffer, read in place) is not kept: the record holds its own copies,
    so the caller may reuse the buffer for the next chunk at once. Two exceptions, for a
    record stored raw without zero pages: with ``lend`` and a bytearray ``data``, the record
    keeps a view of ``data`` instead of a copy, and names it in ``lent``; with ``borrowed``
    (``data`` is a view of memory that nothing changes while the record lives, as the save
    kernel's mapping of the frozen main kernel's memory), it keeps that view.
    """
    cpu0 = time.thread_time()
    src = memoryview(data).cast("B")
    n = len(src) if length is None else length
    if n > len(src):
        raise ValueError(f"chunk length {n} exceeds the buffer ({len(src)} bytes)")
    pages = (n + PAGE_SIZE - 1) // PAGE_SIZE
    bitmap = bytearray((pages + 7) // 8)
    payload_raw: bytes | memoryview
    if all_zero(src[:n]):
        zero = pages
        for i in range(pages):
            bitmap[i >> 3] |= 1 << (i & 7)
        payload_raw = b""
    else:
        zero_at = find_zero_pages(src, n)
        zero = len(zero_at)
        for i in zero_at:
            bitmap[i >> 3] |= 1 << (i & 7)
        if zero == 0:
            payload_raw = src[:n]
        else:
            # the stored pages are the runs between zero pages, packed into a scratch buffer
            scratch = _scratch_buffer(n)
            dst = memoryview(scratch)
            fill = pos = 0
            for i in zero_at:
                o = i * PAGE_SIZE
                if o > pos:
                    dst[fill : fill + o - pos] = src[pos:o]
                    fill += o - pos
                pos = o + PAGE_SIZE
            if pos < n:
                dst[fill : fill + n - pos] = src[pos:n]
                fill += n - pos
            payload_raw = dst[:fill]
    payload: bytes | memoryview
    lent = data if lend and zero == 0 and isinstance(data, bytearray) else None
    keep = lent is not None or (borrowed and zero == 0)
    if zero == pages:
        enc, payload = ENC_ZERO, b""
    elif compression == "lz4" and not _skip_lz4(payload_raw):
        payload = lz4.block.compress(payload_raw, store_size=False)
        enc = ENC_LZ4
        _scratch.poor = _poor_gain(len(payload), len(payload_raw))
        if len(payload) >= len(payload_raw):
            enc, payload = ENC_RAW, _raw_payload(payload_raw, keep)
    else:
        enc, payload = ENC_RAW, _raw_payload(payload_raw, keep)
    if enc != ENC_RAW:
        lent = None
    bm = bytes(bitmap)
    body_crc = crc32(payload, crc32(bm))
    head = (
        ChunkHeader(
            encoding=enc,
            pages=pages,
            index=index,
            phys=phys,
            raw_length=n,
            payload_length=len(payload),
            crc=body_crc,
            tag=tag,
        ).pack()
        + bm
    )
    return EncodedChunk(
        index=index,
        phys=phys,
        raw_length=n,
        head=head,
        payload=payload,
        crc=body_crc,
        zero_pages=zero,
        cpu=time.thread_time() - cpu0,
        lent=lent,
    )


def _raw_payload(payload_raw: bytes | memoryview, keep: bool) -> bytes | memoryview:
    """The stored bytes of a raw record: a view of a lent or borrowed buffer, else a copy of
    its own."""
    return payload_raw if keep else bytes(payload_raw)


def zero_chunk(index: int, phys: int, n: int, tag: int = 0, free: bool = False) -> EncodedChunk:
    """The record of ``n`` bytes the source knows are zero (never read): an all-zero chunk,
    or with ``free`` a free one (ENC_FREE: the restore leaves that memory as it finds it)."""
    pages = (n + PAGE_SIZE - 1) // PAGE_SIZE
    bitmap = bytearray(b"\xff" * (pages // 8))
    if pages % 8:
        bitmap.append((1 << (pages % 8)) - 1)
    bm = bytes(bitmap)
    body_crc = crc32(b"", crc32(bm))
    head = (
        ChunkHeader(
            encoding=ENC_FREE if free else ENC_ZERO,
            pages=pages,
            index=index,
            phys=phys,
            raw_length=n,
            payload_length=0,
            crc=body_crc,
            tag=tag,
        ).pack()
        + bm
    )
    return EncodedChunk(
        index=index, phys=phys, raw_length=n, head=head, payload=b"", crc=body_crc, zero_pages=pages
    )


def _load_lz4() -> Callable[..., int] | None:
    for name in ("liblz4.so.1", "liblz4.so"):
        try:
            f = ctypes.CDLL(name).LZ4_decompress_safe
        except (OSError, AttributeError):
            continue
        f.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
        f.restype = ctypes.c_int
        return f
    return None


_LZ4_SAFE = _load_lz4()


def _lz4_source(payload: bytes | memoryview) -> bool:
    """Whether liblz4 can read ``payload`` where it lies: bytes, or a writable contiguous
    view (ctypes reaches no other buffer's address)."""
    if isinstance(payload, bytes):
        return True
    return (
        isinstance(payload, memoryview)
        and not payload.readonly
        and payload.c_contiguous
        and len(payload) > 0
    )


def _lz4_into(payload: bytes | memoryview, out: memoryview, expect: int) -> int:
    """Decompress ``payload`` (``_lz4_source``) into ``out[:expect]`` (a writable buffer);
    the byte count liblz4 produced, negative when the payload is not valid lz4 for that
    size."""
    assert _LZ4_SAFE is not None
    d = ctypes.c_char.from_buffer(out)
    s = None if isinstance(payload, bytes) else ctypes.c_char.from_buffer(payload)
    try:
        src = payload if s is None else ctypes.addressof(s)
        return int(_LZ4_SAFE(src, ctypes.addressof(d), len(payload), expect))
    finally:
        del d, s


#: for every bitmap byte value: the bit positions of its stored (non-zero) pages
_STORED = [tuple(b for b in range(8) if not v & (1 << b)) for v in range(256)]


def stored_pages(bitmap: bytes, pages: int) -> list[int]:
    """Indices of the pages that are stored (not zero), in order."""
    out = [base + b for base, v in zip(range(0, 8 * len(bitmap), 8), bitmap) for b in _STORED[v]]
    while out and out[-1] >= pages:  # padding bits of the last bitmap byte
        out.pop()
    return out


def chunk_error(
    ch: ChunkHeader,
    offset: int,
    why: str,
    what: str = "is corrupt",
    error: type[ImageCorruptError] = ImageCorruptError,
) -> ImageCorruptError:
    """The error for a record that cannot be used (``what`` says how it failed)."""
    return error(
        f"chunk {ch.index} at byte offset {offset} {what}",
        why=why,
        fix="the image cannot be used; boot normally and hibernate again",
        structure="chunk",
        offset=offset,
        chunk=ch.index,
    )


def check_chunk(ch: ChunkHeader, bitmap: bytes, payload: bytes | memoryview, offset: int) -> None:
    """Raise ImageCorruptError when the bitmap + payload do not match the record's CRC."""
    if crc32(payload, crc32(bitmap)) != ch.crc:
        raise chunk_error(ch, offset, "payload checksum mismatch")


def decode_chunk(ch: ChunkHeader, bitmap: bytes, payload: bytes, offset: int) -> bytes | bytearray:
    """Check and decode a record into its ``raw_length`` bytes (zero pages as zeros; a free
    record reads as zeros too)."""
    if ch.encoding in EMPTY_ENCODINGS:
        decode_into(ch, bitmap, payload, offset, None)
        return zeros(ch.raw_length)
    out = bytearray(ch.raw_length)
    decode_into(ch, bitmap, payload, offset, memoryview(out))
    return out


def decode_into(
    ch: ChunkHeader,
    bitmap: bytes,
    payload: bytes | memoryview,
    offset: int,
    out: memoryview | None,
    checked: bool = False,
) -> None:
    """Check a record and decode its ``raw_length`` bytes into ``out`` (zero pages written as
    zeros). ``out`` may be a reused buffer: every byte of ``out[:raw_length]`` is written.
    ``out`` may be None only for an all-zero or free record (ENC_ZERO, ENC_FREE), which is
    checked, not written. ``checked``: the caller has run check_chunk on this record.
    """
    if not checked:
        check_chunk(ch, bitmap, payload, offset)
    stored = stored_pages(bitmap, ch.pages)
    nz = len(stored)
    # the last page may be partial; it is stored short when it is not a zero page
    tail_short = ch.pages * PAGE_SIZE - ch.raw_length
    last_stored = bool(stored) and stored[-1] == ch.pages - 1
    expect = nz * PAGE_SIZE - (tail_short if last_stored else 0)

    def bad(why: str) -> ImageCorruptError:
        return chunk_error(ch, offset, why)

    n = ch.raw_length
    if ch.encoding in EMPTY_ENCODINGS:
        if nz:
            raise bad(
                f"an {'all-zero' if ch.encoding == ENC_ZERO else 'all-free'} chunk has "
                "non-zero pages in its bitmap"
            )
        if ch.payload_length:
            raise bad(
                f"a chunk without payload (encoding {ch.encoding}) holds "
                f"{ch.payload_length} payload bytes"
            )
        if out is not None:
            zero_fill(out[:n])
        return
    if out is None:
        raise ValueError("decode_into needs an output buffer for a stored chunk")
    raw: bytes | memoryview
    if ch.encoding == ENC_RAW:
        raw = payload
    elif (
        ch.encoding == ENC_LZ4
        and _LZ4_SAFE is not None
        and 0 < expect < (1 << 31)
        and _lz4_source(payload)
        and not out.readonly
        and out.c_contiguous
        and len(out) >= n
    ):
        if nz == ch.pages:  # no zero pages: straight into the output
            with out[:expect] as dst:
                got = _lz4_into(payload, dst, expect)
            if got != expect:
                raise bad(
                    "lz4 payload does not decompress"
                    if got < 0
                    else f"payload holds {got} bytes, the bitmap says {expect}"
                )
            return
        scratch = _scratch_buffer(expect)
        with memoryview(scratch) as whole, whole[:expect] as dst:
            got = _lz4_into(payload, dst, expect)
        if got != expect:
            raise bad(
                "lz4 payload does not decompress"
                if got < 0
                else f"payload holds {got} bytes, the bitmap says {expect}"
            )
        raw = memoryview(scratch)[:expect]
    elif ch.encoding == ENC_LZ4:
        try:
            raw = lz4.block.decompress(payload, uncompressed_size=expect)
        except lz4.block.LZ4BlockError:
            raise bad("lz4 payload does not decompress") from None
    else:  # pragma: no cover - ChunkHeader.unpack refuses unknown encodings
        raise ImageFormatError(f"chunk {ch.index}: unknown encoding {ch.encoding}")
    if len(raw) != expect:
        raise bad(f"payload holds {len(raw)} bytes, the bitmap says {expect}")
    src = memoryview(raw)
    if nz == ch.pages:
        copy_into(out[:n], src)
        return
    # runs of consecutive stored pages are contiguous in the payload: one copy per run,
    # one zero fill per run of zero pages
    sp = 0  # position in the payload
    pos = 0  # page index written up to
    i = 0
    while i < nz:
        first = stored[i]
        j = i
        while j + 1 < nz and stored[j + 1] == stored[j] + 1:
            j += 1
        if first > pos:
            zero_fill(out[pos * PAGE_SIZE : first * PAGE_SIZE])
        o = first * PAGE_SIZE
        end = min((stored[j] + 1) * PAGE_SIZE, n)
        copy_into(out[o:end], src[sp : sp + end - o])
        sp += end - o
        pos = stored[j] + 1
        i = j + 1
    if pos < ch.pages:
        zero_fill(out[pos * PAGE_SIZE : n])
