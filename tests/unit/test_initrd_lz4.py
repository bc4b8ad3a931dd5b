"""The lz4 legacy stream kjumpd writes for initramfs archives (kjumpd.initrd): what the kernel's
unlz4 reads (lib/decompress_unlz4.c) and what ``lz4 -l`` writes."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kjumpd.errors import InitrdError
from kjumpd.initrd import (
    LZ4_LEGACY_BLOCK,
    LZ4_LEGACY_MAGIC,
    decompress,
    lz4_legacy_blocks,
    lz4_legacy_compress,
    lz4_legacy_length,
)


@settings(max_examples=40, deadline=None)
@given(raw=st.binary(max_size=20000), pad=st.integers(1, 8))
def test_a_stream_reads_back_byte_exact_and_ends_before_what_follows(raw: bytes, pad: int) -> None:
    blob = lz4_legacy_compress(raw)
    assert blob[:4] == LZ4_LEGACY_MAGIC
    assert decompress(blob + bytes(pad)) == raw
    # an archive appended after it (B's job, R's payload) is not taken for a block
    assert lz4_legacy_length(blob + bytes(4) + b"070701" + bytes(100)) == len(blob)


def test_archives_larger_than_a_block_are_split_where_the_kernel_expects() -> None:
    base = bytes(range(256)) * 4096  # 1 MiB
    raw = b"".join(base[i:] + base[:i] for i in range(19))[: 2 * LZ4_LEGACY_BLOCK + 12345]
    blob = lz4_legacy_compress(raw)
    blocks = lz4_legacy_blocks(blob)
    assert len(blocks) == 3  # 8 MiB, 8 MiB, the rest: the kernel unpacks 8 MiB at most a block
    assert decompress(blob) == raw


def test_a_damaged_block_is_refused_as_unreadable() -> None:
    raw = b"".join(i.to_bytes(4, "little") for i in range(50000))
    blob = bytearray(lz4_legacy_compress(raw))
    blob[len(blob) // 2 :] = bytes(len(blob) - len(blob) // 2)
    blob[8:12] = b"\xff\xff\xff\x7f"  # a literal run longer than the block
    with pytest.raises(InitrdError, match="lz4 archive cannot be read"):
        decompress(bytes(blob))


@pytest.mark.skipif(shutil.which("lz4") is None, reason="no lz4 tool to compare with")
def test_the_lz4_tool_reads_what_kjumpd_writes() -> None:
    raw = bytes(range(256)) * 3000 + b"kjumpd" * 5000
    got = subprocess.run(
        ["lz4", "-d", "-c", "-q"], input=lz4_legacy_compress(raw), capture_output=True, check=True
    )
    assert got.stdout == raw
