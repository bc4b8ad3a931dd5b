"""The files kjumpd ships beside its code, found in a checkout and in an installed wheel alike.

Three folders: ``bootloader`` (R's boot entry templates and initramfs builder), ``savekernel``
(B's kernel config fragment, kernel and initramfs builders) and ``contrib`` (systemd unit,
D-Bus policy and activation, polkit actions, kernel upgrade hooks, example config).

In a checkout they are folders beside kjumpd/. The wheel (pyproject.toml) installs
bootloader and savekernel as the packages they are, beside kjumpd, and contrib as
kjumpd/contrib. A distribution package may put them under /usr/share/kjumpd/FOLDER instead;
the environment variable KJUMPD_FOLDER_DIR (e.g. KJUMPD_BOOTLOADER_DIR) names another place.
"""

from __future__ import annotations

import os
from pathlib import Path

from kjumpd.errors import InstallError

FOLDERS = ("bootloader", "savekernel", "contrib")
PACKAGE = Path(__file__).resolve().parent
SHARE = Path("/usr/share/kjumpd")


def candidates(folder: str) -> list[Path]:
    """Where ``folder`` may be, in the order they are tried."""
    if folder not in FOLDERS:
        raise InstallError(f"internal: unknown resource folder {folder!r}")
    out = []
    env = os.environ.get(f"KJUMPD_{folder.upper()}_DIR")
    if env:
        out.append(Path(env))
    if folder == "contrib":
        out.append(PACKAGE / "contrib")  # the wheel
    out.append(PACKAGE.parent / folder)  # the checkout; bootloader/savekernel in the wheel
    out.append(SHARE / folder)
    return out


def find(folder: str, name: str) -> Path:
    """The shipped file ``folder/name`` (InstallError naming where it was looked for)."""
    places = candidates(folder)
    for d in places:
        p = d / name
        if p.is_file():
            return p
    raise InstallError(
        f"{folder}/{name} is missing",
        why="looked in " + ", ".join(str(d) for d in places),
        fix=f"reinstall kjumpd, or set KJUMPD_{folder.upper()}_DIR to the folder that has it",
    )


def read_text(folder: str, name: str) -> str:
    return find(folder, name).read_text()
