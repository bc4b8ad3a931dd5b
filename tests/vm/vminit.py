#!/usr/bin/python3
"""The VM guest's init (PID 1), installed as /sbin/kjump-vm-init. No systemd.

Mounts proc, sys, dev, run, cgroup2; starts a system dbus-daemon and kjumpd; runs the guest
scenario named on the kernel command line (``kjumpvm.scenario=NAME``, see guest_scenarios.py)
as a child process; reaps orphans; when the scenario ends, syncs and powers the VM off.

Every line it prints starts with ``kjumpvm:`` and goes to the console (ttyS0). Milestones are
printed as ``KJUMP-EVENT: <name> [k=v ...]`` so the host can build a timeline from the moment
each line reaches the serial log.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

EVENT_PREFIX = "KJUMP-EVENT:"
#: written by PID 1's daemon killer (kjumpvm.kill_daemon=frozen): what it killed, and when
KILLED_MARK = Path("/run/kjumpvm/daemon-killed")
FROZEN_RECORD = Path("/run/kjumpd/frozen.json")
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


def event(_event: str, **fields: object) -> None:
    extra = "".join(f" {k}={v}" for k, v in fields.items())
    print(f"{EVENT_PREFIX} {_event}{extra}", flush=True)


def say(msg: str) -> None:
    print(f"kjumpvm: {msg}", flush=True)


def cmdline_arg(name: str, cmdline: str | None = None) -> str | None:
    if cmdline is None:
        with open("/proc/cmdline") as f:
            cmdline = f.read()
    for word in cmdline.split():
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def _mount(fstype: str, target: str, options: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    cmd = ["mount", "-t", fstype, fstype, target]
    if options:
        cmd[1:1] = ["-o", options]
    rc = subprocess.run(cmd, stderr=subprocess.DEVNULL).returncode
    if rc != 0 and not os.path.ismount(target):
        say(f"mount {fstype} on {target} failed (rc {rc})")


def mount_all() -> None:
    _mount("proc", "/proc")
    _mount("sysfs", "/sys")
    if not os.path.ismount("/dev"):
        _mount("devtmpfs", "/dev")
    _mount("devpts", "/dev/pts", "gid=5,mode=620")
    _mount("tmpfs", "/dev/shm", "mode=1777")
    _mount("tmpfs", "/run", "mode=755")
    _mount("cgroup2", "/sys/fs/cgroup")
    _mount("tmpfs", "/tmp", "mode=1777")
    subprocess.run(["mount", "-o", "remount,rw", "/"], check=False)
    os.makedirs("/run/lock", exist_ok=True)
    link_dev_root()


def link_dev_root() -> None:
    """Without an initramfs the kernel names the root device "/dev/root" in /proc/mounts, a
    node devtmpfs does not have. Link it to the real node (what many initramfs-less setups
    do), so tools that open a mount's source by name work. NOTE: this hides that a tool
    should resolve a mount by major:minor (reported to the owners)."""
    if os.path.exists("/dev/root"):
        return
    st = os.stat("/")
    devno = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open(f"/sys/dev/block/{devno}/uevent") as f:
            name = next(line.split("=", 1)[1].strip() for line in f if line.startswith("DEVNAME="))
        os.symlink(name, "/dev/root")
    except (OSError, StopIteration) as err:
        say(f"cannot link /dev/root to {devno}: {err}")


def start_dbus() -> subprocess.Popen | None:
    os.makedirs("/run/dbus", exist_ok=True)
    subprocess.run(["dbus-uuidgen", "--ensure"], check=False)
    try:
        proc = subprocess.Popen(["dbus-daemon", "--system", "--nofork", "--nopidfile"])
    except OSError as err:
        say(f"dbus-daemon did not start: {err}")
        return None
    for _ in range(100):
        if os.path.exists("/run/dbus/system_bus_socket"):
            break
        time.sleep(0.1)
    return proc


def configure_save_kernel() -> None:
    """Fault injection through kjumpd's configuration, before kjumpd starts:
    ``kjumpvm.b_append=W1,W2`` adds words to the save kernel's command line (e.g. an init
    that does not exist makes it panic for real); ``kjumpvm.watchdog=SECONDS`` sets
    ``[save_kernel] watchdog`` (a short one for the hanging save kernel);
    ``kjumpvm.finish=jump-back`` sets ``[hibernate] finish_in_save_kernel = false``;
    ``kjumpvm.warm=1`` sets ``[save_kernel] warm = true``."""
    words = (cmdline_arg("kjumpvm.b_append") or "").replace(",", " ").strip()
    watchdog = cmdline_arg("kjumpvm.watchdog") or ""
    if cmdline_arg("kjumpvm.finish") == "jump-back":
        # bench-vm's comparison: A powers off after the jump back, as before B could
        conf = Path("/etc/kjumpd/kjumpd.toml")
        conf.write_text(conf.read_text() + "\n[hibernate]\nfinish_in_save_kernel = false\n")
        say("the save kernel jumps back; the main kernel powers off")
    if cmdline_arg("kjumpvm.warm") == "1":
        conf = Path("/etc/kjumpd/kjumpd.toml")
        text = conf.read_text().replace("[save_kernel]\n", "[save_kernel]\nwarm = true\n", 1)
        conf.write_text(text)
        say("the save kernel is warmed up and parked ([save_kernel] warm = true)")
    if not words and not watchdog:
        return
    conf = Path("/etc/kjumpd/kjumpd.toml")
    out, section = [], ""
    for line in conf.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        if section == "[save_kernel]" and stripped.startswith("append") and '"' in line and words:
            line = line[: line.rindex('"')] + f" {words}" + line[line.rindex('"') :]
        if section == "[save_kernel]" and stripped.startswith("watchdog") and watchdog:
            continue
        out.append(line)
        if stripped == "[save_kernel]" and watchdog:
            out.append(f"watchdog = {int(watchdog)}")
    conf.write_text("\n".join(out) + "\n")
    if words:
        say(f"the save kernel's command line gets: {words}")
    if watchdog:
        say(f"the save kernel's watchdog: {int(watchdog)} s")


def start_kjumpd() -> subprocess.Popen | None:
    if cmdline_arg("kjumpvm.nodaemon") == "1":
        return None
    try:
        return subprocess.Popen(["/usr/local/bin/kjumpd"], stdout=sys.stdout, stderr=sys.stderr)
    except OSError as err:
        say(f"kjumpd did not start: {err}")
        return None


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = open(f"/proc/{name}/stat").read()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            if stat.rsplit(")", 1)[1].split()[1] == str(pid):
                out.append((int(name), comm))
    return out


def kill_daemon_when_frozen(daemon: subprocess.Popen) -> None:
    """Scenario h: SIGKILL kjumpd inside its frozen window, from PID 1 (never frozen).

    The window is recognised without timing: kjumpd's record says user space and the root
    filesystem are frozen, and kjumpd runs `kexec` to load the save kernel, which it does
    only after both. Writes KILLED_MARK ("frozen ..." or "missed ...")."""

    def watch() -> None:
        while daemon.poll() is None:
            try:
                rec = json.loads(FROZEN_RECORD.read_text())
            except (OSError, ValueError):
                rec = {}
            if rec.get("mounts") and (rec.get("cgroups") or rec.get("parks")):
                kexec = [p for p, comm in _children(daemon.pid) if comm == "kexec"]
                if kexec:
                    os.kill(daemon.pid, signal.SIGKILL)
                    note = (
                        f"frozen pid={daemon.pid} mounts={len(rec['mounts'])} "
                        f"parks={sum(len(p) for _, p in rec.get('parks', []))} "
                        f"during=kexec-load"
                    )
                    KILLED_MARK.parent.mkdir(parents=True, exist_ok=True)
                    KILLED_MARK.write_text(note + "\n")
                    event("daemon-killed", window="frozen")
                    say(f"killed kjumpd inside its frozen window: {note}")
                    return
            time.sleep(0.003)
        KILLED_MARK.parent.mkdir(parents=True, exist_ok=True)
        KILLED_MARK.write_text("missed: kjumpd exited by itself\n")

    threading.Thread(target=watch, name="daemon-killer", daemon=True).start()


def supervise_and_kill(steps: list[str]) -> None:
    """``kjumpvm.kill_daemon=steps:preflight,boot-entry,...``: kjumpd supervised as systemd
    supervises it (Restart=, ExecStopPost=kjumpd --recover), with PID 1 SIGKILLing it the
    moment its log names the next step's phase, one step per hibernation request. Appends
    ``killed step=NAME pid=N`` to KILLED_MARK for each kill."""

    def relay_until_step(daemon: subprocess.Popen, step: str | None) -> bool:
        assert daemon.stderr is not None
        for raw in daemon.stderr:
            sys.stderr.buffer.write(raw)
            sys.stderr.flush()
            if step is not None and f"phase {step} (" in raw.decode(errors="replace"):
                os.kill(daemon.pid, signal.SIGKILL)
                KILLED_MARK.parent.mkdir(parents=True, exist_ok=True)
                with open(KILLED_MARK, "a") as f:
                    f.write(f"killed step={step.replace(' ', '-')} pid={daemon.pid}\n")
                event("daemon-killed", step=step.replace(" ", "-"))
                say(f"killed kjumpd at the start of its phase {step!r}")
                return True
        return False

    def run() -> None:
        pending = list(steps)
        while True:
            daemon = subprocess.Popen(
                ["/usr/local/bin/kjumpd"], stdout=sys.stdout, stderr=subprocess.PIPE
            )
            if not relay_until_step(daemon, pending[0] if pending else None):
                return  # it stopped by itself (the machine is powering off)
            pending.pop(0)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            rc = subprocess.run(["/usr/local/bin/kjumpd", "--recover"]).returncode
            say(f"kjumpd --recover (ExecStopPost) exited {rc}; restarting kjumpd")

    threading.Thread(target=run, name="daemon-supervisor", daemon=True).start()


def stop_everything(grace: float = 10.0) -> None:
    """What an init does before it powers off: SIGTERM to every other process, SIGKILL to
    what is left after ``grace`` seconds, reaping them, so the root filesystem can be
    remounted read-only (a process writing to it keeps it busy)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(-1, sig)
        except OSError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.05)


def power_off() -> None:
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(LINUX_REBOOT_CMD_POWER_OFF)
    say(f"reboot(POWER_OFF) returned errno {ctypes.get_errno()}")


def main() -> int:
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    os.environ.setdefault("HOME", "/root")
    os.environ["PYTHONUNBUFFERED"] = "1"
    mount_all()
    boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
    event("init", boot_id=boot_id)
    start_dbus()
    configure_save_kernel()
    if cmdline_arg("kjumpvm.encrypt"):
        # the administrator's image-key set-up, before kjumpd reads its configuration
        subprocess.run([sys.executable, "-m", "kjumpvm.guest_scenarios", "encrypt-setup"])
    if cmdline_arg("kjumpvm.root_luks") == "prepare":
        # scenario luks-root's first boot: copy this root into LUKS, then power off
        subprocess.run([sys.executable, "-m", "kjumpvm.guest_scenarios", "root-luks-prepare"])
        power_off()
        return 0
    if cmdline_arg("kjumpvm.storage"):
        # the image target on LVM or btrfs, before kjumpd reads its configuration
        subprocess.run([sys.executable, "-m", "kjumpvm.guest_scenarios", "storage-setup"])
    kill = cmdline_arg("kjumpvm.kill_daemon") or ""
    daemon = None
    if kill.startswith("steps:"):
        supervise_and_kill([s.replace("-", " ") for s in kill[len("steps:") :].split(",") if s])
    else:
        daemon = start_kjumpd()
    if daemon is not None and kill == "frozen":
        kill_daemon_when_frozen(daemon)
    scenario = cmdline_arg("kjumpvm.scenario") or "idle"
    event("scenario-start", name=scenario, daemon="yes" if daemon else "no")
    child = subprocess.Popen([sys.executable, "-m", "kjumpvm.guest_scenarios", scenario])
    while True:
        try:
            pid, _status = os.wait()
        except ChildProcessError:
            break
        if pid == child.pid:
            rc = os.waitstatus_to_exitcode(_status)
            event("scenario-end", name=scenario, rc=rc)
            break
    if daemon is not None and daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
    stop_everything()
    event("poweroff")
    rc = subprocess.run(["mount", "-o", "remount,ro", "/"], check=False).returncode
    if rc != 0:
        say(f"remount,ro / failed (rc {rc}): the root filesystem is powered off unclean")
    power_off()
    while True:  # PID 1 must never exit
        time.sleep(60)


if __name__ == "__main__":
    try:
        main()
    except Exception as err:  # noqa: BLE001 - PID 1 must not die: say why, then power off
        say(f"init failed: {type(err).__name__}: {err}")
        power_off()
        while True:
            time.sleep(60)
