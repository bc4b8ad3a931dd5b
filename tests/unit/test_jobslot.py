"""The job slot a parked save kernel takes its next job from: round trips, corruption,
its place in the superblock's 64 KiB, and reading the job back through its runs."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kjumpd.errors import ImageCorruptError, ImageFormatError
from kjumpd.image import jobslot
from kjumpd.image.format import BlockExtent, TargetSuperblock
from kjumpd.image.jobslot import JobSlot, SlotKind

PAGE = 4096


@st.composite
def run_lists(draw):
    n = draw(st.integers(1, jobslot.MAX_RUNS))
    starts = sorted(draw(st.sets(st.integers(0, 2**40), min_size=n, max_size=n)))
    runs, end = [], 0
    for s in starts:
        a = max(s * PAGE, end)
        pages = draw(st.integers(1, 4))
        runs.append((a, pages * PAGE))
        end = a + pages * PAGE
    return runs


@st.composite
def slots(draw):
    kind = draw(st.sampled_from(list(SlotKind)))
    gen = draw(st.integers(0, 2**64 - 1))
    if kind is SlotKind.JOB:
        runs = draw(run_lists())
        length = draw(st.integers(1, min(sum(n for _a, n in runs), jobslot.MAX_JOB_BYTES)))
        return JobSlot(kind, gen, length, draw(st.binary(min_size=32, max_size=32)), tuple(runs))
    reason = draw(st.text(max_size=80)) if kind is SlotKind.REFUSED else ""
    return JobSlot(kind, gen, reason=jobslot.clip(reason))


@settings(deadline=None)
@given(slots())
def test_every_slot_reads_back_as_written(slot):
    raw = slot.pack()
    assert len(raw) == jobslot.SLOT_SIZE
    assert JobSlot.unpack(raw) == slot


@settings(deadline=None, max_examples=200)
@given(slots(), st.data())
def test_a_flipped_byte_is_refused_never_misread(slot, data):
    raw = bytearray(slot.pack())
    used = jobslot._REASON_END + 16 * len(slot.runs) + 4
    i = data.draw(st.integers(0, used - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises((ImageFormatError, ImageCorruptError)):
        JobSlot.unpack(bytes(raw))


def test_a_never_written_slot_reads_as_none():
    class Dev:
        def read(self, off, n):
            assert (off, n) == (jobslot.SLOT_OFFSET, jobslot.SLOT_SIZE)
            return bytes(n)

    assert jobslot.read_slot(Dev()) is None


def test_the_slot_lies_past_any_superblock_that_leaves_it_free():
    n = jobslot.MAX_SLOT_EXTENTS
    sb = TargetSuperblock(
        uuid=bytes(16),
        size=n * PAGE,
        block_size=PAGE,
        blockmap=tuple(BlockExtent(i * PAGE, 2 * i * PAGE, PAGE) for i in range(n)),
    )
    assert len(sb.pack()) <= jobslot.SLOT_OFFSET
    assert jobslot.slot_free(n) and not jobslot.slot_free(n + 1)


def test_runs_must_be_whole_pages_apart_and_hold_the_job():
    digest = bytes(32)
    with pytest.raises(ImageFormatError, match="whole pages"):
        JobSlot(SlotKind.JOB, 1, 10, digest, ((100, PAGE),))
    with pytest.raises(ImageFormatError, match="overlap"):
        JobSlot(SlotKind.JOB, 1, 10, digest, ((0, 2 * PAGE), (PAGE, PAGE)))
    with pytest.raises(ImageFormatError, match="fewer"):
        JobSlot(SlotKind.JOB, 1, PAGE + 1, digest, ((0, PAGE),))
    with pytest.raises(ImageFormatError, match="carries no job"):
        JobSlot(SlotKind.PARKED, 1, runs=((0, PAGE),))


def test_frames_merge_into_physically_contiguous_runs():
    assert jobslot.runs_of_frames([5, 6, 7, 2, 9, 10]) == [
        (5 * PAGE, 3 * PAGE),
        (2 * PAGE, PAGE),
        (9 * PAGE, 2 * PAGE),
    ]


def _memory(placed: dict[int, bytes]):
    def read(addr: int, n: int) -> bytes:
        out = b""
        while len(out) < n:
            page, off = divmod(addr + len(out), PAGE)
            out += placed.get(page * PAGE, bytes(PAGE))[off : off + n - len(out)]
        return out

    return read


def test_the_job_is_read_back_through_its_runs_in_order():
    job = bytes(range(256)) * 40  # 10240 bytes: three pages, scattered
    pages = [job[i : i + PAGE] for i in range(0, len(job), PAGE)]
    frames = [40, 41, 7]
    placed = {f * PAGE: p.ljust(PAGE, b"\0") for f, p in zip(frames, pages)}
    slot = JobSlot.job(3, job, jobslot.runs_of_frames(frames))
    assert slot.runs == ((40 * PAGE, 2 * PAGE), (7 * PAGE, PAGE))
    assert jobslot.job_bytes(slot, _memory(placed)) == job


def test_a_job_whose_pages_changed_is_refused():
    job = b'{"version": 1}' * 10
    slot = JobSlot.job(3, job, [(PAGE, PAGE)])
    moved = {PAGE: b"x" * PAGE}
    with pytest.raises(ImageCorruptError, match="does not match the job slot"):
        jobslot.job_bytes(slot, _memory(moved))
    assert slot.digest == hashlib.sha256(job).digest()


def test_a_long_reason_is_cut_on_a_character_boundary():
    slot = JobSlot.refused(9, "é" * 150)
    assert len(slot.reason.encode()) <= jobslot.MAX_REASON
    assert JobSlot.unpack(slot.pack()).reason == slot.reason
