"""kjumpd.hashing: the hash, and that a hashed file does not stay in the page cache (where
the next image would carry it)."""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import shutil
import tempfile
from pathlib import Path

from kjumpd.hashing import sha256_file
from kjumpd.linux import mountinfo
from savekernel import buildcache
from tests.prereq import need

PAGE = mmap.PAGESIZE
MAP_FAILED = ctypes.c_void_p(-1).value


def _resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache: mincore(2) on a mapping that touches none."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, MAP_FAILED), os.strerror(ctypes.get_errno())
        try:
            vec = (ctypes.c_ubyte * (-(-size // PAGE)))()
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vec)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_the_hash_is_sha256sums(tmp_path: Path) -> None:
    f = tmp_path / "vmlinuz"
    data = os.urandom(3 << 20)
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_a_hashed_kernel_is_not_left_in_the_page_cache(tmp_path: Path) -> None:
    # tmpfs has no clean pages to drop (its pages are the file): where /tmp is one, the
    # build cache (on disk, as /boot is) holds the file
    where = tmp_path
    if _on_tmpfs(where):
        buildcache.cache_root().mkdir(parents=True, exist_ok=True)
        where = Path(tempfile.mkdtemp(prefix="test-hashing-", dir=buildcache.cache_root()))
    need(not _on_tmpfs(where), f"{where} is on tmpfs, which has no clean pages to drop")
    f = where / "vmlinuz"
    try:
        with open(f, "wb") as out:
            out.write(os.urandom(8 << 20))
            out.flush()
            os.fsync(out.fileno())
        with open(f, "rb") as inp:
            inp.read()  # cached, as after any read
        need(_resident_pages(f) > 0, f"mincore shows no page of {f} resident after reading it")
        sha256_file(f)
        assert _resident_pages(f) == 0
    finally:
        if where != tmp_path:
            shutil.rmtree(where, ignore_errors=True)


def _on_tmpfs(path: Path) -> bool:
    mounts = mountinfo.parse(Path("/proc/self/mountinfo").read_text())
    under = [m for m in mounts if path.is_relative_to(m.mountpoint)]
    return max(under, key=lambda m: len(m.mountpoint)).fstype in ("tmpfs", "ramfs")
