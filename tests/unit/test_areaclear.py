"""Which part of the jump area is cleared before B's load, and that a test root never reaches
the kernel (kjumpd.daemon.areaclear)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.daemon import areaclear
from kjumpd.daemon.areaclear import CONTROL_ROOM, PAGE, Cleared, clear, clear_range
from kjumpd.daemon.jumparea import JumpArea
from kjumpd.sysroot import Sysroot

MiB = 1 << 20
AREA = JumpArea(start=0x2000_0000, size=128 * MiB)


def test_a_window_at_the_top_is_cleared_whole() -> None:
    window = (AREA.end - 90 * MiB, AREA.end)
    assert clear_range(AREA, window) == window


def test_the_whole_area_leaves_room_for_the_crash_images_own_pages() -> None:
    assert clear_range(AREA, (AREA.start, AREA.end)) == (AREA.start + CONTROL_ROOM, AREA.end)


def test_an_area_no_larger_than_that_room_is_not_cleared() -> None:
    small = JumpArea(start=0x100_0000, size=CONTROL_ROOM)
    assert clear_range(small, (small.start, small.end)) is None


def test_partial_pages_at_the_edges_are_left_alone() -> None:
    window = (AREA.end - 10 * MiB + 100, AREA.end - 5)
    assert clear_range(AREA, window) == (AREA.end - 10 * MiB + PAGE, AREA.end - PAGE)


@given(
    start_mib=st.integers(min_value=16, max_value=4096),
    size_pages=st.integers(min_value=1, max_value=1 << 17),
    lo=st.integers(min_value=0, max_value=1 << 30),
    hi=st.integers(min_value=0, max_value=1 << 30),
)
def test_the_range_lies_in_the_window_above_the_control_room(
    start_mib: int, size_pages: int, lo: int, hi: int
) -> None:
    area = JumpArea(start=start_mib * MiB, size=size_pages * PAGE)
    a, b = sorted((area.start + lo % (area.size + 1), area.start + hi % (area.size + 1)))
    got = clear_range(area, (a, b))
    if got is None:
        assert b - max(a, area.start + CONTROL_ROOM) < 2 * PAGE or b <= area.start + CONTROL_ROOM
        return
    s, e = got
    assert s % PAGE == 0 and e % PAGE == 0 and s < e
    assert a <= s and e <= b
    assert area.start + CONTROL_ROOM <= s and e <= area.end


def test_a_test_root_never_loads_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> int:
        raise AssertionError("kexec_load called for a test root")

    monkeypatch.setattr(areaclear, "_kexec_load", refuse)
    got = clear(Sysroot(tmp_path), AREA, (AREA.end - 64 * MiB, AREA.end))
    assert got.span is None
    assert "not the running system" in got.describe()


def test_the_outcome_names_the_range_or_the_reason() -> None:
    done = Cleared((0x2400_0000, 0x2800_0000), 0.12)
    assert done.describe() == "jump area 0x24000000-0x27ffffff cleared before the load in 0.12 s"
    skipped = Cleared(None, why_not="kexec_load refused it: Operation not permitted (EPERM)")
    assert "not cleared" in skipped.describe() and "EPERM" in skipped.describe()
