"""The jump back from the save kernel (B) to the main kernel (A): kexec_load(2) + reboot(2).

kexec-tools' ``--load-jump-back-helper`` fails on current kernels (docs/KERNEL-NOTES.md): it
passes one zero-size segment at 0 and the control-page allocation eats all RAM. What works
is our own kexec_load(2) (x86_64 syscall 246) with

- entry = A's jump-back entry (``kexec_jump_back_entry=`` on B's command line for a save;
  the image header's jump-back entry for a restore),
- flags = KEXEC_PRESERVE_CONTEXT | KEXEC_ARCH_DEFAULT,
- segments that put A's entry page in the identity map of the jump, which x86's kexec
  builds from B's RAM, every segment's range and the ACPI data regions:
  - for a save, when B's memory map shows A's RAM as ACPI data (kjumpd.daemon.kexec:
    main_memory_words), one *anchor* page of B's own memory (:func:`anchor`) and nothing of
    A's. A preserve-context jump swaps each segment page with its copy on the way out and
    back again on the way in, so a page A writes while B is parked (its entry page: the
    stack pointer and registers of each jump) would show B its content of the jump before,
    and an image saved by a save kernel A jumped into again would hold that stale page:
    the restore would return into A on a dead stack. B's own page is neutral: nothing
    writes it while B is away.
  - otherwise (a restore, or a command line without A's RAM), one 4096-byte segment whose
    destination is the entry's page and whose bytes are that page's current contents read
    from /dev/mem (content-neutral for the first jump back; a save kernel loaded this way
    takes no second job: kjumpd.agent.kernel_role),
- plus, on restore, A's pages that lie in B's own memory (the low 512K) as extra segments:
  the kernel copies segments after B has stopped. At most KEXEC_SEGMENT_MAX (16) in all.

then reboot(2) with LINUX_REBOOT_CMD_KEXEC. If A later jumps to B again, reboot(2) returns.
:func:`plan_segments` is pure (tested in tests/unit); :func:`load`, :func:`anchor` and
:func:`execute` are the system calls.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from kjumpd.errors import KexecError
from kjumpd.linux.kexecload import (
    KEXEC_ARCH_DEFAULT,
    KEXEC_PRESERVE_CONTEXT,
    KEXEC_SEGMENT_MAX,
    LoadSegment,
    kexec_load,
)
from kjumpd.linux.pagemap import PAGEMAP, LockedPages

log = logging.getLogger("kjumpd.agent.jumpback")

PAGE = 4096
LINUX_REBOOT_CMD_KEXEC = 0x45584543


@dataclass(frozen=True)
class Segment:
    """Bytes the kernel copies to physical address ``mem`` when it executes the image."""

    mem: int
    data: bytes

    @property
    def end(self) -> int:
        return self.mem + len(self.data)


def entry_page(entry: int) -> int:
    return entry & ~(PAGE - 1)


def plan_segments(
    entry: int,
    entry_page_bytes: bytes | None,
    held: Sequence[Segment] = (),
    entry_mapped: bool = False,
) -> list[Segment]:
    """The segments of the jump-back load: held pages, plus the entry page unless they hold
    it or ``entry_mapped`` (the kernel maps it anyway: an ACPI data region of B's map).

    Raises KexecError when a segment is not page aligned, segments overlap, the entry page is
    missing, or there are more than KEXEC_SEGMENT_MAX of them.
    """
    if entry <= 0:
        raise KexecError(
            "no jump-back entry",
            why="the main kernel's entry address is 0",
            fix="B must be started by `kexec -e` from a preserve-context load, or "
            "the image must record the entry",
        )
    segs = sorted((s for s in held if s.data), key=lambda s: s.mem)
    for s in segs:
        if s.mem % PAGE or len(s.data) % PAGE:
            raise KexecError(
                f"jump-back segment at {s.mem:#x} ({len(s.data)} bytes) is not page aligned",
                fix="this is a bug in the agent",
            )
    for a, b in zip(segs, segs[1:]):
        if b.mem < a.end:
            raise KexecError(
                f"jump-back segments at {a.mem:#x} and {b.mem:#x} overlap",
                fix="this is a bug in the agent",
            )
    page = entry_page(entry)
    if not segs and entry_mapped:
        raise KexecError("the jump back needs one segment", fix="this is a bug in the agent")
    if not entry_mapped and not any(s.mem <= page < s.end for s in segs):
        if entry_page_bytes is None or len(entry_page_bytes) != PAGE:
            raise KexecError(
                "the jump-back entry page was not read", why=f"need {PAGE} bytes of page {page:#x}"
            )
        segs.append(Segment(page, bytes(entry_page_bytes)))
        segs.sort(key=lambda s: s.mem)
    if len(segs) > KEXEC_SEGMENT_MAX:
        raise KexecError(
            f"the jump back needs {len(segs)} segments, the kernel takes at most "
            f"{KEXEC_SEGMENT_MAX}",
            why="the main kernel's pages in the save kernel's low memory are too scattered",
            fix="report this; the image itself is intact",
        )
    return segs


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


#: the anchor page and its segment: they live as long as the agent (B may be resumed any
#: time, and the loaded jump back swaps that page)
_anchor: dict[str, tuple[LockedPages, Segment]] = {}


def anchor(pagemap: str = PAGEMAP) -> Segment:
    """A locked page of this process, as a segment onto its own physical page: what makes
    the jump-back load a preserve-context image without a segment on A's memory (the
    module's docstring says why). KexecError when the page cannot be locked or located."""
    if "page" in _anchor:
        return _anchor["page"][1]
    page = LockedPages(
        (b"kjumpd jump-back anchor\n" * (PAGE // 24 + 1))[:PAGE],
        "the jump back's anchor page",
        pagemap=pagemap,
    )
    try:
        (frame,) = page.frames()
    except KexecError:
        page.close()
        raise
    seg = Segment(frame * PAGE, bytes(page.map))
    _anchor["page"] = (page, seg)
    return seg


def load(entry: int, segments: Sequence[Segment]) -> None:
    """kexec_load(entry, segments, KEXEC_PRESERVE_CONTEXT): replaces any loaded image."""
    err = kexec_load(
        entry,
        [LoadSegment(s.mem, len(s.data), s.data) for s in segments],
        KEXEC_PRESERVE_CONTEXT | KEXEC_ARCH_DEFAULT,
    )
    if err:
        hint = {
            errno.EPERM: "kexec_load is not allowed (root? lockdown? kexec_load_disabled?)",
            errno.EBUSY: "another kexec image is being loaded",
            errno.ENOMEM: "the kernel could not allocate the control pages",
            errno.EINVAL: "the kernel refused the segments or the flags "
            "(CONFIG_KEXEC_JUMP missing?)",
        }.get(err, "")
        raise KexecError(
            "kexec_load of the jump back failed",
            why=f"{os.strerror(err)}" + (f"; {hint}" if hint else ""),
            fix="the main kernel cannot be resumed from here; power off",
            errno=err,
            entry=hex(entry),
            segments=len(segments),
        )
    log.info(
        "jump back loaded: entry %#x, %d segment(s), %d bytes",
        entry,
        len(segments),
        sum(len(s.data) for s in segments),
    )


def execute() -> None:
    """reboot(LINUX_REBOOT_CMD_KEXEC): jumps to A; returns only if A jumps to B again."""
    libc = _libc()
    os.sync()
    rc = libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_KEXEC))
    if rc != 0:
        err = ctypes.get_errno()
        raise KexecError(
            "the jump back failed",
            why=os.strerror(err),
            fix="the main kernel cannot be resumed from here; power off",
            errno=err,
        )
