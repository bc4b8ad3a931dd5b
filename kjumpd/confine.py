"""One boot to restore: the restore-first kernel R confined to the jump area (used by A when
it writes the boot entry, and by R).

R restores an image by itself, without starting the save kernel B, when R's own kernel and
memory lie inside the jump area the image was saved with: every other page of RAM is then
A's to write. R is the save kernel's image, booted by the boot loader with ``memmap=SIZE$START``
words that mark every RAM range above the first 512 KiB outside the area reserved:

- the kernel only uses the low 512 KiB and the area as RAM;
- x86's decompressor places a KASLR kernel outside ``memmap=`` ranges
  (arch/x86/boot/compressed/kaslr.c, ``mem_avoid_memmap``) and moves the initrd into RAM
  (``relocate_initrd``), but only for at most :data:`MAX_RANGES` of them: with more, or
  without KASLR, or booted through the EFI stub (which turns its own randomisation off when
  it sees ``memmap=``), the kernel stays where the boot loader put it, in A's memory.

So the confinement is a request, and R checks at run time where it landed
(:func:`outside_area`): anywhere else it restores in two boots as without confinement
(B loaded into the area by kexec). Without an image, R starts the normal kernel by kexec as
always; that kernel gets the firmware's whole map from kexec-tools.

The words also carry ``rootfstype=ramfs``: without ``root=`` the kernel unpacks the
initramfs into a tmpfs capped at half of its RAM (init/do_mounts.c, ``init_rootfs``), and R's
files (the normal kernel and initramfs among them) can be more than half of a jump area
("Initramfs unpacking failed: write error", then an R whose files are cut short). ramfs has
no cap; what R holds is counted by :func:`fit_problem`.

Two limits are checked when the entry is written (:func:`fit_problem`), because a boot
that cannot even start R would be a boot that fails:

- the kernel refuses (panics on) an initrd of half or more of its RAM;
- R's files unpacked, plus the normal kernel and initrd staged for kexec (twice: kexec-tools'
  copy and the kernel's; or the restore's own working memory), plus the kernel itself must
  fit in the area, and so must the compressed initrd beside the files unpacked from it.
"""

from __future__ import annotations

from collections.abc import Sequence

from kjumpd.errors import ConfigError, MemoryMapError
from kjumpd.linux import iomem

#: arch/x86/boot/compressed/kaslr.c: MAX_MEMMAP_REGIONS
MAX_RANGES = 4
#: the low memory R keeps as RAM (real-mode trampolines and the like live there; B runs
#: the same way, kjumpd.daemon.kexec)
LOW_KEEP = 512 * 1024
#: what R's kernel itself takes of the area (measured: 22 MiB of a 128 and of a 160 MiB
#: area for the kjumpd kernel under QEMU, its own allocations at start-up included), with
#: room to spare
KERNEL_FOOTPRINT = 40 << 20
#: python and the restore pipeline's buffers while R restores (B restores in a 128 MiB area)
RESTORE_WORKING = 48 << 20
#: the uncompressed size of an lz4- or gzip-compressed initramfs, per compressed byte (2.1
#: to 2.2 for R's base archives; the machine payload is appended uncompressed)
UNPACK_FACTOR = 5 / 2

Range = tuple[int, int]
Entry = tuple[int, int, str]


def _described(entries: Sequence[Entry], gap: Range) -> bool:
    """Whether the firmware map describes every byte of ``gap`` (reserved, ACPI, ...): such
    a gap may be reserved again; an undescribed one is a hole devices may be decoded in."""
    pos = gap[0]
    for s, e, _t in sorted(entries):
        if s > pos:
            break
        pos = max(pos, e)
        if pos >= gap[1]:
            return True
    return pos >= gap[1]


def confine(entries: Sequence[Entry], area: Range) -> list[Range]:
    """The ranges to reserve so that a kernel's RAM is the low 512 KiB and ``area``
    ([start, end)): every System RAM range of the firmware map ``entries`` above LOW_KEEP
    outside the area, joined across gaps the map describes, at most MAX_RANGES of them.
    ConfigError when they cannot be that few."""
    if area[0] >= area[1] or area[0] < LOW_KEEP:
        raise ConfigError(f"the jump area [{area[0]:#x}, {area[1]:#x}) cannot hold R")
    ram = sorted((s, e) for s, e, t in entries if t == "System RAM" and e > s)
    if not any(s <= area[0] and area[1] <= e for s, e in iomem.merged(ram)):
        raise ConfigError(
            f"the jump area [{area[0]:#x}, {area[1]:#x}) is not RAM in the firmware's map"
        )
    pieces = iomem.subtract(iomem.subtract(ram, (0, LOW_KEEP)), area)
    out = _join(pieces, entries, area)
    if len(out) > MAX_RANGES:
        raise ConfigError(
            "R cannot be confined to the jump area",
            why=f"the RAM outside it is {len(out)} separate ranges; the kernel's placement "
            f"honours at most {MAX_RANGES}",
            fix="restores take two boots on this machine",
        )
    return out


def _join(pieces: Sequence[Range], entries: Sequence[Entry], area: Range) -> list[Range]:
    out: list[Range] = []
    for s, e in sorted(pieces):
        if out:
            gap = (out[-1][1], s)
            crosses_area = gap[0] <= area[0] and area[1] <= gap[1]
            if gap[0] >= gap[1] or (not crosses_area and _described(entries, gap)):
                out[-1] = (out[-1][0], max(out[-1][1], e))
                continue
        out.append((s, e))
    return out


#: the root filesystem R unpacks its initramfs into when confined (see above)
ROOTFS_WORD = "rootfstype=ramfs"


def boot_words(ranges: Sequence[Range]) -> list[str]:
    """R's command line words for a confinement: ``memmap=SIZE$START`` for ``ranges``,
    and ROOTFS_WORD."""
    return [*(f"memmap={e - s:#x}${s:#x}" for s, e in ranges), ROOTFS_WORD]


def fit_problem(area_size: int, initrd_bytes: int, unpacked_bytes: int, normal_bytes: int) -> str:
    """Empty when R fits a jump area of ``area_size`` bytes, else why not. ``initrd_bytes``: the
    initrd the boot loader loads; ``unpacked_bytes``: its files once unpacked;
    ``normal_bytes``: the normal kernel and initrd, which R stages for kexec."""
    if 2 * initrd_bytes >= area_size:
        return (
            f"R's initrd ({initrd_bytes >> 20} MiB) is half of the jump area "
            f"({area_size >> 20} MiB) or more: the kernel refuses such an initrd"
        )
    # kexec-tools reads the normal kernel and initrd into its own memory, and kexec_load(2)
    # copies them into the kernel's pages while that memory is still held: twice at once
    need = KERNEL_FOOTPRINT + unpacked_bytes + max(2 * normal_bytes, RESTORE_WORKING)
    unpacking = KERNEL_FOOTPRINT + unpacked_bytes + initrd_bytes
    if max(need, unpacking) > area_size:
        return (
            f"R needs about {max(need, unpacking) >> 20} MiB (its files unpacked, "
            f"{unpacked_bytes >> 20} MiB, and the normal kernel and initrd staged for kexec, "
            f"twice {normal_bytes >> 20} MiB), the jump area has {area_size >> 20} MiB"
        )
    return ""


def requested(cmdline_text: str) -> bool:
    """Whether a kernel's command line confines it (``memmap=SIZE$START`` words): its
    /proc/iomem then shows its own RAM, not the machine's."""
    from kjumpd.linux import cmdline

    return any(w.startswith("memmap=") and "$" in w for w in cmdline.words(cmdline_text))


#: names of /proc/iomem child resources that are the running kernel's own image
KERNEL_PARTS = ("Kernel code", "Kernel rodata", "Kernel data", "Kernel bss")


def outside_area(iomem_text: str, area: Range) -> str:
    """Empty when this kernel runs inside ``area``: its System RAM above 1 MiB and its image
    lie there; else where it runs instead."""
    stray = [
        (s, e)
        for s, e in iomem.parse_system_ram(iomem_text)
        if e > 1 << 20 and not (area[0] <= s and e <= area[1])
    ]
    if stray:
        return "its RAM includes " + ", ".join(f"[{s:#x}, {e:#x})" for s, e in stray[:4])
    try:
        image = iomem.top_level(iomem_text, KERNEL_PARTS, nested=True)
    except MemoryMapError as e:
        return e.message
    if not image:
        return "/proc/iomem does not show where its kernel image is"
    out = [(s, e) for s, e in image if not (area[0] <= s and e <= area[1])]
    if out:
        return "its kernel image lies at " + ", ".join(f"[{s:#x}, {e:#x})" for s, e in out)
    return ""
