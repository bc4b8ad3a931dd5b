"""kjumpctl: the command-line front end.

Each command group lives in its own module under kjumpd.cli and exposes
``register(subparsers) -> None``; each subcommand sets ``func(args) -> int`` with
``parser.set_defaults(func=...)``. Errors are KjumpError: printed as one line (or JSON with
--json) and mapped to an exit code; no traceback reaches a user.

Exit codes: 0 ok; 1 the operation failed (KjumpError); 2 usage error; 3 not supported /
preflight failed; 4 the daemon is not running; 5 busy; 6 not authorized; 7 image invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

from kjumpd import subcommands
from kjumpd.errors import (
    BusyError,
    DaemonNotRunningError,
    ImageError,
    JumpAreaError,
    KjumpError,
    NotAuthorizedError,
    UnsupportedError,
    UsageError,
)

#: modules that contribute commands, in --help order
COMMAND_MODULES = [
    "kjumpd.cli.daemon_cmds",  # hibernate, suspend-to-both, checkpoint, status, cancel
    "kjumpd.cli.check_cmds",  # check, plan, setup
    "kjumpd.cli.image_cmds",  # image info/verify/invalidate
    "kjumpd.cli.key_cmds",  # image-key create/show
    "kjumpd.cli.install_cmds",  # install, uninstall
]

EXIT_CODES: list[tuple[type[KjumpError], int]] = [
    (UsageError, 2),
    (DaemonNotRunningError, 4),
    (BusyError, 5),
    (NotAuthorizedError, 6),
    (ImageError, 7),
    (UnsupportedError, 3),
    (JumpAreaError, 3),
    (KjumpError, 1),
]


def utc_text(t: float) -> str:
    """A time stamp (seconds since the epoch) as kjumpctl prints it; OverflowError,
    ValueError or OSError for one that is no time (NaN, infinite, past year 9999)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def exit_code_for(err: KjumpError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(err, cls):
            return code
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kjumpctl",
        description="Control kjumpd: hibernation for Linux built on kexec jump.",
        epilog="exit codes: 0 ok, 1 failed, 2 usage, 3 not supported, 4 daemon not running, "
        "5 busy, 6 not authorized, 7 image invalid",
    )
    parser.add_argument(
        "--sysroot",
        default="/",
        type=subcommands.directory,
        help="system root for local commands (tests)",
    )
    parser.add_argument(
        "--bus", default=None, help="D-Bus address of kjumpd (default: the system bus)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subcommands.register(sub, COMMAND_MODULES)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except KjumpError as err:
        if getattr(args, "json", False):
            print(json.dumps(err.to_dict()))
        elif isinstance(err, UsageError):
            return subcommands.usage_error(parser, "kjumpctl", err)
        else:
            print(f"kjumpctl: {err.message}", file=sys.stderr)
        return exit_code_for(err)
    except KeyboardInterrupt:
        print("kjumpctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
