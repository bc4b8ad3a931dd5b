"""kjumpctl commands on an image target (local, no daemon needed):

  image info FILE [--json]        superblock, header (state, identities, stats), extent table
  image verify FILE [--json]      check every structure and every chunk (decodes all of them;
                                  an encrypted image asks for the image key's passphrase)
  image invalidate FILE           mark the image INVALID so nothing restores it

FILE is a target file, or a disk/partition with ``--offset BYTES`` (where ``kjumpctl setup``
put the superblock). ``verify`` exits 0 only for a restorable image (SAVED or RESTORING)
whose every chunk checks out; a bad image exits 7 with what is wrong and where.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kjumpd.cli import utc_text
from kjumpd.errors import ImageError, ImageFormatError, KjumpError, TargetError


def offset_arg(text: str) -> int:
    """An argparse type: a byte offset (decimal or 0x hex, 0 or more); else exit 2."""
    try:
        n = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return n


def register(sub: Any) -> None:
    p = sub.add_parser("image", help="inspect, verify or invalidate an image target")
    isub = p.add_subparsers(dest="image_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    def target_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("file", metavar="FILE", help="target file, disk or partition")
        q.add_argument(
            "--offset",
            type=offset_arg,
            default=0,
            metavar="BYTES",
            help="device offset of the target superblock (default 0)",
        )

    q = isub.add_parser("info", help="print the superblock, header and extent table")
    target_args(q)
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_info)

    q = isub.add_parser("verify", help="check every structure and chunk of the image")
    target_args(q)
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument(
        "--key",
        default=None,
        metavar="FILE",
        help="the image key, for an encrypted image (default: [encryption] key in kjumpd.toml)",
    )
    q.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="read the key's passphrase from the first line of FILE instead of asking",
    )
    q.set_defaults(func=cmd_verify)

    q = isub.add_parser("invalidate", help="mark the image INVALID (it will not be restored)")
    target_args(q)
    q.add_argument("--reason", default="invalidated by kjumpctl", help="reason recorded")
    q.set_defaults(func=cmd_invalidate)


def _when(t: float) -> str:
    if not t:
        return "-"
    try:
        return utc_text(t)
    except (OverflowError, ValueError, OSError):  # NaN, infinite or past year 9999
        return f"{t!r} (not a time)"


def info(path: str, offset: int = 0) -> dict[str, Any]:
    """Everything readable about the target; metadata errors are reported, not raised."""
    from kjumpd.image import store
    from kjumpd.image.format import ImageState

    dev, sb = _open(path, writable=False, offset=offset)
    with dev:
        out: dict[str, Any] = {
            "target": {
                "path": path,
                "uuid": sb.uuid_str,
                "size": sb.size,
                "block_size": sb.block_size,
                "version": sb.version,
                "blockmap": [[e.logical, e.device_offset, e.length] for e in sb.blockmap],
            },
        }
        header = store.read_header(dev)
        out["header"] = header.to_dict()
        if header.state not in (ImageState.EMPTY, ImageState.WRITING) and header.metadata_length:
            try:
                meta = store.read_metadata(dev, header)
                out["extents"] = [[e.start, e.length] for e in meta.extents]
                out["identity"] = meta.identity
            except ImageError as e:
                out["metadata_error"] = e.message
    return out


def _open(path: str, *, writable: bool, offset: int) -> Any:
    """The image's target; a file that is not a whole target (cut short, not one at all)
    is an invalid image for these commands (exit 7), named as it is."""
    from kjumpd.image import store

    try:
        return store.open_target(path, writable=writable, offset=offset)
    except TargetError as e:
        raise ImageFormatError(e.what, why=e.why, fix=e.fix, **e.context) from None


def cmd_info(args: argparse.Namespace) -> int:
    d = info(args.file, args.offset)
    if args.json:
        print(json.dumps(d, indent=2, sort_keys=True))
        return 0
    t, h = d["target"], d["header"]
    lines = [
        f"target      {t['path']}  uuid {t['uuid']}  {t['size']} bytes, "
        f"{len(t['blockmap'])} extent(s), format v{t['version']}",
        f"state       {h['state_text']}  (header sequence {h['seq']})",
        f"created     {_when(h['created'])}   saved {_when(h['saved'])}   "
        f"updated {_when(h['updated'])}",
    ]
    if h["state"] not in ("EMPTY",):
        raw, stored = h["raw_bytes"], h["stored_bytes"]
        ratio = f"{stored / raw:.1%}" if raw else "-"
        lines += [
            f"mode        {h['mode'] or '-'}   compression {h['compression'] or '-'}   "
            f"chunk size {h['chunk_size']}",
            f"memory      {raw} bytes in {h['chunk_count']} chunks, {h['zero_pages']} zero "
            f"pages, stored {stored} bytes ({ratio})",
            f"main kernel {h['main_kernel'] or '-'}",
            f"save kernel {h['save_kernel_hash'] or '-'}",
            f"jump area   {h['jump_area_start']:#x} +{h['jump_area_size']:#x}   jump-back entry "
            f"{h['jump_back_entry']:#x}",
        ]
        seal = d.get("identity", {}).get("seal") if isinstance(d.get("identity"), dict) else None
        key_id = seal.get("key_id") if isinstance(seal, dict) else None
        lines.append(
            f"encryption  AES-256-GCM, image key sealed to key {key_id or '?'}"
            if h["auth"]
            else "encryption  none (plaintext)"
        )
    for start, length in d.get("extents", []):
        lines.append(f"extent      {start:#014x}-{start + length:#014x}  ({length} bytes)")
    if "metadata_error" in d:
        lines.append(f"metadata    UNREADABLE: {d['metadata_error']}")
    print("\n".join(lines))
    return 0


def _image_key(dev: Any, args: argparse.Namespace) -> bytes | None:
    """The image key of an encrypted image (None for a plaintext one): the key file opened
    with its passphrase, the image's seal opened with it."""
    from kjumpd.cli.key_cmds import read_passphrase
    from kjumpd.image import seal, store

    header = store.read_header(dev)
    if not header.encrypted:
        return None
    path = args.key
    if path is None:
        from pathlib import Path

        from kjumpd.daemon import config as cfgmod
        from kjumpd.sysroot import Sysroot

        sr = Sysroot(Path(args.sysroot))
        path = str(sr.path(cfgmod.load(sr).image_key))
    kf = seal.KeyFile.load(path)
    sealed = store.read_metadata(dev, header).identity.get("seal")
    return seal.unseal_key(kf.unlock(read_passphrase(args.passphrase_file)), kf.public, sealed)


def cmd_verify(args: argparse.Namespace) -> int:
    from kjumpd.image import restore

    dev, _sb = _open(args.file, writable=False, offset=args.offset)
    with dev:
        stats = restore.restore_image(dev, None, verify_only=True, key=_image_key(dev, args))
    h = stats.header
    assert h is not None
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "state": h.state_text,
                    "raw_bytes": stats.raw_bytes,
                    "chunks": stats.chunk_count,
                    "seconds": round(stats.seconds, 3),
                }
            )
        )
    else:
        print(
            f"image OK: {h.state_text}, {stats.raw_bytes} bytes in {stats.chunk_count} chunks "
            f"checked in {stats.seconds:.2f}s"
        )
    return 0


def cmd_invalidate(args: argparse.Namespace) -> int:
    from kjumpd.image import store
    from kjumpd.image.format import ImageState

    dev, _sb = _open(args.file, writable=True, offset=args.offset)
    with dev:
        before = store.read_header(dev)
        h = store.set_state(dev, ImageState.INVALID, reason=args.reason)
    print(f"image {before.state_text} -> {h.state_text}", file=sys.stderr)
    return 0


__all__ = ["register", "info", "KjumpError"]
