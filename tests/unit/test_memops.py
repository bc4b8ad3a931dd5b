"""kjumpd.image.memops: the bulk copies, fills and comparisons of the save and the restore give
the bytes Python's own operations give, through libc and without it, for every buffer kind
the pipeline hands them (mmap windows, bytearrays, read-only bytes, slices)."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kjumpd.image import memops

BIG = memops.LIBC_MIN + 4096 + 17  # past the libc threshold, not a page multiple


@pytest.fixture(params=["libc", "python"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(memops, "_LIBC", None)
    else:
        assert memops._LIBC is not None, "this machine's libc has memmove, memset and memcmp"
    return str(request.param)


def _pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 131 + seed) & 0xFF for i in range(n))


@pytest.mark.parametrize("n", [0, 1, 4096, BIG, 3 << 20])
def test_copy_into_writes_exactly_the_source_and_nothing_past_it(path: str, n: int) -> None:
    dst = mmap.mmap(-1, n + 8192)
    dst.write(b"\xee" * len(dst))
    src = bytearray(_pattern(n))
    with memoryview(dst) as d, memoryview(src) as s:
        memops.copy_into(d[4096 : 4096 + n], s)
    assert dst[:4096] == b"\xee" * 4096
    assert dst[4096 : 4096 + n] == bytes(src)
    assert dst[4096 + n :] == b"\xee" * 4096


def test_copy_into_takes_a_read_only_source(path: str) -> None:
    src = _pattern(BIG, 7)  # bytes, as lz4's output: read through the buffer protocol
    dst = bytearray(BIG)
    with memoryview(dst) as d, memoryview(src) as s:
        memops.copy_into(d, s)
    assert bytes(dst) == src


def test_copy_from_a_read_only_mapping_leaves_it_as_it_was(path: str, tmp_path) -> None:
    """The save kernel's view of A's memory is a read-only mapping: it is copied from
    without being made writable, and stays exactly as it was."""
    f = tmp_path / "mem"
    f.write_bytes(_pattern(BIG * 2, 3))
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        out = bytearray(BIG)
        with memoryview(m) as v, memoryview(out) as o:
            assert v.readonly
            memops.copy_into(o, v[BIG : 2 * BIG])
            assert memops.equal(o, v[BIG : 2 * BIG])
            assert not memops.is_zero(v)
        assert bytes(out) == _pattern(BIG * 2, 3)[BIG:]
    assert f.read_bytes() == _pattern(BIG * 2, 3)


def test_a_copy_larger_than_its_destination_is_refused(path: str) -> None:
    src = bytearray(BIG)
    dst = bytearray(BIG + 8)
    with memoryview(dst) as d, memoryview(src) as s, pytest.raises(ValueError):
        memops.copy_into(d[: BIG - 1], s)
    assert dst == bytearray(BIG + 8)


@pytest.mark.parametrize("n", [1, BIG, 2 << 20])
def test_zero_fill_clears_only_its_view(path: str, n: int) -> None:
    buf = bytearray(b"\x5a" * (n + 2))
    with memoryview(buf) as v:
        memops.zero_fill(v[1 : 1 + n])
    assert buf[0] == 0x5A and buf[-1] == 0x5A
    assert bytes(buf[1 : 1 + n]) == bytes(n)


@pytest.mark.parametrize("n", [1, BIG, (1 << 20) + 1, 3 << 20])
def test_is_zero_finds_one_stray_byte_anywhere(path: str, n: int) -> None:
    buf = bytearray(n)
    with memoryview(buf) as v:
        assert memops.is_zero(v)
    for where in {0, n // 2, n - 1}:
        buf[where] = 1
        with memoryview(buf) as v:
            assert not memops.is_zero(v), f"a 1 at {where} of {n}"
        buf[where] = 0


def test_equal_tells_one_flipped_bit_and_a_length_difference(path: str) -> None:
    a = bytearray(_pattern(BIG))
    b = bytearray(a)
    with memoryview(a) as va, memoryview(b) as vb:
        assert memops.equal(va, vb)
        assert not memops.equal(va, vb[:-1])
    b[BIG - 1] ^= 0x10
    with memoryview(a) as va, memoryview(b) as vb:
        assert not memops.equal(va, vb)


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=3 * memops.LIBC_MIN),
    at=st.integers(min_value=0, max_value=64),
    use_libc=st.booleans(),
    read_only=st.booleans(),
)
def test_memops_agree_with_python_on_any_bytes(
    data: bytes, at: int, use_libc: bool, read_only: bool
) -> None:
    saved = memops._LIBC
    if not use_libc:
        memops._LIBC = None
    try:
        src = data if read_only else bytearray(data)
        dst = bytearray(b"\x01" * (len(data) + at))
        with memoryview(dst) as d, memoryview(src) as s:
            memops.copy_into(d[at:], s)
            assert memops.equal(d[at:], s)
            assert memops.is_zero(s) == (data == bytes(len(data)))
            memops.zero_fill(d[at:])
        assert dst == b"\x01" * at + bytes(len(data))
    finally:
        memops._LIBC = saved
