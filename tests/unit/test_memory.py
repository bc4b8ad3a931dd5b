"""Memory extent list from /proc/iomem, minus the jump area (pure)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.daemon.jumparea import JumpArea
from kjumpd.daemon.memory import parse_system_ram, plan
from kjumpd.errors import MemoryMapError

IOMEM = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-0009ffff : Reserved
00100000-3ffdffff : System RAM
  01000000-01ffffff : Kernel code
  20000000-27ffffff : Crash kernel
3ffe0000-3fffffff : Reserved
100000000-13fffffff : System RAM
"""
AREA = JumpArea(0x20000000, 0x8000000)


def test_ranges_are_ram_minus_the_jump_area_page_aligned():
    ram = parse_system_ram(IOMEM)
    p = plan(ram, AREA, None)
    assert p.ranges == [
        (0x1000, 0x9F000),
        (0x100000, 0x20000000),
        (0x28000000, 0x3FFE0000),
        (0x100000000, 0x140000000),
    ]
    reasons = {(x.start, x.end): x.reason for x in p.excluded}
    assert "jump area" in reasons[(0x20000000, 0x28000000)]
    assert (0x9F000, 0x9FC00) in reasons  # partial page, not saved
    assert not p.firmware_checked


def test_firmware_memmap_disagreement_is_refused():
    ram = parse_system_ram(IOMEM)
    firmware = [(0x0, 0xA0000), (0x100000, 0x3FFE0000)]  # no RAM above 4G
    with pytest.raises(MemoryMapError, match="disagree"):
        plan(ram, AREA, firmware)
    ok = plan(ram, AREA, firmware + [(0x100000000, 0x140000000)])
    assert ok.firmware_checked


def test_jump_area_outside_ram_is_refused():
    with pytest.raises(MemoryMapError, match="not inside System RAM"):
        plan(parse_system_ram(IOMEM), JumpArea(0x3FFE0000, 0x8000000), None)


@given(
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 16)), min_size=1, max_size=8),
    st.data(),
)
def test_plan_never_saves_the_jump_area_and_stays_in_ram(spans, data):
    ram, pos = [], 0
    for gap, ln in spans:
        s = pos + gap * 512
        ram.append((s, s + ln * 512))
        pos = s + ln * 512
    big = max(ram, key=lambda r: r[1] - r[0])
    first = -(-big[0] // 4096)
    last = big[1] // 4096
    if last - first < 1:
        return
    a = data.draw(st.integers(first, last - 1))
    b = data.draw(st.integers(a + 1, last))
    area = JumpArea(a * 4096, (b - a) * 4096)
    p = plan(ram, area, None)
    for s, e in p.ranges:
        assert s % 4096 == 0 and e % 4096 == 0 and s < e
        assert e <= area.start or s >= area.end
        assert any(rs <= s and e <= re for rs, re in ram)
    assert all(x[1] <= y[0] for x, y in zip(p.ranges, p.ranges[1:]))
