"""The hibernate transaction in the main kernel (A): every step records its undo.

``STEPS`` (at the end of the module) is the transaction up to the jump as a table: phase,
name, what it does, what undoes it. Steps:
  preflight -> announce (PrepareForSleep(true), hooks "pre") -> shrink -> quiesce ->
  boot one-shot -> freeze tasks [hold logs, fork the freeze guard, cgroup v2 freezer] ->
  freeze filesystems [sync, FIFREEZE, stamps] -> load [job + initrd in /run, kexec load] ->
  jump (kexec -e) -> return point: read the header with O_DIRECT on the whole disk.
User space is stopped before the filesystems (kjumpd.daemon.taskfreeze says why), and everything
frozen is recorded first in /run/kjumpd/frozen.json, which the freeze guard
(kjumpd.daemon.freezeguard) thaws from if this process dies inside the frozen window.
A header whose sequence number did not change across ``kexec -e`` means the save kernel
never wrote: the error is the jump's (JumpError), or the kernel freezer's
(TaskFreezeError, naming the tasks it logged), never the image's.
The copy of B's initramfs to /run runs in a thread from the preflight to the load (file I/O
and hashing, which release the GIL); the job is appended after the freeze.
stats["steps"] has the seconds of the steps inside phases.

At the return point:
  SAVED     -> the mode: platform (S4), shutdown, reboot (never return on success), suspend
               (S3 with the battery policy; a user wake invalidates the image), test
               (invalidate, continue), checkpoint (keep the image, continue). A way out that
               fails invalidates the image first, then rolls back.
  RESTORING -> resumed: mark CONSUMED (raw disk, before any filesystem write), then undo.
  anything else -> full rollback; the system keeps running.

Undo runs in reverse (unload, remove initrd, thaw filesystems, thaw tasks, end the guard,
release logs, boot one-shot off, quiesce undone, hooks "post", PrepareForSleep(false));
every undo is attempted and its
failures are reported. ``run`` returns an Outcome when the system continues normally
(resumed / continued / woke-from-ram) and raises the KjumpError that stopped it after a
full rollback otherwise (``err.outcome`` holds the rolled-back Outcome). When the system
continues, the HOUSEKEEPING undo steps (unload B, boot one-shot off, initrd, run dir) are left
for a thread that the service starts once it has answered the waiting client
(start_housekeeping); their failures are logged; the next ``run`` waits for them.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

from kjumpd import fsstamp
from kjumpd.daemon import (
    blockmap,
    bootentry,
    freezeguard,
    fsfreeze,
    hooks,
    kexec,
    keymem,
    platform,
    preflight,
    quiesce,
    shrink,
    taskfreeze,
    volumekey,
    warm,
)
from kjumpd.daemon.answerpage import AnswerPage
from kjumpd.daemon.config import Config
from kjumpd.errors import (
    AgentError,
    BusyError,
    CancelledError,
    ConfigError,
    ImageStateError,
    JumpError,
    KjumpError,
    TaskFreezeError,
    UnsupportedError,
)
from kjumpd.image import jobslot, store
from kjumpd.image.format import ImageState
from kjumpd.job import Job

# Everything the frozen window needs is imported here, up front: an import while the root
# filesystem is frozen would block writing its __pycache__ entry.
from kjumpd.linux import kmsg, mountinfo, pagecache
from kjumpd.linux.mountinfo import Mount
from kjumpd.modes import MODES
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)
RUN_DIR = "/run/kjumpd"
#: undo steps that nothing the user gets back depends on: when the system continues (resumed,
#: continued, woke from RAM) they run after the result is returned, in a thread; the next
#: transaction waits for them before it starts (Hibernation.wait_housekeeping)
HOUSEKEEPING = frozenset({"kexec unload", "boot one-shot", "initrd", "run dir"})


class Events(Protocol):
    def phase(self, name: str, percent: float) -> None: ...
    def prepare_for_sleep(self, active: bool) -> None: ...
    def log(self, msg: str) -> None: ...
    def save_kernel(self, state: str) -> None: ...


class NullEvents:
    def phase(self, name: str, percent: float) -> None:
        pass

    def prepare_for_sleep(self, active: bool) -> None:
        pass

    def log(self, msg: str) -> None:
        pass

    def save_kernel(self, state: str) -> None:
        pass


@dataclass
class Outcome:
    result: str  # resumed | continued | woke-from-ram | rolled-back
    mode: str
    image_state: str = "unknown"
    resumed: bool = False
    durations: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    undo_errors: list[str] = field(default_factory=list)
    hook_failures: list[str] = field(default_factory=list)


class _Undo:
    def __init__(self) -> None:
        self.stack: list[tuple[str, Callable[[], Any]]] = []
        #: seconds each undo step took, in the order they ran
        self.seconds: dict[str, float] = {}

    def push(self, name: str, fn: Callable[[], Any]) -> None:
        self.stack.append((name, fn))

    def take(self, names: frozenset[str]) -> _Undo:
        """Move the steps called ``names`` (in their order) to a new _Undo."""
        taken = _Undo()
        taken.stack = [(n, f) for n, f in self.stack if n in names]
        self.stack = [(n, f) for n, f in self.stack if n not in names]
        return taken

    def run(self) -> list[str]:
        errors: list[str] = []
        while self.stack:
            name, fn = self.stack.pop()
            t0 = time.monotonic()
            try:
                res = fn()
                if isinstance(res, list) and res and all(isinstance(x, str) for x in res):
                    errors += [f"{name}: {x}" for x in res]
            except KjumpError as e:
                errors.append(f"{name}: {e.message}")
            except OSError as e:
                errors.append(f"{name}: {e.strerror or e}")
            self.seconds[name] = time.monotonic() - t0
        for e in errors:
            log.error("undo: %s", e)
        if self.seconds:
            log.info("undo steps: %s", ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()))
        return errors


class _Background:
    """A function run in a thread from now on; ``result()`` waits for it and returns its
    value or raises what it raised. For work whose input is fixed early and that overlaps
    the steps before it is needed (the initrd copy, the housekeeping)."""

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(
            target=self._main, args=(fn,), name=f"kjump-{name}", daemon=True
        )
        self._thread.start()

    def _main(self, fn: Callable[[], Any]) -> None:
        t0 = time.monotonic()
        try:
            self._value = fn()
        except BaseException as e:  # handed to the caller of result()
            self._error = e
        self.seconds = time.monotonic() - t0

    def wait(self) -> None:
        self._thread.join()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True when the function has returned."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class _Context:
    """What the steps of one transaction share: the phase being reported, the undo stack,
    the timings, and what each step hands to the next (set by the steps, in order)."""

    def __init__(self, mode: str, cancel: threading.Event, events: Events) -> None:
        self.mode, self.cancel, self.events = mode, cancel, events
        self.out = Outcome(result="rolled-back", mode=mode)
        self.undo = _Undo()
        self.held = fsfreeze.HeldLogs()
        self.steps: dict[str, float] = {}
        self.out.stats["steps"] = self.steps  # seconds of the steps inside the phases
        self.phase_name = ""
        self._phase_start = time.monotonic()
        # preflight
        self.plan: preflight.PreflightPlan = preflight.PreflightPlan()
        self.area: Any = None
        self.memory: Any = None
        self.target: Any = None
        self.uuid = ""
        #: the volume key of the LUKS volume the target is inside (RAM only)
        self.volume_key = b""
        self.kx: Any = None
        self.b_cmdline = ""  # the save kernel's command line
        self.stager: Any = None
        # the save kernel: parked (warm) or loaded now (cold, and why)
        self.fingerprint: warm.Fingerprint | None = None
        self.cold_reason = ""
        self.mailbox: warm.Mailbox | None = None
        self.slot: jobslot.JobSlot | None = None
        #: where B says why it could not save, when it cannot write the image header
        self.answer: AnswerPage | None = None
        # announce, quiesce
        self.hooks_ran: list[str] = []
        self.journal: Any = None
        # freeze
        self.bytecode_was = sys.dont_write_bytecode
        self.guard: Any = None
        self.record = taskfreeze.FrozenState(pid=os.getpid())
        self.tasks: Any = None
        self.frozen: list[Mount] = []
        self.stamps: list[dict[str, Any]] = []

    def phase(self, name: str, percent: float) -> None:
        now = time.monotonic()
        if self.phase_name:
            self.out.durations[self.phase_name] = now - self._phase_start
        self._phase_start, self.phase_name = now, name
        if name:
            log.info("phase %s (%.0f%%)", name, percent)
            self.events.phase(name, percent)

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise CancelledError("the hibernation was cancelled", fix="")

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            self.steps[name] = time.monotonic() - t0


@dataclass(frozen=True)
class Step:
    """One row of the transaction: ``do`` in ``phase``, then ``undo`` pushed under ``name``
    (unless ``do`` returned False: nothing to undo). ``undo_first``: the undo is pushed
    before ``do``, for a step that can stop half done and undoes whatever it did.
    ``then_cancel``: a cancel request is honoured after this step."""

    phase: str
    percent: float
    name: str
    do: Callable[[Any, _Context], Any]
    undo: Callable[[Any, _Context], Any] | None = None
    undo_first: bool = False
    then_cancel: bool = False


class Hibernation:
    def __init__(self, sysroot: Sysroot, config: Config, events: Events | None = None) -> None:
        self.sysroot = sysroot
        self.config = config
        self.events: Events = events if events is not None else NullEvents()
        self._lock = threading.Lock()
        self._housekeeping: _Background | None = None
        self._later: _Undo | None = None  # housekeeping not started yet
        self._hk_lock = threading.Lock()
        #: seconds the machine may stay up after a power-off/reboot/S4 request
        self.settle = 20.0
        #: the parked save kernel (kjumpd.daemon.warm), under self._lock
        self.warm = warm.WarmState()
        self._rewarm = False  # warm up again once the housekeeping is done
        self._warm_timer: threading.Timer | None = None
        self._warm_thread: threading.Thread | None = None
        self._warm_lock = threading.Lock()
        #: what the last warm-up was started for: a check that finds the same again does not
        #: retry a warm-up that failed (each one pauses the system)
        self._warm_tried: warm.Fingerprint | None = None
        #: checks start warm-ups only after the daemon's own first one was decided, and not
        #: at all after a warm-up that never came back, until something changes
        self._check_warms = False
        self._skip_unchanged = False

    def start_housekeeping(self) -> None:
        """Start the undo steps a successful transaction left (HOUSEKEEPING) in a thread.
        The service calls this once it has answered; wait_housekeeping and the next run
        start them when nobody did."""
        with self._hk_lock:
            later, self._later = self._later, None
            rewarm, self._rewarm = self._rewarm, False
            if later is not None:
                self._housekeeping = _Background("housekeeping", later.run)
        if rewarm:
            # not at once: the pause of a warm-up right after a resume is felt
            self.schedule_warm_up(REWARM_DELAY)

    def save_kernel_state(self) -> str:
        """The SaveKernel property: parked, warming up, or loaded at each hibernation."""
        if not self.config.warm_save_kernel:
            return "loaded at each hibernation ([save_kernel] warm is off)"
        return self.warm.describe()

    def _tell_save_kernel(self) -> None:
        tell = getattr(self.events, "save_kernel", None)  # an Events of before the property
        if tell is not None:
            tell(self.save_kernel_state())

    def start_warm_up(self) -> bool:
        """Warm the save kernel up in the background (kjumpd.daemon.warm), as housekeeping
        (a hibernation waits for it); False when the option is off, or once after a warm-up
        that never came back (its marker is removed: the next start tries again)."""
        if not self.config.warm_save_kernel or not self.sysroot.is_real:
            return False
        if warm.left_marker(self.sysroot):
            why = (
                "the last warm-up never came back (the save kernel hung and the watchdog "
                "reset the machine, or the power failed)"
            )
            self.warm.drop(why)
            log.error("save kernel not warmed up now: %s; the next start tries again", why)
            self._skip_unchanged = True
            self._check_warms = True
            return False
        self._check_warms = True
        self.schedule_warm_up(0.0)
        return True

    def schedule_warm_up(self, delay: float) -> None:
        """Warm the save kernel up ``delay`` seconds from now, in a thread (a hibernation
        that starts first cancels it; one that starts during it waits for it)."""
        with self._warm_lock:
            if self._warm_timer is not None:
                self._warm_timer.cancel()
            timer = threading.Timer(delay, self._warm_up_thread)
            timer.daemon = True
            timer.name = "warm-up"
            self._warm_timer = timer
            timer.start()

    def _warm_up_thread(self) -> None:
        with self._warm_lock:
            self._warm_timer = None
            self._warm_thread = threading.current_thread()
        try:
            self.warm_up()
        finally:
            with self._warm_lock:
                self._warm_thread = None

    def cancel_or_wait_warm_up(self, timeout: float | None = None) -> bool:
        """Cancel a warm-up not started yet, wait for one running; False when it still
        runs after ``timeout``."""
        with self._warm_lock:
            if self._warm_timer is not None:
                self._warm_timer.cancel()
                self._warm_timer = None
            running = self._warm_thread
        if running is not None and running is not threading.current_thread():
            running.join(timeout)
            return not running.is_alive()
        return True

    def _rewarm_if_changed(self, rep: preflight.PreflightReport) -> None:
        """After a check: a save kernel parked for something else (`kjumpctl setup` made a
        new target, the save kernel's files changed) is warmed up again, once per change."""
        if not self.config.warm_save_kernel or not self.sysroot.is_real or not rep.ok:
            return
        if not self._check_warms:
            return
        plan = rep.plan
        if plan.target is None or not plan.uuid:
            return
        fp = self._fingerprint(plan, plan.target, plan.uuid)
        if self._skip_unchanged:
            self._skip_unchanged, self._warm_tried = False, fp
        p = self.warm.parked
        if (p is not None and p.fingerprint == fp) or fp == self._warm_tried:
            return
        with self._warm_lock:
            busy = self._warm_timer is not None or self._warm_thread is not None
        if not busy and not self._lock.locked():
            if p is not None:
                diff = ", ".join(warm.changed(p.fingerprint, fp))
                self.warm.drop(f"it was started for another {diff}")
            log.info("what the save kernel is parked for changed: warming a new one up")
            self.schedule_warm_up(0.0)

    def _fingerprint(
        self, plan: preflight.PreflightPlan, target: blockmap.Target, uuid: str
    ) -> warm.Fingerprint:
        """What a save kernel loaded now is started for, B's command line included (a
        passed preflight: the plan has its jump area and memory)."""
        assert plan.area is not None and plan.memory is not None
        return warm.Fingerprint(
            jump_area=(plan.area.start, plan.area.size),
            target_uuid=uuid,
            superblock_offset=target.superblock_offset,
            save_kernel_sha256=plan.kernel_sha256 or "",
            save_initramfs_sha256=plan.initramfs_sha256 or "",
            cmdline=kexec.save_cmdline(self.config, plan.area, main_ram=plan.memory.ranges),
            volume_uuid=target.volume.uuid if target.volume is not None else "",
        )

    def wait_housekeeping(self, timeout: float | None = None) -> bool:
        """Start (if needed) and wait for the housekeeping; False when it is still running
        after ``timeout`` seconds."""
        self.start_housekeeping()
        hk = self._housekeeping
        return hk is None or hk.join(timeout)

    def stop_warm_up(self, timeout: float | None = None) -> bool:
        """For the daemon's stop: no new warm-up, and the running one finished."""
        return self.cancel_or_wait_warm_up(timeout)

    def frozen_bound(self) -> float:
        """How long (CLOCK_MONOTONIC: the save kernel's time and sleep do not count) the
        machine may stay frozen before the freeze guard thaws it: every bounded step of the
        frozen window, with room to spare."""
        cfg = self.config
        return cfg.timeout_freeze + cfg.timeout_shrink + cfg.timeout_kexec + 2 * self.settle + 120.0

    # -- preflight --------------------------------------------------------------------------
    def check(self, mode: str | None = None) -> preflight.PreflightReport:
        rep = preflight.run(self.sysroot, self.config, mode)
        self._rewarm_if_changed(rep)
        return rep

    # -- the transaction ------------------------------------------------------------------------
    def run(self, mode: str | None = None, cancel: threading.Event | None = None) -> Outcome:
        mode = mode or self.config.mode
        if mode not in MODES:
            raise ConfigError(
                f"unknown mode {mode!r}", fix=f"use one of {', '.join(MODES)}", key="mode"
            )
        self.cancel_or_wait_warm_up()  # one in progress: the hibernation waits for it
        if not self._lock.acquire(blocking=False):
            raise BusyError("a hibernation is already running", fix="wait for it or cancel it")
        try:
            self.wait_housekeeping()
            return self._run(mode, cancel or threading.Event())
        finally:
            self._lock.release()
            self._tell_save_kernel()

    def _run(self, mode: str, cancel: threading.Event) -> Outcome:
        ctx = _Context(mode, cancel, self.events)
        out, undo = ctx.out, ctx.undo
        try:
            for step in STEPS:
                if step.phase != ctx.phase_name:
                    ctx.phase(step.phase, step.percent)
                if step.undo is not None and step.undo_first:
                    undo.push(step.name, partial(step.undo, self, ctx))
                done = step.do(self, ctx)
                if step.undo is not None and not step.undo_first and done is not False:
                    undo.push(step.name, partial(step.undo, self, ctx))
                if step.then_cancel:
                    ctx.check_cancel()
            self._jump_and_return(ctx)
            self._keep_or_drop_parked(ctx)
            ctx.phase("undo", 95)
            later = undo.take(HOUSEKEEPING)
            # in the background, B's unload must not take the CPU from the programs the
            # user got back: kexec -u can take long enough to be felt on a slow machine
            kx = ctx.kx
            later.stack = [
                (n, (lambda: kx.unload(nice=True)) if n == "kexec unload" else f)
                for n, f in later.stack
            ]
            out.undo_errors = undo.run()
            ctx.steps.update({f"undo {k}": v for k, v in undo.seconds.items()})
            # unloading B and clearing the one-shot boot entry wait until the caller has
            # its answer (start_housekeeping); their failures are logged, not in this Outcome
            self._later = later
            ctx.phase("", 100)
            log.info("hibernation %s: %s (image %s)", mode, out.result, out.image_state)
            self.events.log(
                f"hibernation {mode}: {out.result} (image {out.image_state})"
                + (f"; undo problems: {'; '.join(out.undo_errors)}" if out.undo_errors else "")
            )
            return out
        except (KjumpError, OSError) as exc:
            e = (
                exc
                if isinstance(exc, KjumpError)
                else KjumpError(
                    "hibernation failed",
                    why=f"{getattr(exc, 'filename', '') or ''} {exc.strerror or exc}".strip(),
                    fix="see the kjumpd log",
                )
            )
            out.undo_errors = undo.run()
            ctx.phase("", 100)
            out.error = e.to_dict()
            out.result = "rolled-back"
            e.context.setdefault("rolled_back", True)
            if out.undo_errors:
                e.context["undo_errors"] = "; ".join(out.undo_errors)
            e.outcome = out  # type: ignore[attr-defined]
            log.error("hibernation %s rolled back: %s", mode, e.message)
            self.events.log(f"hibernation {mode} rolled back: {e.message}")
            if e is exc:
                raise
            raise e from None
        except BaseException:
            undo.run()
            raise

    # -- the steps (STEPS below lists them in order, each with its undo) ----------------------
    def _make_run_dir(self, ctx: _Context) -> bool:
        if self.sysroot.path(RUN_DIR).exists():
            return False
        self.sysroot.path(RUN_DIR).mkdir(mode=0o700, parents=True)
        return True

    def _remove_run_dir(self, ctx: _Context) -> None:
        _rmdir_if_empty(self.sysroot, RUN_DIR)

    def _lock_memory(self, ctx: _Context) -> bool:
        # a key is about to pass through this process's heap and the shrink step pushes
        # memory to swap: kjumpd.daemon.keymem. Without a key the daemon's idle pages are
        # left to the shrink like any process's, so that they are not saved.
        if not keymem.needed(ctx.target, ctx.plan.encryption):
            return False
        if not self.sysroot.is_real:
            return False  # a system tree that is not this process's machine
        return keymem.lock()

    def _unlock_memory(self, ctx: _Context) -> None:
        keymem.unlock()

    def _preflight(self, ctx: _Context) -> None:
        sr, cfg = self.sysroot, self.config
        rep = preflight.run(sr, cfg, ctx.mode)
        if not rep.ok:
            bad = rep.failed()
            raise UnsupportedError(
                "hibernation is not possible",
                why="; ".join(f"{i.name}: {i.detail}" for i in bad),
                fix=bad[0].fix,
            )
        assert rep.plan.area is not None and rep.plan.memory is not None  # rep.ok
        ctx.plan, ctx.area, ctx.memory = rep.plan, rep.plan.area, rep.plan.memory
        ctx.target, ctx.uuid = blockmap.current(sr, cfg.target, restamp=True)
        ctx.kx = kexec.Kexec.find(cfg)
        ctx.fingerprint = self._fingerprint(ctx.plan, ctx.target, ctx.uuid)
        ctx.b_cmdline = ctx.fingerprint.cmdline
        if not cfg.warm_save_kernel:
            ctx.cold_reason = "[save_kernel] warm is off"
        elif not jobslot.slot_free(len(ctx.target.blockmap)):
            ctx.cold_reason = (
                f"the target's block map has {len(ctx.target.blockmap)} extents: no room "
                "for its job slot"
            )
        else:
            ctx.cold_reason = self.warm.unusable(ctx.fingerprint, sr)
        log.info(
            "save kernel: %s",
            f"cold ({ctx.cold_reason})" if ctx.cold_reason else "warm (parked)",
        )

    def _derive_volume_key(self, ctx: _Context) -> None:
        # after the memory lock: the key must never reach swap
        sr = self.sysroot
        if ctx.target.volume is not None:
            ctx.volume_key = ctx.timed("volume key", lambda: volumekey.derive(sr, ctx.target))

    def _stage_initrd(self, ctx: _Context) -> bool:
        # B's initramfs is copied to /run while the daemon announces and quiesces; the job
        # is appended after the freeze. A parked save kernel needs none of it.
        if not ctx.cold_reason:
            return False
        sr, cfg, sha = self.sysroot, self.config, ctx.plan.initramfs_sha256 or ""
        ctx.stager = _Background("initrd", lambda: kexec.stage_initrd(sr, cfg.save_initramfs, sha))
        return True

    def _stage_initrd_now(self, ctx: _Context) -> None:
        """The initrd step for a cold load decided after that step (the parked save kernel
        could not take the job)."""
        self._stage_initrd(ctx)
        ctx.undo.push("initrd", partial(self._remove_initrd, ctx))

    def _remove_initrd(self, ctx: _Context) -> None:
        ctx.stager.wait()
        kexec.remove_initrd(self.sysroot)

    def _announce(self, ctx: _Context) -> None:
        self.events.prepare_for_sleep(True)

    def _unannounce(self, ctx: _Context) -> None:
        self.events.prepare_for_sleep(False)

    def _pre_hooks(self, ctx: _Context) -> None:
        cfg = self.config
        res = hooks.run(self.sysroot, cfg.hook_dirs, "pre", ctx.mode, cfg.timeout_hooks)
        ctx.hooks_ran += [r.name for r in res]
        failed = hooks.check_policy(res, cfg.hook_policy)
        ctx.out.hook_failures += [f"pre {r.name}: rc {r.returncode}" for r in failed]

    def _post_hooks(self, ctx: _Context) -> list[str]:
        cfg = self.config
        res = hooks.run(
            self.sysroot, cfg.hook_dirs, "post", ctx.mode, cfg.timeout_hooks, only=ctx.hooks_ran
        )
        ctx.out.hook_failures += [f"post {r.name}: rc {r.returncode}" for r in res if not r.ok]
        return []

    def _free_pages_out(self) -> bool:
        """Whether the job asks B to leave A's free pages out (off with page_poison)."""
        return self.config.free_page_exclusion and kexec.free_pages_restore_as_zeros(self.sysroot)

    def _shrink(self, ctx: _Context) -> None:
        sr, cfg, out = self.sysroot, self.config, ctx.out
        # the huge page pools' free pages are not in MemFree, and B leaves them out unless
        # the debug zero check keeps them
        huge_out = (
            self._free_pages_out()
            and not cfg.free_page_check
            and kexec.vmcoreinfo_location(sr) is not None
        )
        if cfg.image_size:
            copy = (
                shrink.kexec_copy_bytes(sr, cfg.save_kernel, cfg.save_initramfs, ctx.area)
                if ctx.cold_reason
                else 0  # a parked save kernel: nothing is loaded inside the frozen window
            )
            s = shrink.toward_target(sr, cfg.image_size, copy, huge_out)
            out.stats.update(
                image_target=s.limit, image_estimate_before=s.before, image_estimate_after=s.after
            )
        if cfg.image_size_limit:
            s = shrink.shrink(sr, cfg.image_size_limit, cfg.timeout_shrink, huge_out)
            out.stats.update(shrink_before=s.before, shrink_after=s.after)

    def _quiesce(self, ctx: _Context) -> None:
        sr, out = self.sysroot, ctx.out
        ctx.journal = quiesce.Journal(sr)
        t_plan = time.monotonic()
        # not in a thread during the preflight: the walk holds the GIL most of the time,
        # and in the VM it stretched preflight and announce by more than it saved
        qplan = quiesce.plan(sr, self.config, ctx.mode)
        out.stats["quiesce_plan_seconds"] = time.monotonic() - t_plan
        out.stats.update(quiesce_devices=qplan.devices, quiesce_scan_seconds=qplan.scan_seconds)
        ctx.timed("quiesce apply", lambda: quiesce.apply(sr, qplan, ctx.journal))
        out.stats["quiesce_writes"] = len(qplan.writes)

    def _unquiesce(self, ctx: _Context) -> Any:
        if ctx.journal is None:
            return None
        return quiesce.undo(self.sysroot, ctx.journal)

    def _arm_oneshot(self, ctx: _Context) -> bool:
        if bootentry.read_record(self.sysroot) is None:
            return False
        area = (ctx.area.start, ctx.area.size) if ctx.area is not None else None
        return bool(bootentry.set_oneshot(self.sysroot, area))

    def _disarm_oneshot(self, ctx: _Context) -> Any:
        return bootentry.clear_oneshot(self.sysroot)

    def _mark_volume(self, ctx: _Context) -> bool:
        if ctx.target.volume is None:
            return False
        return volumekey.mark_image(self.sysroot, ctx.target, ctx.uuid)

    def _unmark_volume(self, ctx: _Context) -> Any:
        if ctx.target.volume is None:
            return False
        return volumekey.unmark_image(self.sysroot, ctx.target)

    # Stop user space first, at a clean point, then the filesystems: a task that writes to
    # a frozen filesystem sleeps where no freezer can stop it, and the kernel's freezer at
    # the jump would give up. Logs are held from here on (journald is stopped too), and no
    # bytecode is written (an import would block).
    def _hold_logs(self, ctx: _Context) -> None:
        ctx.held.hold()

    def _release_logs(self, ctx: _Context) -> None:
        ctx.held.release()

    def _no_bytecode(self, ctx: _Context) -> None:
        ctx.bytecode_was = sys.dont_write_bytecode
        sys.dont_write_bytecode = True

    def _bytecode(self, ctx: _Context) -> None:
        sys.dont_write_bytecode = ctx.bytecode_was

    def _start_guard(self, ctx: _Context) -> None:
        # thaws on its own if this process dies or stays frozen past the bound
        ctx.guard = freezeguard.start(self.sysroot, self.frozen_bound())

    def _stop_guard(self, ctx: _Context) -> None:
        ctx.guard.stop()
        taskfreeze.clear_state(self.sysroot)

    def _freeze_tasks(self, ctx: _Context) -> None:
        out = ctx.out
        ctx.tasks = taskfreeze.TaskFreezer(self.sysroot, ctx.record)
        frep = ctx.timed("cgroup freeze", lambda: ctx.tasks.freeze(self.config.timeout_freeze))
        out.stats.update(tasks_frozen_cgroups=len(frep.frozen), tasks_parked=frep.parked)
        if frep.left_running:
            out.stats["tasks_left_running"] = frep.left_running
        if frep.note:
            log.warning("%s", frep.note)
        log.info(
            "user space stopped: %d cgroup(s) frozen, %d process(es) parked in %s",
            len(frep.frozen),
            frep.parked,
            frep.cgroup_root or "-",
        )

    def _thaw_tasks(self, ctx: _Context) -> list[str]:
        return [] if ctx.tasks is None else ctx.tasks.thaw()

    def _freeze_filesystems(self, ctx: _Context) -> None:
        sr = self.sysroot
        mounts = fsfreeze.freezable(mountinfo.parse(sr.read_text("/proc/self/mountinfo")))
        # maps of the filesystems on device-mapper, read (dmsetup) before anything is frozen
        maps = ctx.timed(
            "stacked maps",
            lambda: {m.devno: blockmap.stacked_map(sr, fsfreeze.device_of(sr, m)) for m in mounts},
        )

        def before_fifreeze(m: Mount) -> None:
            ctx.record.mounts.append((m.mountpoint, m.devno, m.fstype))
            taskfreeze.write_state(sr, ctx.record)

        ctx.timed(
            "sync + FIFREEZE",
            lambda: fsfreeze.freeze(
                sr, mounts, on_frozen=ctx.frozen.append, before_freeze=before_fifreeze
            ),
        )
        ctx.out.stats["frozen"] = [m.mountpoint for m in ctx.frozen]
        ctx.stamps = ctx.timed(
            "stamps", lambda: [self._stamp(m, maps.get(m.devno)) for m in ctx.frozen]
        )

    def _thaw_filesystems(self, ctx: _Context) -> list[str]:
        errors = fsfreeze.thaw(self.sysroot, ctx.frozen)
        ctx.record.mounts.clear()
        taskfreeze.write_state(self.sysroot, ctx.record)
        return errors

    def _make_job(self, ctx: _Context, park: int = 0) -> Job:
        sr, cfg = self.sysroot, self.config
        area, target = ctx.area, ctx.target
        zeroed, why_zeroed = kexec.free_pages_zeroed(sr)
        if not park and ctx.answer is None:
            try:
                ctx.answer = AnswerPage(sr)
                ctx.undo.push("answer page", ctx.answer.close)
            except KjumpError as e:
                log.info("%s", e.message)
        log.info(
            "free pages %s on restore: %s",
            "come back as zeros" if zeroed else "are left as they are found",
            why_zeroed,
        )
        return Job(
            target_uuid=ctx.uuid,
            superblock_device_offset=target.superblock_offset,
            device_hint={"devno": target.disk_devno, "name": target.disk.rsplit("/", 1)[-1]},
            blockmap=[tuple(e) for e in target.blockmap],  # type: ignore[misc]
            ranges=list(ctx.memory.ranges),
            mode=ctx.mode,
            compression=cfg.compression,
            chunk_size=cfg.chunk_size,
            main_kernel=kexec.main_kernel_identity(sr),
            save_kernel_hash=f"sha256:{ctx.plan.kernel_sha256}",
            jump_area=(area.start, area.size),
            fs_stamps=ctx.stamps,
            created=int(time.time()),
            cancel_key=cfg.cancel_key,
            vmcoreinfo=kexec.vmcoreinfo_location(sr),
            free_page_exclusion=self._free_pages_out(),
            free_page_check=cfg.free_page_check,
            free_pages_zeroed=zeroed,
            ram_map=ctx.memory.ram_map.to_dict() if ctx.memory.ram_map else None,
            **(ctx.plan.encryption.job_fields() if ctx.plan.encryption else {}),
            finish=FINISH_IN_B.get(ctx.mode, "jump-back")
            if cfg.finish_in_save_kernel
            else "jump-back",
            park=park,
            answer=ctx.answer.job_field() if ctx.answer is not None else None,
            volume={**target.volume.to_dict(), "key": ctx.volume_key.hex()}
            if target.volume is not None
            else None,
        )

    def _load(self, ctx: _Context) -> bool:
        job = self._make_job(ctx)
        if not ctx.cold_reason:
            try:
                self._hand_over(ctx, job)
                return False  # B stays loaded and parked whatever happens next
            except KjumpError as e:
                ctx.cold_reason = f"the job could not be handed over: {e.message}"
                self.warm.drop(ctx.cold_reason)
                log.warning("save kernel: cold (%s)", ctx.cold_reason)
                self._stage_initrd_now(ctx)
        self._load_cold(ctx, job)
        return True

    def _load_cold(self, ctx: _Context, job: Job) -> None:
        sr, cfg, out, area = self.sysroot, self.config, ctx.out, ctx.area
        out.stats.update(save_kernel="cold", save_kernel_cold=ctx.cold_reason)
        ctx.timed("initrd copy wait", ctx.stager.result)
        ctx.steps["initrd copy (thread)"] = ctx.stager.seconds
        initrd = ctx.timed("initrd job", lambda: kexec.finish_initrd(sr, job))
        window = ctx.timed(
            "kexec load",
            lambda: ctx.kx.load(sr, cfg.save_kernel, initrd, ctx.b_cmdline, area),
        )
        out.stats["load_window"] = [window[0], window[1]]
        if ctx.kx.cleared is not None:
            out.stats["area_cleared"] = ctx.kx.cleared.describe()

    def _hand_over(self, ctx: _Context, job: Job) -> None:
        """The job for the parked save kernel: into locked pages of this process, their
        place into the target's job slot (kjumpd.daemon.warm)."""
        data = job.to_json().encode()
        ctx.mailbox = box = warm.Mailbox(data, self.sysroot)
        ctx.undo.push("job mailbox", box.close)
        ctx.slot = slot = jobslot.JobSlot.job(self.warm.next_generation(), data, box.runs())
        ctx.timed("job slot", lambda: self._write_slot(ctx.target, slot))
        ctx.out.stats["save_kernel"] = "warm"
        log.info("job handed to the parked save kernel: %s", ctx.slot.describe())

    def _forget_save_kernel_files(self) -> None:
        """Once the kernel holds its copy of B: drop the initrd in /run and the page cache
        of B's files (what stays in A's memory is saved in the image)."""
        kexec.remove_initrd(self.sysroot)
        for path in (self.config.save_kernel, self.config.save_initramfs):
            pagecache.forget(self.sysroot.path(path))

    def _unload(self, ctx: _Context) -> None:
        ctx.kx.unload()

    def _drop_copies(self, ctx: _Context) -> None:
        sr = self.sysroot
        if ctx.cold_reason:  # a parked save kernel: nothing was read or copied
            self._forget_save_kernel_files()
        # kexec's exit just freed its copies of the kernel and the initramfs, onto the
        # per-CPU free lists, which B cannot tell from memory in use: hand them back to
        # the buddy allocator, so that B leaves them out (shrink.drain_pcp)
        drained = ctx.timed("per-CPU lists", lambda: shrink.drain_pcp(sr))
        log.info("%s", drained)

    def _jump_and_return(self, ctx: _Context) -> None:
        """The jump, and what the image header says once this kernel runs again."""
        out, target = ctx.out, ctx.target
        ctx.phase("jump", 50)
        before = self._header_seq(target)
        warm_jump = ctx.slot is not None and not ctx.cold_reason
        if warm_jump:
            self._check_mailbox(ctx)
        if ctx.answer is not None:
            ctx.answer.reset()
        klog = kmsg.KernelLog(self.sysroot).open()
        try:
            rc, said = ctx.kx.jump()
            logged = klog.read()
        finally:
            klog.close()
        out.stats["kexec_rc"] = rc
        ctx.phase("return", 90)
        header = ctx.timed("header read", lambda: self._read_header(target))
        if before is not None and header.seq == before:
            if warm_jump and kmsg.freezer_failure(logged) is None:
                self._cold_retry(ctx, self._why_not_taken(ctx))
                return
            said_b = ctx.answer.read() if ctx.answer is not None else None
            if said_b is not None:  # B ran, and could not even write the image header
                raise AgentError(
                    f"the save kernel could not save: {said_b.what}",
                    why=said_b.why,
                    fix=(f"{said_b.fix}; " if said_b.fix else "")
                    + "the image was not touched, the system was rolled back and keeps running",
                )
            raise _jump_failure(rc, said, logged, klog.error)
        out.image_state = header.state.name
        out.stats.update(
            raw_bytes=header.raw_bytes,
            stored_bytes=header.stored_bytes,
            zero_pages=header.zero_pages,
            chunks=header.chunk_count,
            # B's own clock (WRITING -> SAVED): A's monotonic clock stops
            # during the jump, so durations["jump"] does not include B's time
            save_seconds=max(0.0, header.saved - header.created),
        )
        name = header.state.name
        if name == "RESTORING":
            ctx.timed("mark CONSUMED", lambda: self._set_state(target, "CONSUMED", ""))
            out.image_state = "CONSUMED"
            out.result, out.resumed = "resumed", True
        elif name == "SAVED":
            self._leave(ctx.mode, target, out)
        else:
            said_b = ctx.answer.read() if ctx.answer is not None else None
            why, fix = f"it left the image {header.state_text}", "see the save kernel's console"
            if said_b is not None:
                why += f": {said_b.what}" + (f" ({said_b.why})" if said_b.why else "")
                fix = said_b.fix or fix
            raise ImageStateError(
                "the save kernel did not save an image",
                why=why,
                fix=f"{fix}; the system was rolled back and keeps running",
                state=name,
            )

    # -- the parked save kernel (kjumpd.daemon.warm) ------------------------------------------
    def _check_mailbox(self, ctx: _Context) -> None:
        """Right before the jump: the job's pages are where the slot says (the kernel may
        have moved them since), or the slot is written again."""
        assert ctx.mailbox is not None and ctx.slot is not None
        runs = tuple(ctx.mailbox.runs())
        if runs != ctx.slot.runs:
            log.info("the job's pages moved; writing the job slot again")
            ctx.slot = replace(ctx.slot, runs=runs)
            self._write_slot(ctx.target, ctx.slot)

    def _why_not_taken(self, ctx: _Context) -> str:
        """Why the parked save kernel wrote no header for the job it was handed."""
        assert ctx.slot is not None
        try:
            slot = self._read_slot(ctx.target)
        except KjumpError as e:
            return f"its answer is unreadable ({e.message})"
        if (
            slot is not None
            and slot.kind is jobslot.SlotKind.REFUSED
            and slot.generation == ctx.slot.generation
        ):
            return f"it refused the job: {slot.reason}"
        return "it did not answer (its console says why)"

    def _cold_retry(self, ctx: _Context, why: str) -> None:
        """The parked save kernel did not take the job: load it cold and jump again."""
        ctx.cold_reason = f"the parked save kernel did not take the job: {why}"
        log.warning("save kernel: cold (%s); loading it and jumping again", ctx.cold_reason)
        self.warm.drop(ctx.cold_reason)
        ctx.slot = None
        self._stage_initrd_now(ctx)
        self._load_cold(ctx, self._make_job(ctx))
        ctx.undo.push("kexec unload", partial(self._unload, ctx))
        self._drop_copies(ctx)
        self._jump_and_return(ctx)

    def _keep_or_drop_parked(self, ctx: _Context) -> None:
        """After the jump came back: a save kernel that jumped back is parked and stays
        loaded for the next hibernation, when the system simply continued. After a resume
        the loaded image is not the one that restored, and after a wake from RAM its devices
        were powered down under it: it is dropped, and a new one warmed up later."""
        if not self.config.warm_save_kernel or ctx.fingerprint is None:
            return
        if ctx.out.result == "continued":
            if ctx.cold_reason and "#" not in ctx.b_cmdline:
                # its jump back swaps A's entry page: it would refuse every job
                self.warm.drop("the save kernel's command line lacks the main kernel's RAM")
                return
            if ctx.cold_reason:
                self.warm.park(ctx.fingerprint, 0, "after a save")
                ctx.undo.stack = [(n, f) for n, f in ctx.undo.stack if n != "kexec unload"]
            log.info("the save kernel stays loaded and parked for the next hibernation")
            return
        self.warm.drop(f"the system {ctx.out.result.replace('-', ' ')}")
        self._rewarm = True

    def _write_slot(self, target: blockmap.Target, slot: jobslot.JobSlot) -> None:
        dev = self._open(target, writable=True)
        try:
            jobslot.write_slot(dev, slot)
        finally:
            dev.close()

    def _read_slot(self, target: blockmap.Target) -> jobslot.JobSlot | None:
        dev = self._open(target, writable=False)
        try:
            return jobslot.read_slot(dev)
        finally:
            dev.close()

    def warm_up(self) -> str:
        """Boot the save kernel now and park it (kjumpd.daemon.warm); "" when it parked,
        else why not (logged). The system pauses for the save kernel's boot."""
        if not self.config.warm_save_kernel:
            return "[save_kernel] warm is off"
        if not self.sysroot.is_real:
            return "not this machine's system tree"
        if not self._lock.acquire(blocking=False):
            return "a hibernation is running"
        self.warm.warming = True
        self._tell_save_kernel()
        try:
            why = self._warm_up()
        finally:
            self.warm.warming = False
            self._lock.release()
        if why:
            self.warm.drop(f"the warm-up failed: {why}")
            log.warning("save kernel not parked: %s; hibernations load it cold", why)
            self.events.log(f"save kernel not parked: {why}")
        self._tell_save_kernel()
        # the warm-up's work (the plan, the job, kexec's output) is freed now; the daemon
        # idles until the next request, which trims again before anything is saved
        log.info("after the warm-up, %s", shrink.trim_own_heap())
        return why

    def _warm_up(self) -> str:
        sr, cfg = self.sysroot, self.config
        ctx = _Context(cfg.mode, threading.Event(), NullEvents())
        t0 = time.monotonic()
        loaded = parked = False
        locked = keymem.lock()  # the volume key passes through the heap and the initrd
        try:
            self._preflight(ctx)
            assert ctx.fingerprint is not None
            self._warm_tried = ctx.fingerprint
            if not jobslot.slot_free(len(ctx.target.blockmap)):
                return f"the target's block map has {len(ctx.target.blockmap)} extents: no job slot"
            generation = time.time_ns()
            job = self._make_job(ctx, park=generation)
            initrd = kexec.write_initrd(
                sr, cfg.save_initramfs, job, ctx.plan.initramfs_sha256 or ""
            )
            ctx.kx.load(sr, cfg.save_kernel, initrd, ctx.b_cmdline, ctx.area)
            loaded = True
            self._forget_save_kernel_files()  # they would only end up in images
            self._quiesce(ctx)
            try:
                os.sync()  # B has no business with A's filesystems; a hang costs a reset
                warm.begin_marker(sr)
                rc, said = ctx.kx.jump()
                warm.end_marker(sr)
            finally:
                errors = self._unquiesce(ctx) or []
                for e in errors:
                    log.error("warm-up: quiesce undo: %s", e)
            slot = self._read_slot(ctx.target)
            if (
                slot is None
                or slot.kind is not jobslot.SlotKind.PARKED
                or slot.generation != generation
            ):
                return (
                    "the save kernel did not answer PARKED (job slot: "
                    f"{slot.describe() if slot else 'empty'}; kexec -e: {said or rc}); "
                    "its console says why"
                )
            self.warm.park(ctx.fingerprint, generation, "warm-up")
            parked = True
            took = time.monotonic() - t0
            log.info("save kernel parked in %.1f s (generation %d)", took, generation)
            self.events.log(f"save kernel parked in {took:.1f} s")
            return ""
        except (KjumpError, OSError) as e:
            return e.message if isinstance(e, KjumpError) else f"{e.strerror or e}"
        finally:
            kexec.remove_initrd(sr)
            if loaded and not parked:
                try:
                    ctx.kx.unload()
                except KjumpError as e:
                    log.error("warm-up: %s", e.message)
            if locked:
                keymem.unlock()

    # -- helpers ----------------------------------------------------------------------------
    def _stamp(self, m: fsfreeze.Mount, stacked: blockmap.StackedMap | None) -> dict[str, Any]:
        """A frozen filesystem's stamp; on a stacked device with its map onto the disk, and
        below dm-crypt with the CRCs of its ciphertext (R reads the disk without a key)."""
        device = fsfreeze.device_of(self.sysroot, m)
        if stacked is None:
            return fsstamp.read_stamp(device, sysroot=self.sysroot).to_dict()
        if stacked.crypt:
            return fsstamp.read_stamp_sealed(
                device, stacked.disk, stacked.extents, sysroot=self.sysroot
            ).to_dict()
        st = fsstamp.read_stamp(device, sysroot=self.sysroot)
        return replace(st, extents=stacked.extents).to_dict()

    def _open(self, target: blockmap.Target, writable: bool) -> Any:
        dev, _ = store.open_target(
            self.sysroot.path(target.disk),
            writable=writable,
            offset=target.superblock_offset,
            direct=True,
        )
        return dev

    def _read_header(self, target: blockmap.Target) -> Any:
        dev = self._open(target, writable=False)
        try:
            return store.read_header(dev)
        finally:
            dev.close()

    def _header_seq(self, target: blockmap.Target) -> int | None:
        """The header's sequence number before the jump (None when unreadable: B writes a
        new header anyway). Unchanged after the jump: B never wrote."""
        try:
            return int(self._read_header(target).seq)
        except KjumpError:
            return None

    def _set_state(self, target: blockmap.Target, state: str, reason: str) -> None:
        dev = self._open(target, writable=True)
        try:
            store.set_state(dev, ImageState[state], reason)
        finally:
            dev.close()

    def _invalidate(self, target: blockmap.Target, out: Outcome, reason: str) -> None:
        try:
            self._set_state(target, "INVALID", reason)
            out.image_state = "INVALID"
        except KjumpError as e:
            # the stale-image guard (filesystem stamps) still refuses this image once the
            # filesystems change; say loudly that it is still SAVED
            log.error("cannot invalidate the image after %s: %s", reason, e.message)
            out.undo_errors.append(f"invalidate: {e.message}")

    def _leave(self, mode: str, target: blockmap.Target, out: Outcome) -> None:
        sr, cfg = self.sysroot, self.config
        if mode == "test":
            self._invalidate(target, out, "test mode")
            out.result = "continued"
            return
        if mode == "checkpoint":
            out.result = "continued"
            return
        try:
            if mode == "platform":
                platform.enter_s4(sr, self.settle)
            elif mode == "shutdown":
                platform.power_off(sr, self.settle)
            elif mode == "reboot":
                platform.reboot(sr, self.settle)
            elif mode == "suspend":
                platform.suspend_to_both(
                    sr, cfg.battery_floor_percent, cfg.battery_rearm_min_seconds, self.settle
                )
                self._invalidate(target, out, "woke from RAM")
                out.result = "woke-from-ram"
                return
        except KjumpError:
            self._invalidate(target, out, f"mode {mode} failed")
            raise


#: seconds after a resume before a new save kernel is warmed up: the system pauses for its
#: boot, which the user would feel right at the resume
REWARM_DELAY = 30.0

#: modes the save kernel ends itself once the image is SAVED (kjumpd.job: finish): A would
#: only power off or reboot after the jump back, and B's jump back and A's device resume
#: cost more than they do (docs/PERFORMANCE.md)
FINISH_IN_B = {"shutdown": "power-off", "reboot": "reboot"}

#: the transaction up to the jump, in order; the undo stack unwinds it in reverse
H = Hibernation
STEPS: tuple[Step, ...] = (
    Step("preflight", 0, "run dir", H._make_run_dir, H._remove_run_dir),
    Step("preflight", 0, "checks", H._preflight),
    Step("preflight", 0, "memory lock", H._lock_memory, H._unlock_memory),
    Step("preflight", 0, "volume key", H._derive_volume_key),
    Step("preflight", 0, "initrd", H._stage_initrd, H._remove_initrd, then_cancel=True),
    Step("announce", 5, "PrepareForSleep(false)", H._announce, H._unannounce),
    Step(
        "announce", 5, "hooks post", H._pre_hooks, H._post_hooks, undo_first=True, then_cancel=True
    ),
    Step("quiesce", 20, "quiesce", H._quiesce, H._unquiesce, undo_first=True, then_cancel=True),
    Step("boot entry", 25, "boot one-shot", H._arm_oneshot, H._disarm_oneshot),
    Step("boot entry", 25, "LUKS token", H._mark_volume, H._unmark_volume),
    Step("freeze tasks", 28, "logs", H._hold_logs, H._release_logs),
    Step("freeze tasks", 28, "bytecode", H._no_bytecode, H._bytecode),
    Step("freeze tasks", 28, "freeze guard", H._start_guard, H._stop_guard),
    Step("freeze tasks", 28, "thaw tasks", H._freeze_tasks, H._thaw_tasks, undo_first=True),
    # with user space frozen, what reclaim takes stays out of memory (a running task faults
    # its pages back in), as in the kernel's hibernation; filesystems are not frozen yet, so
    # reclaim and the hard limit's sync still write
    Step("shrink", 29, "shrink", H._shrink, then_cancel=True),
    Step(
        "freeze filesystems",
        30,
        "thaw",
        H._freeze_filesystems,
        H._thaw_filesystems,
        undo_first=True,
    ),
    Step("load", 40, "kexec unload", H._load, H._unload),
    Step("load", 40, "drop copies", H._drop_copies, then_cancel=True),
)


def _jump_failure(rc: int, said: str, logged: list[str], log_error: str) -> KjumpError:
    """The error for a ``kexec -e`` after which the image header is unchanged: the save
    kernel never wrote. The kernel's log says why when its freezer gave up."""
    failure = kmsg.freezer_failure(logged)
    kexec_said = said.strip().splitlines()[-1] if said.strip() else f"exit status {rc}"
    if failure is not None:
        return TaskFreezeError(
            "the kernel could not freeze user space for the jump",
            why=failure.summary(),
            fix="these tasks were not stopped by kjumpd's user-space freeze (kjumpctl check "
            "says whether it is available) or sleep uninterruptibly in the kernel; stop "
            "them or what they wait on, then retry. The system was rolled back and keeps "
            "running",
            kexec=kexec_said,
            tasks=", ".join(str(t) for t in failure.tasks),
        )
    tail = [
        kmsg.text_of(x).strip()
        for x in logged
        if "kexec" in x.lower() or "PM:" in x or "freez" in x.lower()
    ][-3:]
    return JumpError(
        "the jump to the save kernel did not happen",
        why=f"kexec -e: {kexec_said}"
        + (f"; kernel: {' | '.join(tail)}" if tail else "")
        + (f" ({log_error})" if log_error else ""),
        fix="see the kernel log (dmesg) around the jump; the image was not touched, the "
        "system was rolled back and keeps running",
        kexec_rc=rc,
    )


def _rmdir_if_empty(sr: Sysroot, p: str) -> None:
    try:
        sr.path(p).rmdir()
    except OSError:
        pass
