"""Byte structures of the target and the image: round trips and corruption (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kjumpd.errors import ImageCorruptError, ImageFormatError
from kjumpd.image.format import (
    CHUNK_HEADER_SIZE,
    FLAG_ENCRYPTED,
    HEADER_SLOT_SIZE,
    KNOWN_FLAGS,
    MAX_EXTENTS,
    BlockExtent,
    ChunkHeader,
    Header,
    ImageState,
    MemoryExtent,
    Metadata,
    TargetSuperblock,
    chunk_count,
    chunk_plan,
    pick_header,
)

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
text = st.text(max_size=60)
times = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def blockmaps(draw, block=4096):
    n = draw(st.integers(1, 20))
    lengths = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n))
    gaps = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    out, logical, dev = [], 0, draw(st.integers(0, 100)) * block
    for ln, gap in zip(lengths, gaps):
        dev += gap * block
        out.append(BlockExtent(logical, dev, ln * block))
        logical += ln * block
        dev += ln * block
    return tuple(out), logical


@st.composite
def superblocks(draw):
    bm, size = draw(blockmaps())
    return TargetSuperblock(
        uuid=draw(st.binary(min_size=16, max_size=16)), size=size, block_size=4096, blockmap=bm
    )


@st.composite
def headers(draw):
    flags = draw(st.integers(0, KNOWN_FLAGS))
    return Header(
        state=draw(st.sampled_from(ImageState)),
        seq=draw(u64),
        uuid=draw(st.binary(min_size=16, max_size=16)),
        attempt=draw(u32),
        created=draw(times),
        saved=draw(times),
        updated=draw(times),
        jump_area_start=draw(u64),
        jump_area_size=draw(u64),
        jump_back_entry=draw(u64),
        flags=flags,
        chunk_size=draw(u32),
        metadata_offset=draw(u64),
        metadata_length=draw(u64),
        metadata_crc=draw(u32),
        data_crc=draw(u32),
        data_offset=draw(u64),
        data_length=draw(u64),
        raw_bytes=draw(u64),
        zero_pages=draw(u64),
        stored_bytes=draw(u64),
        chunk_count=draw(u64),
        mode=draw(text),
        compression=draw(text),
        main_kernel=draw(text),
        save_kernel_hash=draw(text),
        reason=draw(text),
        auth=draw(st.binary(min_size=32, max_size=32)) if flags & FLAG_ENCRYPTED else b"",
    )


@st.composite
def extent_tables(draw):
    n = draw(st.integers(1, 30))
    out, pos = [], draw(st.integers(0, 2**40))
    for _ in range(n):
        pos += draw(st.integers(0, 2**30))
        ln = draw(st.integers(1, 2**34))
        out.append(MemoryExtent(pos, ln))
        pos += ln
    return tuple(out)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4),
    max_leaves=12,
)


@st.composite
def metadatas(draw):
    return Metadata(
        extents=draw(extent_tables()), identity=draw(st.dictionaries(text, json_values, max_size=6))
    )


def flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x41
    return bytes(b)


# ------------------------------------------------------------------ round trips


@settings(deadline=None)
@given(superblocks())
def test_superblock_round_trip(sb):
    raw = sb.pack()
    assert TargetSuperblock.unpack(raw) == sb


@settings(deadline=None)
@given(headers())
def test_header_round_trip_fills_exactly_one_slot(h):
    raw = h.pack()
    assert len(raw) == HEADER_SLOT_SIZE
    assert Header.unpack(raw) == h


def test_header_with_an_unknown_flag_is_refused():
    # a reader must not take an image whose flags it does not understand (an encrypted
    # image read as plaintext would fail later, with a misleading reason)
    from kjumpd.image.format import _CRC, crc32

    raw = bytearray(Header(flags=1).pack())
    raw[88] = 8
    end = len(bytes(raw).rstrip(b"\0")) - 4
    raw[end : end + 4] = _CRC.pack(crc32(bytes(raw[:end])))
    with pytest.raises(ImageFormatError) as ei:
        Header.unpack(bytes(raw))
    assert "unknown flags 0x8" in ei.value.why


def test_header_auth_goes_with_the_encrypted_flag():
    with pytest.raises(ImageFormatError):
        Header(flags=FLAG_ENCRYPTED).pack()
    with pytest.raises(ImageFormatError):
        Header(auth=bytes(32)).pack()


@settings(deadline=None)
@given(metadatas())
def test_metadata_round_trip(m):
    assert Metadata.unpack(m.pack()) == m


@settings(deadline=None)
@given(st.sampled_from([0, 1, 2, 3]), st.integers(1, 16384), u32, u64, u32, u32, u32)
def test_chunk_header_round_trip(enc, pages, index, phys, plen, crc, tag):
    raw_len = min(pages * 4096, 64 * 1024 * 1024)
    pages = (raw_len + 4095) // 4096
    ch = ChunkHeader(
        encoding=enc,
        pages=pages,
        index=index,
        phys=phys,
        raw_length=raw_len,
        payload_length=plen % (64 * 1024 * 1024),
        crc=crc,
        tag=tag,
    )
    raw = ch.pack()
    assert len(raw) == CHUNK_HEADER_SIZE
    assert ChunkHeader.unpack(raw) == ch


# ------------------------------------------------------------------ corruption


@settings(deadline=None, max_examples=60)
@given(superblocks(), st.data())
def test_superblock_any_flipped_byte_is_refused(sb, data):
    raw = sb.pack()
    pos = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises((ImageFormatError, ImageCorruptError)) as ei:
        TargetSuperblock.unpack(flip(raw, pos), base=8192)
    assert "superblock" in str(ei.value)
    assert ei.value.context["offset"] >= 8192


@settings(deadline=None, max_examples=60)
@given(headers(), st.data())
def test_header_any_flipped_byte_is_refused(h, data):
    raw = h.pack()
    used = len(raw.rstrip(b"\0")) or 1
    pos = data.draw(st.integers(0, max(used - 1, 0)))
    with pytest.raises((ImageFormatError, ImageCorruptError)) as ei:
        Header.unpack(flip(raw, pos), base=65536)
    assert "header slot" in str(ei.value)


@settings(deadline=None, max_examples=60)
@given(metadatas(), st.data())
def test_metadata_any_flipped_byte_is_refused(m, data):
    raw = m.pack()
    pos = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises((ImageFormatError, ImageCorruptError)):
        Metadata.unpack(flip(raw, pos))


@settings(deadline=None)
@given(metadatas(), st.data())
def test_metadata_truncated_is_refused(m, data):
    raw = m.pack()
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises((ImageFormatError, ImageCorruptError)) as ei:
        Metadata.unpack(raw[:cut])
    assert "metadata" in str(ei.value)


@settings(deadline=None)
@given(st.integers(0, CHUNK_HEADER_SIZE - 1))
def test_chunk_header_flipped_byte_is_refused(pos):
    raw = ChunkHeader(
        encoding=0,
        pages=256,
        index=7,
        phys=1 << 20,
        raw_length=1 << 20,
        payload_length=1234,
        crc=99,
    ).pack()
    with pytest.raises(ImageCorruptError) as ei:
        ChunkHeader.unpack(flip(raw, pos), base=1000)
    assert ei.value.context["offset"] >= 1000


def test_an_unknown_chunk_encoding_is_refused_by_name():
    import struct as _struct

    from kjumpd.image.format import crc32

    raw = bytearray(
        ChunkHeader(
            encoding=3, pages=1, index=0, phys=0, raw_length=4096, payload_length=0, crc=0
        ).pack()
    )
    raw[4] = 4  # after free (3): nothing is defined yet
    raw[36:40] = _struct.pack("<I", crc32(bytes(raw[:36])))
    with pytest.raises(ImageCorruptError, match="unknown encoding 4"):
        ChunkHeader.unpack(bytes(raw))


def test_wrong_version_is_named():
    h = Header(state=ImageState.SAVED, seq=3)
    raw = bytearray(h.pack())
    raw[8] = 9  # version field
    with pytest.raises(ImageFormatError) as ei:
        Header.unpack(bytes(raw), base=65536)
    assert "version 9" in str(ei.value)
    sb = TargetSuperblock(
        uuid=bytes(16), size=4096, block_size=4096, blockmap=(BlockExtent(0, 0, 4096),)
    )
    raw = bytearray(sb.pack())
    raw[8] = 2
    with pytest.raises(ImageFormatError, match="version 2"):
        TargetSuperblock.unpack(bytes(raw))


def test_blockmap_rules():
    ok = (BlockExtent(0, 8192, 4096), BlockExtent(4096, 0, 4096))
    TargetSuperblock(uuid=bytes(16), size=8192, block_size=4096, blockmap=ok).pack()
    bad = [
        (BlockExtent(0, 0, 4096), BlockExtent(8192, 8192, 4096)),  # logical hole
        (BlockExtent(0, 0, 8192), BlockExtent(8192, 4096, 4096)),  # device overlap
        (BlockExtent(0, 100, 4096),),  # unaligned
    ]
    for bm in bad:
        size = sum(e.length for e in bm)
        with pytest.raises(ImageFormatError):
            TargetSuperblock(uuid=bytes(16), size=size, block_size=4096, blockmap=bm).pack()
    too_many = tuple(BlockExtent(i * 4096, i * 8192, 4096) for i in range(MAX_EXTENTS + 1))
    with pytest.raises(ImageFormatError, match="at most"):
        TargetSuperblock(
            uuid=bytes(16), size=len(too_many) * 4096, block_size=4096, blockmap=too_many
        ).pack()


def test_pick_header_takes_highest_valid_sequence():
    a, b = Header(seq=4), Header(seq=5)
    assert pick_header([a, b]) == (1, b)
    assert pick_header([a, None]) == (0, a)
    with pytest.raises(ImageFormatError, match="no valid image header"):
        pick_header([None, None])


@settings(deadline=None)
@given(
    st.lists(st.integers(1, 5 << 20), min_size=1, max_size=8),
    st.sampled_from([4096, 65536, 1 << 20]),
)
def test_chunk_plan_covers_every_byte_once(lengths, cs):
    extents, pos = [], 0
    for ln in lengths:
        extents.append(MemoryExtent(pos, ln))
        pos += ln + 4096
    plan = list(chunk_plan(extents, cs))
    assert len(plan) == chunk_count(extents, cs)
    assert [i for i, _, _ in plan] == list(range(len(plan)))
    assert sum(n for _, _, n in plan) == sum(e.length for e in extents)
    assert all(0 < n <= cs for _, _, n in plan)


@settings(deadline=None)
@given(
    st.lists(st.integers(0, 5 << 20), min_size=0, max_size=8),
    st.sampled_from([4096, 65536, 1 << 20]),
    st.data(),
)
def test_chunk_plan_by_position_is_the_plan_in_order(lengths, cs, data):
    # a save reads its plan by position; a restore walks it
    extents, pos = [], 0x100000
    for ln in lengths:
        extents.append(MemoryExtent(pos, ln - ln % 4096))
        pos += ln + 4096
    plan = chunk_plan(extents, cs)
    walked = list(plan)
    assert len(plan) == len(walked)
    if walked:
        i = data.draw(st.integers(-len(walked), len(walked) - 1))
        assert plan[i] == walked[i]
        assert plan[1::2] == walked[1::2]
    with pytest.raises(IndexError):
        plan[len(walked)]


def test_a_chunk_plan_with_a_bad_chunk_size_is_refused_when_made():
    with pytest.raises(ImageFormatError, match="chunk size 1000 is not valid"):
        chunk_plan([MemoryExtent(0, 4096)], 1000)


def test_state_text():
    assert Header(state=ImageState.RESTORING, attempt=2).state_text == "RESTORING(2)"
    assert Header(state=ImageState.ABORTED, reason="cancelled").state_text == "ABORTED(cancelled)"


def test_identity_that_is_not_json_is_refused_cleanly():
    with pytest.raises(ImageFormatError, match="identity is not JSON"):
        Metadata(extents=(MemoryExtent(0, 4096),), identity={"x": object()}).pack()


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_metadata_identity_with_a_non_json_number_is_refused(constant: bytes) -> None:
    """A damaged or forged image whose identity holds NaN: a named format error (exit 7),
    never a value that `kjumpctl image info --json` would print as invalid JSON."""
    import struct
    import zlib

    ident = b'{"created":' + constant + b"}"
    body = struct.pack("<8sHHIII", b"KJUMPMET", 1, 0, 1, 4096, len(ident))
    body += struct.pack("<QQ", 0, 4096) + ident
    raw = body + struct.pack("<I", zlib.crc32(body))
    with pytest.raises(ImageFormatError, match="identity is not UTF-8 JSON"):
        Metadata.unpack(raw)


def test_metadata_identity_nested_too_deep_is_refused() -> None:
    import struct
    import zlib

    ident = b"[" * 100_000
    body = struct.pack("<8sHHIII", b"KJUMPMET", 1, 0, 1, 4096, len(ident))
    body += struct.pack("<QQ", 0, 4096) + ident
    raw = body + struct.pack("<I", zlib.crc32(body))
    with pytest.raises(ImageFormatError, match="identity is not UTF-8 JSON"):
        Metadata.unpack(raw)
