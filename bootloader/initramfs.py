"""R's initramfs: a generic base (busybox, kexec-tools, a trimmed python3, kjumpd, /init =
kjumpd/restore/init.py) plus a machine payload appended as a second cpio archive (the
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
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kjumpd.bootconfig import BootConfig
from kjumpd.errors import KjumpError
from kjumpd.linux import pagecache

log = logging.getLogger("kjumpd.bootloader.initramfs")

INIT = REPO / "kjumpd" / "restore" / "init.py"
#: /init: python cannot be PID 1 before /dev exists. PYTHONHASHSEED=0: a fixed str hash
#: seed, so python reads no random bytes at start-up. R is booted by the boot loader, often
#: without an RNG seed; the first read of /dev/urandom then makes the kernel generate jitter
#: entropy until its pool is ready (1.2 s of R's start under TCG: "random: crng init done"
#: right before python's first line). R hashes only its own strings (boot.json, the header).
#: python runs without -E (it would ignore PYTHONHASHSEED) in an environment env -i built.
#: restore_init.py is in the archive compiled (module RF_MODULE), not as a script python
#: would compile at every boot.
RF_MODULE = "kjumpd_restore_init"
from savekernel.initramfs import BOOTCACHE_INSTALL

R_INIT = f"""#!/bin/sh
# /init of kjumpd's restore-first environment (R)
export PATH=/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
env -i PATH=$PATH PYTHONHASHSEED=0 KJUMPD_RF_INIT=1 /usr/bin/python3 -S -B -u \\
    -c "import sys; {BOOTCACHE_INSTALL}; import {RF_MODULE}; sys.exit({RF_MODULE}.main())"
echo "kjumpd-rf: nothing could be started; a shell follows (exit powers off)"
sh
poweroff -f
"""
KEXEC = Path("/usr/sbin/kexec")
#: modules R imports (some lazily, inside functions: a trace of the entry cannot see them)
R_MODULES = (
    "kjumpd.restore.decision",
    "kjumpd.bootconfig",
    "kjumpd.fsstamp",
    "kjumpd.image.store",
    "kjumpd.image.device",
    "kjumpd.image.format",
    "kjumpd.sysroot",
    "kjumpd.linux.cmdline",
    "kjumpd.linux.kmsg",
    "kjumpd.hashing",
    "kjumpd.linux.pagecache",
    "kjumpd.restore.unlock",
    "kjumpd.linux.luks",
    "kjumpd.linux.devmapper",
    "kjumpd.cpio",
    "kjumpd.confine",
    "kjumpd.agent.kernel_role",
    "kjumpd.agent.devmem",
    "kjumpd.agent.jumpback",
    "kjumpd.agent.watchdog",
    "kjumpd.image.restore",
    "kjumpd.image.chunk",
    "kjumpd.image.stream",
    "termios",
    "json",
    "json.decoder",
    "json.encoder",
    "hashlib",
    "subprocess",
    "uuid",
    "zlib",
    "struct",
    "mmap",
    "dataclasses",
    "enum",
    "errno",
    "logging",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8",
    "encodings.aliases",
)
#: archive paths of the payload files (kjumpd.daemon.bootentry owns the payload format)
from kjumpd.daemon.bootentry import (
    boot_config_for,
    restore_payload,
)


def build_restore_initramfs(
    out: Path | None = None, crypto: bool = False
):  # -> savekernel.initramfs.InitramfsImage
    """The generic part of R's initramfs (no boot.json): cached by its inputs. With
    ``crypto``, R can open encrypted images (python3-cryptography) and unlock a LUKS volume
    that holds the target (cryptsetup, from this machine)."""
    from savekernel.initramfs import (
        CRYPTO_MODULES,
        CRYPTO_PACKAGES,
        SAVE_EXTRA_MODULES,
        build_initramfs,
        crypto_host_files,
    )

    # R confined to the jump area restores by itself (kjumpd.confine): it carries
    # what B's restore role imports
    return build_initramfs(
        out,
        R_INIT,
        name="restore",
        python_modules=(*R_MODULES, *SAVE_EXTRA_MODULES, *(CRYPTO_MODULES if crypto else ())),
        python_packages=("kjumpd", "lz4", *(CRYPTO_PACKAGES if crypto else ())),
        host_binaries=(KEXEC, *((*crypto_host_files(), *_cryptsetup()) if crypto else ())),
        python_scripts={RF_MODULE: INIT},
    )


#: cryptsetup's token plugins R carries when this machine has them, with the libraries
#: each loads with dlopen (ldd does not list them): systemd's TPM2 plugin and the tpm2-tss
#: libraries it and ESYS load (the device TCTI, /dev/tpmrm0)
TOKEN_PLUGINS = {
    "systemd-tpm2": (
        "libtss2-esys.so.0",
        "libtss2-rc.so.0",
        "libtss2-mu.so.0",
        "libtss2-tctildr.so.0",
        "libtss2-tcti-device.so.0",
    ),
}


def _cryptsetup() -> tuple[Path, ...]:
    """cryptsetup, for a target inside a LUKS volume (a machine without it has no such
    volume to unlock), and the token plugins of TOKEN_PLUGINS this machine has, whole (a
    plugin without its libraries would fail in R; R then asks for the passphrase)."""
    import shutil

    from kjumpd.linux.luks import PLUGIN_FILE

    found = shutil.which("cryptsetup", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        return ()
    files = [Path(found)]
    for kind, libs in TOKEN_PLUGINS.items():
        for plugin in sorted(
            Path("/usr/lib").glob(f"*/cryptsetup/{PLUGIN_FILE.format(kind=kind)}")
        ):
            needed = [plugin.parent.parent / lib for lib in libs]
            if all(p.exists() for p in needed):
                files += [plugin, *needed]
            else:
                log.warning(
                    "R cannot use cryptsetup's %s plugin: %s missing (Debian and Ubuntu: "
                    "apt install libtss2-dev, which pulls in every tpm2-tss library)",
                    kind,
                    ", ".join(p.name for p in needed if not p.exists()),
                )
    return tuple(files)


def restore_config(**kw) -> tuple[BootConfig, dict[str, Path]]:
    """boot.json for host files, and the payload: see kjumpd.daemon.bootentry.boot_config_for."""
    return boot_config_for(**kw)


def make_restore_initrd(
    out: Path, cfg: BootConfig, files: Mapping[str, Path | bytes], base: Path | None = None
) -> Path:
    """Write base + payload to ``out`` (what the boot entry's initrd line loads)."""
    base = Path(base) if base else build_restore_initramfs().path
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(pagecache.read_once(base))
        f.write(restore_payload(cfg, files))
        f.flush()
        os.fsync(f.fileno())  # the boot loader reads it from the disk, maybe after a crash
        pagecache.forget_fd(f.fileno())  # kept cached, the next image would save it
    tmp.replace(out)
    return out


def build_for_machine(
    sysroot_dir: str = "/",
    *,
    out: Path,
    normal_kernel: str | None = None,
    normal_initrd: str | None = None,
    cmdline: str | None = None,
    max_attempts: int = 3,
) -> tuple[Path, str]:
    """R's complete initrd for this machine (the target, jump area and save kernel from
    kjumpd's config); returns it and the command line R must boot with."""
    from kjumpd.daemon import blockmap
    from kjumpd.daemon import config as cfgmod
    from kjumpd.daemon.bootentry import machine_boot_config
    from kjumpd.sysroot import Sysroot

    sr = Sysroot(Path(sysroot_dir))
    target, uuid = blockmap.current(sr, cfgmod.load(sr).target, restamp=False)
    bcfg, files = machine_boot_config(
        sr,
        uuid,
        target.superblock_offset,
        normal_kernel=normal_kernel,
        normal_initrd=normal_initrd,
        cmdline=cmdline,
        max_attempts=max_attempts,
    )
    make_restore_initrd(out, bcfg, files)
    from kjumpd.bootconfig import QUICK_BOOT_PARAMS

    return out, f"kjump.target={uuid} kjump.offset={target.superblock_offset} {QUICK_BOOT_PARAMS}"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    p = argparse.ArgumentParser(
        prog="python -m bootloader.initramfs",
        description="Build the restore-first environment's initramfs.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base", help="the generic base archive; prints its path")
    b.add_argument("--out", type=Path)
    m = sub.add_parser(
        "machine",
        help="R's complete initrd for this machine (base + "
        "boot.json + kernels); prints R's command line",
    )
    m.add_argument("--sysroot", default="/")
    m.add_argument("--out", type=Path, default=Path("/usr/lib/kjumpd/restore/initrd.img"))
    m.add_argument("--normal-kernel", default=None, help="default /boot/vmlinuz-$(uname -r)")
    m.add_argument("--normal-initrd", default=None, help="default /boot/initrd.img-$(uname -r)")
    m.add_argument("--cmdline", default=None, help="default: this boot's /proc/cmdline")
    m.add_argument("--max-attempts", type=int, default=3)
    args = p.parse_args(argv)
    try:
        if args.cmd == "machine":
            out, rline = build_for_machine(
                args.sysroot,
                out=args.out,
                normal_kernel=args.normal_kernel,
                normal_initrd=args.normal_initrd,
                cmdline=args.cmdline,
                max_attempts=args.max_attempts,
            )
            print(out)
            print(
                f"R's command line: {rline} (kjumpctl setup --bootloader KIND "
                f"--restore-initrd {out} adds it)",
                file=sys.stderr,
            )
            return 0
        img = build_restore_initramfs(args.out)
    except KjumpError as e:
        print(f"initramfs: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"initramfs: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(img.path)
    print(
        f"restore-first initramfs: {img.compressed_size} bytes gzip, {img.uncompressed_size} "
        f"uncompressed, {img.members} members{' (cached)' if img.cached else ''}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
