"""Guest side of the systemd scenario (s): Debian's systemd as PID 1, kjumpd installed the way
the README tells a user, hibernation asked of systemd and logind.

Run by kjumpvm-systemd.service (``python3 -m kjumpvm.guest_systemd``) on every boot whose
command line has ``kjumpvm.scenario=systemd``; its output goes to the console. The guest
image also holds a copy of the project for the fast scenarios (their custom init, no
systemd): the first boot removes it, so nothing of kjumpd is on the machine but what the
install puts there. Stages, one per boot of the normal kernel:

  install   pip installs the wheel, `kjumpctl setup --target`, `kjumpctl install
            --save-kernel` (crashkernel= into /etc/default/grub), `systemctl reboot`; the
            host boots the command line /etc/default/grub now gives (as GRUB would)
  cycles    `kjumpctl install` again (the restore-first entry), once more ("nothing to
            do"), `kjumpctl check`, login1 CanHibernate; workload and disk writers; then
            `systemctl hibernate`, and login1's Hibernate through busctl: each powers off,
            the host boots the restore-first entry, R restores, this process goes on and
            checks the system (is-system-running, failed units, the journal, the workload,
            the writers, the image CONSUMED); then a kernel package (postinst.d), a changed
            command line and a changed crashkernel= (too small: check fails; larger:
            install keeps it), one more hibernation; power off with no image
  moved     R booted the new kernel with the current command line and the larger jump area:
            one more hibernation restores through it, `systemctl hybrid-sleep` (the host
            wakes the guest from S3) and `systemctl suspend-then-hibernate` (the host cuts
            the power in S3; R restores); the verdict, power off.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:  # in the guest the package is kjumpvm; on the host tests.vm
    from kjumpvm import guest_scenarios as gs
    from kjumpvm import workload as wl
    from kjumpvm import writers
    from kjumpvm.vminit import event, say
except ImportError:  # pragma: no cover - host-side import for linting/tests
    from tests.vm import guest_scenarios as gs  # type: ignore[no-redef]
    from tests.vm import workload as wl  # type: ignore[no-redef]
    from tests.vm import writers  # type: ignore[no-redef]
    from tests.vm.vminit import event, say  # type: ignore[no-redef]

NAME = "systemd"
STAGE = gs.STATE_DIR / "systemd-stage"
DIST = Path("/root/kjumpd-dist")  # what a user downloaded: the wheel and a save kernel
#: the normal entry's command line, as a Debian machine with a serial console has it
#: (no_console_suspend: a hang on the way into S3 shows on the console); the host boots
#: the first run with the same words
GRUB_DEFAULT = (
    "# /etc/default/grub of the systemd scenario's guest (the host plays GRUB: it boots\n"
    "# root=/dev/vda plus these two lines, and the restore-first entry from grub.cfg)\n"
    'GRUB_CMDLINE_LINUX_DEFAULT=""\n'
    'GRUB_CMDLINE_LINUX="console=ttyS0 panic=1 no_console_suspend kjumpvm.scenario=systemd"\n'
)
#: update-grub for a guest without GRUB: grub.cfg from the /etc/grub.d snippets (the host
#: reads the restore-first entry from it; the normal entry comes from /etc/default/grub)
UPDATE_GRUB = """#!/bin/sh
set -e
mkdir -p /boot/grub
out=/boot/grub/grub.cfg.new
: > "$out"
for f in /etc/grub.d/*; do
    [ -x "$f" ] && "$f" >> "$out"
done
mv "$out" /boot/grub/grub.cfg
echo "update-grub (kjumpvm): /boot/grub/grub.cfg written"
"""
#: what the fast scenarios' image carries of the project, removed before the install
PREINSTALLED = (
    "/usr/lib/python3/dist-packages/kjumpd",
    "/usr/lib/python3/dist-packages/bootloader",
    "/usr/local/bin/kjumpd",
    "/usr/local/bin/kjumpctl",
    "/usr/local/bin/kjump-agent",
    "/usr/share/dbus-1/system.d/org.kjump.Manager1.conf",
    "/etc/kjumpd",
    "/usr/lib/kjumpd",
    "/var/lib/kjumpd",
)
LOGIN1 = (
    "org.freedesktop.login1",
    "/org/freedesktop/login1",
    "org.freedesktop.login1.Manager",
)


class Failure(Exception):
    """Something a user of this machine would notice as wrong."""


def run(*cmd: str, timeout: float = 900.0, check: bool = True) -> subprocess.CompletedProcess:
    say("$ " + " ".join(cmd))
    proc = subprocess.run(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    for line in proc.stdout.splitlines():
        print(f"  | {line}", flush=True)
    if check and proc.returncode != 0:
        tail = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise Failure(f"`{' '.join(cmd)}` exited {proc.returncode}: {tail}")
    return proc


def pid1() -> str:
    return Path("/proc/1/comm").read_text().strip()


def stage_install() -> None:
    event("sd-boot", stage="install", pid1=pid1(), kaslr=kaslr())
    for w in Path("/proc/cmdline").read_text().split():
        if w.startswith("kjumpvm.idle="):
            gs.write_synced(IDLE_WINDOW_FILE, w.split("=", 1)[1])
    for p in PREINSTALLED:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)
    Path("/etc/default/grub").write_text(GRUB_DEFAULT)
    ug = Path("/usr/sbin/update-grub")
    ug.write_text(UPDATE_GRUB)
    ug.chmod(0o755)
    # grub's own kernel hook, as Debian's grub package installs it
    hook = Path("/etc/kernel/postinst.d/zz-update-grub")
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text("#!/bin/sh\nexec update-grub\n")
    hook.chmod(0o755)
    # the running kernel under its Debian name (the image carries it as vmlinuz-kjump)
    os.rename("/boot/vmlinuz-kjump", f"/boot/vmlinuz-{os.uname().release}")
    wheels = sorted(glob.glob(str(DIST / "kjumpd-*.whl")))
    if not wheels:
        raise Failure(f"no kjumpd wheel in {DIST}")
    # README, "Installing on a machine" (the wheel built on the host: the guest is offline)
    run("pip", "install", "--break-system-packages", "--no-index", wheels[-1])
    run("kjumpctl", "setup", "--target", "/var/lib/kjumpd/image", "--size", "1G", "--yes")
    run("kjumpctl", "install", "--dry-run", "--save-kernel", str(DIST / "bzImage"))
    run("kjumpctl", "install", "--save-kernel", str(DIST / "bzImage"))
    grub = Path("/etc/default/grub").read_text()
    event("sd-installed", grub_crashkernel=_crashkernel(grub))
    gs.write_synced(STAGE, "cycles")
    run("systemctl", "reboot", check=False)


def _crashkernel(text: str) -> str:
    words = [w.strip('"') for w in text.split() if "crashkernel=" in w]
    return words[-1].split("crashkernel=", 1)[1] if words else "none"


def kaslr() -> str:
    return "off" if "nokaslr" in Path("/proc/cmdline").read_text().split() else "on"


def wait_for(what: str, ok, timeout: float, every: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise Failure(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def unit_state(unit: str) -> str:
    return run("systemctl", "is-active", unit, check=False).stdout.strip()


def sleep_service_done(cursor: str, unit: str) -> bool:
    """The sleep service ran and ended since ``cursor`` (its journal says so: the unit
    itself is unloaded once it is inactive, its properties gone)."""
    log = journal_since(cursor, "-u", unit)
    return "Deactivated successfully" in log or "Failed with result" in log


def is_system_running() -> str:
    proc = run("systemctl", "is-system-running", "--wait", timeout=300, check=False)
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "unknown"


def failed_units() -> list[str]:
    proc = run("systemctl", "--failed", "--plain", "--no-legend", check=False)
    return [ln.split()[0] for ln in proc.stdout.splitlines() if ln.strip()]


def login1(method: str, *args: str) -> str:
    proc = run("busctl", "call", *LOGIN1, method, *args, timeout=120)
    return proc.stdout.strip()


def can_hibernate_becomes(want: str, problems: list[str], timeout: float = 120.0) -> str:
    """login1's CanHibernate, once it says ``want`` (kjumpd re-checks every 30 s and after
    each transition), or what it still says at the timeout (a problem then)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = login1("CanHibernate")
        said = answer.split()[-1].strip('"') if answer else "none"
        if said == want:
            return said
        if time.monotonic() > deadline:
            problems.append(f"login1 CanHibernate answers {said!r}, expected {want!r}")
            return said
        time.sleep(3)


def journal_cursor() -> str:
    proc = run("journalctl", "-n", "0", "--show-cursor", "--quiet", check=False)
    for ln in proc.stdout.splitlines():
        if ln.startswith("-- cursor: "):
            return ln.split(": ", 1)[1]
    return ""


def journal_since(cursor: str, *filters: str) -> str:
    args = ["journalctl", "--no-pager", "-o", "cat", *filters]
    if cursor:
        args += ["--after-cursor", cursor]
    return run(*args, check=False).stdout


@dataclass(frozen=True)
class Cycle:
    """One way of asking for a sleep, and what a user sees once the machine is back."""

    unit: str  # the sleep service systemd runs (kjumpd's drop-in replaces its ExecStart)
    image: str  # the image state after it
    result: str  # what kjumpd's journal says of it
    verb: str  # what the sleep hooks are told
    s3: str = ""  # in S3 the host wakes the guest ("wake") or cuts its power ("lose")


HIBERNATE = Cycle("systemd-hibernate.service", "CONSUMED", "resumed", "hibernate")
CYCLES = {
    "systemctl": HIBERNATE,
    "login1": HIBERNATE,
    "upgraded": HIBERNATE,
    "moved": HIBERNATE,
    # an image, then S3; woken from RAM the image is discarded
    "hybrid": Cycle(
        "systemd-hybrid-sleep.service", "INVALID", "woke-from-ram", "hybrid-sleep", s3="wake"
    ),
    # the same, power lost in S3: the next boot restores the image
    "then-hibernate": Cycle(
        "systemd-suspend-then-hibernate.service", "CONSUMED", "resumed", "hybrid-sleep", "lose"
    ),
}


def ask(how: str) -> None:
    if how == "login1":
        login1("Hibernate", "b", "false")
    elif how == "hybrid":
        run("systemctl", "hybrid-sleep", timeout=120)
    elif how == "then-hibernate":
        run("systemctl", "suspend-then-hibernate", timeout=120)
    else:
        run("systemctl", "hibernate", timeout=120)


def hibernate_cycle(how: str, before: wl.Status, expected: str, extra: dict) -> list[str]:
    """One sleep asked the way ``how`` says; the checks after the machine is back."""
    c = CYCLES[how]
    problems: list[str] = []
    wbefore = writers.snapshot()
    cursor = journal_cursor()
    if c.s3:
        event("s3-plan", action=c.s3)  # read by the host when it sees the guest in S3
    event("hibernate-start", via=how)
    ask(how)
    # logind starts the service once the delay inhibitors let it (up to InhibitDelayMaxSec);
    # it runs kjumpctl until the machine is back. This process is frozen meanwhile and
    # goes on after the resume.
    wait_for(f"{c.unit} to run and finish", lambda: sleep_service_done(cursor, c.unit), 900)
    event("hibernate-returned", via=how)
    sleep_log = journal_since(cursor, "-u", c.unit)
    if "Deactivated successfully" not in sleep_log:
        problems.append(f"{how}: {c.unit} failed (its journal above)")
    state = gs.image_state()
    extra[f"image_{how}"] = state.replace(" ", "_")
    if not state.startswith(c.image):
        problems.append(f"{how}: image is {state}, expected {c.image}")
    running = is_system_running()
    extra[f"system_{how}"] = running
    if running != "running":
        problems.append(f"{how}: systemctl is-system-running says {running}")
    failed = failed_units()
    if failed:
        problems.append(f"{how}: failed units: {', '.join(failed)}")
    log = journal_since(cursor, "-u", "kjumpd.service")
    if c.result not in log:
        problems.append(f"{how}: the journal has no kjumpd record saying {c.result!r}")
    extra[f"journal_{how}"] = "recorded" if c.result in log and sleep_log else "missing"
    after = wl.query()
    if after.digest != expected or after.pid != before.pid:
        problems.append(f"{how}: the workload is not the same process with the same bytes")
    wproblems, wfields = writers.check(wbefore)
    problems += [f"{how}: {p}" for p in wproblems]
    extra.update({f"{k}_{how}": v for k, v in wfields.items()})
    return problems


SLEEP_LOG = gs.STATE_DIR / "sleep.log"
#: a user's sleep hook (systemd-sleep's directory): kjumpd must run it once per hibernation
HOOK = Path("/usr/lib/systemd/system-sleep/kjumpvm-record")
HOOK_TEXT = f"""#!/bin/sh
echo "hook $1 $2 $SYSTEMD_SLEEP_ACTION" >> {SLEEP_LOG}
"""


def start_sleep_watchers() -> None:
    """The hook, a watcher of PrepareForSleep (once), and a fresh delay inhibitor for the
    next hibernation, as a desktop session holds one."""
    if not HOOK.exists():
        HOOK.write_text(HOOK_TEXT)
        HOOK.chmod(0o755)
    SLEEP_LOG.write_text("")
    watch = [sys.executable, "-m", "kjumpvm.sleepwatch"]
    for who, cmd in (
        ("watch", [*watch, "watch", str(SLEEP_LOG)]),
        (
            "lock",
            ["systemd-inhibit", "--what=sleep", "--mode=delay", "--who=kjumpvm",
             "--why=test delay", *watch, "lock", str(SLEEP_LOG), "once"],
        ),
    ):  # fmt: skip
        ready = Path(f"{SLEEP_LOG}.{who}")
        if who == "watch" and ready.exists():
            continue  # one watcher for every cycle
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        wait_for(f"the {who} PrepareForSleep subscriber", ready.exists, 60, every=0.5)
        if who == "lock":
            ready.unlink()


def check_sleep_log(how: str) -> list[str]:
    """One pre and one post hook call, the delay inhibitor released on PrepareForSleep(true)
    before the pre hook, PrepareForSleep(false) after the post hook."""
    lines = [ln.strip() for ln in SLEEP_LOG.read_text().splitlines() if ln.strip()]
    say(f"sleep log ({how}): {lines}")
    v = CYCLES[how].verb
    want_hooks = [f"hook pre {v} {v}", f"hook post {v} {v}"]
    problems = []
    hooks = [ln for ln in lines if ln.startswith("hook ")]
    if hooks != want_hooks:
        problems.append(f"{how}: sleep hooks ran {hooks}, expected {want_hooks}")
    order = {ln: i for i, ln in reversed(list(enumerate(lines)))}
    lock, pre = order.get("lock PrepareForSleep True"), order.get(want_hooks[0])
    if lock is None or pre is None or lock > pre:
        problems.append(f"{how}: the delay inhibitor was not told before the hooks: {lines}")
    woke, post = order.get("watch PrepareForSleep False"), order.get(want_hooks[1])
    if woke is None or post is None or woke < post:
        problems.append(f"{how}: no PrepareForSleep(false) after the resume: {lines}")
    return problems


def kjumpd_service() -> tuple[str, str]:
    """(MainPID, NRestarts) of kjumpd.service."""
    out = run("systemctl", "show", "-p", "MainPID", "-p", "NRestarts", "kjumpd.service").stdout
    props = dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)
    return props.get("MainPID", "?"), props.get("NRestarts", "?")


def entry_kernel() -> str:
    code = (
        "from kjumpd.daemon import bootentry; from kjumpd.sysroot import Sysroot; "
        "r = bootentry.read_record(Sysroot('/')); print(r.normal_kernel if r else 'none')"
    )
    return run(sys.executable, "-c", code).stdout.strip().splitlines()[-1]


def bumped(release: str) -> str:
    """A newer kernel release than ``release`` as Debian names them (6.12.117 -> 6.12.118)."""
    head = release.split("-", 1)[0].split(".")
    head[-1] = str(int(head[-1]) + 1)
    return ".".join(head) + "-kjumpvm"


CHANGED_WORD = "kjumpvm.cmdline=changed"


def upgrade_kernel_and_cmdline(extra: dict) -> list[str]:
    """A kernel package installed after setup (Debian's postinst.d hooks), then the user
    changes the boot loader's command line: `kjumpctl check` follows each."""
    problems: list[str] = []
    new = bumped(os.uname().release)
    image = f"/boot/vmlinuz-{new}"
    # Another build of the kernel: the running one with 4 KiB appended, as a signed kernel
    # carries its signature (the same bytes under a new name would be the same kernel)
    running = Path(f"/boot/vmlinuz-{os.uname().release}").read_bytes()
    Path(image).write_bytes(running + b"kjumpvm: another build".ljust(4096, b"\0"))
    run("run-parts", "--report", "--exit-on-error", f"--arg={new}", f"--arg={image}",
        "/etc/kernel/postinst.d")  # fmt: skip
    extra["entry_kernel"] = entry_kernel()
    if extra["entry_kernel"] != image:
        problems.append(f"after the kernel upgrade R boots {extra['entry_kernel']}, not {image}")
    if run("kjumpctl", "check", check=False).returncode != 0:
        problems.append("kjumpctl check fails after the kernel hooks ran")
    grub = Path("/etc/default/grub")
    grub.write_text(
        grub.read_text().replace(
            'GRUB_CMDLINE_LINUX_DEFAULT=""', f'GRUB_CMDLINE_LINUX_DEFAULT="{CHANGED_WORD}"'
        )
    )
    run("update-grub")
    stale = run("kjumpctl", "check", check=False)
    extra["check_stale_cmdline"] = f"rc{stale.returncode}"
    if stale.returncode == 0:
        problems.append("kjumpctl check passes although the command line changed")
    run("kjumpctl", "install", "--refresh-boot-entry")
    if run("kjumpctl", "check", check=False).returncode != 0:
        problems.append("kjumpctl check still fails after --refresh-boot-entry")
    event("sd-upgraded", kernel=image)
    return problems


#: the jump area the user asks the boot loader for after the install (more than it wrote)
BIGGER_AREA = "160M"


def set_grub_crashkernel(value: str) -> None:
    grub = Path("/etc/default/grub")
    grub.write_text(re.sub(r"crashkernel=[^\s\"']+", f"crashkernel={value}", grub.read_text()))
    run("update-grub")


def change_jump_area(extra: dict) -> list[str]:
    """The user edits the boot loader's crashkernel=: too small for the save kernel, which
    check must catch (this boot's reservation still serves; the next would not), then
    larger, which install must keep and R must follow at the next boot."""
    problems: list[str] = []
    grub = Path("/etc/default/grub")
    running = _crashkernel(Path("/proc/cmdline").read_text())
    set_grub_crashkernel("16M")
    small = run("kjumpctl", "check", check=False)
    extra["check_small_area"] = f"rc{small.returncode}"
    if small.returncode == 0 or "[FAIL] jump area, next boot" not in small.stdout:
        problems.append("kjumpctl check does not fail for a boot loader asking for 16M")
    run("kjumpctl", "install")
    if _crashkernel(grub.read_text()) != running:
        problems.append(f"install did not put crashkernel={running} back: {grub.read_text()}")
    if run("kjumpctl", "check", check=False).returncode != 0:
        problems.append("kjumpctl check fails after install put the jump area back")
    set_grub_crashkernel(BIGGER_AREA)
    stale = run("kjumpctl", "check", check=False)
    extra["check_bigger_area"] = f"rc{stale.returncode}"
    if stale.returncode == 0:
        problems.append("kjumpctl check passes with an entry made for another crashkernel=")
    run("kjumpctl", "install")
    extra["grub_crashkernel"] = _crashkernel(grub.read_text())
    if extra["grub_crashkernel"] != BIGGER_AREA:
        problems.append(f"install replaced the user's crashkernel={BIGGER_AREA}")
    ok = run("kjumpctl", "check", check=False)
    if ok.returncode != 0 or "takes effect at the next boot" not in ok.stdout:
        problems.append("kjumpctl check does not pass, or not say when the new area applies")
    event("sd-jump-area-changed", grub_crashkernel=extra["grub_crashkernel"])
    return problems


def crash_area() -> tuple[int, int]:
    """(start, size) of this boot's jump area, from /proc/iomem."""
    for line in Path("/proc/iomem").read_text().splitlines():
        rng, _, name = line.strip().partition(" : ")
        if name.strip() == "Crash kernel":
            a, _, b = rng.partition("-")
            return int(a, 16), int(b, 16) + 1 - int(a, 16)
    return 0, 0


@contextmanager
def noted(problems: list[str]) -> Iterator[None]:
    """A stage's steps: what stops them is one more problem for the verdict."""
    try:
        yield
    except Failure as err:
        problems.append(str(err))
    except gs.Missing as err:
        problems.append(f"missing: {err}")
    except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired) as err:
        problems.append(f"{type(err).__name__}: {err}")


def stage_cycles() -> int:
    problems: list[str] = []
    extra: dict[str, str] = {"pid1": pid1(), "kaslr": kaslr()}
    before = after = None
    expected = ""
    with noted(problems):
        event("sd-boot", stage="cycles", pid1=extra["pid1"], kaslr=extra["kaslr"])
        wait_for("kjumpd.service active", lambda: unit_state("kjumpd.service") == "active", 300)
        # no restore-first entry yet: `kjumpctl check` fails, and logind must not offer it
        if run("kjumpctl", "check", check=False).returncode == 0:
            problems.append("kjumpctl check passes before the restore-first entry exists")
        extra["can_hibernate_before"] = can_hibernate_becomes("na", problems)
        run("kjumpctl", "install")
        again = run("kjumpctl", "install")
        if "nothing to do" not in again.stdout:
            problems.append("a second `kjumpctl install` changed something")
        run("kjumpctl", "check")
        extra["can_hibernate"] = can_hibernate_becomes("yes", problems)
        service = kjumpd_service()
        gs.write_synced(STAGE, "hibernating")
        _proc, before = gs.start_workload()
        expected = wl.expected_digest(before.seed, before.size)
        writers.start()
        event("writers-ready")
        for how in ("systemctl", "login1"):
            if problems:
                break
            start_sleep_watchers()
            problems += hibernate_cycle(how, before, expected, extra)
            problems += check_sleep_log(how)
        if not problems:
            problems += upgrade_kernel_and_cmdline(extra)
        if not problems:
            problems += change_jump_area(extra)
        if not problems:
            problems += hibernate_cycle("upgraded", before, expected, extra)
        now = kjumpd_service()
        extra["kjumpd_restarts"] = now[1]
        if now != (service[0], "0"):
            problems.append(f"kjumpd.service was restarted: MainPID/NRestarts {service} -> {now}")
        after = wl.query()
    ok, line = wl.verdict(NAME, before, after, expected, extra, problems)
    if not ok:
        print(line, flush=True)
        return 1
    # no image now: R boots the normal kernel, which must be the new one with the command
    # line the boot loader has now, the larger jump area included (stage "moved")
    gs.write_synced(STAGE, "moved")
    gs.write_synced(gs.STATE_DIR / "systemd-verdict", line)
    event("sd-power-off-without-image")
    return 0


#: the seconds the host asked kjumpd's idle CPU to be measured over (kjumpvm.idle= on the
#: first boot's command line, KJUMPD_IDLE_WINDOW on the host), kept for the last stage
IDLE_WINDOW_FILE = gs.STATE_DIR / "idle-window"


def idle_cpu(window: float) -> str:
    """kjumpd.service's CPU use while idle (its periodic checks, watchdog pings), as a share
    of one CPU over ``window`` seconds, from systemd's accounting (CPUUsageNSec)."""

    def used() -> int:
        out = run("systemctl", "show", "-p", "CPUUsageNSec", "--value", "kjumpd.service")
        return int(out.stdout.strip() or 0)

    a, t0 = used(), time.monotonic()
    time.sleep(window)
    b, t1 = used(), time.monotonic()
    return f"{100 * (b - a) / 1e9 / (t1 - t0):.2f}%"


def stage_moved() -> int:
    """The normal kernel R booted with no image to restore: the new kernel, the current
    command line, the jump area the user asked for (placed anew by the kernel). One more
    hibernation restores through it; then hybrid-sleep (woken from RAM) and
    suspend-then-hibernate (power lost in RAM, restored from the image)."""
    _ok, first = wl.parse_verdict((gs.STATE_DIR / "systemd-verdict").read_text()) or (False, {})
    extra = {k: v for k, v in first.items() if k not in ("scenario", "data", "size", "counter")}
    words = Path("/proc/cmdline").read_text().split()
    rf = [w.split("=", 1)[1] for w in words if w.startswith("kjump.rf=")]
    start, size = crash_area()
    extra.update(cmdline="current", rf=rf[-1] if rf else "none")
    event("sd-boot", stage="moved", pid1=pid1(), kaslr=kaslr(), jump_area=hex(start),
          jump_size=hex(size))  # fmt: skip
    problems: list[str] = []
    before = after = None
    expected = ""
    if CHANGED_WORD not in words:
        problems.append(f"the normal kernel has not the current command line: {words}")
        extra["cmdline"] = "stale"
    if f"crashkernel={BIGGER_AREA}" not in words or size != 160 << 20:
        problems.append(f"this boot's jump area is {size >> 20} MiB, not {BIGGER_AREA}: {words}")
    with noted(problems):
        wait_for("kjumpd.service active", lambda: unit_state("kjumpd.service") == "active", 300)
        run("kjumpctl", "check")
        extra["can_hibernate_moved"] = can_hibernate_becomes("yes", problems)
        _proc, before = gs.start_workload()
        expected = wl.expected_digest(before.seed, before.size)
        writers.start()
        Path(f"{SLEEP_LOG}.watch").unlink(missing_ok=True)  # the last boot's watcher is gone
        for how in ("moved", "hybrid", "then-hibernate"):
            if problems:
                break
            start_sleep_watchers()
            problems += hibernate_cycle(how, before, expected, extra)
            problems += check_sleep_log(how)
            if how == "moved" and crash_area() != (start, size):
                problems.append(f"the jump area after the restore is {crash_area()}")
        after = wl.query()
        if not problems and IDLE_WINDOW_FILE.exists():
            extra["kjumpd_idle_cpu"] = idle_cpu(float(IDLE_WINDOW_FILE.read_text()))
    ok, line = wl.verdict(NAME, before, after, expected, extra, problems)
    print(line, flush=True)
    return 0 if ok else 1


def main() -> int:
    stage = STAGE.read_text().strip() if STAGE.exists() else "install"
    if stage == "install":
        try:
            stage_install()
        except (Failure, OSError, subprocess.TimeoutExpired) as err:
            why = str(err).replace('"', "'")
            print(f'KJUMP-VERDICT: FAIL scenario={NAME} stage=install reason="{why}"', flush=True)
            run("systemctl", "poweroff", check=False)
            return 1
        return 0
    if stage == "cycles":
        rc = stage_cycles()
    elif stage == "moved":
        rc = stage_moved()
    else:
        # the normal kernel booted although an image was being taken: say so, do not loop
        print(
            f'KJUMP-VERDICT: FAIL scenario={NAME} reason="the normal kernel booted again in '
            f'stage {stage}: the image was not restored"',
            flush=True,
        )
        rc = 1
    os.sync()
    run("systemctl", "poweroff", check=False)
    return rc


if __name__ == "__main__":
    sys.exit(main())
