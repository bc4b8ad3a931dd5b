"""kjumpctl commands for the image key (local, as root):

  image-key create [--passphrase-file FILE] [--force]   a new key pair; images are encrypted
                                                        once `kjumpctl install` ran
  image-key show [--json]                               the key id and where it is used

The private half is protected by the passphrase (scrypt); the daemon uses only the public
half, so hibernation stays unattended. The restore-first environment asks for the
passphrase before it restores an encrypted image.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from kjumpd.errors import ImageKeyError, UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("image-key", help="create or show the key that encrypts images")
    ksub = p.add_subparsers(dest="key_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    q = ksub.add_parser(
        "create", help="create the image key (asks for a passphrase, used at each restore)"
    )
    q.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="read the passphrase from the first line of FILE instead of asking",
    )
    q.add_argument("--force", action="store_true", help="replace an existing key")
    q.set_defaults(func=cmd_create)
    q = ksub.add_parser("show", help="print the image key's id and where it is used")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_show)


def read_passphrase(path: str | None, prompt: str = "passphrase of the image key: ") -> str:
    """The first line of ``path``, or what is typed at the terminal (not echoed)."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(
                f"cannot read the passphrase from {path}",
                why=str(e),
                fix="give a readable UTF-8 file",
            ) from None
    if not sys.stdin.isatty():
        raise UsageError(
            "no terminal to ask for the passphrase",
            fix="run it in a terminal, or pass --passphrase-file FILE",
        )
    return getpass.getpass(prompt)


def _passphrase(args: argparse.Namespace) -> str:
    if args.passphrase_file or not sys.stdin.isatty():
        return read_passphrase(args.passphrase_file)
    first = getpass.getpass("passphrase for hibernation images (asked at each restore): ")
    if getpass.getpass("the same passphrase again: ") != first:
        raise UsageError("the two passphrases differ", fix="run it again")
    return first


def cmd_create(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kjumpd.daemon import config as cfgmod
    from kjumpd.image import seal
    from kjumpd.sysroot import Sysroot

    sr = Sysroot(Path(args.sysroot))
    cfg = cfgmod.load(sr)
    path = sr.path(cfg.image_key)
    if path.exists() and not args.force:
        raise ImageKeyError(
            f"{cfg.image_key} exists",
            why="a new key cannot open the images sealed to the old one",
            fix="pass --force to replace it (an image saved with the old key is then "
            "restored only if you keep a copy of the old file)",
        )
    kf = seal.KeyFile.create(_passphrase(args))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (kf.to_json() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    print(f"created {cfg.image_key} (key id {kf.key_id})")
    if cfg.encryption == "off":
        print('[encryption] mode = "off" in kjumpd.toml: images stay in plaintext')
    else:
        print(
            "next: run `kjumpctl install` (it adds the cryptography package to the save "
            "kernel's initramfs and the key to the restore-first entry); every image is "
            "encrypted from then on"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kjumpd.daemon import bootentry
    from kjumpd.daemon import config as cfgmod
    from kjumpd.image import seal
    from kjumpd.sysroot import Sysroot

    sr = Sysroot(Path(args.sysroot))
    cfg = cfgmod.load(sr)
    kf = seal.KeyFile.load(sr.path(cfg.image_key))
    rec = bootentry.read_record(sr)
    in_r = rec is not None and rec.image_key_id == kf.key_id
    d = {
        "path": cfg.image_key,
        "key_id": kf.key_id,
        "mode": cfg.encryption,
        "scrypt": {"n": kf.n, "r": kf.r, "p": kf.p},
        "restore_entry_has_it": in_r,
    }
    if args.json:
        print(json.dumps(d))
        return 0
    print(f"image key   {cfg.image_key} (key id {kf.key_id}, scrypt n={kf.n} r={kf.r} p={kf.p})")
    print(f"encryption  {cfg.encryption}")
    print(
        "restore-first entry "
        + ("holds this key" if in_r else "does not hold this key (run `kjumpctl install`)")
    )
    return 0
