"""A target that cannot be made leaves nothing behind: a file the attempt created is removed,
a file the user had is kept, and the error names the cause. Failures are injected at the
edge (os.posix_fallocate, os.pwrite, the superblock write): no tiny filesystem is needed."""

import errno
import os

import pytest

from kjumpd.errors import ImageError, TargetError
from kjumpd.image import store

MiB = 1 << 20


def fail_with(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def test_a_full_filesystem_at_fallocate_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", fail_with(errno.ENOSPC))
    target = tmp_path / "image"
    with pytest.raises(TargetError) as ei:
        store.create_target(target, 8 * MiB)
    assert "No space left on device" in ei.value.why and "removed" in ei.value.why
    assert not target.exists()


def test_a_write_error_halfway_leaves_no_file(tmp_path, monkeypatch):
    real_pwrite = os.pwrite
    calls = []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    target = tmp_path / "image"
    with pytest.raises(TargetError) as ei:
        store.create_target(target, 16 * MiB)
    assert len(calls) == 2  # it failed partway, after a first block was written
    assert "Input/output error" in ei.value.why
    assert not target.exists()


def test_a_failed_stamp_leaves_no_file(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise ImageError("superblock write refused", why="O_DIRECT not supported")

    monkeypatch.setattr(store, "stamp_superblock", refuse)
    target = tmp_path / "image"
    with pytest.raises(TargetError, match="O_DIRECT not supported"):
        store.create_target(target, 4 * MiB)
    assert not target.exists()


def test_a_file_the_user_had_is_never_removed(tmp_path, monkeypatch):
    target = tmp_path / "image"
    target.write_bytes(b"mine")
    monkeypatch.setattr(os, "posix_fallocate", fail_with(errno.ENOSPC))
    with pytest.raises(TargetError) as ei:
        store.create_target(target, 8 * MiB)
    assert target.exists() and "left in place" in ei.value.why


def test_a_filesystem_without_fallocate_still_gets_a_whole_target(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", fail_with(errno.EOPNOTSUPP))
    target = tmp_path / "image"
    sb = store.create_target(target, 4 * MiB)
    assert target.stat().st_size == 4 * MiB and sb.size == 4 * MiB
    assert target.stat().st_blocks * 512 >= 4 * MiB  # written, not sparse


def test_a_target_on_a_refused_device_is_removed_by_setup(tmp_path):
    """blockmap.setup creates the file, then cannot map it (this fake /sys does not list the
    filesystem's device): the new file goes, with the reason and a fix."""
    from kjumpd.daemon import blockmap
    from kjumpd.sysroot import Sysroot

    root = tmp_path / "root"
    (root / "sys/dev/block").mkdir(parents=True)
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text("")
    with pytest.raises(Exception) as ei:
        blockmap.setup(Sysroot(root), "/var/lib/kjumpd/image", 4 * MiB)
    assert "was removed" in ei.value.fix
    assert not (root / "var/lib/kjumpd/image").exists()
    # an empty file that was there is filled, and stays when the mapping then fails
    (root / "var/lib/kjumpd/image").write_bytes(b"")
    with pytest.raises(Exception) as ei:
        blockmap.setup(Sysroot(root), "/var/lib/kjumpd/image", 4 * MiB)
    assert (root / "var/lib/kjumpd/image").exists() and "was removed" not in ei.value.fix


def test_setup_never_overwrites_a_file_that_is_not_a_target(tmp_path):
    from kjumpd.daemon import blockmap
    from kjumpd.sysroot import Sysroot

    (tmp_path / "home").mkdir()
    precious = tmp_path / "home/thesis.odt"
    precious.write_bytes(b"four years of work" * 1000)
    with pytest.raises(TargetError) as ei:
        blockmap.setup(Sysroot(tmp_path), "/home/thesis.odt", 4 * MiB)
    assert "is not a kjumpd target" in ei.value.what and "another path" in ei.value.fix
    assert precious.read_bytes() == b"four years of work" * 1000
    # a target is made again (setup run twice): that is what setup is for
    store.create_target(tmp_path / "home/target", 4 * MiB)
    blockmap._refuse_to_overwrite(tmp_path / "home/target", "/home/target")
