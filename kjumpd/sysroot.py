"""The one place that turns "/sys/...", "/proc/...", "/dev/..." into a real path.

Everything that touches the system takes a :class:`Sysroot`; tests build a fake tree and
pass its directory as the root, the daemon passes "/" (or ``--sysroot DIR``).

A path never leaves the root by its spelling: a ``..`` that would climb above "/" is refused
(SysrootError), checked on the text before anything is opened, for a fake root and "/" alike.

Symlinks are the operating system's business, not the mapping's: :meth:`Sysroot.path` does not
resolve them, so a link is followed as the kernel follows it. In a fake root, a relative link
(``sys/class/block/sda -> ../../devices/...``) stays inside the tree, while an absolute link
points at the host: that is how tests splice a real kernel object (a loop device, a cgroup
directory, a /proc entry) into a fake tree, so it is allowed and is the test's choice. Code
that turns a link it read into a system path maps that path through the sysroot again (and so
through the ``..`` check). For the real root "/" nothing of this changes anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kjumpd.errors import SysrootError, shown


@dataclass(frozen=True)
class Sysroot:
    root: Path = Path("/")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if not self.root.is_dir():
            raise SysrootError(
                f"sysroot {self.root} is not a directory",
                fix="pass --sysroot with an existing directory",
            )

    @property
    def is_real(self) -> bool:
        return self.root == Path("/")

    def path(self, p: str | os.PathLike[str]) -> Path:
        """Map an absolute system path into the root."""
        s = os.fspath(p)
        if not s.startswith("/"):
            raise SysrootError(f"internal: path {shown(s)} is not absolute")
        depth = 0
        for part in s.split("/"):
            if part == "..":
                depth -= 1
                if depth < 0:
                    raise SysrootError(
                        f"path {shown(s, 200)} leaves the system root",
                        why=f"its '..' climbs above / (root {self.root})",
                        fix="name the file without '..' above the root; if it came from a "
                        "configuration value or a link, correct that",
                        path=shown(s, 200),
                    )
            elif part not in ("", "."):
                depth += 1
        return self.root / s.lstrip("/") if not self.is_real else Path(s)

    def unmap(self, p: str | os.PathLike[str]) -> str:
        """The system path ("/sys/...") of a real path under the root (one outside it, such as
        where an absolute link in a fake tree leads, is a SysrootError)."""
        try:
            rel = Path(p).relative_to(self.root)
        except ValueError:
            raise SysrootError(
                f"{shown(os.fspath(p), 200)} is outside the system root {self.root}",
                why="a link in the tree leads out of it",
                fix="make the link relative, inside the tree",
            ) from None
        return "/" + str(rel) if str(rel) != "." else "/"

    def exists(self, p: str) -> bool:
        return self.path(p).exists()

    def read_text(self, p: str, default: str | None = None) -> str:
        """The file's text; bytes that are not UTF-8 (a mount point named in Latin-1 in
        /proc/self/mountinfo) decode as surrogates, so ``os.fsencode`` gives them back."""
        try:
            return self.path(p).read_text(errors="surrogateescape")
        except FileNotFoundError:
            if default is not None:
                return default
            raise SysrootError(
                f"{p} is missing", why="the kernel does not provide it", path=p
            ) from None
        except OSError as e:
            if default is not None:
                return default
            raise SysrootError(f"cannot read {p}", why=e.strerror or str(e), path=p) from e

    def write_text(self, p: str, value: str) -> None:
        """Write a sysfs/procfs attribute (no truncation semantics beyond the kernel's)."""
        try:
            with open(self.path(p), "w") as f:
                f.write(value)
        except OSError as e:
            raise SysrootError(
                f"cannot write {value!r} to {p}", why=e.strerror or str(e), path=p
            ) from e

    def listdir(self, p: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(p)))
        except FileNotFoundError:
            return []
