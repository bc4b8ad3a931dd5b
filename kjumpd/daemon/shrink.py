"""Make the image smaller before the jump by reclaiming memory, never with the OOM killer.

The transaction runs it once user space is frozen and before the filesystems are: a running
task would fault what reclaim took straight back in, and reclaim's writeback still needs the
filesystems.

Two settings, both in ``[hibernate]``:

* ``image_size`` (default ``"auto"``): a target, best effort, as the kernel's own
  /sys/power/image_size (whose default is 2/5 of RAM): when the pages the save kernel will
  read exceed it, the excess is reclaimed through the root cgroup's memory.reclaim, in rounds
  (cgroup v2: clean page cache, and anonymous memory only where there is swap; it returns
  EAGAIN instead of killing anything). Never refuses. ``"auto"`` is 2/5 of MemTotal, ``0``
  switches it off. The pages B reads are counted as swsusp counts the pages it saves: the
  memory in use (MemTotal - MemFree), the RAM the kernel reserved for itself outside the jump
  area (System RAM in /proc/iomem - jump area - MemTotal: kernel image, struct pages), and
  what A allocates for the save kernel's preserve-context load (kexec-tools fills every page
  of [mem-min, mem-max] with a segment or a backup of it: a page of A per page of the load
  window, kexec.segment_window).
  The daemon's own freed heap is also handed back to the kernel (gc + malloc_trim), so
  that it is free, not saved.
* ``image_size_limit`` (default 0: none): a hard limit on memory in use. Steps, bounded
  by ``timeouts.shrink``: memory.reclaim of the excess, then ``sync`` + drop_caches=3; if
  memory is still above the limit, refuse with the figures.

Free pages are left out of the image by the save kernel (kjumpd/agent/freepages.py), so
what is reclaimed here is not saved. The free pages of the huge page pools are left out too,
but MemFree does not count them (the pool is taken out of it whole): with the exclusion on,
both settings count memory in use as MemTotal - MemFree - the pools' free pages
(/sys/kernel/mm/hugepages/hugepages-<size>kB/free_hugepages), so that a pool reserved and
not used is neither reclaimed against nor refused. But B only knows the free pages of the
buddy allocator and the pools: a page freed onto a per-CPU list is read and saved, junk
and all without init_on_free (in the VM, 17-27 MiB freed by kexec-tools' exit after the
load). swsusp drains those lists when it snapshots; from user space ``drain_pcp`` (called by
the transaction right before the jump) writes /proc/sys/vm/stat_refresh, which runs the
vmstat refresh on every CPU (Linux 6.7 and later: decay_pcp_high lowers each list's high
mark by an eighth, toward its minimum, and frees what lies above it), while the lists keep
shrinking.
Nothing here needs an undo: reclaimed memory is free, and the lists grow back by themselves.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
from dataclasses import dataclass

from kjumpd.daemon.config import format_size
from kjumpd.daemon.jumparea import JumpArea
from kjumpd.errors import KjumpError, ShrinkError, SysrootError
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

RECLAIM = "/sys/fs/cgroup/memory.reclaim"
STAT_REFRESH = "/proc/sys/vm/stat_refresh"
ZONEINFO = "/proc/zoneinfo"
#: stat_refresh rounds at most (each lowers a list's high mark by at most an eighth)
PCP_ROUNDS = 32
DROP_CACHES = "/proc/sys/vm/drop_caches"
HUGEPAGES = "/sys/kernel/mm/hugepages"
AUTO = -1  # image_size = "auto": 2/5 of MemTotal, as the kernel's default
AUTO_FRACTION = (2, 5)


@dataclass(frozen=True)
class ShrinkResult:
    before: int
    after: int
    limit: int
    steps: list[str]
    seconds: float


def meminfo(sysroot: Sysroot) -> dict[str, int]:
    """/proc/meminfo in bytes; SysrootError without MemTotal/MemFree."""
    info: dict[str, int] = {}
    for line in sysroot.read_text("/proc/meminfo").splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if parts and parts[0].isdigit():
            info[k.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    if "MemTotal" not in info or "MemFree" not in info:
        raise SysrootError(
            "/proc/meminfo has no MemTotal/MemFree", fix="report this kernel's /proc/meminfo"
        )
    return info


def free_huge_bytes(sysroot: Sysroot) -> int:
    """The free pages of every huge page pool (0 without hugetlb)."""
    total = 0
    for name in sysroot.listdir(HUGEPAGES):
        size = name.removeprefix("hugepages-").removesuffix("kB")
        count = sysroot.read_text(f"{HUGEPAGES}/{name}/free_hugepages", default="").strip()
        if size.isdigit() and count.isdigit():
            total += int(size) * 1024 * int(count)
    return total


def in_use(sysroot: Sysroot, info: dict[str, int], free_huge_out: bool) -> int:
    """Memory in use as the save kernel reads it: MemTotal - MemFree, less the huge page
    pools' free pages when the save kernel leaves them out (``free_huge_out``)."""
    used = info["MemTotal"] - info["MemFree"]
    return max(used - free_huge_bytes(sysroot), 0) if free_huge_out else used


def used_bytes(sysroot: Sysroot, free_huge_out: bool = False) -> int:
    return in_use(sysroot, meminfo(sysroot), free_huge_out)


@dataclass(frozen=True)
class SaveEstimate:
    """What the save kernel will read of A (bytes), counted as swsusp counts its pages."""

    used: int  # MemTotal - MemFree (less the huge page pools' free pages: ``in_use``)
    reserved: int  # System RAM outside the jump area that MemTotal does not count
    kexec_backup: int  # kexec-tools' copy of the jump area in A's memory

    @property
    def total(self) -> int:
        return self.used + self.reserved + self.kexec_backup


def _iomem_sizes(iomem: str) -> tuple[int, int]:
    """(System RAM, Crash kernel) bytes from /proc/iomem (0, 0 when addresses are hidden)."""
    ram = crash = 0
    for line in iomem.splitlines():
        rng, _, name = line.partition(" : ")
        s, _, e = rng.strip().partition("-")
        try:
            size = int(e, 16) + 1 - int(s, 16)
        except ValueError:
            continue
        if name.strip() == "System RAM" and not line.startswith(" "):
            ram += size
        elif name.strip() == "Crash kernel":
            crash += size
    return ram, crash


def estimate(
    sysroot: Sysroot,
    kexec_copy: int | None = None,
    info: dict[str, int] | None = None,
    free_huge_out: bool = False,
) -> SaveEstimate:
    """``kexec_copy``: the bytes A will hold for the save kernel's load (kexec_copy_bytes);
    None: the whole jump area, the most a preserve-context load into it can take. ``info``:
    /proc/meminfo as ``meminfo`` read it, when the caller has it. ``free_huge_out``: the
    save kernel leaves the huge page pools' free pages out (``in_use``)."""
    if info is None:
        info = meminfo(sysroot)
    ram, area = _iomem_sizes(sysroot.read_text("/proc/iomem", default=""))
    reserved = max(ram - area - info["MemTotal"], 0) if ram else 0
    return SaveEstimate(
        in_use(sysroot, info, free_huge_out),
        reserved,
        area if kexec_copy is None else kexec_copy,
    )


def kexec_copy_bytes(sysroot: Sysroot, kernel: str, initramfs: str, area: JumpArea) -> int:
    """What A allocates for the save kernel's preserve-context load: kexec-tools fills every
    page of --mem-min..--mem-max with a segment or a backup of it, and kjumpd loads into
    kexec.segment_window (the top of the jump area, sized from init_size and the initrd)."""
    from kjumpd.daemon import kexec

    try:
        initrd = os.stat(sysroot.path(initramfs)).st_size
    except OSError:
        return area.size
    start, end = kexec.segment_window(sysroot.path(kernel), initrd, area)
    return end - start


def target_bytes(info: dict[str, int], image_size: int) -> int:
    """The image size target in bytes (0: none); ``info``: /proc/meminfo (``meminfo``)."""
    if image_size == AUTO:
        num, den = AUTO_FRACTION
        return info["MemTotal"] * num // den
    return max(image_size, 0)


PAGE_SIZE = 4096
#: one request can leave the target unmet while memory that reclaim could take remains (it is
#: sized from figures read before it, and the kernel takes it from the lists it scans first),
#: so a new round asks again from fresh figures, as the kernel's own preallocation keeps
#: reclaiming until the image fits
TARGET_ROUNDS = 3
#: a round that brought the estimate down by less than this ends the rounds
ROUND_MIN_GAIN = 4 << 20


def reclaimable(info: dict[str, int]) -> int:
    """What reclaim can take without the OOM killer: page cache not mapped by a process, and
    anonymous memory that is not locked where swap has room for it. Asking memory.reclaim for
    more than this makes it retry its scans until it gives up, which can take seconds."""
    file = info.get("Active(file)", 0) + info.get("Inactive(file)", 0)
    cache = max(file - info.get("Mapped", 0), 0)
    return cache + min(_evictable_anon(info), info.get("SwapFree", 0) + info.get("SwapCached", 0))


def _evictable_anon(info: dict[str, int]) -> int:
    """Anonymous memory reclaim may swap: the anon LRU lists (locked pages are on the
    unevictable list). They also hold pages already written to swap and unmapped, which
    AnonPages no longer counts but which stay in memory until reclaim frees them."""
    if "Inactive(anon)" in info or "Active(anon)" in info:
        return info.get("Active(anon)", 0) + info.get("Inactive(anon)", 0)
    return max(info.get("AnonPages", 0) - info.get("Mlocked", 0), 0)


def _left(info: dict[str, int]) -> str:
    """What stays in memory that reclaim could have taken, for the log."""
    file = info.get("Active(file)", 0) + info.get("Inactive(file)", 0)
    return (
        f"left: page cache {file >> 20} MiB ({info.get('Mapped', 0) >> 20} MiB mapped), "
        f"evictable anonymous {_evictable_anon(info) >> 20} MiB "
        f"({info.get('SwapCached', 0) >> 20} MiB in the swap cache), "
        f"swap free {info.get('SwapFree', 0) >> 20} MiB"
    )


def _own_anon_kib() -> int | None:
    """This process's RssAnon (kB), None where /proc/self/status does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def trim_own_heap() -> str:
    """Hand this process's freed memory back to the kernel: Python's garbage, then glibc's
    free heap pages (malloc_trim). Freed pages are free in A, so B leaves them out. Says
    what it did and this process's anonymous memory before and after."""
    before = _own_anon_kib()
    gc.collect()
    how = "gc"
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        trim = None  # not glibc
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        if trim(0):
            how = "gc + malloc_trim"
    after = _own_anon_kib()
    if before is None or after is None:
        return how
    return f"{how}: the daemon's anonymous memory {before >> 10} -> {after >> 10} MiB"


def toward_target(
    sysroot: Sysroot, image_size: int, kexec_copy: int | None = None, free_huge_out: bool = False
) -> ShrinkResult:
    """Best effort (image_size): reclaim what the save kernel would read beyond the target, in
    up to TARGET_ROUNDS rounds; never refuses. Memory figures in the result are the
    estimate's totals. ``free_huge_out``: as ``in_use``."""
    start = time.monotonic()
    steps = [trim_own_heap()]
    try:
        info = meminfo(sysroot)
        target = target_bytes(info, image_size)
        est = estimate(sysroot, kexec_copy, info, free_huge_out)
    except KjumpError as e:  # a target is a wish: never a reason to refuse
        log.warning("image size target skipped: %s", e.message)
        return ShrinkResult(0, 0, 0, steps + [f"no estimate: {e.what}"], time.monotonic() - start)
    before = after = est.total
    if target <= 0 or before <= target:
        log.info(
            "image size target %s: the save kernel would read %s, within it: %s",
            format_size(target),
            format_size(before),
            "; ".join(steps),
        )
        return ShrinkResult(before, before, target, steps, time.monotonic() - start)
    rounds = TARGET_ROUNDS if sysroot.exists(RECLAIM) else 0
    if not rounds:
        steps.append("no cgroup v2 memory.reclaim")
    for _ in range(rounds):
        if after <= target:
            break
        go_on = _reclaim_round(sysroot, after - target, reclaimable(info), steps)
        try:  # a refused request may still have freed part of it
            info = meminfo(sysroot)
        except KjumpError:
            break
        # only memory in use changes: the reserved RAM and kexec's copy stay as they are
        now = in_use(sysroot, info, free_huge_out) + est.reserved + est.kexec_backup
        gained, after = after - now, now
        if not go_on or gained < ROUND_MIN_GAIN:
            break
    if after > target:
        steps.append(_left(info))
    took = time.monotonic() - start
    log.info(
        "image size target %s: the save kernel would read %s (in use %s, kernel-reserved "
        "%s, kexec's copy of the jump area %s) -> %s in %.2f s: %s",
        format_size(target),
        format_size(before),
        format_size(est.used),
        format_size(est.reserved),
        format_size(est.kexec_backup),
        format_size(after),
        took,
        "; ".join(steps),
    )
    return ShrinkResult(before, after, target, steps, took)


def _reclaim_round(sysroot: Sysroot, excess: int, can_take: int, steps: list[str]) -> bool:
    """Ask memory.reclaim for the excess, at most what it can take (``reclaimable``); False
    when no further round can do better (nothing reclaimable, or it gave up)."""
    ask = min(excess, can_take)
    if ask < PAGE_SIZE:
        steps.append("nothing reclaimable")
        return False
    try:
        sysroot.write_text(RECLAIM, str(ask))
    except KjumpError as e:  # EAGAIN: reclaimed less than asked
        steps.append(f"memory.reclaim {ask >> 20} MiB: {e.why}")
        return False
    steps.append(f"memory.reclaim {ask >> 20} MiB")
    return True


def pcp_pages(sysroot: Sysroot) -> tuple[int, int] | None:
    """(pages on the per-CPU free lists, the sum of their high marks): the pagesets' ``count:``
    and ``high:`` in /proc/zoneinfo (None when it shows none)."""
    count = high = 0
    seen = False
    for line in sysroot.read_text(ZONEINFO, default="").splitlines():
        words = line.split()
        if len(words) == 2 and words[1].isdigit():
            if words[0] == "count:":
                count += int(words[1])
                seen = True
            elif words[0] == "high:":
                high += int(words[1])
    return (count, high) if seen else None


def drain_pcp(sysroot: Sysroot, rounds: int = PCP_ROUNDS) -> str:
    """Free what the per-CPU free lists hold above their minimum (see the module's text): a
    stat_refresh write per round while the lists or their high marks still go down (a list
    auto-tuned high gives nothing back until its mark has decayed below its count). Best
    effort; says what it did."""
    first = cur = pcp_pages(sysroot)
    if first is None or not sysroot.exists(STAT_REFRESH):
        return "per-CPU free lists: not drained (no pagesets in /proc/zoneinfo or no stat_refresh)"
    done = 0
    while done < rounds:
        try:
            sysroot.write_text(STAT_REFRESH, "1")
        except KjumpError as e:
            return f"per-CPU free lists: stat_refresh refused ({e.why})"
        done += 1
        new = pcp_pages(sysroot)
        if new is None or (new[0] >= cur[0] and new[1] >= cur[1]):
            break
        cur = new
    return (
        f"per-CPU free lists {first[0] * PAGE_SIZE >> 20} -> {cur[0] * PAGE_SIZE >> 20} MiB "
        f"({first[0] - cur[0]} pages to the buddy allocator; high marks "
        f"{first[1] * PAGE_SIZE >> 20} -> {cur[1] * PAGE_SIZE >> 20} MiB; {done} stat_refresh)"
    )


def shrink(
    sysroot: Sysroot, limit: int, timeout: float, free_huge_out: bool = False
) -> ShrinkResult:
    """The hard limit (image_size_limit) on memory in use (``in_use``); ShrinkError when
    reclaim and drop_caches cannot bring it below."""
    start = time.monotonic()
    before = used_bytes(sysroot, free_huge_out)
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
                new = used_bytes(sysroot, free_huge_out)
                if new >= cur:
                    break
                cur = new
                continue
            new = used_bytes(sysroot, free_huge_out)
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
        cur = used_bytes(sysroot, free_huge_out)
    took = time.monotonic() - start
    log.info(
        "shrink: %s -> %s (limit %s) in %.1f s: %s",
        format_size(before),
        format_size(cur),
        format_size(limit),
        took,
        "; ".join(steps),
    )
    if cur > limit:
        info = meminfo(sysroot)
        pool = info.get("Hugetlb", 0) - (free_huge_bytes(sysroot) if free_huge_out else 0)
        held = f"; {pool >> 20} MiB of it huge pages, which reclaim cannot take" if pool > 0 else ""
        raise ShrinkError(
            "memory in use stays above the image size limit",
            why=f"{cur >> 20} MiB in use after reclaim and drop_caches "
            f"({before >> 20} MiB before), limit {limit >> 20} MiB{held}",
            fix="close programs, add swap, or raise hibernate.image_size_limit",
            before=before,
            after=cur,
            limit=limit,
        )
    return ShrinkResult(before, cur, limit, steps, took)
