"""glibc heap settings for the agent's processes (save/restore pipeline).

The pipeline allocates and frees buffers of about a chunk (1 MiB) many times a second. With
glibc's defaults each of those is a fresh mmap (or a heap top that is trimmed and grown
again), so every allocation page-faults its memory in anew, which costs many times the CPU
of reading into reused buffers. Fixing the mmap threshold above the chunk size and raising
the trim threshold keeps freed buffers in the heap for the next chunk; two arenas keep
worker threads from each holding their own. The peak RSS stays bounded by what is in flight
at once (`make bench` reports it). In the save kernel under emulation a fresh page costs far
more than a page used again, so this matters there most. Both agent entry points
(kjump-agent, and kjump-agent boot in the save kernel) call it first thing.

Best effort: ctypes may be missing, and the libc may not be glibc.
"""

from __future__ import annotations

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def tune_heap(
    arenas: int = 2, mmap_threshold: int = 8 << 20, trim_threshold: int = 64 << 20
) -> bool:
    """Apply the settings above to this process; False when they could not be applied."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (ImportError, OSError, AttributeError):
        return False
    ok = True
    for param, value in (
        (M_ARENA_MAX, arenas),
        (M_MMAP_THRESHOLD, mmap_threshold),
        (M_TRIM_THRESHOLD, trim_threshold),
    ):
        ok = bool(mallopt(param, value)) and ok
    return ok
