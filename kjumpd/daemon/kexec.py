"""Driving kexec-tools for the jump to the save kernel, and the identities the job carries.

* load:   ``kexec -c --load-preserve-context --mem-min=START --mem-max=END --no-checks
           BZIMAGE --initrd=INITRD --append=CMDLINE`` (``-c``: kexec_load(2); the file-based
           syscall has no preserve-context. ``--no-checks``: the daemon verifies the kernel's
           hash itself.) START..END is the top of the jump area, just large enough for the
           segments (segment_window): for a preserve-context load kexec-tools adds a backup
           segment for every page of that range no segment covers, which A allocates and
           zeroes at the load, the jump swaps in and out, and B reads; the rest of the area
           is reserved and unused by A, so there is nothing there to keep. B still gets the
           whole area as RAM (memmap=). A load refused in the window is retried on the whole
           area. Before each load the window is cleared (kjumpd.daemon.areaclear): the jump
           swaps its old contents into A's backup pages, which B would save.
* jump:   ``kexec -e -x -y``: no ifdown (kexec-tools would leave the links down after the
           jump back; quiesce handles links with an undo) and no sync (the daemon synced
           and froze the filesystems already). After a jump back it returns rc 255 "Bad file
           descriptor" on real kernels: its status says nothing; the caller reads the header.
* unload: ``kexec -u``.

The initrd given to B is B's initramfs followed by the job cpio (kjumpd.job), in
/run/kjumpd/ram (a ramfs on the real system, never swapped out: the job may carry a key): the
initramfs is copied there (stage_initrd) while the daemon quiesces, the job is appended
(finish_initrd) after the filesystems are frozen. The save kernel's command line is
``<save_kernel.append> <QUICK_BOOT_PARAMS> <B_ONLY_PARAMS> memmap=exactmap memmap=512K@0K
[memmap=N#S...] memmap=SIZE@START kjump.role=save``: B's memory is exactly the low 512K and
the jump area; A's RAM is ACPI data to it (main_memory_words); no legacy ptys and a small
bounce buffer pool (kjumpd.bootconfig.QUICK_BOOT_PARAMS says why).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from kjumpd.bootconfig import B_ONLY_PARAMS, QUICK_BOOT_PARAMS
from kjumpd.daemon import areaclear, keymem
from kjumpd.daemon.config import Config, format_size
from kjumpd.daemon.jumparea import JumpArea
from kjumpd.errors import KexecError
from kjumpd.job import Job
from kjumpd.linux import cmdline, kconfig
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

#: the job may carry a key: the initrd lives on a ramfs of its own (kjumpd.daemon.keymem)
INITRD_DIR = "/run/kjumpd/ram"
INITRD = f"{INITRD_DIR}/save-initrd.img"


def build_id_from_notes(data: bytes) -> str:
    """The GNU build id from /sys/kernel/notes (ELF note records), or ""."""
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        pos += 12
        name = data[pos : pos + namesz]
        pos += (namesz + 3) & ~3
        desc = data[pos : pos + descsz]
        pos += (descsz + 3) & ~3
        if ntype == 3 and name.rstrip(b"\0") == b"GNU":
            return desc.hex()
    return ""


def main_kernel_identity(sysroot: Sysroot) -> dict[str, str]:
    release = sysroot.read_text("/proc/sys/kernel/osrelease", default="").strip()
    try:
        notes = sysroot.path("/sys/kernel/notes").read_bytes()
    except OSError:
        notes = b""
    return {"release": release, "build_id": build_id_from_notes(notes)}


def vmcoreinfo_location(sysroot: Sysroot) -> tuple[int, int] | None:
    """(physical address, size) of this kernel's VMCOREINFO note from /sys/kernel/vmcoreinfo
    ("%pa %x": both hex), for the job: B reads A's allocator state through it. None when the
    file is missing (no CONFIG_VMCORE_INFO) or unreadable; B then saves every page."""
    words = sysroot.read_text("/sys/kernel/vmcoreinfo", default="").split()
    try:
        addr, size = int(words[0], 16), int(words[1], 16)
    except (IndexError, ValueError):
        return None
    return (addr, size) if addr > 0 and size > 0 else None


def _cmdline_flag(sysroot: Sysroot, name: str) -> bool | None:
    return cmdline.flag(sysroot.read_text("/proc/cmdline", default=""), name)


def free_pages_restore_as_zeros(sysroot: Sysroot) -> bool:
    """False when this kernel checks its free pages for a poison pattern (page_poison=1 on its
    command line, CONFIG_PAGE_POISONING): B's free-page exclusion restores free pages as zeros,
    which such a kernel would report as memory corruption. Then the job saves every page."""
    return _cmdline_flag(sysroot, "page_poison") is not True


def free_pages_zeroed(sysroot: Sysroot) -> tuple[bool, str]:
    """Whether this kernel expects its free pages to hold zeros (init_on_free), and why.

    With init_on_free the page allocator zeroes every page it frees and then skips zeroing
    ``__GFP_ZERO`` allocations, so a free page must come back from a restore as zeros. Without
    it a free page's contents are never looked at, and a restore may leave A's free memory as
    it finds it. The last ``init_on_free=`` on /proc/cmdline decides; without one the build's
    CONFIG_INIT_ON_FREE_DEFAULT_ON does; when neither can be read the answer is True (zeros:
    slower, never wrong).
    """
    said = _cmdline_flag(sysroot, "init_on_free")
    if said is not None:
        return said, f"init_on_free={int(said)} on the command line"
    config = kconfig.read(sysroot)
    if config is None:
        return True, (
            "the kernel's configuration is unreadable (no /proc/config.gz or /boot/config-*)"
        )
    if config.get("INIT_ON_FREE_DEFAULT_ON") == "y":
        return True, "CONFIG_INIT_ON_FREE_DEFAULT_ON=y"
    return False, "init_on_free is off"


#: room in the load window beyond the kernel's init_size and the initrd: the real-mode setup,
#: the command line, purgatory and the ELF core header kexec-tools adds (a few hundred KiB)
WINDOW_SLACK = 8 << 20
BZIMAGE_MAGIC_OFFSET, BZIMAGE_MAGIC = 0x202, b"HdrS"


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def segment_window(
    kernel: os.PathLike[str] | str, initrd_size: int, area: JumpArea
) -> tuple[int, int]:
    """[start, end) at the top of the jump area where a load of ``kernel`` (a bzImage) with
    an initrd of ``initrd_size`` bytes fits: its init_size (the room it decompresses and runs
    in) and the initrd, each rounded up to the kernel's alignment, plus WINDOW_SLACK. The
    whole area when the header cannot say (not a bzImage, boot protocol before 2.10)."""
    whole = (area.start, area.end)
    try:
        with open(kernel, "rb") as f:
            head = f.read(0x270)
    except OSError:
        return whole
    if len(head) < 0x270 or head[BZIMAGE_MAGIC_OFFSET : BZIMAGE_MAGIC_OFFSET + 4] != BZIMAGE_MAGIC:
        return whole
    (protocol,) = struct.unpack_from("<H", head, 0x206)
    (align,) = struct.unpack_from("<I", head, 0x230)
    (init_size,) = struct.unpack_from("<I", head, 0x260)
    if protocol < 0x20A or not init_size:
        return whole
    align = max(align, 4096)
    need = _round_up(init_size, align) + _round_up(initrd_size, align) + WINDOW_SLACK
    start = (area.end - need) // align * align
    if start <= area.start:
        return whole
    return (start, area.end)


#: the kernel's command line is at most 2048 bytes on x86 (COMMAND_LINE_SIZE)
CMDLINE_MAX = 2048


def main_memory_words(area: JumpArea, main_ram: Sequence[tuple[int, int]]) -> list[str]:
    """``memmap=SIZE#START`` for A's RAM above the first MiB outside the jump area: to B it
    is ACPI data, never its own RAM, and x86's kexec maps ACPI data into the identity map of
    every jump, so B's jump back reaches A's entry page without a segment on it
    (kjumpd.agent.jumpback says why that matters)."""
    out = []
    for s, e in main_ram:
        s = max(s, 1 << 20)
        for a, b in ((s, min(e, area.start)), (max(s, area.end), e)):
            a, b = -(-a // 4096) * 4096, b // 4096 * 4096
            if b > a:
                out.append(f"memmap={format_size(b - a)}#{format_size(a)}")
    return out


def save_cmdline(
    config: Config,
    area: JumpArea,
    role: str = "save",
    main_ram: Sequence[tuple[int, int]] = (),
) -> str:
    """B's command line; with ``main_ram`` (A's RAM) it also maps A's memory for the jump
    back (main_memory_words), unless the line would grow past the kernel's limit."""
    head = (
        f"{config.save_kernel_append()} {QUICK_BOOT_PARAMS} {B_ONLY_PARAMS} "
        "memmap=exactmap memmap=512K@0K"
    ).strip()
    tail = f"memmap={format_size(area.size)}@{format_size(area.start)} kjump.role={role}"
    words = main_memory_words(area, main_ram)
    line = " ".join([head, *words, tail])
    if len(line) >= CMDLINE_MAX - 256:  # room for kexec-tools' kexec_jump_back_entry=
        log.warning("A's RAM map does not fit B's command line; its entry page is a segment")
        line = f"{head} {tail}"
    return line


def stage_initrd(sysroot: Sysroot, base: str, expect_sha256: str = "") -> str:
    """Copy B's initramfs and its zero padding to 512 bytes to ``INITRD + ".new"`` (tmpfs),
    ahead of the freeze; returns that system path. With ``expect_sha256`` the copy must
    still have the hash preflight checked. finish_initrd appends the job once it is known."""
    out = sysroot.path(INITRD)
    if sysroot.is_real:
        if keymem.mount_ramfs(INITRD_DIR):
            log.info("the save kernel's initrd is written to a ramfs (%s)", INITRD_DIR)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".new")
    try:
        h = hashlib.sha256()
        with open(sysroot.path(base), "rb") as src, open(tmp, "wb") as dst:
            os.fchmod(dst.fileno(), 0o600)
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
            dst.write(b"\0" * (-dst.tell() % 512))
        if expect_sha256 and h.hexdigest() != expect_sha256:
            tmp.unlink()
            raise KexecError(
                f"{base} changed since the preflight",
                why=f"sha256 {h.hexdigest()}, expected {expect_sha256}",
                fix="let the save kernel's installation finish, then try again",
            )
    except OSError as e:
        _unlink(tmp)
        raise KexecError(
            "cannot write the save kernel's initrd",
            why=f"{e.filename}: {e.strerror or e}",
            fix="check /run (tmpfs) has room and the initramfs exists",
        ) from None
    return INITRD + ".new"


def finish_initrd(sysroot: Sysroot, job: Job) -> str:
    """Append the job cpio to the initrd stage_initrd prepared and move it to INITRD;
    returns its system path. Only /run (tmpfs) is written."""
    out = sysroot.path(INITRD)
    tmp = out.with_name(out.name + ".new")
    try:
        with open(tmp, "r+b") as dst:
            dst.seek(0, os.SEEK_END)
            if dst.tell() % 512:
                raise KexecError(
                    "the staged save kernel initrd is not padded",
                    why=f"{tmp}: {dst.tell()} bytes",
                    fix="a bug: report it with the kjumpd log",
                )
            dst.write(job.to_cpio())
        os.replace(tmp, out)
    except OSError as e:
        _unlink(tmp)
        raise KexecError(
            "cannot write the save kernel's initrd with the job",
            why=f"{e.filename}: {e.strerror or e}",
            fix="check /run (tmpfs) has room and the initramfs exists",
        ) from None
    return INITRD


def write_initrd(sysroot: Sysroot, base: str, job: Job, expect_sha256: str = "") -> str:
    """B's initramfs + zero padding to 512 bytes + the job cpio, at /run/kjumpd; returns its
    system path (stage_initrd, then finish_initrd)."""
    stage_initrd(sysroot, base, expect_sha256)
    return finish_initrd(sysroot, job)


def _unlink(p: os.PathLike[str]) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def remove_initrd(sysroot: Sysroot) -> None:
    """Remove the initrd and a staged one (stage_initrd), and their ramfs."""
    for p in (INITRD, INITRD + ".new"):
        try:
            sysroot.path(p).unlink()
        except FileNotFoundError:
            pass
    if sysroot.is_real:
        keymem.unmount_ramfs(INITRD_DIR)
    else:
        try:
            sysroot.path(INITRD_DIR).rmdir()
        except OSError:
            pass


def _why(r: subprocess.CompletedProcess[str]) -> str:
    """The line of kexec-tools' output that says what failed (it prints the segment list
    after "kexec_load failed: ..."), else its last line."""
    lines = [x.strip() for x in (r.stderr + "\n" + r.stdout).splitlines() if x.strip()]
    for x in lines:
        if "failed" in x.lower() or "error" in x.lower() or "cannot" in x.lower():
            return x[:300]
    return lines[-1][:300] if lines else f"rc {r.returncode}"


@dataclass
class Kexec:
    binary: str
    timeout: float = 120.0
    #: what the last load's clearing of its window did (kjumpd.daemon.areaclear)
    cleared: areaclear.Cleared | None = None

    @classmethod
    def find(cls, config: Config) -> Kexec:
        path = shutil.which(config.kexec)
        if path is None:
            raise KexecError(
                f"{config.kexec} is not installed",
                why="not found on PATH",
                fix="apt-get install kexec-tools",
            )
        return cls(path, config.timeout_kexec)

    def _run(
        self, args: list[str], what: str, timeout: float | None, prefix: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        argv = [*prefix, self.binary, *args]
        log.info("running %s", " ".join(argv))
        try:
            return subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise KexecError(
                f"kexec {what} timed out", why=f"no answer in {timeout:g} s", fix="check dmesg"
            ) from None
        except OSError as e:
            raise KexecError(
                f"cannot run {self.binary}", why=e.strerror or str(e), fix="reinstall kexec-tools"
            ) from None

    def load(
        self, sysroot: Sysroot, kernel: str, initrd: str, cmdline: str, area: JumpArea
    ) -> tuple[int, int]:
        """Load B for a preserve-context jump; returns the [start, end) its segments were
        placed in (segment_window, or the whole area when the window was refused)."""
        try:
            initrd_size = os.stat(sysroot.path(initrd)).st_size
        except OSError:
            initrd_size = area.size
        window = segment_window(sysroot.path(kernel), initrd_size, area)
        while True:
            start, end = window
            self.cleared = areaclear.clear(sysroot, area, window)
            log.info("%s", self.cleared.describe())
            r = self._run(
                [
                    "-c",
                    "--load-preserve-context",
                    f"--mem-min={start:#x}",
                    f"--mem-max={end - 1:#x}",
                    "--no-checks",
                    str(sysroot.path(kernel)),
                    f"--initrd={sysroot.path(initrd)}",
                    f"--append={cmdline}",
                ],
                "load",
                self.timeout,
            )
            if r.returncode == 0:
                return window
            if window == (area.start, area.end):
                raise KexecError(
                    "loading the save kernel failed",
                    why=_why(r),
                    fix="check that the jump area is free (kexec -p -u) and lockdown is off",
                    returncode=r.returncode,
                )
            log.warning(
                "kexec refused the load in %#x-%#x (%s); loading into the whole jump area",
                start,
                end - 1,
                _why(r),
            )
            window = (area.start, area.end)

    def jump(self) -> tuple[int, str]:
        """Jump to B; returns (exit status, what kexec printed) when B jumps back, or at once
        if the jump did not happen. kexec-tools prints "kexec failed: <errno text>" in both
        cases (after a round trip the errno is stale): the image header says what happened."""
        r = self._run(["-e", "-x", "-y"], "jump", None)
        said = (r.stderr or r.stdout).strip()[-400:]
        log.info(
            "kexec -e came back, exit status %d (%s): kexec-tools reports a return from the "
            "jump as a failure too; the image header tells what happened",
            r.returncode,
            said or "no message",
        )
        return r.returncode, said

    def unload(self, nice: bool = False) -> None:
        """``kexec -u``; ``nice``: at the lowest CPU priority (through nice(1) when it is
        installed), for an unload that runs while the user's programs carry on."""
        tool = shutil.which("nice") if nice else None
        r = self._run(["-u"], "unload", self.timeout, (tool, "-n", "19") if tool else ())
        if r.returncode != 0:
            raise KexecError("unloading the save kernel failed", why=_why(r), fix="run kexec -u")
