"""Keys kept out of swap in A (kjumpd/daemon/keymem.py), on this machine's kernel: the
daemon's memory locked while it holds a key, the save kernel's initrd (with the job and its
keys) on a ramfs, which the kernel never swaps out."""

from __future__ import annotations

import os
from pathlib import Path

from kjumpd.daemon import keymem
from kjumpd.daemon.blockmap import Target
from kjumpd.daemon.encryption import EncryptionPlan
from kjumpd.linux.luks import Volume
from tests.prereq import need


def _locked_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    return -1


def test_the_daemons_memory_is_locked_while_it_holds_a_key_and_released_after() -> None:
    need(os.geteuid() == 0, "locking memory without a limit needs root (CAP_IPC_LOCK)")
    keymem.unlock()
    assert _locked_kib() == 0
    assert keymem.lock()
    try:
        key = bytearray(os.urandom(64) * 4096)  # touched after the lock: locked as it is
        assert _locked_kib() >= len(key) // 1024
    finally:
        keymem.unlock()
    assert _locked_kib() == 0


def test_only_a_hibernation_that_carries_a_key_locks_the_daemons_memory() -> None:
    """The lock keeps the daemon's pages out of the shrink's reach, and so in the image:
    only a key (the target's LUKS volume key, an image key) is worth that."""
    plain = Target("/var/lib/kjumpd/image", "file", "/dev/vda", "254:0", 1 << 30)
    volume = Volume("0b3a5c7e-1d2f-4a6b-8c9d-0e1f2a3b4c5d", 0, "aes-xts-plain64", 64, 0, 32768, 8)
    in_luks = Target("/srv/image", "file", "/dev/dm-0", "253:0", 1 << 30, volume=volume)
    off = EncryptionPlan(None, "", "off")
    sealed = EncryptionPlan(b"\x04" + bytes(64), "k1", "AES-256-GCM")
    assert not keymem.needed(plain, off)
    assert not keymem.needed(plain, None)
    assert keymem.needed(in_luks, off)
    assert keymem.needed(plain, sealed)


def test_the_initrd_directory_is_a_ramfs_and_goes_away_with_its_files(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "mounting a ramfs needs root")
    where = str(tmp_path / "run/kjumpd/ram")
    assert keymem.mount_ramfs(where)
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        assert any(m.split()[1] == where and m.split()[2] == "ramfs" for m in mounts)
        assert keymem.mount_ramfs(where)  # already there: the same one
        (Path(where) / "save-initrd.img").write_bytes(b"job with a key")
    finally:
        keymem.unmount_ramfs(where)
    assert not os.path.exists(where)
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    assert not any(m.split()[1] == where for m in mounts)
