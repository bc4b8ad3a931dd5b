"""Target creation, the block-mapped device and the two-slot header protocol, on real files."""

from __future__ import annotations

import os

import pytest

from kjumpd.errors import ImageCorruptError, ImageFormatError, ImageStateError, TargetError
from kjumpd.image import store
from kjumpd.image.device import ImageDevice
from kjumpd.image.format import HEADER_SLOT_OFFSETS, BlockExtent, Header, ImageState

MiB = 1024 * 1024


def test_create_target_is_fully_allocated_and_empty(tmp_path):
    path = tmp_path / "target"
    sb = store.create_target(path, 3 * MiB)
    st = os.stat(path)
    assert st.st_size == 3 * MiB
    assert st.st_blocks * 512 >= 3 * MiB  # not sparse
    with ImageDevice(path, writable=False) as dev:
        assert store.read_superblock(dev) == sb
        h = store.read_header(dev)
    assert h.state == ImageState.EMPTY
    assert h.uuid == sb.uuid
    assert sb.blockmap == (BlockExtent(0, 0, 3 * MiB),)


def test_create_target_refuses_tiny(tmp_path):
    with pytest.raises(TargetError, match="too small"):
        store.create_target(tmp_path / "t", 4096)


def test_header_update_alternates_slots_and_survives_a_torn_slot(tmp_path):
    path = tmp_path / "target"
    store.create_target(path, 2 * MiB)
    with ImageDevice(path, writable=True) as dev:
        h1 = store.set_state(dev, ImageState.WRITING)
        h2 = store.set_state(dev, ImageState.SAVED)
        assert h2.seq == h1.seq + 1
        slots = store.read_header_slots(dev)
        assert {s.state for s in slots} == {ImageState.WRITING, ImageState.SAVED}
        h3 = store.set_state(dev, ImageState.RESTORING, attempt=1)
        assert store.read_header(dev) == h3
        assert store.read_header(dev).state_text == "RESTORING(1)"
        # tear the newest slot: the reader falls back to the previous header
        newest = [i for i, s in enumerate(store.read_header_slots(dev)) if s.seq == h3.seq][0]
        dev.write(HEADER_SLOT_OFFSETS[newest] + 20, b"\xff\xff")
        assert store.read_header(dev).state == ImageState.SAVED
        # the next update overwrites the torn slot, not the good one
        h4 = store.set_state(dev, ImageState.INVALID, reason="torn")
        assert store.read_header(dev) == h4
        assert store.read_header(dev).state_text == "INVALID(torn)"


def test_both_slots_bad_names_the_problem(tmp_path):
    path = tmp_path / "target"
    store.create_target(path, 2 * MiB)
    with ImageDevice(path, writable=True) as dev:
        dev.write(HEADER_SLOT_OFFSETS[0], b"\0" * 8192)
        with pytest.raises(ImageFormatError, match="header slot at byte offset 65536"):
            store.read_header(dev)


def test_wrong_superblock_is_refused(tmp_path):
    path = tmp_path / "nottarget"
    path.write_bytes(os.urandom(2 * MiB))
    with ImageDevice(path, writable=False) as dev:
        with pytest.raises(ImageFormatError, match="magic"):
            store.read_superblock(dev)


def test_device_maps_logical_offsets_through_extents(tmp_path):
    path = tmp_path / "disk"
    path.write_bytes(b"\xee" * (64 * 4096))
    bm = [BlockExtent(0, 40 * 4096, 8 * 4096), BlockExtent(8 * 4096, 4 * 4096, 8 * 4096)]
    with ImageDevice(path, bm, writable=True) as dev:
        assert dev.size == 16 * 4096
        payload = bytes(range(256)) * 48  # 12 KiB across the extent boundary
        dev.write(6 * 4096 + 100, payload)
        dev.flush()
        assert dev.read(6 * 4096 + 100, len(payload)) == payload
        with pytest.raises(TargetError, match="outside the target's block map"):
            dev.write(16 * 4096 - 10, b"x" * 20)
        with pytest.raises(TargetError, match="outside"):
            dev.read(16 * 4096, 1)
    raw = path.read_bytes()
    # bytes landed at device offsets 46*4096+100.. and 4*4096.., nowhere else
    expect = bytearray(b"\xee" * (64 * 4096))
    first = 2 * 4096 - 100
    expect[46 * 4096 + 100 : 48 * 4096] = payload[:first]
    expect[4 * 4096 : 4 * 4096 + len(payload) - first] = payload[first:]
    assert raw == bytes(expect)


def test_open_target_by_superblock_offset(tmp_path):
    """A partition-like target: superblock at a device offset, data in two extents."""
    path = tmp_path / "disk"
    path.write_bytes(bytes(8 * MiB))
    bm = [BlockExtent(0, 1 * MiB, 2 * MiB), BlockExtent(2 * MiB, 5 * MiB, 1 * MiB)]
    with ImageDevice(path, bm, writable=True) as dev:
        sb = store.stamp_superblock(dev, bm, uuid="12345678-1234-5678-1234-567812345678")
        store.init_header(dev, sb.uuid)
    dev, sb2 = store.open_target(path, writable=True, offset=1 * MiB)
    with dev:
        assert sb2 == sb and sb2.uuid_str == "12345678-1234-5678-1234-567812345678"
        store.set_state(dev, ImageState.ABORTED, reason="test")
        assert store.read_header(dev).state_text == "ABORTED(test)"
    with pytest.raises(ImageFormatError):
        store.open_target(path, writable=False, offset=0)


def test_corrupt_superblock_checksum(tmp_path):
    path = tmp_path / "target"
    store.create_target(path, 2 * MiB)
    with ImageDevice(path, writable=True) as dev:
        dev.write(20, b"\x00\x01")
        with pytest.raises(ImageCorruptError, match="superblock at byte offset"):
            store.read_superblock(dev)


def test_require_state():
    store.require_state(Header(state=ImageState.SAVED), ImageState.SAVED)
    with pytest.raises(ImageStateError, match="it is ABORTED\\(x\\)"):
        store.require_state(
            Header(state=ImageState.ABORTED, reason="x"), ImageState.SAVED, action="restore"
        )


def test_read_only_device_refuses_writes(tmp_path):
    path = tmp_path / "target"
    store.create_target(path, 2 * MiB)
    with ImageDevice(path, writable=False) as dev:
        with pytest.raises(TargetError, match="read-only"):
            dev.write_aligned(0, bytes(4096))


def test_buffered_device_round_trip(tmp_path):
    """direct=False (kjump-agent --buffered, and the fallback where O_DIRECT is refused)."""
    path = tmp_path / "target"
    store.create_target(path, 2 * MiB)
    with ImageDevice(path, writable=True, direct=False) as dev:
        assert dev.direct is False
        h = store.set_state(dev, ImageState.SAVED)
        dev.write(1 * MiB + 3, b"hello")
        dev.flush()
    with ImageDevice(path, writable=False) as dev:
        assert store.read_header(dev) == h
        assert dev.read(1 * MiB + 3, 5) == b"hello"
