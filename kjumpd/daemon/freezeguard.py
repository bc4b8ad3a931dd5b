"""An independent thaw path: a machine never stays frozen because kjumpd died.

Before it stops user space, the transaction starts a *guard*: a child process that only
waits on a pipe. The daemon keeps the write end; the kernel closes it when the daemon dies
for any reason (SIGKILL, a crash, the OOM killer), and the guard then thaws everything the
record (kjumpd.daemon.taskfreeze.STATE_FILE) names and exits. It also thaws when the frozen window
has lasted longer than its bound (CLOCK_MONOTONIC, which stands still while the save kernel
runs and while the machine sleeps), and on SIGTERM/SIGINT/SIGHUP (a service manager
stopping the unit). The daemon ends it once everything is thawed (``stop``).

The guard is a new, small python process (``python3 -I -S``, this module and the standard
library's os, select, signal and time; the thaw's modules are imported only to thaw), not a
fork of the daemon: a forked child shares the daemon's heap copy-on-write, and the daemon's
own work in the frozen window (the garbage collection of its shrink step, the job) then
copies most of it, pages that the image saves twice (12 MiB in the bench VM, against 3.7 MiB
for the whole new process). It is spawned with the termination signals blocked (it takes
them synchronously), in a session of its own, holding only the pipe's read end and the
standard descriptors: a D-Bus connection held by the guard would keep the daemon's bus name
alive after the daemon died.

The guard is a descendant of the daemon, so the user-space freeze keeps it running; the
kernel's freezer stops it during the jump like every other task.

Under systemd, ``ExecStopPost=kjumpd --recover`` is the second path (the guard may be
killed with the rest of the unit): systemd runs it after the service stops, however it
stopped. The daemon also recovers at start.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kjumpd.sysroot import Sysroot

DONE = b"d"
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: the guard's program: this module from the checkout or installation the daemon runs from;
#: it ends with os._exit (nothing to flush: it writes with os.write), as the interpreter's
#: clean-up would keep the daemon waiting on its exit after a resume
_BOOT = (
    "import os, sys; sys.path.insert(0, sys.argv[1]); "
    "from kjumpd.daemon import freezeguard; os._exit(freezeguard.guard_main(sys.argv[2:]))"
)


class Guard:
    def __init__(self, pid: int, wfd: int) -> None:
        self.pid = pid
        self._wfd: int | None = wfd

    def stop(self) -> None:
        """Tell the guard all is thawed, and reap it."""
        if self._wfd is not None:
            try:
                os.write(self._wfd, DONE)
            except OSError:
                pass
            os.close(self._wfd)
            self._wfd = None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            time.sleep(0.01)
        import logging

        logging.getLogger(__name__).warning(
            "the freeze guard (pid %d) did not exit; leaving it", self.pid
        )


def start(sr: Sysroot, bound: float) -> Guard:
    """Start the guard; it thaws on the daemon's death, after ``bound`` seconds frozen, or on
    a termination signal."""
    from kjumpd.errors import TaskFreezeError

    rfd, wfd = os.pipe()  # both close on exec: the guard gets the read end as ``fd`` only
    fd = 3 if rfd != 3 else 4  # dup2 onto itself would keep close-on-exec set
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = [sys.executable, "-I", "-S", "-B", "-c", _BOOT, here, str(fd), repr(bound), str(sr.root)]
    try:
        pid = os.posix_spawn(
            sys.executable,
            argv,
            os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, rfd, fd)],
            setsid=True,
            setsigmask=_SIGNALS,
        )
    except OSError as e:
        os.close(wfd)
        raise TaskFreezeError(
            "cannot start the freeze guard",
            why=f"{sys.executable}: {os.strerror(e.errno or 0)}",
            fix="kjumpd needs its python interpreter and a free process slot; check "
            "`ulimit -u` and the daemon's memory limit",
        ) from e
    finally:
        os.close(rfd)
    return Guard(pid, wfd)


def guard_main(argv: list[str]) -> int:
    """The guard process: ``FD BOUND SYSROOT`` (see ``start``)."""
    fd, bound, root = int(argv[0]), float(argv[1]), argv[2]
    try:
        return _main(root, fd, bound)
    except BaseException as e:  # noqa: BLE001 - the guard's only channel left is stderr
        _say(f"freeze guard failed: {type(e).__name__}: {e}")
        return 1


def _say(msg: str) -> None:
    try:
        os.write(2, f"kjumpd[{os.getpid()}]: {msg}\n".encode())
    except OSError:
        pass


def _main(root: str, rfd: int, bound: float) -> int:
    # signals are taken synchronously (blocked from the spawn on: no handler to miss one)
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    # a descriptor the daemon left inheritable (one systemd passed it) is not the guard's
    try:
        maxfd = int(os.sysconf("SC_OPEN_MAX"))
    except (ValueError, OSError):
        maxfd = 1 << 20
    os.closerange(3, rfd)
    os.closerange(rfd + 1, max(maxfd, rfd + 1))
    deadline = time.monotonic() + bound
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return _thaw(root, f"the machine stayed frozen for more than {bound:g} s")
        ready, _, _ = select.select([rfd], [], [], min(left, 0.25))
        pending = signal.sigpending() & set(_SIGNALS)
        if pending:
            name = signal.Signals(sorted(pending)[0]).name
            return _thaw(root, f"{name} for the freeze guard")
        if ready:
            data = os.read(rfd, 64)
            if not data:
                return _thaw(root, "the death of kjumpd inside the frozen window")
            if DONE in data:
                return 0


def _thaw(root: str, reason: str) -> int:
    try:
        from pathlib import Path

        from kjumpd.daemon import taskfreeze
        from kjumpd.sysroot import Sysroot

        errors = taskfreeze.recover(Sysroot(Path(root)), reason, force=True)
    except Exception as e:  # noqa: BLE001 - say it on stderr, the only channel left
        _say(f"freeze guard: thaw after {reason} failed: {e}")
        return 1
    _say(
        f"freeze guard: thawed after {reason}"
        + (f"; not thawed: {'; '.join(errors)}" if errors else "")
    )
    return 1 if errors else 0


def recover_main(sysroot: str) -> int:
    """``kjumpd --recover``: thaw what a dead kjumpd left frozen and undo the device writes
    it left quiesced (0 also when there was nothing)."""
    from kjumpd.daemon import quiesce, taskfreeze
    from kjumpd.errors import KjumpError
    from kjumpd.sysroot import Sysroot

    try:
        sr = Sysroot(sysroot)
        errors = taskfreeze.recover(sr, "kjumpd stopped inside the frozen window")
        errors += quiesce.recover(sr)
    except KjumpError as e:
        print(f"kjumpd --recover: {e.message}", file=sys.stderr)
        return 1
    return 1 if errors else 0
