"""``kjump-agent``: save and restore memory images on files, and (``boot``) the save kernel's
roles from kjumpd.agent.kernel_role.

    kjump-agent save --memory FILE --ranges START-END[,START-END...] --target FILE
    kjump-agent restore --target FILE --memory FILE

START and END are byte offsets (hex with 0x, or decimal); END is exclusive. ``save`` creates
the target file when it does not exist (fully allocated, sized for the worst case) or reuses
an existing kjumpd target. ``restore`` writes every saved range back into the memory file at
its offset; bytes outside the ranges are left alone. Exit 0 on success, 1 with a one-line
reason on failure, 2 on a usage error.

Standard library + lz4 only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from kjumpd import subcommands
from kjumpd.errors import KjumpError, TargetError, UsageError
from kjumpd.image.heap import tune_heap
from kjumpd.job import MAX_CHUNK_SIZE

log = logging.getLogger("kjump-agent")

#: modules that add subcommands with register(subparsers) when present
EXTRA_COMMAND_MODULES = ["kjumpd.agent.kernel_role"]


def positive_int(text: str) -> int:
    """An argparse type: a whole number above zero (0 or less is a usage error, exit 2)."""
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return n


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """ "0x1000-0x9f000,1048576-2097152" -> [(start, end)], END exclusive."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = part.partition("-")
        if not sep:
            raise UsageError(
                f"memory range {part!r} is not START-END",
                fix="write ranges as START-END[,START-END...], END exclusive",
            )
        try:
            start, end = _num(a), _num(b)
        except ValueError:
            raise UsageError(
                f"memory range {part!r} has a bad number", fix="use decimal or 0x-prefixed hex"
            ) from None
        if end <= start:
            raise UsageError(
                f"memory range {part!r} is empty",
                fix="END must be greater than START (END is exclusive)",
            )
        out.append((start, end))
    if not out:
        raise UsageError("no memory ranges given", fix="pass --ranges START-END")
    out.sort()
    for (a0, b0), (a1, b1) in zip(out, out[1:]):
        if a1 < b0:
            raise UsageError(
                f"memory ranges {a0:#x}-{b0:#x} and {a1:#x}-{b1:#x} overlap",
                fix="give ranges that do not overlap",
            )
    return out


def _num(s: str) -> int:
    s = s.strip().lower()
    return int(s, 16) if s.startswith("0x") else int(s, 10)


def target_size_for(ranges: list[tuple[int, int]], chunk_size: int) -> int:
    """A target size that holds the worst case (nothing compresses, no zero page)."""
    from kjumpd.image.format import CHUNK_HEADER_SIZE, chunk_count, data_offset_for
    from kjumpd.image.save import normalize_ranges

    ext = normalize_ranges(ranges)
    raw = sum(e.length for e in ext)
    n = chunk_count(ext, chunk_size)
    per_chunk = CHUNK_HEADER_SIZE + (chunk_size // 4096 + 7) // 8
    meta = 64 + 16 * len(ext) + 64 * 1024  # extents + a generous identity
    size = data_offset_for(meta) + raw + n * per_chunk + 1024 * 1024
    return -(-size // (1024 * 1024)) * (1024 * 1024)


class _Console:
    """Progress on stderr, at most every few seconds."""

    def __init__(self, verb: str, enabled: bool) -> None:
        self.verb = verb
        self.enabled = enabled
        self.last = -1.0

    def __call__(self, done: int, total: int, mb_s: float, eta: float) -> None:
        if not self.enabled:
            return
        pct = 100.0 * done / total if total else 100.0
        print(
            f"kjump-agent: {self.verb} {pct:5.1f}% {done >> 20}/{total >> 20} MiB "
            f"{mb_s:.0f} MB/s ETA {eta:.0f}s",
            file=sys.stderr,
        )


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM of its own address space; 0 when unknown).

    Not getrusage(): its ru_maxrss also counts the parent's memory that a fork()ed child
    held before exec().
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _print_stats(enabled: bool, **fields: Any) -> None:
    if enabled:
        fields["peak_rss"] = peak_rss_bytes()
        print(json.dumps(fields, sort_keys=True))


def cmd_save(args: argparse.Namespace) -> int:
    from kjumpd.image import save, store
    from kjumpd.image.device import ImageDevice
    from kjumpd.image.memfile import FileMemorySource

    ranges = parse_ranges(args.ranges)
    chunk = args.chunk_size or save.DEFAULT_CHUNK_SIZE
    if chunk > MAX_CHUNK_SIZE:
        raise UsageError(
            f"--chunk-size {chunk} is larger than 1 MiB ({MAX_CHUNK_SIZE})",
            why="larger chunks push the agent past its 64 MiB memory bound",
            fix=f"pass --chunk-size {MAX_CHUNK_SIZE} or less",
        )
    if chunk % 4096:
        raise UsageError(
            f"--chunk-size {chunk} is not a multiple of 4096",
            why="chunks hold whole pages",
            fix="pass a multiple of 4096, e.g. --chunk-size 1048576",
        )
    with FileMemorySource(args.memory) as source:
        if ranges[-1][1] > source.size:
            raise UsageError(
                f"range end {ranges[-1][1]:#x} is past the end of {args.memory}",
                why=f"the memory file holds {source.size} bytes",
                fix="give ranges inside the memory file",
            )
        if not os.path.exists(args.target):
            size = args.target_size or target_size_for(ranges, chunk)
            store.create_target(args.target, size)
            log.info("created target %s (%d bytes)", args.target, size)
        with ImageDevice(args.target, writable=True, direct=not args.buffered) as dev:
            try:
                store.read_superblock(dev)
            except KjumpError as e:
                raise TargetError(
                    f"{args.target} is not a kjumpd target",
                    why=e.why or e.what,
                    fix="give a new path (it is created) or a target made by `kjumpctl setup`",
                ) from None
            stats = save.save_image(
                source,
                ranges,
                dev,
                identity={"source": args.memory},
                mode=args.mode,
                chunk_size=chunk,
                workers=args.workers,
                compression=args.compression,
                verify=not args.no_verify,
                progress=_Console("saving", args.progress),
                key=_image_key(args.image_key),
            )
    print(
        f"kjump-agent: SAVED {stats.raw_bytes} bytes in {stats.chunk_count} chunks "
        f"({stats.zero_pages} zero pages) as {stats.stored_bytes} bytes in "
        f"{stats.seconds:.2f}s (verify {stats.verify_seconds:.2f}s)",
        file=sys.stderr,
    )
    _print_stats(
        args.stats,
        raw_bytes=stats.raw_bytes,
        stored_bytes=stats.stored_bytes,
        zero_pages=stats.zero_pages,
        chunks=stats.chunk_count,
        seconds=stats.seconds,
        verify_seconds=stats.verify_seconds,
        stages={k: round(v, 3) for k, v in stats.stages.items()},
    )
    return 0


def _image_key(path: str | None) -> bytes | None:
    """The 32-byte image key (64 hex digits) in ``path``, for --image-key."""
    if path is None:
        return None
    try:
        key = bytes.fromhex(open(path, encoding="ascii").read().strip())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read an image key from {path}", why=str(e)) from None
    if len(key) != 32:
        raise UsageError(
            f"{path} holds {len(key)} bytes; an image key is 32",
            fix="write 64 hex digits (e.g. `head -c32 /dev/urandom | xxd -p -c64`)",
        )
    return key


#: the most workers `kjump-agent restore` starts on a memory file by default
MAX_FILE_RESTORE_WORKERS = 8


def restore_file_workers(cpus: int) -> int:
    """Default workers to restore into a memory file: four per CPU, at most 8."""
    return max(1, min(MAX_FILE_RESTORE_WORKERS, 4 * cpus))


def cmd_restore(args: argparse.Namespace) -> int:
    from kjumpd.image import restore, store
    from kjumpd.image.device import ImageDevice
    from kjumpd.image.memfile import FileMemorySink

    key = _image_key(args.image_key)
    with ImageDevice(args.target, writable=False, direct=not args.buffered) as dev:
        if args.verify_first:
            restore.restore_image(dev, None, verify_only=True, workers=args.workers, key=key)
        store.read_superblock(dev)
        restore.check_image(dev, key=key)  # refuse before the memory file is even opened
        with FileMemorySink(args.memory) as sink:
            # writing the memory file is I/O-bound: more workers than CPUs keep more O_DIRECT
            # writes in flight, which shortens the restore. At most 8: chunks in flight are
            # capped by the save's budget anyway, and each worker adds its own buffers to
            # the peak RSS
            workers = args.workers or restore_file_workers(restore.default_workers())
            stats = restore.restore_image(
                dev,
                sink,
                workers=workers,
                progress=_Console("restoring", args.progress),
                key=key,
            )
            sink.flush()
    print(
        f"kjump-agent: restored {stats.raw_bytes} bytes in {stats.chunk_count} chunks in "
        f"{stats.seconds:.2f}s",
        file=sys.stderr,
    )
    _print_stats(
        args.stats,
        raw_bytes=stats.raw_bytes,
        chunks=stats.chunk_count,
        seconds=stats.seconds,
        stages={k: round(v, 3) for k, v in stats.stages.items()},
    )
    return 0


def image_key(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--image-key", metavar="FILE", default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kjump-agent",
        description="kjumpd's agent: save/restore memory images on files; `boot` is the save "
        "kernel's userspace.",
        epilog="exit codes: 0 ok, 1 failed, 2 usage",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--workers",
            type=positive_int,
            default=None,
            help="worker threads (default: one per CPU to save, four per CPU "
            "and at most 8 to restore)",
        )
        p.add_argument("--progress", action="store_true", help="print progress to stderr")
        p.add_argument("--buffered", action="store_true", help="do not use O_DIRECT on the target")
        p.add_argument(
            "--stats",
            action="store_true",
            help="print a JSON line of figures (bytes, seconds, peak RSS) on stdout",
        )

    p = sub.add_parser("save", help="save memory ranges of a file into a target file")
    p.add_argument("--memory", required=True, metavar="FILE", help="memory image to read")
    p.add_argument(
        "--ranges",
        required=True,
        metavar="START-END[,START-END...]",
        help="byte ranges to save (END exclusive; hex with 0x or decimal)",
    )
    p.add_argument(
        "--target",
        required=True,
        metavar="FILE",
        help="target file (created fully allocated when missing)",
    )
    p.add_argument(
        "--target-size",
        type=positive_int,
        default=None,
        metavar="BYTES",
        help="size of a new target (default: the worst case for the ranges)",
    )
    p.add_argument("--mode", default="test", help="mode recorded in the header (default test)")
    p.add_argument("--compression", default="lz4", choices=["lz4", "none"])
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=None,
        metavar="BYTES",
        help="chunk size (multiple of 4096, at most 1 MiB; default 1 MiB)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the read-back verify pass")
    image_key(p, "encrypt the image with the image key in FILE (64 hex digits)")
    common(p)
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("restore", help="write a saved image back into a memory file")
    p.add_argument("--target", required=True, metavar="FILE", help="target file with the image")
    p.add_argument(
        "--memory",
        required=True,
        metavar="FILE",
        help="memory file to write (created when missing; other bytes kept)",
    )
    p.add_argument(
        "--verify-first", action="store_true", help="check the whole image before writing anything"
    )
    image_key(p, "the image key of an encrypted image, in FILE (64 hex digits)")
    common(p)
    p.set_defaults(func=cmd_restore)

    subcommands.register(sub, EXTRA_COMMAND_MODULES)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    tune_heap()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="kjump-agent: %(name)s: %(message)s",
    )
    func: Any = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args))
    except UsageError as err:
        return subcommands.usage_error(parser, "kjump-agent", err)
    except KjumpError as err:
        print(f"kjump-agent: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kjump-agent: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug: one line for the user, details with -v
        log.debug("internal error", exc_info=True)
        print(
            f"kjump-agent: internal error: {type(err).__name__}: {err} "
            "(run with -v for details and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
