"""kjumpd.agent.freepages against a synthetic main-kernel memory image: page tables built here
(4 and 5 levels; 4 KiB, 2 MiB and 1 GiB leaves), a vmemmap of fake struct pages, buddy heads
of several orders, pages that only look free, and corruptions that must make the scan refuse."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kjumpd.agent import freepages as fp
from kjumpd.errors import KjumpError

PAGE = 4096
KMAP = fp.START_KERNEL_MAP
VMEMMAP_BASE = 0xFFFF_EA00_0000_0000
RAM = [(0x100000, 0x4000000)]  # A's RAM: 1 MiB .. 64 MiB
TABLES = 0x1000000  # page-table pool
STRUCTS = 0x2000000  # struct pages (1 MiB for 16384 pfns)
NOTE = 0x1800000
SZ, OFF_PRIVATE, OFF_MAPCOUNT = 64, 40, 48
BUDDY = 0xF0 << 24
NR_ORDERS = 11
ALLOCATED = 0xFFFF_FFFF  # page_type/_mapcount of an ordinary page (-1)
HUGETLB = 0xF4 << 24
OFF_FLAGS, OFF_HEAD, OFF_REFCOUNT, PG_HEAD = 0, 8, 52, 64


class FakeA:
    """A's physical memory (sparse pages) with kernel page tables mapping the vmemmap."""

    def __init__(self, l5: bool = False, leaf: int = PAGE, phys_base: int = 0) -> None:
        self.mem: dict[int, bytearray] = {}
        self.reads: list[tuple[int, int]] = []
        self.l5 = l5
        self.phys_base = phys_base
        self.shifts = (48, 39, 30, 21, 12) if l5 else (39, 30, 21, 12)
        self.next_table = TABLES
        self.top = self.alloc_table()
        self.maps: list[tuple[int, int, int]] = []
        npfn = RAM[-1][1] // PAGE
        if leaf == 1 << 30:  # one 1 GiB page at phys 0; vmemmap sits STRUCTS into it
            self.vmemmap = VMEMMAP_BASE + STRUCTS
            self.map(VMEMMAP_BASE, 0, 1 << 30)
        elif leaf == 2 << 20:
            self.vmemmap = VMEMMAP_BASE
            self.map(VMEMMAP_BASE, STRUCTS, 2 << 20)
        else:  # 4 KiB pages, in reverse physical order (not contiguous)
            self.vmemmap = VMEMMAP_BASE
            n = npfn * SZ // PAGE
            for i in range(n):
                self.map(VMEMMAP_BASE + i * PAGE, STRUCTS + (n - 1 - i) * PAGE, PAGE)
        for pfn in range(npfn):
            self.set_page(pfn, ALLOCATED, 0)
        self.write(NOTE, note_bytes(vmcoreinfo_text(self)))

    # -- memory
    def write(self, phys: int, data: bytes) -> None:
        for i, b in enumerate(data):
            p = phys + i
            self.mem.setdefault(p - p % PAGE, bytearray(PAGE))[p % PAGE] = b

    def read(self, phys: int, length: int) -> bytes:
        self.reads.append((phys, length))
        out = bytearray()
        p = phys
        while p < phys + length:
            page = p - p % PAGE
            n = min(PAGE - p % PAGE, phys + length - p)
            src = self.mem.get(page)
            out += src[p % PAGE : p % PAGE + n] if src is not None else bytes(n)
            p += n
        return bytes(out)

    def u64(self, phys: int, value: int) -> None:
        self.mem.setdefault(phys - phys % PAGE, bytearray(PAGE))
        struct.pack_into("<Q", self.mem[phys - phys % PAGE], phys % PAGE, value)

    # -- page tables
    def alloc_table(self) -> int:
        p = self.next_table
        self.next_table += PAGE
        self.mem[p] = bytearray(PAGE)
        return p

    def entry_addr(self, va: int, level: int) -> int:
        """Physical address of the entry for ``va`` at ``level`` (0 = top)."""
        table = self.top
        for lv, shift in enumerate(self.shifts):
            at = table + ((va >> shift) & 511) * 8
            if lv == level:
                return at
            table = struct.unpack_from("<Q", self.mem[table], at % PAGE)[0] & fp.PTE_ADDR
        raise AssertionError("no such level")

    def map(self, va: int, phys: int, size: int) -> None:
        table = self.top
        for shift in self.shifts:
            idx = (va >> shift) & 511
            at = table + idx * 8
            if 1 << shift == size:
                flags = 0x63 | (fp.PTE_PSE if size > PAGE else 0)
                self.u64(at, phys | flags)
                self.maps.append((va, phys, size))
                return
            entry = struct.unpack_from("<Q", self.mem[table], idx * 8)[0]
            if not entry & 1:
                nxt = self.alloc_table()
                self.u64(at, nxt | 0x63)
                table = nxt
            else:
                table = entry & fp.PTE_ADDR

    def v2p(self, va: int) -> int:
        for v, p, size in self.maps:
            if v <= va < v + size:
                return p + va - v
        raise AssertionError(f"{va:#x} unmapped")

    # -- struct pages
    def set_page(self, pfn: int, page_type: int, private: int) -> None:
        self.field(pfn, OFF_PRIVATE, "<Q", private)
        self.field(pfn, OFF_MAPCOUNT, "<I", page_type)

    def free_block(self, pfn: int, order: int) -> None:
        self.set_page(pfn, BUDDY, order)

    def field(self, pfn: int, off: int, fmt: str, value: int) -> None:
        phys = self.v2p(self.vmemmap + pfn * SZ)
        struct.pack_into(
            fmt, self.mem.setdefault(phys - phys % PAGE, bytearray(PAGE)), phys % PAGE + off, value
        )

    def huge_folio(self, pfn: int, order: int = 9, refcount: int = 0) -> None:
        """A huge page pool folio as 6.12 lays it out: the head typed hugetlb with PG_head,
        its first tail naming the head and holding the order."""
        self.set_page(pfn, HUGETLB, 0)
        self.field(pfn, OFF_FLAGS, "<Q", PG_HEAD)
        self.field(pfn, OFF_REFCOUNT, "<I", refcount)
        self.field(pfn + 1, OFF_FLAGS, "<Q", order)
        self.field(pfn + 1, OFF_HEAD, "<Q", self.vmemmap + pfn * SZ + 1)

    @property
    def info(self) -> fp.VmcoreInfo:
        return fp.read_vmcoreinfo(self.read, NOTE, 2048)


def vmcoreinfo_text(a: FakeA, **override: str) -> str:
    keys = {
        "OSRELEASE": "6.12.117",
        "PAGESIZE": "4096",
        "SYMBOL(init_top_pgt)": f"{a.top - a.phys_base + KMAP:x}",
        "NUMBER(phys_base)": str(a.phys_base),
        "NUMBER(pgtable_l5_enabled)": str(int(a.l5)),
        "SYMBOL(vmemmap)": f"{a.vmemmap:x}",
        "SIZE(page)": str(SZ),
        "OFFSET(page.flags)": "0",
        "OFFSET(page._mapcount)": str(OFF_MAPCOUNT),
        "OFFSET(page.private)": str(OFF_PRIVATE),
        "LENGTH(zone.free_area)": str(NR_ORDERS),
        "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)": str(BUDDY),
        "NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)": str(HUGETLB - (1 << 32)),  # %ld of an int
        "NUMBER(sme_mask)": "0",
        "KERNELOFFSET": "0",
        "NUMBER(VMALLOC_START)": "0xffffc90000000000",
        "OFFSET(page._refcount)": "52",
        "OFFSET(page.mapping)": "24",
        "OFFSET(page.compound_head)": "8",
        "NUMBER(PG_head_mask)": "64",
    }
    keys.update(override)
    return "".join(f"{k}={v}\n" for k, v in keys.items() if v != "")


def note_bytes(text: str, name: bytes = b"VMCOREINFO") -> bytes:
    desc = text.encode()
    nm = name + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(nm), len(desc), 0) + pad(nm) + pad(desc) + bytes(12)


def build(l5: bool = False, leaf: int = PAGE, phys_base: int = 0) -> FakeA:
    a = FakeA(l5=l5, leaf=leaf, phys_base=phys_base)
    a.free_block(0x800, 0)  # 4 KiB
    a.free_block(0x808, 3)  # 32 KiB
    a.free_block(0x2C00, 10)  # 4 MiB, the largest order
    a.set_page(0x900, 0xF5 << 24, 0)  # slab: not free
    a.set_page(0x901, BUDDY | 1, 0)  # buddy's top byte but other low bits: not trusted
    a.free_block(0x902, NR_ORDERS)  # order out of range: not free
    a.free_block(0x903, 1)  # misaligned for its order: not free
    a.set_page(0x904, 0x0000_0001, 0)  # mapped once: not free
    return a


EXPECTED = [(0x800000, 0x801000), (0x808000, 0x810000), (0x2C00000, 0x3000000)]
LAYOUTS = [
    (False, PAGE),
    (False, 2 << 20),
    (False, 1 << 30),
    (True, PAGE),
    (True, 2 << 20),
    (True, 1 << 30),
]


# ------------------------------------------------------------------------------ parsing


def test_vmcoreinfo_note_is_parsed_as_linux_6_12_emits_it() -> None:
    a = FakeA()
    info = a.info
    assert info.osrelease == "6.12.117" and info.page_size == PAGE
    assert info.top_table_phys == a.top and info.vmemmap == a.vmemmap
    assert (info.page_struct_size, info.off_mapcount, info.off_private) == (64, 48, 40)
    assert info.buddy_value == 0xF0000000 and info.nr_orders == 11 and not info.l5


@pytest.mark.parametrize(
    "override, words",
    [
        ({"PAGESIZE": "16384"}, "page size"),
        ({"SYMBOL(init_top_pgt)": ""}, "init_top_pgt"),
        ({"LENGTH(zone.free_area)": ""}, "LENGTH(zone.free_area)"),
        ({"NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)": "-129"}, "encoding"),  # pre-6.9 ~PG_buddy
        ({"SIZE(page)": "12"}, "struct page"),
        ({"OFFSET(page.private)": "x"}, "not a number"),
        ({"NUMBER(sme_mask)": "0x"}, "NUMBER(sme_mask)='0x' is not a number"),
    ],
)
def test_vmcoreinfo_this_scan_does_not_understand_is_refused(override: dict, words: str) -> None:
    a = FakeA()
    with pytest.raises(fp.FreePageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        fp.parse_vmcoreinfo(vmcoreinfo_text(a, **override))


def test_a_note_that_is_not_vmcoreinfo_is_refused() -> None:
    with pytest.raises(fp.FreePageError, match="not VMCOREINFO"):
        fp.parse_note(note_bytes("PAGESIZE=4096\n", name=b"CORE"))
    with pytest.raises(fp.FreePageError, match="not valid"):
        fp.parse_note(bytes(64))
    assert isinstance(fp.FreePageError("x"), KjumpError)


# --------------------------------------------------------------------------------- scan


@pytest.mark.parametrize("l5, leaf", LAYOUTS)
def test_buddy_heads_of_several_orders_are_the_only_free_pages(l5: bool, leaf: int) -> None:
    a = build(l5=l5, leaf=leaf)
    fmap = fp.scan(a.info, a.read, RAM, note=(NOTE, 2048))
    assert list(fmap.ranges) == EXPECTED
    assert fmap.free_pages == 1 + 8 + 1024 and fmap.blocks == 3
    assert fmap.scanned_bytes == RAM[0][1] - RAM[0][0]


def test_phys_base_moves_the_kernel_image_mapping() -> None:
    a = build(phys_base=0x200000)
    assert list(fp.scan(a.info, a.read, RAM).ranges) == EXPECTED


def test_excluded_memory_and_blocks_crossing_out_of_the_ranges_are_not_free() -> None:
    a = build()
    # B's own memory is never called free; a block that runs past the scanned memory neither
    fmap = fp.scan(a.info, a.read, [(0x100000, 0x2E00000)], exclude=[(0x800000, 0x801000)])
    assert list(fmap.ranges) == [(0x808000, 0x810000)]


def test_unmapped_struct_pages_count_as_not_free() -> None:
    a = build(leaf=PAGE)
    # unmap the vmemmap page that holds the struct pages of pfns 0x800..0x83f
    va = a.vmemmap + 0x808 * SZ
    a.u64(a.entry_addr(va, len(a.shifts) - 1), 0)
    assert list(fp.scan(a.info, a.read, RAM).ranges) == [EXPECTED[2]]


def test_free_pages_are_never_read_by_the_scan() -> None:
    a = build()
    fp.scan(a.info, a.read, RAM)
    fmap = fp.FreePageMap(tuple(EXPECTED))
    assert not any(fmap.free_in(p, n) for p, n in a.reads)


def test_free_huge_page_folios_are_free_and_those_in_use_are_not() -> None:
    a = build()
    a.huge_folio(0x3000)  # free, 2 MiB
    a.huge_folio(0x3200, refcount=1)  # mapped by a process or in a hugetlbfs file
    a.huge_folio(0x3400)
    a.field(0x3401, OFF_HEAD, "<Q", a.vmemmap + 0x3200 * SZ + 1)  # its tail names another head
    a.huge_folio(0x3600, order=9)
    a.field(0x3600, OFF_FLAGS, "<Q", 0)  # no PG_head
    a.huge_folio(0x3A01, order=0)  # an order no folio has
    a.huge_folio(0x3E00, order=10)  # misaligned for its order
    fmap = fp.scan(a.info, a.read, RAM)
    assert fmap.ranges == fp.FreePageMap(tuple(EXPECTED) + ((0x3000000, 0x3200000),)).ranges
    assert fmap.hugetlb_bytes == 2 << 20
    # asked not to (the debug zero check), or told nothing of the type: saved as data
    assert list(fp.scan(a.info, a.read, RAM, hugetlb=False).ranges) == EXPECTED
    old = FakeA()
    old.write(NOTE, note_bytes(vmcoreinfo_text(old, **{"NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)": ""})))
    old.huge_folio(0x3000)
    assert not old.info.hugetlb_value + 1 and not fp.scan(old.info, old.read, RAM).ranges


def test_the_copies_of_a_huge_page_head_over_its_tails_are_not_folios() -> None:
    """The vmemmap optimisation maps one page of struct pages over a folio's tails: every
    64th struct page inside a free folio reads as its head. One folio, not eight."""
    a = build()
    a.huge_folio(0x3000)
    for k in range(64, 512, 64):
        a.huge_folio(0x3000 + k)
        a.field(0x3000 + k + 1, OFF_HEAD, "<Q", a.vmemmap + 0x3000 * SZ + 1)
    fmap = fp.scan(a.info, a.read, RAM)
    assert fmap.free_in(0x3000000, 4 << 20) == [(0x3000000, 0x3200000)]
    assert fmap.hugetlb_bytes == 2 << 20 and fmap.blocks == len(EXPECTED) + 1


def test_a_huge_page_head_last_in_a_batch_reads_its_tail_from_the_next(monkeypatch) -> None:
    a = build()
    a.huge_folio(0x600)
    monkeypatch.setattr(fp, "BATCH_PAGES", 0x600 + 1 - RAM[0][0] // PAGE)  # head ends batch 1
    fmap = fp.scan(a.info, a.read, RAM)
    assert fmap.free_in(0x600000, 2 << 20) == [(0x600000, 0x800000)]
    assert fmap.hugetlb_bytes == 2 << 20


def test_a_fragmented_machine_s_free_blocks_take_little_of_b_s_memory() -> None:
    """Every other page free (each its own order-0 block, as on a machine that has run for
    weeks): the map of free pages that B holds while it saves keeps each block in a few
    bytes of its jump area (as Python tuples, ~120 bytes a block: 1.6 GiB of such memory
    would take 50 MiB)."""
    import tracemalloc

    def held(a: FakeA) -> tuple[int, fp.FreePageMap]:
        tracemalloc.start()
        try:
            fmap = fp.scan(a.info, a.read, RAM, note=(NOTE, 2048))
            return tracemalloc.get_traced_memory()[0], fmap
        finally:
            tracemalloc.stop()

    whole, none_free = held(FakeA())
    a = FakeA()
    pfns = range(0x2200, 0x4000, 2)
    for pfn in pfns:
        a.free_block(pfn, 0)
    fragmented, fmap = held(a)
    assert not none_free.ranges
    assert list(fmap.ranges) == [(p * PAGE, (p + 1) * PAGE) for p in pfns]
    assert fmap.blocks == len(pfns)
    assert fragmented - whole < 24 * len(pfns), (fragmented - whole) / len(pfns)


def test_a_map_with_no_room_for_every_block_keeps_what_fits_and_saves_the_rest() -> None:
    """More free blocks than the save kernel has room to map: the map stays within its
    bound, keeps the blocks found first and a longer block found later, and counts what it
    leaves out, so those pages are saved as data (a larger image) rather than the save
    kernel running out of memory."""
    a = FakeA()
    singles = range(0x2200, 0x2600, 2)  # 512 order-0 blocks
    for pfn in singles:
        a.free_block(pfn, 0)
    a.free_block(0x2A00, 9)  # then one block of 512 pages
    unbounded = fp.scan(a.info, a.read, RAM, note=(NOTE, 2048))
    assert len(unbounded.ranges) == 513 and not unbounded.unmapped_bytes

    fmap = fp.scan(a.info, a.read, RAM, note=(NOTE, 2048), max_runs=100)
    kept = list(fmap.ranges)
    assert len(kept) == 100
    assert kept[:99] == list(unbounded.ranges)[:99]  # found first
    assert kept[-1] == (0x2A00 * PAGE, 0x2C00 * PAGE)  # the long block took the last place
    assert fmap.free_bytes + fmap.unmapped_bytes == unbounded.free_bytes
    assert fmap.unmapped_bytes == (512 - 99) * PAGE


def test_a_full_map_takes_a_block_only_in_place_of_a_shorter_last_range() -> None:
    runs = fp.Runs()
    assert runs.add_within(0, 4096, 2) == 0
    assert runs.add_within(8192, 16384, 2) == 0
    assert runs.add_within(20480, 24576, 2) == 4096  # full, not longer: left out
    assert runs.add_within(16384, 20480, 2) == 0  # extends the last range: always fits
    assert runs.add_within(1 << 20, (1 << 20) + 65536, 2) == 12288  # the last gave way
    assert list(runs) == [(0, 4096), (1 << 20, (1 << 20) + 65536)]


def test_the_scan_tells_the_watchdog_it_advances_batch_by_batch(monkeypatch) -> None:
    # a large machine's scan takes longer than a short watchdog's stall: each batch of
    # struct pages is progress
    monkeypatch.setattr(fp, "BATCH_PAGES", 256)
    a = build()
    ticks: list[int] = []
    fmap = fp.scan(a.info, a.read, RAM, note=(NOTE, 2048), advanced=lambda: ticks.append(1))
    assert list(fmap.ranges) == EXPECTED
    pages = sum(-(-(e - s) // PAGE // 256) for s, e in RAM)
    assert len(ticks) == pages


def test_the_map_s_bound_is_a_share_of_the_save_kernel_s_free_memory() -> None:
    assert fp.max_runs_for(64 << 20) * fp.RUN_BYTES == (64 << 20) // fp.MAP_SHARE
    assert fp.max_runs_for(0) is None  # unknown: no bound
    assert fp.max_runs_for(1) == 2


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("l5", [False, True])
def test_a_table_pointing_outside_a_s_memory_is_refused(l5: bool) -> None:
    a = build(l5=l5, leaf=PAGE)
    at = a.entry_addr(a.vmemmap, len(a.shifts) - 2)  # the PMD entry above the vmemmap
    a.u64(at, 0x7000000 | 0x63)
    with pytest.raises(fp.FreePageError, match="outside A's memory"):
        fp.scan(a.info, a.read, RAM)


def test_a_large_page_at_the_top_level_is_refused() -> None:
    a = build()
    at = a.entry_addr(a.vmemmap, 0)
    a.u64(at, 0x63 | fp.PTE_PSE)
    with pytest.raises(fp.FreePageError, match="cannot hold one"):
        fp.scan(a.info, a.read, RAM)


def test_a_misaligned_large_page_is_refused() -> None:
    a = build(leaf=2 << 20)
    at = a.entry_addr(a.vmemmap, len(a.shifts) - 2)
    a.u64(at, (STRUCTS + 0x5000) | 0x63 | fp.PTE_PSE)
    with pytest.raises(fp.FreePageError, match="misaligned"):
        fp.scan(a.info, a.read, RAM)


def test_a_free_block_over_the_struct_pages_is_refused() -> None:
    a = build(leaf=2 << 20)
    a.free_block(STRUCTS // PAGE, 8)
    with pytest.raises(fp.FreePageError, match="read as in use"):
        fp.scan(a.info, a.read, RAM)


def test_a_free_block_over_the_note_is_refused() -> None:
    a = build()
    a.free_block(NOTE // PAGE, 0)
    with pytest.raises(fp.FreePageError, match="read as in use"):
        fp.scan(a.info, a.read, RAM, note=(NOTE, 2048))


def test_a_buddy_head_inside_another_free_block_is_refused() -> None:
    a = build()
    a.free_block(0x2C01, 0)
    with pytest.raises(fp.FreePageError, match="inside another"):
        fp.scan(a.info, a.read, RAM)


def test_an_absurd_amount_of_free_memory_is_refused() -> None:
    a = FakeA(leaf=2 << 20)
    used = {p // PAGE for p in a.mem}
    for pfn in range(RAM[0][0] // PAGE, RAM[0][1] // PAGE):
        if pfn not in used:
            a.free_block(pfn, 0)
    with pytest.raises(fp.FreePageError, match="absurd"):
        fp.scan(a.info, a.read, RAM)


# ------------------------------------------------------------------------- hypothesis

blocks = st.lists(st.tuples(st.integers(0x2100, 0x2BFF), st.integers(0, 6)), max_size=12)


@settings(max_examples=25, deadline=None)
@given(blocks=blocks)
def test_any_set_of_aligned_disjoint_blocks_is_found_exactly(blocks: list) -> None:
    a = FakeA(leaf=2 << 20)
    want: list[tuple[int, int]] = []
    for pfn, order in blocks:
        pfn -= pfn % (1 << order)
        a0, b0 = pfn, pfn + (1 << order)
        if b0 > 0x2C00 or any(a0 < e and s < b0 for s, e in want):
            continue
        want.append((a0, b0))
        a.free_block(pfn, order)
    fmap = fp.scan(a.info, a.read, RAM)
    assert fmap.free_pages == sum(e - s for s, e in want)
    assert list(fmap.ranges) == list(
        fp.FreePageMap(tuple((s * PAGE, e * PAGE) for s, e in want)).ranges
    )


# ---------------------------------------------------------------------- masked source


class ReadOnly:
    """A source without readinto (the pipeline then uses read)."""

    def __init__(self, a: FakeA) -> None:
        self.a = a

    def read(self, phys: int, length: int) -> bytes:
        return self.a.read(phys, length)


class WithReadinto(ReadOnly):
    def readinto(self, phys: int, buf: memoryview) -> None:
        buf[:] = self.a.read(phys, len(buf))


class Lending(ReadOnly):
    """A source that lends views, as B's /dev/mem windows do. Its view holds A's bytes,
    free pages' garbage included, and looking at it is not recorded as a read: what the
    masked source hands out shows whether it copied a free page."""

    def view(self, phys: int, length: int) -> memoryview:
        seen = len(self.a.reads)
        data = self.a.read(phys, length)
        del self.a.reads[seen:]
        return memoryview(data)


def _filled() -> FakeA:
    a = FakeA(leaf=2 << 20)
    for base in (0x800000, 0x80C000, 0x2C00000):  # garbage in pages that will be free
        a.write(base, b"\xaa" * 64)
    a.write(0x801000, b"in use")
    return a


@settings(max_examples=60, deadline=None)
@given(phys=st.integers(0x7F0000, 0x812000), length=st.integers(1, 0x30000), readinto=st.booleans())
def test_masked_source_hands_zeros_for_free_pages_and_never_reads_them(
    phys: int, length: int, readinto: bool
) -> None:
    a = _filled()
    fmap = fp.FreePageMap(tuple(EXPECTED))
    src = fp.FreeMaskedSource(WithReadinto(a) if readinto else ReadOnly(a), fmap)
    want = bytearray(a.read(phys, length))
    for s, e in fmap.free_in(phys, length):
        want[s - phys : e - phys] = bytes(e - s)
    a.reads.clear()
    assert src.read(phys, length) == want
    buf = bytearray(length)
    src.readinto(phys, memoryview(buf))
    assert buf == want
    assert not any(fmap.free_in(p, n) for p, n in a.reads)


def _alternating(a: FakeA, start: int, pages: int) -> fp.FreePageMap:
    """Every other page of [start, start + pages) free, each holding garbage."""
    for i in range(pages):
        a.write(start + i * PAGE, (b"\xaa" if i % 2 else bytes([i % 251 + 1])) * 16)
    return fp.FreePageMap(
        tuple((start + i * PAGE, start + (i + 1) * PAGE) for i in range(1, pages, 2))
    )


@settings(max_examples=40, deadline=None)
@given(first=st.integers(0, 40), count=st.integers(1, 64))
def test_a_fragmented_range_comes_out_of_one_view_with_zeros_for_its_free_pages(
    first: int, count: int
) -> None:
    a = FakeA(leaf=2 << 20)
    start = 0x800000
    fmap = _alternating(a, start, 128)
    src = fp.FreeMaskedSource(Lending(a), fmap)
    phys, length = start + first * PAGE, count * PAGE
    want = bytearray(_peek(a, phys, length))
    free = 0
    for s, e in fmap.free_in(phys, length):
        want[s - phys : e - phys] = bytes(e - s)
        free += e - s
    buf = bytearray(b"\x55" * length)  # a reused buffer holds the last chunk's bytes
    src.readinto(phys, memoryview(buf))
    assert buf == want
    assert src.skipped_bytes == free
    assert a.reads == []  # nothing read a piece at a time


def _peek(a: FakeA, phys: int, length: int) -> bytes:
    seen = len(a.reads)
    data = a.read(phys, length)
    del a.reads[seen:]
    return data


@settings(max_examples=200, deadline=None)
@given(
    pages=st.lists(st.integers(0, 63), max_size=40),
    phys=st.integers(0, 70 * PAGE),
    length=st.integers(1, 40 * PAGE),
)
def test_the_free_parts_of_a_range_are_exactly_its_free_bytes(
    pages: list[int], phys: int, length: int
) -> None:
    fmap = fp.FreePageMap(tuple((p * PAGE, (p + 1) * PAGE) for p in pages))
    got = fmap.free_in(phys, length)
    assert all(a < b for a, b in got) and all(b < c for (_, b), (c, _) in zip(got, got[1:]))
    free = {p * PAGE + o for p in set(pages) for o in range(0, PAGE, 512)}
    want = {x for x in range(phys - phys % 512, phys + length, 512) if x in free}
    assert {x for a, b in got for x in range(a - a % 512, b, 512)} == want
    assert all(phys <= a and b <= phys + length for a, b in got)


def test_free_map_records_are_sorted_merged_and_clipped() -> None:
    fmap = fp.FreePageMap(((0x3000, 0x4000), (0x1000, 0x2000), (0x2000, 0x3000)))
    assert fmap.ranges == ((0x1000, 0x4000),)
    assert fmap.free_pages == 3 and fmap.free_bytes == 0x3000
    assert fmap.free_in(0x1800, 0x1000) == [(0x1800, 0x2800)]
    assert fmap.free_in(0x4000, 0x1000) == []
    assert fmap.is_free(0x3FFF) and not fmap.is_free(0x4000)


def test_zero_check_finds_a_free_page_holding_data() -> None:
    a = _filled()
    fmap = fp.FreePageMap(tuple(EXPECTED))
    chk = fp.check_free_pages_zero(a.read, fmap)
    assert not chk.passed and chk.pages == 1033 and chk.first_nonzero == 0x800000
    assert chk.nonzero_pages == 3
    clean = FakeA(leaf=2 << 20)
    assert fp.check_free_pages_zero(clean.read, fmap).passed


def test_the_zero_check_reports_progress_as_it_reads() -> None:
    fmap = fp.FreePageMap(tuple(EXPECTED))
    ticks: list[int] = []
    fp.check_free_pages_zero(
        FakeA(leaf=2 << 20).read, fmap, step=PAGE, advanced=lambda: ticks.append(1)
    )
    assert len(ticks) == fmap.free_pages  # one per page read: the watchdog sees it advance


# ------------------------------------------------- the job, the daemon side, B's save role


def _job(**kw):
    from tests.unit.test_job import make_job

    base = dict(ranges=RAM, jump_area=(0x20000000, 128 << 20), vmcoreinfo=(NOTE, 2048))
    base.update(kw)
    return make_job(**base)


def test_job_carries_vmcoreinfo_and_the_switches_and_older_jobs_still_read() -> None:
    import json

    from kjumpd.errors import JobError
    from kjumpd.job import Job

    job = _job(free_page_check=True)
    back = Job.from_json(job.to_json())
    assert back == job and back.vmcoreinfo == (NOTE, 2048) and back.free_page_check
    old = json.loads(job.to_json())
    for key in ("vmcoreinfo", "free_page_exclusion", "free_page_check"):
        del old[key]
    older = Job.from_dict(old)
    assert older.vmcoreinfo is None and older.free_page_exclusion and not older.free_page_check
    with pytest.raises(JobError, match="vmcoreinfo"):
        _job(vmcoreinfo=(NOTE, 0))
    with pytest.raises(JobError, match="free_page_exclusion"):
        _job(free_page_exclusion="yes")


def test_daemon_reads_the_note_location_from_sysfs(tmp_path) -> None:
    from kjumpd.daemon.kexec import vmcoreinfo_location
    from kjumpd.sysroot import Sysroot

    sr = Sysroot(str(tmp_path))
    assert vmcoreinfo_location(sr) is None  # no CONFIG_VMCORE_INFO
    (tmp_path / "sys/kernel").mkdir(parents=True)
    (tmp_path / "sys/kernel/vmcoreinfo").write_text("0x000000001e7f5000 1024\n")
    assert vmcoreinfo_location(sr) == (0x1E7F5000, 0x1024)
    (tmp_path / "sys/kernel/vmcoreinfo").write_text("garbage\n")
    assert vmcoreinfo_location(sr) is None


def test_config_switches_default_to_exclusion_without_the_check(tmp_path) -> None:
    from kjumpd.daemon import config
    from kjumpd.sysroot import Sysroot

    assert config.Config().free_page_exclusion and not config.Config().free_page_check
    (tmp_path / "etc/kjumpd").mkdir(parents=True)
    (tmp_path / "etc/kjumpd/kjumpd.toml").write_text(
        "[hibernate]\nfree_page_exclusion = false\nfree_page_check = true\n"
    )
    cfg = config.load(Sysroot(str(tmp_path)))
    assert not cfg.free_page_exclusion and cfg.free_page_check


def test_save_role_skips_free_pages_or_says_why_it_saves_everything(capsys) -> None:
    from kjumpd.agent.kernel_role import free_pages

    a = build()
    src = ReadOnly(a)
    fmap = free_pages(_job(), src, own=[(0, 0x80000), (0x20000000, 0x28000000)])
    assert fmap is not None and list(fmap.ranges) == EXPECTED
    out = capsys.readouterr().out
    assert "kjump-agent: free pages: 1033 (4 MiB) of A's memory skipped" in out

    class Watchdog:
        fed = 0

        def progress(self) -> None:
            self.fed += 1

    wd = Watchdog()
    tight = free_pages(
        _job(), src, own=[], mem_available=2 * fp.MAP_SHARE * fp.RUN_BYTES, watchdog=wd
    )
    assert tight is not None and len(tight.ranges) <= 2
    assert wd.fed >= 1  # the scan was progress
    assert "free pages: 8 more (0 MiB) saved as data: the map" in capsys.readouterr().out

    assert free_pages(_job(free_page_exclusion=False), src, own=[]) is None
    assert "exclusion switched off" in capsys.readouterr().out
    assert free_pages(_job(vmcoreinfo=None), src, own=[]) is None
    assert "no vmcoreinfo" in capsys.readouterr().out
    assert free_pages(_job(main_kernel={"release": "7.2.1", "build_id": ""}), src, own=[]) is None
    assert "not the main kernel's" in capsys.readouterr().out
    assert free_pages(_job(vmcoreinfo=(NOTE + PAGE, 2048)), src, own=[]) is None
    assert "not excluded" in capsys.readouterr().out


def test_save_role_debug_check_passes_on_zeroed_free_pages_and_falls_back_otherwise(capsys) -> None:
    from kjumpd.agent.kernel_role import free_pages

    a = build()
    assert free_pages(_job(free_page_check=True), ReadOnly(a), own=[]) is not None
    assert "free-page check: PASS: all 1033 free pages read as zero" in capsys.readouterr().out
    a.write(0x2C00000 + 5 * PAGE, b"garbage")
    assert free_pages(_job(free_page_check=True), ReadOnly(a), own=[]) is None
    assert (
        "free-page check: FAIL: 1 of 1033 free pages hold data (first at 0x2c05000)"
        in capsys.readouterr().out
    )


def test_save_role_names_the_free_huge_pages_and_the_debug_check_saves_them(capsys) -> None:
    """The pool's free huge pages hold what their last user left (init_on_free does not
    clear them): skipped, and said so; under the debug zero check they are saved instead
    of failing it."""
    from kjumpd.agent.kernel_role import free_pages

    a = build()
    a.huge_folio(0x3200)
    a.write(0x3200000 + 7 * PAGE, b"left by a database")
    fmap = free_pages(_job(), ReadOnly(a), own=[])
    assert fmap is not None and fmap.is_free(0x3200000 + 7 * PAGE)
    out = capsys.readouterr().out
    assert "free pages: 2 MiB of them are free huge pages of A's pool (vm.nr_hugepages)" in out
    checked = free_pages(_job(free_page_check=True), ReadOnly(a), own=[])
    assert checked is not None and not checked.is_free(0x3200000)
    assert "free-page check: PASS: all 1033 free pages" in capsys.readouterr().out


def test_masked_source_says_which_ranges_are_wholly_free() -> None:
    """The save pipeline stores a wholly free chunk as an all-zero record without reading
    or zero-filling it; a range with one page in use is not wholly free."""
    fmap = fp.FreePageMap(((0x1000, 0x5000),))
    src = fp.FreeMaskedSource(ReadOnly(_filled()), fmap)
    assert src.known_zero(0x1000, 0x4000) and src.known_zero(0x2000, 0x1000)
    assert not src.known_zero(0x0, 0x2000)  # page 0 is in use
    assert not src.known_zero(0x4000, 0x2000)  # page 0x5000 is in use
    assert src.skipped_bytes == 0x5000


def test_a_kernel_that_poisons_free_pages_keeps_them_in_the_image(tmp_path) -> None:
    from kjumpd.daemon.kexec import free_pages_restore_as_zeros
    from kjumpd.sysroot import Sysroot

    sr = Sysroot(str(tmp_path))
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text("root=/dev/vda1 init_on_free=1 quiet\n")
    assert free_pages_restore_as_zeros(sr)
    (tmp_path / "proc/cmdline").write_text("root=/dev/vda1 page_poison=1\n")
    assert not free_pages_restore_as_zeros(sr)


@pytest.mark.parametrize(
    "cmdline, config, boot_config, zeroed, why",
    [
        ("root=/dev/vda init_on_free=1", None, None, True, "command line"),
        (
            "init_on_free=1 init_on_free=0",
            "CONFIG_INIT_ON_FREE_DEFAULT_ON=y",
            None,
            False,
            "init_on_free=0 on the command line",
        ),  # the last one wins
        ("init_on_free=off", None, None, False, "command line"),
        ("quiet", "CONFIG_INIT_ON_FREE_DEFAULT_ON=y\n", None, True, "DEFAULT_ON=y"),
        ("quiet", "# CONFIG_INIT_ON_FREE_DEFAULT_ON is not set\n", None, False, "is off"),
        ("quiet", None, "CONFIG_INIT_ON_FREE_DEFAULT_ON=y\n", True, "DEFAULT_ON=y"),
        ("quiet", None, "CONFIG_X=y\n", False, "is off"),
        ("quiet", None, None, True, "unreadable"),  # unknown: zeros, never wrong
        ("init_on_free=maybe", None, None, True, "unreadable"),  # the kernel ignores it too
    ],
)
def test_whether_free_pages_must_come_back_as_zeros(
    tmp_path, cmdline, config, boot_config, zeroed, why
) -> None:
    import gzip

    from kjumpd.daemon.kexec import free_pages_zeroed
    from kjumpd.sysroot import Sysroot

    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/cmdline").write_text(cmdline + "\n")
    (tmp_path / "proc/sys/kernel/osrelease").write_text("6.12.117\n")
    if config is not None:
        (tmp_path / "proc/config.gz").write_bytes(gzip.compress(("CONFIG_A=y\n" + config).encode()))
    if boot_config is not None:
        (tmp_path / "boot").mkdir()
        (tmp_path / "boot/config-6.12.117").write_text(boot_config)
    got, reason = free_pages_zeroed(Sysroot(str(tmp_path)))
    assert got is zeroed and why in reason


# ------------------------------------------------------------------------ page classes


def _set_fields(
    a: FakeA,
    pfn: int,
    *,
    flags: int = 0,
    mapping: int = 0,
    refcount: int = 1,
    compound_head: int = 0,
    page_type: int = ALLOCATED,
) -> None:
    phys = a.v2p(a.vmemmap + pfn * SZ)
    page = a.mem.setdefault(phys - phys % PAGE, bytearray(PAGE))
    o = phys % PAGE
    struct.pack_into("<Q", page, o, flags)
    struct.pack_into("<Q", page, o + 8, compound_head)
    struct.pack_into("<Q", page, o + 24, mapping)
    struct.pack_into("<I", page, o + OFF_MAPCOUNT, page_type)
    struct.pack_into("<I", page, o + 52, refcount)


@pytest.mark.parametrize("lends_views", [False, True], ids=["reads", "views"])
def test_pages_read_are_counted_by_class_zero_and_non_zero(lends_views: bool) -> None:
    a = build()
    anon, file_, res, kern, table = 0x3100, 0x3101, 0x3102, 0x3103, 0x3104
    _set_fields(a, anon, mapping=0xFFFF_8880_0000_1001)
    _set_fields(a, file_, mapping=0xFFFF_8880_0000_2000)
    _set_fields(a, res, flags=1 << 13)
    _set_fields(a, kern)
    _set_fields(a, table, page_type=0xF2 << 24)
    head = 0x3200  # an anon folio of order 2
    _set_fields(a, head, flags=1 << 6, mapping=0xFFFF_8880_0000_3001)
    for t in range(1, 4):
        _set_fields(
            a,
            head + t,
            flags=2 if t == 1 else 0,
            refcount=0,
            compound_head=(a.vmemmap + head * SZ) | 1,
        )
    for pfn in (anon, file_, res, head + 2):
        a.write(pfn * PAGE + 100, b"data")
    fmap = fp.scan(a.info, a.read, RAM, note=(NOTE, 2048))
    classes = fmap.classes
    assert classes is not None
    src = fp.FreeMaskedSource(Lending(a) if lends_views else ReadOnly(a), fmap)
    for start, end in RAM:
        for at in range(start, end, 1 << 20):
            src.read(at, min(1 << 20, end - at))
    rows = {r.name: (r.pages, r.zero_pages) for r in classes.rows()}
    assert rows["free"] == (fmap.free_pages, fmap.free_pages)
    assert rows["anon"] == (5, 3)  # one page + a 4-page folio, 2 with data
    assert rows["file"] == (1, 0)
    assert rows["reserved"] == (1, 0)
    assert rows["page table"] == (1, 1)
    assert rows["slab"] == (1, 1)
    assert rows["kernel"] == (1, 1)
    total = (RAM[0][1] - RAM[0][0]) // PAGE
    assert sum(p for p, _ in rows.values()) == total
    assert "anon 0/0" in classes.summary() and "free " in classes.summary()


def test_a_note_without_the_class_fields_leaves_the_histogram_out_not_the_scan() -> None:
    a = build()
    a.write(NOTE, note_bytes(vmcoreinfo_text(a, **{"OFFSET(page.mapping)": ""})))
    fmap = fp.scan(a.info, a.read, RAM, note=(NOTE, 2048))
    assert fmap.classes is None and fmap.ranges == tuple(EXPECTED)


def test_memory_too_large_for_the_histogram_leaves_it_out_not_the_scan(monkeypatch) -> None:
    # a byte per page of A: above the cap (32 GiB), B's memory goes to the save instead
    monkeypatch.setattr(fp, "CLASS_PAGES_MAX", (RAM[0][1] - RAM[0][0]) // PAGE - 1)
    a = build()
    fmap = fp.scan(a.info, a.read, RAM, note=(NOTE, 2048))
    assert fmap.classes is None and fmap.ranges == tuple(EXPECTED)
    monkeypatch.setattr(fp, "CLASS_PAGES_MAX", (RAM[0][1] - RAM[0][0]) // PAGE)
    assert fp.scan(a.info, a.read, RAM, note=(NOTE, 2048)).classes is not None


@settings(max_examples=60, deadline=None)
@given(pages=st.integers(1, 12), spoiled=st.lists(st.integers(0, 12 * PAGE - 1), max_size=4))
def test_page_class_zero_count_sees_any_single_non_zero_byte(pages: int, spoiled: list) -> None:
    from kjumpd.agent.pageclass import zero_pages

    data = bytearray(pages * PAGE)
    for at in spoiled:
        if at < len(data):
            data[at] = 1
    want = [i for i in range(pages) if not any(data[i * PAGE : (i + 1) * PAGE])]
    assert zero_pages(memoryview(data)) == want
