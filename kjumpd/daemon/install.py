"""`kjumpctl install` / `kjumpctl uninstall`: put kjumpd on a machine, and take it off again.

``plan`` works out every change first (nothing is written): the save kernel and its
initramfs under /usr/lib/kjumpd/save (given files, or the initramfs built from the host's own
python3 by savekernel/), their SHA-256 in /etc/kjumpd/kjumpd.toml, the contrib/ files (the
systemd unit, the D-Bus policy and activation file, the polkit actions, the drop-ins that
route systemd's hibernation through kjumpd, the kernel upgrade hooks), the jump area on the
boot loader's kernel command line (/etc/default/grub's GRUB_CMDLINE_LINUX, BLS entries), the
restore-first boot entry (kjumpd.daemon.bootentry) and the commands to run afterwards.
``apply`` makes the changes and records them in the manifest; ``uninstall`` reverses exactly
what the manifest records. Commands go through one ``Runner`` (tests observe it).

The manifest, /var/lib/kjumpd/install.json, UTF-8 JSON, version 1::

    {"version": 1,
     "files": [{"path": "/usr/lib/systemd/system/kjumpd.service", "sha256": "<hex>",
                "what": "systemd unit", "backup": null | "/var/lib/kjumpd/install-backup/...",
                "mode": 420,
                # a kernel command line edit only: the word added, the crashkernel= replaced
                "arg": "crashkernel=128M@512M", "previous_arg": null | "crashkernel=auto"}],
     "boot_entry": true | false,          # install created the restore-first entry
     "undo": [["systemctl", "disable", "kjumpd.service"], ...],
     "dirs": ["/usr/lib/kjumpd", ...]}     # directories install created (removed when empty)

``sha256`` is what install wrote; a file changed since is left alone by uninstall (and said
so), except a command line edit, whose word alone is taken out (``previous_arg`` put back).
``backup`` holds the file as it was before install replaced it (restored on uninstall). A
second install keeps the first backups: uninstall always goes back to before the first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kjumpd import resources
from kjumpd.daemon import encryption
from kjumpd.errors import InstallError, JumpAreaError, KjumpError
from kjumpd.hashing import sha256_file
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

MANIFEST_PATH = "/var/lib/kjumpd/install.json"
MANIFEST_VERSION = 1
BACKUP_DIR = "/var/lib/kjumpd/install-backup"
RESTORE_DIR = "/usr/lib/kjumpd/restore"
R_KERNEL = f"{RESTORE_DIR}/vmlinuz"  # kjumpctl setup --bootloader takes these by default
R_INITRD = f"{RESTORE_DIR}/initrd.img"
SYSTEMD_DIR = "/usr/lib/systemd/system"

Runner = Callable[[Sequence[str]], int]


@dataclass(frozen=True)
class Shipped:
    """A contrib/ file and where install puts it."""

    name: str
    dest: str
    what: str
    mode: int = 0o644
    integration: bool = True  # a systemd drop-in or kernel hook (left out by --no-systemd)


SHIPPED = (
    Shipped("kjumpd.service", f"{SYSTEMD_DIR}/kjumpd.service", "systemd unit", integration=False),
    Shipped(
        "org.kjump.Manager1.conf",
        "/usr/share/dbus-1/system.d/org.kjump.Manager1.conf",
        "D-Bus policy",
        integration=False,
    ),
    Shipped(
        "org.kjump.Manager1.service",
        "/usr/share/dbus-1/system-services/org.kjump.Manager1.service",
        "D-Bus activation",
        integration=False,
    ),
    Shipped(
        "org.kjump.policy",
        "/usr/share/polkit-1/actions/org.kjump.policy",
        "polkit actions",
        integration=False,
    ),
    Shipped(
        "kjumpd-hibernate.conf",
        f"{SYSTEMD_DIR}/systemd-hibernate.service.d/kjumpd.conf",
        "systemctl hibernate through kjumpd",
    ),
    Shipped(
        "kjumpd-hybrid-sleep.conf",
        f"{SYSTEMD_DIR}/systemd-hybrid-sleep.service.d/kjumpd.conf",
        "systemctl hybrid-sleep through kjumpd",
    ),
    Shipped(
        "kjumpd-suspend-then-hibernate.conf",
        f"{SYSTEMD_DIR}/systemd-suspend-then-hibernate.service.d/kjumpd.conf",
        "systemctl suspend-then-hibernate through kjumpd",
    ),
    Shipped(
        "kjumpd-logind.conf",
        f"{SYSTEMD_DIR}/systemd-logind.service.d/kjumpd.conf",
        "logind offers hibernation without swap",
    ),
    Shipped("zz-kjumpd", "/etc/kernel/postinst.d/zz-kjumpd", "kernel upgrade hook", 0o755),
    Shipped(
        "90-kjumpd.install",
        "/usr/lib/kernel/install.d/90-kjumpd.install",
        "kernel-install plugin",
        0o755,
    ),
)

ENABLE = ("systemctl", "enable", "kjumpd.service")
DISABLE = ("systemctl", "disable", "kjumpd.service")
DAEMON_RELOAD = ("systemctl", "daemon-reload")


# ------------------------------------------------------------------ the plan (pure records)


@dataclass(frozen=True)
class FileChange:
    path: str  # system path
    data: bytes
    what: str
    mode: int = 0o644
    state: str = "new"  # new | replace | unchanged
    arg: str | None = None  # a kernel command line edit: the word it adds
    previous_arg: str | None = None  # ... and the crashkernel= it replaced

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def describe(self) -> str:
        verb = {"new": "write", "replace": "replace", "unchanged": "unchanged"}[self.state]
        return f"{verb:9} {self.path}  ({self.what})"


@dataclass(frozen=True)
class BootEntryStep:
    """The restore-first entry: installed or refreshed, or why not yet."""

    state: str  # install | unchanged | pending
    detail: str
    kind: str = "restore-first"
    kernel: Path | None = None  # R's kernel and generic initramfs (host files)
    initrd: Path | None = None
    cmdline: str = ""
    normal_kernel: str | None = None
    normal_initrd: str | None = None
    boot: Any = None  # (BootConfig, files) for bootentry.install
    esp: str = "/boot/efi"


@dataclass
class Plan:
    files: list[FileChange] = field(default_factory=list)
    boot_entry: BootEntryStep | None = None
    commands: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changes(self) -> list[FileChange]:
        return [f for f in self.files if f.state != "unchanged"]

    @property
    def nothing_to_do(self) -> bool:
        return not self.changes and (
            self.boot_entry is None or self.boot_entry.state not in ("install", "after-files")
        )

    def lines(self) -> list[str]:
        out = [f.describe() for f in self.files]
        if self.boot_entry is not None:
            b = self.boot_entry
            out.append(f"{'boot entry':9} {b.state}: {b.detail}")
        out += [f"{'run':9} {' '.join(c)}" for c in self.commands]
        out += [f"note: {n}" for n in self.notes]
        return out


@dataclass(frozen=True)
class Options:
    save_kernel: Path | None = None  # given file (default: the one already installed)
    save_initramfs: Path | None = None  # given file (default: built by savekernel/)
    restore_kernel: Path | None = None  # R's kernel (default: the save kernel)
    restore_initrd: Path | None = None  # R's generic initramfs (default: built by bootloader/)
    bootloader: str = "restore-first"
    esp: str = "/boot/efi"
    jump_area: bool = True
    systemd: bool = True


# ------------------------------------------------------------------ pure text edits


def set_save_kernel_hashes(text: str, kernel_sha256: str, initramfs_sha256: str) -> str:
    """kjumpd.toml with [save_kernel] kernel_sha256 / initramfs_sha256 set (the rest kept)."""
    want = {"kernel_sha256": kernel_sha256, "initramfs_sha256": initramfs_sha256}
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == "[save_kernel]"), None)
    if start is None:
        body = "".join(f'{k} = "{v}"\n' for k, v in want.items())
        sep = "" if not text or text.endswith("\n") else "\n"
        return f"{text}{sep}\n[save_kernel]\n{body}"
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")),
        len(lines),
    )
    done: set[str] = set()
    for i in range(start + 1, end):
        m = re.match(r"^\s*#?\s*(kernel_sha256|initramfs_sha256)\s*=", lines[i])
        if m and m.group(1) not in done:
            lines[i] = f'{m.group(1)} = "{want[m.group(1)]}"\n'
            done.add(m.group(1))
    missing = [f'{k} = "{v}"\n' for k, v in want.items() if k not in done]
    lines[start + 1 : start + 1] = missing
    return "".join(lines)


# ------------------------------------------------------------------ planning


def _file(sysroot: Sysroot, path: str, data: bytes, what: str, mode: int = 0o644) -> FileChange:
    real = sysroot.path(path)
    if not real.exists():
        state = "new"
    elif real.is_file() and real.read_bytes() == data and (real.stat().st_mode & 0o777) == mode:
        state = "unchanged"
    else:
        state = "replace"
    return FileChange(path, data, what, mode, state)


def _read(p: Path, what: str, fix: str) -> bytes:
    try:
        return Path(p).read_bytes()
    except OSError as e:
        raise InstallError(f"cannot read {what} {p}", why=e.strerror or str(e), fix=fix) from None


def build_save_initramfs(crypto: bool = False) -> Path:
    """B's initramfs built from this host's python3 (cached; savekernel/initramfs.py); with
    ``crypto`` it can encrypt images (python3-cryptography, about 4 MB more to load)."""
    from savekernel.initramfs import build_save_initramfs as build

    return build(crypto=crypto).path


def build_restore_initramfs(crypto: bool = False) -> Path:
    """R's generic initramfs (cached; bootloader/initramfs.py); ``crypto`` as above."""
    from bootloader.initramfs import build_restore_initramfs as build

    return Path(build(crypto=crypto).path)


def plan(
    sysroot: Sysroot,
    opts: Options,
    *,
    build_save: Callable[[bool], Path] = build_save_initramfs,
    build_restore: Callable[[bool], Path] = build_restore_initramfs,
) -> Plan:
    """Every change install would make, nothing written (initramfs builds go to the cache)."""
    from kjumpd.daemon import config as cfgmod
    from kjumpd.daemon import jumparea

    cfg = cfgmod.load(sysroot)
    p = Plan()
    # the save kernel and its initramfs
    k_src = opts.save_kernel or sysroot.path(cfg.save_kernel)
    if not Path(k_src).is_file():
        raise InstallError(
            f"no save kernel: {cfg.save_kernel} is not installed and none was given",
            fix="build one (savekernel/build-kernel.sh, or your distribution's kernel with "
            "contrib's kjumpd-kernel-config) and pass --save-kernel FILE",
        )
    i_src = opts.save_initramfs
    if i_src is None:
        crypto = encryption.wanted(sysroot, cfg)
        i_src = build_save(crypto)
        p.notes.append(
            f"the save kernel's initramfs was built from this host's python3"
            f"{' with python3-cryptography (the image key exists)' if crypto else ''}: {i_src}"
        )
    k_data = _read(k_src, "the save kernel", "pass an existing file to --save-kernel")
    i_data = _read(i_src, "the save initramfs", "pass an existing file to --save-initramfs")
    p.files.append(_file(sysroot, cfg.save_kernel, k_data, "save kernel"))
    p.files.append(_file(sysroot, cfg.save_initramfs, i_data, "save kernel's initramfs"))
    k_sum, i_sum = hashlib.sha256(k_data).hexdigest(), hashlib.sha256(i_data).hexdigest()
    old_cfg = sysroot.read_text(cfgmod.CONFIG_PATH, default="")
    base = old_cfg or resources.read_text("contrib", "kjumpd.toml")
    new_cfg = set_save_kernel_hashes(base, k_sum, i_sum)
    cfgmod.loads(new_cfg, cfgmod.CONFIG_PATH)  # what is written must load
    p.files.append(
        _file(sysroot, cfgmod.CONFIG_PATH, new_cfg.encode(), "configuration: save kernel hashes")
    )
    # contrib/
    systemd_changed = False
    for s in (s for s in SHIPPED if opts.systemd or not s.integration):
        f = _file(sysroot, s.dest, resources.find("contrib", s.name).read_bytes(), s.what, s.mode)
        p.files.append(f)
        systemd_changed |= f.state != "unchanged" and s.dest.startswith(SYSTEMD_DIR)
    # the jump area on the boot loader's command line
    grub_changed = cmdline_edited = False
    if opts.jump_area:
        need = jumparea.required_size_for(Path(k_src), Path(i_src), cfg.agent_memory)
        size = max(need, cfg.jump_area_size or 0)
        running = jumparea.discover(sysroot)
        loader, _configured = jumparea.next_boot_value(sysroot)
        arg, kept = jumparea.boot_arg(running, cfg, size, loader)
        try:
            edits = jumparea.plan_bootloader_edits(sysroot, arg)
        except JumpAreaError as e:
            edits = []
            p.notes.append(f"{e.what}: {e.fix}")
        for e in edits:
            mode = sysroot.path(e.path).stat().st_mode & 0o777
            p.files.append(
                FileChange(
                    e.path,
                    e.new.encode(),
                    f"kernel command line: {arg}",
                    mode,
                    "replace",
                    arg,
                    jumparea.changed_arg(e.old, e.new),
                )
            )
            grub_changed |= e.path == "/etc/default/grub"
        cmdline_edited = bool(edits)
        if not kept and jumparea.keeps_reservation(running, cfg, size):
            p.notes.append(f"the jump area {arg} takes effect at the next boot")
        elif not kept:
            p.notes.append(
                f"reboot to reserve the jump area ({arg}); then run "
                "`kjumpctl install` again: the restore-first entry needs it"
            )
    # the restore-first entry
    if cmdline_edited or any(f.state != "unchanged" for f in p.files[:3]):
        # R's payload holds the save kernel's files and config hashes, and the command line
        # the boot loader gives: planned once they are written (apply plans it again then)
        b = plan_boot_entry(sysroot, opts, cfg, k_src, build_restore, check_only=True)
    else:
        b = plan_boot_entry(sysroot, opts, cfg, k_src, build_restore)
    p.boot_entry = b
    if b.kernel is not None and b.initrd is not None:
        # kept for the kernel upgrade hooks, which refresh the entry from them
        p.files.append(_file(sysroot, R_KERNEL, b.kernel.read_bytes(), "restore-first kernel"))
        p.files.append(
            _file(sysroot, R_INITRD, b.initrd.read_bytes(), "restore-first initramfs (generic)")
        )
    if b.state in ("install", "after-files") and detect_grub(sysroot, opts):
        grub_changed = True
    if systemd_changed:
        p.commands.append(DAEMON_RELOAD)
    man = read_manifest(sysroot)
    if not enabled(sysroot) and not (man is not None and list(DISABLE) in man.undo):
        p.commands.append(ENABLE)
    if grub_changed:
        p.commands.append(grub_update_command(sysroot))
    return p


def detect_grub(sysroot: Sysroot, opts: Options) -> bool:
    from kjumpd.daemon import bootentry

    if opts.bootloader == "grub":
        return True
    if opts.bootloader == "bls":
        return False
    try:
        return bootentry.detect_loader(sysroot, opts.esp) == "grub"
    except KjumpError:
        return False


def enabled(sysroot: Sysroot) -> bool:
    return sysroot.path("/etc/systemd/system/multi-user.target.wants/kjumpd.service").is_symlink()


def grub_update_command(sysroot: Sysroot) -> tuple[str, ...]:
    """Debian's update-grub, else grub-mkconfig / grub2-mkconfig writing the usual grub.cfg."""
    for d in ("/usr/sbin", "/sbin", "/usr/bin"):
        if sysroot.exists(f"{d}/update-grub"):
            return ("update-grub",)
    for d in ("/usr/sbin", "/sbin", "/usr/bin"):
        if sysroot.exists(f"{d}/grub2-mkconfig"):
            return ("grub2-mkconfig", "-o", "/boot/grub2/grub.cfg")
    return ("grub-mkconfig", "-o", "/boot/grub/grub.cfg")


def plan_boot_entry(
    sysroot: Sysroot,
    opts: Options,
    cfg: Any,
    save_kernel: Path,
    build_restore: Callable[[bool], Path],
    *,
    normal_kernel: str | None = None,
    normal_initrd: str | None = None,
    check_only: bool = False,
) -> BootEntryStep:
    """Install/refresh the restore-first entry, or say what it waits for. ``check_only``:
    only whether it can be installed (state "after-files"), before the save kernel's files
    are in place."""
    from kjumpd.bootconfig import QUICK_BOOT_PARAMS
    from kjumpd.daemon import blockmap, bootentry, jumparea

    try:
        jumparea.find(sysroot, cfg)
    except KjumpError as e:
        return BootEntryStep("pending", f"the jump area is not reserved yet ({e.what})")
    try:
        target, uuid = blockmap.current(sysroot, cfg.target, restamp=False)
    except KjumpError as e:
        return BootEntryStep(
            "pending",
            f"no image target yet ({e.what}): run `kjumpctl setup --target "
            f"{cfg.target} --size SIZE`, then `kjumpctl install` again",
        )
    r_kernel = opts.restore_kernel or save_kernel
    # a target inside a LUKS volume: R unlocks it with cryptsetup (R's crypto variant)
    r_initrd = opts.restore_initrd or build_restore(
        encryption.wanted(sysroot, cfg) or target.volume is not None
    )
    if check_only:
        return BootEntryStep(
            "after-files",
            f"{opts.bootloader} entry, once the save kernel's files above are installed",
            opts.bootloader,
            Path(r_kernel),
            Path(r_initrd),
            esp=opts.esp,
        )
    cmdline = f"kjump.target={uuid} kjump.offset={target.superblock_offset} {QUICK_BOOT_PARAMS}"
    if normal_kernel is None:
        normal_kernel, normal_initrd = bootentry.default_normal_kernel(sysroot)
    elif normal_initrd is None:
        normal_initrd = bootentry.initrd_for(sysroot, normal_kernel)
    boot = bootentry.machine_boot_config(
        sysroot,
        uuid,
        target.superblock_offset,
        normal_kernel=normal_kernel,
        normal_initrd=normal_initrd,
        cmdline=bootentry.boot_loader_cmdline(sysroot),
        target=target,
    )
    step = BootEntryStep(
        "install",
        f"{opts.bootloader} entry booting {normal_kernel}",
        opts.bootloader,
        Path(r_kernel),
        Path(r_initrd),
        cmdline,
        normal_kernel,
        normal_initrd,
        boot,
        opts.esp,
    )
    if bootentry.is_current(
        sysroot,
        opts.bootloader,
        kernel=Path(r_kernel),
        initrd=Path(r_initrd),
        cmdline=cmdline,
        boot=boot,
    ):
        return replace(step, state="unchanged")
    return step


# ------------------------------------------------------------------ the manifest


@dataclass
class Manifest:
    files: list[dict[str, Any]] = field(default_factory=list)
    boot_entry: bool = False
    undo: list[list[str]] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # directories install created

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "version": MANIFEST_VERSION,
                    "files": self.files,
                    "boot_entry": self.boot_entry,
                    "undo": self.undo,
                    "dirs": self.dirs,
                },
                indent=1,
            )
            + "\n"
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("version") != MANIFEST_VERSION:
                raise ValueError(f"version {d.get('version') if isinstance(d, dict) else d!r}")
            files = d["files"]
            if not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
                raise ValueError("files must be objects with a path")
            dirs = d.get("dirs", [])
            if not all(isinstance(x, str) for x in dirs):
                raise ValueError("dirs must be paths")
            return cls(files, bool(d.get("boot_entry")), [list(c) for c in d.get("undo", [])], dirs)
        except (ValueError, KeyError, TypeError) as e:
            raise InstallError(
                f"{MANIFEST_PATH} is damaged",
                why=str(e),
                fix="restore it from a backup, or remove kjumpd's files by hand (see README)",
            ) from None

    def entry(self, path: str) -> dict[str, Any] | None:
        return next((f for f in self.files if f["path"] == path), None)


def read_manifest(sysroot: Sysroot) -> Manifest | None:
    text = sysroot.read_text(MANIFEST_PATH, default="")
    return Manifest.from_json(text) if text else None


def _write(
    sysroot: Sysroot, path: str, data: bytes, mode: int, man: Manifest | None = None
) -> None:
    """Write a file; the directories created for it are recorded in ``man``."""
    from kjumpd.daemon.bootentry import write_file

    if man is not None:
        new = []
        d = os.path.dirname(path)
        while d != "/" and not sysroot.path(d).exists():
            new.append(d)
            d = os.path.dirname(d)
        man.dirs += [x for x in reversed(new) if x not in man.dirs]
    write_file(sysroot, path, data, mode)


# ------------------------------------------------------------------ applying


def apply(sysroot: Sysroot, p: Plan, runner: Runner, say: Callable[[str], None]) -> Manifest:
    """Make the planned changes, record them, run the commands."""
    from kjumpd.daemon import bootentry

    man = read_manifest(sysroot) or Manifest()
    for f in p.changes:
        entry = man.entry(f.path)
        if entry is None:
            backup = None
            real = sysroot.path(f.path)
            if real.is_file():
                backup = BACKUP_DIR + f.path
                _write(sysroot, backup, real.read_bytes(), real.stat().st_mode & 0o777, man)
            entry = {"path": f.path, "what": f.what, "backup": backup}
            if f.arg is not None:
                entry["previous_arg"] = f.previous_arg  # the first install's: never replaced
            man.files.append(entry)
        if f.arg is not None:
            entry["arg"] = f.arg
        _write(sysroot, f.path, f.data, f.mode, man)
        entry["sha256"] = f.sha256
        entry["mode"] = f.mode
        say(f.describe())
    b = p.boot_entry
    if b is not None and b.state == "after-files":
        from kjumpd.daemon import config as cfgmod

        b = plan_boot_entry(
            sysroot,
            Options(restore_kernel=b.kernel, restore_initrd=b.initrd, bootloader=b.kind, esp=b.esp),
            cfgmod.load(sysroot),
            b.kernel or Path(),
            build_restore_initramfs,
        )
    if b is not None and b.state == "install":
        had = bootentry.read_record(sysroot) is not None
        # the directories bootentry.install may create, for uninstall to remove again
        maybe = [bootentry.BOOT_DIR, f"{b.esp}/kjumpd", f"{b.esp}/loader/entries"]
        maybe += [f"{b.esp}/loader", "/etc/kjumpd", bootentry.GRUB_DIR]
        absent = [d for d in maybe if not sysroot.exists(d)]
        assert b.kernel is not None and b.initrd is not None
        rec = bootentry.install(
            sysroot,
            b.kind,
            kernel=b.kernel,
            initrd=b.initrd,
            cmdline=b.cmdline,
            esp=b.esp,
            boot=b.boot,
            normal_kernel=b.normal_kernel,
            normal_initrd=b.normal_initrd,
        )
        man.boot_entry = man.boot_entry or not had
        man.dirs += [d for d in absent if sysroot.exists(d) and d not in man.dirs]
        say(f"boot entry installed: {rec.kind} ({rec.loader}): {', '.join(rec.files)}")
        say(bootentry.restore_boots_line(rec))
    _write(sysroot, MANIFEST_PATH, man.to_json().encode(), 0o644, man)
    for c in p.commands:
        if c == ENABLE and list(DISABLE) not in man.undo:
            # recorded before it runs: a later command failing must not lose its undo
            man.undo.append(list(DISABLE))
            _write(sysroot, MANIFEST_PATH, man.to_json().encode(), 0o644)
        run(runner, c, say)
    return man


def run(runner: Runner, argv: Sequence[str], say: Callable[[str], None]) -> None:
    say(f"run {' '.join(argv)}")
    rc = runner(list(argv))
    if rc != 0:
        raise InstallError(
            f"`{' '.join(argv)}` failed with exit status {rc}",
            fix=f"fix what it reported and run `{' '.join(argv)}` yourself; the changes "
            "before it are made and recorded",
        )


def refresh_boot_entry(
    sysroot: Sysroot,
    *,
    normal_kernel: str | None,
    normal_initrd: str | None,
    say: Callable[[str], None],
) -> BootEntryStep:
    """Reinstall the restore-first entry of the kind recorded, for the given (or default)
    normal kernel and the boot loader's current command line (the kernel upgrade hooks)."""
    from kjumpd.daemon import bootentry
    from kjumpd.daemon import config as cfgmod

    rec = bootentry.read_record(sysroot)
    if rec is None:
        say("no restore-first entry is installed: nothing to refresh")
        return BootEntryStep("unchanged", "no restore-first entry is installed")
    cfg = cfgmod.load(sysroot)
    r_kernel, r_initrd = sysroot.path(R_KERNEL), sysroot.path(R_INITRD)
    for f in (r_kernel, r_initrd):
        if not f.is_file():
            raise InstallError(
                f"{sysroot.unmap(f)} is missing", fix="run `kjumpctl install` to put it back"
            )
    opts = Options(
        restore_kernel=r_kernel,
        restore_initrd=r_initrd,
        bootloader=rec.kind,
        esp=rec.esp or "/boot/efi",
    )
    step = plan_boot_entry(
        sysroot,
        opts,
        cfg,
        sysroot.path(cfg.save_kernel),
        build_restore_initramfs,
        normal_kernel=normal_kernel,
        normal_initrd=normal_initrd,
    )
    if step.state == "install":
        assert step.kernel is not None and step.initrd is not None
        rec = bootentry.install(
            sysroot,
            step.kind,
            kernel=step.kernel,
            initrd=step.initrd,
            cmdline=step.cmdline,
            esp=opts.esp,
            boot=step.boot,
            normal_kernel=step.normal_kernel,
            normal_initrd=step.normal_initrd,
        )
        say(bootentry.restore_boots_line(rec))
    say(f"boot entry {step.state}: {step.detail}")
    return step


# ------------------------------------------------------------------ uninstall


@dataclass(frozen=True)
class Undo:
    path: str
    action: str  # remove | restore | revert | keep (changed since install) | gone
    backup: str | None = None
    arg: str | None = None  # revert: the word to take out, and what it replaced
    previous_arg: str | None = None

    def describe(self) -> str:
        return {
            "remove": f"remove    {self.path}",
            "restore": f"restore   {self.path}  (as it was before install)",
            "revert": f"revert    {self.path}  ({self.arg} taken out"
            + (f", {self.previous_arg} back" if self.previous_arg else "")
            + "; your later changes kept)",
            "keep": f"keep      {self.path}  (changed since install: left as it is)",
            "gone": f"gone      {self.path}  (already removed)",
        }[self.action]


def plan_uninstall(sysroot: Sysroot) -> tuple[Manifest | None, list[Undo], list[list[str]]]:
    man = read_manifest(sysroot)
    if man is None:
        return None, [], []
    undos = []
    for f in man.files:
        real = sysroot.path(f["path"])
        if not real.is_file():
            undos.append(Undo(f["path"], "gone", f.get("backup")))
        elif sha256_file(real) != f.get("sha256"):
            arg = f.get("arg")
            if isinstance(arg, str) and arg in real.read_text(errors="replace"):
                undos.append(Undo(f["path"], "revert", f.get("backup"), arg, f.get("previous_arg")))
            else:
                undos.append(Undo(f["path"], "keep", f.get("backup")))
        else:
            undos.append(
                Undo(f["path"], "restore" if f.get("backup") else "remove", f.get("backup"))
            )
    cmds = list(man.undo)
    if any(u.path.startswith(SYSTEMD_DIR) and u.action != "keep" for u in undos):
        cmds.append(list(DAEMON_RELOAD))
    if any(u.path == "/etc/default/grub" and u.action in ("restore", "revert") for u in undos) or (
        man.boot_entry and detect_grub(sysroot, Options(bootloader="detect"))
    ):
        cmds.append(list(grub_update_command(sysroot)))
    return man, undos, cmds


def uninstall(sysroot: Sysroot, runner: Runner, say: Callable[[str], None]) -> list[Undo]:
    from kjumpd.daemon import bootentry

    man, undos, cmds = plan_uninstall(sysroot)
    if man is None:
        say(f"nothing to uninstall: {MANIFEST_PATH} does not exist")
        return []
    if man.boot_entry:
        for path in bootentry.uninstall(sysroot):
            say(f"remove    {path}  (restore-first entry)")
    for u in undos:
        real = sysroot.path(u.path)
        if u.action == "remove":
            real.unlink()
        elif u.action == "revert":
            from kjumpd.daemon.jumparea import revert_arg

            assert u.arg is not None
            text = revert_arg(real.read_text(), u.arg, u.previous_arg)
            _write(sysroot, u.path, text.encode(), real.stat().st_mode & 0o777)
        elif u.action == "restore":
            assert u.backup is not None
            b = sysroot.path(u.backup)
            _write(sysroot, u.path, b.read_bytes(), b.stat().st_mode & 0o777)
        say(u.describe())
    for c in cmds:
        run(runner, c, say)
    shutil.rmtree(sysroot.path(BACKUP_DIR), ignore_errors=True)
    sysroot.path(MANIFEST_PATH).unlink()
    say(f"remove    {MANIFEST_PATH}")
    for d in sorted(man.dirs, key=len, reverse=True):
        try:
            sysroot.path(d).rmdir()  # only when empty: what else is there stays
        except OSError:
            continue
    return undos
