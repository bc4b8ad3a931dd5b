"""The running kernel's build configuration, where a distribution leaves it.

``/proc/config.gz`` (CONFIG_IKCONFIG_PROC) first, else ``/boot/config-<release>`` (what
Debian's, Ubuntu's and Fedora's kernel packages install). Lines are ``CONFIG_NAME=value``;
``# CONFIG_NAME is not set`` and a missing line both mean "n".
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field

from kjumpd.sysroot import Sysroot


@dataclass(frozen=True)
class KernelConfig:
    source: str  # where it was read
    values: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        """The value of CONFIG_``name`` (without the prefix), None when not set."""
        return self.values.get(name.removeprefix("CONFIG_"))

    def enabled(self, name: str) -> bool:
        return self.get(name) in ("y", "m")


def parse(text: str, source: str) -> KernelConfig:
    values = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, _, v = line.partition("=")
            values[k.removeprefix("CONFIG_")] = v.strip().strip('"')
    return KernelConfig(source, values)


def read(sysroot: Sysroot) -> KernelConfig | None:
    """This kernel's configuration, or None when neither place has it."""
    try:
        text = gzip.decompress(sysroot.path("/proc/config.gz").read_bytes()).decode(
            errors="replace"
        )
        return parse(text, "/proc/config.gz")
    except (OSError, EOFError, gzip.BadGzipFile):
        pass
    release = sysroot.read_text("/proc/sys/kernel/osrelease", default="").strip()
    if release:
        text = sysroot.read_text(f"/boot/config-{release}", default="")
        if text:
            return parse(text, f"/boot/config-{release}")
    return None
