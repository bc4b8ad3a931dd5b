"""/etc/crypttab (crypttab(5)), Debian's cryptsetup-initramfs key file pattern and dracut's
install_items: which key file unlocks a LUKS volume at boot without a passphrase, as the
normal initramfs does it.

crypttab: one volume a line, ``name device [keyfile [options]]``, whitespace separated, ``#``
comments; ``device`` is a path or ``UUID=``/``PARTUUID=``/``LABEL=``/``PARTLABEL=``/``ID=``
(udev's /dev/disk/by-* links name them); ``keyfile`` is a path or ``none``/``-`` (asked for).
Debian copies a key file into the initramfs only when it matches ``KEYFILE_PATTERN`` (a shell
glob) in /etc/cryptsetup-initramfs/conf-hook; dracut (Fedora) only when a configuration file
lists it in ``install_items`` (``install_items+=" /etc/keys/root.key "``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

CRYPTTAB = "/etc/crypttab"
CONF_HOOK = "/etc/cryptsetup-initramfs/conf-hook"
DRACUT_CONF = "/etc/dracut.conf"
#: dracut reads *.conf of both, a name in /etc hiding the same name in /usr/lib
DRACUT_CONF_DIRS = ("/usr/lib/dracut/dracut.conf.d", "/etc/dracut.conf.d")
#: crypttab's NAME=value devices and the udev link directory that resolves each
BY_NAME = {
    "UUID": "by-uuid",
    "PARTUUID": "by-partuuid",
    "LABEL": "by-label",
    "PARTLABEL": "by-partlabel",
    "ID": "by-id",
}


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


def device_path(device: str) -> str | None:
    """The /dev path a crypttab device names: a path as it is, NAME=value through udev's
    /dev/disk/by-* link; None for what names no device."""
    if device.startswith("/"):
        return device
    name, eq, value = device.partition("=")
    value = value.strip("\"'")
    if not eq or name.upper() not in BY_NAME or not value or "/" in value:
        return None
    return f"/dev/disk/{BY_NAME[name.upper()]}/{value}"


def dracut_install_items(confs: list[str]) -> frozenset[str]:
    """The files dracut's configuration (``confs``: file contents in the order dracut reads
    them) puts into every initramfs: ``install_items`` and ``install_optional_items``, each
    ``=`` replacing and ``+=`` adding to what came before."""
    items: dict[str, list[str]] = {"install_items": [], "install_optional_items": []}
    for text in confs:
        for line in text.splitlines():
            m = re.match(
                r"""^\s*(install_items|install_optional_items)(\+?)=\s*(["']?)(.*?)\3\s*(#.*)?$""",
                line,
            )
            if m is None:
                continue
            words = m.group(4).split()
            items[m.group(1)] = items[m.group(1)] + words if m.group(2) else words
    return frozenset(items["install_items"] + items["install_optional_items"])


def keyfile_pattern(conf_hook: str) -> str | None:
    """KEYFILE_PATTERN from a conf-hook (its last assignment, quotes removed), or None."""
    found = None
    for line in conf_hook.splitlines():
        m = re.match(r"""^\s*KEYFILE_PATTERN=(["']?)(.*)\1\s*$""", line)
        if m:
            found = m.group(2) or None
    return found


def initramfs_key_file(
    entry: Entry, pattern: str | None, dracut_items: frozenset[str] = frozenset()
) -> str | None:
    """The key file the normal initramfs holds for this volume: a key file that is a plain
    path (not a device such as /dev/urandom, not run through a keyscript) and matches
    Debian's pattern or is one of dracut's install items."""
    if not entry.keyfile or not entry.keyfile.startswith("/"):
        return None
    if entry.keyfile.startswith(("/dev/", "/proc/", "/sys/")):
        return None
    if any(o.startswith("keyscript=") for o in entry.options):
        return None
    if entry.keyfile in dracut_items:
        return entry.keyfile
    return entry.keyfile if pattern and fnmatch.fnmatch(entry.keyfile, pattern) else None
