"""The one loader of command groups: each module named has ``register(subparsers)``.
kjumpctl and kjump-agent list their modules; a module that is missing is a broken
installation, reported as the ImportError it is."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import Any


def register(sub: argparse._SubParsersAction[Any], modules: Sequence[str]) -> None:
    for name in modules:
        importlib.import_module(name).register(sub)
