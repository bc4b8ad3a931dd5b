"""Stamp records and superblock parsing (pure: synthetic superblocks, no devices)."""

from __future__ import annotations

import json
import struct
import uuid as uuidlib
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kjumpd.errors import FsStampError, KjumpError
from kjumpd.fsstamp import FsStamp, parse_stamp

values = st.one_of(st.integers(min_value=0, max_value=2**64 - 1), st.text(max_size=20))
stamps = st.builds(
    FsStamp,
    device=st.text(min_size=1, max_size=30),
    fstype=st.sampled_from(["ext4", "ext3", "ext2", "xfs", "btrfs", "vfat"]),
    uuid=st.uuids().map(str),
    fields=st.dictionaries(st.text(min_size=1, max_size=16), values, max_size=12),
    extents=st.lists(st.tuples(st.integers(0, 2**48), st.integers(1, 2**40)), max_size=4).map(
        lambda pieces: _contiguous(pieces)
    ),
    ciphertext=st.lists(
        st.tuples(st.integers(0, 2**48), st.integers(1, 1 << 22), st.integers(0, 2**32 - 1)),
        max_size=4,
    ).map(tuple),
)


def _contiguous(pieces: list[tuple[int, int]]) -> tuple[tuple[int, int, int], ...]:
    """(disk offset, length) pieces as a map of a device from byte 0 on."""
    out, pos = [], 0
    for disk, length in pieces:
        out.append((pos, disk, length))
        pos += length
    return tuple(out)


@given(stamps)
def test_record_round_trips_through_json(s: FsStamp) -> None:
    back = FsStamp.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    assert back.changed_since(s) == []


@given(stamps, st.data())
def test_a_changed_field_is_named(s: FsStamp, data: st.DataObject) -> None:
    # "ciphertext" says how a stamp below dm-crypt was read: the next test
    name = data.draw(st.text(min_size=1, max_size=16).filter(lambda n: n != "ciphertext"))
    old = s.fields.get(name)
    new = data.draw(values.filter(lambda v: v != old))
    later = FsStamp(s.device, s.fstype, s.uuid, {**s.fields, name: new})
    assert later.changed_since(s) == [name]
    assert name in later.describe_changes(s)


@given(stamps, st.text(min_size=1, max_size=10))
def test_device_name_is_only_a_hint(s: FsStamp, other_dev: str) -> None:
    moved = FsStamp(other_dev, s.fstype, s.uuid, dict(s.fields))
    assert moved.changed_since(s) == []


def test_a_stamp_below_dm_crypt_read_in_plaintext_compares_its_superblock() -> None:
    """A records a filesystem below dm-crypt with its superblock's fields and the CRCs of
    their ciphertext. R holding the volume's key (the target is in the same volume) reads the
    superblock in plaintext: the fields decide, whatever the ciphertext marker says. Two
    sealed reads still compare how their ciphertext read."""
    uid = "7c1f1ca0-906e-4f6c-97d9-189c6eb698df"
    fields = {"mount_count": 3, "wtime": 10}
    frozen = FsStamp(
        "/dev/dm-0", "ext4", uid, {**fields, "ciphertext": "as frozen"},
        ((0, 16 << 20, 1 << 30),), ((0, 4096, 123),),
    )  # fmt: skip
    assert FsStamp("/dev/dm-0", "ext4", uid, fields).changed_since(frozen) == []
    mounted = FsStamp("/dev/dm-0", "ext4", uid, {"mount_count": 4, "wtime": 11})
    assert mounted.changed_since(frozen) == ["mount_count", "wtime"]
    sealed = FsStamp(
        "/dev/vdb (encrypted, mapped)", "ext4", uid,
        {**fields, "ciphertext": "changed in 1 of 1 regions"}, frozen.extents, frozen.ciphertext,
    )  # fmt: skip
    assert sealed.changed_since(frozen) == ["ciphertext"]


def test_other_filesystem_is_a_change() -> None:
    a = FsStamp("/dev/vda1", "ext4", str(uuidlib.uuid4()), {"mount_count": 1})
    b = FsStamp("/dev/vda1", "xfs", str(uuidlib.uuid4()), {"mount_count": 1})
    assert b.changed_since(a) == ["fstype", "uuid"]


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        "x",
        {},
        {"version": 2, "device": "d", "fstype": "ext4", "uuid": "u", "fields": {}},
        {"version": 1, "device": "d", "fstype": "ext4", "uuid": "u"},
        {"version": 1, "device": 3, "fstype": "ext4", "uuid": "u", "fields": {}},
        {"version": 1, "device": "d", "fstype": "ext4", "uuid": "u", "fields": []},
        {"version": 1, "device": "d", "fstype": "ext4", "uuid": "u", "fields": {"a": 1.5}},
        {"version": 1, "device": "d", "fstype": "ext4", "uuid": "u", "fields": {"a": True}},
        {"version": 1, "device": "d", "fstype": "ext4", "uuid": "u", "fields": {"a": None}},
        # extent maps that do not describe a device from byte 0 on, in order
        *(
            {"version": 1, "device": "d", "fstype": "ext4", "uuid": "u", "fields": {}, "extents": e}
            for e in (
                {},
                [[0, 0]],
                [[4096, 0, 4096]],
                [[0, 0, 4096], [8192, 0, 4096]],
                [[0, -1, 4096]],
                [[0, 0, 0]],
                [[0, 0, True]],
                [[0, 0, 1.5]],
                [[i * 4096, i * 4096, 4096] for i in range(4097)],
            )
        ),
        *(
            {
                "version": 1,
                "device": "d",
                "fstype": "ext4",
                "uuid": "u",
                "fields": {},
                "ciphertext": c,
            }
            for c in (
                {},
                [[0, 4096]],
                [[0, 0, 1]],
                [[0, 4096, 2**32]],
                [[0, 1 << 30, 1]],
                [[-1, 4096, 1]],
            )
        ),
    ],
)
def test_damaged_records_are_refused_with_a_fix(bad: object) -> None:
    with pytest.raises(FsStampError) as e:
        FsStamp.from_dict(bad)
    assert e.value.fix


@given(
    stamps,
    st.sampled_from(["version", "device", "fstype", "uuid", "fields", "extents", "ciphertext"]),
    st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=2), st.floats()),
)
def test_corrupted_record_fails_cleanly(s: FsStamp, key: str, junk: object) -> None:
    d = s.to_dict()
    d[key] = junk
    try:
        back = FsStamp.from_dict(d)
    except FsStampError:
        return
    if key in ("extents", "ciphertext") and junk == []:  # a valid value: none
        assert getattr(back, key) == ()
        return
    # only a junk value equal to the valid one can get through (e.g. version 1)
    assert back.to_dict() == FsStamp.from_dict(s.to_dict()).to_dict()


# ------------------------------------------------------------ synthetic superblocks


def _reader(img: bytes):
    def read(off: int, n: int) -> bytes:
        return img[off : off + n]

    return read


u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)
u64 = st.integers(0, 2**64 - 1)


@given(st.uuids(), u16, u32, u32, u64, u16, u32, u32, st.integers(0, 255), st.integers(0, 255))
def test_ext4_fields_are_read_where_the_kernel_writes_them(
    uid, mnt, mtime, wtime, kbw, state, free_lo, free_hi, mtime_hi, wtime_hi
) -> None:
    sb = bytearray(1024)
    struct.pack_into("<I", sb, 0x0C, free_lo)
    struct.pack_into("<II", sb, 0x2C, mtime, wtime)
    struct.pack_into("<HHHH", sb, 0x34, mnt, 0xFFFF, 0xEF53, state)
    struct.pack_into("<II", sb, 0x5C, 0x4, 0x2C2)
    sb[0x68:0x78] = uid.bytes
    struct.pack_into("<I", sb, 0x158, free_hi)
    struct.pack_into("<Q", sb, 0x178, kbw)
    sb[0x274], sb[0x275] = wtime_hi, mtime_hi
    s = parse_stamp(_reader(bytes(1024) + bytes(sb)), "/dev/x")
    assert (s.fstype, s.uuid) == ("ext4", str(uid))
    f = s.fields
    assert f["mount_count"] == mnt and f["kbytes_written"] == kbw and f["state"] == state
    assert f["mtime"] == mtime | mtime_hi << 32 and f["wtime"] == wtime | wtime_hi << 32
    assert f["free_blocks"] == free_lo | free_hi << 32


def test_ext_family_names() -> None:
    def ext(compat: int, incompat: int) -> str:
        sb = bytearray(2048)
        struct.pack_into("<H", sb, 1024 + 0x38, 0xEF53)
        struct.pack_into("<II", sb, 1024 + 0x5C, compat, incompat)
        return parse_stamp(_reader(bytes(sb)), "d").fstype

    assert ext(0, 0x2) == "ext2"
    assert ext(0x4, 0x2) == "ext3"
    assert ext(0x4, 0x2C2) == "ext4"
    with pytest.raises(FsStampError):
        ext(0, 0x8)  # an external journal is no filesystem


@given(st.uuids(), u64, u64, u64, u64)
def test_btrfs_generation_is_read(uid, gen, root, log_root, used) -> None:
    img = bytearray(68 << 10)
    sb = 64 << 10
    img[sb + 32 : sb + 48] = uid.bytes
    img[sb + 64 : sb + 72] = b"_BHRfS_M"
    struct.pack_into("<QQQQ", img, sb + 72, gen, root, 0, log_root)
    struct.pack_into("<Q", img, sb + 120, used)
    s = parse_stamp(_reader(bytes(img)), "d")
    assert (s.fstype, s.uuid) == ("btrfs", str(uid))
    assert (s.fields["generation"], s.fields["log_root"], s.fields["bytes_used"]) == (
        gen,
        log_root,
        used,
    )


def _xfs(uid: bytes, lsn: int, icount: int, cycles: list[int]) -> bytes:
    """An xfs superblock with a 1-AG internal log of len(cycles) 512-byte blocks."""
    blocksize = 4096
    logstart = 8  # fs block 8 of AG 0
    nlogblocks = len(cycles) * 512 // blocksize
    img = bytearray((logstart + nlogblocks) * blocksize)
    img[0:4] = b"XFSB"
    struct.pack_into(">I", img, 4, blocksize)
    img[32:48] = uid
    struct.pack_into(">Q", img, 48, logstart)
    struct.pack_into(">I", img, 84, 1 << 12)  # agblocks
    struct.pack_into(">I", img, 96, nlogblocks)
    struct.pack_into(">H", img, 100, 0xB4A5)  # version 5
    img[124] = 12  # agblklog
    struct.pack_into(">Q", img, 128, icount)
    struct.pack_into(">Q", img, 240, lsn)
    for i, c in enumerate(cycles):
        off = logstart * blocksize + i * 512
        if i % 4 == 0:  # a record header: magic then cycle
            struct.pack_into(">II", img, off, 0xFEEDBABE, c)
        else:
            struct.pack_into(">I", img, off, c)
    return bytes(img)


@given(st.uuids(), u64, u64, st.integers(2, 9), st.integers(1, 15))
def test_xfs_log_head_is_where_the_cycle_drops(uid, lsn, icount, cyc, head8) -> None:
    n = 128
    head = head8 * 8
    cycles = [cyc] * head + [cyc - 1] * (n - head)
    s = parse_stamp(_reader(_xfs(uid.bytes, lsn, icount, cycles)), "d")
    assert (s.fstype, s.uuid) == ("xfs", str(uid))
    assert s.fields["lsn"] == lsn and s.fields["icount"] == icount
    assert (s.fields["log_cycle"], s.fields["log_head"]) == (cyc, head)
    # one more log record moves the head: the stamp changes
    more = cycles[:head] + [cyc] * 8 + cycles[head + 8 :]
    s2 = parse_stamp(_reader(_xfs(uid.bytes, lsn, icount, more)), "d")
    assert s2.changed_since(s) == ["log_head"]


def _fat16(volid: int, state: int, fat: bytes) -> bytes:
    bs = bytearray(512)
    struct.pack_into("<HBHBHHBH", bs, 11, 512, 4, 1, 2, 512, 32768, 0xF8, len(fat) // 512)
    bs[0x25] = state
    struct.pack_into("<I", bs, 0x27, volid)
    bs[0x36:0x3E] = b"FAT16   "
    bs[510:512] = b"\x55\xaa"
    return bytes(bs) + fat


@given(u32, st.integers(0, 1), st.binary(min_size=512, max_size=512))
def test_vfat_dirty_bit_and_fat_are_stamped(volid, state, fat) -> None:
    s = parse_stamp(_reader(_fat16(volid, state, fat)), "d")
    assert s.fstype == "vfat" and s.uuid == f"{volid >> 16:04X}-{volid & 0xFFFF:04X}"
    assert s.fields == {"state": state, "fat_crc": zlib.crc32(fat)}
    dirty = parse_stamp(_reader(_fat16(volid, state ^ 1, fat)), "d")
    assert dirty.changed_since(s) == ["state"]


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=70 << 10))
def test_random_bytes_give_a_stamp_or_a_clean_error(blob: bytes) -> None:
    try:
        parse_stamp(_reader(blob), "d")
    except KjumpError as e:
        assert isinstance(e, FsStampError) and e.fix


@settings(max_examples=200)
@given(st.binary(min_size=1024, max_size=1024), st.sampled_from(["ext", "xfs", "btrfs", "vfat"]))
def test_corrupted_superblocks_never_crash(noise: bytes, kind: str) -> None:
    img = bytearray(70 << 10)
    if kind == "ext":
        img[1024:2048] = noise
        struct.pack_into("<H", img, 1024 + 0x38, 0xEF53)
    elif kind == "xfs":
        img[0:1024] = noise
        img[0:4] = b"XFSB"
    elif kind == "btrfs":
        img[65536 : 65536 + 1024] = noise
        img[65536 + 64 : 65536 + 72] = b"_BHRfS_M"
    else:
        img[0:512] = noise[:512]
        img[510:512] = b"\x55\xaa"
    try:
        parse_stamp(_reader(bytes(img)), "d")
    except KjumpError as e:
        assert isinstance(e, FsStampError)


def test_an_xfs_log_past_any_device_end_is_refused_by_name(tmp_path) -> None:
    """logstart and blocksize put the log at 2**63 and beyond: past the file, not an
    OverflowError out of preadv."""
    from kjumpd.fsstamp import read_stamp

    img = bytearray(_xfs(bytes(16), 1, 2, [3] * 16))
    struct.pack_into(">Q", img, 48, (1 << 63) | 5)
    struct.pack_into(">I", img, 4, 1 << 31)
    (tmp_path / "dev").write_bytes(bytes(img))
    with pytest.raises(FsStampError, match="beyond the end of the device"):
        read_stamp(tmp_path / "dev")
