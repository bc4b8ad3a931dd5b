"""/proc/PID/mountinfo, the kernel's table of mounts (proc(5)).

One line per mount: ``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
SUPER_OPTIONS``. Paths escape blanks, tabs, newlines and backslashes as ``\\ooo`` (octal);
``ROOT`` is where the mount starts inside its filesystem (a bind mount's subdirectory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    mount_id: int
    devno: str  # "MAJ:MIN"
    mountpoint: str  # system path
    fstype: str
    source: str
    options: str  # the mount's options, then the superblock's
    root: str = "/"

    @property
    def depth(self) -> int:
        return 0 if self.mountpoint == "/" else self.mountpoint.rstrip("/").count("/")


def unescape(s: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), s)


def parse(text: str) -> list[Mount]:
    """Every well-formed line, in order (a malformed one is skipped)."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 6 or len(rf) < 2 or not (lf[0].isascii() and lf[0].isdigit()):
            continue
        options = lf[5] + ("," + rf[2] if len(rf) > 2 else "")
        mounts.append(
            Mount(
                int(lf[0]), lf[2], unescape(lf[4]), rf[0], unescape(rf[1]), options, unescape(lf[3])
            )
        )
    return mounts
