"""Stopping user space before the filesystems are frozen: the cgroup v2 freezer.

Why: a task that writes to a frozen filesystem sleeps uninterruptibly in ``sb_start_write``,
and the kernel's own freezer, which a preserve-context ``kexec -e`` runs, cannot freeze a
task in that state: the jump fails with EBUSY. Tasks stopped by the cgroup freezer first are
stopped at a clean point (the freezer's trap is taken on the way back to user space, never in
the middle of a filesystem operation), so nothing is inside a filesystem when FIFREEZE runs,
and the kernel's freezer later finds them already asleep.

What is frozen (``plan``): every cgroup that holds no *kept* process. The kept processes are
the daemon with its descendants (kexec, the freeze guard) and PID 1 (it reaps, and a service
manager must stay able to act on a stuck daemon). For each cgroup on the way from the root
to a kept process's cgroup, every child off that way is frozen with ``cgroup.freeze`` = 1,
which freezes its whole subtree: nested and delegated subtrees included, whatever they set
themselves. The other processes that sit directly in a cgroup on that way (all of user
space on a system whose init puts nothing in cgroups; a shell beside a daemon started by
hand) are moved into a child cgroup ``kjumpd.freeze`` of theirs, which is frozen, and moved
back after the thaw. Kernel threads stay where they are (they cannot be moved).

A cgroup someone else had frozen stays frozen and is not thawed by kjumpd.

Bound: each frozen cgroup must report ``frozen 1`` in its ``cgroup.events`` within the
freeze timeout; otherwise everything is thawed again and :class:`TaskFreezeError` names each
cgroup that did not freeze with its tasks that are not stopped (pid, comm, state, wchan).

Without cgroup v2 (no cgroup2 mount, or a kernel before 5.2 without ``cgroup.freeze``) user
space is not stopped before the filesystems are frozen: ``kjumpctl check`` warns, and a task
writing at that moment makes the jump fail (rolled back, the error naming the task).

The record of what is frozen (``/run/kjumpd/frozen.json``, tmpfs, never frozen) is written
*before* each freeze, so that an independent path (:mod:`kjumpd.daemon.freezeguard`, ``kjumpd
--recover``) can thaw a machine whose daemon died inside the frozen window. Format (JSON,
``"version": 1``): ``cgroup_root`` (system path of the cgroup2 mount), ``cgroups`` (paths
relative to it that kjumpd froze), ``parks`` (list of ``[cgroup, [pids]]``: processes moved
into ``<cgroup>/kjumpd.freeze``), ``mounts`` (list of ``[mountpoint, devno, fstype]``
to FITHAW), ``pid`` (the daemon's).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kjumpd.errors import KjumpError, TaskFreezeError
from kjumpd.linux.mountinfo import Mount
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

PARK = "kjumpd.freeze"
STATE_FILE = "/run/kjumpd/frozen.json"
STATE_VERSION = 1
PF_KTHREAD = 0x00200000
#: rounds of moving processes into a park, or back out of it: each round catches those
#: forked meanwhile by processes not moved yet
PARK_ROUNDS = 8
#: where a task stopped by the cgroup v2 freezer sleeps (do_freezer_trap is inlined into
#: get_signal on some builds); a job-control stop is as good
STOPPED_WCHAN = frozenset({"do_freezer_trap", "get_signal", "do_signal_stop", "do_jobctl_trap"})


# -- the pure core ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    """What the plan needs to know of one cgroup on the way to a kept process."""

    children: Mapping[str, bool]  # child name -> its cgroup.freeze is 1 already
    procs: tuple[int, ...]  # cgroup.procs


@dataclass(frozen=True)
class FreezePlan:
    freeze: tuple[str, ...]  # cgroups to freeze (with their subtrees)
    park: tuple[tuple[str, tuple[int, ...]], ...]  # (cgroup, pids to move into cgroup/PARK)
    already_frozen: tuple[str, ...]  # frozen by someone else: left as they are
    kept_cgroups: tuple[str, ...]  # where the kept processes run


def ancestors(path: str) -> list[str]:
    """ "a/b/c" -> ["", "a", "a/b", "a/b/c"] (the root is "")."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [""] + ["/".join(parts[: i + 1]) for i in range(len(parts))]


def join(parent: str, child: str) -> str:
    return f"{parent}/{child}" if parent else child


def plan(
    kept_cgroups: Iterable[str], levels: Mapping[str, Level], keep: set[int], kthreads: set[int]
) -> FreezePlan:
    """Which cgroups to freeze and which processes to park, given the cgroups of the kept
    processes and a Level for every cgroup on the way to them (KeyError when one is
    missing: the caller reads them all)."""
    kept = sorted({c.strip("/") for c in kept_cgroups})
    way = sorted({a for c in kept for a in ancestors(c)} | {""})
    on_way = set(way)
    freeze: list[str] = []
    frozen_already: list[str] = []
    park: list[tuple[str, tuple[int, ...]]] = []
    for cg in way:
        level = levels[cg]
        for name, frozen in sorted(level.children.items()):
            child = join(cg, name)
            if child in on_way or name == PARK:
                continue
            (frozen_already if frozen else freeze).append(child)
        others = tuple(p for p in level.procs if p not in keep and p not in kthreads)
        if others:
            park.append((cg, others))
    return FreezePlan(tuple(freeze), tuple(park), tuple(frozen_already), tuple(kept))


@dataclass
class FrozenState:
    """What kjumpd froze, as recorded for any thaw path (format at the top of the module)."""

    cgroup_root: str = ""
    cgroups: list[str] = field(default_factory=list)
    parks: list[tuple[str, list[int]]] = field(default_factory=list)
    mounts: list[tuple[str, str, str]] = field(default_factory=list)
    pid: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": STATE_VERSION,
                "cgroup_root": self.cgroup_root,
                "cgroups": self.cgroups,
                "parks": [[c, list(p)] for c, p in self.parks],
                "mounts": [list(m) for m in self.mounts],
                "pid": self.pid,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> FrozenState:
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("version") != STATE_VERSION:
                raise ValueError(f"version {d.get('version') if isinstance(d, dict) else '?'}")
            root = d.get("cgroup_root", "")
            cgroups = [str(c) for c in d.get("cgroups", [])]
            parks = [(str(c), [int(p) for p in pids]) for c, pids in d.get("parks", [])]
            mounts = [(str(m[0]), str(m[1]), str(m[2])) for m in d.get("mounts", [])]
            pid = int(d.get("pid", 0))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise KjumpError(
                "the record of frozen cgroups and filesystems is unreadable",
                why=str(e),
                fix=f"thaw by hand (fsfreeze -u MOUNTPOINT; echo 0 > "
                f"CGROUP/cgroup.freeze) and remove {STATE_FILE}",
            ) from None
        if not isinstance(root, str) or (root and not root.startswith("/")):
            raise KjumpError(
                "the record of frozen cgroups names no cgroup root",
                why=f"cgroup_root {root!r}",
                fix=f"remove {STATE_FILE}",
            )
        for c in cgroups + [c for c, _ in parks if c]:
            if any(part in ("", ".", "..") for part in c.split("/")):
                raise KjumpError(
                    "the record of frozen cgroups leaves the cgroup tree",
                    why=f"cgroup {c!r}",
                    fix=f"remove {STATE_FILE}",
                )
        return cls(root, cgroups, parks, mounts, pid)


# -- the edge: cgroupfs and /proc ---------------------------------------------------------------
def cgroup2_root(sr: Sysroot) -> str | None:
    """The system path of the cgroup2 mount (unified: /sys/fs/cgroup; hybrid:
    /sys/fs/cgroup/unified), or None without cgroup v2."""
    from kjumpd.linux import mountinfo

    found = [
        m.mountpoint
        for m in mountinfo.parse(sr.read_text("/proc/self/mountinfo", ""))
        if m.fstype == "cgroup2"
    ]
    if not found:
        return None
    return "/sys/fs/cgroup" if "/sys/fs/cgroup" in found else sorted(found, key=len)[0]


def support(sr: Sysroot) -> tuple[bool, str]:
    """(usable, what kjumpctl check says) for the cgroup v2 freezer."""
    root = cgroup2_root(sr)
    if root is None:
        return False, (
            "no cgroup v2 hierarchy is mounted: user space is not stopped before "
            "the filesystems are frozen, and a process writing at that moment makes "
            "the jump fail (rolled back, naming it)"
        )
    for name in sr.listdir(root):
        if sr.path(f"{root}/{name}").is_dir() and sr.exists(f"{root}/{name}/cgroup.procs"):
            if sr.exists(f"{root}/{name}/cgroup.freeze"):
                return True, f"cgroup v2 freezer at {root}"
            return False, (
                f"cgroup v2 at {root} has no cgroup.freeze (Linux 5.2 or later "
                "needed): user space is not stopped before the filesystems are frozen"
            )
    return True, f"cgroup v2 at {root} (freezer checked at the first hibernation)"


def _own_cgroup(sr: Sysroot, pid: int | str) -> str | None:
    """The cgroup v2 path of a process ("0::/path" in /proc/PID/cgroup), relative."""
    for line in sr.read_text(f"/proc/{pid}/cgroup", "").splitlines():
        if line.startswith("0::"):
            return line[3:].strip().strip("/")
    return None


def _stat_fields(sr: Sysroot, pid: int) -> list[str] | None:
    text = sr.read_text(f"/proc/{pid}/stat", "")
    rp = text.rfind(")")
    if rp < 0:
        return None
    # fields after "pid (comm)": state ppid pgrp session tty tpgid flags ...
    return text[rp + 2 :].split()


def process_tree(sr: Sysroot, root_pid: int) -> set[int]:
    """root_pid and every descendant, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for name in sr.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(sr, int(name))
        if f and len(f) > 1 and f[1].isdigit():
            children.setdefault(int(f[1]), []).append(int(name))
    out, todo = set(), [root_pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


def is_kthread(sr: Sysroot, pid: int) -> bool:
    f = _stat_fields(sr, pid)
    try:
        return bool(f and int(f[6]) & PF_KTHREAD)
    except (IndexError, ValueError):
        return False


def task_line(sr: Sysroot, tid: int) -> str:
    """ "pid 123 (sqlite3) state D wchan percpu_rwsem_wait" for an error message."""
    comm = sr.read_text(f"/proc/{tid}/comm", "?").strip()
    f = _stat_fields(sr, tid)
    state = f[0] if f else "?"
    wchan = sr.read_text(f"/proc/{tid}/wchan", "").strip() or "-"
    return f"pid {tid} ({comm}) state {state} wchan {wchan}"


class Cgroups:
    """cgroupfs under one cgroup2 mount, through the sysroot."""

    def __init__(self, sr: Sysroot, root: str) -> None:
        self.sr, self.root = sr, root.rstrip("/") or "/"

    def p(self, cg: str, attr: str = "") -> str:
        base = self.root if not cg else f"{self.root}/{cg}"
        return f"{base}/{attr}" if attr else base

    def level(self, cg: str) -> Level:
        children = {}
        for name in self.sr.listdir(self.p(cg)):
            if self.sr.path(self.p(join(cg, name))).is_dir():
                children[name] = (
                    self.sr.read_text(self.p(join(cg, name), "cgroup.freeze"), "0").strip() == "1"
                )
        return Level(children, self.procs(cg))

    def procs(self, cg: str) -> tuple[int, ...]:
        text = self.sr.read_text(self.p(cg, "cgroup.procs"), "")
        return tuple(int(x) for x in text.split() if x.isdigit())

    def threads(self, cg: str) -> list[int]:
        """Every thread in the subtree of ``cg`` (for naming the ones that did not stop)."""
        out: list[int] = []
        todo = [cg]
        while todo and len(out) < 4096:
            c = todo.pop()
            text = self.sr.read_text(self.p(c, "cgroup.threads"), "")
            out += [int(x) for x in text.split() if x.isdigit()]
            todo += [
                join(c, n)
                for n in self.sr.listdir(self.p(c))
                if self.sr.path(self.p(join(c, n))).is_dir()
            ]
        return out

    def set_freeze(self, cg: str, on: bool) -> None:
        self.sr.write_text(self.p(cg, "cgroup.freeze"), "1" if on else "0")

    def unfreeze(self, cg: str) -> str | None:
        """cgroup.freeze = 0 where ``cg`` still exists; None, or what went wrong."""
        if not self.sr.path(self.p(cg)).exists():
            return None
        try:
            self.set_freeze(cg, False)
        except KjumpError as e:
            return f"thaw {self.p(cg)}: {e.why}"
        return None

    def frozen(self, cg: str) -> bool:
        for line in self.sr.read_text(self.p(cg, "cgroup.events"), "").splitlines():
            k, _, v = line.partition(" ")
            if k == "frozen":
                return v.strip() == "1"
        return False

    def move(self, pid: int, cg: str) -> str | None:
        """Move process ``pid`` into ``cg``; None, or why it could not be moved (it exited:
        None too)."""
        try:
            with open(self.sr.path(self.p(cg, "cgroup.procs")), "w") as f:
                f.write(str(pid))
        except ProcessLookupError:
            return None
        except OSError as e:
            return e.strerror or str(e)
        return None

    def mkdir(self, cg: str) -> None:
        try:
            self.sr.path(self.p(cg)).mkdir()
        except FileExistsError:
            pass

    def rmdir(self, cg: str) -> str | None:
        try:
            self.sr.path(self.p(cg)).rmdir()
        except FileNotFoundError:
            return None
        except OSError as e:
            return f"rmdir {self.p(cg)}: {e.strerror or e}"
        return None


def write_state(sr: Sysroot, state: FrozenState) -> None:
    """Replace the record atomically (tmpfs: never frozen)."""
    path = sr.path(STATE_FILE)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)


def read_state(sr: Sysroot) -> FrozenState | None:
    try:
        text = sr.path(STATE_FILE).read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KjumpError(
            f"cannot read {STATE_FILE}", why=e.strerror or str(e), fix=f"check {STATE_FILE}"
        ) from None
    return FrozenState.from_json(text)


def clear_state(sr: Sysroot) -> None:
    try:
        sr.path(STATE_FILE).unlink()
    except FileNotFoundError:
        pass


@dataclass
class FreezeReport:
    cgroup_root: str | None
    frozen: list[str] = field(default_factory=list)  # cgroups kjumpd froze
    parked: int = 0  # processes moved and frozen
    left_running: list[str] = field(default_factory=list)  # processes that could not be moved
    already_frozen: list[str] = field(default_factory=list)
    note: str = ""


class TaskFreezer:
    """Freeze user space (``freeze``) and thaw it (``thaw``), recording what is frozen in
    ``state`` before each step; ``state`` is written to STATE_FILE through ``record``."""

    def __init__(self, sr: Sysroot, state: FrozenState, pid: int | None = None) -> None:
        self.sr = sr
        self.state = state
        self.pid = pid if pid is not None else os.getpid()

    def record(self) -> None:
        write_state(self.sr, self.state)

    def freeze(self, timeout: float) -> FreezeReport:
        root = cgroup2_root(self.sr)
        report = FreezeReport(root)
        if root is None:
            report.note = "no cgroup v2: user space is not stopped before the filesystems"
            return report
        cg = Cgroups(self.sr, root)
        self.state.cgroup_root = root
        keep = process_tree(self.sr, self.pid) | {1, self.pid}
        kept = {c for c in (_own_cgroup(self.sr, p) for p in sorted(keep)) if c is not None}
        if not kept:
            report.note = f"cannot tell this process's cgroup v2 (/proc/{self.pid}/cgroup)"
            log.warning("user space not frozen: %s", report.note)
            return report
        levels = {a: cg.level(a) for c in kept for a in ancestors(c)}
        kthreads = {
            p
            for lv in levels.values()
            for p in lv.procs
            if p not in keep and is_kthread(self.sr, p)
        }
        fp = plan(kept, levels, keep, kthreads)
        report.already_frozen = list(fp.already_frozen)
        try:
            for c in fp.freeze:
                self.state.cgroups.append(c)
                self.record()
                try:
                    cg.set_freeze(c, True)
                except KjumpError as e:
                    if not self.sr.path(cg.p(c)).exists():  # it went away meanwhile
                        self.state.cgroups.remove(c)
                        continue
                    raise TaskFreezeError(
                        f"cannot freeze cgroup {c}",
                        why=e.why,
                        fix="check that cgroup.freeze is writable (cgroup v2, Linux 5.2 or later)",
                        cgroup=c,
                    ) from None
            report.frozen = list(self.state.cgroups)
            for parent, pids in fp.park:
                report.left_running += self._park(cg, parent, pids, keep, kthreads)
                report.parked += len(pids)
            self._wait(cg, timeout)
        except BaseException:
            self.thaw()
            raise
        return report

    def _park(
        self, cg: Cgroups, parent: str, pids: tuple[int, ...], keep: set[int], kthreads: set[int]
    ) -> list[str]:
        park = join(parent, PARK)
        moved: list[int] = []
        self.state.parks.append((parent, moved))
        self.record()
        cg.mkdir(park)
        cg.set_freeze(park, True)  # frozen while empty: each process stops as it arrives
        refused: dict[int, str] = {}
        todo = list(pids)
        for _ in range(PARK_ROUNDS):
            for pid in todo:
                moved.append(pid)
                self.record()
                why = cg.move(pid, park)
                if why is not None:
                    moved.remove(pid)
                    refused[pid] = why
            self.record()
            todo = [
                p
                for p in cg.procs(parent)
                if p not in keep and p not in kthreads and p not in refused
            ]
            if not todo:
                break
        left = [f"{task_line(self.sr, p)}: {why}" for p, why in refused.items()]
        for line in left:
            log.warning("cannot stop a process before the freeze (it keeps running): %s", line)
        return left

    def _wait(self, cg: Cgroups, timeout: float) -> None:
        targets = list(self.state.cgroups) + [join(p, PARK) for p, _ in self.state.parks]
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            pending = [c for c in targets if not cg.frozen(c) and self.sr.path(cg.p(c)).exists()]
            if not pending:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        lines = []
        for c in pending:
            busy = [
                t
                for t in cg.threads(c)
                if self.sr.read_text(f"/proc/{t}/wchan", "").strip() not in STOPPED_WCHAN
            ]
            tasks = "; ".join(task_line(self.sr, t) for t in busy[:8]) or "no task named"
            more = f" and {len(busy) - 8} more" if len(busy) > 8 else ""
            lines.append(f"{cg.p(c)}: {tasks}{more}")
        raise TaskFreezeError(
            f"user space did not stop within {timeout:g} s",
            why="; ".join(lines),
            fix="a task sleeping uninterruptibly (state D: a hung NFS or FUSE mount, a device "
            "in error) cannot be frozen; see where it waits (wchan), then retry or stop it. "
            "Nothing was frozen or changed: the system keeps running",
            cgroups=", ".join(pending),
        )

    def thaw(self) -> list[str]:
        """Thaw what ``state`` records (reverse order); returns the errors."""
        errors = thaw_cgroups(self.sr, self.state)
        self.state.cgroups.clear()
        self.state.parks.clear()
        self.record()
        return errors


def thaw_cgroups(sr: Sysroot, state: FrozenState) -> list[str]:
    """Thaw the parks (moving their processes back) and the frozen cgroups of ``state``."""
    if not state.cgroup_root:
        return []
    cg = Cgroups(sr, state.cgroup_root)
    errors: list[str] = []
    for parent, _ in reversed(state.parks):
        park = join(parent, PARK)
        if not sr.path(cg.p(park)).exists():
            continue
        errors += _empty_park(cg, park, parent)
        errors += [e for e in (cg.unfreeze(park),) if e]
        errors += [e for e in (cg.rmdir(park),) if e]
    errors += [e for e in (cg.unfreeze(c) for c in reversed(state.cgroups)) if e]
    return errors


def _empty_park(cg: Cgroups, park: str, parent: str) -> list[str]:
    """Move every process of ``park`` back into ``parent`` while the park is still frozen.

    A frozen task cannot fork, so nothing new lands in the park while it is emptied (a
    thawed shell loop forks into it faster than a read of cgroup.procs can be acted on,
    and the park then cannot be removed); the move itself thaws each task, since it takes
    on the state of the unfrozen parent. A park someone thawed meanwhile can still gain a
    process between two reads, hence a few rounds."""
    why: dict[int, str] = {}
    for _ in range(PARK_ROUNDS):
        pids = cg.procs(park)
        if not pids:
            return []
        why = {}
        for pid in pids:
            reason = cg.move(pid, parent)
            if reason is not None:
                why[pid] = reason
    left = cg.procs(park)
    return [
        f"move pid {pid} back to {cg.p(parent)}: {why.get(pid, 'still in the park')}"
        for pid in left
    ]


def pid_alive(sr: Sysroot, pid: int) -> bool:
    f = _stat_fields(sr, pid)
    return f is not None and bool(f) and f[0] not in ("Z", "X")


def recover(sr: Sysroot, reason: str, force: bool = False) -> list[str]:
    """Thaw everything the record says is frozen (filesystems first, then user space) and
    remove the record. The independent thaw path: the freeze guard (``force``: its daemon
    may still live), ``kjumpd --recover`` (systemd's ExecStopPost) and the daemon's start,
    which leave a record alone while the kjumpd that wrote it still runs. Returns what could
    not be thawed."""
    from kjumpd.daemon import fsfreeze

    state = read_state(sr)
    if state is None:
        return []
    if not force and state.pid not in (0, os.getpid()) and pid_alive(sr, state.pid):
        log.info("kjumpd (pid %d) is inside its frozen window: it thaws itself", state.pid)
        return []
    mounts = [Mount(0, devno, mp, fstype, "", "") for mp, devno, fstype in state.mounts]
    errors = [e for e in fsfreeze.thaw(sr, mounts) if "Invalid argument" not in e]
    errors += thaw_cgroups(sr, state)
    clear_state(sr)
    what = (
        f"{len(state.mounts)} filesystem(s), {len(state.cgroups)} cgroup(s), "
        f"{sum(len(p) for _, p in state.parks)} parked process(es)"
    )
    if errors:
        log.error("thawed after %s (%s), with errors: %s", reason, what, "; ".join(errors))
    else:
        log.warning("thawed after %s: %s", reason, what)
    return errors
