"""``kjump-agent boot``: what the save kernel's /init runs (B's whole userspace).

B's command line says what to do:

- ``kjump.watchdog=SECONDS`` (any role): arm the hardware watchdog (kjumpd.agent.watchdog);
  SECONDS without progress of the save or restore reset the machine. Stopped before any jump.

- ``kjump.role=save`` (+ ``kexec_jump_back_entry=0x...`` that kexec-tools appends for a
  preserve-context load): read the job (/kjump/job.json, appended to the initramfs by the
  daemon), find the target *by content* (magic + target UUID at the job's superblock device
  offset on every /sys/block disk, never by name), save A's memory ranges from /dev/mem
  through the image pipeline (header SAVED last), and jump back to A. A key pressed on the
  console (when the job allows it) cancels: header ABORTED(cancelled), jump back. Any failure:
  header ABORTED(reason) if the target was found, jump back; A reads the header and rolls back.
- ``kjump.role=restore`` (started by the restore-first environment R with a plain kexec load,
  after R wrote RESTORING): find the target (``kjump.target=UUID kjump.offset=BYTES`` on the
  command line, or the job), check and write every chunk back into A's memory through
  /dev/mem, holding A's pages that lie in B's own memory back as extra segments of the jump
  back, then jump to A's saved entry (from the header). A marks the image CONSUMED.
  An image not in state RESTORING is left alone; any failure after that check (metadata, a
  jump area or segment plan this kernel cannot honour, a bad chunk, an I/O error) marks it
  INVALID(reason), and /init reboots: R then boots the normal system.
- A job with ``park`` (kjumpd.daemon.warm: the warm-up): find the target, answer PARKED in
  its job slot (kjumpd.image.jobslot) and jump back without saving.
- If A jumps to B again after a jump back, B resumes (:class:`Parked`): it finds the target
  again (its disk works after the resume), and runs the job A left in the job slot, read from
  A's memory and checked against what B was started for; without a new job it jumps straight
  back, and a job it cannot run it answers REFUSED(reason) (A then loads B cold).

Every line for the user goes to the console (stdout) prefixed ``kjump-agent:``; logs go to
stderr (the same console here).
"""

from __future__ import annotations

# Start-up cost: this module is what B's /init runs, on the path the user waits on, where
# every imported module adds to the wait. Modules only some paths need are imported where
# they are used (argparse only for a command line other than /init's, threading/select for
# the cancel key, the job for the save role).
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kjumpd.answer import Answer
from kjumpd.errors import (
    AgentError,
    CancelledError,
    ImageAlteredError,
    ImageCorruptError,
    ImageFormatError,
    KjumpError,
    TargetError,
)
from kjumpd.image.store import find_target
from kjumpd.linux import cmdline
from kjumpd.sysroot import Sysroot

log = logging.getLogger("kjumpd.agent.kernel_role")

JOB_FILE = "/kjump/job.json"
#: the image key R hands to the restore role (hex), in an archive appended to the initramfs
RESTORE_KEY_FILE = "/kjump/restore-key"
#: the LUKS volume the target is inside, with its key (luks.keyed_to_dict), from R
RESTORE_VOLUME_FILE = "/kjump/restore-volume.json"
ROLES = ("save", "restore")
PAGE = 4096


def say(text: str) -> None:
    """A line on the console for whoever watches the save kernel."""
    print(f"kjump-agent: {text}", flush=True)


# ------------------------------------------------------------------------------------ pure


@dataclass(frozen=True)
class BootParams:
    role: str
    jump_back_entry: int | None = None
    target_uuid: str | None = None
    target_offset: int | None = None
    watchdog: int = 0  # seconds without progress before a reset; 0: no watchdog


def parse_cmdline(text: str) -> BootParams:
    """The agent's parameters from /proc/cmdline; AgentError names what is wrong."""
    kv = cmdline.params(text)
    role = kv.get("kjump.role")
    if role not in ROLES:
        raise AgentError(
            "this kernel was not started as kjumpd's save kernel",
            why=f"kjump.role={role!r} on its command line",
            fix="load it with kjump.role=save or kjump.role=restore",
        )

    def num(key: str) -> int | None:
        if key not in kv:
            return None
        try:
            value = int(kv[key], 0)
        except ValueError:
            raise AgentError(f"{key}={kv[key]!r} on the command line is not a number") from None
        if value < 0:
            raise AgentError(f"{key}={kv[key]!r} on the command line is negative")
        return value

    uuid = kv.get("kjump.target")
    if uuid is not None:
        uuid = uuid.lower()
    return BootParams(
        role=role,
        jump_back_entry=num("kexec_jump_back_entry"),
        target_uuid=uuid,
        target_offset=num("kjump.offset"),
        watchdog=num("kjump.watchdog") or 0,
    )


#: iomem names of what x86's kexec maps into the identity map of every jump (ACPI data)
IDENTITY_MAPPED = ("ACPI Tables", "ACPI Non-volatile Storage")


def entry_mapped(sysroot: Sysroot, entry: int) -> bool:
    """Whether A's entry page lies in this kernel's ACPI data (kjumpd.daemon.kexec:
    main_memory_words), which the kernel maps for the jump without a segment."""
    from kjumpd.linux import iomem

    page = entry - entry % PAGE
    ranges = iomem.top_level(sysroot.read_text(iomem.IOMEM, ""), IDENTITY_MAPPED)
    return any(a <= page and page + PAGE <= b for a, b in ranges)


def own_memory(sysroot: Sysroot) -> list[tuple[int, int]]:
    """B's own RAM, page aligned outward: where A's pages must not be written directly."""
    from kjumpd.linux import iomem

    ram = iomem.parse_system_ram(sysroot.read_text(iomem.IOMEM))
    if not ram or all(a == 0 and b == 1 for a, b in ram):
        raise AgentError(
            "cannot read this kernel's memory map",
            why="/proc/iomem shows no System RAM addresses (not root?)",
        )
    from kjumpd.agent.devmem import normalize

    return normalize([(a - a % PAGE, -(-b // PAGE) * PAGE) for a, b in ram])


def bounded_chunk_size(requested: int, mem_available: int, workers: int) -> int:
    """The job's chunk size, halved until the save pipeline's chunks in flight fit in half
    of the memory B has left (B lives in a 128 MiB jump area; 4 MiB chunks were OOM-killed
    there). About 2 * (2 * workers + 4) chunk-sized buffers are alive at once."""
    from kjumpd.job import MAX_CHUNK_SIZE

    per_chunk = 2 * (2 * max(workers, 1) + 4)
    size = min(requested, MAX_CHUNK_SIZE)  # a job may ask for more (format allows 64 MiB)
    while size > 64 * 1024 and per_chunk * size > mem_available // 2:
        size //= 2
    return size


def mem_available(sysroot: Sysroot) -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 when unknown)."""
    for line in sysroot.read_text("/proc/meminfo", "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def check_restore_fits(
    ranges: Sequence[tuple[int, int]], own: Sequence[tuple[int, int]], jump_area: tuple[int, int]
) -> list[tuple[int, int]]:
    """Refuse (AgentError) a restore this kernel cannot finish, before any byte is written:
    it must run in the image's jump area, no saved range may lie in that area, and A's pages
    in this kernel's other memory must fit the jump-back segments. Returns those pages' runs."""
    from kjumpd.agent.devmem import normalize, subtract
    from kjumpd.agent.jumpback import KEXEC_SEGMENT_MAX

    start, size = jump_area
    area = (start, start + size)
    # this kernel's RAM is the low memory (< 1 MiB) plus pieces of the jump area (its own
    # memory map may mark a page or two of the area reserved: containment, not equality)
    inside = [r for r in own if area[0] <= r[0] and r[1] <= area[1]]
    stray = [r for r in own if r[1] > 1 << 20 and r not in inside]
    if size and (not inside or stray):
        raise AgentError(
            "this restore kernel does not run in the image's jump area",
            why=f"the image was saved with the jump area [{area[0]:#x}, "
            f"{area[1]:#x}); this kernel runs in " + ", ".join(f"[{a:#x}, {b:#x})" for a, b in own),
            fix="load the restore kernel with the memmap= of the saved jump area",
        )
    low = subtract(own, [area]) if size else list(own)
    inside_area = subtract(ranges, subtract(ranges, [area])) if size else []
    if inside_area:
        raise AgentError(
            "the image holds memory inside the jump area",
            why=f"{len(inside_area)} saved range(s) overlap [{area[0]:#x}, {area[1]:#x})",
            fix="the image cannot be restored; boot normally",
        )
    held = normalize(subtract(ranges, subtract(ranges, low)))
    if len(held) > KEXEC_SEGMENT_MAX - 1:
        raise AgentError(
            "too many pieces of the main kernel's memory lie in this kernel's own low memory",
            why=f"{len(held)} runs, at most {KEXEC_SEGMENT_MAX - 1}",
            fix="the image cannot be restored; boot normally",
        )
    return held


# ------------------------------------------------------------------------------ target


# ----------------------------------------------------------------------------- console


class CancelKey:
    """Watches the console (stdin) for a key press in a thread; ``pressed`` becomes true."""

    def __init__(self, fd: int = 0) -> None:
        import threading

        self.fd = fd
        self.pressed = threading.Event()
        self._stop = threading.Event()
        self._saved: Any = None
        self._thread: Any = None  # threading.Thread

    def start(self) -> CancelKey:
        try:
            import termios
            import tty

            if os.isatty(self.fd):
                self._saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd)
                termios.tcflush(self.fd, termios.TCIFLUSH)
        except (OSError, ImportError) as e:
            log.info("console: no cbreak mode (%s)", e)
        import threading

        self._thread = threading.Thread(target=self._watch, name="cancel-key", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        import select

        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if ready and os.read(self.fd, 64):
                    self.pressed.set()
                    return
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
        if self._saved is not None:
            import termios

            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            except OSError:
                pass

    def check(self) -> None:
        if self.pressed.is_set():
            raise CancelledError(
                "the save was cancelled",
                why="a key was pressed on the console",
                fix="nothing to do: the system resumes as it was",
            )


class Progress:
    """Console progress lines: the first call, then at most one per ``every`` seconds, and
    100 %; tells the watchdog when ``done`` advanced (a meter called while waiting does not
    count). The first line does not wait on the clock: a kernel booted less than ``every``
    seconds ago would otherwise start its meter silently."""

    def __init__(self, verb: str, total: int, every: float = 1.0, watchdog: Any = None) -> None:
        self.verb, self.total, self.every = verb, max(total, 1), every
        self.t0 = time.monotonic()
        self.last: float | None = None
        self.done = -1
        self.watchdog = watchdog

    def __call__(self, done: int, *_: Any, **__: Any) -> None:
        if done > self.done:
            self.done = done
            if self.watchdog is not None:
                self.watchdog.progress()
        now = time.monotonic()
        if self.last is None or now - self.last >= self.every or done >= self.total:
            self.last = now
            dt = max(now - self.t0, 1e-6)
            say(
                f"{self.verb} {100 * done // self.total:3d}%  "
                f"{done >> 20} of {self.total >> 20} MiB"
                f"  {done / dt / 1e6:.0f} MB/s"
            )


# ---------------------------------------------------------------------------- the roles


def jump_back(
    sysroot: Sysroot,
    entry: int,
    held: Sequence[Any] = (),
    on_resume: Callable[[], None] | None = None,
    watchdog: Any = None,
) -> None:
    """Load the jump back and jump. If A jumps to B again, B resumes here and jumps back
    with the *same* loaded image: a preserve-context jump swaps each segment's source page
    with its destination, and B's return path swapped them back. For a save, the segment
    is B's anchor page when A's entry page is mapped anyway (kjumpd.agent.jumpback: a
    segment on A's entry page would show this kernel a stale page after a resume);
    otherwise, and for a restore, it is A's entry page as read now."""
    from kjumpd.agent import jumpback
    from kjumpd.agent.devmem import MemorySource

    segs = [jumpback.Segment(h.mem, h.data) for h in held]
    plan = None
    if not segs and entry_mapped(sysroot, entry):
        try:
            plan = jumpback.plan_segments(entry, None, [jumpback.anchor()], entry_mapped=True)
        except KjumpError as e:
            say(f"jump back without the anchor page ({e.message})")
    if plan is None:
        with MemorySource(sysroot) as src:
            page_bytes = src.read(jumpback.entry_page(entry), PAGE)
        plan = jumpback.plan_segments(entry, page_bytes, segs)
    jumpback.load(entry, plan)
    if watchdog is not None:
        watchdog.disarm()  # A must not inherit a running timer
        say("watchdog stopped")
    while True:
        say(f"jumping back to the main kernel at {entry:#x} ({len(plan)} segment(s))")
        jumpback.execute()
        # A jumped here again: a parked save kernel (Parked.on_resume takes its next job)
        if on_resume is None:
            say("the main kernel jumped here again; jumping back")
            continue
        try:
            on_resume()
        except (KjumpError, OSError) as e:
            say(f"after the resume: {e}")
        except Exception as e:  # noqa: BLE001 - any bug must still end in the jump back
            log.debug("resume handler crashed", exc_info=True)
            say(f"after the resume: crashed: {type(e).__name__}: {e}")


def _find(sysroot: Sysroot, uuid: str, offset: int, volume: Any = None) -> str:
    """The target's device; inside a LUKS volume ((Volume, key)), in the mapping of it
    built first."""
    if volume is not None:
        from kjumpd.linux import luks

        vol, key = volume
        node = luks.open_mapping(sysroot, vol, key)
        say(f"LUKS volume {vol.uuid} mapped at {node}")
    return find_target(sysroot, uuid, offset)


def _open_target(
    sysroot: Sysroot, uuid: str, offset: int, volume: Any = None, announce: bool = True
) -> tuple[Any, Any, str]:
    """(device, superblock, device path) of the target, open for writing."""
    from kjumpd.image import store

    dev_path = _find(sysroot, uuid, offset, volume)
    dev, sb = store.open_target(sysroot.path(dev_path), writable=True, offset=offset)
    if announce:
        say(f"target {uuid} found on {dev_path} at byte {offset}")
    return dev, sb, dev_path


def run_save(sysroot: Sysroot, params: BootParams, watchdog: Any = None) -> int:
    if not params.jump_back_entry:
        raise AgentError(
            "no kexec_jump_back_entry= on the command line",
            why="the save kernel was not loaded with kexec --load-preserve-context",
            fix="let kjumpd load the save kernel",
        )
    entry = params.jump_back_entry
    parked = Parked(sysroot, params, entry)
    job = None
    try:
        from kjumpd.job import Job

        job = Job.from_json(sysroot.path(JOB_FILE).read_bytes())
    except OSError as e:
        say(
            f"save failed: cannot read the job {JOB_FILE}: {e.strerror or e} (the daemon "
            "appends it to the initramfs at load time)"
        )
        _abort(None, "")
    except KjumpError as e:
        say(f"save failed: {e.message}")
        _abort(None, "")
    if job is not None and job.park:
        parked.park(job)
    elif job is not None:
        finish = save_job(sysroot, job, entry, watchdog)
        parked.base = job
        if finish != "jump-back":
            finish_here(finish)  # returns only when the kernel could not do it
    jump_back(sysroot, entry, on_resume=parked.on_resume, watchdog=watchdog)
    return 0


def save_job(sysroot: Sysroot, job: Any, entry: int, watchdog: Any = None) -> str:
    """Save A's memory as ``job`` says; returns what to do once SAVED (the job's finish, or
    "jump-back" when the save did not complete: the image is then ABORTED when the target
    was found, and A rolls back)."""
    dev = None
    started = False
    finish = "jump-back"  # the job's, once the image is SAVED
    cancel: CancelKey | None = None
    try:
        from kjumpd.agent.devmem import MemorySource
        from kjumpd.image import save
        from kjumpd.job import image_key_bytes, volume_of

        dev, sb, _path = _open_target(
            sysroot, job.target_uuid, job.superblock_device_offset, volume_of(job)
        )
        recorded = [(e.logical, e.device_offset, e.length) for e in sb.blockmap]
        if recorded != [tuple(e) for e in job.blockmap]:
            raise TargetError(
                "the target's block map differs from the job's",
                why="the superblock was rewritten after the job was made",
                fix="hibernate again",
            )
        # an image this kernel could not restore later is not worth writing
        check_restore_fits(job.ranges, own_memory(sysroot), tuple(job.jump_area))
        if job.cancel_key:
            cancel = CancelKey().start()
            say("press any key on this console to cancel the save")
        total = sum(e - s for s, e in job.ranges)
        workers = save.default_workers()
        avail = mem_available(sysroot)
        chunk = bounded_chunk_size(job.chunk_size, avail, workers) if avail else job.chunk_size
        say(
            f"saving {total >> 20} MiB of the main kernel's memory ({len(job.ranges)} ranges, "
            f"{job.compression}{', AES-256-GCM' if job.image_key else ''}, "
            f"{chunk >> 10} KiB chunks, {workers} CPU(s), {avail >> 20} MiB free here)"
        )
        with MemorySource(sysroot, job.ranges) as raw_source:
            freemap = free_pages(job, raw_source, own_memory(sysroot), avail, watchdog)
            if watchdog is not None:
                watchdog.progress()  # the scan is a phase of its own, with no meter
            source: Any = raw_source
            if freemap is not None:
                from kjumpd.agent.freepages import FreeMaskedSource

                source = FreeMaskedSource(raw_source, freemap, restore_zeros=job.free_pages_zeroed)
            started = True  # from here the pipeline marks the image ABORTED itself on errors
            stats = save.save_image(
                source,
                job.ranges,
                dev,
                identity=_identity(job, entry),
                mode=job.mode,
                chunk_size=chunk,
                workers=workers,
                compression=job.compression,
                progress=Progress("saving", total, watchdog=watchdog),
                cancel=cancel.pressed if cancel is not None else None,
                key=image_key_bytes(job),
            )
            finish = job.finish
        free = freemap.free_bytes if freemap is not None else 0
        # "N MiB of memory" is what was read from A (free pages are not read); bench/vm.py
        # parses "SAVED: N MiB of memory, M MiB written"
        say(
            f"SAVED: {(stats.raw_bytes - free) >> 20} MiB of memory, {stats.stored_bytes >> 20} "
            f"MiB written, {stats.zero_pages} zero pages skipped ({free // PAGE} of them free "
            f"in the main kernel, not read), in {stats.seconds:.2f} s "
            f"({stats.mb_per_s:.0f} MB/s, verify {stats.verify_seconds:.2f} s)"
        )
        if freemap is not None:
            say(
                "free chunks: "
                + (
                    "all-zero records, restored as zeros (A has init_on_free)"
                    if job.free_pages_zeroed
                    else "free records, left as they are found on restore"
                )
            )
        classes = getattr(source, "classes", None)  # kjumpd.agent.pageclass (a diagnostic)
        if classes is not None:
            say(classes.summary())
            say(classes.largest_zero_runs())
    except KjumpError as e:
        say(f"save {'cancelled' if isinstance(e, CancelledError) else 'failed'}: {e.message}")
        if not started:
            _abort(dev, e.what[:200])
        leave_answer(sysroot, job, Answer(e.what, e.why, e.fix))
    except Exception as e:  # noqa: BLE001 - any bug must still end in the jump back
        log.debug("save crashed", exc_info=True)
        say(f"save crashed: {type(e).__name__}: {e}")
        _abort(dev, f"agent crashed: {type(e).__name__}")
        leave_answer(
            sysroot,
            job,
            Answer(f"the save agent crashed: {type(e).__name__}", str(e), "report this bug"),
        )
    finally:
        if cancel is not None:
            cancel.stop()
        if dev is not None:
            dev.close()
    return finish


class Parked:
    """What a save kernel keeps between A's jumps: the job it was booted with (the target,
    the jump area and the save kernel it may serve) and the last job-slot generation it
    saw. After a jump back, A's next jump resumes it in :meth:`on_resume`, which takes the
    job A left in its job slot (kjumpd.image.jobslot), or jumps back at once without one."""

    def __init__(self, sysroot: Sysroot, params: BootParams, entry: int) -> None:
        self.sysroot, self.params, self.entry = sysroot, params, entry
        self.base: Any = None  # kjumpd.job.Job
        self.generation = 0
        #: A's entry page is mapped without a segment: an image saved after a resume holds
        #: A's live entry page (kjumpd.agent.jumpback)
        self.fresh_entry = entry_mapped(sysroot, entry)

    def _open(self) -> tuple[Any, Any, str]:
        from kjumpd.job import volume_of

        job = self.base
        return _open_target(
            self.sysroot,
            job.target_uuid,
            job.superblock_device_offset,
            volume_of(job),
            announce=False,
        )

    def park(self, job: Any) -> None:
        """The warm-up: find the target and answer PARKED(job.park) in its job slot."""
        from kjumpd.image import jobslot

        self.base, self.generation = job, job.park
        try:
            if not self.fresh_entry:
                raise AgentError(
                    "the main kernel's entry page is not mapped for the jump back",
                    why="this kernel's memory map does not show the main kernel's RAM as "
                    "ACPI data: a job taken after a resume would save a stale entry page",
                    fix="load the save kernel with kjumpd's command line",
                )
            dev, sb, path = self._open()
            with dev:
                if not jobslot.slot_free(len(sb.blockmap)):
                    raise TargetError(
                        "the target has no job slot",
                        why=f"its block map has {len(sb.blockmap)} extents, more than "
                        f"{jobslot.MAX_SLOT_EXTENTS}",
                        fix="the save kernel is loaded cold at each hibernation",
                    )
                jobslot.write_slot(dev, jobslot.JobSlot(jobslot.SlotKind.PARKED, job.park))
            say(
                f"parked: target {job.target_uuid} on {path}; waiting for a job (generation "
                f"above {job.park})"
            )
        except (KjumpError, OSError) as e:
            self.base = None
            say(f"warm-up failed: {e}; the main kernel loads the save kernel cold")

    def on_resume(self) -> None:
        """A jumped here again: run the job in the slot, if it holds a new one."""
        from kjumpd.image import jobslot, store

        say("the main kernel jumped here again")
        if self.base is None:
            say("no target to take a job from; jumping back")
            return
        try:
            dev, sb, path = self._open()
        except (KjumpError, OSError) as e:
            say(f"target not found after the resume ({e}); jumping back")
            return
        job = None
        with dev:
            try:
                slot = jobslot.read_slot(dev) if jobslot.slot_free(len(sb.blockmap)) else None
            except KjumpError as e:
                say(f"job slot unreadable ({e.message})")
                slot = None
            state = store.read_header(dev).state_text
            if (
                slot is None
                or slot.kind is not jobslot.SlotKind.JOB
                or slot.generation <= self.generation
            ):
                say(
                    f"after the resume: {path} readable, image {state}; no new job in the job "
                    f"slot ({slot.describe() if slot else 'empty'}); jumping back"
                )
                return
            self.generation = slot.generation
            try:
                job = self._take(slot)
            except KjumpError as e:
                say(f"job {slot.generation} refused: {e.message}")
                jobslot.write_slot(dev, jobslot.JobSlot.refused(slot.generation, e.what))
                return
        say(f"taking job {slot.generation} from the job slot: mode {job.mode}")
        wd = None
        if self.params.watchdog:
            from kjumpd.agent import watchdog

            wd = watchdog.start(self.sysroot, self.params.watchdog, say)
        try:
            finish = save_job(self.sysroot, job, self.entry, wd)
        finally:
            if wd is not None:
                wd.disarm()
                say("watchdog stopped")
        if finish != "jump-back":
            finish_here(finish)

    def _take(self, slot: Any) -> Any:
        """The job the slot points at, read from A's memory and checked against what this
        kernel was booted for (JobError / ImageCorruptError / AgentError)."""
        from kjumpd.agent.devmem import MemorySource
        from kjumpd.image import jobslot
        from kjumpd.job import Job

        if not self.fresh_entry:
            raise AgentError(
                "this save kernel jumps back through a segment on the main kernel's entry "
                "page: an image it saved now would hold a stale copy of that page",
                fix="nothing to do: the main kernel loads the save kernel again",
            )
        with MemorySource(self.sysroot) as src:
            data = jobslot.job_bytes(slot, src.read)
        job = Job.from_json(data)
        base = self.base
        for name in ("target_uuid", "superblock_device_offset", "jump_area", "save_kernel_hash"):
            if getattr(job, name) != getattr(base, name):
                raise AgentError(
                    f"the job's {name.replace('_', ' ')} is not the one this save kernel "
                    "was started for",
                    why=f"{getattr(job, name)!r}, not {getattr(base, name)!r}",
                    fix="nothing to do: the main kernel loads the save kernel again",
                )
        if (job.volume or {}).get("uuid") != (base.volume or {}).get("uuid"):
            raise AgentError(
                "the job's LUKS volume is not the one this save kernel was started for",
                fix="nothing to do: the main kernel loads the save kernel again",
            )
        return job


#: reboot(2) commands B may finish a mode with
_REBOOT_CMDS = {"power-off": 0x4321FEDC, "reboot": 0x01234567}


def finish_here(finish: str) -> None:
    """End the mode in B once the image is SAVED: power off or reboot without the jump back
    (A's devices stay quiesced, A's filesystems frozen and synced; B's own writes were
    flushed before SAVED). The watchdog stays armed: a power-off that hangs resets the
    machine, and R restores the image. Returns only when reboot(2) failed: the caller jumps
    back and A finishes the mode itself."""
    import ctypes

    say(f"image SAVED; {finish.replace('-', ' ')} here, without the jump back (job: finish)")
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(ctypes.c_int(_REBOOT_CMDS[finish]))
    say(f"{finish} failed (errno {ctypes.get_errno()}); jumping back: the main kernel does it")


def free_pages(
    job: Any,
    source: Any,
    own: Sequence[tuple[int, int]],
    mem_available: int = 0,
    watchdog: Any = None,
) -> Any:
    """A's free pages (kjumpd.agent.freepages.FreePageMap) to leave out of the image, or None
    to save every page: exclusion switched off, no vmcoreinfo in the job, anything the scan
    does not trust, or (when the job asks for the debug check) a free page that is not zero.
    B's own memory (``own``) is never called free: /dev/mem shows B's bytes there, not A's.
    The map takes a bounded share of the ``mem_available`` bytes free in B; each batch of
    struct pages scanned is progress for the ``watchdog``."""
    from kjumpd.agent import freepages

    if not job.free_page_exclusion:
        say("free pages: exclusion switched off in the job; saving every page")
        return None
    if job.vmcoreinfo is None:
        say("free pages: the job has no vmcoreinfo address; saving every page")
        return None
    t0 = time.monotonic()
    max_runs = freepages.max_runs_for(mem_available)
    progress = watchdog.progress if watchdog is not None else None
    try:
        phys, size = job.vmcoreinfo
        info = freepages.read_vmcoreinfo(source.read, phys, size)
        release = job.main_kernel.get("release", "")
        if release and info.osrelease != release:
            raise freepages.FreePageError(
                "A's VMCOREINFO is not the main kernel's",
                why=f"OSRELEASE {info.osrelease!r}, the job says {release!r}",
            )
        fmap = freepages.scan(
            info,
            source.read,
            job.ranges,
            exclude=own,
            note=(phys, size),
            max_runs=max_runs,
            advanced=progress,
            # the pool's free huge pages are not zeroed by init_on_free: the check would
            # call them a failure
            hugetlb=not job.free_page_check,
        )
    except KjumpError as e:
        say(f"free pages: not excluded ({e.message}); saving every page")
        return None
    except Exception as e:  # noqa: BLE001 - a scan bug must fall back to saving every page
        log.debug("free-page scan crashed", exc_info=True)
        say(f"free pages: not excluded (scan crashed: {type(e).__name__}: {e}); saving every page")
        return None
    dt = time.monotonic() - t0
    say(
        f"free pages: {fmap.free_pages} ({fmap.free_bytes >> 20} MiB) of A's memory skipped "
        f"({fmap.blocks} free blocks, scan {dt:.2f} s)"
    )
    if fmap.hugetlb_bytes:
        say(
            f"free pages: {fmap.hugetlb_bytes >> 20} MiB of them are free huge pages "
            "of A's pool (vm.nr_hugepages)"
        )
    if fmap.unmapped_bytes:
        room = (max_runs or 0) * freepages.RUN_BYTES >> 20
        left = fmap.unmapped_bytes
        say(
            f"free pages: {left // freepages.PAGE} more ({left >> 20} MiB) "
            f"saved as data: the map of A's free memory is kept within {room} MiB, "
            f"1/{freepages.MAP_SHARE} of the memory free here"
        )
    if job.free_page_check:
        chk = freepages.check_free_pages_zero(source.read, fmap, advanced=progress)
        if not chk.passed:
            say(
                f"free-page check: FAIL: {chk.nonzero_pages} of {chk.pages} free pages hold "
                f"data (first at {chk.first_nonzero:#x}); saving every page"
            )
            return None
        say(f"free-page check: PASS: all {chk.pages} free pages read as zero ({chk.seconds:.2f} s)")
    return fmap


def leave_answer(sysroot: Sysroot, job: Any, said: Answer) -> None:
    """Write ``said`` into the answer page the job names (kjumpd.answer), only over A's
    blank record of this job's nonce, and never into this kernel's own memory. Best effort:
    the console has the same words."""
    if job is None or job.answer is None:
        return
    from kjumpd import answer
    from kjumpd.agent.devmem import MemorySink, MemorySource

    phys, nonce_hex = job.answer
    nonce = bytes.fromhex(nonce_hex)
    if any(s < phys + answer.PAGE and phys < e for s, e in own_memory(sysroot)):
        say(f"the answer page {phys:#x} lies in this kernel's memory: not written")
        return
    try:
        with MemorySource(sysroot, job.ranges) as src:
            found = src.read(phys, answer.PAGE)
        if not answer.is_blank(found, nonce):
            say(f"the answer page {phys:#x} no longer holds this job's blank record: not written")
            return
        with MemorySink(sysroot, job.ranges) as sink:
            sink.write(phys, answer.answered(nonce, said))
        say(f"the main kernel's answer page {phys:#x} says why")
    except (KjumpError, OSError) as e:
        say(f"could not leave the main kernel an answer: {e}")


def _abort(dev: Any, reason: str) -> None:
    from kjumpd.image import store
    from kjumpd.image.format import ImageState

    if dev is None:
        say("no target opened: the main kernel sees no new image and rolls back")
        return
    try:
        store.set_state(dev, ImageState.ABORTED, reason=reason)
        say(f"image marked ABORTED({reason})")
    except KjumpError as e:
        say(f"could not mark the image ABORTED: {e.message}")


def _identity(job: Any, entry: int) -> dict[str, Any]:
    """What the image records about this save (kjumpd.image.save reads jump_area,
    jump_back_entry, main_kernel and save_kernel_hash into the header)."""
    return {
        "jump_area": list(job.jump_area),
        "jump_back_entry": entry,
        "main_kernel": f"{job.main_kernel['release']} {job.main_kernel['build_id']}".strip(),
        "save_kernel_hash": job.save_kernel_hash,
        "fs_stamps": job.fs_stamps,
        "main_kernel_ids": job.main_kernel,
        "created": job.created,
        "target_uuid": job.target_uuid,
        "ram_map": job.ram_map,
        **({"seal": job.seal} if job.seal is not None else {}),
    }


def restore_key(sysroot: Sysroot) -> bytes:
    """The image key R unsealed and appended to this initramfs (RESTORE_KEY_FILE)."""
    try:
        text = sysroot.path(RESTORE_KEY_FILE).read_text().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError) as e:
        raise AgentError(
            "the image is encrypted and no image key came with this kernel",
            why=f"{RESTORE_KEY_FILE}: {e}",
            fix="restore through the restore-first environment, which unseals the key",
        ) from None
    if len(key) != 32:
        raise AgentError(f"{RESTORE_KEY_FILE} holds {len(key)} bytes, not an image key")
    return key


def restore_volume(sysroot: Sysroot) -> Any:
    """(Volume, key) of the LUKS volume R unlocked and appended to this initramfs
    (RESTORE_VOLUME_FILE), or None when the target is not inside one."""
    from kjumpd.linux import luks

    path = sysroot.path(RESTORE_VOLUME_FILE)
    if not path.exists():
        return None
    try:
        return luks.keyed_from_dict(json.loads(path.read_bytes()))
    except (OSError, ValueError, KjumpError) as e:
        raise AgentError(
            "the LUKS volume R handed over cannot be read",
            why=f"{RESTORE_VOLUME_FILE}: {e}",
            fix="restore through the restore-first environment, which unlocks the volume",
        ) from None


def run_restore(sysroot: Sysroot, params: BootParams, watchdog: Any = None) -> int:
    from kjumpd.image import store
    from kjumpd.image.format import ImageState

    uuid, offset = params.target_uuid, params.target_offset
    volume = restore_volume(sysroot)
    if uuid is None or offset is None:
        try:
            from kjumpd.job import Job, volume_of

            job = Job.from_json(sysroot.path(JOB_FILE).read_bytes())
            uuid, offset = job.target_uuid, job.superblock_device_offset
            volume = volume or volume_of(job)
        except OSError:
            raise AgentError(
                "the restore role needs the target",
                why="no kjump.target=/kjump.offset= on the command line and no job",
                fix="the restore-first environment passes both",
            ) from None
    dev, _sb, _path = _open_target(sysroot, uuid, offset, volume)
    try:
        header = store.read_header(dev)
        store.require_state(header, ImageState.RESTORING, action="restore")
        held = restore_memory(
            sysroot, dev, header, restore_key(sysroot) if header.encrypted else None, watchdog
        )
        entry = header.jump_back_entry
    finally:
        dev.close()
    jump_back(sysroot, entry, held, watchdog=watchdog)
    return 0


def restore_memory(
    sysroot: Sysroot,
    dev: Any,
    header: Any,
    key: bytes | None,
    watchdog: Any = None,
    refused_as: str = "restore failed",
) -> list[Any]:
    """Write the image in state RESTORING on ``dev`` back into A's memory from this kernel,
    which must run in the image's jump area (check_restore_fits); returns A's pages held
    back for the jump (this kernel's own memory). Any failure marks the image INVALID and
    raises: A's memory may be partly overwritten, it cannot be resumed from here on. Run by
    B in restore role, and by the restore-first environment when it is confined to the area
    (kjumpd.confine). ``refused_as`` begins the INVALID reason of an image found corrupt
    (a record or the checksum over them): the restore-first environment, which skipped its
    walk of the records to restore them itself, says "corrupt" as that walk would have. An
    encrypted record that does not authenticate is "altered" in either role, as R calls an
    altered header."""
    from kjumpd.agent.devmem import MemorySink
    from kjumpd.image import restore, store
    from kjumpd.image.format import ImageState

    try:
        meta = store.read_metadata(dev, header)
        ranges = [(e.start, e.end) for e in meta.extents]
        mine = own_memory(sysroot)
        check_restore_fits(ranges, mine, (header.jump_area_start, header.jump_area_size))
        say(
            f"restoring {header.raw_bytes >> 20} MiB (attempt {header.attempt}); this kernel "
            f"runs in {', '.join(f'[{a:#x}, {b:#x})' for a, b in mine)}"
        )
        progress = Progress("restoring", header.raw_bytes, watchdog=watchdog)
        t0 = time.monotonic()
        with MemorySink(sysroot, ranges, hold=mine) as sink:
            # the sink itself holds back writes into this kernel's own memory
            rstats = restore.restore_image(
                dev, sink, progress=progress, states=(ImageState.RESTORING,), key=key
            )
            sink.flush()
            held = sink.held_segments()
        dt = time.monotonic() - t0
    except (KjumpError, OSError) as e:
        what = e.what if isinstance(e, KjumpError) else f"{type(e).__name__}: {e}"
        say(f"restore failed: {e.message if isinstance(e, KjumpError) else what}")
        try:
            if isinstance(e, ImageAlteredError):
                prefix = "altered"
            elif isinstance(e, (ImageCorruptError, ImageFormatError)):
                prefix = refused_as
            else:
                prefix = "restore failed"
            store.set_state(dev, ImageState.INVALID, reason=f"{prefix}: {what}"[:200])
            say("image marked INVALID; rebooting into the normal system")
        except KjumpError as e2:
            say(f"could not mark the image INVALID: {e2.message}")
        if isinstance(e, KjumpError):
            raise
        raise AgentError(
            "restore failed", why=what, fix="the image is marked INVALID; the normal system boots"
        ) from None
    say(
        f"RESTORED {header.raw_bytes >> 20} MiB in {dt:.2f} s "
        f"({header.raw_bytes / max(dt, 1e-6) / 1e6:.0f} MB/s); "
        f"{int(rstats.stages.get('free_left', 0)) >> 20} MiB of free memory left as it was; "
        f"{sum(len(h.data) for h in held) >> 10} KiB held for the jump back"
    )
    return held


def rescue(sysroot: Sysroot = Sysroot()) -> int:
    """/init's fallback when the agent died (e.g. OOM-killed) in the save role: mark the image
    ABORTED if the target can be found, and jump back so the main kernel rolls back."""
    params = parse_cmdline(sysroot.read_text("/proc/cmdline"))
    if params.role != "save" or not params.jump_back_entry:
        say("rescue: nothing to jump back to")
        return 1
    say("rescue: the agent died; aborting the save and jumping back")
    from kjumpd.agent import watchdog

    watchdog.stop_any(sysroot)  # the dead agent's timer runs on without its feeder
    dev = None
    try:
        from kjumpd.image import store
        from kjumpd.job import Job, volume_of

        job = Job.from_json(sysroot.path(JOB_FILE).read_bytes())
        where = _find(sysroot, job.target_uuid, job.superblock_device_offset, volume_of(job))
        dev, _sb = store.open_target(
            sysroot.path(where),
            writable=True,
            offset=job.superblock_device_offset,
        )
    except (KjumpError, OSError) as e:
        say(f"rescue: target not opened ({e})")
    try:
        _abort(dev, "save agent died")
    finally:
        if dev is not None:
            dev.close()
    jump_back(sysroot, params.jump_back_entry)
    return 0


def boot(sysroot: Sysroot = Sysroot()) -> int:
    params = parse_cmdline(sysroot.read_text("/proc/cmdline"))
    say(
        f"save kernel up: role {params.role}"
        + (f", jump-back entry {params.jump_back_entry:#x}" if params.jump_back_entry else "")
    )
    wd = None
    if params.watchdog:
        from kjumpd.agent import watchdog

        wd = watchdog.start(sysroot, params.watchdog, say)
    if params.role == "save":
        return run_save(sysroot, params, wd)
    return run_restore(sysroot, params, wd)


#: the command lines B's /init runs (savekernel/initramfs.py), parsed without argparse
INIT_COMMANDS = {("boot",): False, ("boot", "--rescue"): True}


def main(argv: Sequence[str] | None = None) -> int:
    args = tuple(sys.argv[1:] if argv is None else argv)
    if args in INIT_COMMANDS:  # /init's own lines: skip importing argparse
        return _boot(INIT_COMMANDS[args], "/")
    import argparse

    parser = argparse.ArgumentParser(prog="kjump-agent", description="kjumpd's save-kernel agent")
    sub = parser.add_subparsers(dest="cmd", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def register(sub: Any) -> None:
    """Add ``boot`` to kjump-agent's subcommands."""
    import argparse

    p = sub.add_parser(
        "boot",
        help="run as the save kernel's userspace (/init): the role on "
        "/proc/cmdline (kjump.role=save|restore)",
    )
    p.add_argument("--sysroot", default="/", help=argparse.SUPPRESS)
    p.add_argument(
        "--rescue",
        action="store_true",
        help="only mark the image ABORTED and jump back (/init runs this if the agent died)",
    )
    p.set_defaults(func=_boot_cmd)


def _boot_cmd(args: Any) -> int:
    return _boot(args.rescue, args.sysroot)


def _boot(rescue_only: bool, sysroot: str) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="kjump-agent[%(levelname)s] %(name)s: %(message)s",
    )
    from kjumpd.image.heap import tune_heap

    tune_heap()  # reused chunk buffers: no page faults per chunk
    try:
        root = Sysroot(sysroot)
        return rescue(root) if rescue_only else boot(root)
    except KjumpError as e:
        say(f"error: {e.message}")
        return 1
    except Exception as e:  # noqa: BLE001 - one line for the console; details in the log
        log.debug("agent crashed", exc_info=True)
        say(f"error: the agent crashed: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
