"""kjumpctl install / uninstall: put kjumpd on this machine, or take it off (local, as root).

install [--dry-run] [--save-kernel F] [--save-initramfs F] ...
        the save kernel files, their hashes in the config, the systemd unit, D-Bus and polkit
        files, the systemd drop-ins, the kernel upgrade hooks, the jump area on the boot
        loader's command line, the restore-first entry; prints each change; a second run
        changes nothing. Recorded in /var/lib/kjumpd/install.json.
install --refresh-boot-entry [--normal-kernel K] [--normal-initrd I]
        rebuild the restore-first entry for the boot loader's default (or the given) kernel
        and command line (what the kernel upgrade hooks run)
uninstall [--dry-run]
        reverse exactly what install recorded (files changed since are left alone)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

# pathlib and subprocess are imported where used: building kjumpctl's parser (every command,
# kjumpctl hibernate included) stays light


def _runner(sysroot_is_real: bool) -> Any:
    import subprocess

    def run(argv: Sequence[str]) -> int:
        if not sysroot_is_real:
            print("          (not run: --sysroot is not /)")
            return 0
        try:
            return subprocess.run(list(argv), check=False).returncode
        except FileNotFoundError:
            print(f"          ({argv[0]} is not installed: run the equivalent by hand)")
            return 0

    return run


def _need_root(sr: Any, dry_run: bool) -> None:
    import os

    from kjumpd.errors import NotAuthorizedError

    if sr.is_real and not dry_run and os.geteuid() != 0:
        raise NotAuthorizedError(
            "kjumpctl install and uninstall change system files",
            fix="run them as root (sudo); --dry-run shows the changes as any user",
        )


def cmd_install(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kjumpd.daemon import install
    from kjumpd.sysroot import Sysroot

    sr = Sysroot(Path(args.sysroot))
    _need_root(sr, args.dry_run)
    if args.refresh_boot_entry:
        # the first --normal-initrd that exists (the kernel-install plugin names its candidates)
        initrd = next((i for i in args.normal_initrd or () if sr.path(i).is_file()), None)
        step = install.refresh_boot_entry(
            sr, normal_kernel=args.normal_kernel, normal_initrd=initrd, say=print
        )
        _recheck(sr)
        return 0 if step.state != "pending" else 1
    opts = install.Options(
        save_kernel=Path(args.save_kernel) if args.save_kernel else None,
        save_initramfs=Path(args.save_initramfs) if args.save_initramfs else None,
        restore_kernel=Path(args.restore_kernel) if args.restore_kernel else None,
        restore_initrd=Path(args.restore_initrd) if args.restore_initrd else None,
        bootloader=args.bootloader,
        esp=args.esp,
        jump_area=not args.no_jump_area,
        systemd=not args.no_systemd,
    )
    plan = install.plan(sr, opts)
    if plan.nothing_to_do and not plan.commands:
        for line in plan.lines():
            print(line)
        print(f"nothing to do: kjumpd is installed as {install.MANIFEST_PATH} records")
        return 0
    if args.dry_run:
        print("kjumpctl install would (nothing is changed with --dry-run):")
        for line in plan.lines():
            print(f"  {line}")
        return 0
    install.apply(sr, plan, _runner(sr.is_real), print)
    for n in plan.notes:
        print(f"note: {n}")
    if plan.boot_entry is not None and plan.boot_entry.state == "pending":
        print(f"boot entry pending: {plan.boot_entry.detail}")
    print(f"installed; recorded in {install.MANIFEST_PATH} (kjumpctl uninstall reverses it)")
    _recheck(sr)
    return 0


def _recheck(sr: Any) -> None:
    """A running kjumpd checks again now: logind offers hibernation (or withholds it) as the
    change just made says, not up to 30 s later."""
    from kjumpd.cli.daemon_cmds import recheck

    if sr.is_real and recheck():
        print("kjumpd checked again: `kjumpctl check` shows the result")


def cmd_uninstall(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kjumpd.daemon import install
    from kjumpd.sysroot import Sysroot

    sr = Sysroot(Path(args.sysroot))
    _need_root(sr, args.dry_run)
    if args.dry_run:
        man, undos, cmds = install.plan_uninstall(sr)
        if man is None:
            print(f"nothing to uninstall: {install.MANIFEST_PATH} does not exist")
            return 0
        print("kjumpctl uninstall would (nothing is changed with --dry-run):")
        if man.boot_entry:
            print("  remove    the restore-first boot entry (kjumpctl setup --bootloader)")
        for u in undos:
            print(f"  {u.describe()}")
        for c in cmds:
            print(f"  run       {' '.join(c)}")
        print(f"  remove    {install.MANIFEST_PATH}")
        return 0
    install.uninstall(sr, _runner(sr.is_real), print)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "install",
        help="install kjumpd on this machine (files, boot entry, systemd integration)",
        description="Install kjumpd on this machine: every change is printed; a second run "
        "changes nothing; kjumpctl uninstall reverses it.",
    )
    p.add_argument("--dry-run", action="store_true", help="print every change, make none")
    p.add_argument("--save-kernel", default=None, help="the save kernel (a bzImage) to install")
    p.add_argument(
        "--save-initramfs",
        default=None,
        help="the save kernel's initramfs (default: built from this host's python3)",
    )
    p.add_argument(
        "--restore-kernel", default=None, help="restore-first kernel (default: the save kernel)"
    )
    p.add_argument(
        "--restore-initrd",
        default=None,
        help="restore-first generic initramfs (default: built by bootloader/initramfs.py)",
    )
    p.add_argument(
        "--bootloader",
        choices=("restore-first", "grub", "bls"),
        default="restore-first",
        help="kind of boot entry (kjumpctl setup --bootloader)",
    )
    p.add_argument("--esp", default="/boot/efi", help="EFI system partition (bls)")
    p.add_argument(
        "--no-jump-area",
        action="store_true",
        help="leave the boot loader's kernel command line alone",
    )
    p.add_argument(
        "--no-systemd",
        action="store_true",
        help="install no drop-ins or kernel hooks (systemctl hibernate stays systemd's)",
    )
    p.add_argument(
        "--refresh-boot-entry",
        action="store_true",
        help="only rebuild the restore-first entry (the kernel upgrade hooks run this)",
    )
    p.add_argument("--normal-kernel", default=None, help="with --refresh-boot-entry")
    p.add_argument(
        "--normal-initrd",
        action="append",
        default=None,
        help="with --refresh-boot-entry; the first given that exists is used (default: the "
        "initrd installed beside the kernel)",
    )
    p.set_defaults(func=cmd_install)

    p = sub.add_parser(
        "uninstall",
        help="reverse what kjumpctl install did (as its manifest records)",
    )
    p.add_argument("--dry-run", action="store_true", help="print every change, make none")
    p.set_defaults(func=cmd_uninstall)
