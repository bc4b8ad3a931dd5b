"""Filesystem freeze and thaw (FIFREEZE/FITHAW), and holding the daemon's logs meanwhile.

Which filesystems: every mount in /proc/self/mountinfo whose filesystem type is a local
disk filesystem, mounted read-write, one mount per superblock (bind mounts share one),
frozen leaves first (deepest mount point first) and thawed in reverse. Before each
FIFREEZE the mount point's st_dev is compared with mountinfo's MAJ:MIN (btrfs: the
directory must be a mount point, its st_dev names the subvolume), so a stale table (or a
fake tree) never freezes the wrong filesystem.

While anything is frozen nothing may write to a filesystem: :class:`HeldLogs` buffers
every record of the root logger in memory and releases them after the thaw.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
from collections.abc import Callable

from kjumpd.errors import FreezeError
from kjumpd.linux.mountinfo import Mount
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
LOCAL_FS = frozenset(
    {
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "vfat",
        "msdos",
        "exfat",
        "f2fs",
        "jfs",
        "reiserfs",
        "ntfs3",
        "hfsplus",
        "nilfs2",
        "bcachefs",
    }
)


def freezable(mounts: list[Mount]) -> list[Mount]:
    """Local read-write filesystems, one mount per superblock, loop-backed ones first, then
    leaves first."""
    seen: set[str] = set()
    out = []
    for m in mounts:
        opts = m.options.split(",")
        if m.fstype not in LOCAL_FS or "ro" in opts or m.devno in seen:
            continue
        seen.add(m.devno)
        out.append(m)
    # filesystems on loop devices first: their backing file may live on another filesystem
    # of the list, which must still accept their flush
    return sorted(out, key=lambda m: (not m.source.startswith("/dev/loop"), -m.depth, m.mountpoint))


def hidden_from_restore(sysroot: Sysroot, mounts: list[Mount]) -> list[tuple[Mount, str, str]]:
    """(mount, kernel device name, why) of every freezable filesystem the restore-first
    environment could not find again to compare its stamp: R assembles no stacked block
    devices, so one on md RAID or on a device-mapper table it cannot read through
    (blockmap.stacked_map) would make it refuse the image as stale. Linear LVs on one disk
    and dm-crypt volumes are read through their maps (below dm-crypt: the ciphertext)."""
    from kjumpd.daemon import blockmap
    from kjumpd.errors import BlockMapError

    out = []
    for m in freezable(mounts):
        link = sysroot.path(f"/sys/dev/block/{m.devno}")
        if not link.exists() and m.source.startswith("/dev/"):
            # btrfs: mountinfo gives its anonymous device number, the source the real one
            name = blockmap.sysfs_name(sysroot, m.source)
            if name is None:
                continue  # not a block device sysfs lists: nothing stacked to check
            link = sysroot.path(f"/sys/class/block/{name}")
        name = os.path.basename(os.path.realpath(link))
        if (link / "md").is_dir():
            out.append((m, name, "md RAID"))
        elif (link / "dm").is_dir():
            try:
                blockmap.stacked_map(sysroot, f"/dev/{name}")
            except BlockMapError as e:
                out.append((m, name, f"device-mapper: {e.what}"))
    return out


def device_of(sysroot: Sysroot, m: Mount) -> str:
    """The block device path of a mount, for the superblock stamp."""
    if m.source.startswith("/dev/") and m.source != "/dev/root":
        return m.source
    link = sysroot.path(f"/sys/dev/block/{m.devno}")
    if link.exists():
        return "/dev/" + os.path.basename(os.path.realpath(link))
    raise FreezeError(
        f"cannot find the block device of {m.mountpoint}",
        why=f"source {m.source!r}, {m.devno} not in /sys/dev/block",
        fix="report this mount table",
    )


def _ioctl_dir(sysroot: Sysroot, m: Mount, request: int) -> None:
    real = sysroot.path(m.mountpoint)
    fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        same = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" == m.devno
        if not same and m.fstype == "btrfs":
            # btrfs reports each subvolume's anonymous device in st_dev, the filesystem's in
            # mountinfo: accept it when the directory is a mount point
            same = os.path.ismount(real)
        if not same:
            raise FreezeError(
                f"{m.mountpoint} is not the filesystem mountinfo names",
                why=f"mountinfo says {m.devno}, the directory is on "
                f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}",
                fix="the mount table changed; try again",
                mountpoint=m.mountpoint,
            )
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


def freeze(
    sysroot: Sysroot,
    mounts: list[Mount],
    on_frozen: Callable[[Mount], None] | None = None,
    before_freeze: Callable[[Mount], None] | None = None,
) -> list[Mount]:
    """sync, then FIFREEZE each mount in order; on failure thaw what was frozen and raise.

    ``before_freeze`` is called before each FIFREEZE (a write-ahead record for a thaw path
    that does not depend on this process), ``on_frozen`` after each successful one (for the
    undo journal)."""
    os.sync()
    done: list[Mount] = []
    for m in mounts:
        if before_freeze:
            before_freeze(m)
        try:
            _ioctl_dir(sysroot, m, FIFREEZE)
        except FreezeError:
            thaw(sysroot, done)
            raise
        except OSError as e:
            thaw(sysroot, done)
            raise FreezeError(
                f"cannot freeze {m.mountpoint} ({m.fstype})",
                why=e.strerror or str(e),
                fix="check that it is not frozen already (fsfreeze -u) and that "
                "the filesystem supports freezing",
                mountpoint=m.mountpoint,
            ) from None
        done.append(m)
        if on_frozen:
            on_frozen(m)
    return done


def thaw(sysroot: Sysroot, frozen: list[Mount]) -> list[str]:
    """FITHAW in reverse order; returns the errors (the caller reports them)."""
    errors = []
    for m in reversed(frozen):
        try:
            _ioctl_dir(sysroot, m, FITHAW)
        except (OSError, FreezeError) as e:
            errors.append(f"{m.mountpoint}: {getattr(e, 'strerror', None) or e}")
    return errors


class HeldLogs:
    """Buffer every log record of the root logger in memory until :meth:`release`."""

    def __init__(self) -> None:
        self._swapped: list[tuple[logging.Handler, logging.handlers.MemoryHandler]] = []
        self._added: logging.handlers.MemoryHandler | None = None

    def hold(self) -> None:
        root = logging.getLogger()
        handlers = list(root.handlers)
        if not handlers and logging.lastResort is not None:
            # no configuration: records would go straight to stderr through lastResort
            mem = logging.handlers.MemoryHandler(
                capacity=1 << 30,
                flushLevel=logging.CRITICAL + 10,
                target=logging.lastResort,
                flushOnClose=True,
            )
            root.addHandler(mem)
            self._added = mem
        for h in handlers:
            mem = logging.handlers.MemoryHandler(
                capacity=1 << 30, flushLevel=logging.CRITICAL + 10, target=h, flushOnClose=True
            )
            mem.setLevel(h.level)
            root.removeHandler(h)
            root.addHandler(mem)
            self._swapped.append((h, mem))

    @property
    def held(self) -> int:
        return sum(len(m.buffer) for _, m in self._swapped)

    def release(self) -> None:
        root = logging.getLogger()
        added = self._added
        if added is not None:
            root.removeHandler(added)
            added.flush()
            added.close()
            self._added = None
        for h, mem in reversed(self._swapped):
            root.removeHandler(mem)
            root.addHandler(h)
            mem.flush()
            mem.close()
        self._swapped.clear()
