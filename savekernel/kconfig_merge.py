"""Merge a kernel configuration with kjumpd's fragment, as the kernel's
scripts/kconfig/merge_config.sh does (without its final make: run ``make olddefconfig``).

merge_config.sh's rule: for each option the fragment sets (``CONFIG_X=value`` or
``# CONFIG_X is not set``), the base's line for that option, in either form, is taken out
and the fragment's line is appended at the end; the rest of the base stays as it is, in its
order. An option the fragment redefines is reported ("Value of CONFIG_X is redefined by
fragment"), one equal in both is not. kjumpd's fragments write ``NAME=value`` without the
CONFIG_ prefix (savekernel/build-kernel.sh's form); "n" becomes ``# CONFIG_NAME is not set``.

    savekernel/kjumpd-kernel-config /boot/config-$(uname -r) > .config   # report on stderr
    python -m savekernel.kconfig_merge --fragment-only                     # CONFIG_ form

Only the standard library: it runs from a kernel source tree without kjumpd installed.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
JUMP_FRAGMENT = HERE / "jump.fragment"

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def option_of(line: str) -> tuple[str, str] | None:
    """(CONFIG_NAME, value) of a .config line; value "n" for "# CONFIG_NAME is not set"."""
    line = line.strip()
    m = _SET.match(line)
    if m:
        return m.group(1), m.group(2)
    m = _UNSET.match(line)
    if m:
        return m.group(1), "n"
    return None


def config_line(name: str, value: str) -> str:
    return f"# {name} is not set" if value == "n" else f"{name}={value}"


def parse_fragment(text: str) -> list[tuple[str, str]]:
    """(CONFIG_NAME, value) in order; accepts kjumpd's ``NAME=value`` lines (comments after
    #) and .config lines alike."""
    out = []
    for raw in text.splitlines():
        opt = option_of(raw)
        if opt is None:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, value = line.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z0-9_]+", name.strip()):
                raise ValueError(f"fragment line {raw!r} is not NAME=value")
            name = name.strip()
            opt = (name if name.startswith("CONFIG_") else f"CONFIG_{name}", value.strip())
        out.append(opt)
    return out


@dataclass(frozen=True)
class Merged:
    text: str
    redefined: list[tuple[str, str, str]]  # (name, base value, fragment value)
    added: list[tuple[str, str]]  # options the base did not mention


def merge(base: str, fragment: Sequence[tuple[str, str]]) -> Merged:
    frag = dict(fragment)  # a later line in the fragment wins, as in merge_config.sh
    before: dict[str, str] = {}
    kept = []
    for line in base.splitlines():
        opt = option_of(line)
        if opt is not None and opt[0] in frag:
            before[opt[0]] = opt[1]
            continue
        kept.append(line)
    redefined = [(n, before[n], v) for n, v in frag.items() if n in before and before[n] != v]
    added = [(n, v) for n, v in frag.items() if n not in before]
    lines = kept + [config_line(n, v) for n, v in frag.items()]
    return Merged("\n".join(lines) + "\n", redefined, added)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kjumpd-kernel-config",
        description="Print BASE (a kernel .config, e.g. /boot/config-$(uname -r)) merged with "
        "kjumpd's fragment, as scripts/kconfig/merge_config.sh merges; then run "
        "`make olddefconfig` and build (make bindeb-pkg / make binrpm-pkg).",
    )
    p.add_argument("base", nargs="?", type=Path, help="the configuration to start from")
    p.add_argument("--fragment", type=Path, default=JUMP_FRAGMENT, help="default: %(default)s")
    p.add_argument(
        "--fragment-only", action="store_true", help="print the fragment as .config lines"
    )
    args = p.parse_args(argv)
    try:
        fragment = parse_fragment(args.fragment.read_text())
        if args.fragment_only:
            print("\n".join(config_line(n, v) for n, v in fragment))
            return 0
        if args.base is None:
            p.error("give the configuration to start from (or --fragment-only)")
        merged = merge(args.base.read_text(), fragment)
    except (OSError, ValueError) as e:
        print(f"kjumpd-kernel-config: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(merged.text)
    for name, old, new in merged.redefined:
        print(
            f"Value of {name} is redefined by fragment: {config_line(name, old)} -> "
            f"{config_line(name, new)}",
            file=sys.stderr,
        )
    for name, new in merged.added:
        print(f"{config_line(name, new)} added", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
