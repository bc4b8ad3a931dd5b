"""kjumpd.agent.devmem against a file standing in for /dev/mem (same mmap code path)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kjumpd.agent.devmem import MemorySink, MemorySource, normalize, subtract
from kjumpd.errors import AgentError
from kjumpd.sysroot import Sysroot

SIZE = 8 << 20
WINDOW = 1 << 20
RANGES = [(0x1000, 0x9F000), (0x100000, 0x7FF000)]


@pytest.fixture
def mem(tmp_path: Path) -> tuple[Sysroot, bytes]:
    (tmp_path / "dev").mkdir()
    data = random.Random(7).randbytes(SIZE)
    (tmp_path / "dev" / "mem").write_bytes(data)
    return Sysroot(tmp_path), data


def test_reads_cross_window_boundaries_byte_exact(mem) -> None:
    root, data = mem
    with MemorySource(root, RANGES, window=WINDOW) as src:
        for start, length in [
            (0x1000, 0x9E000),
            (0x100000, 3 * WINDOW + 123),
            (WINDOW * 2 - 5, 10),
            (0x7FE000, 0x1000),
        ]:
            assert src.read(start, length) == data[start : start + length]


def test_a_read_outside_the_ranges_is_refused_not_served(mem) -> None:
    root, _ = mem
    with MemorySource(root, RANGES, window=WINDOW) as src:
        with pytest.raises(AgentError, match="outside the main kernel's memory ranges"):
            src.read(0x9F000, 0x1000)  # the hole between the ranges
        with pytest.raises(AgentError, match="outside"):
            src.read(0x9E000, 0x2000)  # runs off the end of a range


def test_writes_land_except_held_pages_which_become_segments(mem) -> None:
    root, data = mem
    hold = [(0, 0x80000)]
    payload = bytes([0xA5]) * 0x10000
    with MemorySink(root, RANGES, hold=hold, window=WINDOW) as sink:
        sink.write(0x78000, payload)  # 0x78000-0x80000 held, rest direct
        sink.write(0x200000, b"\x5a" * (WINDOW + 77))
        sink.write(0x3000, b"\x11" * 100)  # partial page, held
        sink.flush()
        held = sink.held_segments()
    now = (root.root / "dev" / "mem").read_bytes()
    assert now[0x80000:0x88000] == payload[0x8000:]
    assert now[0x78000:0x80000] == data[0x78000:0x80000], "a held page was written directly"
    assert now[0x200000 : 0x200000 + WINDOW + 77] == b"\x5a" * (WINDOW + 77)
    assert now[0x3000:0x3100] == data[0x3000:0x3100]
    assert [(h.mem, len(h.data)) for h in held] == [(0x3000, 0x1000), (0x78000, 0x8000)]
    assert held[0].data[:100] == b"\x11" * 100
    assert held[1].data == payload[:0x8000]


def test_missing_device_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="cannot open /dev/mem"):
        MemorySource(Sysroot(tmp_path))


ranges = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 1 << 16)), max_size=6).map(
    lambda xs: [(a, a + n) for a, n in xs]
)


@given(ranges, ranges)
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_subtract_removes_exactly_the_holes(rs, holes) -> None:
    got = subtract(rs, holes)

    def covered(rr, x):
        return any(a <= x < b for a, b in rr)

    points = {p for a, b in rs + holes for p in (a, b - 1, b, a - 1) if p >= 0}
    for p in points:
        assert covered(got, p) == (covered(rs, p) and not covered(holes, p))
    assert got == normalize(got)


def test_zero_fills_direct_and_held_pages_across_windows(mem) -> None:
    root, data = mem
    hold = [(0, 0x80000)]
    with MemorySink(root, RANGES, hold=hold, window=WINDOW) as sink:
        sink.zero(0x70000, 0x20000)  # 0x70000-0x80000 held, rest direct
        sink.zero(0x100000 + WINDOW - 0x3000, 2 * WINDOW + 0x5000)  # two window boundaries
        sink.zero(0x500123, 10)  # small and unaligned
        sink.flush()
        held = sink.held_segments()
        assert sink.bytes_written == 0x10000 + 2 * WINDOW + 0x5000 + 10
    now = (root.root / "dev" / "mem").read_bytes()
    assert now[0x70000:0x80000] == data[0x70000:0x80000], "a held page was written directly"
    assert [(h.mem, h.data) for h in held] == [(0x70000, bytes(0x10000))]
    assert now[0x80000:0x90000] == bytes(0x10000)
    a = 0x100000 + WINDOW - 0x3000
    assert now[a : a + 2 * WINDOW + 0x5000] == bytes(2 * WINDOW + 0x5000)
    assert (
        now[a - 1] == data[a - 1] and now[a + 2 * WINDOW + 0x5000] == data[a + 2 * WINDOW + 0x5000]
    )
    assert now[0x500123:0x50012D] == bytes(10)
    assert now[0x500122] == data[0x500122] and now[0x50012D] == data[0x50012D]


@pytest.mark.parametrize("kind", [bytes, bytearray, "mmap"])
def test_large_writes_from_any_buffer_land_byte_exact(mem, kind) -> None:
    import mmap as _mmap

    root, _ = mem
    src = random.Random(3).randbytes(3 * WINDOW + 4096)
    if kind == "mmap":
        buf = _mmap.mmap(-1, len(src))
        buf[:] = src
    else:
        buf = kind(src)
    at = 0x100000 + WINDOW // 2 + 512  # unaligned, crosses 3 windows
    with MemorySink(root, RANGES, window=WINDOW) as sink:
        with memoryview(buf) as mv:
            sink.write(at, mv[7:])
        sink.flush()
    now = (root.root / "dev" / "mem").read_bytes()
    assert now[at : at + len(src) - 7] == src[7:]


def test_zero_leaves_zero_memory_alone_and_clears_the_rest(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    data = bytearray(SIZE)
    data[0x300000 + 0x12345] = 7  # one stray byte in the second MiB
    data[0x500000:0x501000] = b"\x99" * 0x1000
    (tmp_path / "dev" / "mem").write_bytes(data)
    with MemorySink(Sysroot(tmp_path), RANGES, window=WINDOW) as sink:
        for at in range(0x200000, 0x600000, 1 << 20):
            sink.zero(at, 1 << 20)
        sink.flush()
        assert sink.zero_already == 2 << 20  # 0x200000 and 0x400000 were zero
    assert (tmp_path / "dev" / "mem").read_bytes() == bytes(SIZE)


def test_threads_writing_at_once_each_land_byte_exact(mem) -> None:
    """The restore's workers write through one sink at the same time (own window each)."""
    import threading

    root, data = mem
    hold = [(0, 0x80000)]
    pieces = [
        (a, random.Random(a).randbytes(0x30000))
        for a in range(0x50000, 0x7F0000, 0x30000)
        if a + 0x30000 <= 0x7FF000 and not (a < 0x100000 and a + 0x30000 > 0x9F000)
    ]
    errors: list[BaseException] = []
    with MemorySink(root, RANGES, hold=hold, window=WINDOW) as sink:
        assert sink.concurrent_writes

        def run(k: int) -> None:
            try:
                for a, b in pieces[k::4]:
                    if a % 0x60000:
                        sink.write(a, b)
                    else:
                        sink.zero(a, len(b))
            except BaseException as e:  # noqa: B902 - reported below
                errors.append(e)

        ts = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        sink.flush()
        held = {h.mem: h.data for h in sink.held_segments()}
    assert not errors
    now = (root.root / "dev" / "mem").read_bytes()
    for a, b in pieces:
        want = b if a % 0x60000 else bytes(len(b))
        if a >= 0x80000:
            assert now[a : a + len(b)] == want, hex(a)
        else:
            assert now[a:0x80000] == data[a:0x80000]
            assert held[a][: 0x80000 - a] == want[: 0x80000 - a]


def test_place_writes_in_place_only_clear_of_held_pages_and_within_a_window(mem) -> None:
    """The restore decodes a chunk straight into A's memory when the sink can place it;
    a held page or a window boundary refuses the place (nothing written) and the chunk
    goes through write() instead."""
    root, data = mem
    hold = [(0, 0x80000)]

    def fill_with(byte: int):
        def fill(view: memoryview) -> None:
            view[:] = bytes([byte]) * len(view)

        return fill

    with MemorySink(root, RANGES, hold=hold, window=WINDOW) as sink:
        assert sink.place(0x200000, 0x10000, fill_with(0x42))
        assert not sink.place(0x78000, 0x10000, fill_with(0x43))  # half held
        assert not sink.place(3 * WINDOW - 0x1000, 0x2000, fill_with(0x44))  # two windows
        sink.flush()
        assert sink.bytes_written == 0x10000
        assert sink.held_segments() == []
    now = (root.root / "dev" / "mem").read_bytes()
    assert now[0x200000:0x210000] == b"\x42" * 0x10000
    assert now[0x78000:0x88000] == data[0x78000:0x88000]
    assert (
        now[3 * WINDOW - 0x1000 : 3 * WINDOW + 0x1000]
        == data[3 * WINDOW - 0x1000 : 3 * WINDOW + 0x1000]
    )
    assert now[:0x200000] == data[:0x200000] and now[0x210000:] == data[0x210000:]


def test_views_stay_valid_and_exact_after_the_window_moves_on(mem) -> None:
    """The save keeps a view of A's memory in each raw record until the writer has copied
    it; the worker meanwhile maps other windows. The view must keep its bytes, and the
    source must close cleanly once the records are gone."""
    root, data = mem
    src = MemorySource(root, RANGES, window=WINDOW)
    held = []
    for start in (0x100000, 0x100000 + WINDOW, 0x100000 + 3 * WINDOW, 0x1000):
        v = src.view(start, 0x40000)
        assert v is not None and v.readonly
        held.append((start, v))
    src.read(0x600000, 0x1000)  # yet another window
    for start, v in held:
        assert v == data[start : start + 0x40000]
    assert src.view(2 * WINDOW - 0x1000, 0x2000) is None, "a view across a window's end"
    src.close()  # while records still hold views: they keep their mapping alive
    for start, v in held:
        assert v.tobytes() == data[start : start + 0x40000]
    with pytest.raises(AgentError, match="outside"):
        MemorySource(root, RANGES, window=WINDOW).view(0x9F000, 0x1000)


@pytest.mark.parametrize("compression", ["lz4", "none"])
def test_a_save_through_views_of_memory_restores_byte_exact(tmp_path: Path, compression) -> None:
    """The save kernel's save: workers encode A's memory in place (raw records keep their
    view while the windows move on), several at once, and the image restores exactly."""
    from kjumpd.image import restore, save, store
    from kjumpd.image.device import ImageDevice
    from kjumpd.image.memfile import FileMemorySink

    rnd = random.Random(11)
    pages = []
    for i in range(SIZE // 4096):  # runs of random, zero and text pages
        kind = (i // 37) % 3
        pages.append(
            rnd.randbytes(4096) if kind == 0 else bytes(4096) if kind == 1 else b"abc\n" * 1024
        )
    data = b"".join(pages)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "mem").write_bytes(data)
    tgt = tmp_path / "target"
    store.create_target(tgt, 3 * SIZE)
    with (
        ImageDevice(tgt, writable=True) as dev,
        MemorySource(Sysroot(tmp_path), RANGES, window=WINDOW) as src,
    ):
        src.readinto = None  # type: ignore[method-assign]  # only views (or plain reads)
        viewed = []
        plain_view = src.view

        def view(phys: int, length: int) -> memoryview | None:
            v = plain_view(phys, length)
            viewed.append(v is not None)
            return v

        src.view = view  # type: ignore[method-assign]
        stats = save.save_image(
            src,
            RANGES,
            dev,
            identity={},
            mode="test",
            chunk_size=64 << 10,
            workers=3,
            compression=compression,
        )
    assert stats.raw_bytes == sum(b - a for a, b in RANGES)
    assert sum(viewed) > len(viewed) // 2, "most chunks encoded in place"
    out = tmp_path / "restored"
    out.write_bytes(b"\xaa" * SIZE)
    with ImageDevice(tgt, writable=False) as dev, FileMemorySink(out) as sink:
        restore.restore_image(dev, sink)
        sink.flush()
    got = out.read_bytes()
    for a, b in RANGES:
        assert got[a:b] == data[a:b]
    assert got[: RANGES[0][0]] == b"\xaa" * RANGES[0][0], "outside the ranges: untouched"
