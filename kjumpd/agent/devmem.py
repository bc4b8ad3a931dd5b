"""The main kernel's physical memory as the save kernel sees it: /dev/mem through mmap windows.

In B, A's RAM is not B's RAM (B runs in the jump area + the low 512K), so /dev/mem reaches it
without copies or /proc/vmcore (which does not work there: docs/KERNEL-NOTES.md). Reads and
writes go through mmap windows of up to ``window`` bytes (16 MiB: faster than pread/pwrite,
which /dev/mem serves a page at a time), clipped to the range that holds the request so a
window never spans a hole (PCI, BIOS) between A's RAM ranges.

:class:`MemorySource` is what the save pipeline reads, :class:`MemorySink` what the restore
pipeline writes. A sink *holds back* writes that land in B's own memory (the low 512K): writing
them now would overwrite the running save kernel; they become extra segments of the jump-back
kexec_load (kjumpd.agent.jumpback), which the kernel copies after B has stopped.

Large copies into a window and zero fills (``MemorySink.zero``: memset, no source to read)
go through kjumpd.image.memops, which releases the GIL: the restore's worker threads write
memory while another one decompresses or the reader parses records.

``MemorySink.zero`` first reads the destination and leaves it alone when it already holds
only zeros (the result is the same: zeros). Under QEMU the first write to a guest page a
fresh QEMU process never touched costs several times a read of it (the host allocates the
page then); after a power cycle most of the main kernel's free pages are such pages.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kjumpd.errors import AgentError
from kjumpd.image.memops import copy_into, is_zero, zero_fill
from kjumpd.sysroot import Sysroot

log = logging.getLogger("kjumpd.agent.devmem")

PAGE = 4096
DEFAULT_WINDOW = 16 << 20
Range = tuple[int, int]  # [start, end) physical byte addresses


def normalize(ranges: Sequence[Sequence[int]]) -> list[Range]:
    """Sorted, merged [start, end) ranges; empty ones dropped; negative ones refused."""
    out: list[list[int]] = []
    for r in sorted((int(a), int(b)) for a, b in ranges):
        start, end = r
        if start < 0 or end < start:
            raise AgentError(
                f"bad physical range [{start:#x}, {end:#x})",
                fix="ranges are [start, end) with 0 <= start <= end",
            )
        if start == end:
            continue
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def subtract(ranges: Sequence[Range], holes: Sequence[Range]) -> list[Range]:
    """ranges minus holes (both [start, end))."""
    out: list[Range] = []
    holes = normalize(holes)
    for start, end in normalize(ranges):
        cur = start
        for hs, he in holes:
            if he <= cur or hs >= end:
                continue
            if hs > cur:
                out.append((cur, hs))
            cur = max(cur, he)
        if cur < end:
            out.append((cur, end))
    return out


class _DevMem:
    """An open /dev/mem (or a file standing in for it) with one cached mmap window."""

    def __init__(
        self,
        sysroot: Sysroot,
        ranges: Sequence[Sequence[int]] | None,
        writable: bool,
        window: int = DEFAULT_WINDOW,
        device: str = "/dev/mem",
    ) -> None:
        if window <= 0 or window % mmap.ALLOCATIONGRANULARITY:
            raise AgentError(f"mmap window {window} is not a multiple of the page size")
        self.device = device
        self.ranges = normalize(ranges) if ranges is not None else None
        self._starts = [r[0] for r in self.ranges] if self.ranges is not None else []
        self.window = window
        self._prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        path = sysroot.path(device)
        try:
            # no O_SYNC: with it x86 maps /dev/mem uncached (drivers/char/mem.c), far slower
            self._fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as e:
            raise AgentError(
                f"cannot open {device}",
                why=e.strerror or str(e),
                fix="the save kernel needs CONFIG_DEVMEM=y and STRICT_DEVMEM off",
                path=device,
            ) from e
        # one cached window per thread (the restore's workers write at the same time)
        self._local = threading.local()
        self._windows: dict[int, mmap.mmap] = {}  # thread id -> its window
        self._lock = threading.Lock()

    def close(self) -> None:
        self._drop_windows()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bounds(self, phys: int, length: int) -> Range:
        """The range that must contain [phys, phys+length) (the whole request when unbounded)."""
        if phys < 0 or length < 0:
            raise AgentError(f"bad memory access at {phys:#x} length {length}")
        if self.ranges is None:
            return (phys - phys % PAGE, -(-(phys + length) // PAGE) * PAGE)
        i = bisect.bisect_right(self._starts, phys) - 1
        if i < 0 or phys + length > self.ranges[i][1]:
            raise AgentError(
                f"physical access [{phys:#x}, {phys + length:#x}) is outside the "
                "main kernel's memory ranges",
                why="the job's range list does not cover it",
                fix="this is a bug in the job or the image; nothing was written",
            )
        return self.ranges[i]

    def _view(self, phys: int, length: int) -> tuple[mmap.mmap, int]:
        """A window covering phys (and as much of the request as the window holds)."""
        loc = self._local
        m = getattr(loc, "map", None)
        if m is not None and loc.start <= phys < loc.end:
            return m, phys - loc.start
        lo, hi = self._bounds(phys, length)
        start = max(lo - lo % PAGE, phys - phys % self.window)
        end = min(-(-hi // PAGE) * PAGE, start + self.window)
        if m is not None:
            loc.map = None
            with self._lock:
                self._windows.pop(threading.get_ident(), None)
            _unmap(m)
        try:
            m = mmap.mmap(self._fd, end - start, mmap.MAP_SHARED, self._prot, offset=start)
        except (OSError, ValueError) as e:
            raise AgentError(
                f"cannot map {self.device} at {start:#x}+{end - start:#x}",
                why=str(e),
                fix="check STRICT_DEVMEM is off in the save kernel",
                phys=start,
            ) from e
        loc.map, loc.start, loc.end = m, start, end
        with self._lock:
            self._windows[threading.get_ident()] = m
        return m, phys - start

    def _drop_windows(self) -> None:
        """Unmap every thread's window (no thread may be using one)."""
        with self._lock:
            maps, self._windows = list(self._windows.values()), {}
        for m in maps:
            _unmap(m)
        self._local = threading.local()


def _unmap(m: mmap.mmap) -> None:
    """Unmap a window now, or once the last view a record still holds of it is gone."""
    try:
        m.close()
    except BufferError:
        pass  # the mmap object unmaps itself when its last export is released


class MemorySource(_DevMem):
    """Reads A's physical memory: ``read(phys, length) -> bytes``.

    Each thread reads through its own window and keeps no counters, so the save's workers
    copy at the same time (``concurrent_reads``)."""

    concurrent_reads = True

    def view(self, phys: int, length: int) -> memoryview | None:
        """A read-only view of [phys, phys+length) in this thread's window, valid as long as
        it is referenced (None when the range crosses a window's end). The save reads A's
        frozen memory through it without a copy."""
        self._bounds(phys, length)
        m, off = self._view(phys, length)
        if off + length > len(m):
            return None
        return memoryview(m)[off : off + length]

    def __init__(
        self,
        sysroot: Sysroot = Sysroot(),
        ranges: Sequence[Sequence[int]] | None = None,
        window: int = DEFAULT_WINDOW,
        device: str = "/dev/mem",
    ) -> None:
        super().__init__(sysroot, ranges, False, window, device)

    def read(self, phys: int, length: int) -> bytes:
        self._bounds(phys, length)
        parts = []
        while length > 0:
            m, off = self._view(phys, length)
            n = min(length, len(m) - off)
            parts.append(m[off : off + n])
            phys += n
            length -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, phys: int, buf: bytearray | memoryview) -> None:
        """Copy ``len(buf)`` bytes at ``phys`` into ``buf`` (a reused buffer: no fresh memory,
        whose page faults cost more than the copy itself)."""
        out = memoryview(buf)
        length = len(out)
        self._bounds(phys, length)
        done = 0
        while done < length:
            m, off = self._view(phys + done, length - done)
            n = min(length - done, len(m) - off)
            with memoryview(m) as src:
                copy_into(out[done : done + n], src[off : off + n])
            done += n


@dataclass(frozen=True)
class HeldSegment:
    """A's bytes for memory B is running in: handed to the jump-back kexec_load."""

    mem: int
    data: bytes


class MemorySink(_DevMem):
    """Writes A's physical memory: ``write(phys, data)``; writes inside ``hold`` are kept back."""

    def __init__(
        self,
        sysroot: Sysroot = Sysroot(),
        ranges: Sequence[Sequence[int]] | None = None,
        hold: Sequence[Sequence[int]] = (),
        window: int = DEFAULT_WINDOW,
        device: str = "/dev/mem",
    ) -> None:
        super().__init__(sysroot, ranges, True, window, device)
        self.hold = normalize(hold)
        for s, e in self.hold:
            if s % PAGE or e % PAGE:
                raise AgentError(f"held range [{s:#x}, {e:#x}) is not page aligned")
        #: writes from several threads at once are fine (each has its own window; held pages
        #: and counters are locked): the restore lets its workers write concurrently
        self.concurrent_writes = True
        self._held: dict[int, bytearray] = {}  # page address -> A's bytes for it
        self.bytes_written = 0
        self.zero_already = 0  # bytes zero() found zero already (read, not written)

    def write(self, phys: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        self._route(phys, len(data), data)

    def zero(self, phys: int, length: int) -> None:
        """Write ``length`` zero bytes at ``phys`` (held pages get zeros too): a memset, no
        zero buffer is read."""
        self._route(phys, length, None)

    def _route(self, phys: int, length: int, data: memoryview | None) -> None:
        self._bounds(phys, length)
        pos = 0
        while pos < length:
            at = phys + pos
            held = self._held_range(at)
            if held is not None:
                n = min(length - pos, held[1] - at)
                self._hold(at, data[pos : pos + n] if data is not None else memoryview(bytes(n)))
            else:
                nxt = next((s for s, _ in self.hold if s > at), None)
                n = length - pos if nxt is None else min(length - pos, nxt - at)
                self._direct(at, n, data[pos : pos + n] if data is not None else None)
            pos += n

    def place(self, phys: int, length: int, fill: Callable[[memoryview], None]) -> bool:
        """Let ``fill`` write [phys, phys+length) in place: it gets a view of A's memory
        (this thread's window), so a chunk is decoded there without a buffer and a copy.
        False, with nothing written, when the range touches a held page or does not lie in
        one window: write() it then."""
        self._bounds(phys, length)
        if any(s < phys + length and e > phys for s, e in self.hold):
            return False
        m, off = self._view(phys, length)
        if len(m) - off < length:
            return False
        with memoryview(m) as whole, whole[off : off + length] as dst:
            fill(dst)
        with self._lock:
            self.bytes_written += length
        return True

    def _held_range(self, at: int) -> Range | None:
        for s, e in self.hold:
            if s <= at < e:
                return (s, e)
        return None

    def _hold(self, at: int, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            page = (at + pos) - (at + pos) % PAGE
            off = (at + pos) - page
            n = min(len(data) - pos, PAGE - off)
            with self._lock:
                buf = self._held.setdefault(page, bytearray(PAGE))
                buf[off : off + n] = data[pos : pos + n]
            pos += n

    def _direct(self, at: int, length: int, data: memoryview | None) -> None:
        pos = 0
        while pos < length:
            m, off = self._view(at + pos, length - pos)
            n = min(length - pos, len(m) - off)
            with memoryview(m) as whole, whole[off : off + n] as dst:
                if data is None:
                    if is_zero(dst):
                        with self._lock:
                            self.zero_already += n
                    else:
                        zero_fill(dst)
                else:
                    copy_into(dst, data[pos : pos + n])
            pos += n
        with self._lock:
            self.bytes_written += length

    def flush(self) -> None:
        """Drop the current window. (msync(2) on /dev/mem fails with EINVAL and is not
        needed: the mapping is the physical memory itself, cache-coherent on x86.)"""
        self._drop_windows()

    def held_segments(self) -> list[HeldSegment]:
        """Held pages coalesced into runs of consecutive pages, by address."""
        out: list[HeldSegment] = []
        run_start = -1
        run: list[bytes] = []
        for page in sorted(self._held):
            if run and page == run_start + PAGE * len(run):
                run.append(bytes(self._held[page]))
                continue
            if run:
                out.append(HeldSegment(run_start, b"".join(run)))
            run_start, run = page, [bytes(self._held[page])]
        if run:
            out.append(HeldSegment(run_start, b"".join(run)))
        return out
