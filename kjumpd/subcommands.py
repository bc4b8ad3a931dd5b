"""The one loader of command groups: each module named has ``register(subparsers)``.
kjumpctl and kjump-agent list their modules; a module that is missing is a broken
installation, reported as the ImportError it is."""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Sequence
from typing import Any

from kjumpd.errors import UsageError


def directory(text: str) -> str:
    """An argparse type: an existing directory (anything else is a usage error, exit 2)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def usage_error(parser: argparse.ArgumentParser, prog: str, err: UsageError) -> int:
    """Report a usage error found after parsing as argparse reports its own: the usage line,
    then the error on stderr; exit code 2."""
    import sys

    parser.print_usage(sys.stderr)
    print(f"{prog}: error: {err.message}", file=sys.stderr)
    return 2


def register(sub: argparse._SubParsersAction[Any], modules: Sequence[str]) -> None:
    for name in modules:
        importlib.import_module(name).register(sub)
