"""Keeping keys out of swap in A: the volume key of a LUKS volume holding the target (and an
image's key) pass through the daemon's heap and through the save kernel's initrd, which
carries the job. Swap must never see them.

- When the hibernation carries a key (``needed``), the daemon's memory is locked (mlockall
  with MCL_ONFAULT: what is resident and what is touched later; nothing is faulted in for
  it) from right after the preflight, before the volume key is derived, until the
  transaction is over. The shrink step's memory.reclaim pushes anonymous memory to swap;
  locked pages stay. Without a key nothing is locked: the daemon's idle pages are
  reclaimed like any process's and stay out of the image.
- The initrd with the job is written to a ramfs of its own (kjumpd.daemon.kexec): tmpfs pages
  can be swapped out, ramfs pages cannot.

Both are best effort: without them (no CAP_IPC_LOCK, no ramfs) the keys are still only in
memory, and a swap device inside the same encrypted volume, as Ubuntu's and Fedora's
encrypted installs have it, sees them encrypted.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kjumpd.daemon.encryption import EncryptionPlan

log = logging.getLogger(__name__)

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MNT_DETACH = 2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def needed(target: Any, encryption: EncryptionPlan | None) -> bool:
    """A key passes through the daemon in this hibernation: the volume key of the LUKS
    volume that holds the target (``target.volume``), or an image key (the image encrypted
    by kjumpd: ``encryption.public``)."""
    if target is not None and target.volume is not None:
        return True
    return encryption is not None and encryption.public is not None


def lock() -> bool:
    """Lock this process's memory, present and future, as it is touched; False (logged)
    when the kernel refuses."""
    if _libc().mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        err = ctypes.get_errno()
        log.warning(
            "cannot lock kjumpd's memory (%s): a key it holds could reach swap", os.strerror(err)
        )
        return False
    log.info("kjumpd's memory is locked until the hibernation is over (keys stay out of swap)")
    return True


def unlock() -> None:
    _libc().munlockall()


def mount_ramfs(path: str) -> bool:
    """A ramfs at ``path`` (created, 0700), unless one is there; False (logged) when it
    cannot be mounted."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.path.ismount(path):
        return True
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _libc().mount(b"ramfs", path.encode(), b"ramfs", flags, b"mode=0700") != 0:
        err = ctypes.get_errno()
        log.warning(
            "cannot mount a ramfs at %s (%s): the save kernel's initrd, with its job, stays "
            "on tmpfs, which can be swapped out",
            path,
            os.strerror(err),
        )
        return False
    return True


def unmount_ramfs(path: str) -> None:
    """Detach the ramfs at ``path`` (its files go with it) and remove the directory."""
    if os.path.ismount(path) and _libc().umount2(path.encode(), MNT_DETACH) != 0:
        log.warning("cannot unmount %s: %s", path, os.strerror(ctypes.get_errno()))
    try:
        os.rmdir(path)
    except OSError:
        pass
