"""What the save kernel reads of A, by kind of page: a diagnostic, never a decision.

B already reads every struct page of A's memory to find the free pages (freepages.scan). This
module sorts the same struct pages into a few classes and, as the save reads the pages that
are not free, counts the zero pages of each class. B prints the result after SAVED::

    pages read by class (MiB, zero/non-zero): anon 201/0, file 75/0, slab 17/0, ...

Nothing here decides what is saved: a class is only a label, so an unknown layout or a bug
costs the histogram, never a page.

Classes, from the fields of A's struct page (Linux 6.12 x86_64, offsets from VMCOREINFO;
PG_reserved is not in VMCOREINFO: bit 13 of page->flags in 6.12's enum pageflags):

    free        in a buddy free block (freepages.FreePageMap; not read, stored as zeros)
    anon        page->mapping has PAGE_MAPPING_ANON (process memory, KSM)
    file        page->mapping set otherwise (page cache, shmem/tmpfs)
    slab        page type PGTY_slab (0xf5)
    page table  page type PGTY_table (0xf2)
    typed       another page type (0xf0-0xf7: offline, guard, hugetlb, zsmalloc, unaccepted)
    reserved    PG_reserved: the kernel image, memblock allocations (struct pages, ...),
                and kexec's copies of a loaded kernel's segments (kimage_alloc_pages)
    refcount 0  not free, no mapping, refcount 0: pages on the per-CPU free lists, the
                pages after the first of a non-compound high-order allocation
    kernel      anything else with a reference: vmalloc, kernel stacks, large kmalloc, ...
    unscanned   pages whose struct page was not examined (B's own low memory)
Tail pages of a compound page (compound_head bit 0) take the class of their head (the folio
order is the low byte of the first tail's flags, folio->_flags_1).
"""

from __future__ import annotations

from dataclasses import dataclass

from kjumpd.image.chunk import find_zero_pages

PAGE = 4096
PG_RESERVED = 13  # 6.12 enum pageflags (not exported in VMCOREINFO)

FREE, ANON, FILE, SLAB, TABLE, TYPED, RESERVED, REF0, KERNEL, TAIL = range(10)
UNSCANNED = 255
NAMES = {
    FREE: "free",
    ANON: "anon",
    FILE: "file",
    SLAB: "slab",
    TABLE: "page table",
    TYPED: "typed",
    RESERVED: "reserved",
    REF0: "refcount 0",
    KERNEL: "kernel",
    UNSCANNED: "unscanned",
}
ORDER = (ANON, FILE, SLAB, TABLE, TYPED, RESERVED, REF0, KERNEL, UNSCANNED)

# bits of the per-page key built from the struct page columns
_K_SLAB, _K_TABLE, _K_TYPED = 1, 2, 3  # two bits: the page type
_K_RES, _K_ANON, _K_MAPPED, _K_REF0, _K_TAIL = 4, 8, 16, 32, 64


def _table(fn: object) -> bytes:
    return bytes(fn(v) for v in range(256))  # type: ignore[operator]


def _type_key(v: int) -> int:
    if v == 0xF5:
        return _K_SLAB
    if v == 0xF2:
        return _K_TABLE
    return _K_TYPED if 0xF0 <= v <= 0xF7 else 0


def _class_of(key: int) -> int:
    if key & _K_TAIL:
        return TAIL
    t = key & 3
    if t:
        return {_K_SLAB: SLAB, _K_TABLE: TABLE, _K_TYPED: TYPED}[t]
    if key & _K_RES:
        return RESERVED
    if key & _K_ANON:
        return ANON
    if key & _K_MAPPED:
        return FILE
    if key & _K_REF0:
        return REF0
    return KERNEL


_T_TYPE = _table(_type_key)
_T_NONZERO_MAPPED = _table(lambda v: _K_MAPPED if v else 0)
_T_ANON = _table(lambda v: _K_ANON if v & 1 else 0)
_T_REF0 = _table(lambda v: 0 if v else _K_REF0)
_T_TAIL = _table(lambda v: _K_TAIL if v & 1 else 0)
_T_CLASS = _table(_class_of)


@dataclass(frozen=True)
class Layout:
    """Where the fields are in A's struct page (bytes), from VMCOREINFO."""

    size: int
    flags: int
    refcount: int
    mapping: int
    compound_head: int
    mapcount: int
    head_mask: int  # NUMBER(PG_head_mask)


@dataclass(frozen=True)
class ClassRow:
    name: str
    pages: int  # pages of this class read by the save (free: left out)
    zero_pages: int  # of them, all zero


def zero_pages(data: memoryview | bytes | bytearray) -> list[int]:
    """Indices of the all-zero whole pages of ``data``."""
    mv = memoryview(data).cast("B")
    return find_zero_pages(mv, len(mv) - len(mv) % PAGE)


class PageClasses:
    """One class byte per page frame of A between ``first_pfn`` and ``end_pfn``."""

    def __init__(self, layout: Layout, first_pfn: int, end_pfn: int) -> None:
        self.layout = layout
        self.base = first_pfn
        self.cls = bytearray([UNSCANNED]) * max(end_pfn - first_pfn, 0)
        self.read = [0] * 256
        self.zero = [0] * 256
        self.free_pages = 0
        self.zero_runs: list[list[int]] = []  # [class, first pfn, end pfn) of zeros
        self._carry: tuple[int, int] | None = None  # (class, end pfn) of a folio going on

    # ---------------------------------------------------------------- struct pages
    def add_batch(self, pfn: int, buf: bytes, n: int) -> None:
        """Classify the ``n`` struct pages in ``buf`` (pfn ``pfn`` onwards)."""
        lo = self.layout
        sz = lo.size

        def col(off: int) -> bytes:
            return buf[off : off + n * sz : sz]

        def as_int(b: bytes) -> int:
            return int.from_bytes(b, "little")

        key = as_int(col(lo.mapcount + 3).translate(_T_TYPE))
        res_byte, res_bit = divmod(PG_RESERVED, 8)
        key |= as_int(
            col(lo.flags + res_byte).translate(_table(lambda v: _K_RES if v >> res_bit & 1 else 0))
        )
        mapping = 0
        for k in range(8):
            mapping |= as_int(col(lo.mapping + k))
        key |= as_int(mapping.to_bytes(n, "little").translate(_T_NONZERO_MAPPED))
        key |= as_int(col(lo.mapping).translate(_T_ANON))
        ref = 0
        for k in range(4):
            ref |= as_int(col(lo.refcount + k))
        key |= as_int(ref.to_bytes(n, "little").translate(_T_REF0))
        key |= as_int(col(lo.compound_head).translate(_T_TAIL))
        cls = bytearray(key.to_bytes(n, "little").translate(_T_CLASS))
        # a folio that began in the previous batch
        if self._carry is not None:
            c, end = self._carry
            upto = min(end, pfn + n) - pfn
            for i in range(max(upto, 0)):
                if cls[i] == TAIL:
                    cls[i] = c
            self._carry = None if end <= pfn + n else self._carry
        # heads give their class to their tails
        hbyte, hbit = divmod(lo.head_mask.bit_length() - 1, 8)
        heads = col(lo.flags + hbyte).translate(_table(lambda v: 1 if v >> hbit & 1 else 0))
        i = heads.find(1)
        while i >= 0:
            if i + 1 < n:
                order = buf[(i + 1) * sz + lo.flags]
                end = i + (1 << order)
                c = cls[i]
                stop = min(end, n)
                if stop > i + 1:
                    seg = cls[i + 1 : stop]
                    cls[i + 1 : stop] = seg.replace(bytes([TAIL]), bytes([c]))
                if end > n:
                    self._carry = (c, pfn + end)
            i = heads.find(1, i + 1)
        cls = cls.replace(bytes([TAIL]), bytes([KERNEL]))  # tails whose head was not seen
        at = pfn - self.base
        self.cls[at : at + n] = cls

    def mark_free(self, ranges: tuple[tuple[int, int], ...]) -> None:
        for a, b in ranges:
            s, e = a // PAGE - self.base, b // PAGE - self.base
            self.cls[s:e] = bytes([FREE]) * (e - s)
            self.free_pages += e - s

    # ---------------------------------------------------------------- pages read
    def note_read(self, phys: int, data: memoryview | bytes | bytearray) -> None:
        """The save read ``data`` at ``phys``: count its pages and zero pages by class.
        Free pages in ``data`` (zeros the save put there, not A's bytes) are left out."""
        first = phys // PAGE - self.base
        npages = -(-len(data) // PAGE)
        view = self.cls[first : first + npages] if first >= 0 else b""
        if len(view) < npages:  # outside the classified span
            view = bytes(view) + bytes([UNSCANNED]) * (npages - len(view))
        for c in set(view):
            if c != FREE:
                self.read[c] += view.count(c)
        pfn0 = phys // PAGE
        runs = self.zero_runs
        for i in zero_pages(data):
            c = view[i]
            if c == FREE:
                continue
            self.zero[c] += 1
            if runs and runs[-1][0] == c and runs[-1][2] == pfn0 + i:
                runs[-1][2] += 1
            else:
                runs.append([c, pfn0 + i, pfn0 + i + 1])

    # ---------------------------------------------------------------- report
    def rows(self) -> list[ClassRow]:
        out = [ClassRow(NAMES[FREE], self.free_pages, self.free_pages)]
        for c in ORDER:
            if self.read[c]:
                out.append(ClassRow(NAMES[c], self.read[c], self.zero[c]))
        return out

    def summary(self) -> str:
        """One line: MiB per class, zero/non-zero (free pages are not read)."""
        mib = lambda pages: pages * PAGE / (1 << 20)  # noqa: E731
        parts = []
        for r in self.rows():
            if r.name == NAMES[FREE]:
                parts.append(f"free {mib(r.pages):.0f} (not read)")
            else:
                parts.append(f"{r.name} {mib(r.zero_pages):.0f}/{mib(r.pages - r.zero_pages):.0f}")
        return "pages by class, MiB zero/non-zero: " + ", ".join(parts)

    def largest_zero_runs(self, count: int = 3) -> str:
        """The longest runs of zero pages read (where the zeros are), on one line."""
        runs = sorted(self.zero_runs, key=lambda r: r[1] - r[2])[:count]
        return "largest zero runs read: " + (
            ", ".join(
                f"{NAMES.get(c, c)} [{a * PAGE:#x}, {b * PAGE:#x}) "
                f"{(b - a) * PAGE / (1 << 20):.1f} MiB"
                for c, a, b in runs
            )
            or "none"
        )

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {r.name: {"pages": r.pages, "zero_pages": r.zero_pages} for r in self.rows()}
