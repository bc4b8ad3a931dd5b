"""kjumpctl commands that run locally (no daemon needed): check, plan, setup.

check [--mode MODE] [--json]   the preflight kjumpd runs before every hibernation
plan  [--mode MODE] [--json]   what a hibernation would do: quiesce writes, filesystems
                               to freeze, memory ranges, the save kernel's command line
setup --target PATH --size SIZE   create (file) or claim (partition) the image target
      --jump-area [--yes]      put crashkernel=SIZE (SIZE@START when [jump_area] start is
                               set) on the boot loader's command line (shows the diff;
                               writes only with --yes or after "y")
      --bootloader grub|bls|restore-first   install the restore-first boot entry
      --save-kernel            print the [save_kernel] kernel_sha256/initramfs_sha256 lines
                               for the installed save kernel (also after any other setup
                               step when the config lacks them or they differ)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from kjumpd.errors import ConfigError, UsageError
from kjumpd.modes import MODES

if TYPE_CHECKING:  # imported where used: kjumpctl's start-up (every command) stays light
    from kjumpd.daemon import config as cfgmod
    from kjumpd.sysroot import Sysroot


def _load(args: argparse.Namespace) -> tuple[Sysroot, cfgmod.Config]:
    from pathlib import Path

    from kjumpd.daemon import config as cfgmod
    from kjumpd.sysroot import Sysroot

    sr = Sysroot(Path(args.sysroot))
    if getattr(args, "config", None):
        try:
            text = Path(args.config).read_text()
        except FileNotFoundError:
            raise UsageError(
                f"--config {args.config}: no such file", fix="pass an existing file to --config"
            ) from None
        except OSError as e:
            raise ConfigError(
                f"cannot read {args.config}",
                why=e.strerror or str(e),
                fix="pass an existing file to --config",
            ) from None
        return sr, cfgmod.loads(text, args.config)
    return sr, cfgmod.load(sr)


def cmd_check(args: argparse.Namespace) -> int:
    from kjumpd.daemon import preflight

    sr, cfg = _load(args)
    rep = preflight.run(sr, cfg, args.mode)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        print(rep.text())
        print("hibernation is possible" if rep.ok else "hibernation is NOT possible")
    return 0 if rep.ok else 3


def cmd_plan(args: argparse.Namespace) -> int:
    from kjumpd.daemon import fsfreeze, kexec, preflight, quiesce
    from kjumpd.linux import mountinfo

    sr, cfg = _load(args)
    mode = args.mode or cfg.mode
    rep = preflight.run(sr, cfg, mode)
    q = quiesce.plan(sr, cfg, mode)
    mounts = fsfreeze.freezable(mountinfo.parse(sr.read_text("/proc/self/mountinfo", default="")))
    plan: dict[str, Any] = {
        "mode": mode,
        "preflight_ok": rep.ok,
        "quiesce": [vars(w) for w in q.writes],
        "quiesce_notes": q.notes,
        "freeze": [m.mountpoint for m in mounts],
        "freeze_checked_by_r": {m.mountpoint: _how_r_checks(sr, m) for m in mounts},
    }
    if rep.plan.encryption is not None:
        plan["image_encryption"] = rep.plan.encryption.detail
    area = rep.plan.area
    if area is not None:
        plan["jump_area"] = [area.start, area.size]
        ram = rep.plan.memory.ranges if rep.plan.memory is not None else ()
        plan["save_cmdline"] = kexec.save_cmdline(cfg, area, main_ram=ram)
    mem = rep.plan.memory
    if mem is not None:
        plan["memory_ranges"] = [[s, e] for s, e in mem.ranges]
        plan["memory_excluded"] = [vars(x) for x in mem.excluded]
    t = rep.plan.target
    if t is not None:
        plan["target"] = {"path": t.path, "disk": t.disk, "blockmap": t.blockmap}
    if args.json:
        print(json.dumps(plan, indent=1))
        return 0
    print(f"mode: {mode}" + ("" if rep.ok else "   (preflight fails: see kjumpctl check)"))
    print("quiesce (in order; undone in reverse):")
    print("  " + q.describe().replace("\n", "\n  "))
    print("freeze (leaves first): " + (", ".join(plan["freeze"]) or "nothing"))
    for mp, how in plan["freeze_checked_by_r"].items():
        print(f"  {mp}: {how}")
    if "memory_ranges" in plan:
        print("memory to save:")
        for s, e in plan["memory_ranges"]:
            print(f"  [{s:#x}, {e:#x})  {(e - s) >> 20} MiB")
        for x in plan["memory_excluded"]:
            print(f"  excluded [{x['start']:#x}, {x['end']:#x}): {x['reason']}")
    if "save_cmdline" in plan:
        print(f"save kernel command line: {plan['save_cmdline']}")
    if t is not None:
        print(f"target: {t.path} -> {t.disk}, {len(t.blockmap)} extents")
    if "image_encryption" in plan:
        print(f"image: {plan['image_encryption']}")
    return 0


def _how_r_checks(sr: Sysroot, m: Any) -> str:
    """How the restore-first environment finds this frozen filesystem's stamp again."""
    from kjumpd.daemon import blockmap, fsfreeze
    from kjumpd.errors import KjumpError

    try:
        hidden = fsfreeze.hidden_from_restore(sr, [m])
        if hidden:
            return f"R cannot check it ({hidden[0][2]})"
        stacked = blockmap.stacked_map(sr, fsfreeze.device_of(sr, m))
    except KjumpError as e:
        return f"R cannot check it ({e.what})"
    if stacked is None:
        return "R reads its superblock on the disk"
    if stacked.crypt:
        return (
            f"R checks the ciphertext of its superblock on {stacked.disk} "
            f"(below dm-crypt {stacked.crypt}, {len(stacked.extents)} extents)"
        )
    return (
        f"R reads its superblock through its map on {stacked.disk} ({len(stacked.extents)} extents)"
    )


def _confirm(args: argparse.Namespace, question: str) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        print("(not written: pass --yes to write)")
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def save_kernel_hash_advice(sr: Sysroot, cfg: cfgmod.Config) -> tuple[bool, list[str]]:
    """(all recorded and matching, lines for the user). The lines name the exact config keys
    and values preflight compares the installed save kernel and initramfs with."""
    from kjumpd.daemon import config as cfgmod
    from kjumpd.hashing import sha256_file

    lines: list[str] = []
    todo: list[str] = []
    for key, path, want in (
        ("kernel_sha256", cfg.save_kernel, cfg.save_kernel_sha256),
        ("initramfs_sha256", cfg.save_initramfs, cfg.save_initramfs_sha256),
    ):
        p = sr.path(path)
        if not p.is_file():
            lines.append(
                f"save kernel file {path} is not installed "
                "(kjumpctl install --save-kernel BZIMAGE installs it and builds the "
                "initramfs, or set [save_kernel] to where it is)"
            )
            continue
        got = sha256_file(p)
        if got == want:
            lines.append(f"save_kernel.{key} matches {path}")
        else:
            todo.append(f'{key} = "{got}"')
    if todo:
        lines.append(f"set in the [save_kernel] table of {cfgmod.CONFIG_PATH}:")
        lines += [f"  {t}" for t in todo]
    ok = not todo and all(" matches " in line for line in lines)
    return ok, lines


def cmd_setup(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kjumpd.daemon import blockmap, jumparea
    from kjumpd.daemon import config as cfgmod

    sr, cfg = _load(args)
    did = False
    if args.target or args.size:
        path = args.target or cfg.target
        size = args.size if args.size is not None else cfg.target_size
        target, uuid = blockmap.setup(sr, path, size)
        print(
            f"target {target.path}: {target.size >> 20} MiB, UUID {uuid}, on {target.disk} "
            f"at byte {target.superblock_offset} ({len(target.blockmap)} extents)"
        )
        if target.volume is not None:
            from kjumpd.daemon import volumekey

            print(
                f"the target is inside LUKS volume {target.volume.uuid} "
                f"({target.volume_node}): the save kernel needs its volume key"
            )
            print(volumekey.enroll(sr, target, args.luks_key_file))
        if path != cfg.target:
            print(f'set target.path = "{path}" in {cfgmod.CONFIG_PATH}')
        did = True
    if args.jump_area:
        need = jumparea.required_size(sr, cfg)
        size = max(need, cfg.jump_area_size or 0)
        loader, _configured = jumparea.next_boot_value(sr)
        arg, kept = jumparea.boot_arg(jumparea.discover(sr), cfg, size, loader)
        print(
            f"the save kernel needs {need >> 20} MiB: {arg}"
            + (" is kept (reserved on this boot)" if kept else "")
        )
        edits = jumparea.plan_bootloader_edits(sr, arg)
        if not edits:
            print("the boot loader configuration already has it")
        for e in edits:
            print(e.diff(), end="")
        if edits and _confirm(args, "write these changes?"):
            jumparea.apply_edits(sr, edits)
            print("written; run update-grub if you use GRUB, then reboot")
        did = True
    if args.bootloader:
        from kjumpd.bootconfig import QUICK_BOOT_PARAMS
        from kjumpd.daemon import bootentry

        target, uuid = blockmap.current(sr, cfg.target, restamp=False)
        rec = bootentry.install(
            sr,
            args.bootloader,
            kernel=Path(args.restore_kernel),
            initrd=Path(args.restore_initrd),
            cmdline=f"kjump.target={uuid} kjump.offset={target.superblock_offset}"
            f" {QUICK_BOOT_PARAMS}",
            esp=args.esp,
            target=target,
        )
        print(f"installed the {rec.kind} entry ({rec.loader}): {', '.join(rec.files)}")
        print(bootentry.restore_boots_line(rec))
        did = True
    if args.save_kernel:
        ok, lines = save_kernel_hash_advice(sr, cfg)
        print("\n".join(lines))
        return 1 if any(" is not installed " in line for line in lines) else 0
    if not did:
        raise UsageError(
            "setup needs something to do",
            fix="pass --target/--size, --jump-area, --bootloader or --save-kernel",
        )
    ok, lines = save_kernel_hash_advice(sr, cfg)
    if not ok:
        print("\n".join(lines))
    if sr.is_real:
        from kjumpd.cli.daemon_cmds import recheck

        recheck()  # what logind offers follows the change at once
    return 0


def size_arg(text: str) -> int:
    """An argparse type: a size as the configuration writes it ("8G"); else exit 2."""
    from kjumpd.daemon import config as cfgmod

    try:
        return cfgmod.parse_size(text, "--size")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def register(sub: Any) -> None:
    p = sub.add_parser("check", help="check that this machine can hibernate (preflight)")
    p.add_argument("--mode", choices=MODES, default=None)
    p.add_argument("--config", default=None, help="configuration file to use")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("plan", help="show what a hibernation would do, without doing it")
    p.add_argument("--mode", choices=MODES, default=None)
    p.add_argument("--config", default=None, help="configuration file to use")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("setup", help="prepare the target, the jump area and the boot entry")
    p.add_argument("--config", default=None, help="configuration file to use")
    p.add_argument("--target", default=None, help="image file or partition (default: config)")
    p.add_argument("--size", default=None, type=size_arg, help="image file size, e.g. 8G")
    p.add_argument(
        "--luks-key-file",
        default=None,
        metavar="FILE",
        help="a target inside a LUKS volume: an existing key file of the volume, to enroll "
        "kjumpd's own key file with (default: cryptsetup asks for a passphrase)",
    )
    p.add_argument(
        "--jump-area",
        action="store_true",
        help="add crashkernel=SIZE (SIZE@START when [jump_area] start is set) to the boot "
        "loader's kernel command line; a large enough reservation of this boot is kept",
    )
    p.add_argument(
        "--bootloader",
        choices=("grub", "bls", "restore-first"),
        default=None,
        help="install the restore-first boot entry",
    )
    p.add_argument(
        "--restore-kernel",
        default="/usr/lib/kjumpd/restore/vmlinuz",
        help="restore-first kernel to install (with --bootloader)",
    )
    p.add_argument(
        "--restore-initrd",
        default="/usr/lib/kjumpd/restore/initrd.img",
        help="restore-first initramfs to install (with --bootloader)",
    )
    p.add_argument("--esp", default="/boot/efi", help="EFI system partition (bls)")
    p.add_argument(
        "--save-kernel",
        action="store_true",
        help="print the save kernel's and initramfs's sha256 config lines",
    )
    p.add_argument("--yes", action="store_true", help="write without asking")
    p.set_defaults(func=cmd_setup)
