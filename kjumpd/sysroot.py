"""The one place that turns "/sys/...", "/proc/...", "/dev/..." into a real path.

Everything that touches the system takes a :class:`Sysroot`; tests build a fake tree and
pass its directory as the root, the daemon passes "/" (or ``--sysroot DIR``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kjumpd.errors import SysrootError


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
            raise SysrootError(f"internal: path {s!r} is not absolute")
        return self.root / s.lstrip("/") if not self.is_real else Path(s)

    def unmap(self, p: str | os.PathLike[str]) -> str:
        """The system path ("/sys/...") of a real path under the root."""
        rel = Path(p).relative_to(self.root)
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
