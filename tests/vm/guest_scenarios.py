"""Guest side of the VM scenarios (inside the guest: ``python3 -m kjumpvm.guest_scenarios NAME``).

Each scenario drives the real product (kjumpctl → D-Bus → kjumpd) the way a user would, and
ends with exactly one ``KJUMP-VERDICT:`` line (see workload.py) that the host asserts on.
Milestones are printed as ``KJUMP-EVENT:`` lines (host timestamps make the timeline).

A scenario whose product pieces are not in the guest prints a FAIL verdict naming what is
missing (never a skip, never a pass).

Scenarios (the host side, test_scenarios.py, boots QEMU accordingly):
  test            a.  hibernate --mode test; workload intact, image written
  shutdown        b.  hibernate --mode shutdown; host restarts QEMU with R; workload continues,
                      CONSUMED
  platform        c.  hibernate --mode platform (ACPI S4); same as b
  suspend-wake    d1. hibernate --mode suspend; host wakes the guest from S3; image invalidated
  suspend-lost    d2. hibernate --mode suspend; host pulls the power in S3; restore from the image
  prepare         (vm-assets) `kjumpctl setup` once on the shared disk; a later boot of the
                      same command line (R booting the normal kernel) runs noimage
  noimage         e.  R found no image and booted the normal kernel: no restore happened
  rollback        f.  a kexec load refused (injected) → hibernate fails, full rollback
  checkpoint      g.  hibernate --mode checkpoint: the image stays SAVED, the system goes on
  killed          h.  kjumpd SIGKILLed inside the frozen window (by PID 1): the freeze guard
                      thaws; the writers go on and nothing committed is lost
  The kjumpd scenarios a-c, f-h run two disk writers beside the workload (writers.py).
  swsusp          bench: the kernel's own hibernation (echo disk > /sys/power/state)
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

try:  # in the guest the package is kjumpvm; on the host tests.vm
    from kjumpvm import workload as wl
    from kjumpvm import writers
    from kjumpvm.vminit import KILLED_MARK, cmdline_arg, event, say
except ImportError:  # pragma: no cover - host-side import for linting/tests
    from tests.vm import workload as wl  # type: ignore[no-redef]
    from tests.vm import writers  # type: ignore[no-redef]
    from tests.vm.vminit import KILLED_MARK, cmdline_arg, event, say  # type: ignore[no-redef]

KJUMPCTL = "/usr/local/bin/kjumpctl"
RESULT_PREFIX = "KJUMP-RESULT:"
STATE_DIR = Path("/var/lib/kjumpvm")
PREPARED = STATE_DIR / "prepared"
#: written (fsync'd) right before a request whose machine the host may switch off: what a
#: later normal boot must find (the scenario, what the writers had committed, the image state)
PENDING = STATE_DIR / "pending.json"


class Missing(Exception):
    """A product piece the scenario needs is not in the guest (names it)."""


class Failure(Exception):
    """The product did something a user would notice as wrong."""


def kjumpctl(*args: str, timeout: float = 900.0) -> subprocess.CompletedProcess:
    if not os.path.exists(KJUMPCTL):
        raise Missing("kjumpctl is not installed in the guest")
    cmd = [KJUMPCTL, *args]
    say("$ " + " ".join(cmd))
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    for line in proc.stdout.splitlines():
        print(f"kjumpctl| {line}", flush=True)
    return proc


def require_command(name: str) -> None:
    """FAIL (not skip) when kjumpctl does not offer `name`."""
    proc = kjumpctl(name, "--help", timeout=120)
    if proc.returncode != 0:
        raise Missing(f"`kjumpctl {name}` is missing or broken: rc {proc.returncode}")


def wait_daemon(timeout: float = 180.0, supervised: bool = False) -> None:
    """kjumpd answers on the bus (kjumpctl status succeeds). Fail fast when it died, unless
    it is ``supervised``: then its supervisor restarts it, and between its death and the
    restart no kjumpd process exists at all."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = kjumpctl("status", timeout=60)
        if last.returncode == 0:
            return
        if not supervised and not daemon_alive():
            raise Missing("kjumpd exited at start (its log is on the console above)")
        time.sleep(0.5)  # each try is a kjumpctl start: seconds under TCG already
    tail = (last.stdout.strip().splitlines() or ["no output"])[-1] if last else "no output"
    raise Missing(f"kjumpd does not answer on the system bus: {tail}")


def wait_parked(timeout: float = 300.0) -> str:
    """With ``kjumpvm.warm=1``: wait until kjumpd says its save kernel is parked (the
    SaveKernel property), so that a measured hibernation does not include the warm-up;
    returns the property ("" without the option). Failure when it never parks."""
    if cmdline_arg("kjumpvm.warm") != "1":
        return ""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = str(daemon_status().get("SaveKernel", ""))
        if state.startswith("parked"):
            event("save-kernel-parked", state=state.replace(" ", "_"))
            return state
        if "warm-up failed" in state or "never came back" in state:
            raise Failure(f"kjumpd's save kernel did not park: {state}")
        time.sleep(1)
    raise Failure(f"kjumpd's save kernel is not parked after {timeout:.0f} s: {state}")


def daemon_status() -> dict:
    """kjumpd's D-Bus properties (kjumpctl status --json): ImageState, LastResult, ..."""
    proc = kjumpctl("status", "--json", timeout=120)
    if proc.returncode != 0:
        raise Missing(f"`kjumpctl status --json` failed (rc {proc.returncode})")
    try:
        return json.loads(proc.stdout[proc.stdout.index("{") :])
    except ValueError as err:
        raise Missing(f"`kjumpctl status --json` printed no JSON: {err}") from err


def image_state() -> str:
    """The image header's state as kjumpd reads it (O_DIRECT), e.g. CONSUMED, INVALID(test mode)."""
    return str(daemon_status().get("ImageState", "unknown"))


def daemon_alive() -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if b"/usr/local/bin/kjumpd" in open(f"/proc/{pid}/cmdline", "rb").read():
                    return True
            except OSError:
                continue
    return False


TARGET_SIZE = "1G"  # a 1 GiB guest: room for every page even uncompressed
GUEST_TARGET = "/var/lib/kjumpd/image"  # guest-kjumpd.toml [target] path
RESTORE_KERNEL = "/usr/lib/kjumpd/restore/vmlinuz"
RESTORE_INITRD = "/usr/lib/kjumpd/restore/initrd.img"


def setup_target(size: str = TARGET_SIZE) -> None:
    """`kjumpctl setup` as an administrator runs it once: the image target, then the
    restore-first boot entry (the host boots every time what that entry names)."""
    require_command("setup")
    proc = kjumpctl("setup", "--size", size, "--yes", timeout=900)
    if proc.returncode != 0:
        raise Missing(
            f"`kjumpctl setup --size {size}` failed (rc {proc.returncode}): "
            + (proc.stdout.strip().splitlines() or [""])[-1]
        )
    install_restore_entry(RESTORE_INITRD)
    os.sync()
    event("setup-done")


def install_restore_entry(initrd: str) -> None:
    """`kjumpctl setup --bootloader restore-first` with R's generic initramfs ``initrd``,
    then what update-grub does."""
    proc = kjumpctl(
        "setup",
        "--bootloader",
        "restore-first",
        "--restore-kernel",
        RESTORE_KERNEL,
        "--restore-initrd",
        initrd,
        "--yes",
        timeout=600,
    )
    if proc.returncode != 0:
        raise Missing(
            f"`kjumpctl setup --bootloader restore-first` failed (rc "
            f"{proc.returncode}): " + (proc.stdout.strip().splitlines() or [""])[-1]
        )
    for line in proc.stdout.splitlines():
        if line.startswith("restore: "):
            say(f"kjumpctl setup: {line}")
    report_cached(
        [RESTORE_KERNEL, initrd, "/boot/kjumpd/vmlinuz-restore", "/boot/kjumpd/initrd-restore.img"]
    )
    update_grub()


#: the save kernel's files where the guest's kjumpd finds them (its config's defaults)
SAVE_FILES = ("/usr/lib/kjumpd/save/bzImage", "/usr/lib/kjumpd/save/initramfs.cpio.gz")


def cached(paths: list[str]) -> tuple[int, int, int] | None:
    """How much of ``paths`` is in the page cache (``fincore``): bytes cached, bytes, files
    found; None (said on the console) when fincore fails."""
    present = [p for p in paths if Path(p).exists()]
    proc = subprocess.run(
        ["fincore", "-b", "-n", "-r", "-o", "RES,SIZE", *present],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        say(f"fincore: {proc.stderr.strip()}")
        return None
    rows = [ln.split() for ln in proc.stdout.splitlines() if len(ln.split()) == 2]
    return sum(int(r[0]) for r in rows), sum(int(r[1]) for r in rows), len(rows)


def report_cached(paths: list[str]) -> None:
    """How much of ``paths`` is in the page cache, on one console line: files kjumpd read or
    wrote for the boot loader that the next image would save."""
    found = cached(paths)
    if found is not None:
        print(f"KJUMP-CACHED: {found[0]} of {found[1]} bytes in {found[2]} boot files", flush=True)


GRUB_CFG = Path("/boot/grub/grub.cfg")


def update_grub() -> None:
    """What update-grub does for the restore-first entry: run /etc/grub.d/* into grub.cfg.
    The host (the VM's boot loader) boots the kjumpd-restore entry it finds there."""
    parts = sorted(p for p in Path("/etc/grub.d").iterdir() if os.access(p, os.X_OK))
    if not parts:
        raise Missing("`kjumpctl setup --bootloader` installed no /etc/grub.d snippet")
    text = ""
    for part in parts:
        proc = subprocess.run([str(part)], stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise Missing(f"{part} exited {proc.returncode} (as update-grub runs it)")
        text += proc.stdout
    GRUB_CFG.parent.mkdir(parents=True, exist_ok=True)
    GRUB_CFG.write_text(text)
    say(f"update-grub: {GRUB_CFG} written from {', '.join(p.name for p in parts)}")


def log_meminfo(label: str) -> None:
    """/proc/meminfo on one console line (kB), to compare what each hibernation had to save."""
    try:
        fields = [ln.split()[:2] for ln in Path("/proc/meminfo").read_text().splitlines()]
    except OSError as err:
        say(f"meminfo {label}: {err}")
        return
    print(
        f"KJUMP-MEMINFO: {label} "
        + " ".join(f"{f[0].rstrip(':')}={f[1]}" for f in fields if len(f) == 2),
        flush=True,
    )
    print(f"KJUMP-PROCS: {label} {top_processes()}", flush=True)


def top_processes(count: int = 8) -> str:
    """The processes holding the most memory, ``name:pid:anon+file`` (kB), largest first."""
    rows = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        st = {ln.split(":")[0]: ln.split(":", 1)[1].split() for ln in lines if ":" in ln}
        anon = int(st.get("RssAnon", ["0"])[0])
        file = int(st.get("RssFile", ["0"])[0])
        name = (st.get("Name") or ["?"])[0]
        rows.append((anon + file, f"{name}:{pid}:{anon}+{file}"))
    return " ".join(r for _n, r in sorted(rows, reverse=True)[:count])


def start_workload(size_mib: int = 200) -> tuple[subprocess.Popen, wl.Status]:
    proc = subprocess.Popen([sys.executable, "-m", "kjumpvm.workload", "serve", str(size_mib)])
    status = wl.wait_ready()
    event("workload-ready", pid=status.pid, size=status.size, mlocked=status.mlocked)
    return proc, status


def last_result(text: str) -> dict:
    """The LastResult record `kjumpctl hibernate --json` printed ({} when none)."""
    try:
        return json.loads(text[text.index("{") : text.rindex("}") + 1])
    except ValueError:
        return {}


def image_fields(record: dict) -> dict[str, str]:
    out = {}
    flat = {**record, **(record.get("stats") or {})}
    for key in ("result", "raw_bytes", "stored_bytes", "zero_pages"):
        if flat.get(key) not in (None, ""):
            out[key] = str(flat[key]).replace(" ", "_")
    return out


def outlive_save_kernel_watchdog(returned: float) -> dict[str, str]:
    """With ``kjumpvm.watchdog=SECONDS``: stay up until the save kernel's watchdog, had it
    been left running, would have reset this machine (two stages of its hardware timeout,
    kjumpd.agent.watchdog caps that at 30 s), so a verdict at all proves B stopped it."""
    words = [w for w in open("/proc/cmdline").read().split() if w.startswith("kjumpvm.watchdog=")]
    if not words:
        return {}
    from kjumpd.agent.watchdog import HARDWARE_TIMEOUT_MAX

    hardware = min(int(words[-1].split("=", 1)[1]), HARDWARE_TIMEOUT_MAX)
    wait = 2 * hardware + 5 - (time.monotonic() - returned)
    if wait > 0:
        time.sleep(wait)
    event("watchdog-outlived", seconds=f"{time.monotonic() - returned:.0f}")
    return {"watchdog": "stopped"}


def scenario_kaslr() -> int:
    """A booted as distributions boot it (KASLR on, a crashkernel= with no offset: the
    ranges form a kdump package writes): the scenario's verdict (after the restore) says
    where this boot put the kernel and the jump area; the hibernation itself is scenario b's."""
    cmdline = open("/proc/cmdline").read().split()
    iomem = open("/proc/iomem").read()

    def range_of(name: str) -> tuple[int, int] | None:
        m = re.search(rf"^\s*([0-9a-f]+)-([0-9a-f]+) : {name}$", iomem, re.M)
        return (int(m.group(1), 16), int(m.group(2), 16) + 1) if m else None

    def start_of(name: str) -> str:
        r = range_of(name)
        return f"{r[0]:#x}" if r else "none"

    area = range_of("Crash kernel")
    event(
        "kaslr-boot",
        kaslr="off" if "nokaslr" in cmdline else "on",
        kernel_code=start_of("Kernel code"),
        jump_area=start_of("Crash kernel"),
        jump_area_mib=(area[1] - area[0]) >> 20 if area else 0,
        crashkernel=next((w.split("=", 1)[1] for w in cmdline if w.startswith("crashkernel=")), ""),
    )
    return hibernate_and_check("kaslr", "shutdown", ("CONSUMED",), disk_writers=True)


def hibernate_and_check(
    name: str,
    mode: str,
    want_states: tuple[str, ...],
    inject: str | None = None,
    want_rc_ok: bool = True,
    want_written: bool = False,
    disk_writers: bool = False,
    after_boot: dict | None = None,
    prior: tuple[list[str], dict[str, str]] = ([], {}),
    post: Callable[[], tuple[list[str], dict[str, str]]] | None = None,
    want_error: str = "",
) -> int:
    """``prior``: problems and verdict fields of what the scenario did before (its set-up);
    ``post``: checks of the scenario's own after the resume (problems, verdict fields);
    ``want_error``: words the failed hibernation's error must hold (its real cause)."""
    problems: list[str] = list(prior[0])
    wbefore: dict = {}
    before = after = None
    expected = ""
    extra: dict[str, str] = dict(prior[1])
    record: dict = {}
    marker = STATE_DIR / f"{name}-started"
    try:
        wait_daemon()
        if marker.exists():
            # The normal kernel booted again with this scenario's command line: R (or the
            # power cycle) did not restore the image. Say what the image says, do not loop.
            raise Failure(
                f"the normal kernel booted again instead of a restore "
                f"(image {image_state()}; see the restore-first lines above)"
            )
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(time.time()))
        os.sync()
        require_prepared()
        swapon_from_cmdline()
        bench_target()
        anon, cache = bench_load()
        _proc, before = start_workload(anon)
        expected = wl.expected_digest(before.seed, before.size)
        fill_page_cache(cache)
        fragment_memory()
        huge = huge_pages()
        if disk_writers:
            writers.start()
            event("writers-ready")
        if inject == "kexec-refused":
            inject_kexec_refusal()
        log_meminfo(mode)
        if disk_writers:
            wbefore = writers.snapshot()  # what was committed when the user asked
        if after_boot is not None:
            write_pending(name, wbefore, after_boot)
        # with kjumpvm.warm=1: parked for this target (bench_target may have made a new one)
        parked = wait_parked()
        if parked:
            extra["save_kernel"] = parked.replace(" ", "_")
        devices = device_state()
        if cache:
            say(f"file set in the page cache at the request: {fileset_cached_mib()} MiB")
        event("hibernate-start", mode=mode)
        proc = kjumpctl("hibernate", "--mode", mode, "--json")
        event("hibernate-returned", rc=proc.returncode)
        returned = time.monotonic()
        extra["path"] = "resumed"
        PENDING.unlink(missing_ok=True)
        changed_devices = compare_devices(devices, device_state())
        problems += changed_devices
        extra["devices"] = f"{len(devices)}-same" if not changed_devices else "changed"
        record = last_result(proc.stdout)
        print(f"{RESULT_PREFIX} {json.dumps(record, sort_keys=True)}", flush=True)
        extra["rc"] = str(proc.returncode)
        if want_rc_ok and proc.returncode != 0:
            problems.append(
                f"kjumpctl hibernate --mode {mode} failed (rc {proc.returncode}): "
                + (proc.stdout.strip().splitlines() or [""])[-1]
            )
        if not want_rc_ok and proc.returncode == 0:
            problems.append("kjumpctl hibernate succeeded although a failure was injected")
        if want_error and want_error not in str(record.get("message", "")):
            problems.append(f"the error does not say {want_error!r}: {record.get('message', '')!r}")
        after = wl.query()
        # first, as swsusp's flow does: the writers' check below drops the page cache
        extra.update(time_to_warm())
        state = image_state()
        extra["image"] = state.replace(" ", "_")
        extra.update(image_fields(record))
        if want_written and not (record.get("stats") or {}).get("stored_bytes"):
            problems.append("no image was written (stored_bytes is 0 in the result)")
        if state.split("(")[0] not in want_states:
            problems.append(f"image is {state}, expected {'/'.join(want_states)}")
        if inject:
            problems += check_writable_filesystems()
        if disk_writers:
            wproblems, wfields = writers.check(wbefore)
            problems += wproblems
            extra.update(wfields)
        extra.update(outlive_save_kernel_watchdog(returned))
        if huge is not None:
            hproblems, hfields = huge()
            problems += hproblems
            extra.update(hfields)
        if post is not None:
            pproblems, pfields = post()
            problems += pproblems
            extra.update(pfields)
    except Missing as err:
        problems.append(f"missing: {err}")
    except Failure as err:
        problems.append(str(err))
    except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired) as err:
        problems.append(f"{type(err).__name__}: {err}")
    ok, line = wl.verdict(name, before, after, expected, extra, problems)
    print(line, flush=True)
    return 0 if ok else 1


def scenario_killed() -> int:
    """h. kjumpd is SIGKILLed inside its frozen window (user space and filesystems frozen,
    the save kernel being loaded) by PID 1, which the freeze never stops. Nothing of kjumpd
    is left to thaw but its freeze guard: the machine must become writable again, the
    writers go on, every committed record is on the disk."""
    problems: list[str] = []
    before = after = None
    expected = ""
    extra: dict[str, str] = {}
    try:
        wait_daemon()
        require_prepared()
        _proc, before = start_workload()
        expected = wl.expected_digest(before.seed, before.size)
        writers.start()
        event("writers-ready")
        wbefore = writers.snapshot()
        event("hibernate-start", mode="test")
        proc = kjumpctl("hibernate", "--mode", "test", "--json")
        event("hibernate-returned", rc=proc.returncode)
        extra["rc"] = str(proc.returncode)
        killed = KILLED_MARK.read_text().strip() if KILLED_MARK.exists() else ""
        extra["killed"] = killed.split()[0] if killed else "no"
        if not killed.startswith("frozen"):
            problems.append(
                f"PID 1 did not kill kjumpd inside the frozen window ({killed or 'no'})"
            )
        if proc.returncode not in (1, 4):
            problems.append(
                f"kjumpctl hibernate: rc {proc.returncode}, expected the daemon's "
                "death to be reported (4)"
            )
        problems += check_writable_filesystems(timeout=60)
        for path in (Path("/run/kjumpd/frozen.json"),):
            if path.exists():
                problems.append(f"{path} is still there after the guard's thaw")
        left = [str(p) for p in Path("/sys/fs/cgroup").rglob("kjumpd.freeze")]
        if left:
            problems.append(f"parking cgroups left behind: {left}")
        frozen = [
            str(p.parent)
            for p in Path("/sys/fs/cgroup").rglob("cgroup.freeze")
            if p.read_text().strip() == "1"
        ]
        if frozen:
            problems.append(f"cgroups still frozen: {frozen}")
        after = wl.query()
        wproblems, wfields = writers.check(wbefore)
        problems += wproblems
        extra.update(wfields)
    except Missing as err:
        problems.append(f"missing: {err}")
    except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired) as err:
        problems.append(f"{type(err).__name__}: {err}")
    ok, line = wl.verdict("killed", before, after, expected, extra, problems)
    print(line, flush=True)
    return 0 if ok else 1


#: the steps scenario i kills kjumpd at (its phases whose log line is not held back: from
#: the frozen window on, scenario h kills it); the words of kjumpvm.kill_daemon=steps:...
KILL_STEPS = ("preflight", "announce", "quiesce", "boot entry", "freeze tasks")
HOOK_DIR = Path("/etc/kjumpd/sleep.d")


def running(cmdline: str) -> bool:
    """A process whose /proc/PID/cmdline (NUL-separated) contains ``cmdline`` exists."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if cmdline.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    return True
            except OSError:
                continue
    return False


def leftovers() -> list[str]:
    """What a hibernation that did not happen must not leave behind, once kjumpd is back."""
    problems = check_writable_filesystems(timeout=60)
    for path in ("/run/kjumpd/frozen.json", "/run/kjumpd/quiesce.journal"):
        if Path(path).exists():
            problems.append(f"{path} is still there")
    if list(Path("/sys/fs/cgroup").rglob("kjumpd.freeze")):
        problems.append("a parking cgroup kjumpd.freeze is left")
    frozen = [
        str(p.parent)
        for p in Path("/sys/fs/cgroup").rglob("cgroup.freeze")
        if p.read_text().strip() == "1"
    ]
    if frozen:
        problems.append(f"cgroups still frozen: {frozen}")
    loaded = Path("/sys/kernel/kexec_loaded")
    if loaded.exists() and loaded.read_text().strip() != "0":
        problems.append("a kexec image is still loaded")
    grubenv = Path("/boot/grub/grubenv")
    if grubenv.exists() and "next_entry=kjumpd" in grubenv.read_text(errors="replace"):
        problems.append("the one-shot boot into the restore-first entry is still armed")
    return problems


def scenario_killed_steps() -> int:
    """i. kjumpd SIGKILLed at each step of the transaction before the frozen window (PID 1
    supervises it as systemd would: Restart= and ExecStopPost=kjumpd --recover): after
    each kill nothing is left quiesced, frozen, loaded or armed. Then a sleep hook that
    fails and one that hangs: each stops the hibernation with its name, and the hung hook
    is gone. Then a hibernation that works; the workload and the writers went on all along."""
    problems: list[str] = []
    before = after = None
    expected = ""
    extra: dict[str, str] = {}
    try:
        wait_daemon(supervised=True)
        require_prepared()
        _proc, before = start_workload()
        expected = wl.expected_digest(before.seed, before.size)
        writers.start()
        wbefore = writers.snapshot()
        killed = 0
        for step in KILL_STEPS:
            proc = kjumpctl("hibernate", "--mode", "test", "--json")
            marks = KILLED_MARK.read_text() if KILLED_MARK.exists() else ""
            if f"step={step.replace(' ', '-')} " not in marks:
                problems.append(f"PID 1 did not kill kjumpd at {step}")
                continue
            killed += 1
            if proc.returncode == 0:
                problems.append(f"kjumpctl hibernate succeeded although kjumpd died at {step}")
            wait_daemon(supervised=True)
            problems += [f"killed at {step}: {p}" for p in leftovers()]
        extra["killed"] = str(killed)
        HOOK_DIR.mkdir(parents=True, exist_ok=True)
        for name, body, want in (
            ("10-fails", 'test "$1" = pre && exit 3; exit 0', "10-fails"),
            ("10-hangs", 'test "$1" = pre && exec sleep 3600; exit 0', "10-hangs"),
        ):
            hook = HOOK_DIR / name
            hook.write_text(f"#!/bin/sh\n{body}\n")
            hook.chmod(0o755)
            proc = kjumpctl("hibernate", "--mode", "test", "--json")
            hook.unlink()
            record = last_result(proc.stdout)
            if proc.returncode == 0:
                problems.append(f"hook {name}: the hibernation went on")
            elif want not in json.dumps(record):
                problems.append(f"hook {name}: the error does not name it: {record.get('message')}")
            if name == "10-hangs" and running("sleep\x003600"):
                problems.append("the hung hook is still running")
            problems += [f"hook {name}: {p}" for p in leftovers()]
        extra["hooks"] = "refused"
        proc = kjumpctl("hibernate", "--mode", "test", "--json")
        extra["rc"] = str(proc.returncode)
        if proc.returncode != 0:
            problems.append(f"the hibernation after the faults failed (rc {proc.returncode})")
        state = image_state()
        extra["image"] = state.replace(" ", "_")
        if not state.startswith("INVALID"):
            problems.append(f"image is {state} after a test hibernation")
        after = wl.query()
        wproblems, wfields = writers.check(wbefore)
        problems += wproblems
        extra.update(wfields)
    except Missing as err:
        problems.append(f"missing: {err}")
    except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired) as err:
        problems.append(f"{type(err).__name__}: {err}")
    ok, line = wl.verdict("killed-steps", before, after, expected, extra, problems)
    print(line, flush=True)
    return 0 if ok else 1


KEXEC_REFUSER = Path("/usr/local/sbin/kexec")
REFUSER_SCRIPT = """#!/bin/sh
# kjumpvm fault injection (scenario f): the kernel refuses this kexec_load for real.
# kjumpd's preflight has passed by now (it checks kexec_load_disabled), the filesystems are
# frozen; flipping the one-way sysctl here makes the real kexec_load(2) fail with EPERM.
for a in "$@"; do
    case "$a" in -l|-c|-p|--load*) echo 1 > /proc/sys/kernel/kexec_load_disabled ;; esac
done
exec /usr/sbin/kexec "$@"
"""


def inject_kexec_refusal() -> None:
    """Make the kernel refuse kjumpd's load of the save kernel, after preflight and freeze.

    A kexec on PATH before /usr/sbin's sets kernel.kexec_load_disabled=1 (a one-way switch; the
    VM is disposable), then runs the real kexec-tools: the daemon sees a real EPERM from
    kexec_load(2) at its load step and must roll every step back."""
    if not os.path.exists("/proc/sys/kernel/kexec_load_disabled"):
        raise Missing("/proc/sys/kernel/kexec_load_disabled is not in this kernel")
    KEXEC_REFUSER.parent.mkdir(parents=True, exist_ok=True)
    KEXEC_REFUSER.write_text(REFUSER_SCRIPT)
    KEXEC_REFUSER.chmod(0o755)
    os.sync()
    event("inject", what="kexec_load_refused_at_load")


def check_writable_filesystems(timeout: float = 60.0) -> list[str]:
    """After a rollback every filesystem must accept writes again (thawed): a write and an
    fsync in a child process, which a frozen filesystem would block until ``timeout``."""
    probe = "/var/lib/kjumpvm/writable-probe"
    code = (
        f"import os; os.makedirs(os.path.dirname({probe!r}), exist_ok=True); "
        f"fd = os.open({probe!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC); "
        "os.write(fd, b'probe'); os.fsync(fd); os.close(fd); "
        f"os.unlink({probe!r})"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", code],
            timeout=timeout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    except subprocess.TimeoutExpired:
        return [f"root filesystem still frozen {timeout:g} s later (a write did not return)"]
    if r.returncode != 0:
        return [f"root filesystem not writable: {r.stdout.strip()[-200:]}"]
    return []


def daemon_resources() -> tuple[int, int]:
    """kjumpd's resident memory (KiB) and open file descriptors, as /proc shows them."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if b"/usr/local/bin/kjumpd" not in open(f"/proc/{pid}/cmdline", "rb").read():
                continue
            rss = next(
                int(ln.split()[1]) for ln in open(f"/proc/{pid}/status") if ln.startswith("VmRSS:")
            )
            return rss, len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration, ValueError):
            continue
    raise Missing("kjumpd is not running")


def scenario_soak() -> int:
    """`make soak`: N hibernate (mode shutdown) / restore cycles of one machine, the
    workload and the disk writers carrying on throughout (``kjumpvm.cycles=N`` on the
    command line). After each cycle: the image CONSUMED, the workload byte-exact, the
    writers intact and going on, and one ``KJUMP-SOAK:`` line with the cycle's result and
    the daemon's resident memory and open descriptors. A failed cycle is counted, and the
    soak goes on."""
    cycles = int(
        next(
            (
                w.split("=", 1)[1]
                for w in open("/proc/cmdline").read().split()
                if w.startswith("kjumpvm.cycles=")
            ),
            "50",
        )
    )
    problems: list[str] = []
    failures = 0
    before = after = None
    expected = ""
    extra: dict[str, str] = {}
    try:
        wait_daemon()
        require_prepared()
        _proc, before = start_workload()
        expected = wl.expected_digest(before.seed, before.size)
        writers.start()
        rss, fds = daemon_resources()
        print(f"KJUMP-SOAK: cycle=0 result=start rss_kib={rss} fds={fds}", flush=True)
        for i in range(1, cycles + 1):
            cycle: list[str] = []
            wbefore = writers.snapshot()
            event("hibernate-start", mode="shutdown", cycle=i)
            proc = kjumpctl("hibernate", "--mode", "shutdown", "--json")
            event("hibernate-returned", rc=proc.returncode, cycle=i)
            if proc.returncode != 0:
                cycle.append(f"rc {proc.returncode}")
            state = image_state()
            if state != "CONSUMED":
                cycle.append(f"image {state}")
            now = wl.query()
            if now.digest != expected or now.pid != before.pid:
                cycle.append("workload changed")
            wproblems, _f = writers.check(wbefore)
            cycle += wproblems
            rss, fds = daemon_resources()
            failures += bool(cycle)
            result = "ok" if not cycle else "fail:" + ";".join(cycle).replace(" ", "_")[:200]
            print(f"KJUMP-SOAK: cycle={i} result={result} rss_kib={rss} fds={fds}", flush=True)
        after = wl.query()
        extra.update(cycles=str(cycles), failures=str(failures))
        if failures:
            problems.append(f"{failures} of {cycles} cycles failed (KJUMP-SOAK lines above)")
    except Missing as err:
        problems.append(f"missing: {err}")
    except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired) as err:
        problems.append(f"{type(err).__name__}: {err}")
    ok, line = wl.verdict("soak", before, after, expected, extra, problems)
    print(line, flush=True)
    return 0 if ok else 1


def device_state() -> dict[str, str]:
    """What fwts' s4 test compares across a hibernation: each PCI function's configuration
    header (64 bytes, the status register's sticky error bits masked: they record events,
    not configuration) and each network link's state, by sysfs name."""
    out: dict[str, str] = {}
    for dev in sorted(Path("/sys/bus/pci/devices").glob("*")):
        try:
            head = bytearray((dev / "config").read_bytes()[:64])
        except OSError as err:
            out[f"pci {dev.name}"] = f"unreadable: {err.strerror}"
            continue
        if len(head) >= 8:
            head[6:8] = b"\0\0"
        out[f"pci {dev.name}"] = head.hex()
    for link in sorted(Path("/sys/class/net").glob("*")):
        state = []
        for attr in ("operstate", "carrier", "flags", "address"):
            try:
                state.append((link / attr).read_text().strip())
            except OSError:
                state.append("-")
        out[f"net {link.name}"] = " ".join(state)
    return out


def compare_devices(before: dict[str, str], after: dict[str, str]) -> list[str]:
    problems = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, "absent"), after.get(key, "absent")
        if a != b:
            problems.append(f"{key} changed across the hibernation: {a[:80]} -> {b[:80]}")
    return problems


def write_synced(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` durably: a power cut right after leaves one or the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    fd = os.open(tmp, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    tmp.rename(path)
    os.sync()


def write_pending(name: str, wbefore: dict, expect: dict) -> None:
    """Record, durably, what a normal boot after a lost power must find."""
    committed = {k: (v.committed if v is not None else 0) for k, v in wbefore.items()}
    write_synced(PENDING, json.dumps({"scenario": name, "committed": committed, "expect": expect}))


def scenario_after_power_loss() -> int:
    """The normal boot that follows a scenario whose power was cut (PENDING names it): R
    booted the normal kernel instead of restoring. What the pending record expects of the
    image holds (state, reason, R's note), and every record the writers had committed
    before the request is on the disk, whole and in order."""
    problems: list[str] = []
    pending = json.loads(PENDING.read_text())
    name = pending.get("scenario", "unknown")
    expect = pending.get("expect", {})
    extra: dict[str, str] = {"path": "normal-boot"}
    try:
        wait_daemon()
        state = image_state()
        extra["image"] = state.replace(" ", "_")
        states = expect.get("states", [])
        if state.split("(")[0] not in states:
            problems.append(f"image is {state}, expected {'/'.join(states) or 'a restore'}")
        reason = expect.get("reason")
        if reason and f"({reason}" not in state:
            problems.append(f"image reason is not {reason!r}: {state}")
        rf = [w for w in open("/proc/cmdline").read().split() if w.startswith("kjump.rf=")]
        extra["rf"] = rf[0].split("=", 1)[1] if rf else "none"
        want_rf = expect.get("rf")
        if want_rf and extra["rf"] != want_rf:
            problems.append(f"R's note is {extra['rf']}, expected {want_rf}")
        writers._drop_caches()
        for kind, check in (("sqlite", writers.check_sqlite), ("append", writers.check_append)):
            path = writers.DATA_DIR / ("db.sqlite" if kind == "sqlite" else "append.log")
            before = int(pending["committed"].get(kind, 0))
            p, got = check(path, before)
            problems += p
            extra[kind] = f"{before}->{got}"
            if before <= 0:
                problems.append(f"the {kind} writer had committed nothing before the request")
        extra["writers"] = "intact" if not problems else "damaged"
    except Missing as err:
        problems.append(f"missing: {err}")
    except (OSError, ValueError, RuntimeError, sqlite3.Error) as err:
        problems.append(f"{type(err).__name__}: {err}")
    word = "PASS" if not problems else "FAIL"
    line = f"KJUMP-VERDICT: {word} scenario={name} " + " ".join(
        f"{k}={v}" for k, v in extra.items()
    )
    if problems:
        line += ' reason="' + "; ".join(problems).replace('"', "'") + '"'
    print(line, flush=True)
    return 0 if not problems else 1


def require_prepared() -> None:
    if not PREPARED.exists():
        raise Missing(
            "this disk was not prepared (`kjumpctl setup` did not run: see vm-assets' prepare log)"
        )


def scenario_prepare() -> int:
    """Boot of the shared disk preparation (tests/vm/assets.py): `kjumpctl setup` once, as an
    administrator would, then power off. The prepared disk is the base of every scenario.

    When the marker is already there, this boot is the normal kernel started by R (whose
    boot.json carries the preparation boot's command line): scenario e's check runs."""
    if PREPARED.exists():
        return scenario_after_power_loss() if PENDING.exists() else scenario_noimage()
    try:
        wait_daemon()
        setup_target()
    except Missing as err:
        print(f'KJUMP-VERDICT: FAIL scenario=prepare reason="missing: {err}"', flush=True)
        return 1
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    PREPARED.write_text(open("/proc/sys/kernel/random/boot_id").read())
    os.sync()
    event("prepared")
    return 0


def _hibernate_test_mode(label: str) -> tuple[str, str]:
    """One hibernation in mode test; (save_kernel, save_kernel_cold) from its result."""
    event("hibernate-start", mode="test", step=label)
    proc = kjumpctl("hibernate", "--mode", "test", "--json")
    event("hibernate-returned", rc=proc.returncode, step=label)
    record = last_result(proc.stdout)
    stats = record.get("stats") or {}
    if proc.returncode != 0:
        raise Failure(f"{label}: kjumpctl hibernate --mode test failed (rc {proc.returncode})")
    return str(stats.get("save_kernel", "")), str(stats.get("save_kernel_cold", ""))


def scenario_warm() -> int:
    """[save_kernel] warm = true: the daemon boots the save kernel at its start and parks
    it. Test-mode hibernations then jump into the parked kernel; after `kexec -u` the next
    one loads it cold and says why, and that kernel stays parked; the shutdown hibernation
    runs warm, R restores it, and after the resume the daemon warms a new save kernel up,
    which the last test-mode hibernation uses."""
    problems: list[str] = []
    fields: dict[str, str] = {}
    marker = STATE_DIR / "warm-started"
    if not marker.exists():
        try:
            wait_daemon()
            fields["parked"] = wait_parked().replace(" ", "_")
            require_prepared()
            first = _hibernate_test_mode("first")
            second = _hibernate_test_mode("second")
            # the daemon's preflights (each hibernation's, the 30 s re-check) read the save
            # kernel's files and a warm hibernation reads them no more: cached, the next
            # image would save them
            found = cached(list(SAVE_FILES))
            if found is not None:
                fields.update(save_files_cached=str(found[0]), save_files_size=str(found[1]))
            subprocess.run(["kexec", "-u"], check=False)
            event("kexec-unloaded")
            unloaded = _hibernate_test_mode("after kexec -u")
            after_cold = _hibernate_test_mode("after the cold load")
            fields.update(
                first=first[0],
                second=second[0],
                unloaded=unloaded[0],
                after_cold=after_cold[0],
            )
            if first[0] != "warm" or second[0] != "warm" or after_cold[0] != "warm":
                problems.append(f"expected warm save kernels, got {first}, {second}, {after_cold}")
            if unloaded[0] != "cold" or "no kexec image" not in unloaded[1]:
                problems.append(f"after kexec -u: expected a cold load saying why, got {unloaded}")
        except (Missing, Failure) as err:
            problems.append(str(err))

    def after() -> tuple[list[str], dict[str, str]]:
        # kjumpd warms a new save kernel up REWARM_DELAY seconds after the resume
        parked = wait_parked()
        kind, why = _hibernate_test_mode("after the resume")
        bad = [] if kind == "warm" else [f"after the resume: {kind} ({why}), not warm"]
        return bad, {"after_resume": kind, "parked_again": parked.replace(" ", "_")}

    return hibernate_and_check(
        "warm",
        "shutdown",
        ("CONSUMED",),
        disk_writers=True,
        prior=(problems, fields),
        post=after,
    )


def scenario_noimage() -> int:
    """e. A normal boot that R started because there was no image: no restore happened, the
    image is not SAVED/RESTORING, and the daemon answers."""
    problems: list[str] = []
    extra: dict[str, str] = {}
    try:
        wait_daemon()
        state = image_state()
        extra["image"] = state.replace(" ", "_")
        if state.split("(")[0] not in ("EMPTY", "CONSUMED", "INVALID", "ABORTED"):
            problems.append(f"image is {state} after a normal boot")
        if open("/proc/sys/kernel/random/boot_id").read() == PREPARED.read_text():
            problems.append("same boot id as the preparation boot: no reboot happened")
        # the host booted R, not this kernel: reaching this init at all means R chose
        # "boot the normal kernel"; R's note (kjump.rf=) is reported when it gave one
        rf = [w for w in open("/proc/cmdline").read().split() if w.startswith("kjump.rf=")]
        extra["rf"] = rf[0].split("=", 1)[1] if rf else "none"
        extra["stage"] = "2"
    except Missing as err:
        problems.append(f"missing: {err}")
    except OSError as err:
        problems.append(f"{type(err).__name__}: {err}")
    print(
        (
            "KJUMP-VERDICT: PASS scenario=noimage "
            if not problems
            else "KJUMP-VERDICT: FAIL scenario=noimage "
        )
        + " ".join(f"{k}={v}" for k, v in extra.items())
        + ("" if not problems else ' reason="' + "; ".join(problems).replace('"', "'") + '"'),
        flush=True,
    )
    return 0 if not problems else 1


def swapon_from_cmdline() -> None:
    """bench: ``kjumpvm.swap=DEV`` on the command line makes DEV swap before the workload
    starts, as in swsusp's run (the same VM: a swap disk the kernel may reclaim to)."""
    dev = cmdline_arg("kjumpvm.swap")
    if dev:
        swapon(dev)


def swapon(dev: str) -> None:
    if subprocess.run(["mkswap", dev], stdout=subprocess.DEVNULL).returncode != 0:
        raise Missing(f"mkswap {dev} failed (the bench attaches a swap disk)")
    if subprocess.run(["swapon", dev]).returncode != 0:
        raise Missing(f"swapon {dev} failed")


#: bench-vm's file set: the files a machine had open, in the page cache at the hibernation
FILESET = STATE_DIR / "fileset"
FILESET_FILE = 16 << 20


def bench_load() -> tuple[int, int]:
    """bench-vm's load, ``kjumpvm.load=ANON:CACHE`` (MiB; default 200:0): the workload's
    anonymous memory (incompressible, mlock'd) and a file set read into the page cache
    beside it."""
    word = cmdline_arg("kjumpvm.load") or "200:0"
    anon, _, cache = word.partition(":")
    try:
        return int(anon), int(cache or 0)
    except ValueError:
        raise Missing(f"kjumpvm.load={word!r}: ANON:CACHE in MiB, e.g. 1024:512") from None


#: the fragmenter (kjumpvm.fragment=MIB): MIB of anonymous memory touched page by page, then
#: every other page handed back, so that A's free memory is that many order-0 blocks, as on
#: a machine that has run for weeks; it keeps the rest until it is killed
FRAGMENTER = """
import mmap, sys, time
n = int(sys.argv[1]) << 20
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
try:
    m.madvise(mmap.MADV_NOHUGEPAGE)
except OSError:
    pass  # a kernel without transparent huge pages
for o in range(0, n, 4096):
    m[o] = 1
for o in range(0, n, 8192):
    m.madvise(mmap.MADV_DONTNEED, o, 4096)
print("fragmented", flush=True)
time.sleep(1e9)
"""


def fragment_memory() -> subprocess.Popen | None:
    """With ``kjumpvm.fragment=MIB``: start the fragmenter and wait until it has freed every
    other page of its memory."""
    word = cmdline_arg("kjumpvm.fragment")
    if not word:
        return None
    proc = subprocess.Popen(
        [sys.executable, "-c", FRAGMENTER, word], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "fragmented":
        raise Failure(f"the fragmenter ({word} MiB) did not start: {line!r}")
    say(f"fragmenter: {word} MiB touched, every other page freed")
    with open("/proc/buddyinfo") as f:
        say("buddyinfo: " + " | ".join(x.strip() for x in f))
    return proc


HUGE_MOUNT = Path("/run/kjumpvm-huge")
HUGE_PAGE = 2 << 20


def _huge_file(path: Path, size: int, fill: bool) -> str:
    """Map a hugetlbfs file of ``size`` bytes (hugetlbfs has no write(2)); with ``fill``,
    fill it with incompressible bytes, every page distinct (rotations of one random huge
    page: drawing hundreds of MiB from the kernel's generator is slow under TCG). Returns
    its contents' digest (workload.digest_of)."""
    import mmap

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as m:
            base = os.urandom(HUGE_PAGE) if fill else b""
            for i, o in enumerate(range(0, size, HUGE_PAGE) if fill else ()):
                k = i * 4099 % HUGE_PAGE  # not a page multiple: every 4 KiB page differs
                m[o : o + HUGE_PAGE] = base[k:] + base[:k]
            return wl.digest_of(m)
    finally:
        os.close(fd)


def _pool(name: str) -> int:
    return int(Path(f"/sys/kernel/mm/hugepages/hugepages-2048kB/{name}").read_text())


def huge_pages() -> Callable[[], tuple[list[str], dict[str, str]]] | None:
    """With ``kjumpvm.hugepages=USED:FREE`` (MiB): a huge page pool of USED + FREE MiB, as a
    database server reserves one. USED MiB are held in a hugetlbfs file of random bytes
    (they must come back byte-exact); FREE MiB were filled with random bytes by a file
    since deleted, so the pool's free pages hold data, as after a process that used them
    exited. Returns the check to run after the resume."""
    word = cmdline_arg("kjumpvm.hugepages")
    if not word:
        return None
    used_mib, _, free_mib = word.partition(":")
    used, free = int(used_mib) << 20, int(free_mib or 0) << 20
    want = (used + free) // HUGE_PAGE
    Path("/proc/sys/vm/nr_hugepages").write_text(f"{want}\n")
    if _pool("nr_hugepages") < want:
        raise Failure(f"the huge page pool has {_pool('nr_hugepages')} pages, not {want}")
    HUGE_MOUNT.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "hugetlbfs", "none", str(HUGE_MOUNT)], check=True)
    junk = HUGE_MOUNT / "junk"
    _huge_file(junk, free, fill=True)
    junk.unlink()
    kept = HUGE_MOUNT / "kept"
    digest = _huge_file(kept, used, fill=True)
    free_before = _pool("free_hugepages")
    say(f"huge pages: {used >> 20} MiB held in hugetlbfs, {free_before * 2} MiB free holding data")

    def check() -> tuple[list[str], dict[str, str]]:
        problems: list[str] = []
        if _huge_file(kept, used, fill=False) != digest:
            problems.append("the hugetlbfs file's huge pages changed across the hibernation")
        if _pool("free_hugepages") != free_before:
            problems.append(f"free huge pages {free_before} -> {_pool('free_hugepages')}")
        fresh = HUGE_MOUNT / "fresh"
        if _huge_file(fresh, HUGE_PAGE, fill=False) != wl.digest_of(bytes(HUGE_PAGE)):
            problems.append("a huge page handed out after the resume is not zero")
        fresh.unlink()
        return problems, {"hugetlb": "intact" if not problems else "changed"}

    return check


def bench_target() -> None:
    """bench-vm: ``kjumpvm.target_size=SIZE`` sets the image target up again at that size
    (a bigger VM than the prepared disk's needs a bigger target), with its boot entry."""
    size = cmdline_arg("kjumpvm.target_size")
    if size:
        Path(GUEST_TARGET).unlink(missing_ok=True)
        setup_target(size)


def fill_page_cache(mib: int) -> None:
    """Write the file set, ``mib`` MiB of text-like pages (lz4 -1 keeps about a third of
    them; every page distinct) in files of FILESET_FILE bytes, synced: clean page cache the
    kernel may drop."""
    if mib <= 0:
        return
    rnd = random.Random(2026)
    words = (
        b"the of and to in is for page inode dentry return NULL static int void if err "
        b"goto out /usr/lib/x86_64-linux-gnu libc.so.6 GLIBC_2.34 LANG=C.UTF-8 0x7fff"
    ).split()
    corpus = b" ".join(rnd.choice(words) for _ in range(200_000))[: wl.CHUNK]
    FILESET.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    chunks = wl.rotated_chunks(corpus, mib << 20)
    for i in range(-(-(mib << 20) // FILESET_FILE)):
        with open(FILESET / f"f{i:03d}", "wb") as f:
            f.writelines(itertools.islice(chunks, FILESET_FILE // wl.CHUNK))
    os.sync()
    event("fileset-ready", mib=mib, seconds=f"{time.monotonic() - t0:.1f}")


def _read_fileset() -> float:
    t0 = time.monotonic()
    for p in sorted(FILESET.iterdir()):
        with open(p, "rb", buffering=0) as f:
            while f.read(wl.CHUNK):
                pass
    return time.monotonic() - t0


def fileset_cached_mib() -> str:
    """MiB of the file set in the page cache ("?" when fincore cannot tell)."""
    kept = cached([str(p) for p in sorted(FILESET.iterdir())]) if FILESET.is_dir() else None
    return f"{kept[0] / (1 << 20):.1f}" if kept else "?"


def time_to_warm() -> dict[str, str]:
    """After the resume: how much of the file set the page cache kept through the
    hibernation, the seconds to read it again (what was kept comes from RAM, the rest from
    disk), then the same read with the cache dropped, for scale. Verdict fields warm=, cold=
    and cached=; a ``warm`` event."""
    if not FILESET.is_dir():
        return {}
    kept_mib = fileset_cached_mib()
    warm = _read_fileset()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    cold = _read_fileset()
    event("warm", seconds=f"{warm:.2f}", cold=f"{cold:.2f}", cached_mib=kept_mib)
    return {"warm": f"{warm:.2f}s", "cold": f"{cold:.2f}s", "cached": f"{kept_mib}MiB"}


def scenario_swsusp() -> int:
    """bench: the kernel's own hibernation to the swap disk /dev/vdb (resume= on the command
    line). The workload survives a power cycle; the verdict comes after the resume."""
    problems: list[str] = []
    before = after = None
    expected = ""
    extra: dict[str, str] = {}
    try:
        swapon("/dev/vdb")
        anon, cache = bench_load()
        _proc, before = start_workload(anon)
        expected = wl.expected_digest(before.seed, before.size)
        fill_page_cache(cache)
        writers.start()  # the same busy machine as kjumpd's runs
        os.sync()
        log_meminfo("swsusp")
        event("hibernate-start", mode="swsusp")
        try:
            with open("/sys/power/state", "w") as f:
                f.write("disk\n")
            extra["swsusp"] = "resumed"
        except OSError as err:
            # the kernel's refusal (ENOMEM: the snapshot needs half of RAM free) is a
            # figure of the bench; the workload must still be intact
            extra["swsusp"] = f"refused:{errno.errorcode.get(err.errno or 0, err.errno)}"
        event("hibernate-returned", rc=0 if extra["swsusp"] == "resumed" else 1)
        after = wl.query()
        extra.update(time_to_warm())
    except Missing as err:
        problems.append(f"missing: {err}")
    except OSError as err:
        problems.append(f"{type(err).__name__}: {err}")
    ok, line = wl.verdict("swsusp", before, after, expected, extra, problems)
    print(line, flush=True)
    return 0 if ok else 1


#: where the VM image carries the cryptography variants of B's and R's initramfs
#: (tests/vm/assets.py), which `kjumpctl install` would build on a machine with an image key
SAVE_INITRAMFS_CRYPTO = "/usr/lib/kjumpd/save/initramfs-crypto.cpio.gz"
RESTORE_INITRD_CRYPTO = "/usr/lib/kjumpd/restore/initrd-crypto.img"
ENCRYPT_SETUP = STATE_DIR / "encrypt-setup.json"
CONFIG = Path("/etc/kjumpd/kjumpd.toml")


def check_item(name: str, mode: str = "shutdown") -> str:
    """`kjumpctl check`'s line for item ``name`` (with its fix line, if any)."""
    proc = kjumpctl("check", "--mode", mode, timeout=600)
    lines = proc.stdout.splitlines()
    for i, line in enumerate(lines):
        if f"] {name}:" in line:
            nxt = lines[i + 1] if i + 1 < len(lines) and "fix:" in lines[i + 1] else ""
            return f"{line.strip()} {nxt.strip()}".strip()
    return f"(no '{name}' line in kjumpctl check: rc {proc.returncode})"


def scenario_encrypt_setup() -> int:
    """Run by PID 1 before kjumpd starts (``kjumpvm.encrypt=PASSPHRASE``): what an
    administrator does to encrypt images. `kjumpctl image-key create`; `check` must refuse
    (the save kernel's initramfs predates the key); then what `kjumpctl install` would do
    here: the cryptography variant of B's initramfs in the configuration (with its sha256
    and the larger jump area it needs: crashkernel=160M on this boot's command line and in
    /etc/default/grub for the next ones) and the restore-first entry again, now holding the
    key; `check` must pass. The results go to
    ENCRYPT_SETUP for the scenario's verdict."""
    if ENCRYPT_SETUP.exists():
        return 0
    problems: list[str] = []
    fields: dict[str, str] = {}
    passphrase = cmdline_arg("kjumpvm.encrypt") or ""
    pfile = Path("/run/kjumpvm-passphrase")
    pfile.write_text(passphrase + "\n")
    pfile.chmod(0o600)
    proc = kjumpctl("image-key", "create", "--passphrase-file", str(pfile))
    pfile.unlink()
    if proc.returncode != 0:
        problems.append(f"kjumpctl image-key create failed: {proc.stderr.strip()[-200:]}")
    line = check_item("image encryption")
    say(f"before the save kernel has cryptography: {line}")
    if not (line.startswith("[FAIL]") and "cannot encrypt images" in line):
        problems.append(f"check did not refuse a save kernel without cryptography: {line}")
    fields["guard"] = "refused" if line.startswith("[FAIL]") else "missed"
    text = CONFIG.read_text()
    digest = hashlib.sha256(Path(SAVE_INITRAMFS_CRYPTO).read_bytes()).hexdigest()
    out, section = [], ""
    for ln in text.splitlines():
        st = ln.strip()
        if st.startswith("["):
            section = st
        if section == "[save_kernel]" and st.startswith(("initramfs ", "initramfs=")):
            ln = f'initramfs = "{SAVE_INITRAMFS_CRYPTO}"'
        elif section == "[save_kernel]" and st.startswith("initramfs_sha256"):
            ln = f'initramfs_sha256 = "{digest}"'
        elif section == "[jump_area]" and st.startswith("size"):
            ln = 'size = "160M"'
        out.append(ln)
    CONFIG.write_text("\n".join(out) + "\n")
    grub = Path("/etc/default/grub")  # the next boots reserve the larger area too
    grub.write_text(grub.read_text().replace("crashkernel=128M", "crashkernel=160M"))
    try:
        install_restore_entry(RESTORE_INITRD_CRYPTO)
    except Missing as err:
        problems.append(str(err))
    line = check_item("image encryption")
    say(f"after: {line}")
    if not (line.startswith("[ok  ]") and "AES-256-GCM" in line):
        problems.append(f"check does not encrypt after the set-up: {line}")
    fields["encryption"] = "AES-256-GCM" if "AES-256-GCM" in line else "none"
    entry = check_item("boot entry")
    if not entry.startswith("[ok  ]"):
        problems.append(f"boot entry after the set-up: {entry}")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    ENCRYPT_SETUP.write_text(json.dumps({"problems": problems, "fields": fields}))
    os.sync()
    event("encrypt-setup", ok="yes" if not problems else "no")
    return 0


def scenario_encrypted() -> int:
    """The image key set up before kjumpd started (scenario_encrypt_setup); then
    hibernate --mode shutdown: the host types the passphrase at R's prompt."""
    return hibernate_and_check(
        "encrypted",
        "shutdown",
        ("CONSUMED",),
        disk_writers=True,
        prior=setup_record(ENCRYPT_SETUP, "encryption"),
    )


def setup_record(path: Path, what: str) -> tuple[list[str], dict[str, str]]:
    """(problems, verdict fields) a set-up run by PID 1 left in ``path``."""
    try:
        done = json.loads(path.read_text())
        return list(done["problems"]), dict(done["fields"])
    except (OSError, ValueError, KeyError) as err:
        return [f"the {what} set-up left no record: {err}"], {}


#: the storage scenarios: a blank disk the host attaches, the stack built on it, the
#: filesystem holding the image target mounted here
STORAGE_DISK = "/dev/vdb"
#: kjumpvm.storage=nvme|sata: the blank disk is on that bus (scenarios.STORAGE_BUS), and
#: the filesystem holding the target on its first partition
BUS_DISKS = {
    "nvme": ("/dev/nvme0n1", "/dev/nvme0n1p1"),
    "sata": ("/dev/sda", "/dev/sda1"),
}
STORAGE_MOUNT = Path("/srv/kjump")
STORAGE_TARGET = STORAGE_MOUNT / "image"
STORAGE_SETUP = STATE_DIR / "storage-setup.json"
#: PID 1 here is the VM's init, not systemd: no udevd, so LVM makes its device nodes itself
LVM_CONFIG = (
    "activation { udev_sync = 0 udev_rules = 0 } "
    "devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }"
)


STORAGE_NOTE = "written on the storage stack before the hibernation\n" * 100
#: luks-target: the LUKS2 volume on a partition of the storage disk, and its passphrase
#: (scenarios.LUKS_PASSPHRASE: the host types it at R's prompt)
LUKS_START_SECTOR = 2048
LUKS_PARTITION = STORAGE_DISK + "1"
LUKS_PASSPHRASE = "kjumpvm-luks-passphrase"
LUKS_PASSFILE = Path("/run/kjumpvm-luks.pass")
#: the image target inside that volume: R asks for its passphrase (luks-target), unlocks
#: it with the key file the system's initramfs holds (luks-keyfile) or with the TPM2 token
#: systemd-cryptenroll enrolled (luks-tpm2)
LUKS_TARGETS = ("luks-target", "luks-keyfile", "luks-tpm2", "luks-root")
#: lvm-raw: the image target is a raw LV (no filesystem), in two segments, its PV on a
#: partition of the storage disk
RAW_LV = Path("/dev/mapper/kjvg-image")
#: luks-root: the root filesystem inside LUKS2 on the storage disk's partition, unlocked at
#: boot by the key file the normal initramfs holds (tests/vm/assets.py builds that
#: initramfs with the same key, LUKS_PASSPHRASE's bytes); the plaintext disk is /boot
ROOT_KEY = Path("/etc/keys/root.key")
ROOT_TARGET = Path("/var/lib/kjumpd/image")
ROOT_MAPPING = "cryptroot"
BOOT_DISK_MOUNT = Path("/mnt/bootdisk")
#: the unlocking initramfs in the guest image (assets.GUEST_LUKSROOT_INITRD)
LUKSROOT_INITRD = Path("/usr/lib/kjumpvm/initrd-luksroot.img")


def run_tool(*cmd: str) -> str:
    """A system tool of the set-up; its failure is a missing piece, named with its words."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise Missing(
            f"`{' '.join(cmd)}` failed (rc {proc.returncode}): "
            + " | ".join(proc.stderr.strip().splitlines()[-2:])
        )
    return proc.stdout


def set_config_target(path: Path) -> None:
    """What the administrator does after `kjumpctl setup --target`: [target] path."""
    out, section = [], ""
    for ln in CONFIG.read_text().splitlines():
        st = ln.strip()
        if st.startswith("["):
            section = st
        if section == "[target]" and st.startswith(("path ", "path=")):
            ln = f'path = "{path}"'
        out.append(ln)
    CONFIG.write_text("\n".join(out) + "\n")


def storage_target(kind: str) -> dict[str, str]:
    """`kjumpctl setup --target` on the mounted stack, the configuration's target path and
    the restore-first entry again (its kjump.target=); verdict fields. Inside LUKS
    (luks-target) setup enrolls its key file with the passphrase's key file, and R is the
    variant with cryptsetup."""
    fields: dict[str, str] = {}
    luks_arg = (
        ("--luks-key-file", str(ROOT_KEY if kind == "luks-root" else LUKS_PASSFILE))
        if kind in LUKS_TARGETS
        else ()
    )
    target = {"lvm-raw": RAW_LV, "luks-root": ROOT_TARGET}.get(kind, STORAGE_TARGET)
    size = () if kind == "lvm-raw" else ("--size", TARGET_SIZE)  # a device is its own size
    proc = kjumpctl("setup", "--target", str(target), *size, *luks_arg, "--yes", timeout=900)
    say(f"kjumpctl setup --target {target}: {proc.stdout.strip()[-300:]}")
    if proc.returncode != 0:
        raise Missing(
            f"`kjumpctl setup --target {target}` failed (rc {proc.returncode}): "
            + (proc.stdout.strip().splitlines() or [""])[-1]
        )
    m = re.search(r"on (/dev/\S+) at byte (\d+) \((\d+) extents\)", proc.stdout)
    if m:
        fields.update(target_disk=m.group(1), target_extents=m.group(3))
    if kind == "btrfs":
        attrs = run_tool("lsattr", str(STORAGE_TARGET)).split()[0]
        fields["nocow"] = "yes" if "C" in attrs else "no"
    if kind == "luks-keyfile":
        # as Debian's encrypted-/boot set-up has it: crypttab names a key file of the
        # volume and cryptsetup-initramfs copies it into the initramfs (KEYFILE_PATTERN)
        keys = Path("/etc/keys")
        keys.mkdir(mode=0o700, exist_ok=True)
        (keys / "kjcrypt.key").write_bytes(os.urandom(64))
        (keys / "kjcrypt.key").chmod(0o400)
        run_tool(
            "cryptsetup", "luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2",
            "--pbkdf-force-iterations", "1000", "--key-file", str(LUKS_PASSFILE),
            LUKS_PARTITION, str(keys / "kjcrypt.key"),
        )  # fmt: skip
        uuid = run_tool("cryptsetup", "luksUUID", LUKS_PARTITION).strip()
        Path("/etc/crypttab").write_text(f"kjcrypt UUID={uuid} /etc/keys/kjcrypt.key luks\n")
        hook = Path("/etc/cryptsetup-initramfs/conf-hook")
        hook.parent.mkdir(parents=True, exist_ok=True)
        hook.write_text('KEYFILE_PATTERN="/etc/keys/*.key"\nUMASK=0077\n')
    if kind == "luks-tpm2":
        # as an Ubuntu or Fedora user enrolls the machine's TPM (sealed to PCR 7, no PIN)
        if not Path("/dev/tpmrm0").exists():
            raise Missing("the machine has no TPM (/dev/tpmrm0)")
        run_tool(
            "systemd-cryptenroll", "--tpm2-device=auto", "--tpm2-pcrs=7",
            f"--unlock-key-file={LUKS_PASSFILE}", LUKS_PARTITION,
        )  # fmt: skip
        dump = run_tool("cryptsetup", "luksDump", LUKS_PARTITION)
        fields["tpm2_token"] = "enrolled" if "systemd-tpm2" in dump else "none"
    if kind in LUKS_TARGETS:
        m = re.search(r"(enrolled key file|key file) (\S+) ", proc.stdout)
        fields["luks_key"] = "enrolled" if m and m.group(1).startswith("enrolled") else "none"
        slots = run_tool("cryptsetup", "luksDump", LUKS_PARTITION)
        fields["keyslots"] = str(len(re.findall(r"^\s+\d+: luks2$", slots, re.M)))
    set_config_target(target)
    install_restore_entry(RESTORE_INITRD_CRYPTO if kind in LUKS_TARGETS else RESTORE_INITRD)
    if kind == "luks-tpm2":
        # the preflight looked into the installed R for the token's plugin
        check = kjumpctl("check").stdout
        m = re.search(r"^\[(ok  |warn)\] volume token: ", check, re.M)
        fields["r_token_check"] = m.group(1).strip() if m else "absent"
    if kind in ("luks-keyfile", "luks-root"):
        mode = os.stat("/boot/kjumpd/initrd-restore.img").st_mode & 0o777
        fields["r_initrd_mode"] = f"{mode:o}"
    return fields


def scenario_root_luks_prepare() -> int:
    """The first boot of scenario luks-root (PID 1 runs it, then powers off): what an
    encrypted install leaves. The storage disk gets a partition from 1 MiB with LUKS2
    (passphrase LUKS_PASSPHRASE, which is also the key file's content) and ext4 on it; this
    root filesystem is copied in (its old image target left out); the copy gets the crypttab,
    key file and KEYFILE_PATTERN with which its initramfs unlocks it; this disk keeps /boot,
    with that initramfs as the normal kernel's initrd."""
    fields: dict[str, str] = {}
    problems: list[str] = []
    newroot = Path("/mnt/newroot")
    try:
        write_mbr(STORAGE_DISK, LUKS_START_SECTOR)
        LUKS_PASSFILE.write_bytes(LUKS_PASSPHRASE.encode())
        LUKS_PASSFILE.chmod(0o600)
        luks_format_and_open(LUKS_PARTITION, LUKS_PASSFILE, ROOT_MAPPING)
        run_tool("mkfs.ext4", "-q", "-F", f"/dev/mapper/{ROOT_MAPPING}")
        newroot.mkdir(parents=True, exist_ok=True)
        run_tool("mount", f"/dev/mapper/{ROOT_MAPPING}", str(newroot))
        t0 = time.monotonic()
        copy = subprocess.run(
            "tar -C / --one-file-system --exclude=./var/lib/kjumpd/image -cf - . "
            f"| tar -C {newroot} -xpf -",
            shell=True, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        if copy.returncode != 0:
            raise Missing(f"copying the root filesystem into LUKS failed: {copy.stderr[-300:]}")
        fields["copy_s"] = f"{time.monotonic() - t0:.1f}"
        uuid = run_tool("cryptsetup", "luksUUID", LUKS_PARTITION).strip()
        keys = newroot / ROOT_KEY.relative_to("/")
        keys.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys.write_bytes(LUKS_PASSPHRASE.encode())
        keys.chmod(0o400)
        (newroot / "etc/crypttab").write_text(
            f"{ROOT_MAPPING} UUID={uuid} {ROOT_KEY} luks,discard\n"
        )
        hook = newroot / "etc/cryptsetup-initramfs/conf-hook"
        hook.parent.mkdir(parents=True, exist_ok=True)
        hook.write_text('KEYFILE_PATTERN="/etc/keys/*.key"\nUMASK=0077\n')
        # the normal kernel's initrd, on the disk that becomes /boot
        shutil.copy(LUKSROOT_INITRD, "/boot/initrd.img-kjump")
        run_tool("umount", str(newroot))
        run_tool("cryptsetup", "close", ROOT_MAPPING)
        fields["luks_uuid"] = uuid
    except (Missing, OSError) as err:
        problems.append(f"missing: {err}")
    os.sync()
    event("root-luks-prepared", ok="yes" if not problems else "no", **fields)
    for p in problems:
        say(p)
    return 0


def luks_format_and_open(device: str, key: Path, name: str) -> None:
    """LUKS2 on ``device`` unlocked by ``key`` (a fast PBKDF for the test), opened as
    /dev/mapper/``name``."""
    run_tool(
        "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
        "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
        "--key-file", str(key), device,
    )  # fmt: skip
    run_tool("cryptsetup", "open", "--key-file", str(key), device, name)


def mount_boot_disk() -> None:
    """luks-root: the plaintext disk (the root of the first boot) holds /boot, as an
    encrypted install's unencrypted /boot partition does."""
    BOOT_DISK_MOUNT.mkdir(parents=True, exist_ok=True)
    run_tool("mount", "/dev/vda", str(BOOT_DISK_MOUNT))
    run_tool("mount", "--bind", str(BOOT_DISK_MOUNT / "boot"), "/boot")


def write_mbr(disk: str, start: int) -> None:
    """One Linux partition from sector ``start`` to the end of ``disk`` (the guest has no
    fdisk), then the kernel re-reads the table (BLKRRPART)."""
    import fcntl
    import struct

    sectors = int(Path(f"/sys/block/{os.path.basename(disk)}/size").read_text())
    entry = struct.pack(
        "<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", start, sectors - start
    )
    mbr = bytearray(512)
    mbr[446 : 446 + 16] = entry
    mbr[510:512] = b"\x55\xaa"
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(mbr), 0)
        os.fsync(fd)
        fcntl.ioctl(fd, 0x125F)  # BLKRRPART
    finally:
        os.close(fd)


def scenario_storage_setup() -> int:
    """Run by PID 1 before kjumpd starts (``kjumpvm.storage=lvm|btrfs|luks``): an
    administrator puts the image target on the machine's storage stack, on the blank disk
    the host attached (luks: only a filesystem kjumpd freezes, the target stays).

    lvm: a volume group on the whole disk, an LV "data" in two segments with another LV
    between them (LVM's map is not one offset), ext4 on it. btrfs: a single-device btrfs
    (data single, metadata DUP: mkfs's defaults). luks: the same LVM inside LUKS2, as
    Ubuntu's encrypted install has it. Then `kjumpctl setup --target` on it, the
    configuration's target path, and the restore-first entry again (its kjump.target=);
    `check` must pass. Results go to STORAGE_SETUP for the verdict."""
    if STORAGE_SETUP.exists():
        return 0
    kind = cmdline_arg("kjumpvm.storage") or ""
    problems: list[str] = []
    fields: dict[str, str] = {"storage": kind}
    try:
        if kind == "lvm":
            lvm = ("lvm",)
            cfg = ("--config", LVM_CONFIG)
            run_tool(*lvm, "pvcreate", *cfg, "-ff", "-y", STORAGE_DISK)
            run_tool(*lvm, "vgcreate", *cfg, "kjvg", STORAGE_DISK)
            run_tool(*lvm, "lvcreate", *cfg, "-y", "-L", "256M", "-n", "data", "kjvg")
            run_tool(*lvm, "lvcreate", *cfg, "-y", "-L", "64M", "-n", "pad", "kjvg")
            run_tool(*lvm, "lvextend", *cfg, "-L", "+1024M", "kjvg/data")
            segs = run_tool(*lvm, "lvs", *cfg, "--noheadings", "--segments", "kjvg/data")
            fields["lv_segments"] = str(len(segs.strip().splitlines()))
            # a raw LV as a target too: claimed and stamped where LVM put it on the disk
            pe = run_tool(*lvm, "pvs", *cfg, "--noheadings", "--units", "b", "-o", "pe_start")
            want = int(pe.strip().rstrip("B")) + (256 << 20)  # after data's first 256M
            raw = kjumpctl("setup", "--target", "/dev/mapper/kjvg-pad", "--yes")
            say(f"kjumpctl setup --target /dev/mapper/kjvg-pad: {raw.stdout.strip()[-200:]}")
            m = re.search(r"on /dev/vdb at byte (\d+) \(1 extents\)", raw.stdout)
            fields["raw_lv"] = "at-its-extent" if m and int(m.group(1)) == want else "wrong"
            if fields["raw_lv"] != "at-its-extent":
                problems.append(f"raw LV target not at disk byte {want}: {raw.stdout[-200:]}")
            fsdev = "/dev/mapper/kjvg-data"
            run_tool("mkfs.ext4", "-q", "-F", fsdev)
        elif kind == "lvm-raw":
            # the target a raw LV in two segments (another LV between them), its PV on a
            # partition from 1 MiB; a filesystem on a third LV is frozen beside it
            write_mbr(STORAGE_DISK, LUKS_START_SECTOR)
            cfg = ("--config", LVM_CONFIG)
            run_tool("lvm", "pvcreate", *cfg, "-ff", "-y", LUKS_PARTITION)
            run_tool("lvm", "vgcreate", *cfg, "kjvg", LUKS_PARTITION)
            run_tool("lvm", "lvcreate", *cfg, "-y", "-L", "512M", "-n", "image", "kjvg")
            run_tool("lvm", "lvcreate", *cfg, "-y", "-L", "64M", "-n", "pad", "kjvg")
            run_tool("lvm", "lvextend", *cfg, "-L", "+640M", "kjvg/image")
            run_tool("lvm", "lvcreate", *cfg, "-y", "-L", "256M", "-n", "data", "kjvg")
            segs = run_tool("lvm", "lvs", *cfg, "--noheadings", "--segments", "kjvg/image")
            fields["lv_segments"] = str(len(segs.strip().splitlines()))
            fsdev = "/dev/mapper/kjvg-data"
            run_tool("mkfs.ext4", "-q", "-F", fsdev)
        elif kind == "btrfs":
            fsdev = STORAGE_DISK
            run_tool("mkfs.btrfs", "-q", "-f", fsdev)
        elif kind in BUS_DISKS:
            # a laptop's or a desktop's disk: ext4 on a partition from 1 MiB (NVMe names
            # it with a "p" before the number)
            disk, fsdev = BUS_DISKS[kind]
            write_mbr(disk, LUKS_START_SECTOR)
            run_tool("mkfs.ext4", "-q", "-F", fsdev)
        elif kind == "luks-root":
            # the root filesystem itself is inside LUKS (scenario_root_luks_prepare)
            mount_boot_disk()
            root = next(
                (ln.split()[0] for ln in Path("/proc/mounts").read_text().splitlines()
                 if ln.split()[1] == "/"),
                "",
            )  # fmt: skip
            fields["root_on"] = "luks" if root == f"/dev/mapper/{ROOT_MAPPING}" else root
            fsdev = None
        elif kind in ("luks", *LUKS_TARGETS):
            # Ubuntu's encrypted layout: LVM inside LUKS2 (a fast PBKDF for the test).
            # luks-target: on a partition from 1 MiB, unlocked by a passphrase (the host
            # types it at R's prompt), with the image target inside
            if kind in LUKS_TARGETS:
                write_mbr(STORAGE_DISK, LUKS_START_SECTOR)
                luks_dev, key = LUKS_PARTITION, LUKS_PASSFILE
                key.write_bytes(LUKS_PASSPHRASE.encode())
            else:
                luks_dev, key = STORAGE_DISK, Path("/run/kjumpvm-luks.key")
                key.write_bytes(os.urandom(64))
            key.chmod(0o600)
            luks_format_and_open(luks_dev, key, "kjcrypt")
            # as on a distribution kernel: the table names the key in the kernel keyring,
            # which nobody can read back (R checks the filesystem without it)
            table = run_tool("dmsetup", "table", "--showkeys", "kjcrypt").split()
            fields["volume_key"] = "keyring" if table[4].startswith(":") else "in-table"
            pv = "/dev/mapper/kjcrypt"
            cfg = ("--config", LVM_CONFIG)
            run_tool("lvm", "pvcreate", *cfg, "-ff", "-y", pv)
            run_tool("lvm", "vgcreate", *cfg, "kjvg", pv)
            run_tool("lvm", "lvcreate", *cfg, "-y", "-L", "256M", "-n", "data", "kjvg")
            run_tool("lvm", "lvcreate", *cfg, "-y", "-L", "64M", "-n", "pad", "kjvg")
            # luks-target: room for the 1 GiB target
            more = "+1280M" if kind in LUKS_TARGETS else "+512M"
            run_tool("lvm", "lvextend", *cfg, "-L", more, "kjvg/data")
            fsdev = "/dev/mapper/kjvg-data"
            run_tool("mkfs.ext4", "-q", "-F", fsdev)
            # where the LV's first byte lies on the disk (LUKS2's data offset, then LVM's
            # first extent): the host changes the encrypted superblock there (scenario
            # luks-stale)
            dump = run_tool("cryptsetup", "luksDump", luks_dev)
            m = re.search(r"offset:\s+(\d+) \[bytes\]", dump)
            pe = run_tool("lvm", "pvs", *cfg, "--noheadings", "--units", "b", "-o", "pe_start", pv)
            fields["lv_disk_offset"] = str(
                int(m.group(1)) + int(pe.strip().rstrip("B")) if m else ""
            )
        else:
            raise Missing(
                f"kjumpvm.storage={kind!r}: lvm, lvm-raw, btrfs, luks, luks-target, nvme or sata"
            )
        STORAGE_MOUNT.mkdir(parents=True, exist_ok=True)
        if fsdev is not None:
            run_tool("mount", fsdev, str(STORAGE_MOUNT))
        notes = STORAGE_MOUNT / "notes.txt"
        notes.write_text(STORAGE_NOTE)
        if kind != "luks":
            # luks: the image target stays where the prepared disk has it (on /dev/vda);
            # the scenario proves R checks a frozen filesystem below dm-crypt without a key
            fields.update(storage_target(kind))
        plan = json.loads(kjumpctl("plan", "--json").stdout or "{}")
        checked = "/" if kind == "luks-root" else str(STORAGE_MOUNT)
        how = str(plan.get("freeze_checked_by_r", {}).get(checked, ""))
        say(f"kjumpctl plan: {checked}: {how}")
        fields["r_checks"] = (
            "ciphertext" if "ciphertext" in how else "map" if "through its map" in how else how
        ).replace(" ", "_")
        enc = str(plan.get("image_encryption", ""))
        fields["image_encrypted_by"] = (
            "luks" if "LUKS volume" in enc else "image-key" if "AES-256-GCM" in enc else "none"
        )
        for item in ("filesystems",) if kind == "luks" else ("target", "filesystems"):
            line = check_item(item)
            say(f"check {item}: {line}")
            if not line.startswith("[ok  ]"):
                problems.append(f"check after the set-up: {line}")
    except Missing as err:
        problems.append(f"missing: {err}")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    STORAGE_SETUP.write_text(json.dumps({"problems": problems, "fields": fields}))
    os.sync()
    event("storage-setup", ok="yes" if not problems else "no", **fields)
    return 0


def compare_through_mapping(path: Path) -> tuple[list[str], dict[str, str]]:
    """After the resume: the target file read through the filesystem (and the LV) must be
    byte for byte what its block map says is on the whole disk, where B wrote it. The
    comparison covers what the image occupies (superblock, headers, metadata and records):
    B writes nothing past it."""
    from kjumpd.errors import KjumpError
    from kjumpd.image import store
    from kjumpd.image.device import ImageDevice

    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    step = 4 << 20
    with ImageDevice(path, writable=False) as via_fs:
        sb = store.read_superblock(via_fs)
        header = store.read_header(via_fs)
        state = header.state.name
        used = max(
            header.data_offset + header.data_length,
            header.metadata_offset + header.metadata_length,
        )
        size = min(via_fs.size, -(-used // step) * step)
        if header.data_length == 0:
            return [f"{path} holds no image to compare ({state})"], {"file_state": state}
        head = via_fs.read(0, 4096)
        for name in sorted(os.listdir("/sys/block")):
            try:
                disk = ImageDevice(f"/dev/{name}", sb.blockmap, writable=False)
            except (KjumpError, OSError):
                continue  # a disk the map does not fit
            with disk:
                if disk.read(0, 4096) != head:
                    continue
                differ = sum(
                    via_fs.read(off, min(step, size - off)) != disk.read(off, min(step, size - off))
                    for off in range(0, size, step)
                )
            fields = {"file_state": state, "mapped_disk": name}
            if differ:
                return [
                    f"{differ} of {-(-size // step)} 4 MiB pieces of {path} differ "
                    f"between the filesystem and its block map on /dev/{name}"
                ], {**fields, "through_mapping": "differs"}
            return [], {**fields, "through_mapping": "same"}
    return [f"no disk holds {path}'s superblock where its block map says"], {}


def unmount_and_check(kind: str) -> tuple[list[str], dict[str, str]]:
    """The filesystem on the stack, its file intact and checked offline after the resume."""
    problems = []
    try:
        same = (STORAGE_MOUNT / "notes.txt").read_text() == STORAGE_NOTE
    except OSError:
        same = False
    if not same:
        problems.append("the file written on the storage stack before is not intact")
    if kind == "luks-root":  # the running root: checked by nobody while mounted
        return problems, {"notes": "intact" if same else "lost"}
    run_tool("umount", str(STORAGE_MOUNT))
    if kind in ("lvm", "lvm-raw", "luks", *LUKS_TARGETS, *BUS_DISKS):
        fsdev = BUS_DISKS[kind][1] if kind in BUS_DISKS else "/dev/mapper/kjvg-data"
        proc = subprocess.run(["e2fsck", "-fn", fsdev], capture_output=True, text=True)
    else:
        proc = subprocess.run(
            ["btrfs", "check", "--readonly", STORAGE_DISK], capture_output=True, text=True
        )
    ok = proc.returncode == 0
    msg = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-2:])
    if not ok:
        problems.append(f"{kind} filesystem check after the resume: {msg}")
    return problems, {
        "fs_check": "clean" if ok else "errors",
        "notes": "intact" if same else "lost",
    }


def scenario_storage() -> int:
    """The target on LVM or btrfs, or a frozen filesystem on LVM inside LUKS2
    (scenario_storage_setup); hibernate --mode shutdown, R restores (reading the stacked
    filesystem's stamp through its map, below dm-crypt its ciphertext); then the target file
    reads back through the mapping and the filesystem checks clean. With kjumpvm.tamper the
    host changes the encrypted filesystem while the machine is off: R refuses the image as
    stale and the normal boot finds it INVALID(stale)."""
    prior = setup_record(STORAGE_SETUP, "storage")
    kind = prior[1].get("storage", "")

    def after() -> tuple[list[str], dict[str, str]]:
        problems, fields = [], {}
        if kind != "luks":
            problems, fields = compare_through_mapping(
                {"lvm-raw": RAW_LV, "luks-root": ROOT_TARGET}.get(kind, STORAGE_TARGET)
            )
        if kind in LUKS_TARGETS:
            # kjumpd's token (R asked for the passphrase because of it) is gone once the
            # image is consumed: the next boots through R ask nothing
            dump = run_tool("cryptsetup", "luksDump", LUKS_PARTITION)
            fields["luks_token"] = "present" if "kjumpd-image" in dump else "removed"
        if kind == "luks-tpm2":
            # the TPM went through the save kernel, a power cycle, R and B: A still unseals
            # with it (what systemd-cryptsetup does at A's next boot)
            proc = subprocess.run(
                ["cryptsetup", "open", "--test-passphrase", "--token-only", LUKS_PARTITION],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            fields["tpm_after_resume"] = "unseals" if proc.returncode == 0 else "fails"
            if proc.returncode != 0:
                problems.append(f"A's TPM does not unseal after the resume: {proc.stderr[-200:]}")
        more, mfields = unmount_and_check(kind)
        return problems + more, {**fields, **mfields}

    tamper = bool(cmdline_arg("kjumpvm.tamper"))
    return hibernate_and_check(
        "storage",
        "shutdown",
        ("CONSUMED",),
        disk_writers=True,
        prior=prior,
        after_boot={"states": ["INVALID"], "reason": "stale", "rf": "invalid:stale"}
        if tamper
        else None,
        post=None if tamper else after,
    )


SCENARIOS = {
    "root-luks-prepare": scenario_root_luks_prepare,
    "storage-setup": scenario_storage_setup,
    "storage": scenario_storage,
    "encrypt-setup": scenario_encrypt_setup,
    "encrypted": scenario_encrypted,
    "test": lambda: hibernate_and_check(
        "test", "test", ("INVALID",), want_written=True, disk_writers=True
    ),
    "shutdown": lambda: hibernate_and_check(
        "shutdown", "shutdown", ("CONSUMED",), disk_writers=True
    ),
    "platform": lambda: hibernate_and_check(
        "platform", "platform", ("CONSUMED",), disk_writers=True
    ),
    "checkpoint": lambda: hibernate_and_check(
        "checkpoint", "checkpoint", ("SAVED",), want_written=True, disk_writers=True
    ),
    "killed": scenario_killed,
    "warm": scenario_warm,
    "killed-steps": scenario_killed_steps,
    "suspend-wake": lambda: hibernate_and_check("suspend-wake", "suspend", ("INVALID",)),
    "suspend-lost": lambda: hibernate_and_check("suspend-lost", "suspend", ("CONSUMED",)),
    "rollback": lambda: hibernate_and_check(
        "rollback",
        "test",
        ("EMPTY", "ABORTED", "INVALID"),
        inject="kexec-refused",
        want_rc_ok=False,
        disk_writers=True,
    ),
    # the fault matrix: power cut during B's save (a normal boot follows, the image refused
    # as incomplete or never written), during the restore (retried), at every attempt
    # (given up after max_attempts), RAM changed, I/O errors on the target
    "lost-save": lambda: hibernate_and_check(
        "lost-save",
        "shutdown",
        ("CONSUMED",),
        disk_writers=True,
        after_boot={"states": ["INVALID", "EMPTY", "ABORTED", "CONSUMED"]},
    ),
    "lost-restore": lambda: hibernate_and_check(
        "lost-restore", "shutdown", ("CONSUMED",), disk_writers=True, after_boot={}
    ),
    "restore-attempts": lambda: hibernate_and_check(
        "restore-attempts",
        "shutdown",
        ("CONSUMED",),
        disk_writers=True,
        after_boot={"states": ["INVALID"], "reason": "attempts", "rf": "invalid:attempts"},
    ),
    "ram-changed": lambda: hibernate_and_check(
        "ram-changed",
        "shutdown",
        ("CONSUMED",),
        disk_writers=True,
        after_boot={"states": ["INVALID"], "reason": "memory", "rf": "invalid:memory"},
    ),
    "io-error-save": lambda: hibernate_and_check(
        "io-error-save",
        "test",
        ("ABORTED",),
        inject="io-error",
        want_rc_ok=False,
        disk_writers=True,
    ),
    "io-error-restore": lambda: hibernate_and_check(
        "io-error-restore",
        "shutdown",
        ("CONSUMED",),
        disk_writers=True,
        after_boot={"states": ["INVALID"]},
    ),
    "b-panic": lambda: hibernate_and_check(
        "b-panic",
        "shutdown",
        ("CONSUMED",),
        disk_writers=True,
        after_boot={"states": ["EMPTY", "ABORTED", "INVALID", "CONSUMED"]},
    ),
    # the save kernel cannot reach the target's disk: A rolls back and names that cause
    "b-no-disk": lambda: hibernate_and_check(
        "b-no-disk",
        "test",
        ("EMPTY", "INVALID", "CONSUMED"),
        want_rc_ok=False,
        disk_writers=True,
        inject="b-no-disk",
        want_error="is on none of this kernel's disks",
    ),
    "kaslr": scenario_kaslr,
    "b-hang": lambda: hibernate_and_check(
        "b-hang",
        "shutdown",
        ("CONSUMED",),
        disk_writers=True,
        after_boot={"states": ["INVALID"], "reason": "incomplete", "rf": "invalid:incomplete"},
    ),
    "soak": scenario_soak,
    "prepare": scenario_prepare,
    "noimage": scenario_noimage,
    "swsusp": scenario_swsusp,
    "idle": lambda: 0,
}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    name = args[0] if args else "idle"
    fn = SCENARIOS.get(name)
    if fn is None:
        print(f'KJUMP-VERDICT: FAIL scenario={name} reason="unknown scenario"', flush=True)
        return 2
    return fn()


if __name__ == "__main__":
    sys.exit(main())
