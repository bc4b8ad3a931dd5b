"""Block map: extent validation and device-mapper tables (pure)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.daemon.blockmap import Extent, parse_dm_table, validate_extents
from kjumpd.errors import BlockMapError

K4 = 4096


@pytest.mark.parametrize(
    "flag,word",
    [
        (0x4, "delayed allocation"),
        (0x2, "unknown location"),
        (0x8, "encoded"),
        (0x200, "inline"),
        (0x800, "unwritten"),
        (0x2000, "shared"),
        (0x80, "encrypted"),
    ],
)
def test_unsafe_flags_are_refused(flag, word):
    ext = [Extent(0, 1 << 20, 8 * K4), Extent(8 * K4, 4 << 20, 8 * K4, flag | 0x1)]
    with pytest.raises(BlockMapError) as ei:
        validate_extents(ext, 16 * K4)
    assert word in ei.value.why and ei.value.fix


def test_holes_and_misalignment_are_refused():
    with pytest.raises(BlockMapError, match="sparse"):
        validate_extents([Extent(0, 0, K4), Extent(2 * K4, 8 * K4, K4)], 3 * K4)
    with pytest.raises(BlockMapError, match="sparse"):
        validate_extents([Extent(0, 0, K4)], 2 * K4)
    with pytest.raises(BlockMapError, match="aligned"):
        validate_extents([Extent(0, 512, K4)], K4)


def test_adjacent_extents_merge_and_the_tail_is_clipped():
    ext = [
        Extent(0, 10 * K4, 2 * K4),
        Extent(2 * K4, 12 * K4, 2 * K4, 0x1000),
        Extent(4 * K4, 40 * K4, 2 * K4, 0x1),
    ]
    got = validate_extents(ext, 5 * K4)
    assert got == [Extent(0, 10 * K4, 4 * K4), Extent(4 * K4, 40 * K4, K4)]


@given(
    st.lists(
        st.tuples(st.integers(1, 64), st.integers(0, 1 << 20), st.booleans()),
        min_size=1,
        max_size=20,
    )
)
def test_validated_extents_cover_the_file_exactly(parts):
    ext, lo = [], 0
    for n, phys, adjacent in parts:
        p = (ext[-1].physical + ext[-1].length) if (adjacent and ext) else phys * K4
        ext.append(Extent(lo, p, n * K4))
        lo += n * K4
    got = validate_extents(ext, lo)
    assert sum(e.length for e in got) == lo
    assert got[0].logical == 0
    for a, b in zip(got, got[1:]):
        assert a.logical + a.length == b.logical
        assert a.physical + a.length != b.physical  # merged when contiguous
    # every byte maps to the same physical byte as before merging
    for e in ext:
        g = next(x for x in got if x.logical <= e.logical < x.logical + x.length)
        assert g.physical + (e.logical - g.logical) == e.physical


def test_dm_linear_table():
    t = parse_dm_table("0 204800 linear 8:2 2048\n204800 409600 linear 8:2 411648\n")
    assert t == [
        (0, 204800 * 512, "8:2", 2048 * 512),
        (204800 * 512, 409600 * 512, "8:2", 411648 * 512),
    ]


@pytest.mark.parametrize(
    "line,word",
    [
        ("0 100 crypt aes-xts 0 8:2 0", "crypt"),
        ("0 100 striped 2 128 8:2 0 8:3 0", "striped"),
        ("0 100 thin 253:2 1", "thin"),
    ],
)
def test_other_dm_targets_are_refused(line, word):
    with pytest.raises(BlockMapError, match=word):
        parse_dm_table(line)


def test_a_dm_crypt_table_is_read_only_when_asked_for():
    """dm-crypt keeps each sector in place: its ciphertext is at the table's offset on the
    device below (how R reads it without the key); a writer must never pass through it."""
    line = (
        "0 2064384 crypt aes-xts-plain64 :64:logon:cryptsetup:3f2a-d0 0 8:3 32768 "
        "1 sector_size:4096\n"
    )
    assert parse_dm_table(line, through_crypt=True) == [(0, 2064384 * 512, "8:3", 32768 * 512)]
    with pytest.raises(BlockMapError, match="crypt"):
        parse_dm_table(line)
