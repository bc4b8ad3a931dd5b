"""kjumpd.agent.jumpback.plan_segments: the segments of the jump back to the main kernel."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.agent.jumpback import KEXEC_SEGMENT_MAX, PAGE, Segment, plan_segments
from kjumpd.errors import KexecError


def test_save_jump_back_is_one_page_on_the_entry_page() -> None:
    entry = 0x3FF5C0D8
    page = bytes(range(256)) * 16
    segs = plan_segments(entry, page)
    assert segs == [Segment(0x3FF5C000, page)]


def test_held_pages_come_first_and_entry_page_is_added() -> None:
    held = [Segment(0x1000, b"a" * PAGE * 3), Segment(0x9000, b"b" * PAGE)]
    segs = plan_segments(0x3000_0123, b"e" * PAGE, held)
    assert [s.mem for s in segs] == [0x1000, 0x9000, 0x3000_0000]


def test_entry_page_inside_a_held_run_is_not_duplicated() -> None:
    held = [Segment(0x1000, b"h" * PAGE * 4)]
    segs = plan_segments(0x2010, None, held)
    assert segs == held


def test_refusals_name_the_problem() -> None:
    with pytest.raises(KexecError, match="no jump-back entry"):
        plan_segments(0, b"x" * PAGE)
    with pytest.raises(KexecError, match="not read"):
        plan_segments(0x5000, b"short")
    with pytest.raises(KexecError, match="page aligned"):
        plan_segments(0x5000, b"x" * PAGE, [Segment(0x1001, b"y" * PAGE)])
    with pytest.raises(KexecError, match="overlap"):
        plan_segments(
            0x50000, b"x" * PAGE, [Segment(0x1000, b"y" * 2 * PAGE), Segment(0x2000, b"z" * PAGE)]
        )
    many = [Segment(0x1000 + 2 * PAGE * i, b"m" * PAGE) for i in range(KEXEC_SEGMENT_MAX)]
    with pytest.raises(KexecError, match="at most 16"):
        plan_segments(0x4000_0000, b"x" * PAGE, many)


@given(st.sets(st.integers(1, 120), max_size=15), st.integers(200, 1 << 20))
def test_plan_is_sorted_disjoint_and_contains_the_entry(pages: set[int], entry_pfn: int) -> None:
    held = [Segment(p * PAGE, bytes([p % 251]) * PAGE) for p in sorted(pages)]
    entry = entry_pfn * PAGE + 0x88
    segs = plan_segments(entry, b"\xee" * PAGE, held)
    assert len(segs) <= KEXEC_SEGMENT_MAX
    assert all(a.end <= b.mem for a, b in zip(segs, segs[1:]))
    assert any(s.mem <= entry < s.end for s in segs)
    assert {s.mem for s in held} <= {s.mem for s in segs}


def test_with_the_entry_page_mapped_the_save_jumps_back_on_its_anchor_alone() -> None:
    anchor = Segment(0x3700_5000, b"k" * PAGE)
    assert plan_segments(0x0A5A_30F2, None, [anchor], entry_mapped=True) == [anchor]
    with pytest.raises(KexecError, match="needs one segment"):
        plan_segments(0x0A5A_30F2, None, [], entry_mapped=True)


def test_an_anchor_that_cannot_be_located_is_refused(tmp_path) -> None:
    from kjumpd.agent import jumpback

    jumpback._anchor.clear()
    empty = tmp_path / "pagemap"
    empty.write_bytes(b"")
    try:
        with pytest.raises(KexecError, match="cannot locate"):
            jumpback.anchor(str(empty))
    finally:
        jumpback._anchor.clear()
