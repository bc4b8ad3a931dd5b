"""R's initramfs: a generic base (busybox, kexec-tools, a trimmed python3, kjumpd, /init =
bootloader/restore_init.py) plus a machine payload appended as a second cpio archive (the
kernel unpacks concatenated archives): /etc/kjumpd/boot.json and the four files it names (the
normal kernel and initrd, the save kernel and its initramfs).

    base = build_restore_initramfs()                      # cached; what tests/vm/assets builds
    cfg, files = restore_config(...)                      # boot.json + archive path -> host file
    make_restore_initrd(out, cfg, files)                  # base + payload: what the entry boots

Command line: python -m bootloader.initramfs base [--out FILE]
              python -m bootloader.initramfs machine [--out FILE]   (reads kjumpd's config)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path
from typing import Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kjumpd.errors import KjumpError  # noqa: E402
from kjumpd.restorefirst import (BOOT_CONFIG_PATH, BootConfig, KernelSpec,  # noqa: E402
                                 save_kernel_hash)

log = logging.getLogger("kjumpd.bootloader.initramfs")

INIT = REPO / "bootloader" / "restore_init.py"
#: /init: python cannot be PID 1 before /dev exists (it needs random numbers at start-up)
R_INIT = """#!/bin/sh
# /init of kjumpd's restore-first environment (R)
export PATH=/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
KJUMPD_RF_INIT=1 /usr/bin/python3 -S -E -B -u /kjumpd-rf/restore_init.py
echo "kjumpd-rf: nothing could be started; a shell follows (exit powers off)"
sh
poweroff -f
"""
KEXEC = Path("/usr/sbin/kexec")
#: modules R imports (some lazily, inside functions: a trace of the entry cannot see them)
R_MODULES = (
    "kjumpd.restorefirst", "kjumpd.fsstamp", "kjumpd.image.store",
    "kjumpd.image.device", "kjumpd.image.format", "kjumpd.agent.kernel_role", "kjumpd.sysroot",
    "json", "json.decoder", "json.encoder", "hashlib", "subprocess", "uuid", "zlib", "struct",
    "mmap", "dataclasses", "enum", "errno", "logging", "encodings.ascii", "encodings.latin_1",
    "encodings.utf_8", "encodings.aliases",
)
#: archive paths of the payload files
NORMAL_KERNEL = "/kjump/normal/vmlinuz"
NORMAL_INITRD = "/kjump/normal/initrd.img"
SAVE_KERNEL = "/kjump/save/bzImage"
SAVE_INITRD = "/kjump/save/initramfs.cpio.gz"


def build_restore_initramfs(out: Path | None = None):  # -> savekernel.initramfs.InitramfsImage
    """The generic part of R's initramfs (no boot.json): cached by its inputs."""
    from savekernel.initramfs import build_initramfs
    return build_initramfs(out, R_INIT, {"kjumpd-rf/restore_init.py": INIT}, name="restore",
                           python_modules=R_MODULES, python_packages=("kjumpd",),
                           host_binaries=(KEXEC,))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def restore_config(*, target_uuid: str, target_offset: int, normal_kernel: Path,
                   normal_initrd: Path | None, normal_cmdline: str, save_kernel: Path,
                   save_initrd: Path, save_cmdline: str, jump_area: tuple[int, int],
                   max_attempts: int = 3) -> tuple[BootConfig, dict[str, Path]]:
    """boot.json for these host files, and the payload (archive path -> host file)."""
    ks, is_ = _sha256(Path(save_kernel)), _sha256(Path(save_initrd))
    cfg = BootConfig(target_uuid=target_uuid, target_offset=target_offset,
                     normal=KernelSpec(NORMAL_KERNEL, NORMAL_INITRD if normal_initrd else None,
                                       normal_cmdline),
                     save=KernelSpec(SAVE_KERNEL, SAVE_INITRD, save_cmdline),
                     save_hash=save_kernel_hash(ks, is_), save_kernel_sha256=ks,
                     save_initrd_sha256=is_, jump_area=tuple(jump_area), max_attempts=max_attempts)
    files = {NORMAL_KERNEL: Path(normal_kernel), SAVE_KERNEL: Path(save_kernel),
             SAVE_INITRD: Path(save_initrd)}
    if normal_initrd:
        files[NORMAL_INITRD] = Path(normal_initrd)
    BootConfig.from_dict(cfg.to_dict())   # validates
    return cfg, files


def restore_payload(cfg: BootConfig, files: Mapping[str, Path | bytes]) -> bytes:
    """An uncompressed newc archive with boot.json and the files, to append to the base."""
    from savekernel import cpio
    entries = {BOOT_CONFIG_PATH.lstrip("/"): cfg.to_json().encode()}
    for arc, src in files.items():
        entries[arc.lstrip("/")] = src if isinstance(src, bytes) else Path(src).read_bytes()
    return cpio.write(cpio.Entry.file(name, data, 0o644) for name, data in sorted(entries.items()))


def make_restore_initrd(out: Path, cfg: BootConfig, files: Mapping[str, Path | bytes],
                        base: Path | None = None) -> Path:
    """Write base + payload to ``out`` (what the boot entry's initrd line loads)."""
    base = Path(base) if base else build_restore_initramfs().path
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(Path(base).read_bytes())
        f.write(restore_payload(cfg, files))
    tmp.replace(out)
    return out


def normal_cmdline(proc_cmdline: str) -> str:
    """The running kernel's command line as the normal kernel should get it again: without
    what the boot loader adds per boot (BOOT_IMAGE=, initrd=) or what kjumpd adds (kjump.*)."""
    drop = ("BOOT_IMAGE", "initrd", "kjump.rf", "kjump.role", "kjump.target", "kjump.offset")
    return " ".join(w for w in proc_cmdline.split() if w.split("=", 1)[0] not in drop)


def build_for_machine(sysroot_dir: str = "/", config_path: str | None = None, *,
                      out: Path, normal_kernel: str | None = None,
                      normal_initrd: str | None = None, cmdline: str | None = None,
                      max_attempts: int = 3) -> tuple[Path, str]:
    """R's complete initrd for this machine (the target, jump area and save kernel from
    kjumpd's config); returns it and the command line R must boot with."""
    import os
    from kjumpd import blockmap, config as cfgmod, jumparea
    from kjumpd.sysroot import Sysroot
    sr = Sysroot(Path(sysroot_dir))
    cfg = cfgmod.load(sr, config_path or cfgmod.CONFIG_PATH)
    target, uuid = blockmap.current(sr, cfg.target, restamp=False)
    area = jumparea.find(sr, cfg)
    release = os.uname().release
    nk = normal_kernel or f"/boot/vmlinuz-{release}"
    ni = normal_initrd if normal_initrd is not None else f"/boot/initrd.img-{release}"
    if ni and not sr.path(ni).exists():
        ni = ""
    line = cmdline if cmdline is not None else normal_cmdline(sr.read_text("/proc/cmdline"))
    bcfg, files = restore_config(
        target_uuid=uuid, target_offset=target.superblock_offset,
        normal_kernel=sr.path(nk), normal_initrd=sr.path(ni) if ni else None,
        normal_cmdline=line, save_kernel=sr.path(cfg.save_kernel),
        save_initrd=sr.path(cfg.save_initramfs), save_cmdline=cfg.save_append,
        jump_area=(area.start, area.size), max_attempts=max_attempts)
    make_restore_initrd(out, bcfg, files)
    return out, f"kjump.target={uuid} kjump.offset={target.superblock_offset}"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    p = argparse.ArgumentParser(prog="python -m bootloader.initramfs",
                                description="Build the restore-first environment's initramfs.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base", help="the generic base archive; prints its path")
    b.add_argument("--out", type=Path)
    m = sub.add_parser("machine", help="R's complete initrd for this machine (base + "
                                       "boot.json + kernels); prints R's command line")
    m.add_argument("--sysroot", default="/")
    m.add_argument("--config", default=None, help="kjumpd configuration file")
    m.add_argument("--out", type=Path, default=Path("/usr/lib/kjumpd/restore/initrd.img"))
    m.add_argument("--normal-kernel", default=None, help="default /boot/vmlinuz-$(uname -r)")
    m.add_argument("--normal-initrd", default=None, help="default /boot/initrd.img-$(uname -r)")
    m.add_argument("--cmdline", default=None, help="default: this boot's /proc/cmdline")
    m.add_argument("--max-attempts", type=int, default=3)
    args = p.parse_args(argv)
    try:
        if args.cmd == "machine":
            out, rline = build_for_machine(args.sysroot, args.config, out=args.out,
                                           normal_kernel=args.normal_kernel,
                                           normal_initrd=args.normal_initrd, cmdline=args.cmdline,
                                           max_attempts=args.max_attempts)
            print(out)
            print(f"R's command line: {rline} (kjumpctl setup --bootloader KIND "
                  f"--restore-initrd {out} adds it)", file=sys.stderr)
            return 0
        img = build_restore_initramfs(args.out)
    except KjumpError as e:
        print(f"initramfs: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"initramfs: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(img.path)
    print(f"restore-first initramfs: {img.compressed_size} bytes gzip, {img.uncompressed_size} "
          f"uncompressed, {img.members} members{' (cached)' if img.cached else ''}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
