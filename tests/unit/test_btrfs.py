"""btrfs chunk items and the logical -> device mapping (pure: synthetic tree search results)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.errors import BlockMapError
from kjumpd.linux import btrfs
from kjumpd.linux.btrfs import Chunk, Stripe

MiB = 1 << 20


def chunk_item(length: int, typ: int, stripes: list[tuple[int, int]]) -> bytes:
    head = struct.pack("<4Q3I2H", length, 2, 64 << 10, typ, 65536, 65536, 4096, len(stripes), 0)
    return head + b"".join(struct.pack("<2Q16s", d, o, bytes(16)) for d, o in stripes)


def search_buffer(items: list[tuple[int, int, int, bytes]]) -> bytearray:
    buf = bytearray(btrfs.search_key(3, 256, 228, 0, len(items)))
    for objectid, typ, offset, data in items:
        buf += struct.pack("<3Q2I", 7, objectid, offset, typ, len(data)) + data
    return buf + bytes(btrfs.SEARCH_ARGS_SIZE - len(buf))


def test_a_search_result_gives_back_its_chunks() -> None:
    items = [
        (256, 228, 1 << 30, chunk_item(256 * MiB, 1, [(1, 300 * MiB)])),
        (256, 228, (1 << 30) + 256 * MiB, chunk_item(64 * MiB, 4 | 0x20, [(1, 0), (1, MiB)])),
    ]
    got = btrfs.parse_search(search_buffer(items), 2)
    chunks = [btrfs.parse_chunk(off, data) for _o, _t, off, data in got]
    assert chunks[0] == Chunk(1 << 30, 256 * MiB, 1, (Stripe(1, 300 * MiB),))
    assert chunks[0].profile == "single" and chunks[0].is_data
    assert chunks[1].profile == "DUP" and not chunks[1].is_data


def test_a_truncated_search_result_is_refused() -> None:
    buf = search_buffer([(256, 228, 0, chunk_item(MiB, 1, [(1, 0)]))])
    with pytest.raises(BlockMapError, match="truncated"):
        btrfs.parse_search(buf[:150], 1)
    with pytest.raises(BlockMapError, match="bad stripe count"):
        btrfs.parse_chunk(0, chunk_item(MiB, 1, [(1, 0)])[:60])


@given(
    st.lists(st.integers(1, 64), min_size=1, max_size=6),  # chunk lengths, MiB
    st.lists(st.integers(0, 1 << 20), min_size=6, max_size=6),  # device offsets, MiB
    st.data(),
)
def test_every_byte_lands_where_its_chunk_stripe_says(
    lengths: list[int], offsets: list[int], data: st.DataObject
) -> None:
    chunks, logical = [], 1 << 30
    for i, n in enumerate(lengths):
        chunks.append(Chunk(logical, n * MiB, 1, (Stripe(1, offsets[i] * MiB),)))
        logical += n * MiB
    total = logical - (1 << 30)
    start = data.draw(st.integers(0, total // 4096 - 1)) * 4096
    length = data.draw(st.integers(1, (total - start) // 4096)) * 4096
    devid, out = btrfs.map_extents(list(reversed(chunks)), [(0, (1 << 30) + start, length)])
    assert devid == 1 and sum(n for _, _, n in out) == length
    for lo, dev, n in out:  # each piece is inside one chunk and at its stripe's offset
        addr = (1 << 30) + start + lo
        c = next(c for c in chunks if c.logical <= addr < c.logical + c.length)
        assert addr + n <= c.logical + c.length
        assert dev == c.stripes[0].offset + addr - c.logical


@pytest.mark.parametrize(
    ("chunk", "match"),
    [
        (Chunk(0, 64 * MiB, 1 | 0x20, (Stripe(1, 0), Stripe(1, 64 * MiB))), "DUP profile"),
        (Chunk(0, 64 * MiB, 1 | 0x10, (Stripe(1, 0), Stripe(2, 0))), "RAID1 profile"),
        (Chunk(0, 64 * MiB, 4, (Stripe(1, 0),)), "chunk without data"),
    ],
)
def test_a_chunk_the_save_kernel_cannot_write_raw_is_refused(chunk: Chunk, match: str) -> None:
    with pytest.raises(BlockMapError, match=match) as ei:
        btrfs.map_extents([chunk], [(0, MiB, 4096)])
    assert ei.value.fix


def test_a_file_on_two_devices_or_outside_the_chunks_is_refused() -> None:
    chunks = [Chunk(0, MiB, 1, (Stripe(1, 0),)), Chunk(MiB, MiB, 1, (Stripe(2, 0),))]
    with pytest.raises(BlockMapError, match="several btrfs devices"):
        btrfs.map_extents(chunks, [(0, 0, 2 * MiB)])
    with pytest.raises(BlockMapError, match="in no chunk") as ei:
        btrfs.map_extents(chunks, [(0, 5 * MiB, 4096)])
    assert "try again" in ei.value.fix
