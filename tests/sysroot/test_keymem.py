"""Keys kept out of swap in A (kjumpd/daemon/keymem.py), on this machine's kernel: the
daemon's memory locked while it holds a key, the save kernel's initrd (with the job and its
keys) on a ramfs, which the kernel never swaps out."""

from __future__ import annotations

import os
from pathlib import Path

from kjumpd.daemon import keymem
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
