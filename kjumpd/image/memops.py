"""Bulk memory operations that let other threads run: libc memmove/memset/memcmp via ctypes.

A slice assignment (``dst[:] = src``) or a ``bytes`` comparison holds the GIL for the whole
operation; a foreign call through ctypes releases it. The save and the restore run several
threads (a reader, workers that check and decode, a writer): with the GIL held, a 1 MiB
copy into A's memory stops every other thread of the pipeline for as long as it takes,
which under emulation is milliseconds. Small operations stay Python's: below ``LIBC_MIN``
bytes the ctypes call costs more than it frees.

A buffer's address comes from the buffer protocol (``PyObject_GetBuffer`` through
``ctypes.pythonapi``), which reaches read-only buffers too: lz4's output (bytes) and the save
kernel's read-only mapping of A's memory are copied from without being made writable. Without
a libc that has these symbols, or a buffer that is not one contiguous block, everything
falls back to the plain Python operations, with the same results.

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


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (Include/pybuffer.h); only ``buf`` is read here."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_PyBUF_SIMPLE, _PyBUF_WRITABLE = 0, 1


def _load() -> tuple[_Fn, _Fn, _Fn, _Fn, _Fn] | None:
    try:
        libc = ctypes.CDLL(None)
        memmove, memset, memcmp = libc.memmove, libc.memset, libc.memcmp
        memmove.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
        memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        memmove.restype = memset.restype = ctypes.c_void_p
        memcmp.restype = ctypes.c_int
        get, release = ctypes.pythonapi.PyObject_GetBuffer, ctypes.pythonapi.PyBuffer_Release
        get.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
        get.restype = ctypes.c_int
        release.argtypes = (ctypes.POINTER(_PyBuffer),)
        release.restype = None
        return memmove, memset, memcmp, get, release
    except (OSError, AttributeError):
        return None


_LIBC = _load()
_zero_src: mmap.mmap | None = None  # never written: reads as zeros


def _reachable(buf: memoryview) -> bool:
    return buf.c_contiguous and buf.nbytes >= LIBC_MIN


@contextmanager
def _address(buf: memoryview, writable: bool = False) -> Iterator[int]:
    """The address of ``buf``'s first byte (``_reachable``), valid inside the block: the
    buffer stays exported (a mapping cannot be closed, a bytearray cannot be resized)."""
    assert _LIBC is not None
    view = _PyBuffer()
    # raises BufferError for a read-only buffer asked to be writable
    _LIBC[3](buf, ctypes.byref(view), _PyBUF_WRITABLE if writable else _PyBUF_SIMPLE)
    try:
        yield view.buf or 0
    finally:
        _LIBC[4](ctypes.byref(view))


def copy_into(dst: memoryview, src: memoryview) -> None:
    """``dst[:len(src)] = src``; large copies by memmove with the GIL released."""
    n = src.nbytes
    if _LIBC is None or dst.readonly or not _reachable(src) or not _reachable(dst):
        dst[:n] = src
        return
    if dst.nbytes < n:
        raise ValueError(f"copy of {n} bytes into a buffer of {dst.nbytes}")
    with _address(dst, writable=True) as d, _address(src) as s:
        _LIBC[0](d, s, n)


def zero_fill(dst: memoryview) -> None:
    """Zeros over all of ``dst``: memset (stores only) with the GIL released."""
    n = dst.nbytes
    if _LIBC is None or dst.readonly or not _reachable(dst):
        dst[:] = bytes(n)
        return
    with _address(dst, writable=True) as d:
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
