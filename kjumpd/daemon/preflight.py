"""Preflight: exactly what ``kjumpctl check`` runs, and the first step of every hibernation.

Each item has a name, ok, a detail and a fix. ``fatal`` items must be ok for a hibernation
to start (``report.ok``); the others are advice. The report also carries what the checks
computed (jump area, target, memory plan, identities), so the transaction does not
compute it twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kjumpd.daemon import blockmap, bootentry, encryption, fsfreeze, jumparea, memory, taskfreeze
from kjumpd.daemon.config import Config
from kjumpd.errors import FreezeError, KjumpError
from kjumpd.hashing import sha256_file
from kjumpd.linux import cmdline, kconfig, mountinfo
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreflightItem:
    name: str
    ok: bool
    detail: str = ""
    fix: str = ""
    fatal: bool = True


@dataclass
class PreflightPlan:
    """What the checks computed, for the transaction and ``kjumpctl plan``: each field is
    None when its check did not get that far."""

    kernel_sha256: str | None = None
    initramfs_sha256: str | None = None
    need: int | None = None  # bytes the jump area must hold
    area: jumparea.JumpArea | None = None
    memory: memory.MemoryPlan | None = None
    target: blockmap.Target | None = None
    uuid: str | None = None
    encryption: encryption.EncryptionPlan | None = None


@dataclass
class PreflightReport:
    items: list[PreflightItem] = field(default_factory=list)
    plan: PreflightPlan = field(default_factory=PreflightPlan)

    @property
    def ok(self) -> bool:
        return all(i.ok for i in self.items if i.fatal)

    def step(self, name: str, fn: Callable[[], str], fatal: bool = True) -> bool:
        """Run one check: its result is the item's detail; a KjumpError is a failed item."""
        try:
            self.items.append(PreflightItem(name, True, fn(), fatal=fatal))
            return True
        except KjumpError as e:
            why = e.what + (f": {e.why}" if e.why else "")
            self.items.append(PreflightItem(name, False, why, e.fix, fatal=fatal))
            return False

    def failed(self) -> list[PreflightItem]:
        return [i for i in self.items if not i.ok and i.fatal]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "items": [vars(i) for i in self.items]}

    def text(self) -> str:
        lines = []
        for i in self.items:
            mark = "ok  " if i.ok else ("FAIL" if i.fatal else "warn")
            line = f"[{mark}] {i.name}: {i.detail}"
            if not i.ok and i.fix:
                line += f"\n       fix: {i.fix}"
            lines.append(line)
        return "\n".join(lines)


#: sha256 of the save kernel's files hashed earlier in this process, with the stat fields
#: any change to a file alters (device, inode, size, mtime, ctime). The daemon hashes them at
#: start (warm_hashes) and at a hibernation only re-checks the stat (hashing reads every
#: byte of the files, on the path the user waits on); ``kjumpctl check`` (a new process)
#: always hashes.
_HASHED: dict[str, tuple[tuple[int, ...], str]] = {}
_HASHED_LOCK = threading.Lock()
#: a file changed less than this long ago is hashed every time: a write in the same clock
#: tick as the hashing could leave its ctime unchanged ("racily clean", as git calls it)
SETTLED_SECONDS = 2.0


def _stat_key(path: os.PathLike[str] | str) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_sha256(path: os.PathLike[str] | str) -> str:
    """sha256 of a file; from the cache when its stat is what it was when hashed."""
    name = os.fspath(path)
    key = _stat_key(name)
    with _HASHED_LOCK:
        hit = _HASHED.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    got = sha256_file(name)
    after = _stat_key(name)
    if after == key and time.time() - key[4] / 1e9 > SETTLED_SECONDS:
        with _HASHED_LOCK:
            _HASHED[name] = (key, got)
    return got


def warm_hashes(sysroot: Sysroot, config: Config) -> None:
    """Hash the save kernel's files into the cache (the daemon runs this at start, in a
    thread); a file that is missing or unreadable is left for preflight to report."""
    for path in (config.save_kernel, config.save_initramfs):
        try:
            file_sha256(sysroot.path(path))
        except OSError:
            pass


def kexec_jump_config(sysroot: Sysroot) -> tuple[bool | None, str]:
    """(True/False/None unknown, where it was read)."""
    config = kconfig.read(sysroot)
    if config is None:
        return None, "no kernel config found"
    return config.get("KEXEC_JUMP") == "y", config.source


def run(sysroot: Sysroot, config: Config, mode: str | None = None) -> PreflightReport:
    rep = PreflightReport()
    _kernel(sysroot, rep)
    files_ok = _save_kernel_files(sysroot, config, rep)
    _jump_area_and_memory(sysroot, config, rep, files_ok)
    rep.step("target", lambda: _target(sysroot, config, rep))
    _boot_entry(sysroot, rep)
    rep.step("filesystems", lambda: _filesystems(sysroot))
    rep.step("image encryption", lambda: _encryption(sysroot, config, rep))
    _user_space_freeze(sysroot, rep)
    _watchdog(sysroot, config, rep)
    _way_out(sysroot, config, mode or config.mode, rep)
    return rep


def _kernel(sysroot: Sysroot, rep: PreflightReport) -> None:
    """A kernel that can jump, and may load a kexec image."""
    add = rep.items.append
    jump, src = kexec_jump_config(sysroot)
    has_kexec = sysroot.exists("/sys/kernel/kexec_loaded")
    if jump is True:
        add(PreflightItem("kernel", True, f"CONFIG_KEXEC_JUMP=y ({src})"))
    elif jump is False:
        add(
            PreflightItem(
                "kernel",
                False,
                f"CONFIG_KEXEC_JUMP is not set ({src})",
                "boot a kernel built with CONFIG_KEXEC_JUMP=y: your distribution's with "
                "savekernel/kjumpd-kernel-config (README), or savekernel/build-kernel.sh",
            )
        )
    else:
        add(
            PreflightItem(
                "kernel",
                has_kexec,
                "kexec present (/sys/kernel/kexec_loaded); CONFIG_KEXEC_JUMP "
                "cannot be confirmed: " + src
                if has_kexec
                else "no kexec support",
                "boot a kernel built with CONFIG_KEXEC_JUMP=y",
            )
        )
    lockdown = sysroot.read_text("/sys/kernel/security/lockdown", default="").strip()
    locked = bool(lockdown) and "[none]" not in lockdown
    add(
        PreflightItem(
            "lockdown",
            not locked,
            f"lockdown: {lockdown or 'not present'}",
            "disable Secure Boot lockdown (kexec_load is refused under lockdown)",
        )
    )
    disabled = sysroot.read_text("/proc/sys/kernel/kexec_load_disabled", default="0").strip()
    add(
        PreflightItem(
            "kexec_load",
            disabled != "1",
            f"kexec_load_disabled = {disabled}",
            "it cannot be re-enabled without a reboot; remove whatever sets "
            "kernel.kexec_load_disabled=1",
        )
    )


def _save_kernel_files(sysroot: Sysroot, config: Config, rep: PreflightReport) -> bool:
    """The save kernel's files, their recorded hashes, and kexec-tools; False when a file
    is missing or replaced."""
    add = rep.items.append
    files_ok = True
    for what, path, want in (
        ("save kernel", config.save_kernel, config.save_kernel_sha256),
        ("save initramfs", config.save_initramfs, config.save_initramfs_sha256),
    ):
        p = sysroot.path(path)
        if not p.is_file():
            files_ok = False
            add(
                PreflightItem(
                    what,
                    False,
                    f"{path} is missing",
                    "kjumpctl install --save-kernel BZIMAGE installs it (and builds the "
                    "initramfs); or set [save_kernel] to where it is",
                )
            )
            continue
        got = file_sha256(p)
        key = "kernel_sha256" if what == "save kernel" else "initramfs_sha256"
        if want and got != want:
            files_ok = False
            add(
                PreflightItem(
                    what,
                    False,
                    f"{path} has sha256 {got}, config says {want}",
                    f'reinstall the save kernel, or set save_kernel.{key} = "{got}"',
                )
            )
        elif not want:
            # advice, not a refusal: the job and the image still carry this file's hash,
            # which R checks; only a replaced file goes unnoticed until then
            add(
                PreflightItem(
                    what,
                    False,
                    f"{path}: no recorded hash in the config (sha256 {got})",
                    f'set save_kernel.{key} = "{got}" in /etc/kjumpd/kjumpd.toml',
                    fatal=False,
                )
            )
        else:
            add(PreflightItem(what, True, f"{path} sha256 matches"))
        if what == "save kernel":
            rep.plan.kernel_sha256 = got
        else:
            rep.plan.initramfs_sha256 = got
    kex = shutil.which(config.kexec)
    add(
        PreflightItem(
            "kexec-tools",
            kex is not None,
            kex or f"{config.kexec} not on PATH",
            "apt-get install kexec-tools",
        )
    )

    return files_ok


def _jump_area_and_memory(
    sysroot: Sysroot, config: Config, rep: PreflightReport, files_ok: bool
) -> None:
    """The jump area, sized for the save kernel, and the memory to save around it."""
    need = None
    if files_ok:
        try:
            need = jumparea.required_size(sysroot, config)
        except KjumpError:
            need = None
    rep.plan.need = need

    def area() -> str:
        a = jumparea.find(sysroot, config, need)
        rep.plan.area = a
        return f"{a.kernel_arg} reserved" + (
            f", save kernel needs {need >> 20} MiB" if need else ""
        )

    area_ok = rep.step("jump area", area)

    a = rep.plan.area
    if area_ok and a is not None:

        def mem() -> str:
            mp = memory.build(sysroot, a)
            rep.plan.memory = mp
            return f"{mp.total >> 20} MiB of RAM in {len(mp.ranges)} ranges to save" + (
                "" if mp.firmware_checked else " (no /sys/firmware/memmap to cross-check)"
            )

        rep.step("memory map", mem)
    rep.step("jump area, next boot", lambda: jumparea.check_next_boot(sysroot, config, need))


def _target(sysroot: Sysroot, config: Config, rep: PreflightReport) -> str:
    """The image target, prepared and where its superblock says it is."""
    try:
        t, uuid = blockmap.current(sysroot, config.target, restamp=False)
    except KjumpError as e:
        if not e.context.get("moved"):
            raise
        return f"{config.target}: {e.why}; {e.fix}"
    rep.plan.target, rep.plan.uuid = t, uuid
    inside = ""
    if t.volume is not None:
        from kjumpd.daemon import volumekey

        inside = f" inside LUKS volume {t.volume.uuid} ({t.volume_node}"
        try:
            inside += f", key file {volumekey.key_file(sysroot, t)})"
        except KjumpError as e:
            inside += f"; {e.what})"
    return (
        f"{t.path} ({t.kind}, {t.size >> 20} MiB, {len(t.blockmap)} extents on "
        f"{t.disk}{inside} from {t.superblock_offset}), UUID {uuid}"
    )


def _filesystems(sysroot: Sysroot) -> str:
    """Every filesystem the hibernation freezes is one the restore-first environment can
    find again (its stamp is the stale-image guard's evidence)."""
    mounts = mountinfo.parse(sysroot.read_text("/proc/self/mountinfo", default=""))
    hidden = fsfreeze.hidden_from_restore(sysroot, mounts)
    if hidden:
        where = ", ".join(f"{m.mountpoint} on {name} ({what})" for m, name, what in hidden)
        raise FreezeError(
            f"the restore-first environment cannot check {where}",
            why="R assembles no stacked block devices; it reads through linear and "
            "dm-crypt maps onto one disk only, so it would not find these filesystems "
            "and would refuse the image as stale at the next boot",
            fix="unmount them before hibernating, or keep the filesystems on plain "
            "partitions, linear LVs on one disk or dm-crypt volumes: RAID and LVs over "
            "several disks are not supported yet",
        )
    n = len(fsfreeze.freezable(mounts))
    return f"{n} filesystem(s) to freeze, each where R can check it"


def _encryption(sysroot: Sysroot, config: Config, rep: PreflightReport) -> str:
    """Whether the image is encrypted, by the [encryption] policy."""
    target = rep.plan.target
    rep.plan.encryption = encryption.plan(
        sysroot, config, target.volume if target is not None else None
    )
    return rep.plan.encryption.detail


def _boot_entry(sysroot: Sysroot, rep: PreflightReport) -> None:
    add = rep.items.append
    problems = bootentry.check(sysroot)
    target = rep.plan.target
    unlockers = None
    if target is not None and target.volume is not None and not problems:
        unlockers = bootentry.restore_unlockers(sysroot)
        if unlockers is not None and "cryptsetup" not in unlockers:
            problems.append(
                f"the target is inside LUKS volume {target.volume.uuid}, and the restore-first "
                "entry's initramfs has no cryptsetup to unlock it: every restore would boot "
                "the normal system (fix: install cryptsetup, then run `kjumpctl install`)"
            )
    add(
        PreflightItem(
            "boot entry",
            not problems,
            "; ".join(problems) if problems else "restore-first entry installed",
            "kjumpctl setup --bootloader grub|bls|restore-first",
        )
    )
    if unlockers is not None and not problems and target is not None:
        _volume_tokens(sysroot, target, unlockers, rep)


def _volume_tokens(
    sysroot: Sysroot, target: Any, unlockers: frozenset[str], rep: PreflightReport
) -> None:
    """A TPM2 token the user enrolled opens the volume in R only when R carries its plugin;
    without it R asks for the passphrase (not fatal: someone may be there to type it)."""
    from kjumpd.linux import luks

    kinds = luks.unattended_tokens(luks.read_header_json(str(sysroot.path(target.volume_node))))
    if not kinds:
        return
    missing = [k for k in kinds if k not in unlockers]
    rep.items.append(
        PreflightItem(
            "volume token",
            not missing,
            f"LUKS volume {target.volume.uuid} has a {', '.join(missing)} token and the "
            "restore-first entry no cryptsetup plugin for it: the restore will ask for the "
            "volume's passphrase"
            if missing
            else f"the restore-first entry unlocks LUKS volume {target.volume.uuid} with its "
            f"{', '.join(kinds)} token",
            "install systemd's cryptsetup plugins and the tpm2-tss libraries (Debian and "
            "Ubuntu: libtss2-dev; systemd-cryptsetup where it is a package of its own), then "
            "run `kjumpctl install --refresh-boot-entry`",
            fatal=False,
        )
    )


def _user_space_freeze(sysroot: Sysroot, rep: PreflightReport) -> None:
    """User space is stopped before the filesystems are frozen (kjumpd.daemon.taskfreeze)."""
    add = rep.items.append
    usable, said = taskfreeze.support(sysroot)
    add(
        PreflightItem(
            "user-space freeze",
            usable,
            said,
            "mount cgroup v2 (systemd does: systemd.unified_cgroup_hierarchy=1 on "
            "older systems) on a Linux 5.2 or later kernel",
            fatal=False,
        )
    )


def _watchdog(sysroot: Sysroot, config: Config, rep: PreflightReport) -> None:
    """Whether a hung save kernel resets itself (kjumpd.agent.watchdog). Seen from A: the
    save kernel has its own drivers, but the hardware is the same."""
    stall = config.save_kernel_watchdog
    if not stall:
        detail, ok = (
            "off ([save_kernel] watchdog = 0): a hung save kernel needs a power cycle",
            True,
        )
    else:
        found = [
            f"{n} ({sysroot.read_text(f'/sys/class/watchdog/{n}/identity', '').strip() or '?'})"
            for n in sysroot.listdir("/sys/class/watchdog")
            if n.startswith("watchdog")
        ]
        ok = bool(found)
        detail = (
            f"{', '.join(found)}: the save kernel resets the machine after {stall} s without "
            "progress"
            if found
            else "this kernel drives no hardware watchdog (/sys/class/watchdog is empty): if "
            "the save kernel finds none either, a hang of it needs a power cycle"
        )
    rep.items.append(
        PreflightItem(
            "save kernel watchdog",
            ok,
            detail,
            "load the chipset's watchdog driver (iTCO_wdt, sp5100_tco, ...) to see it here; "
            "kjumpd's save kernel has those built in",
            fatal=False,
        )
    )


def _way_out(sysroot: Sysroot, config: Config, mode: str, rep: PreflightReport) -> None:
    """What the mode needs once the image is saved."""
    add = rep.items.append
    if mode == "platform":
        disk = sysroot.read_text("/sys/power/disk", default="")
        ok = sysroot.exists("/dev/snapshot") and "platform" in disk
        add(
            PreflightItem(
                "mode platform",
                ok,
                f"/dev/snapshot, /sys/power/disk: {disk.strip() or 'missing'}",
                "enable CONFIG_HIBERNATION (ACPI S4), or use mode shutdown",
            )
        )
    elif mode in ("shutdown", "reboot"):
        add(
            PreflightItem(
                f"mode {mode}",
                sysroot.exists("/proc/sysrq-trigger"),
                "/proc/sysrq-trigger",
                "enable CONFIG_MAGIC_SYSRQ",
            )
        )
    elif mode == "suspend":
        st = sysroot.read_text("/sys/power/state", default="")
        add(
            PreflightItem(
                "mode suspend",
                "mem" in st.split(),
                f"/sys/power/state: {st.strip()}",
                "this machine cannot suspend to RAM; use mode platform",
            )
        )
    if config.image_size_limit and not config.free_page_exclusion:
        zeroed = (
            cmdline.flag(sysroot.read_text("/proc/cmdline", default=""), "init_on_free") is True
        )
        add(
            PreflightItem(
                "image size limit",
                zeroed,
                "freed pages are zeroed"
                if zeroed
                else "without init_on_free=1 pages freed by the shrink keep their contents "
                "and are saved anyway",
                "add init_on_free=1 to the kernel command line",
                fatal=False,
            )
        )
