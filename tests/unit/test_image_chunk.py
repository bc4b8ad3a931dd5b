"""Chunk codec: zero-page elision, lz4/raw payloads and their checks (hypothesis)."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kjumpd.errors import ImageCorruptError
from kjumpd.image.chunk import decode_chunk, encode_chunk
from kjumpd.image.format import (
    CHUNK_HEADER_SIZE,
    ENC_LZ4,
    ENC_RAW,
    ENC_ZERO,
    PAGE_SIZE,
    ChunkHeader,
)

PAGE_KINDS = st.sampled_from(["zero", "text", "random", "ones", "headzero", "tailzero"])


def page(kind: str, seed: int) -> bytes:
    if kind == "zero":
        return bytes(PAGE_SIZE)
    if kind == "text":
        return (f"page {seed} of struct task_struct at 0x{seed:016x}\n" * 200).encode()[:PAGE_SIZE]
    if kind == "ones":
        return b"\xff" * PAGE_SIZE
    if kind == "headzero":  # zeros, then one non-zero byte at a seed-chosen place
        k = 1 + seed * 997 % (PAGE_SIZE - 1)
        return bytes(k) + b"\x01" + bytes(PAGE_SIZE - k - 1)
    if kind == "tailzero":  # data, then zeros running into the next page
        return b"\x07" * (seed % 100 + 1) + bytes(PAGE_SIZE - seed % 100 - 1)
    return random.Random(seed).randbytes(PAGE_SIZE)


@st.composite
def chunks(draw):
    kinds = draw(st.lists(PAGE_KINDS, min_size=1, max_size=40))
    data = b"".join(page(k, i) for i, k in enumerate(kinds))
    cut = draw(st.integers(0, PAGE_SIZE - 1))  # the last page may be partial
    return data[: len(data) - cut] if cut < len(data) else data


def parse(enc):
    raw = enc.head + enc.payload
    ch = ChunkHeader.unpack(raw)
    bl = ch.bitmap_length
    return ch, raw[CHUNK_HEADER_SIZE : CHUNK_HEADER_SIZE + bl], raw[CHUNK_HEADER_SIZE + bl :]


@settings(deadline=None)
@given(chunks(), st.sampled_from(["lz4", "none"]), st.integers(0, 2**40))
def test_round_trip_is_byte_exact_and_elides_zero_pages(data, compression, phys):
    enc = encode_chunk(3, phys, data, compression)
    ch, bitmap, payload = parse(enc)
    assert (ch.index, ch.phys, ch.raw_length) == (3, phys, len(data))
    assert decode_chunk(ch, bitmap, payload, 0) == data
    pages = [data[o : o + PAGE_SIZE] for o in range(0, len(data), PAGE_SIZE)]
    assert enc.zero_pages == sum(1 for p in pages if not any(p))
    nonzero_bytes = sum(len(p) for p in pages if any(p))
    # zero pages are never stored: a raw payload is exactly the non-zero pages
    assert ch.encoding == ENC_LZ4 or len(payload) == nonzero_bytes
    assert nonzero_bytes or payload == b""


def test_encodings_chosen_by_content():
    assert parse(encode_chunk(0, 0, bytes(1 << 20)))[0].encoding == ENC_ZERO
    assert parse(encode_chunk(0, 0, bytes(1 << 20)))[2] == b""
    assert parse(encode_chunk(0, 0, os.urandom(1 << 16)))[0].encoding == ENC_RAW
    text = page("text", 1) * 16
    ch, _, payload = parse(encode_chunk(0, 0, text))
    assert ch.encoding == ENC_LZ4 and len(payload) < len(text) // 4


@settings(deadline=None, max_examples=50)
@given(chunks(), st.data())
def test_any_flipped_body_byte_is_refused(data, d):
    enc = encode_chunk(1, 4096, data)
    ch, bitmap, payload = parse(enc)
    body = bytearray(bitmap + payload)
    pos = d.draw(st.integers(0, len(body) - 1))
    body[pos] ^= 0x10
    with pytest.raises(ImageCorruptError, match="chunk 1 at byte offset 777"):
        decode_chunk(ch, bytes(body[: len(bitmap)]), bytes(body[len(bitmap) :]), 777)


def test_self_consistent_but_wrong_payload_is_refused():
    """A record whose CRC matches but whose lz4 stream lies about its length."""
    from kjumpd.image.format import crc32

    enc = encode_chunk(0, 0, page("text", 2) * 4)
    ch, bitmap, payload = parse(enc)
    bad = payload[:-3]
    ch2 = ChunkHeader(
        encoding=ch.encoding,
        pages=ch.pages,
        index=0,
        phys=0,
        raw_length=ch.raw_length,
        payload_length=len(bad),
        crc=crc32(bad, crc32(bitmap)),
    )
    with pytest.raises(ImageCorruptError, match="chunk 0"):
        decode_chunk(ch2, bitmap, bad, 0)


@settings(deadline=None)
@given(chunks(), st.sampled_from(["lz4", "none"]), st.integers(0, 3 * PAGE_SIZE))
def test_a_record_owns_its_bytes_when_the_read_buffer_is_reused(data, compression, slack):
    """The save pipeline reads every chunk into one of a few reused buffers: a record made
    from the first ``length`` bytes of a buffer must not change when the buffer is refilled."""
    buf = bytearray(data + b"\x5a" * slack)  # longer than the chunk
    enc = encode_chunk(1, 0, buf, compression, length=len(data))
    buf[:] = b"\xee" * len(buf)  # the next chunk lands in the buffer
    ch, bitmap, payload = parse(enc)
    assert ch.raw_length == len(data)
    assert decode_chunk(ch, bitmap, payload, 0) == data


@settings(deadline=None)
@given(chunks(), st.sampled_from(["lz4", "none"]))
def test_decode_into_a_dirty_buffer_writes_every_byte(data, compression):
    """Restore decodes into reused buffers: zero pages must come out as zeros over whatever
    the previous chunk left there."""
    from kjumpd.image.chunk import decode_into

    ch, bitmap, payload = parse(encode_chunk(0, 0, data, compression))
    out = bytearray(b"\xaa" * (len(data) + PAGE_SIZE))
    decode_into(ch, bitmap, payload, 0, memoryview(out))
    assert out[: len(data)] == data
    assert out[len(data) :] == b"\xaa" * PAGE_SIZE  # nothing past the chunk


def test_encode_refuses_a_length_past_its_buffer():
    with pytest.raises(ValueError):
        encode_chunk(0, 0, bytearray(PAGE_SIZE), length=2 * PAGE_SIZE)


@pytest.mark.parametrize(
    "n", [PAGE_SIZE, 3 * PAGE_SIZE, 8 * PAGE_SIZE, 9 * PAGE_SIZE + 100, 1 << 20]
)
def test_a_zero_chunk_made_without_reading_equals_an_encoded_zero_chunk(n):
    from kjumpd.image.chunk import zero_chunk

    made, encoded = zero_chunk(5, 0x1000, n, tag=7), encode_chunk(5, 0x1000, bytes(n), tag=7)
    assert (made.head, made.payload, made.crc, made.zero_pages) == (
        encoded.head,
        encoded.payload,
        encoded.crc,
        encoded.zero_pages,
    )


@pytest.mark.parametrize("lib", ["liblz4", "lz4.block"])
@pytest.mark.parametrize("zero_pages", [False, True])
def test_both_lz4_decoders_give_the_same_bytes_and_refuse_the_same_lies(
    monkeypatch, lib, zero_pages
):
    """decode_into uses liblz4 through ctypes when it is there, lz4.block otherwise."""
    import kjumpd.image.chunk as chunk
    from kjumpd.image.format import crc32

    if lib == "lz4.block":
        monkeypatch.setattr(chunk, "_LZ4_SAFE", None)
    elif chunk._LZ4_SAFE is None:
        pytest.fail("liblz4.so.1 is not installed: the save kernel's decoder is not tested")
    data = b"".join(page("zero" if zero_pages and i % 3 == 1 else "text", i) for i in range(9))
    data = data[:-100]  # a partial last page
    ch, bitmap, payload = parse(encode_chunk(0, 0, data))
    assert ch.encoding == ENC_LZ4
    out = bytearray(b"\xaa" * (len(data) + 7))
    chunk.decode_into(ch, bitmap, payload, 0, memoryview(out))
    assert out[: len(data)] == data and out[len(data) :] == b"\xaa" * 7
    for bad in (payload[:-3], payload[: len(payload) // 2] + b"\xff" * 8):
        ch2 = ChunkHeader(
            encoding=ch.encoding,
            pages=ch.pages,
            index=0,
            phys=0,
            raw_length=ch.raw_length,
            payload_length=len(bad),
            crc=crc32(bad, crc32(bitmap)),
        )
        with pytest.raises(ImageCorruptError, match="chunk 0"):
            chunk.decode_into(ch2, bitmap, bad, 0, memoryview(bytearray(len(data))))


@settings(deadline=None, max_examples=200)
@given(
    st.lists(
        st.tuples(st.integers(0, 15), st.integers(0, PAGE_SIZE - 1), st.integers(1, 255)),
        max_size=12,
    ),
    st.integers(0, PAGE_SIZE - 1),
)
def test_zero_pages_are_found_whatever_single_bytes_spoil_them(spoilers, cut):
    """A page is zero only if every byte is: a lone non-zero byte anywhere (also where the
    scan does not look first) keeps its page out, and nothing else."""
    from kjumpd.image.chunk import find_zero_pages

    data = bytearray(16 * PAGE_SIZE)
    for page, off, val in spoilers:
        data[page * PAGE_SIZE + off] = val
    data = data[: len(data) - cut] if cut else data
    want = [
        i
        for i in range((len(data) + PAGE_SIZE - 1) // PAGE_SIZE)
        if not any(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
    ]
    assert find_zero_pages(bytes(data)) == want
    assert find_zero_pages(data + b"\x01" * 100, len(data)) == want
    assert find_zero_pages(memoryview(bytes(data)).toreadonly()) == want  # A's mapping


def _incompressible_run(pages: int = 256) -> None:
    """Encode a chunk of random pages on this thread: the next payload gets sampled first."""
    encode_chunk(0, 0, random.Random(99).randbytes(pages * PAGE_SIZE))


def test_in_a_run_of_incompressible_memory_only_a_sample_is_compressed(monkeypatch):
    import lz4.block

    from kjumpd.image import chunk

    _incompressible_run()
    compressed: list[int] = []
    real = lz4.block.compress
    monkeypatch.setattr(
        chunk.lz4.block,
        "compress",
        lambda data, **kw: compressed.append(len(data)) or real(data, **kw),
    )
    data = random.Random(7).randbytes(1 << 20)
    ch, _, payload = parse(encode_chunk(1, 0, data))
    assert ch.encoding == ENC_RAW and payload == data
    assert compressed == [chunk.PROBE_PAGES * PAGE_SIZE]  # the sample, not the megabyte


def test_compressible_memory_after_an_incompressible_run_is_still_compressed():
    _incompressible_run()
    text = b"".join(page("text", i) for i in range(256))
    ch, _, payload = parse(encode_chunk(0, 0, text))
    assert ch.encoding == ENC_LZ4 and len(payload) < len(text) // 4
    _incompressible_run()
    # every other page compressible: the sample sees them and the chunk is compressed
    mixed = b"".join(page("text" if i % 2 else "random", i) for i in range(256))
    ch, _, payload = parse(encode_chunk(0, 0, mixed))
    assert ch.encoding == ENC_LZ4 and len(payload) < len(mixed) * 3 // 4


@settings(deadline=None)
@given(chunks(), st.booleans())
def test_round_trip_is_byte_exact_after_an_incompressible_run(data, after_run):
    if after_run:
        _incompressible_run()
    enc = encode_chunk(3, 0, data)
    ch, bitmap, payload = parse(enc)
    assert decode_chunk(ch, bitmap, payload, 0) == data


def test_a_raw_record_lends_the_read_buffer_only_when_asked_and_only_when_raw():
    buf = bytearray(random.Random(3).randbytes(64 * PAGE_SIZE))
    lent = encode_chunk(0, 0, buf, lend=True)
    assert lent.lent is buf and bytes(lent.payload) == bytes(buf)
    assert encode_chunk(0, 0, buf).lent is None  # not asked: a copy of its own
    text = bytearray(b"".join(page("text", i) for i in range(64)))
    assert encode_chunk(0, 0, text, lend=True).lent is None  # compressed: new bytes
    holed = bytearray(bytes(buf[: 32 * PAGE_SIZE]) + bytes(PAGE_SIZE) + bytes(buf[PAGE_SIZE:]))
    rec = encode_chunk(0, 0, holed, lend=True)  # a zero page: packed into scratch, copied
    assert rec.lent is None
    payload = bytes(rec.payload)
    holed[:] = b"\xee" * len(holed)
    assert bytes(rec.payload) == payload


@settings(deadline=None)
@given(chunks(), st.sampled_from(["lz4", "none"]), st.booleans())
def test_a_read_only_view_encodes_as_its_bytes_do(data, compression, borrowed):
    """The save kernel encodes A's memory in place, through a read-only view of its
    mapping: the record is the one the same bytes give."""
    import mmap

    m = mmap.mmap(-1, len(data) + PAGE_SIZE)
    m[: len(data)] = data
    with memoryview(m) as whole:
        view = whole[: len(data)].toreadonly()
        rec = encode_chunk(3, 0x5000, view, compression, borrowed=borrowed)
        del view
    want = encode_chunk(3, 0x5000, data, compression)
    assert rec.head == want.head and bytes(rec.payload) == bytes(want.payload)
    raw_whole = len(rec.payload) == len(data) and rec.zero_pages == 0
    if borrowed and raw_whole:
        assert isinstance(rec.payload, memoryview), "raw: the record keeps the view"
        del rec
    else:
        assert not isinstance(rec.payload, memoryview), "otherwise bytes of its own"
    m.close()  # no view left behind in either case
