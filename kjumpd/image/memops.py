"""Bulk memory operations that let other threads run: libc memmove/memset/memcmp via ctypes.

A slice assignment (``dst[:] = src``) or a ``bytes`` comparison holds the GIL for the whole
operation; a foreign call through ctypes releases it. The save and the restore run several
threads (a reader, workers that check and decode, a writer): with the GIL held, a 1 MiB
copy into A's memory stops every other thread of the pipeline for as long as it takes,
which under emulation is milliseconds. Small operations stay Python's: below ``LIBC_MIN``
bytes the ctypes call costs more than it frees.

ctypes reaches only writable buffers (``c_char.from_buffer``): a read-only one (bytes, the save
kernel's read-only view of A's memory) is handled by the plain Python operation. Without a
libc that has these symbols (a stripped initramfs) everything falls back to the plain Python
operations, with the same results.

Standard library only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: below this many bytes a slice operation is cheaper than a ctypes call
LIBC_MIN = 64 << 10
_ZERO_STEP = 1 << 20

_Fn = Callable[..., int]


def _load_libc() -> tuple[_Fn, _Fn, _Fn] | None:
    try:
        libc = ctypes.CDLL(None)
        memmove, memset, memcmp = libc.memmove, libc.memset, libc.memcmp
        memmove.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
        memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        memmove.restype = memset.restype = ctypes.c_void_p
        memcmp.restype = ctypes.c_int
        return memmove, memset, memcmp
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
_zero_src: mmap.mmap | None = None  # never written: reads as zeros


def _reachable(buf: memoryview) -> bool:
    return not buf.readonly and buf.c_contiguous and buf.nbytes >= LIBC_MIN


@contextmanager
def _address(buf: memoryview) -> Iterator[int]:
    """The address of ``buf``'s first byte (``_reachable``), valid inside the block."""
    pinned = ctypes.c_char.from_buffer(buf)
    try:
        yield ctypes.addressof(pinned)
    finally:
        del pinned


def copy_into(dst: memoryview, src: memoryview) -> None:
    """``dst[:len(src)] = src``; large copies by memmove with the GIL released."""
    n = src.nbytes
    if _LIBC is None or not _reachable(src) or not _reachable(dst):
        dst[:n] = src
        return
    if dst.nbytes < n:
        raise ValueError(f"copy of {n} bytes into a buffer of {dst.nbytes}")
    with _address(dst) as d, _address(src) as s:
        _LIBC[0](d, s, n)


def zero_fill(dst: memoryview) -> None:
    """Zeros over all of ``dst``: memset (stores only) with the GIL released."""
    n = dst.nbytes
    if _LIBC is None or not _reachable(dst):
        dst[:] = bytes(n)
        return
    with _address(dst) as d:
        _LIBC[1](d, 0, n)


def is_zero(buf: memoryview) -> bool:
    """Whether every byte of ``buf`` is zero (memcmp against zeros, GIL released)."""
    global _zero_src
    n = buf.nbytes
    if _LIBC is None or not _reachable(buf):
        return bytes(buf) == bytes(n)
    if _zero_src is None:
        _zero_src = mmap.mmap(-1, _ZERO_STEP)
    with _address(buf) as a, memoryview(_zero_src) as zv, _address(zv) as za:
        return all(
            _LIBC[2](a + o, za, min(_ZERO_STEP, n - o)) == 0 for o in range(0, n, _ZERO_STEP)
        )


def equal(a: memoryview, b: memoryview) -> bool:
    """``a == b`` for two buffers of the same length (memcmp, GIL released)."""
    if a.nbytes != b.nbytes:
        return False
    if _LIBC is None or not _reachable(a) or not _reachable(b):
        return a == b
    with _address(a) as pa, _address(b) as pb:
        return _LIBC[2](pa, pb, a.nbytes) == 0
