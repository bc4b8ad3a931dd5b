"""The kernel's log: what ``kexec -e`` does not say when it fails, and what R's kernel said
as it booted.

``KernelLog`` opens /dev/kmsg positioned at its end before the jump (or at its start) and
reads what the kernel logged since (each read returns one record ``PRI,SEQ,USEC,FLAGS;text``, and
continuation lines start with a space; a regular file, as a fake tree has, is read line by
line the same way).

``freezer_failure`` finds the kernel freezer's report in those lines: the summary

    Freezing user space processes failed after 20.004 seconds (2 tasks refusing to freeze, ...):

followed by one ``task:COMM state:S ... pid:N ...`` line per task that refused, each with a
call trace whose first frame outside the scheduler says where the task waits.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field

from kjumpd.sysroot import Sysroot

KMSG = "/dev/kmsg"
_FAILED = re.compile(
    r"Freezing (?:of )?(?P<what>[\w ]+?) (?:failed|aborted) after "
    r"(?P<secs>[\d.]+) seconds"
    r"(?: \((?P<n>\d+) tasks? refusing to freeze)?"
)
_TASK = re.compile(r"task:(?P<comm>.+?)\s+state:(?P<state>\S)")
_PID = re.compile(r"\bpid:\s*(?P<pid>\d+)")
_FRAME = re.compile(r"^\s*(?:\? )?(?P<fn>[A-Za-z_][\w.]*)\+0x")
_SCHED = re.compile(
    r"^(?:__)?schedule|^context_switch|^__switch_to|^io_schedule|"
    r"^rwsem_down|^percpu_rwsem_wait$|^__percpu_down_read|^schedule_"
)
#: frames that only say *how* a task sleeps: skipped to find *where* it waits, unless nothing
#: else is left
_HOW = re.compile(r"^(?:__)?schedule|^context_switch|^__switch_to|^io_schedule")


@dataclass(frozen=True)
class RefusedTask:
    pid: int
    comm: str
    state: str
    waits_in: str = ""

    def __str__(self) -> str:
        where = f" in {self.waits_in}" if self.waits_in else ""
        return f"pid {self.pid} ({self.comm}) state {self.state}{where}"


@dataclass
class FreezerFailure:
    what: str  # "user space processes", "remaining freezable tasks"
    seconds: float
    count: int
    tasks: list[RefusedTask] = field(default_factory=list)

    def summary(self) -> str:
        names = "; ".join(str(t) for t in self.tasks[:8]) or "the kernel named none"
        more = f" and {len(self.tasks) - 8} more" if len(self.tasks) > 8 else ""
        return (
            f"the kernel's freezer gave up on {self.what} after {self.seconds:g} s "
            f"({self.count} refusing to freeze): {names}{more}"
        )


def text_of(record: str) -> str:
    """A /dev/kmsg record's message ("6,123,456,-;text" -> "text"); other lines as they are."""
    head, sep, rest = record.partition(";")
    if sep and re.fullmatch(r"\d+,\d+,\d+,[^;]*", head):
        return rest
    return record


def freezer_failure(lines: list[str]) -> FreezerFailure | None:
    """The last freezer failure in ``lines`` (kernel log messages), with the tasks named."""
    found: FreezerFailure | None = None
    current: RefusedTask | None = None
    frames: list[str] = []

    def close() -> None:
        nonlocal current, frames
        if found is not None and current is not None:
            where = next((f for f in frames if not _SCHED.search(f)), "")
            if not where:
                where = next((f for f in frames if not _HOW.search(f)), "")
            found.tasks.append(RefusedTask(current.pid, current.comm, current.state, where))
        current, frames = None, []

    for raw in lines:
        line = text_of(raw)
        m = _FAILED.search(line)
        if m:
            close()
            found = FreezerFailure(
                m.group("what").strip(), float(m.group("secs")), int(m.group("n") or 0)
            )
            continue
        if found is None:
            continue
        m = _TASK.search(line)
        if m:
            close()
            pid = _PID.search(line, m.end())
            current = RefusedTask(
                int(pid.group("pid")) if pid else 0, m.group("comm").strip(), m.group("state")
            )
            continue
        if current is not None and not current.pid:
            pid = _PID.search(line)  # "pid:" printed as a continuation record
            if pid:
                current = RefusedTask(int(pid.group("pid")), current.comm, current.state)
                continue
        m = _FRAME.match(line)
        if m and current is not None:
            frames.append(m.group("fn"))
    close()
    if found is not None and not found.count:
        found.count = len(found.tasks)
    return found


class KernelLog:
    """New kernel log lines since ``open()``; never raises (an unreadable log reads empty)."""

    def __init__(self, sr: Sysroot) -> None:
        self.sr = sr
        self.fd: int | None = None
        self.error = ""

    def open(self, at_end: bool = True) -> KernelLog:
        """Open the log at its end (what is logged from now on), or at its oldest record."""
        try:
            self.fd = os.open(self.sr.path(KMSG), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            if at_end:
                os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as e:
            self.error = f"{KMSG}: {e.strerror or e}"
            self.close()
        return self

    def read(self, limit: int = 4096) -> list[str]:
        """The lines logged since open (at most ``limit``, the newest kept)."""
        if self.fd is None:
            return []
        out: list[str] = []
        while True:
            try:
                chunk = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records were overwritten: go on with the rest
                    continue
                self.error = f"{KMSG}: {e.strerror or e}"
                break
            if not chunk:
                break
            out += chunk.decode("utf-8", "replace").splitlines()
            if len(out) > 4 * limit:
                out = out[-limit:]
        return out[-limit:]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
