"""Streaming save and restore on real files: byte-exact multi-range round trips, every
corruption class refused (nothing written past a bad chunk), cancel / I/O error -> ABORTED."""

from __future__ import annotations

import os
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kjumpd.errors import (
    AgentError,
    CancelledError,
    ImageCorruptError,
    ImageError,
    ImageFormatError,
    ImageStateError,
    TargetError,
)
from kjumpd.image import restore, save, store
from kjumpd.image.device import ImageDevice
from kjumpd.image.format import (
    CHUNK_HEADER_SIZE,
    ENC_FREE,
    HEADER_SLOT_OFFSETS,
    PAGE_SIZE,
    ChunkHeader,
    ImageState,
)
from kjumpd.image.memfile import FileMemorySink, FileMemorySource
from tests import prereq

MiB = 1024 * 1024
CHUNK = 64 * 1024  # small chunks: many records in a small test file


def make_memory(path, size, seed=7):
    """Mixed pages: zero, text-like, random, 0xff; deterministic."""
    rnd = random.Random(seed)
    out = bytearray()
    for i in range(size // PAGE_SIZE):
        r = rnd.random()
        if r < 0.4:
            out += bytes(PAGE_SIZE)
        elif r < 0.7:
            line = f"line {i} pid {rnd.randrange(1 << 16)} /usr/lib/x\n".encode()
            out += (line * (PAGE_SIZE // len(line) + 1))[:PAGE_SIZE]
        elif r < 0.9:
            out += rnd.randbytes(PAGE_SIZE)
        else:
            out += b"\xff" * PAGE_SIZE
    path.write_bytes(out)
    return bytes(out)


RANGES = [(0x1000, 0x9F000), (0x100000, 0x2F0000), (0x300000, 0x3C5000)]


@pytest.fixture
def saved(tmp_path):
    mem = make_memory(tmp_path / "mem", 4 * MiB)
    tgt = tmp_path / "target"
    store.create_target(tgt, 8 * MiB)
    with ImageDevice(tgt, writable=True) as dev, FileMemorySource(tmp_path / "mem") as src:
        stats = save.save_image(
            src,
            RANGES,
            dev,
            identity={
                "main_kernel": "6.12 abc",
                "jump_area": [0x20000000, 1 << 27],
                "jump_back_entry": 0x1234000,
                "save_kernel_hash": "sha256:x",
            },
            mode="test",
            chunk_size=CHUNK,
            workers=2,
        )
    return tmp_path, mem, tgt, stats


def restore_into(tmp_path, tgt, fill=b"\xaa", size=4 * MiB, **kw):
    out = tmp_path / "restored"
    out.write_bytes(fill * size)
    with ImageDevice(tgt, writable=False) as dev, FileMemorySink(out) as sink:
        try:
            return restore.restore_image(dev, sink, **kw), out
        finally:
            sink.flush()


def test_multi_range_round_trip_is_byte_exact_over_dirty_memory(saved):
    tmp_path, mem, tgt, stats = saved
    assert stats.zero_pages > 0 and stats.stored_bytes < stats.raw_bytes
    assert stats.header.state == ImageState.SAVED
    rs, out = restore_into(tmp_path, tgt)  # memory full of 0xaa: zero pages must come back
    got = out.read_bytes()
    for a, b in RANGES:
        assert got[a:b] == mem[a:b]
    # outside the ranges nothing was touched
    assert got[:0x1000] == b"\xaa" * 0x1000
    assert got[0x9F000:0x100000] == b"\xaa" * (0x100000 - 0x9F000)
    assert got[0x3C5000:] == b"\xaa" * (4 * MiB - 0x3C5000)
    assert rs.raw_bytes == sum(b - a for a, b in RANGES)


def test_header_records_identities_and_stats(saved):
    _, _, tgt, stats = saved
    with ImageDevice(tgt, writable=False) as dev:
        h = store.read_header(dev)
        meta = store.read_metadata(dev, h)
    assert h.state == ImageState.SAVED and h.saved >= h.created
    assert (h.main_kernel, h.save_kernel_hash, h.mode, h.compression) == (
        "6.12 abc",
        "sha256:x",
        "test",
        "lz4",
    )
    assert (h.jump_area_start, h.jump_area_size, h.jump_back_entry) == (
        0x20000000,
        1 << 27,
        0x1234000,
    )
    assert [(e.start, e.end) for e in meta.extents] == RANGES
    assert meta.identity["main_kernel"] == "6.12 abc"
    assert h.chunk_count == stats.chunk_count and h.zero_pages == stats.zero_pages


def test_divert_holds_back_pages_instead_of_writing_them(saved):
    tmp_path, mem, tgt, _ = saved
    held = []
    rs, out = restore_into(
        tmp_path,
        tgt,
        divert=[(0x0, 0x80000)],
        on_divert=lambda phys, data: held.append((phys, bytes(data))),
    )
    got = out.read_bytes()
    assert got[0x1000:0x80000] == b"\xaa" * (0x80000 - 0x1000)  # never written
    assert got[0x80000:0x9F000] == mem[0x80000:0x9F000]
    assert b"".join(d for _, d in sorted(held)) == mem[0x1000:0x80000]
    assert rs.diverted_bytes == 0x80000 - 0x1000


def _chunk_offsets(tgt):
    from kjumpd.image.stream import RecordReader

    with ImageDevice(tgt, writable=False) as dev:
        h = store.read_header(dev)
        r = RecordReader(dev, h.data_offset, h.data_length)
        recs = [(ch, off) for ch, _, _, off in r]
        r.close()
    return h, recs


def test_held_payloads_stay_intact_until_given_back_and_match_the_copies(saved):
    """held_records hands payloads out as views of the windows read: a window is not read
    into again while a payload cut out of it is held, however far the reader goes on."""
    from kjumpd.image.stream import RecordReader

    _, _, tgt, _ = saved
    window = 64 * 1024
    with ImageDevice(tgt, writable=False) as dev:
        h = store.read_header(dev)
        assert h.data_length > 8 * window  # the reader goes round its windows
        r = RecordReader(dev, h.data_offset, h.data_length, window=window)
        copies = [(ch.index, bitmap, payload) for ch, bitmap, payload, _ in r]
        r.close()
        r = RecordReader(dev, h.data_offset, h.data_length, window=window, held=2)
        got, kept, views = {}, [], 0
        for ch, bitmap, payload, _, give_back in r.held_records():
            if isinstance(payload, memoryview):
                views += 1
                if len(kept) < 2:  # the first two views are held to the end
                    kept.append((ch.index, bitmap, payload, give_back))
                    continue
            got[ch.index] = (ch.index, bitmap, bytes(payload))
            give_back()
            give_back()  # a second call does nothing
        for i, b, p, back in kept:
            got[i] = (i, b, bytes(p))
            back()
        r.close()
    assert [got[i] for i in sorted(got)] == copies
    assert views > len(copies) // 2  # most records fit in one window: no copy


def _poke(tgt, offset, data):
    with open(tgt, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("where", ["payload", "record header"])
def test_corrupt_chunk_is_refused_and_nothing_past_it_is_written(saved, where):
    tmp_path, mem, tgt, _ = saved
    h, recs = _chunk_offsets(tgt)
    k = len(recs) // 2
    ch, off = recs[k]
    pos = off + (ch.record_length - 5 if where == "payload" else 14)
    _poke(tgt, pos, b"\x5a")
    with pytest.raises(ImageCorruptError) as ei:
        restore_into(tmp_path, tgt)
    assert (
        f"at byte offset {off}" in str(ei.value)
        or f"at byte offset {pos}" in str(ei.value)
        or f"at byte offset {off + CHUNK_HEADER_SIZE - 4}" in str(ei.value)
    )
    got = (tmp_path / "restored").read_bytes()
    # chunks before k are restored, chunk k and everything after it untouched
    for c, _ in recs[:k]:
        assert got[c.phys : c.phys + c.raw_length] == mem[c.phys : c.phys + c.raw_length]
    for c, _ in recs[k:]:
        assert got[c.phys : c.phys + c.raw_length] == b"\xaa" * c.raw_length
    # kjumpctl image verify refuses it too, naming the chunk
    with ImageDevice(tgt, writable=False) as dev:
        with pytest.raises(ImageCorruptError):
            restore.restore_image(dev, None, verify_only=True)


def test_truncated_target_is_refused_before_writing(saved):
    tmp_path, _, tgt, stats = saved
    h = stats.header
    os.truncate(tgt, h.data_offset + h.data_length // 2 // 4096 * 4096)
    with pytest.raises(ImageFormatError, match="does not agree"):
        restore_into(tmp_path, tgt)
    assert (tmp_path / "restored").read_bytes() == b"\xaa" * (4 * MiB)


def test_missing_tail_is_refused_as_truncated(saved):
    """The data area's last records never reached the disk (zeros where they should be)."""
    tmp_path, mem, tgt, _ = saved
    h, recs = _chunk_offsets(tgt)
    ch, off = recs[-2]
    _poke(tgt, off, bytes(h.data_offset + h.data_length - off))
    with pytest.raises(ImageCorruptError, match=f"byte offset {off}"):
        restore_into(tmp_path, tgt)
    got = (tmp_path / "restored").read_bytes()
    assert got[ch.phys : ch.phys + ch.raw_length] == b"\xaa" * ch.raw_length


def test_swapped_chunks_are_refused(saved):
    tmp_path, _, tgt, _ = saved
    h, recs = _chunk_offsets(tgt)
    (a, oa), (b, ob) = recs[3], recs[4]
    raw = tgt.read_bytes()
    ra, rb = raw[oa : oa + a.record_length], raw[ob : ob + b.record_length]
    _poke(tgt, oa, rb + ra)
    with pytest.raises(ImageCorruptError, match="out of place"):
        restore_into(tmp_path, tgt)


def test_wrong_version_is_refused(saved):
    tmp_path, _, tgt, _ = saved
    for off in HEADER_SLOT_OFFSETS:
        _poke(tgt, off + 8, b"\x07\x00")
    with pytest.raises(ImageFormatError, match="format version 7 is not supported"):
        restore_into(tmp_path, tgt)


def test_corrupt_metadata_is_refused(saved):
    tmp_path, _, tgt, stats = saved
    _poke(tgt, stats.header.metadata_offset + 30, b"\x99")
    with pytest.raises(ImageCorruptError, match="metadata"):
        restore_into(tmp_path, tgt)


@pytest.mark.parametrize(
    "state",
    [
        ImageState.EMPTY,
        ImageState.WRITING,
        ImageState.CONSUMED,
        ImageState.ABORTED,
        ImageState.INVALID,
    ],
)
def test_wrong_state_is_refused(saved, state):
    tmp_path, _, tgt, _ = saved
    with ImageDevice(tgt, writable=True) as dev:
        store.set_state(dev, state, reason="test")
    with pytest.raises(ImageStateError, match=f"it is {state.name}"):
        restore_into(tmp_path, tgt)
    assert (tmp_path / "restored").read_bytes() == b"\xaa" * (4 * MiB)


def test_restoring_state_is_accepted(saved):
    tmp_path, mem, tgt, _ = saved
    with ImageDevice(tgt, writable=True) as dev:
        store.set_state(dev, ImageState.RESTORING, attempt=1)
    _, out = restore_into(tmp_path, tgt)
    assert out.read_bytes()[0x100000:0x2F0000] == mem[0x100000:0x2F0000]


def test_cancel_midway_marks_aborted(tmp_path):
    make_memory(tmp_path / "mem", 4 * MiB)
    store.create_target(tmp_path / "t", 8 * MiB)
    asked = {"n": 0}

    def cancel():  # the user presses the key after 5 chunks
        asked["n"] += 1
        return asked["n"] > 5

    with (
        ImageDevice(tmp_path / "t", writable=True) as dev,
        FileMemorySource(tmp_path / "mem") as src,
    ):
        with pytest.raises(CancelledError):
            save.save_image(
                src, [(0, 4 * MiB)], dev, identity={}, mode="test", chunk_size=CHUNK, cancel=cancel
            )
        h = store.read_header(dev)
    assert h.state == ImageState.ABORTED and "cancel" in h.reason
    assert asked["n"] == 6


def test_cancel_event_marks_aborted(tmp_path):
    """The save kernel's cancel key sets a threading.Event."""
    make_memory(tmp_path / "mem", 1 * MiB)
    store.create_target(tmp_path / "t", 4 * MiB)
    ev = threading.Event()
    ev.set()
    with (
        ImageDevice(tmp_path / "t", writable=True) as dev,
        FileMemorySource(tmp_path / "mem") as src,
    ):
        with pytest.raises(CancelledError):
            save.save_image(src, [(0, 1 * MiB)], dev, identity={}, mode="test", cancel=ev)
        assert store.read_header(dev).state_text == "ABORTED(save cancelled)"


class FailingSource:
    def __init__(self, inner, fail_at):
        self.inner, self.fail_at = inner, fail_at

    def read(self, phys, n):
        if phys >= self.fail_at:
            raise AgentError("read error on /dev/mem", why="Input/output error")
        return self.inner.read(phys, n)


def test_source_error_marks_aborted_with_reason(tmp_path):
    make_memory(tmp_path / "mem", 4 * MiB)
    store.create_target(tmp_path / "t", 8 * MiB)
    with (
        ImageDevice(tmp_path / "t", writable=True) as dev,
        FileMemorySource(tmp_path / "mem") as src,
    ):
        with pytest.raises(AgentError, match="read error"):
            save.save_image(
                FailingSource(src, 2 * MiB),
                [(0, 4 * MiB)],
                dev,
                identity={},
                mode="test",
                chunk_size=CHUNK,
            )
        h = store.read_header(dev)
    assert h.state == ImageState.ABORTED and "read error on /dev/mem" in h.reason


def test_target_full_marks_aborted(tmp_path):
    (tmp_path / "mem").write_bytes(random.Random(1).randbytes(4 * MiB))
    store.create_target(tmp_path / "t", 2 * MiB)
    with (
        ImageDevice(tmp_path / "t", writable=True) as dev,
        FileMemorySource(tmp_path / "mem") as src,
    ):
        with pytest.raises(TargetError, match="target is full"):
            save.save_image(src, [(0, 4 * MiB)], dev, identity={}, mode="test")
        h = store.read_header(dev)
    assert h.state == ImageState.ABORTED and "full" in h.reason
    # the file did not grow: nothing was written outside the target
    assert os.path.getsize(tmp_path / "t") == 2 * MiB


def test_range_past_memory_end_is_refused(tmp_path):
    make_memory(tmp_path / "mem", 1 * MiB)
    store.create_target(tmp_path / "t", 4 * MiB)
    with (
        ImageDevice(tmp_path / "t", writable=True) as dev,
        FileMemorySource(tmp_path / "mem") as src,
    ):
        with pytest.raises(AgentError, match="past the end"):
            save.save_image(src, [(0, 2 * MiB)], dev, identity={}, mode="test")
        assert store.read_header(dev).state == ImageState.ABORTED


def test_progress_reports_done_total_rate_eta(tmp_path):
    make_memory(tmp_path / "mem", 2 * MiB)
    store.create_target(tmp_path / "t", 4 * MiB)
    seen = []
    with (
        ImageDevice(tmp_path / "t", writable=True) as dev,
        FileMemorySource(tmp_path / "mem") as src,
    ):
        save.save_image(
            src,
            [(0, 2 * MiB)],
            dev,
            identity={},
            mode="test",
            chunk_size=CHUNK,
            progress=lambda *a: seen.append(a),
        )
    assert seen[-1][0] == seen[-1][1] == 2 * MiB
    assert all(len(a) == 4 and a[2] >= 0 and a[3] >= 0 for a in seen)


def test_save_over_tmpfs_falls_back_to_buffered_io(tmp_path):
    shm = "/dev/shm"
    prereq.need(os.path.isdir(shm), "no /dev/shm (tmpfs) on this machine")
    import tempfile

    with tempfile.TemporaryDirectory(dir=shm) as d:
        mem = make_memory(tmp_path / "mem", 1 * MiB)
        tgt = os.path.join(d, "t")
        store.create_target(tgt, 4 * MiB)
        with ImageDevice(tgt, writable=True) as dev, FileMemorySource(tmp_path / "mem") as src:
            # tmpfs refuses O_DIRECT before Linux 6.6: either way the save must work
            save.save_image(src, [(0, 1 * MiB)], dev, identity={}, mode="test")
        rs, out = restore_into(tmp_path, tgt, size=1 * MiB)
        assert out.read_bytes() == mem


def test_uncompressed_mode_round_trips(tmp_path):
    mem = make_memory(tmp_path / "mem", 1 * MiB)
    store.create_target(tmp_path / "t", 4 * MiB)
    with (
        ImageDevice(tmp_path / "t", writable=True) as dev,
        FileMemorySource(tmp_path / "mem") as src,
    ):
        st = save.save_image(src, [(0, 1 * MiB)], dev, identity={}, mode="test", compression="none")
    assert st.header.compression == "none"
    _, out = restore_into(tmp_path, tmp_path / "t", size=1 * MiB)
    assert out.read_bytes() == mem


class LossyDevice(ImageDevice):
    """A disk that silently loses one write of the data area (the verify pass must see it)."""

    def __init__(self, *a, lose_at, **kw):
        super().__init__(*a, **kw)
        self.lose_at = lose_at

    def write_aligned(self, logical, buf):
        if logical == self.lose_at:
            return
        super().write_aligned(logical, buf)


def test_verify_pass_catches_a_lost_write(tmp_path):
    from kjumpd.image.format import Metadata, data_offset_for

    make_memory(tmp_path / "mem", 4 * MiB)
    store.create_target(tmp_path / "t", 8 * MiB)
    ranges = save.normalize_ranges([(0, 4 * MiB)])
    data_off = data_offset_for(len(Metadata(extents=ranges, identity={}).pack()))
    with (
        FileMemorySource(tmp_path / "mem") as src,
        LossyDevice(tmp_path / "t", writable=True, lose_at=data_off) as dev,
    ):
        with pytest.raises(ImageCorruptError, match="reads back differently"):
            save.save_image(src, ranges, dev, identity={}, mode="test")
        h = store.read_header(dev)
    assert h.state == ImageState.ABORTED and "reads back" in h.reason


class BuggySource:
    def read(self, phys, n):
        raise ZeroDivisionError("a bug")


def test_unexpected_exception_never_leaves_the_image_writing(tmp_path):
    store.create_target(tmp_path / "t", 4 * MiB)
    with ImageDevice(tmp_path / "t", writable=True) as dev:
        with pytest.raises(ZeroDivisionError):
            save.save_image(BuggySource(), [(0, MiB)], dev, identity={}, mode="test")
        h = store.read_header(dev)
    assert h.state_text == "ABORTED(save interrupted: ZeroDivisionError)"


@st.composite
def range_sets(draw, size=256 * 1024):
    cuts = sorted(draw(st.sets(st.integers(0, size), min_size=2, max_size=8)))
    pairs = list(zip(cuts[::2], cuts[1::2]))
    return [(a, b) for a, b in pairs if b > a] or [(0, size)]


@settings(
    deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(range_sets(), st.sampled_from([4096, 12288, 65536]), st.sampled_from(["lz4", "none"]))
def test_any_ranges_round_trip_byte_exact(tmp_path, ranges, chunk, compression):
    """Unaligned starts/ends, tiny and odd chunks: every saved byte comes back, nothing else
    is touched."""
    mem_path = tmp_path / "mem"
    mem = mem_path.read_bytes() if mem_path.exists() else make_memory(mem_path, 256 * 1024)
    tgt = tmp_path / "t"
    store.create_target(tgt, 2 * MiB)
    with ImageDevice(tgt, writable=True) as dev, FileMemorySource(mem_path) as src:
        save.save_image(
            src,
            ranges,
            dev,
            identity={},
            mode="test",
            chunk_size=chunk,
            compression=compression,
            workers=2,
        )
    rs, out = restore_into(tmp_path, tgt, size=256 * 1024)
    got = out.read_bytes()
    expect = bytearray(b"\xaa" * (256 * 1024))
    for a, b in ranges:
        expect[a:b] = mem[a:b]
    assert got == bytes(expect)
    assert rs.raw_bytes == sum(b - a for a, b in ranges)


def test_save_through_a_scattered_block_map_writes_only_inside_it(tmp_path):
    """A partition-like target: three extents out of device order on a 'disk' full of 0xee;
    the image goes through the map and no byte outside the extents changes."""
    from kjumpd.image.format import BlockExtent

    disk = tmp_path / "disk"
    disk.write_bytes(b"\xee" * (16 * MiB))
    bm = [
        BlockExtent(0, 9 * MiB, 1 * MiB),
        BlockExtent(1 * MiB, 2 * MiB, 3 * MiB),
        BlockExtent(4 * MiB, 12 * MiB + 4096 * 3, 2 * MiB),
    ]
    with ImageDevice(disk, bm, writable=True) as dev:
        sb = store.stamp_superblock(dev, bm)
        store.init_header(dev, sb.uuid)
    mem = random.Random(9).randbytes(5 * MiB)  # incompressible: ~5 MiB of data
    (tmp_path / "mem").write_bytes(mem)
    dev, sb2 = store.open_target(disk, writable=True, offset=9 * MiB)
    with dev, FileMemorySource(tmp_path / "mem") as src:
        stats = save.save_image(
            src, [(0, 5 * MiB)], dev, identity={}, mode="test", chunk_size=CHUNK
        )
    h = stats.header
    assert h.data_offset + h.data_length > 4 * MiB  # the data reached the third extent
    raw = disk.read_bytes()
    pos = 0
    for e in sorted(bm, key=lambda e: e.device_offset):
        assert raw[pos : e.device_offset] == b"\xee" * (e.device_offset - pos)
        pos = e.device_offset + e.length
    assert raw[pos:] == b"\xee" * (len(raw) - pos)
    dev, _ = store.open_target(disk, writable=False, offset=9 * MiB)
    out = tmp_path / "restored"
    out.write_bytes(b"\xaa" * (5 * MiB))
    with dev, FileMemorySink(out) as sink:
        restore.restore_image(dev, sink)
    assert out.read_bytes() == mem


def test_restore_over_a_file_shorter_than_the_ranges(tmp_path, saved):
    """The file grows as needed; what lies outside the ranges is never written."""
    tmp_path, mem, tgt, _ = saved
    out = tmp_path / "short"
    out.write_bytes(b"\xaa" * 0x200000 + b"\xbb" * 1000)  # ends inside the 2nd range
    with ImageDevice(tgt, writable=False) as dev, FileMemorySink(out) as sink:
        restore.restore_image(dev, sink)
    got = out.read_bytes()
    for a, b in RANGES:
        assert got[a:b] == mem[a:b]
    assert got[0x9F000:0x100000] == b"\xaa" * (0x100000 - 0x9F000)
    assert got[0x2F0000:0x300000] == bytes(0x10000)  # never written: a hole


def test_record_left_from_an_earlier_image_is_refused_before_it_is_written(tmp_path):
    """Two saves with the same layout; one record of the second never reached the disk, so
    the first image's record is still there: same index, place and length, valid CRCs."""
    rnd = random.Random(4)
    mem1 = rnd.randbytes(1 * MiB)  # incompressible: records keep their length
    mem2 = rnd.randbytes(1 * MiB)
    (tmp_path / "m1").write_bytes(mem1)
    (tmp_path / "m2").write_bytes(mem2)
    tgt = tmp_path / "t"
    store.create_target(tgt, 4 * MiB)
    with ImageDevice(tgt, writable=True) as dev, FileMemorySource(tmp_path / "m1") as src:
        save.save_image(src, [(0, MiB)], dev, identity={}, mode="test", chunk_size=CHUNK)
    _, recs1 = _chunk_offsets(tgt)
    ch, off = recs1[5]
    old = tgt.read_bytes()[off : off + ch.record_length]
    with ImageDevice(tgt, writable=True) as dev, FileMemorySource(tmp_path / "m2") as src:
        save.save_image(src, [(0, MiB)], dev, identity={}, mode="test", chunk_size=CHUNK)
    _, recs2 = _chunk_offsets(tgt)
    assert recs2[5][1] == off and recs2[5][0].record_length == ch.record_length
    _poke(tgt, off, old)
    with pytest.raises(ImageCorruptError, match="belongs to another image"):
        restore_into(tmp_path, tgt, size=MiB)
    got = (tmp_path / "restored").read_bytes()
    assert got[: 5 * CHUNK] == mem2[: 5 * CHUNK]  # chunks before it: restored
    assert got[5 * CHUNK :] == b"\xaa" * (MiB - 5 * CHUNK)  # it and after: untouched


def test_restore_into_a_memory_file_that_does_not_exist_yet(saved):
    """`kjump-agent restore --memory NEW`: the file is created; the ranges hold the memory,
    the gaps between them read as zeros."""
    tmp_path, mem, tgt, _ = saved
    out = tmp_path / "fresh"
    with ImageDevice(tgt, writable=False) as dev, FileMemorySink(out) as sink:
        restore.restore_image(dev, sink)
        sink.flush()
    got = out.read_bytes()
    assert len(got) == RANGES[-1][1]
    for a, b in RANGES:
        assert got[a:b] == mem[a:b]
    assert got[: RANGES[0][0]] == bytes(RANGES[0][0])


def test_file_sink_takes_aligned_and_unaligned_writes(tmp_path):
    """Page-aligned writes from page-aligned buffers go around the page cache; any other
    write (odd offset or length, a bytes object, a slice that is not page-aligned) is still
    written, exactly."""
    import mmap as _mmap

    path = tmp_path / "mem"
    path.write_bytes(b"\x11" * (64 * 1024))
    m = _mmap.mmap(-1, 16 * 1024)
    m[:] = b"\x22" * len(m)
    with FileMemorySink(path) as sink:
        sink.write(8192, memoryview(m))  # aligned: direct when possible
        sink.write(100, b"\x33" * 50)  # unaligned bytes
        sink.write(40960, memoryview(m)[4096:12288])  # aligned slice of an aligned buffer
        sink.write(53248 + 10, memoryview(m)[10:4106])  # odd slice at an odd offset
        sink.flush()
    got = path.read_bytes()
    want = bytearray(b"\x11" * (64 * 1024))
    want[8192 : 8192 + 16384] = b"\x22" * 16384
    want[100:150] = b"\x33" * 50
    want[40960 : 40960 + 8192] = b"\x22" * 8192
    want[53258 : 53258 + 4096] = b"\x22" * 4096
    assert got == bytes(want)
    m.close()


class _KnowsItsZeros(FileMemorySource):
    """A source that declares some ranges zero (as the save kernel does for the main kernel's
    free pages) and must never be read there."""

    def __init__(self, path, zero_ranges):
        super().__init__(path)
        self.zero_ranges = zero_ranges
        self.read_at: list[tuple[int, int]] = []

    def known_zero(self, phys, length):
        return any(a <= phys and phys + length <= b for a, b in self.zero_ranges)

    def readinto(self, phys, buf):
        self.read_at.append((phys, len(buf)))
        super().readinto(phys, buf)


def test_ranges_the_source_knows_are_zero_are_not_read_and_restore_as_zeros(tmp_path):
    mem = bytearray(make_memory(tmp_path / "mem", 1 * MiB))
    free = [(0x40000, 0x80000)]  # "free": garbage in the file, zero in the image
    tgt = tmp_path / "target"
    store.create_target(tgt, 4 * MiB)
    with ImageDevice(tgt, writable=True) as dev, _KnowsItsZeros(tmp_path / "mem", free) as src:
        stats = save.save_image(
            src, [(0, 1 * MiB)], dev, identity={}, mode="test", chunk_size=CHUNK, workers=2
        )
    assert not [r for r in src.read_at if r[0] < 0x80000 and r[0] + r[1] > 0x40000]
    assert stats.zero_pages >= (0x80000 - 0x40000) // PAGE_SIZE
    rs, out = restore_into(tmp_path, tgt, size=1 * MiB)
    got = out.read_bytes()
    assert got[0x40000:0x80000] == bytes(0x40000)
    assert got[:0x40000] == bytes(mem[:0x40000]) and got[0x80000:] == bytes(mem[0x80000:])


class _KnowsItsFreeMemory(_KnowsItsZeros):
    """As the save kernel's source for a main kernel without init_on_free: the ranges it
    knows are free need not come back as zeros."""

    restore_zeros = False


def test_free_records_are_left_as_found_and_everything_else_is_byte_exact(tmp_path):
    mem = bytearray(make_memory(tmp_path / "mem", 1 * MiB))
    free = [(0x40000, 0x80000), (0xC0000, 0xD0000)]  # whole chunks: free records
    tgt = tmp_path / "target"
    store.create_target(tgt, 4 * MiB)
    with ImageDevice(tgt, writable=True) as dev, _KnowsItsFreeMemory(tmp_path / "mem", free) as src:
        save.save_image(
            src, [(0, 1 * MiB)], dev, identity={}, mode="test", chunk_size=CHUNK, workers=2
        )
    h, recs = _chunk_offsets(tgt)
    free_recs = [c for c, _ in recs if c.encoding == ENC_FREE]
    assert sorted((c.phys, c.phys + c.raw_length) for c in free_recs) == [
        (p, p + CHUNK) for a, b in free for p in range(a, b, CHUNK)
    ]
    for workers in (1, 3):  # a file sink: one chunk at a time, in order
        rs, out = restore_into(tmp_path, tgt, size=1 * MiB, workers=workers)
        got = out.read_bytes()
        for a, b in free:  # never written: the sink's old bytes are still there
            assert got[a:b] == b"\xaa" * (b - a)
        keep = bytearray(mem)
        for a, b in free:
            keep[a:b] = b"\xaa" * (b - a)
        assert got == bytes(keep), "everything else restored byte-exact"
        assert rs.stages["free_left"] == sum(b - a for a, b in free)
    # verify-only reads a free record back as zeros and still checks it
    with ImageDevice(tgt, writable=False) as dev:
        assert restore.restore_image(dev, None, verify_only=True).raw_bytes == 1 * MiB


def test_a_free_record_with_a_stored_page_or_a_payload_is_refused_before_any_write(tmp_path):
    from kjumpd.image.chunk import decode_chunk, zero_chunk
    from kjumpd.image.format import crc32

    enc = zero_chunk(0, 0, 8 * PAGE_SIZE, free=True)
    ch = ChunkHeader.unpack(enc.head)
    bm = bytes([0x7F])  # page 7 "stored"
    lying = ChunkHeader(
        encoding=ENC_FREE,
        pages=8,
        index=0,
        phys=0,
        raw_length=8 * PAGE_SIZE,
        payload_length=0,
        crc=crc32(b"", crc32(bm)),
    )
    with pytest.raises(ImageCorruptError, match="all-free chunk has non-zero pages"):
        decode_chunk(lying, bm, b"", 0)
    full = b"\xff"
    padded = ChunkHeader(
        encoding=ENC_FREE,
        pages=8,
        index=0,
        phys=0,
        raw_length=8 * PAGE_SIZE,
        payload_length=3,
        crc=crc32(b"abc", crc32(full)),
    )
    with pytest.raises(ImageCorruptError, match="holds 3 payload bytes"):
        decode_chunk(padded, full, b"abc", 0)
    assert decode_chunk(ch, enc.head[CHUNK_HEADER_SIZE:], b"", 0) == bytes(8 * PAGE_SIZE)


@pytest.mark.parametrize("workers", [1, 4])
def test_devmem_sink_leaves_free_records_untouched(tmp_path, workers):
    from kjumpd.agent.devmem import MemorySink
    from kjumpd.sysroot import Sysroot

    mem = make_memory(tmp_path / "mem", 4 * MiB)
    free = [(0x100000, 0x180000)]
    tgt = tmp_path / "target"
    store.create_target(tgt, 8 * MiB)
    with ImageDevice(tgt, writable=True) as dev, _KnowsItsFreeMemory(tmp_path / "mem", free) as src:
        save.save_image(src, RANGES, dev, identity={}, mode="test", chunk_size=CHUNK, workers=2)
    (tmp_path / "dev").mkdir()
    out = tmp_path / "dev" / "mem"
    out.write_bytes(b"\xaa" * (4 * MiB))
    with (
        ImageDevice(tgt, writable=False) as dev,
        MemorySink(Sysroot(tmp_path), RANGES, window=MiB) as sink,
    ):
        rs = restore.restore_image(dev, sink, workers=workers)
        sink.flush()
    got = out.read_bytes()
    assert got[0x100000:0x180000] == b"\xaa" * 0x80000
    for a, b in RANGES:
        for p in range(a, b, PAGE_SIZE):
            if not 0x100000 <= p < 0x180000:
                assert got[p : p + PAGE_SIZE] == mem[p : p + PAGE_SIZE], hex(p)
    assert rs.stages["free_left"] == 0x80000


def _devmem_restore(tmp_path, tgt, workers):
    from kjumpd.agent.devmem import MemorySink
    from kjumpd.sysroot import Sysroot

    (tmp_path / "dev").mkdir(exist_ok=True)
    out = tmp_path / "dev" / "mem"
    out.write_bytes(b"\xaa" * (4 * MiB))
    with (
        ImageDevice(tgt, writable=False) as dev,
        MemorySink(Sysroot(tmp_path), RANGES, hold=[(0, 0x80000)], window=MiB) as sink,
    ):
        try:
            return restore.restore_image(dev, sink, workers=workers), out, sink
        finally:
            sink.flush()


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_devmem_sink_restore_is_byte_exact_and_zero_chunks_come_back_as_zeros(saved, workers):
    tmp_path, mem, tgt, _ = saved
    rs, out, sink = _devmem_restore(tmp_path, tgt, workers)
    got = out.read_bytes()
    held = {h.mem: h.data for h in sink.held_segments()}
    for a, b in RANGES:
        for p in range(a, b, PAGE_SIZE):
            want = mem[p : p + PAGE_SIZE]
            if p < 0x80000:  # the sink held it back, untouched
                assert got[p : p + PAGE_SIZE] == b"\xaa" * PAGE_SIZE
                seg = max(m for m in held if m <= p)
                assert held[seg][p - seg : p - seg + PAGE_SIZE] == want
            else:
                assert got[p : p + PAGE_SIZE] == want, hex(p)
    assert rs.stages["write"] > 0 and rs.chunk_count == len(_chunk_offsets(tgt)[1])
    # chunks clear of the held pages were decoded straight into memory, the rest copied
    stored = sum(c.raw_length for c, _ in _chunk_offsets(tgt)[1] if c.payload_length)
    assert 0 < rs.stages["placed"] < stored


@pytest.mark.parametrize("workers", [2, 5])
def test_devmem_sink_writes_nothing_past_a_bad_chunk_whatever_the_workers(saved, workers):
    tmp_path, mem, tgt, _ = saved
    h, recs = _chunk_offsets(tgt)
    k = len(recs) // 3
    ch, off = recs[k]
    _poke(tgt, off + ch.record_length - 5, b"\x5a")
    with pytest.raises(ImageCorruptError, match=f"at byte offset {off}"):
        _devmem_restore(tmp_path, tgt, workers)
    got = (tmp_path / "dev" / "mem").read_bytes()
    for c, _ in recs[:k]:
        if c.phys >= 0x80000:
            assert got[c.phys : c.phys + c.raw_length] == mem[c.phys : c.phys + c.raw_length]
    for c, _ in recs[k:]:
        assert got[c.phys : c.phys + c.raw_length] == b"\xaa" * c.raw_length


class _OneReaderAtATime:
    """A source like /dev/mem (one mapped window): two reads at once would corrupt it."""

    def __init__(self, path, with_readinto):
        self.inner = FileMemorySource(path)
        self.busy = threading.Lock()
        self.overlaps = 0
        if with_readinto:
            self.readinto = self._readinto

    def _enter(self):
        if not self.busy.acquire(blocking=False):
            self.overlaps += 1
            self.busy.acquire()

    def read(self, phys, length):
        self._enter()
        try:
            import time as _t

            _t.sleep(0.0005)  # widen the window a second reader would hit
            return self.inner.read(phys, length)
        finally:
            self.busy.release()

    def _readinto(self, phys, buf):
        self._enter()
        try:
            import time as _t

            _t.sleep(0.0005)
            self.inner.readinto(phys, buf)
        finally:
            self.busy.release()


@pytest.mark.parametrize("with_readinto", [True, False])
def test_workers_never_read_the_source_at_the_same_time(tmp_path, with_readinto):
    mem = make_memory(tmp_path / "mem", 4 * MiB)
    tgt = tmp_path / "target"
    store.create_target(tgt, 8 * MiB)
    src = _OneReaderAtATime(tmp_path / "mem", with_readinto)
    with ImageDevice(tgt, writable=True) as dev:
        save.save_image(src, RANGES, dev, identity={}, mode="test", chunk_size=CHUNK, workers=4)
    src.inner.close()
    assert src.overlaps == 0
    _, out = restore_into(tmp_path, tgt)
    got = out.read_bytes()
    for a, b in RANGES:
        assert got[a:b] == mem[a:b]


def test_restore_into_a_sparse_memory_file_that_ends_inside_the_ranges(tmp_path):
    """All-zero chunks over a hole, over old data, at the old end and past it all read back
    as zeros; every data byte comes back exactly."""
    mem = bytearray(make_memory(tmp_path / "m0", 1 * MiB))
    for i in (2, 3, 7, 12, 15):  # 64 KiB chunks that are all zero
        mem[i * CHUNK : (i + 1) * CHUNK] = bytes(CHUNK)
    (tmp_path / "mem").write_bytes(mem)
    tgt = tmp_path / "target"
    store.create_target(tgt, 4 * MiB)
    with ImageDevice(tgt, writable=True) as dev, FileMemorySource(tmp_path / "mem") as src:
        save.save_image(src, [(0, 1 * MiB)], dev, identity={}, mode="test", chunk_size=CHUNK)
    out = tmp_path / "sparse"
    with open(out, "wb") as f:  # old data, a hole at chunks 2-3, end at chunk 12
        f.write(b"\xaa" * (2 * CHUNK))
        f.seek(4 * CHUNK)
        f.write(b"\xbb" * (8 * CHUNK))
    with ImageDevice(tgt, writable=False) as dev, FileMemorySink(out) as sink:
        restore.restore_image(dev, sink, workers=3)
        sink.flush()
    assert out.read_bytes() == bytes(mem)


@pytest.mark.parametrize("chunk", [64 * 1024, MiB])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("compression", ["lz4", "none"])
def test_incompressible_memory_round_trips_byte_exact(tmp_path, chunk, workers, compression):
    """Raw records keep their worker's read buffer until the writer has them: runs of random
    memory between compressible and zero pages must come back byte for byte."""
    rnd = random.Random(5)
    parts = []
    for i in range(6):
        parts.append(rnd.randbytes(MiB + i * PAGE_SIZE))
        parts.append(b"".join(f"page {i} {j}\n".encode() * 400 for j in range(8))[: 8 * PAGE_SIZE])
        parts.append(bytes(3 * PAGE_SIZE))
    mem = b"".join(parts)
    mem += bytes(-len(mem) % PAGE_SIZE)
    (tmp_path / "mem").write_bytes(mem)
    tgt = tmp_path / "t"
    store.create_target(tgt, 16 * MiB)
    with ImageDevice(tgt, writable=True) as dev, FileMemorySource(tmp_path / "mem") as src:
        stats = save.save_image(
            src,
            [(0, len(mem))],
            dev,
            identity={},
            mode="test",
            chunk_size=chunk,
            compression=compression,
            workers=workers,
        )
    assert stats.stored_bytes > 6 * MiB  # the random runs are stored as they are
    _, out = restore_into(tmp_path, tgt, size=len(mem))
    assert out.read_bytes() == mem


class _OneAtATimeSink:
    """A sink without concurrent writes: the restore hands it one chunk at a time, in chunk
    order. It records where each write went."""

    def __init__(self, path):
        self.inner = FileMemorySink(path)
        self.writes: list[int] = []

    def write(self, phys, data):
        self.writes.append(phys)
        self.inner.write(phys, data)


def _every_other_chunk_free(tmp_path, size=2 * MiB):
    mem = make_memory(tmp_path / "mem", size)
    free = [(p, p + CHUNK) for p in range(0, size, 2 * CHUNK)]
    tgt = tmp_path / "target"
    store.create_target(tgt, 2 * size)
    with ImageDevice(tgt, writable=True) as dev, _KnowsItsFreeMemory(tmp_path / "mem", free) as src:
        save.save_image(
            src, [(0, size)], dev, identity={}, mode="test", chunk_size=CHUNK, workers=2
        )
    return mem, free, tgt


@pytest.mark.parametrize("workers", [1, 3])
def test_free_records_between_stored_ones_keep_a_one_at_a_time_sink_in_chunk_order(
    tmp_path, workers
):
    size = 2 * MiB
    mem, free, tgt = _every_other_chunk_free(tmp_path, size)
    out = tmp_path / "restored"
    out.write_bytes(b"\xaa" * size)
    sink = _OneAtATimeSink(out)
    with ImageDevice(tgt, writable=False) as dev:
        rs = restore.restore_image(dev, sink, workers=workers)
    sink.inner.flush()
    assert sink.writes == sorted(sink.writes) == [p + CHUNK for p, _ in free]
    got = out.read_bytes()
    for p, e in free:
        assert got[p:e] == b"\xaa" * CHUNK
        assert got[e : e + CHUNK] == mem[e : e + CHUNK]
    assert rs.stages["free_left"] == size // 2


@pytest.mark.parametrize("one_at_a_time", [True, False])
def test_a_corrupt_free_record_stops_the_restore_there(tmp_path, one_at_a_time):
    size = 2 * MiB
    mem, free, tgt = _every_other_chunk_free(tmp_path, size)
    h, recs = _chunk_offsets(tgt)
    k = next(i for i, (c, _) in enumerate(recs) if c.encoding == ENC_FREE and i >= len(recs) // 2)
    ch, off = recs[k]
    _poke(tgt, off + ch.record_length - 1, b"\x01")  # a page of the free record "stored"
    out = tmp_path / "restored"
    out.write_bytes(b"\xaa" * size)
    sink = _OneAtATimeSink(out) if one_at_a_time else FileMemorySink(out)
    with ImageDevice(tgt, writable=False) as dev, pytest.raises(ImageCorruptError) as ei:
        restore.restore_image(dev, sink, workers=3)
    (sink.inner if one_at_a_time else sink).flush()
    assert f"chunk {ch.index} at byte offset {off}" in str(ei.value)
    got = out.read_bytes()
    for c, _ in recs[:k]:
        want = (
            b"\xaa" * c.raw_length
            if c.encoding == ENC_FREE
            else mem[c.phys : c.phys + c.raw_length]
        )
        assert got[c.phys : c.phys + c.raw_length] == want
    for c, _ in recs[k:]:
        assert got[c.phys : c.phys + c.raw_length] == b"\xaa" * c.raw_length


class _CountsItsAnswers(_KnowsItsFreeMemory):
    """Counts what it is asked, as the save kernel's source counts the memory it skips."""

    def __init__(self, path, zero_ranges, fail_at=None):
        super().__init__(path, zero_ranges)
        self.asked: list[int] = []
        self.fail_at = fail_at

    def known_zero(self, phys, length):
        self.asked.append(phys)
        if phys == self.fail_at:
            raise ImageError("the free page list changed under the save", fix="hibernate again")
        return super().known_zero(phys, length)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    free_flags=st.lists(st.booleans(), min_size=1, max_size=40),
    workers=st.integers(min_value=1, max_value=3),
)
def test_any_mix_of_free_and_stored_chunks_saves_in_order_and_restores(
    tmp_path_factory, free_flags, workers
):
    d = tmp_path_factory.mktemp("mix")
    size = len(free_flags) * CHUNK
    mem = make_memory(d / "mem", size)
    free = [(i * CHUNK, (i + 1) * CHUNK) for i, f in enumerate(free_flags) if f]
    tgt = d / "target"
    store.create_target(tgt, 2 * size + MiB)
    with ImageDevice(tgt, writable=True) as dev, _CountsItsAnswers(d / "mem", free) as src:
        save.save_image(
            src, [(0, size)], dev, identity={}, mode="test", chunk_size=CHUNK, workers=workers
        )
    # each chunk is judged once: the source's count of skipped memory stays true
    assert sorted(src.asked) == [i * CHUNK for i in range(len(free_flags))]
    assert not [p for p, _n in src.read_at if any(a <= p < b for a, b in free)]
    _h, recs = _chunk_offsets(tgt)
    assert [c.index for c, _ in recs] == list(range(len(free_flags)))
    assert [c.encoding == ENC_FREE for c, _ in recs] == free_flags
    _rs, out = restore_into(d, tgt, size=size)
    got = out.read_bytes()
    for i, f in enumerate(free_flags):
        a = i * CHUNK
        assert got[a : a + CHUNK] == (b"\xaa" * CHUNK if f else mem[a : a + CHUNK])


def test_a_source_failing_to_judge_a_chunk_aborts_the_save_with_its_reason(tmp_path):
    size = 2 * MiB
    make_memory(tmp_path / "mem", size)
    free = [(p, p + CHUNK) for p in range(0, size, 2 * CHUNK)]
    tgt = tmp_path / "target"
    store.create_target(tgt, 2 * size)
    with (
        ImageDevice(tgt, writable=True) as dev,
        _CountsItsAnswers(tmp_path / "mem", free, fail_at=20 * CHUNK) as src,
        pytest.raises(ImageError, match="free page list changed"),
    ):
        save.save_image(
            src, [(0, size)], dev, identity={}, mode="test", chunk_size=CHUNK, workers=2
        )
    with ImageDevice(tgt, writable=False) as dev:
        h = store.read_header(dev)
    assert h.state_text.startswith("ABORTED") and "free page list changed" in h.reason


class _AllFree:
    """A main kernel whose memory is all free: nothing is read, every chunk is a free
    record, so what the save keeps grows with the chunk count alone."""

    restore_zeros = False

    def known_zero(self, phys, length):
        return True

    def read(self, phys, length):
        raise AssertionError(f"free memory read at {phys:#x}")


def test_the_save_keeps_a_few_bytes_a_chunk_so_a_large_machine_fits_the_save_kernel(tmp_path):
    """A 256 GiB machine is 262,144 chunks of 1 MiB. Kept per chunk as Python objects (the
    plan as tuples, the CRCs as ints) that was about 210 bytes a chunk, 52 MiB of the save
    kernel's memory; measured here between two chunk counts, so fixed costs cancel."""
    import tracemalloc

    def peak(chunks: int) -> int:
        tgt = tmp_path / f"target{chunks}"
        store.create_target(tgt, 8 * MiB)
        with ImageDevice(tgt, writable=True) as dev:
            tracemalloc.start()
            try:
                stats = save.save_image(
                    _AllFree(),
                    [(1 << 32, (1 << 32) + chunks * PAGE_SIZE)],
                    dev,
                    identity={},
                    mode="test",
                    chunk_size=PAGE_SIZE,
                    workers=2,
                    verify=False,
                )
                assert stats.chunk_count == chunks
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

    small, large = 2000, 22000
    per_chunk = (peak(large) - peak(small)) / (large - small)
    assert per_chunk < 24, f"{per_chunk:.1f} bytes a chunk"
