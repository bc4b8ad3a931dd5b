"""An independent thaw path: a machine never stays frozen because kjumpd died.

Before it stops user space, the transaction forks a *guard*: a child process that only
waits on a pipe. The daemon keeps the write end; the kernel closes it when the daemon dies
for any reason (SIGKILL, a crash, the OOM killer), and the guard then thaws everything the
record (kjumpd.daemon.taskfreeze.STATE_FILE) names and exits. It also thaws when the frozen window
has lasted longer than its bound (CLOCK_MONOTONIC, which stands still while the save kernel
runs and while the machine sleeps), and on SIGTERM/SIGINT/SIGHUP (a service manager
stopping the unit). The daemon ends it once everything is thawed (``stop``).

The guard is a descendant of the daemon, so the user-space freeze keeps it running; the
kernel's freezer stops it during the jump like every other task. It closes every inherited
descriptor but the pipe and stderr: a D-Bus connection held by the guard would keep the
daemon's bus name alive after the daemon died.

Under systemd, ``ExecStopPost=kjumpd --recover`` is the second path (the guard may be
killed with the rest of the unit): systemd runs it after the service stops, however it
stopped. The daemon also recovers at start.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time

from kjumpd.daemon import taskfreeze
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

DONE = b"d"
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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
        log.warning("the freeze guard (pid %d) did not exit; leaving it", self.pid)


def start(sr: Sysroot, bound: float) -> Guard:
    """Fork the guard; it thaws on the daemon's death, after ``bound`` seconds frozen, or on
    a termination signal."""
    rfd, wfd = os.pipe()
    os.set_inheritable(rfd, False)
    os.set_inheritable(wfd, False)
    pid = os.fork()
    if pid == 0:  # the guard: never returns
        code = 0
        try:
            os.close(wfd)
            code = _main(sr, rfd, bound)
        except BaseException as e:  # noqa: BLE001 - the child must end here, whatever happened
            _say(f"freeze guard failed: {type(e).__name__}: {e}")
            code = 1
        os._exit(code)
    os.close(rfd)
    return Guard(pid, wfd)


def _say(msg: str) -> None:
    try:
        os.write(2, f"kjumpd[{os.getpid()}]: {msg}\n".encode())
    except OSError:
        pass


def _main(sr: Sysroot, rfd: int, bound: float) -> int:
    # signals are taken synchronously (no handlers: this thread is the only one left)
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        maxfd = int(os.sysconf("SC_OPEN_MAX"))
    except (ValueError, OSError):
        maxfd = 1 << 20
    os.closerange(3, rfd)
    os.closerange(rfd + 1, max(maxfd, rfd + 1))
    try:
        os.setsid()  # a terminal's hang-up or ^C for the daemon's group is not ours
    except OSError:
        pass
    deadline = time.monotonic() + bound
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return _thaw(sr, f"the machine stayed frozen for more than {bound:g} s")
        ready, _, _ = select.select([rfd], [], [], min(left, 0.25))
        pending = signal.sigpending() & set(_SIGNALS)
        if pending:
            name = signal.Signals(sorted(pending)[0]).name
            return _thaw(sr, f"{name} for the freeze guard")
        if ready:
            data = os.read(rfd, 64)
            if not data:
                return _thaw(sr, "the death of kjumpd inside the frozen window")
            if DONE in data:
                return 0


def _thaw(sr: Sysroot, reason: str) -> int:
    try:
        errors = taskfreeze.recover(sr, reason, force=True)
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
    from kjumpd.daemon import quiesce
    from kjumpd.errors import KjumpError

    try:
        sr = Sysroot(sysroot)
        errors = taskfreeze.recover(sr, "kjumpd stopped inside the frozen window")
        errors += quiesce.recover(sr)
    except KjumpError as e:
        print(f"kjumpd --recover: {e.message}", file=sys.stderr)
        return 1
    return 1 if errors else 0
