"""The jump area: the crashkernel= reservation the save kernel runs in.

Sources, cross-checked: ``crashkernel=`` on /proc/cmdline, either ``SIZE@OFFSET`` (the area
at a fixed place) or a plain ``SIZE`` (the kernel places it, below 4 GiB when it can: with
KASLR a fixed offset fails whenever the randomly placed kernel lies there, a plain size never
does, and the place may differ between boots; the image records where it was and the
restore-first entry loads the save kernel there), or the ranges form kdump setups write,
``START-[END]:SIZE[,...][@OFFSET]`` (one area whose size depends on the machine's RAM, which
the kernel rounds up to 128 MiB before it picks the first range holding it). The kernel
obeys the last ``crashkernel=`` without a ``,high``/``,low`` suffix; those suffixed forms put
the area above 4 GiB with a second piece below, which is not one jump area. Also read: the
"Crash kernel" line of /proc/iomem (addresses need root), /sys/kernel/kexec_crash_size, and
/sys/kernel/kexec_crash_loaded (a loaded kdump image occupies the area). Sizing reads the
save kernel's bzImage header (init_size: the memory the kernel needs to decompress and
run) and the initramfs size. What setup and install write is a plain size unless the
config pins ``[jump_area] start``. Boot loader editing (GRUB's /etc/default/grub, BLS
entries) is a pure text transform with a diff the CLI shows before it writes.
"""

from __future__ import annotations

import difflib
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from kjumpd import zstdframe
from kjumpd.daemon.config import (
    JUMP_AREA_ALIGN,
    MIN_JUMP_AREA,
    Config,
    format_size,
    parse_size,
)
from kjumpd.errors import ConfigError, JumpAreaError, KjumpError, MemoryMapError
from kjumpd.initrd import GZIP_MAGIC, LZ4_LEGACY_MAGIC, lz4_legacy_size
from kjumpd.linux import iomem as iomem_mod
from kjumpd.linux import pagecache
from kjumpd.sysroot import Sysroot

MiB = 1 << 20
ALIGN = JUMP_AREA_ALIGN
_CK_RE = re.compile(r"(?:^|\s)crashkernel=(\S+)")
#: crashkernel= values with these endings are skipped while a plain one exists (and then
#: reserve above 4 GiB)
_SPLIT_SUFFIXES = (",high", ",low")
#: the kernel rounds the machine's RAM up to this before it picks a range (firmware keeps
#: some RAM back, so a "4 GiB" machine reports a little less)
RANGE_RAM_ROUND = 128 * MiB


@dataclass(frozen=True)
class JumpArea:
    start: int
    size: int

    @property
    def end(self) -> int:  # exclusive
        return self.start + self.size

    @property
    def kernel_arg(self) -> str:
        return f"crashkernel={format_size(self.size)}@{format_size(self.start)}"

    def contains(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end


@dataclass(frozen=True)
class RamRange:
    """One entry of the ranges form: reserve ``size`` on a machine whose RAM (rounded up to
    128 MiB) is at least ``start`` and below ``end`` (None: no upper bound)."""

    start: int
    end: int | None
    size: int

    def holds(self, ram: int) -> bool:
        return self.start <= ram and (self.end is None or ram < self.end)


@dataclass(frozen=True)
class CrashRanges:
    """``crashkernel=START-[END]:SIZE[,...][@OFFSET]``."""

    entries: tuple[RamRange, ...]
    offset: int | None

    def size_for(self, system_ram: int) -> int:
        """What the kernel reserves on a machine with ``system_ram`` bytes of RAM: the size
        of the first range holding it rounded up to 128 MiB; 0 (nothing) when none does."""
        ram = -(-system_ram // RANGE_RAM_ROUND) * RANGE_RAM_ROUND
        return next((e.size for e in self.entries if e.holds(ram)), 0)

    @property
    def sizes(self) -> frozenset[int]:
        return frozenset(e.size for e in self.entries)


@dataclass(frozen=True)
class Discovery:
    cmdline_value: str | None  # what follows crashkernel=
    cmdline_area: JumpArea | None  # parsed SIZE@OFFSET
    cmdline_size: int | None  # a plain SIZE: the kernel chose the place
    cmdline_ranges: CrashRanges | None  # the ranges form
    system_ram: int | None  # System RAM in /proc/iomem (None: addresses hidden)
    iomem_area: JumpArea | None  # "Crash kernel" in /proc/iomem
    crash_size: int | None  # /sys/kernel/kexec_crash_size
    kdump_loaded: bool  # /sys/kernel/kexec_crash_loaded


def parse_crashkernel(value: str) -> JumpArea | None:
    """'128M@512M' -> JumpArea; forms without a fixed offset (ranges, ,high/,low) -> None."""
    if "@" not in value or ":" in value or "," in value:
        return None
    size_s, start_s = value.split("@", 1)
    try:
        return JumpArea(
            start=parse_size(start_s, "crashkernel offset"),
            size=parse_size(size_s, "crashkernel size"),
        )
    except ConfigError:
        return None


def parse_crashkernel_size(value: str) -> int | None:
    """'128M' -> its size; any other form (with an offset, ranges, ,high/,low) -> None."""
    if "@" in value or ":" in value or "," in value:
        return None
    try:
        return parse_size(value, "crashkernel size")
    except ConfigError:
        return None


def parse_crashkernel_ranges(value: str) -> CrashRanges | None:
    """'512M-2G:64M,2G-:128M[@16M]' -> CrashRanges; None for the other forms or a value the
    kernel would refuse (no range, END not above START, a part that is not a size)."""
    if ":" not in value or value.endswith(_SPLIT_SUFFIXES):
        return None
    body, at, off = value.partition("@")
    entries = []
    try:
        for item in body.split(","):
            rng, colon, size_s = item.partition(":")
            start_s, dash, end_s = rng.partition("-")
            if not colon or not dash:
                return None
            start = parse_size(start_s, "crashkernel range")
            end = parse_size(end_s, "crashkernel range") if end_s else None
            if end is not None and end <= start:
                return None
            entries.append(RamRange(start, end, parse_size(size_s, "crashkernel size")))
        offset = parse_size(off, "crashkernel offset") if at else None
    except ConfigError:
        return None
    return CrashRanges(tuple(entries), offset)


def _ram_words(n: int) -> str:
    return f"{n >> 20} MiB of RAM"


def parse_iomem_crash(iomem: str) -> JumpArea | None:
    for line in iomem.splitlines():
        rng, _, name = line.strip().partition(" : ")
        if name.strip() == "Crash kernel":
            s, _, e = rng.partition("-")
            start, end = int(s, 16), int(e, 16) + 1
            if start == 0 and end == 1:
                return None  # not root: /proc/iomem hides addresses
            return JumpArea(start, end - start)
    return None


def cmdline_value(cmdline: str) -> str | None:
    """The crashkernel= value of a command line the kernel obeys: the last one without a
    ,high/,low suffix, else the last one."""
    found = [m.group(1) for m in _CK_RE.finditer(cmdline)]
    plain = [v for v in found if not v.endswith(_SPLIT_SUFFIXES)]
    return (plain or found or [None])[-1]


def _system_ram(iomem: str) -> int | None:
    try:
        total = sum(e - s for s, e in iomem_mod.parse_system_ram(iomem))
    except MemoryMapError:
        return None
    # not root: every address reads as 0, and each range as one byte
    return total if total >= MiB else None


def discover(sysroot: Sysroot) -> Discovery:
    value = cmdline_value(sysroot.read_text("/proc/cmdline", default=""))
    size_txt = sysroot.read_text("/sys/kernel/kexec_crash_size", default="").strip()
    loaded = sysroot.read_text("/sys/kernel/kexec_crash_loaded", default="0").strip()
    iomem = sysroot.read_text("/proc/iomem", default="")
    return Discovery(
        cmdline_value=value,
        cmdline_area=parse_crashkernel(value) if value else None,
        cmdline_size=parse_crashkernel_size(value) if value else None,
        cmdline_ranges=parse_crashkernel_ranges(value) if value else None,
        system_ram=_system_ram(iomem),
        iomem_area=parse_iomem_crash(iomem),
        crash_size=int(size_txt) if size_txt.isdigit() else None,
        kdump_loaded=loaded == "1",
    )


def required_size(sysroot: Sysroot, config: Config) -> int:
    """Bytes the jump area must hold: the kernel's init_size + the initramfs as loaded +
    its unpacked size (gzip's ISIZE trailer, zstd's frame content size, lz4 legacy blocks, else
    x3) + the agent's working memory + 16 MiB for the kernel's own allocations, rounded up to
    16 MiB."""
    return required_size_for(
        sysroot.path(config.save_kernel),
        sysroot.path(config.save_initramfs),
        config.agent_memory,
        config.save_initramfs,
    )


def required_size_for(
    kernel_path: Path, initramfs_path: Path, agent_memory: int, initramfs_name: str = ""
) -> int:
    """``required_size`` for these host files (before they are installed)."""
    initramfs_name = initramfs_name or str(initramfs_path)
    kernel = read_init_size(kernel_path)
    try:
        with open(initramfs_path, "rb") as f:
            head = f.read(32)
            initrd = f.seek(0, 2)
            f.seek(max(0, initrd - 4))
            tail = f.read(4)
            pagecache.forget_fd(f.fileno())  # readahead brought more than the 36 bytes
    except OSError as e:
        raise JumpAreaError(
            f"save kernel initramfs {initramfs_name} is missing",
            why=e.strerror or str(e),
            fix="build it (savekernel/) or set save_kernel.initramfs",
        ) from None
    if head.startswith(b"070701"):
        unpacked = initrd
    elif head.startswith(GZIP_MAGIC) and len(tail) == 4 and struct.unpack("<I", tail)[0] > initrd:
        unpacked = struct.unpack("<I", tail)[0]
    elif (
        head.startswith(zstdframe.MAGIC)
        and (size := _zstd_content_size(head)) is not None
        and size > initrd
    ):
        unpacked = size
    elif (
        head.startswith(LZ4_LEGACY_MAGIC) and (size := lz4_legacy_size(initramfs_path)) is not None
    ):
        unpacked = size
    else:  # other compressions, or a padded gzip: ISIZE is not last
        unpacked = 3 * initrd
    need = kernel + initrd + unpacked + agent_memory + 16 * MiB
    return -(-need // ALIGN) * ALIGN


def _zstd_content_size(head: bytes) -> int | None:
    try:
        return zstdframe.frame(head, scan=False).content_size
    except KjumpError:
        return None


def read_init_size(path: Path) -> int:
    """init_size from an x86 bzImage setup header (offset 0x260), checked by the HdrS magic."""
    try:
        with open(path, "rb") as f:
            hdr = f.read(0x270)
    except OSError as e:
        raise JumpAreaError(
            f"save kernel {path} is missing",
            why=e.strerror or str(e),
            fix="build it with savekernel/build-kernel.sh or set save_kernel.kernel",
        ) from None
    if len(hdr) < 0x264 or hdr[0x202:0x206] != b"HdrS":
        raise JumpAreaError(
            f"save kernel {path} is not an x86 bzImage",
            why="no HdrS setup header",
            fix="point save_kernel.kernel at a bzImage",
        )
    (init_size,) = struct.unpack_from("<I", hdr, 0x260)
    return init_size


def find(sysroot: Sysroot, config: Config, need: int | None = None) -> JumpArea:
    """The reserved area, cross-checked; JumpAreaError naming the kernel command line to add."""
    d = discover(sysroot)
    want = requested_arg(config, max(need or 0, config.jump_area_size or 0, MIN_JUMP_AREA))
    add = f"add {want} to the kernel command line (kjumpctl setup --jump-area) and reboot"
    if d.cmdline_value is None:
        raise JumpAreaError(
            "no jump area is reserved", why="/proc/cmdline has no crashkernel=", fix=add
        )
    ranges = d.cmdline_ranges
    if d.cmdline_area is None and d.cmdline_size is None and ranges is None:
        raise JumpAreaError(
            f"crashkernel={d.cmdline_value} is not one jump area",
            why=unusable_why(d.cmdline_value),
            fix=f"replace it with {want} and reboot",
        )
    area = d.iomem_area
    if area is None:
        if d.crash_size == 0:
            why = (
                "the kernel could not reserve it "
                "(occupied or beyond RAM); see dmesg | grep crashkernel"
            )
            if ranges is not None and d.system_ram and not ranges.size_for(d.system_ram):
                why = f"none of its ranges holds this machine's {_ram_words(d.system_ram)}"
            raise JumpAreaError(
                f"crashkernel={d.cmdline_value} is on the command line but nothing is reserved",
                why=why,
                fix=f"use {plain_arg(want)} (no offset: the kernel then places it, KASLR "
                "or not; unset [jump_area] start), or another offset, and reboot",
            )
        raise JumpAreaError(
            "the jump area is not visible in /proc/iomem",
            why="no 'Crash kernel' line (or not running as root)",
            fix="run as root; if it persists, " + add,
        )
    if d.cmdline_area is not None and area != d.cmdline_area:
        raise JumpAreaError(
            "the reservation differs from the command line",
            why=f"iomem {area.start:#x}+{format_size(area.size)}, command line "
            f"{d.cmdline_area.start:#x}+{format_size(d.cmdline_area.size)}",
            fix=f"set {want} and reboot",
        )
    if d.cmdline_size is not None and area.size != d.cmdline_size:
        raise JumpAreaError(
            "the reservation differs from the command line",
            why=f"iomem {area.start:#x}+{format_size(area.size)}, command line "
            f"crashkernel={d.cmdline_value}",
            fix=f"set {want} and reboot",
        )
    if ranges is not None and (
        area.size not in ranges.sizes or ranges.offset not in (None, area.start)
    ):
        raise JumpAreaError(
            "the reservation differs from the command line",
            why=f"iomem {area.start:#x}+{format_size(area.size)}, command line "
            f"crashkernel={d.cmdline_value}",
            fix=f"set {want} and reboot",
        )
    if d.crash_size is not None and d.crash_size != area.size:
        raise JumpAreaError(
            "the jump area was shrunk at run time",
            why=f"/sys/kernel/kexec_crash_size is {d.crash_size}, reserved {area.size}",
            fix="reboot to restore the full reservation",
        )
    if config.jump_area_start is not None and area.start != config.jump_area_start:
        raise JumpAreaError(
            "the jump area is not where the config expects it",
            why=f"reserved at {area.start:#x}, jump_area.start is {config.jump_area_start:#x}",
            fix=f"set {want} or change jump_area.start",
        )
    if d.kdump_loaded:
        raise JumpAreaError(
            "a kdump kernel occupies the jump area",
            why="/sys/kernel/kexec_crash_loaded is 1",
            fix="disable kdump (systemctl disable --now kdump-tools; kexec -p -u)",
        )
    if need is not None and area.size < need:
        raise JumpAreaError(
            "the jump area is too small for the save kernel",
            why=f"reserved {format_size(area.size)}, need {format_size(need)}",
            fix=f"use {requested_arg(config, need)} and reboot",
            reserved=area.size,
            needed=need,
        )
    return area


def requested_arg(config: Config, size: int) -> str:
    """The crashkernel= word setup and install write: ``crashkernel=SIZE`` placed by the
    kernel (what KASLR needs: a fixed offset fails at any boot whose randomly placed kernel
    lies there), or ``crashkernel=SIZE@START`` when ``[jump_area] start`` pins it."""
    if config.jump_area_start is None:
        return f"crashkernel={format_size(size)}"
    return JumpArea(config.jump_area_start, size).kernel_arg


def plain_arg(arg: str) -> str:
    """``crashkernel=SIZE@START`` -> ``crashkernel=SIZE``."""
    return arg.split("@", 1)[0]


def unusable_why(value: str) -> str:
    """Why crashkernel=``value`` (none of the forms find() takes) is no jump area."""
    if value.endswith(_SPLIT_SUFFIXES):
        return (
            "the ,high/,low forms reserve the area above 4 GiB and a second piece below it, "
            "and the save kernel runs in one area"
        )
    return "it is not SIZE, SIZE@OFFSET or START-[END]:SIZE[,...][@OFFSET]"


def value_serves(
    value: str | None, config: Config, size: int, system_ram: int | None = None
) -> bool:
    """crashkernel=``value`` reserves one area for a save kernel of ``size``: at least that
    large, and at ``[jump_area] start`` when the config pins one. A ranges value is judged
    by the size it gives ``system_ram`` (unknown: by its smallest)."""
    if value is None:
        return False
    ranges = parse_crashkernel_ranges(value)
    if ranges is not None:
        have = ranges.size_for(system_ram) if system_ram else min(ranges.sizes)
        start = config.jump_area_start
        return have >= size and (start is None or ranges.offset == start)
    area = parse_crashkernel(value)
    if config.jump_area_start is None:
        have = parse_crashkernel_size(value) if area is None else area.size
        return have is not None and have >= size
    return area is not None and area.start == config.jump_area_start and area.size >= size


def keeps_reservation(d: Discovery, config: Config, size: int) -> bool:
    """The running kernel's crashkernel= already serves a save kernel of ``size``."""
    return value_serves(d.cmdline_value, config, size, d.system_ram)


def boot_arg(
    d: Discovery, config: Config, size: int, loader: str | None = None
) -> tuple[str, bool]:
    """(the crashkernel= word for the boot loader's configuration, whether the running
    kernel already has it reserved). ``loader``: the crashkernel= value the boot loader's
    configuration gives the next boot. A value that serves is kept as it is, the user's own
    included: the boot loader's first (a change the user made for the next boot), then the
    running kernel's; otherwise requested_arg()."""
    if value_serves(loader, config, size, d.system_ram):
        return f"crashkernel={loader}", loader == d.cmdline_value
    if keeps_reservation(d, config, size):
        return f"crashkernel={d.cmdline_value}", True
    return requested_arg(config, size), False


def next_boot_value(sysroot: Sysroot) -> tuple[str | None, bool]:
    """(the crashkernel= value the boot loader's configuration gives the next boot of the
    normal kernel, whether there is such a configuration: without one, this boot's)."""
    from kjumpd.daemon import bootentry

    configured = bootentry.configured_cmdline(sysroot)
    if configured is None:
        return discover(sysroot).cmdline_value, False
    return cmdline_value(configured), True


def check_next_boot(sysroot: Sysroot, config: Config, need: int | None) -> str:
    """The jump area the next boot reserves serves the save kernel (the running one may,
    while an edited boot loader configuration no longer asks for one, or for too little);
    JumpAreaError otherwise, naming the value and the fix."""
    size = max(need or 0, config.jump_area_size or 0, MIN_JUMP_AREA)
    value, configured = next_boot_value(sysroot)
    fix = (
        "run `kjumpctl install` (it puts a crashkernel= that serves on the boot loader's "
        f"command line, e.g. {requested_arg(config, size)}, runs update-grub where GRUB is "
        "used, and refreshes the restore-first entry)"
    )
    where = "the boot loader's kernel command line" if configured else "/proc/cmdline"
    if value is None:
        raise JumpAreaError(
            "the next boot reserves no jump area", why=f"{where} has no crashkernel=", fix=fix
        )
    running = discover(sysroot)
    ram = running.system_ram
    if not value_serves(value, config, size, ram):
        ranges = parse_crashkernel_ranges(value)
        simple = parse_crashkernel(value) is not None or parse_crashkernel_size(value) is not None
        if ranges is None and not simple:
            why = unusable_why(value)
        elif ranges is not None and ram and not ranges.size_for(ram):
            why = f"none of its ranges holds this machine's {_ram_words(ram)}"
        elif ranges is not None and ram and config.jump_area_start is None:
            why = (
                f"on this machine's {_ram_words(ram)} it reserves "
                f"{format_size(ranges.size_for(ram))}; the save kernel needs {format_size(size)}"
            )
        elif config.jump_area_start is not None:
            why = (
                f"the save kernel needs {format_size(size)} at "
                f"{format_size(config.jump_area_start)} ([jump_area] start)"
            )
        else:
            why = f"the save kernel needs {format_size(size)}"
        raise JumpAreaError(
            f"the next boot's jump area, crashkernel={value}, does not serve the save kernel",
            why=f"{where} gives it; {why}",
            fix=fix,
        )
    return f"crashkernel={value}" + (
        f" (this boot has crashkernel={running.cmdline_value}; the change takes effect at the "
        "next boot)"
        if value != running.cmdline_value
        else ""
    )


# -- boot loader command line editing (pure) --------------------------------------------------
def _set_arg(cmdline: str, arg: str) -> str:
    words = [w for w in cmdline.split() if not w.startswith("crashkernel=")]
    return " ".join(words + [arg])


def edit_default_grub(text: str, arg: str) -> str:
    """Put ``arg`` (crashkernel=...) into GRUB_CMDLINE_LINUX, replacing any crashkernel=."""
    out, done = [], False
    for line in text.splitlines(keepends=True):
        m = re.match(r'^(\s*GRUB_CMDLINE_LINUX\s*=\s*)(["\']?)(.*?)\2\s*$', line)
        if m and not done:
            line = f'{m.group(1)}"{_set_arg(m.group(3), arg)}"\n'
            done = True
        out.append(line)
    if not done:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(f'GRUB_CMDLINE_LINUX="{arg}"\n')
    return "".join(out)


def revert_arg(text: str, arg: str, previous: str | None) -> str:
    """Undo ``_set_arg`` in a file it edited (/etc/default/grub, a BLS entry,
    /etc/kernel/cmdline): the word ``arg`` goes, ``previous`` (the crashkernel= it replaced,
    if any) comes back in its place; every other word and line stays as it is now."""
    a = re.escape(arg)
    end = r"(?=[\s\"']|$)"
    if previous:
        return re.sub(r"(?<![^\s\"'])" + a + end, lambda m: previous, text, flags=re.M)
    out = []
    for line in text.splitlines(keepends=True):
        for pattern in (r"[ \t]+" + a + end, r"(?<=[\"'])" + a + r"[ \t]*", r"^" + a + r"[ \t]*"):
            new = re.sub(pattern, "", line)
            if new != line:
                line = new
                break
        out.append(line)
    return "".join(out)


def changed_arg(old: str, new: str) -> str | None:
    """The crashkernel= word ``old`` had that ``new`` lacks (what an edit replaced)."""
    gone = [w for w in _CK_WORD.findall(old) if w not in _CK_WORD.findall(new)]
    return gone[0] if gone else None


_CK_WORD = re.compile(r"crashkernel=[^\s\"']+")


def edit_bls_entry(text: str, arg: str) -> str:
    out, done = [], False
    for line in text.splitlines(keepends=True):
        m = re.match(r"^(options)(\s+)(.*?)\s*$", line)
        if m:
            line = f"options{m.group(2)}{_set_arg(m.group(3), arg)}\n"
            done = True
        out.append(line)
    if not done:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(f"options {arg}\n")
    return "".join(out)


@dataclass(frozen=True)
class FileEdit:
    path: str  # system path
    old: str
    new: str

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self.old.splitlines(True),
                self.new.splitlines(True),
                f"a{self.path}",
                f"b{self.path}",
            )
        )


def plan_bootloader_edits(sysroot: Sysroot, arg: str) -> list[FileEdit]:
    """Edits that put ``arg`` (crashkernel=...) on the boot loader's kernel command line (the
    normal kernel's entries: kjumpd's own restore-first entry boots R, which needs no
    reservation)."""
    from kjumpd.daemon.bootentry import BLS_ENTRY_ID

    edits: list[FileEdit] = []
    grub = "/etc/default/grub"
    if sysroot.exists(grub):
        old = sysroot.read_text(grub)
        edits.append(FileEdit(grub, old, edit_default_grub(old, arg)))
    # kernel-install (Fedora, ...) gives the next kernels /etc/kernel/cmdline: one line
    ki = "/etc/kernel/cmdline"
    if sysroot.exists(ki):
        old = sysroot.read_text(ki)
        edits.append(FileEdit(ki, old, _set_arg(old.strip(), arg=arg) + "\n"))
    for d in ("/boot/loader/entries", "/efi/loader/entries", "/boot/efi/loader/entries"):
        for name in sysroot.listdir(d):
            if name.endswith(".conf") and name != BLS_ENTRY_ID:
                p = f"{d}/{name}"
                old = sysroot.read_text(p)
                edits.append(FileEdit(p, old, edit_bls_entry(old, arg)))
    if not edits:
        raise JumpAreaError(
            "no boot loader configuration found",
            why="neither /etc/default/grub, /etc/kernel/cmdline nor BLS entries exist",
            fix=f"add {arg} to your boot loader's kernel command line",
        )
    return [e for e in edits if e.old != e.new]


def apply_edits(sysroot: Sysroot, edits: list[FileEdit]) -> None:
    for e in edits:
        p = sysroot.path(e.path)
        if p.read_text() != e.old:
            raise JumpAreaError(f"{e.path} changed while planning", fix="run setup again")
        tmp = p.with_name(p.name + ".kjumpd-new")
        tmp.write_text(e.new)
        tmp.chmod(p.stat().st_mode & 0o7777)
        tmp.replace(p)
