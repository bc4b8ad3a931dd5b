"""The restore-first decision (R): restore the saved image, or boot the normal kernel.

Pure logic: everything here takes what R has read from the disks and returns a decision; the
edge that reads devices, writes the header and runs kexec is kjumpd/restore/init.py.

Guards (DESIGN.md "Restore", invariant I3), in this order; the first that fails decides:

1. a target with our UUID at ``kjump.offset`` exists (else BootNormal: nothing to restore);
2. the header is readable (else Invalidate "corrupt");
3. state: EMPTY/CONSUMED/ABORTED/INVALID → BootNormal (no image); WRITING → Invalidate
   "incomplete"; SAVED → attempt 0; RESTORING(n) → attempt n;
4. the header belongs to this target (its UUID), the metadata (extent table) and the chunk
   table checksums are good (else Invalidate "corrupt");
5. attempt < max_attempts (else Invalidate "attempts");
6. the same save kernel (hash) as R carries (else Invalidate "save-kernel"), and a jump area
   B can run in: the image records where A's area was when it saved (with KASLR, or with
   ``crashkernel=SIZE`` and no fixed offset, it may differ from boot to boot), and R loads B
   there; it must be whole pages, RAM on this boot, and hold none of the image's memory
   (else Invalidate "jump-area");
7. the machine has the RAM the image was saved on: the RAM map recorded at save time equals
   this boot's (same source, kjumpd/linux/iomem.py); without a recorded map, every saved
   extent lies in RAM here (else Invalidate "memory");
8. every filesystem recorded at save time is found by (fstype, UUID), exactly once, and its
   superblock stamp is unchanged (else Invalidate "stale").

All pass → Restore(attempt + 1): R writes RESTORING(attempt + 1) durably, then kexecs B.
A refused image is marked INVALID("<code>: <detail>") and stays on disk; ``explain`` says
in words what a header's state and reason mean (the daemon's status shows the state as is).

The boot.json R reads is kjumpd/bootconfig.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kjumpd.bootconfig import B_ONLY_PARAMS, DEFAULT_MAX_ATTEMPTS, QUICK_BOOT_PARAMS, BootConfig
from kjumpd.errors import FsStampError, MemoryMapError
from kjumpd.fsstamp import FsStamp
from kjumpd.image.format import clip_reason
from kjumpd.linux import cmdline
from kjumpd.linux.iomem import RamMap, changed, outside_ram

PAGE = 4096

# header states (kjumpd.image.format.ImageState), by name so this module stays pure
_NO_IMAGE = ("EMPTY", "CONSUMED", "ABORTED", "INVALID")

#: refusal codes (the part of INVALID(reason) before the colon)
CODES = {
    "corrupt": "the image or its header is damaged",
    "altered": "the encrypted image was changed after it was saved (it does not authenticate)",
    "incomplete": "the save did not finish (power lost while saving)",
    "foreign": "the header belongs to another target",
    "attempts": "restoring failed too many times",
    "save-kernel": "the image was saved by another save kernel",
    "jump-area": "the image's jump area is not one the save kernel can run in",
    "memory": "the machine's RAM changed after the image was saved",
    "stale": "a filesystem changed after the image was saved",
    "setup": "the restore-first environment cannot restore (its files are wrong)",
}


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Restore:
    """Write RESTORING(attempt) durably, then kexec the save kernel in restore role into
    ``jump_area`` (start, size): the area the image was saved with."""

    attempt: int
    jump_area: tuple[int, int]


@dataclass(frozen=True)
class BootNormal:
    """Leave the image alone (there is none to restore) and boot the normal kernel."""

    reason: str


@dataclass(frozen=True)
class Invalidate:
    """Mark the image INVALID(reason) durably, then boot the normal kernel."""

    code: str
    detail: str

    @property
    def reason(self) -> str:
        return clip_reason(f"{self.code}: {self.detail}")


Decision = Restore | BootNormal | Invalidate


@dataclass(frozen=True)
class HeaderView:
    """What the guards need from the image header (kjumpd.image.format.Header)."""

    state: str  # ImageState name
    attempt: int
    uuid: str  # the header's target UUID
    save_kernel_hash: str
    jump_area: tuple[int, int]
    reason: str = ""

    @classmethod
    def of(cls, header: Any) -> HeaderView:
        import uuid as uuidlib

        return cls(
            state=header.state.name,
            attempt=int(header.attempt),
            uuid=str(uuidlib.UUID(bytes=header.uuid)),
            save_kernel_hash=header.save_kernel_hash,
            jump_area=(int(header.jump_area_start), int(header.jump_area_size)),
            reason=header.reason,
        )


@dataclass(frozen=True)
class Evidence:
    """What R read. An ``*_error`` string means that read failed (the error's message)."""

    target_found: bool
    target_uuid: str = ""
    header: HeaderView | None = None
    header_error: str = ""
    fs_stamps: list[dict[str, Any]] | None = None  # from the metadata's identity
    metadata_error: str = ""
    chunks_error: str = ""  # the chunk table walk / data CRC
    current: dict[tuple[str, str], list[FsStamp]] = field(default_factory=dict)
    setup_error: str = ""  # R's own files failed their check
    extents: list[tuple[int, int]] = field(default_factory=list)  # the image's memory ranges
    ram_saved: Any = None  # the identity's ram_map (a dict), None when it has none
    ram_now: dict[str, RamMap] = field(default_factory=dict)  # this boot's RAM maps by source


@dataclass(frozen=True)
class Expected:
    """What R is set up to restore with (from boot.json)."""

    save_kernel_hash: str
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


def expected_of(cfg: BootConfig) -> Expected:
    """What an image must match to be restored by the environment ``cfg`` describes."""
    return Expected(cfg.save_hash, cfg.max_attempts)


def check_stamps(
    recorded: list[dict[str, Any]], current: dict[tuple[str, str], list[FsStamp]]
) -> str | None:
    """None when every recorded filesystem is found once and unchanged; else why not."""
    for rec in recorded:
        try:
            old = FsStamp.from_dict(rec)
        except FsStampError as e:
            return f"recorded filesystem stamp unreadable ({e.what})"
        now = current.get(old.key, [])
        if not now and old.ciphertext:
            return (
                f"{old.fstype} {old.uuid} below dm-crypt (was {old.device}): its encrypted "
                "superblock is not on any disk as it was frozen"
            )
        if not now:
            return f"{old.fstype} {old.uuid} (was {old.device}) not found"
        if len(now) > 1:
            devs = ", ".join(s.device for s in now)
            return f"{old.fstype} {old.uuid} found {len(now)} times ({devs})"
        if now[0].changed_since(old):
            return now[0].describe_changes(old)
    return None


def decide(ev: Evidence, exp: Expected) -> Decision:
    """The restore-first decision. Pure; see the module docstring for the order of guards."""
    if not ev.target_found:
        return BootNormal("no kjumpd target found")
    if ev.header is None:
        return Invalidate("corrupt", f"header unreadable ({ev.header_error or 'no header'})")
    h = ev.header
    if h.state in _NO_IMAGE:
        return BootNormal(f"no image to restore (state {h.state})")
    if h.state == "WRITING":
        return Invalidate("incomplete", "the header says WRITING: the save never finished")
    if h.state == "SAVED":
        attempt = 0
    elif h.state == "RESTORING":
        attempt = h.attempt
    else:
        return Invalidate("corrupt", f"unknown state {h.state}")
    if ev.target_uuid and h.uuid != ev.target_uuid:
        return Invalidate("foreign", f"header UUID {h.uuid} is not the target's {ev.target_uuid}")
    if ev.metadata_error or ev.fs_stamps is None:
        return Invalidate("corrupt", f"image metadata: {ev.metadata_error or 'no fs_stamps'}")
    if ev.chunks_error:
        return Invalidate("corrupt", f"chunk table: {ev.chunks_error}")
    if attempt >= exp.max_attempts:
        return Invalidate(
            "attempts", f"{attempt} restore attempts failed (maximum {exp.max_attempts})"
        )
    if ev.setup_error:
        return Invalidate("setup", ev.setup_error)
    if h.save_kernel_hash != exp.save_kernel_hash:
        return Invalidate(
            "save-kernel",
            f"image needs {h.save_kernel_hash or 'none'}, R has {exp.save_kernel_hash}",
        )
    # RAM first: on a machine whose memory changed, that is the cause to name, not the
    # jump area that may have gone with it
    why = check_ram(ev)
    if why is not None:
        return Invalidate("memory", why)
    why = check_jump_area(h.jump_area, ev)
    if why is not None:
        return Invalidate("jump-area", why)
    why = check_stamps(ev.fs_stamps, ev.current)
    if why is not None:
        return Invalidate("stale", why)
    return Restore(attempt + 1, (int(h.jump_area[0]), int(h.jump_area[1])))


def check_jump_area(area: tuple[int, int], ev: Evidence) -> str | None:
    """None when B can be loaded into ``area`` (the image's) on this boot; else why not."""
    start, size = area
    if size <= 0 or start < 0 or start % PAGE or size % PAGE:
        return f"{_area(area)} is not a whole number of pages"
    inside = [(s, e) for s, e in ev.extents if s < start + size and start < e]
    if inside:
        s, e = inside[0]
        return f"the image holds memory [{s:#x}, {e:#x}) inside its jump area {_area(area)}"
    if ev.ram_now:
        why = outside_ram([(start, start + size)], ev.ram_now)
        if why is not None:
            return f"{_area(area)} is not RAM on this boot: {why}"
    return None


def check_ram(ev: Evidence) -> str | None:
    """None when this machine has the RAM the image was saved on; else why not."""
    if ev.ram_saved is None:
        if not ev.ram_now:
            return None  # an image without a recorded map, on a kernel showing none: no evidence
        return outside_ram(ev.extents, ev.ram_now)
    try:
        saved = RamMap.from_dict(ev.ram_saved)
    except MemoryMapError as e:
        return f"the recorded RAM map is unreadable ({e.what})"
    if not ev.ram_now:
        return "this boot reports no RAM map to compare with (is /proc mounted?)"
    return changed(saved, ev.ram_now, ev.extents)


def _area(a: tuple[int, int]) -> str:
    return f"{a[1] >> 20}M@{a[0]:#x}"


def explain(state: str, reason: str, attempt: int = 0) -> dict[str, Any]:
    """What ``kjumpctl status`` shows about an image header after a boot.

    ``refused`` is true for an image R invalidated; ``code`` is one of CODES then.
    """
    out: dict[str, Any] = {
        "state": state,
        "refused": False,
        "code": "",
        "reason": reason,
        "summary": "",
    }
    if state == "INVALID":
        code = reason.split(":", 1)[0].strip() if ":" in reason else ""
        out.update(
            refused=code in CODES,
            code=code,
            summary=f"the image was not restored: {CODES.get(code, reason)}",
        )
    elif state == "RESTORING":
        out["summary"] = f"restore attempt {attempt} did not complete"
    elif state == "SAVED":
        out["summary"] = "an image is saved and will be restored at the next boot"
    return out


# ---------------------------------------------------------------- kexec command lines


def restore_cmdline(cfg: BootConfig, attempt: int, area: tuple[int, int]) -> str:
    """B's command line in restore role (exactmap: B's memory is the low 512K + ``area``)."""
    start, size = area
    base = cmdline.without(
        cfg.save.cmdline,
        (
            "memmap",
            "kjump.role",
            "kjump.target",
            "kjump.offset",
            "kjump.attempt",
            "crashkernel",
            *(w.split("=", 1)[0] for w in f"{QUICK_BOOT_PARAMS} {B_ONLY_PARAMS}".split()),
        ),
    )
    return (
        f"{base} {QUICK_BOOT_PARAMS} {B_ONLY_PARAMS} memmap=exactmap memmap=512K@0K "
        f"memmap={size >> 10}K@{start >> 10}K "
        f"kjump.role=restore kjump.target={cfg.target_uuid} kjump.offset={cfg.target_offset} "
        f"kjump.attempt={attempt}"
    ).strip()


def restore_kexec_args(cfg: BootConfig, attempt: int, area: tuple[int, int]) -> list[str]:
    """kexec-tools arguments that load B into ``area``, the image's jump area (a plain load:
    R is not kept).

    ``--no-checks`` skips purgatory's SHA-256 pass over the segments (R executes them right
    after loading; B checks every chunk of the image itself): it saves about a second.
    """
    start, size = area
    args = [
        "kexec",
        "-l",
        "--no-checks",
        f"--mem-min={start:#x}",
        f"--mem-max={start + size - 1:#x}",
        cfg.save.kernel,
    ]
    if cfg.save.initrd:
        args.append(f"--initrd={cfg.save.initrd}")
    args.append(f"--append={restore_cmdline(cfg, attempt, area)}")
    return args


def normal_kexec_args(cfg: BootConfig, note: str = "") -> list[str]:
    """kexec-tools arguments that load the normal kernel with its own command line.

    ``note`` (e.g. "invalid:stale") is appended as kjump.rf=NOTE so the booted system can tell
    it came through R and why.
    """
    line = cmdline.without(cfg.normal.cmdline, ("kjump.rf",))
    if note:
        line = f"{line} kjump.rf={'-'.join(note.split())}".strip()
    args = ["kexec", "-l", "--no-checks", cfg.normal.kernel]
    if cfg.normal.initrd:
        args.append(f"--initrd={cfg.normal.initrd}")
    args.append(f"--append={line}")
    return args
