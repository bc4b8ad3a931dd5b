"""Guest side of the VM scenarios (runs inside the guest as ``python3 -m kjumpvm.guest_scenarios NAME``).

Each scenario drives the real product (kjumpctl → D-Bus → kjumpd) the way a user would, and
ends with exactly one ``KJUMP-VERDICT:`` line (see workload.py) that the host asserts on.
Milestones are printed as ``KJUMP-EVENT:`` lines (host timestamps make the timeline).

A scenario whose product pieces are not in the guest prints a FAIL verdict naming what is
missing (never a skip, never a pass).

Scenarios (the host side, test_scenarios.py, boots QEMU accordingly):
  test            a.  hibernate --mode test; workload intact, image written
  shutdown        b.  hibernate --mode shutdown; host restarts QEMU with R; workload continues, CONSUMED
  platform        c.  hibernate --mode platform (ACPI S4); same as b
  suspend-wake    d1. hibernate --mode suspend; host wakes the guest from S3; image invalidated
  suspend-lost    d2. hibernate --mode suspend; host pulls the power in S3; restore from the image
  noimage         e.  first boot: set up the target, power off; R then boots the normal kernel
                      again with this scenario: second boot checks there was no restore
  rollback        f.  a kexec load refused (injected) → hibernate fails, full rollback
  swsusp          bench: the kernel's own hibernation (echo disk > /sys/power/state)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:  # in the guest the package is kjumpvm; on the host tests.vm
    from kjumpvm import workload as wl
    from kjumpvm.vminit import event, say
except ImportError:  # pragma: no cover - host-side import for linting/tests
    from tests.vm import workload as wl  # type: ignore[no-redef]
    from tests.vm.vminit import event, say  # type: ignore[no-redef]

KJUMPCTL = "/usr/local/bin/kjumpctl"
TARGET = Path("/var/lib/kjumpd/target.img")
STATE_DIR = Path("/var/lib/kjumpvm")


class Missing(Exception):
    """A product piece the scenario needs is not in the guest (names it)."""


def kjumpctl(*args: str, timeout: float = 900.0) -> subprocess.CompletedProcess:
    if not os.path.exists(KJUMPCTL):
        raise Missing("kjumpctl is not installed in the guest")
    cmd = [KJUMPCTL, *args]
    say("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        print(f"kjumpctl| {line}", flush=True)
    return proc


def require_command(name: str, issue: str) -> None:
    """FAIL (not skip) when kjumpctl does not offer `name` yet."""
    proc = kjumpctl(name, "--help", timeout=120)
    if proc.returncode != 0:
        raise Missing(f"`kjumpctl {name}` is missing or broken ({issue}): rc {proc.returncode}")


def wait_daemon(timeout: float = 120.0) -> None:
    """kjumpd answers on the bus (kjumpctl status succeeds)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = kjumpctl("status", timeout=60)
        if last.returncode == 0:
            return
        time.sleep(2)
    raise Missing("kjumpd does not answer on the system bus (issue 6): "
                  + (last.stdout.strip().splitlines() or ["no output"])[-1] if last else "")


def image_header() -> dict:
    """The target's header as the product's own reader sees it."""
    try:
        from kjumpd.image import store
    except ImportError as err:
        raise Missing(f"kjumpd.image.store is missing: {err}") from err
    try:
        with store.open_target(str(TARGET), writable=False) as dev:
            return store.read_header(dev).to_dict()
    except Exception as err:  # noqa: BLE001 - reported in the verdict, never a traceback
        return {"state": "UNREADABLE", "state_text": f"UNREADABLE({err})"}


def setup_target() -> None:
    require_command("setup", "issue 6")
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    if TARGET.exists():
        return
    proc = kjumpctl("setup", "--target", str(TARGET), timeout=600)
    if proc.returncode != 0:
        raise Missing(f"`kjumpctl setup` failed (rc {proc.returncode})")
    event("setup-done")


def start_workload(size_mib: int = 200) -> tuple[subprocess.Popen, wl.Status]:
    proc = subprocess.Popen([sys.executable, "-m", "kjumpvm.workload", "serve", str(size_mib)])
    status = wl.wait_ready()
    event("workload-ready", pid=status.pid, size=status.size, mlocked=status.mlocked)
    return proc, status


def image_fields(hdr: dict) -> dict[str, str]:
    out = {"image": str(hdr.get("state_text", hdr.get("state")))}
    raw, stored = hdr.get("raw_bytes") or 0, hdr.get("stored_bytes") or 0
    if raw:
        out["raw_bytes"] = str(raw)
        out["stored_bytes"] = str(stored)
        out["zero_pages"] = str(hdr.get("zero_pages", 0))
    return out


def hibernate_and_check(name: str, mode: str, want_states: tuple[str, ...],
                        inject: str | None = None, want_rc_ok: bool = True) -> int:
    problems: list[str] = []
    before = after = None
    expected = ""
    extra: dict[str, str] = {}
    try:
        wait_daemon()
        require_command("hibernate", "issue 6")
        setup_target()
        _proc, before = start_workload()
        expected = wl.expected_digest(before.seed, before.size)
        if inject == "kexec-refused":
            inject_kexec_refusal()
        event("hibernate-start", mode=mode)
        proc = kjumpctl("hibernate", "--mode", mode)
        event("hibernate-returned", rc=proc.returncode)
        extra["rc"] = str(proc.returncode)
        if want_rc_ok and proc.returncode != 0:
            problems.append(f"kjumpctl hibernate --mode {mode} failed (rc {proc.returncode}): "
                            + (proc.stdout.strip().splitlines() or [""])[-1])
        if not want_rc_ok and proc.returncode == 0:
            problems.append("kjumpctl hibernate succeeded although a failure was injected")
        after = wl.query()
        hdr = image_header()
        extra.update(image_fields(hdr))
        if name == "test" and not hdr.get("stored_bytes"):
            problems.append("no image was written (header stored_bytes is 0)")
        if hdr.get("state") not in want_states:
            problems.append(f"image is {hdr.get('state_text')}, expected one of {'/'.join(want_states)}")
        if inject:
            problems += check_writable_filesystems()
    except Missing as err:
        problems.append(f"missing: {err}")
    except (OSError, ValueError, subprocess.TimeoutExpired) as err:
        problems.append(f"{type(err).__name__}: {err}")
    ok, line = wl.verdict(name, before, after, expected, extra, problems)
    print(line, flush=True)
    return 0 if ok else 1


def inject_kexec_refusal() -> None:
    """Make the kernel refuse every further kexec_load (one-way switch; the VM is disposable).

    The daemon sees a real EPERM from kexec_load(2) at the jump step, after it froze the
    filesystems, and must roll every step back."""
    path = "/proc/sys/kernel/kexec_load_disabled"
    if not os.path.exists(path):
        raise Missing(f"{path} is not in this kernel")
    with open(path, "w") as f:
        f.write("1\n")
    event("inject", what="kexec_load_disabled=1")


def check_writable_filesystems() -> list[str]:
    """After a rollback every filesystem must accept writes again (thawed)."""
    problems = []
    probe = Path("/var/lib/kjumpvm/writable-probe")
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(str(time.time()))
        fd = os.open(probe, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        probe.unlink()
    except OSError as err:
        problems.append(f"root filesystem not writable after rollback: {err}")
    return problems


def scenario_noimage() -> int:
    """e. First boot: set up the target (no image) and power off. The host then boots R,
    which must find no image and boot this normal kernel again: second boot verdict."""
    marker = STATE_DIR / "noimage-stage1"
    problems: list[str] = []
    extra: dict[str, str] = {}
    try:
        if not marker.exists():
            wait_daemon()
            setup_target()
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            marker.write_text(open("/proc/sys/kernel/random/boot_id").read())
            os.sync()
            event("noimage-stage1-done")
            return 0
        hdr = image_header()
        extra.update(image_fields(hdr))
        if hdr.get("state") not in ("EMPTY", "CONSUMED", "INVALID", "ABORTED"):
            problems.append(f"image is {hdr.get('state_text')} after a normal boot")
        boot_id = open("/proc/sys/kernel/random/boot_id").read()
        if boot_id == marker.read_text():
            problems.append("same boot id as the first boot: no reboot happened")
        extra["stage"] = "2"
    except Missing as err:
        problems.append(f"missing: {err}")
    except OSError as err:
        problems.append(f"{type(err).__name__}: {err}")
    print(("KJUMP-VERDICT: PASS scenario=noimage " if not problems else
           "KJUMP-VERDICT: FAIL scenario=noimage ")
          + " ".join(f"{k}={v}" for k, v in extra.items())
          + ("" if not problems else ' reason="' + "; ".join(problems).replace('"', "'") + '"'),
          flush=True)
    return 0 if not problems else 1


def scenario_swsusp() -> int:
    """bench: the kernel's own hibernation to the swap disk /dev/vdb (resume= on the command
    line). The workload survives a power cycle; the verdict comes after the resume."""
    problems: list[str] = []
    before = after = None
    expected = ""
    try:
        if subprocess.run(["mkswap", "/dev/vdb"], stdout=subprocess.DEVNULL).returncode != 0:
            raise Missing("mkswap /dev/vdb failed (the bench attaches a swap disk as vdb)")
        if subprocess.run(["swapon", "/dev/vdb"]).returncode != 0:
            raise Missing("swapon /dev/vdb failed")
        _proc, before = start_workload()
        expected = wl.expected_digest(before.seed, before.size)
        os.sync()
        event("hibernate-start", mode="swsusp")
        with open("/sys/power/state", "w") as f:
            f.write("disk\n")
        event("hibernate-returned", rc=0)
        after = wl.query()
    except Missing as err:
        problems.append(f"missing: {err}")
    except OSError as err:
        problems.append(f"{type(err).__name__}: {err}")
    ok, line = wl.verdict("swsusp", before, after, expected, {}, problems)
    print(line, flush=True)
    return 0 if ok else 1


SCENARIOS = {
    "test": lambda: hibernate_and_check("test", "test", ("SAVED", "CONSUMED", "INVALID")),
    "shutdown": lambda: hibernate_and_check("shutdown", "shutdown", ("CONSUMED",)),
    "platform": lambda: hibernate_and_check("platform", "platform", ("CONSUMED",)),
    "suspend-wake": lambda: hibernate_and_check("suspend-wake", "suspend", ("INVALID",)),
    "suspend-lost": lambda: hibernate_and_check("suspend-lost", "suspend", ("CONSUMED",)),
    "rollback": lambda: hibernate_and_check("rollback", "test",
                                            ("EMPTY", "ABORTED", "INVALID"),
                                            inject="kexec-refused", want_rc_ok=False),
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
