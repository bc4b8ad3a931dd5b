"""Boot loader cooperation: the restore-first entry in GRUB or a BLS loader, and its one-shot.

Three kinds (``kjumpctl setup --bootloader KIND``):

grub
    /etc/grub.d/42_kjumpd prints a menu entry ``--id kjumpd-restore`` that boots R (the
    restore-first kernel + initramfs, copied to /boot/kjumpd/). The daemon sets GRUB's one-shot
    ``next_entry=kjumpd-restore`` in /boot/grub/grubenv only when an image is about to be
    saved, and clears it on resume or rollback; Debian's 00_header consumes next_entry at boot.
bls
    A Boot Loader Specification type #1 entry ``$ESP/loader/entries/kjumpd-restore.conf`` (R
    copied to $ESP/kjumpd/); the one-shot is the EFI variable LoaderEntryOneShot (systemd-boot's
    vendor GUID 4a67b082-0a4c-41cf-b6c7-440b29bb8c4f) = "kjumpd-restore.conf".
restore-first
    R boots every time (it kexecs the normal kernel when there is no image): with GRUB the
    snippet also makes kjumpd-restore the default unless a one-shot entry is being booted;
    with a BLS loader the EFI variable LoaderEntryDefault names the entry. No one-shot needed.

What was installed is recorded in /etc/kjumpd/bootentry.json (version 1) so that ``check``,
``set_oneshot`` and ``clear_oneshot`` know what to do.

Byte formats written here (not kjumpd's own, but exact):

grubenv
    exactly 1024 bytes: "# GRUB Environment Block\\n", then "name=value\\n" lines, padded
    with "#" (GRUB overwrites the file's blocks in place at boot, so its size never changes).
EFI variable (efivarfs)
    4 bytes little-endian attributes (0x7: non-volatile, boot service, runtime access), then
    the value as UTF-16LE with a terminating NUL character. efivarfs files are created
    immutable; the immutable flag is cleared before a write or an unlink.

Timing: ``set_oneshot`` writes to /boot (grub) and must therefore run BEFORE the filesystems
are frozen (a transaction step whose undo is ``clear_oneshot``), never after. GRUB itself
rewrites the grubenv blocks in place when it consumes next_entry (data only, no metadata: the
superblock stamps of the stale-image guard do not change).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kjumpd import cpio
from kjumpd.errors import BootEntryError, ConfigError, FsStampError, InstallError, KjumpError
from kjumpd.hashing import sha256_file
from kjumpd.linux import cmdline as kernel_cmdline
from kjumpd.linux import mountinfo, pagecache
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

KINDS = ("grub", "bls", "restore-first")
ENTRY_ID = "kjumpd-restore"
BLS_ENTRY_ID = ENTRY_ID + ".conf"
TITLE = "kjumpd: resume from hibernation"
RECORD_PATH = "/etc/kjumpd/bootentry.json"
RECORD_VERSION = 1
GRUB_SNIPPET = "/etc/grub.d/42_kjumpd"
GRUB_DIR = "/etc/grub.d"
GRUBENV = "/boot/grub/grubenv"
GRUB_CFG = "/boot/grub/grub.cfg"
BOOT_DIR = "/boot/kjumpd"
DEFAULT_ESP = "/boot/efi"
EFIVARS = "/sys/firmware/efi/efivars"
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
EFI_ATTRS = 0x7
GRUBENV_SIZE = 1024
GRUBENV_HEADER = b"# GRUB Environment Block\n"

#: keys of a BLS type #1 entry (https://uapi-group.org/specifications/specs/boot_loader_specification/)
BLS_KEYS = (
    "title",
    "version",
    "machine-id",
    "sort-key",
    "linux",
    "initrd",
    "efi",
    "options",
    "devicetree",
    "devicetree-overlay",
    "architecture",
)
#: GRUB module per filesystem type
GRUB_MODULES = {
    "ext2": "ext2",
    "ext3": "ext2",
    "ext4": "ext2",
    "xfs": "xfs",
    "btrfs": "btrfs",
    "vfat": "fat",
}

_SAFE_CMDLINE = re.compile(r"^[A-Za-z0-9._,:=/@+\-\s]*$")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+\-]*$")
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10


@dataclass(frozen=True)
class BootEntry:
    """What ``install`` put where (the record in /etc/kjumpd/bootentry.json)."""

    kind: str
    loader: str  # "grub" or "bls"
    kernel: str  # system paths of R's installed kernel and initramfs
    initrd: str
    cmdline: str
    files: list[str] = field(default_factory=list)  # every file install wrote
    grubenv: str = GRUBENV
    esp: str = ""
    entry_id: str = ENTRY_ID
    previous_default: str | None = None  # BLS LoaderEntryDefault before install
    image_key_id: str = ""  # the image key R's payload holds (kjumpd.image.seal), if any
    # why R is not confined to the jump area (restores then take two boots); "" when it is
    two_boots: str = "the entry was written by a kjumpd that did not confine R"
    # what R was told at install: the normal kernel it boots (system path and SHA-256), its
    # command line and the jump area ([start, size]); ``check`` compares them with the system
    normal_kernel: str = ""
    normal_kernel_sha256: str = ""
    normal_cmdline: str | None = None
    jump_area: list[int] | None = None

    def to_json(self) -> str:
        return json.dumps({"version": RECORD_VERSION, **asdict(self)}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BootEntry:
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.pop("version", None) != RECORD_VERSION:
                raise ValueError("not a version 1 record")
            rec = cls(**d)
            if rec.kind not in KINDS or rec.loader not in ("grub", "bls"):
                raise ValueError(f"kind {rec.kind!r} / loader {rec.loader!r}")
            return rec
        except (ValueError, TypeError) as e:
            raise BootEntryError(
                f"{RECORD_PATH} is damaged",
                why=str(e),
                fix="run `kjumpctl setup --bootloader KIND` again",
            ) from None


# ------------------------------------------------------------------ pure renderers


def _template(name: str) -> str:
    """A template from bootloader/templates (kjumpd.resources finds it)."""
    from kjumpd import resources

    try:
        return resources.read_text("bootloader", f"templates/{name}")
    except InstallError as e:
        raise BootEntryError(f"template {name} is missing", why=e.why, fix=e.fix) from None


#: the one word form with a "$" an entry carries: R's confinement (kjumpd.confine)
_MEMMAP_RESERVED = re.compile(r"^memmap=0x[0-9a-f]+\$0x[0-9a-f]+$")


def _check_cmdline(cmdline: str) -> None:
    plain = " ".join(w for w in cmdline.split(" ") if not _MEMMAP_RESERVED.match(w))
    if not _SAFE_CMDLINE.match(plain) or "\n" in cmdline:
        raise ConfigError(
            f"restore-first command line {cmdline!r} has characters a boot "
            "loader entry cannot carry safely",
            fix="use letters, digits and . _ , : = / @ + - only",
        )
    words = kernel_cmdline.params(cmdline)
    if "kjump.target" not in words or "kjump.offset" not in words:
        raise ConfigError(
            "the restore-first command line lacks kjump.target= or kjump.offset=",
            fix="let `kjumpctl setup` build it from the prepared target",
        )


def _check_path(p: str) -> None:
    if not _SAFE_PATH.match(p):
        raise ConfigError(
            f"boot path {p!r} is not a plain absolute path",
            fix="use a path of letters, digits and . _ / + - only",
        )


def render_grub_snippet(
    *, kind: str, fs_uuid: str, fstype: str, kernel: str, initrd: str, cmdline: str
) -> str:
    """The /etc/grub.d/42_kjumpd script; ``kernel``/``initrd`` are paths as GRUB sees them."""
    _check_cmdline(cmdline)
    # GRUB expands "$" in a word; quoted, the kernel gets it as written
    cmdline = " ".join(f"'{w}'" if "$" in w else w for w in cmdline.split())
    for p in (kernel, initrd):
        _check_path(p)
    if fstype not in GRUB_MODULES:
        raise BootEntryError(
            f"GRUB cannot read {fstype} here", fix="put /boot on ext4, xfs, btrfs or vfat"
        )
    if not re.match(r"^[0-9A-Fa-f-]+$", fs_uuid):
        raise BootEntryError(f"filesystem UUID {fs_uuid!r} is not usable by GRUB's search")
    default = (
        f'if [ -z "${{boot_once}}" ]; then set default="{ENTRY_ID}"; fi'
        if kind == "restore-first"
        else ""
    )
    out = _template("42_kjumpd.in")
    for k, v in {
        "@KIND@": kind,
        "@ID@": ENTRY_ID,
        "@TITLE@": TITLE,
        "@GRUBMOD@": GRUB_MODULES[fstype],
        "@FSUUID@": fs_uuid,
        "@KERNEL@": kernel,
        "@INITRD@": initrd,
        "@CMDLINE@": cmdline,
        "@DEFAULT@": default,
    }.items():
        out = out.replace(k, v)
    return out


def render_bls_entry(
    *, kernel: str, initrd: str, cmdline: str, machine_id: str = "", version: str = ""
) -> str:
    """The BLS type #1 entry; ``kernel``/``initrd`` are paths from the ESP's root."""
    _check_cmdline(cmdline)
    for p in (kernel, initrd):
        _check_path(p)
    out = []
    for line in _template("kjumpd-restore.conf.in").splitlines():
        line = (
            line.replace("@TITLE@", TITLE)
            .replace("@VERSION@", version)
            .replace("@MACHINE_ID@", machine_id)
            .replace("@KERNEL@", kernel)
            .replace("@INITRD@", initrd)
            .replace("@CMDLINE@", cmdline)
        )
        if line.split(None, 1)[0:1] and len(line.split(None, 1)) == 1 and not line.startswith("#"):
            continue  # an optional key left empty
        out.append(line)
    return "\n".join(out) + "\n"


def parse_bls_entry(text: str) -> dict[str, list[str]]:
    """key -> values (a key may repeat, e.g. initrd) of a BLS type #1 entry."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out.setdefault(key, []).append(value.strip())
    return out


def bls_problems(text: str) -> list[str]:
    """What is wrong with a BLS type #1 entry, by the specification's rules."""
    problems = []
    entry = parse_bls_entry(text)
    for key in entry:
        if key not in BLS_KEYS:
            problems.append(f"unknown key {key!r}")
    for key in (
        "title",
        "version",
        "machine-id",
        "sort-key",
        "linux",
        "efi",
        "options",
        "architecture",
    ):
        if len(entry.get(key, [])) > 1 and key != "options":
            problems.append(f"key {key!r} given {len(entry[key])} times")
    if "linux" not in entry and "efi" not in entry:
        problems.append("neither 'linux' nor 'efi' is set")
    for key in ("linux", "initrd", "efi", "devicetree"):
        for v in entry.get(key, []):
            if not v.startswith("/"):
                problems.append(f"{key} path {v!r} is not absolute (from the partition root)")
    for v in entry.get("machine-id", []):
        if not re.fullmatch(r"[0-9a-f]{32}", v):
            problems.append(f"machine-id {v!r} is not 32 lower-case hex digits")
    for v in entry.get("sort-key", []):
        if not re.fullmatch(r"[a-z0-9._-]+", v):
            problems.append(f"sort-key {v!r} has characters outside [a-z0-9._-]")
    return problems


def grubenv_parse(data: bytes) -> dict[str, str]:
    """Variables of a grubenv block (raises BootEntryError when it is not one)."""
    if len(data) != GRUBENV_SIZE or not data.startswith(GRUBENV_HEADER):
        raise BootEntryError(
            "grubenv is not a 1024-byte GRUB environment block",
            fix="recreate it with `grub-editenv FILE create`",
        )
    out: dict[str, str] = {}
    for line in data[len(GRUBENV_HEADER) :].split(b"\n"):
        if not line or line.startswith(b"#"):
            continue
        key, sep, value = line.partition(b"=")
        if not sep:
            continue
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return out


def grubenv_format(env: dict[str, str]) -> bytes:
    body = GRUBENV_HEADER
    for k, v in env.items():
        if "\n" in k or "\n" in v or "=" in k or "\\" in k + v:
            raise BootEntryError(f"grubenv variable {k!r} cannot be written safely")
        body += f"{k}={v}\n".encode()
    if len(body) > GRUBENV_SIZE:
        raise BootEntryError("grubenv is full", fix="remove unused variables with grub-editenv")
    return body + b"#" * (GRUBENV_SIZE - len(body))


def efivar_encode(value: str) -> bytes:
    return struct.pack("<I", EFI_ATTRS) + (value + "\0").encode("utf-16-le")


def efivar_decode(data: bytes) -> str:
    if len(data) < 4 or (len(data) - 4) % 2:
        raise BootEntryError("EFI variable has an odd size", fix="delete it (efivar/efibootmgr)")
    return data[4:].decode("utf-16-le", "replace").rstrip("\0")


# ------------------------------------------------------------------ R's machine payload

#: where R's initramfs holds the files boot.json names
R_NORMAL_KERNEL = "/kjump/normal/vmlinuz"
R_NORMAL_INITRD = "/kjump/normal/initrd.img"
R_SAVE_KERNEL = "/kjump/save/bzImage"
R_SAVE_INITRD = "/kjump/save/initramfs.cpio.gz"
#: the machine's image key (public key + passphrase-protected private key) in R's payload:
#: R opens encrypted images with it (kjumpd.image.seal)
R_IMAGE_KEY = "/etc/kjumpd/image-key.json"
#: the key file this system's initramfs unlocks the target's LUKS volume with (crypttab,
#: KEYFILE_PATTERN or dracut's install_items): R unlocks it the same way, without asking
#: (restore.unlock)
R_LUKS_KEY = "/etc/kjumpd/luks-volume.key"


def newc(files: Mapping[str, bytes]) -> bytes:
    """An uncompressed cpio archive (kjumpd.cpio) of regular files, parents first."""
    return cpio.write(cpio.Entry.file(name, files[name]) for name in sorted(files))


def boot_config_for(
    *,
    target_uuid: str,
    target_offset: int,
    normal_kernel: Path,
    normal_initrd: Path | None,
    normal_cmdline: str,
    save_kernel: Path,
    save_initrd: Path,
    save_cmdline: str,
    jump_area: tuple[int, int],
    max_attempts: int = 3,
    target_volume: Any = None,
) -> tuple[Any, dict[str, Path]]:
    """boot.json for these host files, and R's payload (archive path -> host file).
    ``target_volume``: the LUKS volume (kjumpd.linux.luks.Volume) the target is inside."""
    from kjumpd.bootconfig import BootConfig, KernelSpec, save_kernel_hash

    try:
        ks, is_ = sha256_file(save_kernel), sha256_file(save_initrd)
    except OSError as e:
        raise BootEntryError(
            f"cannot read the save kernel files ({e.filename})",
            why=e.strerror or str(e),
            fix="install them where [save_kernel] in kjumpd.toml says",
        ) from None
    cfg = BootConfig(
        target_uuid=target_uuid,
        target_offset=target_offset,
        normal=KernelSpec(
            R_NORMAL_KERNEL, R_NORMAL_INITRD if normal_initrd else None, normal_cmdline
        ),
        save=KernelSpec(R_SAVE_KERNEL, R_SAVE_INITRD, save_cmdline),
        save_hash=save_kernel_hash(ks, is_),
        save_kernel_sha256=ks,
        save_initrd_sha256=is_,
        jump_area=(int(jump_area[0]), int(jump_area[1])),
        max_attempts=max_attempts,
        target_volume=target_volume,
    )
    files = {
        R_NORMAL_KERNEL: Path(normal_kernel),
        R_SAVE_KERNEL: Path(save_kernel),
        R_SAVE_INITRD: Path(save_initrd),
    }
    if normal_initrd:
        files[R_NORMAL_INITRD] = Path(normal_initrd)
    BootConfig.from_dict(cfg.to_dict())  # validates
    return cfg, files


def confinement_problem(
    sysroot: Sysroot,
    boot: tuple[Any, Mapping[str, Path | bytes]],
    initrd_len: int,
    base_len: int,
    payload_len: int,
) -> str:
    """Empty when R can be confined to a jump area like boot.json's (kjumpd.confine): the
    firmware's map allows it and R fits; else why not (restores then take two boots). The
    words themselves are written at each hibernation, for that hibernation's area
    (``set_oneshot``): A's reservation may move from boot to boot."""
    from kjumpd import confine

    cfg, files = boot
    start, size = cfg.jump_area
    try:
        confine_words(sysroot, (start, size))
    except ConfigError as e:
        return e.message
    normal = 0
    for arc in (R_NORMAL_KERNEL, R_NORMAL_INITRD):
        src = files.get(arc)
        normal += len(src) if isinstance(src, bytes) else Path(src).stat().st_size if src else 0
    unpacked = int(base_len * confine.UNPACK_FACTOR) + payload_len
    return confine.fit_problem(size, initrd_len, unpacked, normal)


def confine_words(sysroot: Sysroot, area: tuple[int, int]) -> list[str]:
    """The words that confine R to ``area`` (start, size) on this machine
    (kjumpd.confine.boot_words); ConfigError when it cannot be confined."""
    from kjumpd import confine
    from kjumpd.linux import iomem

    entries = iomem.read_firmware_entries(sysroot)
    if not entries:
        raise ConfigError(f"this kernel has no {iomem.FIRMWARE_MEMMAP} to place R by")
    return confine.boot_words(confine.confine(entries, (area[0], area[0] + area[1])))


def restore_payload(cfg: Any, files: Mapping[str, Path | bytes]) -> bytes:
    """The archive appended to R's generic initramfs: boot.json and the files it names."""
    from kjumpd.bootconfig import BOOT_CONFIG_PATH

    entries = {BOOT_CONFIG_PATH: cfg.to_json().encode()}
    try:
        for arc, src in files.items():
            # kernels and initrds: only the boot loader reads them again
            entries[arc] = src if isinstance(src, bytes) else pagecache.read_once(src)
    except OSError as e:
        raise BootEntryError(
            f"cannot read {e.filename} for the restore-first initramfs",
            why=e.strerror or str(e),
            fix="check the path",
        ) from None
    return newc(entries)


def normal_cmdline(proc_cmdline: str) -> str:
    """The running kernel's command line as the normal kernel should get it again: without
    what the boot loader adds per boot (BOOT_IMAGE=, initrd=) or kjumpd's own words."""
    return kernel_cmdline.without(
        proc_cmdline,
        ("BOOT_IMAGE", "initrd", "kjump.rf", "kjump.role", "kjump.target", "kjump.offset"),
    )


def find_normal_kernel(sysroot: Sysroot) -> tuple[str, str | None]:
    """(kernel, initrd or None) of the running system, as system paths: BOOT_IMAGE= from the
    command line, else /boot/vmlinuz-$(uname -r), /boot/vmlinuz, or the only /boot/vmlinuz-*."""
    release = os.uname().release if sysroot.is_real else ""
    words = kernel_cmdline.params(sysroot.read_text("/proc/cmdline", default=""))
    candidates = []
    if words.get("BOOT_IMAGE", "").startswith("/"):
        bi = words["BOOT_IMAGE"]
        candidates += [bi, f"/boot{bi}"]
    if release:
        candidates.append(f"/boot/vmlinuz-{release}")
    candidates.append("/boot/vmlinuz")
    found = [f"/boot/{n}" for n in sysroot.listdir("/boot") if n.startswith("vmlinuz-")]
    if len(found) == 1:
        candidates.append(found[0])
    for k in candidates:
        if sysroot.path(k).is_file():
            base = k.rsplit("/", 1)[-1]
            ver = base[len("vmlinuz-") :] if base.startswith("vmlinuz-") else ""
            initrd = (
                f"/boot/initrd.img-{ver}"
                if ver
                else "/boot/initrd.img"
                if k == "/boot/vmlinuz"
                else ""
            )
            return k, (initrd if initrd and sysroot.path(initrd).is_file() else None)
    raise BootEntryError(
        "cannot find the normal kernel for the restore-first environment",
        why=f"none of {', '.join(candidates)} exists",
        fix="pass the normal kernel explicitly",
    )


def _version_key(v: str) -> list[tuple[int, int | str]]:
    """Sort key of a kernel release ("6.12.9-amd64" < "6.12.10-amd64"), as sort -V."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.findall(r"\d+|[^\d.~+-]+", v)]


def default_normal_kernel(sysroot: Sysroot) -> tuple[str, str | None]:
    """(kernel, initrd or None) the boot loader boots by default: the newest installed
    /boot/vmlinuz-VERSION (what Debian's update-grub and grubby put first), else
    ``find_normal_kernel`` (the running one)."""
    versions = [n[len("vmlinuz-") :] for n in sysroot.listdir("/boot") if n.startswith("vmlinuz-")]
    versions = [v for v in versions if sysroot.path(f"/boot/vmlinuz-{v}").is_file()]
    if not versions:
        return find_normal_kernel(sysroot)
    v = max(versions, key=_version_key)
    return f"/boot/vmlinuz-{v}", initrd_for(sysroot, f"/boot/vmlinuz-{v}")


def initrd_for(sysroot: Sysroot, kernel: str) -> str | None:
    """The initrd installed beside /boot/vmlinuz-VERSION (Debian's initrd.img-VERSION,
    dracut's initramfs-VERSION.img), or None."""
    base = kernel.rsplit("/", 1)[-1]
    if not base.startswith("vmlinuz-"):
        return None
    v = base[len("vmlinuz-") :]
    for initrd in (f"/boot/initrd.img-{v}", f"/boot/initramfs-{v}.img"):
        if sysroot.path(initrd).is_file():
            return initrd
    return None


GRUB_DEFAULTS = "/etc/default/grub"
KERNEL_CMDLINE = "/etc/kernel/cmdline"
#: words of /proc/cmdline the boot loader computes itself (GRUB's 10_linux: root= and ro)
_LOADER_WORDS = ("root", "ro", "rw", "rootflags", "rootfstype")


_GRUB_REF = re.compile(r"\$\{?(GRUB_[A-Z_]+)\}?")


def grub_defaults(sysroot: Sysroot) -> dict[str, str]:
    """GRUB_* variables of /etc/default/grub and /etc/default/grub.d/*.cfg (sourced after
    it, in order), the last assignment winning as in the shell, references to GRUB_*
    variables assigned before expanded (outside single quotes). Values are unquoted."""
    import shlex

    out: dict[str, str] = {}
    names = [GRUB_DEFAULTS] + [
        f"/etc/default/grub.d/{n}"
        for n in sysroot.listdir("/etc/default/grub.d")
        if n.endswith(".cfg")
    ]
    for name in names:
        for line in sysroot.read_text(name, default="").splitlines():
            m = re.match(r"^\s*(?:export\s+)?(GRUB_[A-Z_]+)=(.*)$", line)
            if not m:
                continue
            raw = m.group(2)
            if not raw.lstrip().startswith("'"):
                # grub.d snippets extend a variable ("$GRUB_CMDLINE_LINUX crashkernel=...")
                raw = _GRUB_REF.sub(lambda r: out.get(r.group(1), ""), raw)
            try:
                words = shlex.split(raw, comments=True)
            except ValueError:
                continue
            out[m.group(1)] = " ".join(words)
    return out


def boot_loader_cmdline(sysroot: Sysroot) -> str:
    """The command line the boot loader now gives the normal kernel, as R must give it too:
    ``configured_cmdline``, else this boot's /proc/cmdline. Without kjumpd's own words and
    BOOT_IMAGE=/initrd= (``normal_cmdline``)."""
    configured = configured_cmdline(sysroot)
    if configured is not None:
        return configured
    return normal_cmdline(sysroot.read_text("/proc/cmdline", default="").strip())


def configured_cmdline(sysroot: Sysroot) -> str | None:
    """The command line the boot loader's configuration gives the normal kernel: with GRUB,
    root=/ro of this boot (GRUB computes them) followed by GRUB_CMDLINE_LINUX and
    GRUB_CMDLINE_LINUX_DEFAULT; else /etc/kernel/cmdline (kernel-install); None without
    either (``normal_cmdline`` applied)."""
    if sysroot.exists(GRUB_DEFAULTS):
        proc = sysroot.read_text("/proc/cmdline", default="").strip()
        g = grub_defaults(sysroot)
        loader = [w for w in kernel_cmdline.words(proc) if w.split("=", 1)[0] in _LOADER_WORDS]
        words = [*loader, g.get("GRUB_CMDLINE_LINUX", ""), g.get("GRUB_CMDLINE_LINUX_DEFAULT", "")]
        return normal_cmdline(" ".join(w for w in words if w))
    if sysroot.exists(KERNEL_CMDLINE):
        return normal_cmdline(sysroot.read_text(KERNEL_CMDLINE).strip())
    return None


def machine_boot_config(
    sysroot: Sysroot,
    target_uuid: str,
    target_offset: int,
    *,
    normal_kernel: str | None = None,
    normal_initrd: str | None = None,
    cmdline: str | None = None,
    max_attempts: int = 3,
    target: Any = None,
) -> tuple[Any, dict[str, Path]]:
    """boot.json + payload for this machine: the save kernel and jump area from kjumpd's
    config and the reserved area, the boot loader's default kernel and its command line
    (``default_normal_kernel``, ``boot_loader_cmdline``: what ``check`` compares with).
    ``target`` (blockmap.Target): when it is inside a LUKS volume, R is told the volume,
    and given the key file this system's initramfs unlocks it with, if any."""
    target_volume = target.volume if target is not None else None
    from kjumpd.daemon import config as cfgmod
    from kjumpd.daemon import jumparea

    cfg = cfgmod.load(sysroot)
    area = jumparea.find(sysroot, cfg)
    if normal_kernel is None:
        normal_kernel, found_initrd = default_normal_kernel(sysroot)
        if normal_initrd is None:
            normal_initrd = found_initrd
    line = cmdline if cmdline is not None else boot_loader_cmdline(sysroot)
    bcfg, files = boot_config_for(
        target_uuid=target_uuid,
        target_offset=target_offset,
        normal_kernel=sysroot.path(normal_kernel),
        normal_initrd=sysroot.path(normal_initrd) if normal_initrd else None,
        normal_cmdline=line,
        save_kernel=sysroot.path(cfg.save_kernel),
        save_initrd=sysroot.path(cfg.save_initramfs),
        save_cmdline=cfg.save_kernel_append(),
        jump_area=(area.start, area.size),
        max_attempts=max_attempts,
        target_volume=target_volume,
    )
    key = sysroot.path(cfg.image_key)
    if cfg.encryption != "off" and key.is_file():
        files[R_IMAGE_KEY] = key
    if target_volume is not None:
        from kjumpd.daemon import volumekey

        found = volumekey.initramfs_key_file(sysroot, target)
        if found is not None:
            files[R_LUKS_KEY] = sysroot.path(found)
    return bcfg, files


# ------------------------------------------------------------------ system edge


def locate(sysroot: Sysroot, path: str) -> tuple[str, str, str]:
    """(fstype, fs UUID, path as the boot loader sees it) of a system path under /boot."""
    from kjumpd.fsstamp import read_stamp

    best = None
    for m in mountinfo.parse(sysroot.read_text("/proc/self/mountinfo", default="")):
        mnt = m.mountpoint
        if path == mnt or path.startswith(mnt.rstrip("/") + "/"):
            if best is None or len(mnt) >= len(best[0]):
                best = (mnt, m.root, m.fstype, m.source, m.devno)
    if best is None:
        raise BootEntryError(
            f"cannot tell which filesystem holds {path}",
            why="/proc/self/mountinfo lists no mount for it",
            fix="mount /boot before running setup",
        )
    mnt, root, _fstype, source, devno = best
    if not sysroot.exists(source):
        # e.g. "/dev/root" when the kernel mounted root= itself: find the node by its number
        uevent = sysroot.read_text(f"/sys/dev/block/{devno}/uevent", default="")
        name = dict(ln.partition("=")[::2] for ln in uevent.splitlines()).get("DEVNAME")
        if name:
            source = f"/dev/{name}"
    try:
        st = read_stamp(source, sysroot=sysroot)
    except FsStampError as e:
        raise BootEntryError(
            f"cannot identify the filesystem of {path} on {source}",
            why=e.what,
            fix="put /boot on ext4, xfs, btrfs or vfat",
        ) from None
    rel = path[len(mnt.rstrip("/")) :] or "/"
    prefix = root.rstrip("/") if root not in ("/", "") else ""
    return st.fstype, st.uuid, prefix + rel


def _write_file(sysroot: Sysroot, path: str, data: bytes, mode: int = 0o644) -> None:
    """Write a whole file durably (temp file, fsync, rename, fsync of the directory)."""
    real = sysroot.path(path)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        tmp = real.with_name(f".{real.name}.kjumpd-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)
            os.fsync(fd)
            # only the boot loader reads these files (R's kernel and initrd: tens of MiB);
            # left in the page cache, the next hibernation would save them
            pagecache.forget_fd(fd)
        finally:
            os.close(fd)
        os.replace(tmp, real)
        dfd = os.open(real.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise BootEntryError(
            f"cannot write {path}",
            why=e.strerror or str(e),
            fix="check that the filesystem is mounted read-write and has room",
            path=path,
        ) from e


def write_file(sysroot: Sysroot, path: str, data: bytes, mode: int = 0o644) -> None:
    """Write a whole file durably (what install and uninstall write with too)."""
    _write_file(sysroot, path, data, mode)


def _copy(sysroot: Sysroot, src: Path, dest: str) -> None:
    try:
        data = pagecache.read_once(src)
    except OSError as e:
        raise BootEntryError(
            f"cannot read {src}",
            why=e.strerror or str(e),
            fix="build the restore-first kernel and initramfs first",
        ) from e
    _write_file(sysroot, dest, data)


def _efivar_path(sysroot: Sysroot, name: str) -> Path:
    return sysroot.path(f"{EFIVARS}/{name}-{LOADER_GUID}")


def _clear_immutable(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        buf = bytearray(fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))
        flags = struct.unpack("<I", buf)[0]
        if flags & FS_IMMUTABLE_FL:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("<I", flags & ~FS_IMMUTABLE_FL))
    except OSError as e:
        if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def efivar_read(sysroot: Sysroot, name: str) -> str | None:
    try:
        return efivar_decode(_efivar_path(sysroot, name).read_bytes())
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BootEntryError(
            f"cannot read EFI variable {name}",
            why=e.strerror or str(e),
            fix="check that efivarfs is mounted",
        ) from e


def efivar_write(sysroot: Sysroot, name: str, value: str | None) -> None:
    """Set (or with None delete) a systemd-boot loader variable."""
    if not sysroot.exists(EFIVARS):
        raise BootEntryError(
            "EFI variables are not available",
            why=f"{EFIVARS} does not exist (not booted with UEFI, or efivarfs not mounted)",
            fix="mount efivarfs, or use --bootloader grub or restore-first",
        )
    p = _efivar_path(sysroot, name)
    try:
        _clear_immutable(p)
        if value is None:
            p.unlink(missing_ok=True)
            return
        # efivarfs wants the attributes and data in a single write
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, efivar_encode(value))
        finally:
            os.close(fd)
    except OSError as e:
        raise BootEntryError(
            f"cannot {'delete' if value is None else 'set'} EFI variable {name}",
            why=e.strerror or str(e),
            fix="check that efivarfs is mounted read-write",
        ) from e


def grubenv_read(sysroot: Sysroot, path: str = GRUBENV) -> dict[str, str]:
    try:
        return grubenv_parse(sysroot.path(path).read_bytes())
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise BootEntryError(
            f"cannot read {path}", why=e.strerror or str(e), fix="check that /boot is mounted"
        ) from e


def grubenv_write(sysroot: Sysroot, env: dict[str, str], path: str = GRUBENV) -> None:
    """Rewrite grubenv in place (GRUB finds it by its blocks; it stays 1024 bytes)."""
    data = grubenv_format(env)
    real = sysroot.path(path)
    try:
        if not real.exists():
            _write_file(sysroot, path, data)
            return
        fd = os.open(real, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, GRUBENV_SIZE)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise BootEntryError(
            f"cannot write {path}",
            why=e.strerror or str(e),
            fix="check that /boot is mounted read-write",
        ) from e


def read_record(sysroot: Sysroot) -> BootEntry | None:
    text = sysroot.read_text(RECORD_PATH, default="")
    return BootEntry.from_json(text) if text else None


def detect_loader(sysroot: Sysroot, esp: str = DEFAULT_ESP) -> str:
    """ "grub" when /etc/grub.d exists, else "bls" when the ESP has loader/, else an error."""
    if sysroot.exists(GRUB_DIR):
        return "grub"
    if sysroot.exists(f"{esp}/loader"):
        return "bls"
    raise BootEntryError(
        "no supported boot loader found",
        why=f"neither {GRUB_DIR} nor {esp}/loader exists",
        fix="install GRUB or systemd-boot, or pass --esp",
    )


def install(
    sysroot: Sysroot,
    kind: str,
    *,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    loader: str | None = None,
    esp: str = DEFAULT_ESP,
    machine_id: str | None = None,
    version: str = "",
    boot: tuple[Any, Mapping[str, Path | bytes]] | None = None,
    machine: bool = True,
    normal_kernel: str | None = None,
    normal_initrd: str | None = None,
    normal_cmdline: str | None = None,
    target: Any = None,
) -> BootEntry:
    """Install R (``kernel``, ``initrd``: host files) as a boot entry of ``kind``.

    ``initrd`` is R's generic initramfs (bootloader/initramfs.py); the installed initrd is it
    followed by the machine payload: /etc/kjumpd/boot.json and the files it names. ``boot``
    gives that payload as (BootConfig, files); by default (``machine``) it is made for this
    machine (``machine_boot_config``: kjumpd's config, the reserved jump area, the normal
    kernel and the boot loader's command line). ``machine=False`` installs ``initrd`` as it is.

    ``cmdline`` is R's command line (it names the target: kjump.target= kjump.offset=).
    ``target`` (blockmap.Target) tells the machine payload about a LUKS volume holding it.
    GRUB users must run update-grub afterwards (``check`` says so until grub.cfg has the
    entry).
    """
    if kind not in KINDS:
        raise ConfigError(
            f"unknown boot loader kind {kind!r}", fix=f"use one of {', '.join(KINDS)}"
        )
    _check_cmdline(cmdline)
    if "console=" not in cmdline:
        # R speaks where this system's console is (its decisions are worth seeing)
        consoles = [
            w
            for w in kernel_cmdline.words(sysroot.read_text("/proc/cmdline", default=""))
            if w.startswith("console=") and _SAFE_CMDLINE.match(w)
        ]
        cmdline = " ".join([cmdline, *consoles])
    words = kernel_cmdline.params(cmdline)
    if boot is None and machine:
        try:
            offset = int(words["kjump.offset"], 0)
        except ValueError:
            raise ConfigError(
                f"kjump.offset={words['kjump.offset']!r} is not a number",
                fix="let `kjumpctl setup` build the command line",
            ) from None
        boot = machine_boot_config(
            sysroot,
            words["kjump.target"],
            offset,
            normal_kernel=normal_kernel,
            normal_initrd=normal_initrd,
            cmdline=normal_cmdline,
            target=target,
        )
    try:
        r_initrd = pagecache.read_once(initrd)
    except OSError as e:
        raise BootEntryError(
            f"cannot read {initrd}",
            why=e.strerror or str(e),
            fix="build R's initramfs first (python -m bootloader.initramfs base)",
        ) from None
    # with the image key inside, R's initrd is root's alone: the key is passphrase-protected,
    # but a copy anyone may read invites offline guessing; a LUKS key file, as in the
    # normal initramfs, is root's alone too
    initrd_mode = 0o644
    two_boots = "R's initramfs has no machine payload"
    if boot is not None:
        base_len = len(r_initrd)
        payload = restore_payload(*boot)
        r_initrd += payload
        if R_IMAGE_KEY in boot[1] or R_LUKS_KEY in boot[1]:
            initrd_mode = 0o600
        two_boots = confinement_problem(sysroot, boot, len(r_initrd), base_len, len(payload))
    if kind == "grub" or kind == "bls":
        loader = kind
    elif loader is None:
        loader = detect_loader(sysroot, esp)
    if loader not in ("grub", "bls"):
        raise ConfigError(f"unknown boot loader {loader!r}", fix="use grub or bls")
    files: list[str] = []
    previous_default = None
    if loader == "grub":
        k_dest, i_dest = f"{BOOT_DIR}/vmlinuz-restore", f"{BOOT_DIR}/initrd-restore.img"
        _copy(sysroot, kernel, k_dest)
        _write_file(sysroot, i_dest, r_initrd, initrd_mode)
        fstype, uuid, k_rel = locate(sysroot, k_dest)
        _fs2, _u2, i_rel = locate(sysroot, i_dest)
        snippet = render_grub_snippet(
            kind=kind, fs_uuid=uuid, fstype=fstype, kernel=k_rel, initrd=i_rel, cmdline=cmdline
        )
        _write_file(sysroot, GRUB_SNIPPET, snippet.encode(), 0o755)
        files = [k_dest, i_dest, GRUB_SNIPPET]
        esp_used = ""
    else:
        if not sysroot.exists(esp):
            raise BootEntryError(
                f"the EFI system partition {esp} is not there", fix="mount it or pass --esp"
            )
        k_dest, i_dest = f"{esp}/kjumpd/vmlinuz-restore", f"{esp}/kjumpd/initrd-restore.img"
        _copy(sysroot, kernel, k_dest)
        _write_file(sysroot, i_dest, r_initrd, initrd_mode)
        if machine_id is None:
            machine_id = sysroot.read_text("/etc/machine-id", default="").strip()
        entry = render_bls_entry(
            kernel="/kjumpd/vmlinuz-restore",
            initrd="/kjumpd/initrd-restore.img",
            cmdline=cmdline,
            machine_id=machine_id if re.fullmatch(r"[0-9a-f]{32}", machine_id or "") else "",
            version=version,
        )
        entry_path = f"{esp}/loader/entries/{BLS_ENTRY_ID}"
        _write_file(sysroot, entry_path, entry.encode())
        files = [k_dest, i_dest, entry_path]
        esp_used = esp
        if kind == "restore-first":
            previous_default = (
                efivar_read(sysroot, "LoaderEntryDefault") if sysroot.exists(EFIVARS) else None
            )
            efivar_write(sysroot, "LoaderEntryDefault", BLS_ENTRY_ID)
    told: dict[str, Any] = {}
    if boot is not None:
        bcfg, payload = boot
        src = payload.get(R_NORMAL_KERNEL)
        told = {
            "normal_cmdline": bcfg.normal.cmdline,
            "jump_area": list(bcfg.jump_area),
            "image_key_id": _payload_key_id(payload),
        }
        if isinstance(src, Path):
            told["normal_kernel"] = _system_path(sysroot, src)
            told["normal_kernel_sha256"] = sha256_file(src)
    rec = BootEntry(
        kind=kind,
        loader=loader,
        kernel=k_dest,
        initrd=i_dest,
        cmdline=cmdline,
        files=files,
        esp=esp_used,
        previous_default=previous_default,
        two_boots=two_boots,
        **told,
    )
    _write_file(sysroot, RECORD_PATH, rec.to_json().encode())
    log.info("installed the %s restore-first entry (%s)", kind, ", ".join(files))
    return rec


def restore_boots_line(rec: BootEntry) -> str:
    """What ``kjumpctl setup --bootloader`` and ``kjumpctl install`` say of the restore's boots."""
    if not rec.two_boots:
        return (
            "restore: one boot (R is confined to each hibernation's jump area and restores by "
            "itself when its kernel lands there)"
        )
    return f"restore: two boots (R, then the save kernel): {rec.two_boots}"


def _payload_key_id(payload: Mapping[str, Path | bytes]) -> str:
    """The key id of the image key in R's payload ("" when there is none)."""
    from kjumpd.image.seal import KeyFile

    src = payload.get(R_IMAGE_KEY)
    if src is None:
        return ""
    return KeyFile.from_json(src if isinstance(src, bytes) else Path(src).read_bytes()).key_id


def current_key_id(sysroot: Sysroot) -> str:
    """The key id of the image key R should hold now ("" when images are not encrypted)."""
    from kjumpd.daemon import config as cfgmod
    from kjumpd.image.seal import KeyFile

    cfg = cfgmod.load(sysroot)
    path = sysroot.path(cfg.image_key)
    if cfg.encryption == "off" or not path.is_file():
        return ""
    return KeyFile.load(path).key_id


def _system_path(sysroot: Sysroot, p: Path) -> str:
    try:
        return sysroot.unmap(p)
    except ValueError:
        return str(p)


def installed_initrd(initrd: Path, boot: tuple[Any, Mapping[str, Path | bytes]] | None) -> bytes:
    """The bytes ``install`` writes as R's initrd: the generic one, then the payload."""
    data = pagecache.read_once(initrd)
    return data + restore_payload(*boot) if boot is not None else data


def is_current(
    sysroot: Sysroot,
    kind: str,
    *,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    boot: tuple[Any, Mapping[str, Path | bytes]] | None,
) -> bool:
    """True when ``install`` with these arguments would write exactly what is installed."""
    try:
        rec = read_record(sysroot)
    except BootEntryError:
        return False
    if rec is None or rec.kind != kind or not rec.cmdline.startswith(cmdline):
        return False
    try:
        read = pagecache.read_once  # the comparison must not leave them cached either
        return read(sysroot.path(rec.kernel)) == read(kernel) and (
            read(sysroot.path(rec.initrd)) == installed_initrd(initrd, boot)
        )
    except OSError:
        return False


REFRESH = "kjumpctl install (or kjumpctl setup --bootloader restore-first)"


def staleness(sysroot: Sysroot, rec: BootEntry) -> list[str]:
    """How what R was told at install differs from the system now: the boot loader's
    default kernel and its command line. One line each, with the fix."""
    if not rec.normal_kernel or rec.normal_cmdline is None or rec.jump_area is None:
        return [
            f"{RECORD_PATH} does not record the normal kernel, its command line and the jump "
            f"area R was given (fix: run {REFRESH})"
        ]
    out = []
    try:
        want, _initrd = default_normal_kernel(sysroot)
    except BootEntryError:
        want = rec.normal_kernel
    same = want == rec.normal_kernel
    if not same and rec.normal_kernel_sha256 and sysroot.path(want).is_file():
        # the same kernel under another name (kernel-install's image, a symlink)
        same = sha256_file(sysroot.path(want)) == rec.normal_kernel_sha256
    if not same:
        out.append(
            f"the restore-first entry boots {rec.normal_kernel}, but the boot loader's "
            f"default kernel is now {want} (fix: run {REFRESH})"
        )
    elif want == rec.normal_kernel:
        real = sysroot.path(rec.normal_kernel)
        if not real.is_file():
            out.append(
                f"{rec.normal_kernel}, the normal kernel R boots, is gone (fix: run {REFRESH})"
            )
        elif rec.normal_kernel_sha256 and sha256_file(real) != rec.normal_kernel_sha256:
            out.append(
                f"{rec.normal_kernel} changed since the restore-first entry was installed "
                f"(fix: run {REFRESH})"
            )
    now = boot_loader_cmdline(sysroot)
    if kernel_cmdline.words(now) != kernel_cmdline.words(rec.normal_cmdline):
        out.append(
            f"the restore-first entry would boot the normal kernel with {rec.normal_cmdline!r}, "
            f"but the boot loader now gives {now!r} (fix: run {REFRESH})"
        )
    try:
        key_now = current_key_id(sysroot)
    except KjumpError as e:
        key_now = rec.image_key_id
        out.append(f"{e.message} (fix: {e.fix})" if e.fix else e.message)
    if key_now != rec.image_key_id:
        out.append(
            (
                f"the restore-first entry holds image key {rec.image_key_id}, images are now "
                f"sealed to {key_now}"
                if rec.image_key_id and key_now
                else f"images are now sealed to image key {key_now}; the restore-first entry "
                "has no key to open them"
                if key_now
                else "the restore-first entry holds an image key that is no longer used"
            )
            + " (fix: run `kjumpctl install`: it rebuilds the save kernel's initramfs too)"
        )
    # The jump area is not compared: R loads the save kernel into the area the image header
    # records, wherever A's reservation was (KASLR or crashkernel=SIZE may move it), and
    # ``set_oneshot`` confines R to that hibernation's area.
    return out


def uninstall(sysroot: Sysroot) -> list[str]:
    """Remove what ``install`` wrote; returns the removed paths."""
    rec = read_record(sysroot)
    if rec is None:
        return []
    clear_oneshot(sysroot)
    removed = []
    for f in rec.files + [RECORD_PATH]:
        p = sysroot.path(f)
        if p.exists():
            p.unlink()
            removed.append(f)
    if rec.loader == "bls" and rec.kind == "restore-first" and sysroot.exists(EFIVARS):
        if efivar_read(sysroot, "LoaderEntryDefault") == BLS_ENTRY_ID:
            efivar_write(sysroot, "LoaderEntryDefault", rec.previous_default)
    return removed


#: the grubenv variable the GRUB entry appends to R's command line: R's confinement to the
#: jump area of the hibernation that armed it (Debian's, Ubuntu's and Fedora's 00_header
#: load grubenv before the menu)
CONFINE_VAR = "kjumpd_confine"


def set_oneshot(sysroot: Sysroot, area: tuple[int, int] | None = None) -> bool:
    """Make the next boot (only) start R, confined to ``area`` (the jump area, start and
    size, of the image about to be saved) when R can be (kjumpd.confine): one boot to
    restore. Call BEFORE freezing filesystems (it writes /boot or the ESP). Idempotent.

    Returns False when there is nothing to do (restore-first boots R anyway, unconfined)."""
    rec = _require_record(sysroot)
    words: list[str] = []
    if area is not None and not rec.two_boots:
        try:
            words = confine_words(sysroot, area)
        except ConfigError as e:
            log.info("restore in two boots: %s", e.message)
    oneshot = rec.kind != "restore-first"
    if rec.loader == "grub":
        env = grubenv_read(sysroot, rec.grubenv)
        want = dict(env)
        if oneshot:
            want["next_entry"] = rec.entry_id
        if words:
            want[CONFINE_VAR] = " ".join(words)
        else:
            want.pop(CONFINE_VAR, None)
        if want != env:
            grubenv_write(sysroot, want, rec.grubenv)
    else:
        _bls_confine(sysroot, rec, words)
        if oneshot:
            efivar_write(sysroot, "LoaderEntryOneShot", BLS_ENTRY_ID)
    return oneshot or bool(words)


def clear_oneshot(sysroot: Sysroot) -> bool:
    """Undo ``set_oneshot`` (on resume, on rollback, at daemon start with no saved image):
    R boots unconfined again, and only where it boots anyway.

    Only kjumpd's own one-shot is removed; returns True when something was."""
    rec = read_record(sysroot)
    if rec is None:
        return False
    if rec.loader == "grub":
        env = grubenv_read(sysroot, rec.grubenv)
        want = dict(env)
        want.pop(CONFINE_VAR, None)
        if rec.kind != "restore-first" and env.get("next_entry") == rec.entry_id:
            want.pop("next_entry")
        if want == env:
            return False
        grubenv_write(sysroot, want, rec.grubenv)
        return True
    done = _bls_confine(sysroot, rec, [])
    if rec.kind == "restore-first":
        return done
    if not sysroot.exists(EFIVARS) or efivar_read(sysroot, "LoaderEntryOneShot") != BLS_ENTRY_ID:
        return done
    efivar_write(sysroot, "LoaderEntryOneShot", None)
    return True


def _bls_confine(sysroot: Sysroot, rec: BootEntry, words: list[str]) -> bool:
    """Rewrite the BLS entry's ``options`` as R's command line plus ``words``; True when the
    file changed."""
    path = f"{rec.esp}/loader/entries/{BLS_ENTRY_ID}"
    old = sysroot.read_text(path, default="")
    if not old:
        return False
    options = " ".join([rec.cmdline, *words])
    _check_cmdline(options)
    lines = []
    for line in old.splitlines():
        key = re.match(r"^options\s+", line)
        lines.append(key.group(0) + options if key else line)
    new = "\n".join(lines) + "\n"
    if new == old:
        return False
    _write_file(sysroot, path, new.encode())
    return True


def oneshot_pending(sysroot: Sysroot) -> bool:
    """True when the next boot is armed to start R (what ``kjumpctl status`` shows)."""
    rec = read_record(sysroot)
    if rec is None:
        return False
    if rec.kind == "restore-first":
        return True
    try:
        if rec.loader == "grub":
            return grubenv_read(sysroot, rec.grubenv).get("next_entry") == rec.entry_id
        return (
            sysroot.exists(EFIVARS) and efivar_read(sysroot, "LoaderEntryOneShot") == BLS_ENTRY_ID
        )
    except BootEntryError:
        return False


def _require_record(sysroot: Sysroot) -> BootEntry:
    rec = read_record(sysroot)
    if rec is None:
        raise BootEntryError(
            "no restore-first boot entry is installed",
            fix="run `kjumpctl setup --bootloader grub|bls|restore-first`",
        )
    return rec


def restore_unlockers(sysroot: Sysroot) -> frozenset[str] | None:
    """What the installed R can unlock a LUKS volume holding the target with: "cryptsetup"
    (passphrase, key file) and the token types whose cryptsetup plugin it carries (e.g.
    "systemd-tpm2"); None when its initramfs cannot be read here."""
    from kjumpd import initrd

    rec = read_record(sysroot)
    if rec is None:
        return None
    try:
        names = initrd.member_names(sysroot.path(rec.initrd))
    except (KjumpError, OSError) as e:
        log.warning("cannot list %s (%s)", rec.initrd, e)
        return None
    from kjumpd.linux import luks

    found = set()
    for n in names:
        base = n.rsplit("/", 1)[-1]
        kind = "cryptsetup" if base == "cryptsetup" else luks.plugin_kind(base)
        if kind is not None:
            found.add(kind)
    return frozenset(found)


def check(sysroot: Sysroot) -> list[str]:
    """Problems with the installed boot entry, one line each (empty: all good)."""
    try:
        rec = read_record(sysroot)
    except BootEntryError as e:
        return [e.message]
    if rec is None:
        return [
            "no restore-first boot entry is installed "
            "(fix: run `kjumpctl setup --bootloader grub|bls|restore-first`)"
        ]
    # R boots the normal kernel as it was told at install: every boot (restore-first), or
    # when an image cannot be restored (one-shot kinds). An entry installed without a
    # machine payload (machine=False) was told nothing to compare.
    problems = staleness(sysroot, rec) if rec.normal_cmdline is not None else []
    for f in (rec.kernel, rec.initrd):
        p = sysroot.path(f)
        if not p.is_file() or p.stat().st_size == 0:
            problems.append(f"{f} is missing or empty (fix: run `kjumpctl setup` again)")
    if rec.loader == "grub":
        snip = sysroot.path(GRUB_SNIPPET)
        if not snip.is_file():
            problems.append(f"{GRUB_SNIPPET} is missing (fix: run `kjumpctl setup` again)")
        elif not os.access(snip, os.X_OK):
            problems.append(
                f"{GRUB_SNIPPET} is not executable: grub-mkconfig skips it "
                f"(fix: chmod +x {GRUB_SNIPPET})"
            )
        cfg = sysroot.read_text(GRUB_CFG, default="")
        if f"--id {rec.entry_id}" not in cfg:
            problems.append(f"{GRUB_CFG} has no {rec.entry_id} entry (fix: run update-grub)")
        try:
            grubenv_read(sysroot, rec.grubenv)
        except BootEntryError as e:
            problems.append(e.message)
    else:
        entry_path = f"{rec.esp}/loader/entries/{BLS_ENTRY_ID}"
        text = sysroot.read_text(entry_path, default="")
        if not text:
            problems.append(f"{entry_path} is missing (fix: run `kjumpctl setup` again)")
        else:
            problems += [f"{entry_path}: {p}" for p in bls_problems(text)]
        if not sysroot.exists(EFIVARS):
            problems.append(
                f"{EFIVARS} is missing: the one-shot EFI variable cannot be set "
                "(fix: boot with UEFI and mount efivarfs)"
            )
        elif (
            rec.kind == "restore-first"
            and efivar_read(sysroot, "LoaderEntryDefault") != BLS_ENTRY_ID
        ):
            problems.append(
                "LoaderEntryDefault does not name the restore-first entry "
                "(fix: run `kjumpctl setup --bootloader restore-first` again)"
            )
    return problems
