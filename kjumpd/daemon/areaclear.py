"""Clear the part of the jump area that the save kernel's load swaps with A's memory.

A preserve-context load (kjumpd.daemon.kexec) gives kexec-tools a window at the top of the
jump area, which it fills with B's segments and with zeroed "backup" segments. Each segment's
pages live in A's RAM until the jump, and the jump *exchanges* every one of them with its
page in the area (x86 ``relocate_kernel``, ``swap_pages``); the jump back exchanges them
again. So while B saves, A's pages hold what the window held before the jump, and B saves
them. After a cold boot that is whatever the DRAM powered up with, after a warm reboot the
previous system's data; nothing zeroes it, and the exchange back puts the same bytes into
the area for the next jump: the window's size (the save kernel's init_size plus its initrd,
36 MiB for kjumpd's own) of bytes that rarely compress, in every image.

The kernel zeroes a crash kernel's segment as it loads it: ``kexec_load`` with
``KEXEC_ON_CRASH`` writes straight into the crashkernel reservation (the jump area) and
zero-fills what a segment's data does not cover (``kimage_load_crash_segment``). So before
each load of B, a crash image with one data-less segment over the window is loaded and
unloaded at once; A's pages then hold zeros while B saves, which the image skips.

It is an optimisation, never a condition: when it cannot be done (a limit on crash loads, a
crash kernel already loaded, a kernel that refuses the load) the load goes on and the image
carries the bytes, as it would without it. The crash image's own control pages (its code
page and page tables) are allocated from the bottom of the reservation, so that much is left
out. Nothing of B lives in the area while A runs (after a jump back the exchange has put a
parked save kernel's pages into A's memory), so clearing never touches a save kernel.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass

from kjumpd.daemon.jumparea import JumpArea
from kjumpd.linux.kexecload import KEXEC_ARCH_DEFAULT, KEXEC_ON_CRASH, LoadSegment, kexec_load
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

PAGE = 4096
#: left at the bottom of the area for the crash image's control page, page tables and
#: vmcoreinfo copy, which the kernel places in the reservation's first free hole
CONTROL_ROOM = 1 << 20
CRASH_LOADED = "/sys/kernel/kexec_crash_loaded"
LOAD_LIMIT_PANIC = "/proc/sys/kernel/kexec_load_limit_panic"


def clear_range(area: JumpArea, window: tuple[int, int]) -> tuple[int, int] | None:
    """The pages to zero before a load into ``window`` ([start, end) inside ``area``): the
    window, whole pages only, above CONTROL_ROOM of the area; None when nothing is left."""
    start = max(window[0], area.start + CONTROL_ROOM)
    end = min(window[1], area.end)
    start = -(-start // PAGE) * PAGE
    end = end // PAGE * PAGE
    return (start, end) if end > start else None


@dataclass(frozen=True)
class Cleared:
    """What clearing did: the range zeroed (None: nothing), the time it took, and why not."""

    span: tuple[int, int] | None
    seconds: float = 0.0
    why_not: str = ""

    def describe(self) -> str:
        if self.span is None:
            return f"jump area not cleared before the load: {self.why_not}"
        a, b = self.span
        return f"jump area {a:#x}-{b - 1:#x} cleared before the load in {self.seconds:.2f} s"


def _kexec_load(entry: int, segments: list[LoadSegment]) -> int:
    """kexec_load(2) with KEXEC_ON_CRASH; 0 or the errno."""
    return kexec_load(entry, segments, KEXEC_ON_CRASH | KEXEC_ARCH_DEFAULT)


def _why_skip(sysroot: Sysroot) -> str:
    if not sysroot.is_real:
        return "not the running system"
    if os.uname().machine != "x86_64":
        return f"kexec_load is only driven on x86_64, not {os.uname().machine}"
    if sysroot.read_text(CRASH_LOADED, default="0").strip() != "0":
        return f"a crash kernel is loaded in the area ({CRASH_LOADED} is 1)"
    limit = sysroot.read_text(LOAD_LIMIT_PANIC, default="-1").strip()
    if limit not in ("-1", ""):
        return f"{LOAD_LIMIT_PANIC} is {limit}: a load here would use up one of them"
    return ""


def clear(sysroot: Sysroot, area: JumpArea, window: tuple[int, int]) -> Cleared:
    """Zero ``window`` of the jump area through a crash-kernel load and unload; never
    raises (Cleared says what happened)."""
    span = clear_range(area, window)
    if span is None:
        return Cleared(None, why_not="the window leaves no room for the crash image's pages")
    why = _why_skip(sysroot)
    if why:
        return Cleared(None, why_not=why)
    start, end = span
    t0 = time.monotonic()
    err = _kexec_load(start, [LoadSegment(start, end - start)])
    if err:
        return Cleared(None, why_not=f"kexec_load refused it: {os.strerror(err)} ({_name(err)})")
    err = _kexec_load(0, [])
    if err:
        # the crash image stays loaded: a panic now would jump into zeros instead of
        # rebooting; say so loudly, the jump itself is unaffected
        log.error(
            "the crash image that cleared the jump area could not be unloaded (%s); "
            "run 'kexec -p -u'",
            os.strerror(err),
        )
    return Cleared(span, time.monotonic() - t0)


def _name(err: int) -> str:
    return errno.errorcode.get(err, str(err))
