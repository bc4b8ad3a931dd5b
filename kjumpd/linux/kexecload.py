"""kexec_load(2) on x86_64 (system call 246), the one place it is called from Python.

kexec-tools drives the save kernel's own load; kjumpd calls the system call itself where
kexec-tools has no form for what it needs: B's jump back into A (kjumpd.agent.jumpback) and
the crash-kernel load that clears the jump area (kjumpd.daemon.areaclear). A segment is
``struct kexec_segment`` (include/uapi/linux/kexec.h): ``data`` copied to physical ``mem``,
the rest of ``memsz`` zero-filled by the kernel.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

SYS_KEXEC_LOAD = 246  # x86_64
KEXEC_ON_CRASH = 0x1
KEXEC_PRESERVE_CONTEXT = 0x2
KEXEC_ARCH_DEFAULT = 0
KEXEC_SEGMENT_MAX = 16


@dataclass(frozen=True)
class LoadSegment:
    mem: int
    memsz: int
    data: bytes = b""


class _KexecSegment(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("bufsz", ctypes.c_size_t),
        ("mem", ctypes.c_void_p),
        ("memsz", ctypes.c_size_t),
    ]


def kexec_load(entry: int, segments: Sequence[LoadSegment], flags: int) -> int:
    """Load (or, with no segments, unload) an image; 0, or the errno the kernel returned."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    bufs = [ctypes.create_string_buffer(s.data, len(s.data)) if s.data else None for s in segments]
    arr = (_KexecSegment * max(1, len(segments)))()
    for i, (s, b) in enumerate(zip(segments, bufs)):
        arr[i].buf = ctypes.cast(b, ctypes.c_void_p).value if b is not None else None
        arr[i].bufsz = len(s.data)
        arr[i].mem = s.mem
        arr[i].memsz = s.memsz
    rc = libc.syscall(
        ctypes.c_long(SYS_KEXEC_LOAD),
        ctypes.c_ulong(entry),
        ctypes.c_ulong(len(segments)),
        arr if segments else None,
        ctypes.c_ulong(flags),
    )
    return ctypes.get_errno() if rc != 0 else 0
