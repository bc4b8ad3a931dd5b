"""The build cache under ${KJUMPD_CACHE:-~/.cache/kjumpd}: one way to make an entry.

Engineers and CI runs share the cache, so two ``make`` runs may build the same entry at once,
and a build may be killed halfway. :func:`build_entry` makes both harmless:

* an exclusive ``flock`` on a lock file beside the entry (``.NAME.lock``) serialises the
  builders of one entry: the second waits, then finds the entry made and builds nothing. The
  kernel drops the lock when its holder dies, so a killed build never blocks the next one;
* the builder writes the entry (a file or a directory) under a temporary name
  (``.NAME.partial-PID``) that nothing trusts, and it is renamed into place only once the
  builder returned: an entry that exists is complete. Leftovers of killed builds are removed
  by the next build of the entry (it holds the lock, so none of them is still being written).

The lock files stay (a few bytes each); pruning removes entries, not their locks.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """${KJUMPD_CACHE}, else ~/.cache/kjumpd (the Makefile exports the same default)."""
    return Path(os.environ.get("KJUMPD_CACHE") or Path.home() / ".cache" / "kjumpd")


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree (already gone is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def lock_path(entry: Path) -> Path:
    return entry.with_name(f".{entry.name}.lock")


@contextmanager
def locked(entry: Path) -> Iterator[None]:
    """Hold the entry's exclusive lock (waiting for it): for work on an entry other than
    building it, such as changing a shared tree another build reads."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(entry), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_entry(
    entry: Path,
    build: Callable[[Path], None],
    *,
    valid: Callable[[Path], bool] = Path.exists,
    remove: Callable[[Path], None] = remove_path,
) -> bool:
    """Make sure the cache entry ``entry`` exists; True when this call built it.

    ``build(tmp)`` writes the complete entry at ``tmp`` (a file or a directory; raising
    leaves nothing behind). ``valid(entry)`` says whether an existing entry may be used
    (default: it exists); one that is not is removed and built again. ``remove`` deletes
    a stale entry or partial (a tree with mounts needs more care than rmtree).
    """
    if valid(entry):
        return False
    with locked(entry):
        if valid(entry):  # another run built it while this one waited
            return False
        for stale in entry.parent.glob(f".{entry.name}.partial-*"):
            remove(stale)
        if os.path.lexists(entry):
            remove(entry)
        tmp = entry.with_name(f".{entry.name}.partial-{os.getpid()}")
        try:
            build(tmp)
            if not os.path.lexists(tmp):
                raise FileNotFoundError(f"the build of {entry} wrote nothing at {tmp}")
            os.rename(tmp, entry)
        except BaseException:
            if os.path.lexists(tmp):
                remove(tmp)
            raise
    return True
