"""Bring the memory in use under the image size limit before the jump, never with the OOM killer.

"In use" is MemTotal - MemFree from /proc/meminfo: what the save kernel would have to
store (free pages are only left out when they are zero, so the kernel should run with
init_on_free=1 for a limit to pay off; preflight says so). Steps, bounded by
``timeouts.shrink``: proactive reclaim of the excess through the root cgroup's
memory.reclaim (cgroup v2; it returns EAGAIN instead of killing anything), then
``sync`` + drop_caches=3. If memory is still above the limit, refuse with the figures.
Nothing here needs an undo: reclaimed memory is simply free.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from kjumpd.config import format_size
from kjumpd.errors import KjumpError, ShrinkError, SysrootError
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

RECLAIM = "/sys/fs/cgroup/memory.reclaim"
DROP_CACHES = "/proc/sys/vm/drop_caches"


@dataclass(frozen=True)
class ShrinkResult:
    before: int
    after: int
    limit: int
    steps: list[str]
    seconds: float


def used_bytes(sysroot: Sysroot) -> int:
    info: dict[str, int] = {}
    for line in sysroot.read_text("/proc/meminfo").splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if parts and parts[0].isdigit():
            info[k.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    if "MemTotal" not in info or "MemFree" not in info:
        raise SysrootError("/proc/meminfo has no MemTotal/MemFree",
                           fix="report this kernel's /proc/meminfo")
    return info["MemTotal"] - info["MemFree"]


def shrink(sysroot: Sysroot, limit: int, timeout: float) -> ShrinkResult:
    start = time.monotonic()
    before = used_bytes(sysroot)
    steps: list[str] = []
    if limit <= 0 or before <= limit:
        return ShrinkResult(before, before, limit, steps, 0.0)
    deadline = start + timeout
    cur = before
    if sysroot.exists(RECLAIM):
        while cur > limit and time.monotonic() < deadline:
            excess = cur - limit
            try:
                sysroot.write_text(RECLAIM, str(excess))
                steps.append(f"memory.reclaim {format_size(excess)}")
            except KjumpError as e:
                steps.append(f"memory.reclaim {format_size(excess)}: {e.why}")
                new = used_bytes(sysroot)
                if new >= cur:
                    break
                cur = new
                continue
            new = used_bytes(sysroot)
            if new >= cur:
                break
            cur = new
    else:
        steps.append("no cgroup v2 memory.reclaim")
    if cur > limit and time.monotonic() < deadline:
        os.sync()
        try:
            sysroot.write_text(DROP_CACHES, "3")
            steps.append("drop_caches 3")
        except KjumpError as e:
            steps.append(f"drop_caches: {e.why}")
        cur = used_bytes(sysroot)
    took = time.monotonic() - start
    log.info("shrink: %s -> %s (limit %s) in %.1f s: %s", format_size(before), format_size(cur),
             format_size(limit), took, "; ".join(steps))
    if cur > limit:
        raise ShrinkError("memory in use stays above the image size limit",
                          why=f"{cur >> 20} MiB in use after reclaim and drop_caches "
                              f"({before >> 20} MiB before), limit {limit >> 20} MiB",
                          fix="close programs, add swap, or raise hibernate.image_size_limit",
                          before=before, after=cur, limit=limit)
    return ShrinkResult(before, cur, limit, steps, took)
