"""The main kernel's free pages, read from its own page allocator (makedumpfile ``-d 16`` style).

At save time A is stopped at the jump, so its buddy allocator's state in A's memory says
exactly which pages are free. The save kernel (B) reads it through a ``read(phys, length)``
callable (``/dev/mem`` in B, a bytes image in the tests) and leaves those pages out: the save
pipeline gets zeros for them (:class:`FreeMaskedSource`), elides them as zero pages, and the
restore writes zeros back, which is what A's allocator expects with ``init_on_free=1``.
Without init_on_free (the job's ``free_pages_zeroed`` is false) a wholly free chunk becomes a
free record instead, which the restore does not write at all.

Inputs, as Linux 6.12 x86_64 emits them in its VMCOREINFO ELF note (kernel/vmcore_info.c,
arch/x86/kernel/vmcore_info_64.c; the note's physical address and size are in A's
/sys/kernel/vmcoreinfo, which the daemon copies into the job)::

    OSRELEASE=6.12.117            PAGESIZE=4096
    SYMBOL(init_top_pgt)=ffffffff82a0a000      (hex, no 0x; kernel-image virtual address)
    NUMBER(phys_base)=0            NUMBER(pgtable_l5_enabled)=0|1   NUMBER(sme_mask)=0
    SYMBOL(vmemmap)=ffffea0000000000           (the struct page array: page of pfn N at
                                               vmemmap + N * SIZE(page))
    SIZE(page)=64   OFFSET(page._mapcount)=48  OFFSET(page.private)=40
    LENGTH(zone.free_area)=11                  (NR_PAGE_ORDERS: orders 0..10)
    NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-268435456   (PGTY_buddy << 24, an int printed with %ld)
    and, optional (for huge pages and the page-class histogram only):
    NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)=-201326592  (PGTY_hugetlb << 24)
    OFFSET(page.flags)=0  OFFSET(page._refcount)=52  OFFSET(page.compound_head)=8
    NUMBER(PG_head_mask)=64

A free block in 6.12: its first page's ``page_type`` (a union with ``_mapcount``) has
``PGTY_buddy`` (0xf0) in its top byte (include/linux/page-flags.h, PageBuddy) and its order in
``page->private`` (set_buddy_order). This module is stricter than PageBuddy: the whole 32-bit
word must equal PAGE_BUDDY_MAPCOUNT_VALUE (6.12 sets exactly that), the order must be below
LENGTH(zone.free_area), the block naturally aligned and inside the scanned memory. Pages on the
per-CPU lists, pages whose struct page cannot be read, and anything else count as NOT free.

The free folios of the huge page pool (vm.nr_hugepages; NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE),
``PGTY_hugetlb`` << 24) are free too: the folio's head has exactly that page_type, PG_head
in its flags (NUMBER(PG_head_mask)) and a refcount of 0 (OFFSET(page._refcount)); its first
tail's ``compound_head`` (OFFSET(page.compound_head)) is the head's struct page address + 1
and the low byte of that tail's flags is the folio's order (folio_order). A folio mapped by
a process or held in a hugetlbfs file has a reference and is saved. Such a free page holds
whatever its last user left (nothing zeroes the pool), and the kernel clears a huge page
when it hands it out again; the save kernel gives zeros for it like any free page.

The virtual addresses of the struct page array are translated by walking A's page tables from
init_top_pgt (4 or 5 levels; 1 GiB, 2 MiB and 4 KiB leaves). A table outside the memory the
caller allows, a reserved large-page bit, a buddy head inside another free block, a free page
that the scan itself read (a page table, a struct page, the note), or an absurd total raise
:class:`FreePageError`; the caller then saves every page. Stdlib only: this runs in B.
"""

from __future__ import annotations

import bisect
import logging
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from kjumpd.agent.devmem import normalize, subtract
from kjumpd.agent.pageclass import Layout, PageClasses
from kjumpd.errors import KjumpError
from kjumpd.image.memops import copy_into, zero_fill

log = logging.getLogger("kjumpd.agent.freepages")

PAGE = 4096
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # x86_64 __START_KERNEL_map
PTE_PRESENT = 1 << 0
PTE_PSE = 1 << 7
PTE_ADDR = 0x000F_FFFF_FFFF_F000  # physical address bits 12..51
MAX_FREE_FRACTION = 0.98  # more free than this is not believed
BATCH_PAGES = 16384  # struct pages read per batch (1 MiB at 64 B)
#: the page class histogram (pageclass) keeps a byte per page of A: not above 32 GiB, where
#: it would take B's memory that the save needs
CLASS_PAGES_MAX = 8 << 20
#: bytes a range of the free page map takes (Runs: two u64)
RUN_BYTES = 16
#: the share of B's free memory the free page map may take (1/MAP_SHARE): the save's own
#: working memory must fit beside it. Past it free blocks are left out of the map and saved
#: as data: a larger image instead of a save kernel killed for lack of memory
MAP_SHARE = 8
VMCOREINFO_NOTE_NAME = b"VMCOREINFO"
VMCOREINFO_MAX = 1 << 16

Reader = Callable[[int, int], bytes]
Range = tuple[int, int]


class FreePageError(KjumpError):
    """A's free pages cannot be determined safely; every page is saved instead."""


# --------------------------------------------------------------------------- VMCOREINFO


@dataclass(frozen=True)
class VmcoreInfo:
    """What the scan needs from A's VMCOREINFO (see the module docstring)."""

    osrelease: str
    page_size: int
    init_top_pgt: int  # virtual
    phys_base: int
    l5: bool
    vmemmap: int  # virtual address of the struct page of pfn 0
    page_struct_size: int  # SIZE(page)
    off_mapcount: int  # OFFSET(page._mapcount) (= page_type)
    off_private: int  # OFFSET(page.private) (= buddy order)
    buddy_value: int  # NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE) as an unsigned 32-bit word
    nr_orders: int  # LENGTH(zone.free_area)
    sme_mask: int = 0
    # for the page-class histogram only (pageclass.py); -1 when the note lacks them
    off_flags: int = -1
    off_refcount: int = -1
    off_mapping: int = -1
    off_compound_head: int = -1
    head_mask: int = -1
    #: NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE) as an unsigned 32-bit word; -1 when absent
    hugetlb_value: int = -1

    @property
    def top_table_phys(self) -> int:
        return self.init_top_pgt - START_KERNEL_MAP + self.phys_base


def parse_note(blob: bytes) -> str:
    """The text of the VMCOREINFO ELF note at the start of ``blob`` (Elf64_Nhdr: namesz,
    descsz, type, then the 4-byte padded name and descriptor)."""
    if len(blob) < 12:
        raise FreePageError("A's VMCOREINFO note is truncated", why=f"{len(blob)} bytes")
    namesz, descsz, _type = struct.unpack_from("<III", blob, 0)
    name_end = 12 + namesz
    desc_at = 12 + -(-namesz // 4) * 4
    if namesz == 0 or descsz == 0 or descsz > VMCOREINFO_MAX or desc_at + descsz > len(blob):
        raise FreePageError(
            "A's VMCOREINFO note header is not valid",
            why=f"namesz {namesz}, descsz {descsz}, {len(blob)} bytes",
            fix="the job's vmcoreinfo address must be A's /sys/kernel/vmcoreinfo",
        )
    if blob[12:name_end].rstrip(b"\0") != VMCOREINFO_NOTE_NAME:
        raise FreePageError(
            "the note at A's vmcoreinfo address is not VMCOREINFO",
            why=f"its name is {blob[12:name_end][:16]!r}",
        )
    return blob[desc_at : desc_at + descsz].decode("ascii", "replace")


def _number(text: str) -> int:
    t = text.strip()
    return int(t, 16) if t.lower().startswith(("0x", "-0x")) else int(t, 10)


def _optional(kv: dict[str, str], key: str, u32: bool = False) -> int:
    """The number under ``key``, or -1 when absent or not a number. ``u32``: a 32-bit word
    the kernel prints with %ld (PGTY_hugetlb << 24 comes out negative), as unsigned."""
    try:
        value = _number(kv[key]) if key in kv else None
    except ValueError:
        return -1
    if value is None:
        return -1
    return value & 0xFFFF_FFFF if u32 else value


def page_layout(info: VmcoreInfo) -> Layout | None:
    """The struct page fields the page-class histogram reads, or None when A's note lacks
    one or one is not plausible (the histogram is then left out, nothing else changes)."""
    sz = info.page_struct_size
    offs = (info.off_flags, info.off_refcount, info.off_mapping, info.off_compound_head)
    if (
        min(offs) < 0
        or info.off_flags > sz - 8
        or info.off_refcount > sz - 4
        or info.off_mapping > sz - 8
        or info.off_compound_head > sz - 8
        or info.head_mask <= 0
        or info.head_mask & (info.head_mask - 1)
        or info.head_mask >= 1 << 64
    ):
        return None
    return Layout(
        size=sz,
        flags=info.off_flags,
        refcount=info.off_refcount,
        mapping=info.off_mapping,
        compound_head=info.off_compound_head,
        mapcount=info.off_mapcount,
        head_mask=info.head_mask,
    )


def parse_vmcoreinfo(text: str) -> VmcoreInfo:
    """Parse the note text; FreePageError names a missing or malformed key."""
    kv: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            kv[k.strip()] = v.strip()

    def get(key: str, conv: Callable[[str], int]) -> int:
        if key not in kv:
            raise FreePageError(
                f"A's VMCOREINFO has no {key}",
                why="the main kernel is not the one this scan knows (6.12 x86_64)",
                fix="set free_page_exclusion = false",
            )
        try:
            return conv(kv[key])
        except ValueError:
            raise FreePageError(f"A's VMCOREINFO {key}={kv[key]!r} is not a number") from None

    hexa = lambda v: int(v, 16)  # noqa: E731 - SYMBOL() and KERNELOFFSET are %lx
    info = VmcoreInfo(
        osrelease=kv.get("OSRELEASE", ""),
        page_size=get("PAGESIZE", _number),
        init_top_pgt=get("SYMBOL(init_top_pgt)", hexa),
        phys_base=get("NUMBER(phys_base)", _number),
        l5=bool(get("NUMBER(pgtable_l5_enabled)", _number)),
        vmemmap=get("SYMBOL(vmemmap)", hexa),
        page_struct_size=get("SIZE(page)", _number),
        off_mapcount=get("OFFSET(page._mapcount)", _number),
        off_private=get("OFFSET(page.private)", _number),
        buddy_value=get("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)", _number) & 0xFFFF_FFFF,
        nr_orders=get("LENGTH(zone.free_area)", _number),
        sme_mask=get("NUMBER(sme_mask)", _number) if "NUMBER(sme_mask)" in kv else 0,
        off_flags=_optional(kv, "OFFSET(page.flags)"),
        off_refcount=_optional(kv, "OFFSET(page._refcount)"),
        off_mapping=_optional(kv, "OFFSET(page.mapping)"),
        off_compound_head=_optional(kv, "OFFSET(page.compound_head)"),
        head_mask=_optional(kv, "NUMBER(PG_head_mask)"),
        hugetlb_value=_optional(kv, "NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)", u32=True),
    )
    check_info(info)
    return info


def check_info(info: VmcoreInfo) -> None:
    """Refuse what this scan does not understand (never guess)."""
    if info.page_size != PAGE:
        raise FreePageError(f"A's page size is {info.page_size}, not {PAGE}")
    sz = info.page_struct_size
    if not (32 <= sz <= 256 and sz % 8 == 0):
        raise FreePageError(f"A's struct page is {sz} bytes: not plausible")
    if not (
        0 <= info.off_mapcount <= sz - 4
        and info.off_mapcount % 4 == 0
        and 0 <= info.off_private <= sz - 8
        and info.off_private % 8 == 0
    ):
        raise FreePageError(
            "A's struct page offsets are not plausible",
            why=f"_mapcount at {info.off_mapcount}, private at {info.off_private}, size {sz}",
        )
    if info.buddy_value & 0x00FF_FFFF or info.buddy_value >> 24 < 0x80:
        # 6.12 encodes page types as PGTY_* << 24; older kernels (~PG_buddy) are not handled
        raise FreePageError(
            "A's PAGE_BUDDY_MAPCOUNT_VALUE is not the 6.12 page-type encoding",
            why=f"{info.buddy_value:#x}",
            fix="set free_page_exclusion = false",
        )
    if not 1 <= info.nr_orders <= 16:
        raise FreePageError(f"A's LENGTH(zone.free_area)={info.nr_orders} is not plausible")
    if info.init_top_pgt < START_KERNEL_MAP or info.vmemmap < (1 << 63):
        raise FreePageError(
            "A's init_top_pgt or vmemmap is not a kernel address",
            why=f"{info.init_top_pgt:#x}, {info.vmemmap:#x}",
        )


def read_vmcoreinfo(read: Reader, phys: int, size: int) -> VmcoreInfo:
    if size <= 12 or size > VMCOREINFO_MAX:
        raise FreePageError(f"A's vmcoreinfo size {size} is not plausible")
    return parse_vmcoreinfo(parse_note(read(phys, size)))


# ---------------------------------------------------------------------------- ranges


class _RangeSet:
    """Sorted, merged [start, end) ranges with a containment test."""

    def __init__(self, ranges: Iterable[Range]) -> None:
        self.ranges = normalize(list(ranges))
        self._starts = [a for a, _ in self.ranges]

    def contains(self, phys: int, length: int) -> bool:
        i = bisect.bisect_right(self._starts, phys) - 1
        return i >= 0 and phys + length <= self.ranges[i][1]

    def overlaps(self, phys: int, length: int) -> bool:
        i = bisect.bisect_right(self._starts, phys + length - 1) - 1
        return i >= 0 and self.ranges[i][1] > phys


class Runs(Sequence[Range]):
    """Sorted, disjoint, non-touching [start, end) ranges in two arrays of u64.

    A fragmented machine's free memory is hundreds of thousands of blocks; as tuples of
    Python ints they would take ~160 bytes each out of B's jump area, here 16."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: array[int] = array("Q")
        self.ends: array[int] = array("Q")

    @classmethod
    def merged(cls, ranges: Iterable[Range]) -> Runs:
        out = cls()
        for a, b in sorted(ranges):
            out.add(a, b)
        return out

    def add(self, a: int, b: int) -> None:
        """Append [a, b), which must not start before the last range does."""
        if a >= b:
            return
        if self.ends and a <= self.ends[-1]:
            if a < self.starts[-1]:
                raise ValueError(f"range {a:#x} added after {self.starts[-1]:#x}")
            self.ends[-1] = max(self.ends[-1], b)
        else:
            self.starts.append(a)
            self.ends.append(b)

    def add_within(self, a: int, b: int, most: int) -> int:
        """``add`` [a, b) while holding at most ``most`` ranges: when full, the last range
        gives way to a longer one; else [a, b) is not kept. Returns the bytes left out (the
        range that gave way, or [a, b)); a range that extends the last one always fits."""
        if a >= b or (self.ends and a <= self.ends[-1]):
            self.add(a, b)
            return 0
        dropped = 0
        if len(self.starts) >= most and self.starts and self.ends[-1] - self.starts[-1] < b - a:
            dropped = self.ends.pop() - self.starts.pop()
        if len(self.starts) >= most:
            return b - a
        self.add(a, b)
        return dropped

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Range:  # type: ignore[override]
        return (self.starts[i], self.ends[i])

    def __iter__(self) -> Iterator[Range]:
        return zip(self.starts, self.ends)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Runs):
            return self.starts == other.starts and self.ends == other.ends
        if isinstance(other, Sequence):
            return len(other) == len(self) and all(tuple(o) == r for o, r in zip(other, self))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((bytes(self.starts), bytes(self.ends)))

    def __repr__(self) -> str:
        return f"Runs({list(self)!r})"


@dataclass(frozen=True)
class FreePageMap:
    """A's free memory: sorted, merged, page-aligned [start, end) ranges (``ranges``, a
    Sequence of (start, end) kept in two arrays of u64: 16 bytes a range)."""

    ranges: Sequence[Range] = ()
    scanned_bytes: int = 0  # memory whose struct pages were examined
    seconds: float = 0.0
    blocks: int = 0  # free blocks accepted: buddy heads and huge page folios
    #: free memory the map had no room for (``scan``'s ``max_runs``): saved as data
    unmapped_bytes: int = 0
    #: of the free memory, the free folios of the huge page pool
    hugetlb_bytes: int = 0
    classes: PageClasses | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        runs = self.ranges if isinstance(self.ranges, Runs) else Runs.merged(self.ranges)
        object.__setattr__(self, "ranges", runs)

    @property
    def _runs(self) -> Runs:
        assert isinstance(self.ranges, Runs)  # __post_init__
        return self.ranges

    @property
    def free_bytes(self) -> int:
        return sum(self._runs.ends) - sum(self._runs.starts)

    @property
    def free_pages(self) -> int:
        return self.free_bytes // PAGE

    def free_in(self, phys: int, length: int) -> list[Range]:
        """The free parts of [phys, phys + length), clipped, in order."""
        end = phys + length
        starts, ends = self._runs.starts, self._runs.ends
        lo = max(bisect.bisect_right(starts, phys) - 1, 0)
        hi = bisect.bisect_left(starts, end, lo)  # the runs that start before the end
        out = list(zip(starts[lo:hi], ends[lo:hi]))
        if out and out[0][1] <= phys:  # the run before ends before the range
            del out[0]
        if out:  # clipped to the range
            out[0] = (max(out[0][0], phys), out[0][1])
            out[-1] = (out[-1][0], min(out[-1][1], end))
        return out

    def is_free(self, phys: int) -> bool:
        return bool(self.free_in(phys, 1))


# ------------------------------------------------------------------------- page tables


class PageTables:
    """A's kernel page tables, walked from init_top_pgt through ``read``."""

    def __init__(self, info: VmcoreInfo, read: Reader, allowed: _RangeSet) -> None:
        self.read = read
        self.allowed = allowed
        self.shifts = (48, 39, 30, 21, 12) if info.l5 else (39, 30, 21, 12)
        self.addr_mask = PTE_ADDR & ~info.sme_mask
        self.top = info.top_table_phys
        self._tables: dict[int, bytes] = {}
        self.touched: set[int] = set()  # physical pages read while walking
        self._table(self.top)

    def _table(self, phys: int) -> bytes:
        t = self._tables.get(phys)
        if t is None:
            if phys % PAGE or not self.allowed.contains(phys, PAGE):
                raise FreePageError(
                    "A's page tables point outside A's memory", why=f"a table at {phys:#x}"
                )
            t = bytes(self.read(phys, PAGE))
            if len(t) != PAGE:
                raise FreePageError(f"short read of A's page table at {phys:#x}")
            self._tables[phys] = t
            self.touched.add(phys)
        return t

    def translate(self, va: int) -> tuple[int, int] | None:
        """(physical address, bytes left in the same leaf) for ``va``; None if unmapped."""
        table = self.top
        last = len(self.shifts) - 1
        for level, shift in enumerate(self.shifts):
            entry = struct.unpack_from("<Q", self._table(table), ((va >> shift) & 511) * 8)[0]
            if not entry & PTE_PRESENT:
                return None
            addr = entry & self.addr_mask
            size = 1 << shift
            if level == last or entry & PTE_PSE:
                if level < last and shift not in (30, 21):
                    raise FreePageError(
                        "A's page tables have a large page at a level that cannot hold one",
                        why=f"entry {entry:#x} for {va:#x}",
                    )
                if level < last and addr & (size - 1) & ~0x1000:  # bit 12 is PAT there
                    raise FreePageError(
                        "A's page tables have a misaligned large page",
                        why=f"entry {entry:#x} for {va:#x}",
                    )
                base = addr & ~(size - 1)
                off = va & (size - 1)
                return base + off, size - off
            table = addr
        return None  # not reached


# ------------------------------------------------------------------------------ scan

#: a huge page folio is 2^1 .. 2^18 pages (x86_64: 2 MiB and 1 GiB pools)
HUGETLB_ORDERS = range(1, 19)


def _hugetlb_word(info: VmcoreInfo) -> bytes | None:
    """The page_type word of a huge page folio's head, when the scan can tell its free ones
    (the note has the value and the struct page fields a folio's order is read from)."""
    v = info.hugetlb_value
    if v < 0 or v & 0x00FF_FFFF or v >> 24 < 0x80 or v == info.buddy_value:
        return None
    if page_layout(info) is None:
        return None
    return struct.pack("<I", v)


def _free_hugetlb_order(info: VmcoreInfo, buf: bytes, i: int, head: int, nxt: bytes) -> int:
    """The order of the free huge page folio whose head is struct page ``i`` of ``buf``
    (pfn ``head``), or -1. ``nxt`` is the struct page after it (its first tail).

    A folio in the pool is free when nothing holds a reference (6.12 keeps the pool's free
    folios at refcount 0; a folio mapped or in a hugetlbfs file's page cache holds one).
    The tail must name this head (its compound_head is the head's address + 1), which also
    refuses the copies of a head that the vmemmap optimisation maps over the tails'
    struct pages; its flags' low byte is the order (folio_order)."""
    sz = info.page_struct_size
    o = i * sz
    if struct.unpack_from("<I", buf, o + info.off_refcount)[0] != 0:
        return -1
    if not struct.unpack_from("<Q", buf, o + info.off_flags)[0] & info.head_mask:
        return -1
    tail_flags = struct.unpack_from("<Q", nxt, info.off_flags)[0]
    tail_head = struct.unpack_from("<Q", nxt, info.off_compound_head)[0]
    if tail_head != info.vmemmap + head * sz + 1:
        return -1
    order = tail_flags & 0xFF
    if order not in HUGETLB_ORDERS or head % (1 << order):
        return -1
    return order


def max_runs_for(mem_available: int) -> int | None:
    """The most ranges the free page map may hold in a save kernel with ``mem_available``
    bytes free (None: unknown, no bound)."""
    return max(2, mem_available // MAP_SHARE // RUN_BYTES) if mem_available > 0 else None


def scan(
    info: VmcoreInfo,
    read: Reader,
    ranges: Sequence[Range],
    exclude: Sequence[Range] = (),
    trusted: Sequence[Range] | None = None,
    note: Range | None = None,
    max_runs: int | None = None,
    advanced: Callable[[], None] | None = None,
    hugetlb: bool = True,
) -> FreePageMap:
    """A's free pages within ``ranges`` minus ``exclude`` (e.g. B's own memory).

    ``trusted`` is where A's page tables and struct pages may lie (default: ``ranges`` minus
    ``exclude``). Raises FreePageError when anything is inconsistent.

    With ``max_runs``, the map never holds more ranges than that: once full, a free block
    is kept only in place of a shorter last range (``Runs.add_within``), so the map keeps
    the blocks found first and the longer ones after. What it leaves out is counted in
    ``unmapped_bytes``. ``advanced`` is called after each batch of struct pages (a
    watchdog's progress: a large machine's scan takes many seconds).

    With ``hugetlb``, the free folios of A's huge page pool (vm.nr_hugepages) count as free
    too (``hugetlb_bytes``): they hold whatever their last user left, and the kernel clears
    a huge page when it next hands it out."""
    t0 = time.monotonic()
    scanned = subtract([(a - a % PAGE, b - b % PAGE) for a, b in ranges], exclude)
    allowed = _RangeSet(trusted if trusted is not None else scanned)
    inside = _RangeSet(scanned)
    tables = PageTables(info, read, allowed)
    sz = info.page_struct_size
    top_at = info.off_mapcount + 3  # little-endian top byte of page_type
    top_byte = bytes([info.buddy_value >> 24])
    want = struct.pack("<I", info.buddy_value)
    huge_word = _hugetlb_word(info) if hugetlb else None
    huge_top = huge_word[3:] if huge_word is not None else None
    huge_bytes = 0
    free = Runs()
    most = max_runs if max_runs is not None else 1 << 62
    unmapped = 0
    last = (0, 0)  # the last free block found, kept in the map or not
    read_runs: list[Range] = []  # where A's struct pages were read (one run per leaf)
    blocks = 0
    layout = page_layout(info)
    span = scanned[-1][1] // PAGE - scanned[0][0] // PAGE if scanned else 0
    classes = (
        PageClasses(layout, scanned[0][0] // PAGE, scanned[-1][1] // PAGE)
        if layout is not None and 0 < span <= CLASS_PAGES_MAX
        else None
    )
    if span > CLASS_PAGES_MAX:
        log.info("pages by class: not kept for %d GiB of A's memory", span * PAGE >> 30)
    for start, end in scanned:
        pfn = start // PAGE
        last_pfn = end // PAGE
        while pfn < last_pfn:
            n = min(BATCH_PAGES, last_pfn - pfn)
            buf = _read_struct_pages(
                tables, read, info.vmemmap + pfn * sz, n * sz, allowed, read_runs
            )
            if classes is not None:
                classes = _classify(classes, pfn, buf, n)
            tops = buf[top_at::sz]
            # free buddy heads and huge page folio heads, in the order of their pfns
            bi = tops.find(top_byte)
            hi = tops.find(huge_top) if huge_top is not None else -1
            while bi >= 0 or hi >= 0:
                huge = hi >= 0 and (bi < 0 or hi < bi)
                i = hi if huge else bi
                o = i * sz
                word = buf[o + info.off_mapcount : o + info.off_mapcount + 4]
                head = pfn + i
                if huge:
                    assert huge_top is not None  # hi >= 0
                    hi = tops.find(huge_top, i + 1)
                    if word != huge_word or head * PAGE < last[1]:
                        continue  # in a folio already taken: the copies of its head
                    if head + 1 >= last_pfn:
                        continue  # its tail lies outside the memory scanned
                    nxt = buf[o + sz : o + 2 * sz] or _read_struct_pages(
                        tables, read, info.vmemmap + (head + 1) * sz, sz, allowed, read_runs
                    )
                    order = _free_hugetlb_order(info, buf, i, head, nxt)
                    if order < 0:
                        continue
                else:
                    bi = tops.find(top_byte, i + 1)
                    if word != want:
                        continue
                    order = struct.unpack_from("<Q", buf, o + info.off_private)[0]
                    if order >= info.nr_orders or head % (1 << order):
                        continue
                a, b = head * PAGE, (head + (1 << order)) * PAGE
                if not inside.contains(a, b - a):
                    continue
                if a < last[1]:
                    raise FreePageError(
                        "a free block of A starts inside another one",
                        why=f"pfn {head:#x} (order {order}) within [{last[0]:#x}, {last[1]:#x})",
                    )
                last = (a, b)
                left_out = free.add_within(a, b, most)
                if left_out and not unmapped:
                    log.info("free page map full at %d ranges", most)
                unmapped += left_out
                blocks += 1
                if huge:
                    huge_bytes += b - a - left_out
            pfn += n
            if advanced is not None:
                advanced()
    fmap = FreePageMap(
        free,
        scanned_bytes=sum(b - a for a, b in scanned),
        seconds=time.monotonic() - t0,
        blocks=blocks,
        unmapped_bytes=unmapped,
        hugetlb_bytes=huge_bytes,
        classes=classes,
    )
    used = [(p, p + PAGE) for p in tables.touched] + read_runs
    if note is not None:
        used.append((note[0] - note[0] % PAGE, -(-(note[0] + note[1]) // PAGE) * PAGE))
    claimed = [r for a, b in normalize(used) for r in fmap.free_in(a, b - a)]
    if claimed:
        raise FreePageError(
            "A's allocator calls pages free that the scan just read as in use",
            why=f"{sum(b - a for a, b in claimed) // PAGE} page(s), first {claimed[0][0]:#x} "
            "(a page table, a struct page or the VMCOREINFO note)",
        )
    if fmap.scanned_bytes and fmap.free_bytes > MAX_FREE_FRACTION * fmap.scanned_bytes:
        raise FreePageError(
            "A's allocator claims an absurd amount of free memory",
            why=f"{fmap.free_bytes >> 20} of {fmap.scanned_bytes >> 20} MiB",
        )
    if classes is not None:
        classes.mark_free(fmap.ranges)
    return fmap


def _classify(classes: PageClasses, pfn: int, buf: bytes, n: int) -> PageClasses | None:
    """Feed a batch to the histogram; a failure there costs the histogram, not the scan."""
    try:
        classes.add_batch(pfn, buf, n)
        return classes
    except Exception as e:  # noqa: BLE001 - a diagnostic must never stop the exclusion
        log.warning("page classes left out: %s: %s", type(e).__name__, e)
        return None


def _read_struct_pages(
    tables: PageTables, read: Reader, va: int, length: int, allowed: _RangeSet, runs: list[Range]
) -> bytes:
    """The struct pages at [va, va + length); unmapped parts read as zeros (no page type)."""
    buf = bytearray(length)
    pos = 0
    while pos < length:
        t = tables.translate(va + pos)
        if t is None:
            pos += PAGE - (va + pos) % PAGE  # an unmapped 4 KiB: zeros = not free
            continue
        phys, left = t
        n = min(left, length - pos)
        if not allowed.contains(phys, n):
            raise FreePageError(
                "A's struct pages map outside A's memory", why=f"{va + pos:#x} -> {phys:#x}"
            )
        data = read(phys, n)
        if len(data) != n:
            raise FreePageError(f"short read of A's struct pages at {phys:#x}")
        buf[pos : pos + n] = data
        runs.append((phys - phys % PAGE, -(-(phys + n) // PAGE) * PAGE))
        pos += n
    return bytes(buf)


# --------------------------------------------------------------------------- sources


class FreeMaskedSource:
    """A MemorySource that hands zeros for A's free pages without reading them.

    ``restore_zeros`` (save.MemorySource): True when A expects its free pages to hold zeros
    (init_on_free), so a wholly free chunk is an all-zero record; False: a free record, which
    the restore leaves as it finds it."""

    def __init__(self, source: object, freemap: FreePageMap, restore_zeros: bool = True) -> None:
        self.source = source
        self.freemap = freemap
        self.restore_zeros = restore_zeros
        self.classes = freemap.classes  # counts what is read, by class (a diagnostic)
        self.skipped_bytes = 0
        # the copies run in several workers at once when the source allows it; the
        # counters above are taken one caller at a time
        self.concurrent_reads = bool(getattr(source, "concurrent_reads", False))
        self._counting = threading.Lock()
        self._zeros = memoryview(b"")  # read-only zeros the free pieces are sliced from

    def _pieces(self, phys: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, free) pieces covering the request."""
        out: list[tuple[int, int, bool]] = []
        cur = phys
        for a, b in self.freemap.free_in(phys, length):
            if a > cur:
                out.append((cur - phys, a - cur, False))
            out.append((a - phys, b - a, True))
            cur = b
        if cur < phys + length:
            out.append((cur - phys, phys + length - cur, False))
        return out

    def known_zero(self, phys: int, length: int) -> bool:
        """True when all of [phys, phys+length) is free: the pipeline then stores an all-zero
        chunk without reading (or zero-filling and scanning) anything."""
        if self.freemap.free_in(phys, length) == [(phys, phys + length)]:
            with self._counting:
                self.skipped_bytes += length
            return True
        return False

    def read(self, phys: int, length: int) -> bytes:
        pieces = self._pieces(phys, length)
        if len(pieces) == 1 and not pieces[0][2]:
            data = self.source.read(phys, length)  # type: ignore[attr-defined]
            self._note(phys, data)
            return data
        buf = bytearray(length)
        self.readinto(phys, memoryview(buf))
        return bytes(buf)

    def view(self, phys: int, length: int) -> memoryview | None:
        """The source's view of a range without free pages (None otherwise, or when the
        source has no views): the save encodes it in place."""
        inner = getattr(self.source, "view", None)
        if inner is None:
            return None
        if self.freemap.free_in(phys, length):
            return None
        got: memoryview | None = inner(phys, length)
        if got is not None:
            self._note(phys, got)
        return got

    def readinto(self, phys: int, buf: memoryview | bytearray) -> None:
        view = memoryview(buf).cast("B")
        inner = getattr(self.source, "view", None)
        whole = inner(phys, len(view)) if inner is not None else None
        if whole is not None:
            self._assemble(phys, view, whole)
            return
        sub_readinto = getattr(self.source, "readinto", None)
        for off, n, is_free in self._pieces(phys, len(view)):
            part = view[off : off + n]
            if is_free:
                zero_fill(part)
                with self._counting:
                    self.skipped_bytes += n
            else:
                if sub_readinto is not None:
                    sub_readinto(phys + off, part)
                else:
                    part[:] = self.source.read(phys + off, n)  # type: ignore[attr-defined]
                self._note(phys + off, part)

    def _assemble(self, phys: int, out: memoryview, whole: memoryview) -> None:
        """``out`` = the used pages of ``whole`` (a view of A's range at ``phys``) with zeros
        for the free ones. A's free memory fragmented into single pages (weeks of uptime)
        makes hundreds of pieces a chunk: each costs one slice here, not a read, a copy
        and a histogram note."""
        length = len(out)
        if len(self._zeros) < length:
            self._zeros = memoryview(bytes(length))
        zeros = self._zeros
        parts: list[memoryview] = []
        cur = skipped = 0
        for a, b in self.freemap.free_in(phys, length):
            a, b = a - phys, b - phys
            if a > cur:
                parts.append(whole[cur:a])
            parts.append(zeros[: b - a])
            skipped += b - a
            cur = b
        if cur < length:
            parts.append(whole[cur:length])
        copy_into(out, memoryview(b"".join(parts)))
        with self._counting:
            self.skipped_bytes += skipped
        self._note(phys, out)  # the histogram leaves the free pages out

    def _note(self, phys: int, data: object) -> None:
        with self._counting:
            if self.classes is None:
                return
            try:
                self.classes.note_read(phys, data)  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001 - a diagnostic must never stop the save
                log.warning("page classes left out: %s: %s", type(e).__name__, e)
                self.classes = None

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> FreeMaskedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ZeroCheck:
    pages: int  # free pages checked
    nonzero_pages: int
    first_nonzero: int | None  # physical address
    seconds: float

    @property
    def passed(self) -> bool:
        return self.nonzero_pages == 0


def check_free_pages_zero(
    read: Reader,
    freemap: FreePageMap,
    step: int = 1 << 20,
    advanced: Callable[[], None] | None = None,
) -> ZeroCheck:
    """Debug check (init_on_free=1 in A): every page called free must read as all zero.
    ``advanced`` is called after each ``step`` bytes read: on a large machine the check
    reads gigabytes, longer than the save kernel's watchdog waits for progress."""
    t0 = time.monotonic()
    zeros = bytes(step)
    zpage = bytes(PAGE)
    bad = 0
    first: int | None = None
    for a, b in freemap.ranges:
        at = a
        while at < b:
            n = min(step, b - at)
            data = read(at, n)
            if data != zeros[:n]:
                for off in range(0, n, PAGE):
                    if data[off : off + PAGE] != zpage:
                        bad += 1
                        if first is None:
                            first = at + off
            at += n
            if advanced is not None:
                advanced()
    return ZeroCheck(freemap.free_pages, bad, first, time.monotonic() - t0)
