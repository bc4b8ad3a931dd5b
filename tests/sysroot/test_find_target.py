"""The save kernel finds its target by content (magic + UUID at an offset), never by name."""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path

import pytest

from kjumpd.errors import TargetError
from kjumpd.image import store
from kjumpd.image.device import ImageDevice
from kjumpd.image.format import BlockExtent
from kjumpd.image.store import find_target
from kjumpd.sysroot import Sysroot

OFFSET = 1 << 20
U1 = "11111111-2222-4333-8444-555555555555"
U2 = "99999999-2222-4333-8444-555555555555"


def disk(root: Path, name: str, uuid: str | None, size: int = 8 << 20) -> None:
    (root / "sys" / "block" / name).mkdir(parents=True)
    (root / "sys" / "block" / name / "size").write_text(f"{size // 512}\n")
    path = root / "dev" / name
    path.parent.mkdir(exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    if uuid is not None:
        bm = [BlockExtent(0, OFFSET, 4 << 20)]
        with ImageDevice(path, bm, writable=True) as dev:
            store.stamp_superblock(dev, bm, uuid=uuid)


def test_the_disk_with_the_uuid_wins_whatever_its_name(tmp_path: Path) -> None:
    disk(tmp_path, "vda", U2)  # another target: same magic, other UUID
    disk(tmp_path, "vdb", None)  # no target
    disk(tmp_path, "vdc", U1)
    disk(tmp_path, "loop0", None, size=512 * 1024)  # smaller than the offset: not read
    assert find_target(Sysroot(tmp_path), U1, OFFSET) == "/dev/vdc"
    assert find_target(Sysroot(tmp_path), U2, OFFSET) == "/dev/vda"


def test_wrong_offset_or_absent_uuid_is_not_found(tmp_path: Path) -> None:
    disk(tmp_path, "vda", U1)
    with pytest.raises(TargetError, match="on none of this kernel's disks"):
        find_target(Sysroot(tmp_path), U1, 0)
    with pytest.raises(TargetError, match="on none"):
        find_target(Sysroot(tmp_path), str(uuidlib.uuid4()), OFFSET)


def test_a_cloned_disk_is_refused(tmp_path: Path) -> None:
    disk(tmp_path, "vda", U1)
    disk(tmp_path, "sdb", U1)
    with pytest.raises(TargetError, match="more than one disk"):
        find_target(Sysroot(tmp_path), U1, OFFSET)


def test_a_corrupt_superblock_with_the_magic_is_skipped(tmp_path: Path) -> None:
    disk(tmp_path, "vda", U1)
    with open(tmp_path / "dev" / "vda", "r+b") as f:
        f.seek(OFFSET + 20)
        f.write(b"\xff\xff")  # inside the UUID: the CRC no longer matches
    with pytest.raises(TargetError, match="on none"):
        find_target(Sysroot(tmp_path), U1, OFFSET)
