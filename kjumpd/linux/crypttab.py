"""/etc/crypttab (crypttab(5)) and Debian's cryptsetup-initramfs key file pattern: which key
file unlocks a LUKS volume at boot without a passphrase, as the normal initramfs does it.

crypttab: one volume a line, ``name device [keyfile [options]]``, whitespace separated, ``#``
comments; ``device`` is a path or ``UUID=``/``PARTUUID=``/``LABEL=``...; ``keyfile`` is a path
or ``none``/``-`` (asked for). Debian copies a key file into the initramfs only when it matches
``KEYFILE_PATTERN`` (a shell glob) in /etc/cryptsetup-initramfs/conf-hook.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

CRYPTTAB = "/etc/crypttab"
CONF_HOOK = "/etc/cryptsetup-initramfs/conf-hook"


@dataclass(frozen=True)
class Entry:
    name: str
    device: str
    keyfile: str  # "" for none
    options: tuple[str, ...] = ()


def parse(text: str) -> list[Entry]:
    """The volumes of a crypttab; malformed lines are left out."""
    out = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2:
            continue
        key = words[2] if len(words) > 2 and words[2] not in ("none", "-") else ""
        opts = tuple(o for o in words[3].split(",") if o) if len(words) > 3 else ()
        out.append(Entry(words[0], words[1], key, opts))
    return out


def keyfile_pattern(conf_hook: str) -> str | None:
    """KEYFILE_PATTERN from a conf-hook (its last assignment, quotes removed), or None."""
    found = None
    for line in conf_hook.splitlines():
        m = re.match(r"""^\s*KEYFILE_PATTERN=(["']?)(.*)\1\s*$""", line)
        if m:
            found = m.group(2) or None
    return found


def initramfs_key_file(entry: Entry, pattern: str | None) -> str | None:
    """The key file the normal initramfs holds for this volume: a key file that is a plain
    path (not a device such as /dev/urandom, not run through a keyscript) and matches the
    pattern."""
    if not entry.keyfile or not pattern or not entry.keyfile.startswith("/"):
        return None
    if entry.keyfile.startswith(("/dev/", "/proc/", "/sys/")):
        return None
    if any(o.startswith("keyscript=") for o in entry.options):
        return None
    return entry.keyfile if fnmatch.fnmatch(entry.keyfile, pattern) else None
