"""A warm save kernel: B booted ahead of time and parked, so that a hibernation is one jump.

With ``[save_kernel] warm = true`` the daemon boots B once, at its start and again after each
resume (kjumpd.daemon.transaction: Hibernation.warm_up): B finds the target, answers PARKED
in the target's job slot (kjumpd.image.jobslot) and jumps back. The kernel keeps the loaded
image, whose start is now B's return point: the next ``kexec -e`` resumes B inside its
reboot(2) instead of booting it. A hibernation then writes its job into locked pages of
this process (:class:`Mailbox`), their physical place into the job slot, and jumps; B reads
the job through /dev/mem, checks its digest and that it names the target, jump area and save
kernel B was booted for, and saves.

The cold path (load B at the hibernation, as without this option) stays, and the outcome
says which one ran and why (``save_kernel``, ``save_kernel_cold``): the option is off, the
save kernel is not parked yet, what B was parked for changed (:func:`changed`), the kexec
image is gone (``kexec -u``, or another program loaded its own), the target has no job slot,
the job's pages could not be located, or B refused the job (then B is loaded cold and A
jumps again, in the same hibernation).

A warm-up that never came back (B hung and the watchdog reset the machine, or the power
failed) leaves :data:`MARKER`; the next daemon start skips the warm-up once and says so,
so that a save kernel that cannot boot here never costs a reset at every boot.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, fields

from kjumpd.image import jobslot
from kjumpd.linux.pagemap import PAGEMAP, LockedPages
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

PAGE = 4096
#: written before a warm-up jump, removed once B is back
MARKER = "/var/lib/kjumpd/warm-up.started"


@dataclass(frozen=True)
class Fingerprint:
    """What a parked B was started for; any change means a cold load."""

    jump_area: tuple[int, int]
    target_uuid: str
    superblock_offset: int
    save_kernel_sha256: str
    save_initramfs_sha256: str
    cmdline: str
    volume_uuid: str


def changed(parked: Fingerprint, now: Fingerprint) -> list[str]:
    """The fields (as words) in which ``now`` differs from what B was parked for."""
    return [
        f.name.replace("_", " ")
        for f in fields(Fingerprint)
        if getattr(parked, f.name) != getattr(now, f.name)
    ]


@dataclass
class ParkedKernel:
    fingerprint: Fingerprint
    generation: int  # the highest job-slot generation B has seen
    how: str  # "warm-up" | "after a save"


class WarmState:
    """The daemon's knowledge of a parked save kernel (one per daemon, under the
    transaction's lock)."""

    def __init__(self) -> None:
        self.parked: ParkedKernel | None = None
        self.reason = "not warmed up yet"
        self.warming = False

    def describe(self) -> str:
        p = self.parked
        if self.warming:
            return "warming up"
        if p is not None:
            return f"parked ({p.how})"
        return f"loaded at each hibernation ({self.reason})"

    def park(self, fp: Fingerprint, generation: int, how: str) -> None:
        self.parked = ParkedKernel(fp, generation, how)
        self.reason = ""

    def drop(self, reason: str) -> None:
        if self.parked is not None:
            log.info("the parked save kernel is given up: %s", reason)
        self.parked, self.reason = None, reason

    def unusable(self, fp: Fingerprint, sysroot: Sysroot) -> str:
        """Why the parked save kernel cannot take a job for ``fp`` ("" when it can)."""
        p = self.parked
        if p is None:
            return self.reason
        diff = changed(p.fingerprint, fp)
        if diff:
            return "it was started for another " + ", ".join(diff)
        if not kexec_loaded(sysroot):
            return "no kexec image is loaded any more (kexec -u, or another program's load)"
        return ""

    def next_generation(self) -> int:
        assert self.parked is not None
        g = max(time.time_ns(), self.parked.generation + 1)
        self.parked.generation = g
        return g


def kexec_loaded(sysroot: Sysroot) -> bool:
    return sysroot.read_text("/sys/kernel/kexec_loaded", "0").strip() == "1"


class Mailbox(LockedPages):
    """A job in locked pages of this process, and the physical runs they occupy (the
    daemon has the CAP_SYS_ADMIN pagemap needs). The pages are zeroed and unlocked at
    :meth:`close`."""

    def __init__(self, data: bytes, sysroot: Sysroot) -> None:
        super().__init__(
            data,
            "the job's pages",
            fix="kjumpd needs CAP_IPC_LOCK and CAP_SYS_ADMIN; the save kernel is loaded cold",
            pagemap=str(sysroot.path(PAGEMAP)),
        )

    def runs(self) -> list[tuple[int, int]]:
        return jobslot.runs_of_frames(self.frames())


def begin_marker(sysroot: Sysroot) -> None:
    p = sysroot.path(MARKER)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as f:
        f.write(f"{time.time():.0f}\n")
        f.flush()
        os.fsync(f.fileno())


def end_marker(sysroot: Sysroot) -> None:
    try:
        sysroot.path(MARKER).unlink()
    except FileNotFoundError:
        pass


def left_marker(sysroot: Sysroot) -> bool:
    """True (and the marker removed) when the last warm-up never came back."""
    p = sysroot.path(MARKER)
    if not p.exists():
        return False
    end_marker(sysroot)
    return True
