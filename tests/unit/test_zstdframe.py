"""kjumpd.zstdframe: where a zstd frame ends and the content size it declares (frames built
here from raw and RLE blocks, as the format allows; the zstd tool's own output is checked in
tests/sysroot/test_initramfs.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd import zstdframe
from kjumpd.errors import ImageFormatError


def make_frame(blocks: list[tuple[int, bytes]], size: int | None, checksum: bool) -> bytes:
    """blocks: (type 0 raw | 1 RLE, body); RLE bodies are one byte repeated len times."""
    if size is None:
        desc, fcs = 0x00, b""
    elif size < 256:
        desc, fcs = 0x20, size.to_bytes(1, "little")  # single segment, 1-byte size
    elif size < 65536 + 256:
        desc, fcs = 0x40, (size - 256).to_bytes(2, "little")
    else:
        desc, fcs = 0x80, size.to_bytes(4, "little")
    if checksum:
        desc |= 0x04
    out = zstdframe.MAGIC + bytes([desc]) + (b"" if desc & 0x20 else b"\x48") + fcs
    for i, (kind, body) in enumerate(blocks):
        last = int(i == len(blocks) - 1)
        n = len(body)
        hdr = last | (kind << 1) | (n << 3)
        out += hdr.to_bytes(3, "little") + (body[:1] if kind == 1 else body)
    return out + (b"\xaa\xbb\xcc\xdd" if checksum else b"")


@given(
    st.lists(
        st.tuples(st.sampled_from([0, 1]), st.binary(min_size=1, max_size=300)),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
    st.booleans(),
    st.binary(max_size=20),
)
def test_frame_length_and_content_size(blocks, with_size, checksum, trailer):
    total = sum(len(b) for _, b in blocks)
    blob = make_frame(blocks, total if with_size else None, checksum)
    f = zstdframe.frame(blob + trailer)
    assert f.length == len(blob)
    assert f.content_size == (total if with_size else None)
    assert zstdframe.frame(blob, scan=False).content_size == f.content_size


@pytest.mark.parametrize("size", [0, 255, 256, 65791, 65792, 16819248])
def test_every_content_size_field_width(size):
    blob = make_frame([(0, b"x")], size, False)
    assert zstdframe.frame(blob).content_size == size


@pytest.mark.parametrize(
    "blob,what",
    [
        (b"\x1f\x8b\x08\x00", "not a zstd frame"),
        (zstdframe.MAGIC, "truncated"),
        (make_frame([(0, b"abc")], 3, False)[:-2], "truncated"),
        (make_frame([(0, b"abc")], 3, True)[:-1], "truncated"),
        (
            zstdframe.MAGIC
            + b"\x20\x03"
            + (1 | (3 << 1) | (3 << 3)).to_bytes(3, "little")
            + b"abc",
            "reserved block type",
        ),
    ],
)
def test_bad_frames_are_named(blob, what):
    with pytest.raises(ImageFormatError) as ei:
        zstdframe.frame(blob)
    assert what in ei.value.message
