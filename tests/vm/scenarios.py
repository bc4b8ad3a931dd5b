"""Host side of the VM scenarios: which QEMU boots a scenario needs, in which order, and what
the guest said. Used by test_scenarios.py, demo.py and bench/vm.py.

One guest image (assets.rootfs) is shared by every scenario; each run boots a copy-on-write
qcow2 overlay of it, so scenarios never touch the shared image and cost no copy. QEMU itself
is run by tests/vm/harness.py (the save-kernel engineer's runner); every serial log is kept
in the run's directory (artifacts).

The verdict is the guest's ``KJUMP-VERDICT:`` line (workload.py), never a timing. The host
reads ``KJUMP-EVENT:`` lines with the time each reached the serial log to build a timeline.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from kjumpd.errors import KjumpError
from tests.vm import assets as vm_assets
from tests.vm.guest_scenarios import GUEST_TARGET
from tests.vm.workload import parse_verdict

VERDICT_RE = re.compile(r"KJUMP-VERDICT:.*")
#: console lines after which a QEMU run will never end by itself
STUCK_RE = r"kjumpd-rf: nothing could be started|Kernel panic - not syncing"
#: a guest on its way to S3 that prints nothing for this long is hung, not slow: the
#: longest quiet stretch in a passing run of the whole VM tier lasts about a minute
QUIET_S = 240.0
EVENT_RE = re.compile(r"KJUMP-EVENT: (\S+)(.*)")

#: main kernel (A) command line, as a distribution boots it: KASLR on, and the jump area
#: wherever the kernel places crashkernel=SIZE (a fixed offset fails whenever the random
#: kernel lies there: 6 boots in 30 of this VM)
A_APPEND = (
    "console=ttyS0 panic=1 no_console_suspend crashkernel=128M "
    "root=/dev/vda rw rootfstype=ext4 init=/sbin/kjump-vm-init"
)
#: scenario k's crashkernel=: the ranges form kdump packages write (the size by the machine's
#: RAM), 128 MiB on this VM's 1 GiB
KDUMP_RANGES = "512M-4G:128M,4G-64G:256M,64G-:512M"
#: the fixed jump area of scenario c: 128 MiB at 512 MiB
FIXED_AREA = (0x2000_0000, 128 << 20)
#: A with KASLR off and the jump area at a fixed offset, the other form kjumpd supports
#: (`kjumpctl setup --jump-area` writes it); scenario c keeps it proven
A_APPEND_FIXED = A_APPEND.replace("console=ttyS0 ", "console=ttyS0 nokaslr ").replace(
    "crashkernel=128M", f"crashkernel={FIXED_AREA[1] >> 20}M@{FIXED_AREA[0]:#x}"
)
#: scenario high-area's jump area: 128 MiB at 4.5 GiB, above the 4 GiB line (a 4 GiB VM has
#: RAM up to 5 GiB), where `crashkernel=SIZE@OFFSET` may put it on a machine with more RAM
HIGH_AREA = (0x1_2000_0000, 128 << 20)
#: A's extra command line per scenario. Without init_on_free (the kernel's default, and
#: Debian's) a wholly free chunk is a free record that B's restore leaves as it finds it;
#: scenario c keeps init_on_free=1, so that path (free chunks restored as zeros) is proven too.
A_APPEND_EXTRA = {"platform": "init_on_free=1"}
#: scenarios whose A is not booted with A_APPEND; the save kernel that can encrypt (its
#: initramfs carries python3-cryptography) needs 144 MiB, and kjumpctl install would reserve
#: that much
A_APPEND_OF = {
    "platform": A_APPEND_FIXED,
    "encrypted": A_APPEND.replace("crashkernel=128M", "crashkernel=160M"),
    "kaslr": A_APPEND.replace("crashkernel=128M", f"crashkernel={KDUMP_RANGES}"),
    "high-area": A_APPEND_FIXED.replace(
        f"crashkernel={FIXED_AREA[1] >> 20}M@{FIXED_AREA[0]:#x}",
        f"crashkernel={HIGH_AREA[1] >> 20}M@{HIGH_AREA[0]:#x}",
    ),
}
#: a CPU model offering AES-NI (OpenSSL's AES-NI code also uses SSSE3), for the encrypted
#: scenarios: what an encrypting laptop has (dm-crypt then uses the kernel's aesni code)
AES_CPU = "qemu64,+pdpe1gb,+ssse3,+sse4.1,+sse4.2,+aes,+pclmulqdq"
CPU_OF = {
    "encrypted": AES_CPU,
    "luks-target": AES_CPU,
    "luks-keyfile": AES_CPU,
    "luks-tpm2": AES_CPU,
}
#: scenarios whose machine has a TPM 2.0 (swtpm; its state in the run directory, kept
#: across the power cycle)
TPM = frozenset({"luks-tpm2"})
#: the image key's passphrase in the encrypted scenario (typed by the host at R's prompt)
PASSPHRASE = "kjumpvm-image-key-passphrase"
PASSPHRASE_PROMPT = r"kjumpd: passphrase for the hibernation image \(key \w+, try (\d) of 3"
MEM_MIB = 1024
SMP = 2
#: QEMU options that make ACPI S3/S4 available to the guest (QEMU's pc machine disables them)
ACPI_SLEEP = ["-global", "PIIX4_PM.disable_s3=0", "-global", "PIIX4_PM.disable_s4=0"]
#: a hardware watchdog (QEMU's default action: reset) in every run, as most PCs have one:
#: each scenario proves the save kernel stops it before jumping (A would be reset otherwise)
WATCHDOG = ["-device", "i6300esb"]


#: console lines that mark a phase boundary (first match per QEMU run), for timelines
MARKS = {
    "kernel-up": r"Run /sbin/kjump-vm-init as init process|kjumpd-rf: restore-first environment up",
    "B-save-up": r"kjump-agent: save kernel up: role save",
    "B-job": r"kjump-agent: taking job \d+ from the job slot",
    "B-saving": r"kjump-agent: saving \d+ MiB",
    "B-saved": r"kjump-agent: SAVED:",
    "R-up": r"kjumpd-rf: restore-first environment up",
    "R-decision": r"kjumpd-rf: decision",
    "B-restore-up": r"kjump-agent: save kernel up: role restore",
    "restore-start": r"kjump-agent: restoring \d+ MiB",
    "B-restored": r"kjump-agent: RESTORED",
    "acpi-s3": r"ACPI: PM: Preparing to enter system sleep state S3",
    "acpi-s4": r"ACPI: PM: Preparing to enter system sleep state S4",
    "power-down": r"reboot: Power down",
    "swsusp-snapshot": r"PM: hibernation: Creating image|PM: Creating hibernation image",
    "swsusp-restore": r"PM: hibernation: Loading|PM: Loading|PM: Image loading",
}


class ScenarioError(KjumpError):
    """A VM scenario could not be run to a verdict."""


@dataclass
class Event:
    t: float  # host monotonic time the line reached the serial log
    name: str
    fields: dict[str, str]
    boot: int  # which QEMU run (0, 1, ...) printed it


@dataclass
class Outcome:
    name: str
    run_dir: Path
    passed: bool = False
    verdict: dict[str, str] = field(default_factory=dict)
    verdict_line: str = ""
    events: list[Event] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    boots: list[dict] = field(default_factory=list)  # per QEMU run: start, end, how it ended
    problems: list[str] = field(default_factory=list)
    marks: list[Event] = field(default_factory=list)  # MARKS seen, with their console line
    results: list[dict] = field(default_factory=list)  # kjumpctl's result records (KJUMP-RESULT)

    def summary(self) -> str:
        text = self.verdict_line or "no verdict line"
        if self.problems:
            text += " | host: " + "; ".join(self.problems)
        return f"{text} (serial logs: {', '.join(str(p) for p in self.logs)})"

    def event(self, name: str) -> Event | None:
        return next((e for e in self.events if e.name == name), None)

    def console(self, pattern: str) -> list[re.Match[str]]:
        """Every line of the scenario's serial logs that matches ``pattern``."""
        rx = re.compile(pattern)
        lines = [
            ln for p in self.logs if p.exists() for ln in p.read_text(errors="replace").splitlines()
        ]
        return [m for m in (rx.search(ln) for ln in lines) if m]

    def mark(self, name: str, boot: int | None = None) -> Event | None:
        """The first console line of MARKS[name] (in QEMU run ``boot`` when given)."""
        return next(
            (e for e in self.marks if e.name == name and (boot is None or e.boot == boot)), None
        )

    def boot_span(self, boot: int) -> tuple[float | None, float | None]:
        """(start, end) host times of QEMU run ``boot``."""
        start = next(
            (b["start"] for b in self.boots if b.get("boot") == boot and "start" in b), None
        )
        end = next((b["end"] for b in self.boots if b.get("boot") == boot and "end" in b), None)
        return start, end


def _parse_fields(text: str) -> dict[str, str]:
    out = {}
    for word in text.split():
        k, eq, v = word.partition("=")
        if eq:
            out[k] = v
    return out


def make_overlay(base: Path, run_dir: Path, name: str = "disk.qcow2") -> Path:
    """A copy-on-write qcow2 layer over base (raw or qcow2): scenarios never write base."""
    run_dir.mkdir(parents=True, exist_ok=True)
    overlay = run_dir / name
    if overlay.exists():
        overlay.unlink()
    fmt = "qcow2" if base.suffix == ".qcow2" else "raw"
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt, str(overlay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        raise ScenarioError(
            "cannot create the disk overlay",
            why=proc.stdout.strip(),
            fix="install qemu-utils (tools/setup.sh)",
        )
    return overlay


def fsck_overlay(overlay: Path, run_dir: Path) -> tuple[bool, str]:
    """The guest's root filesystem as the overlay now holds it, checked as the next boot
    would find it: its journal replayed first (on a scratch copy), as the kernel replays it
    at mount after a power cut, then ``e2fsck -fn``, which must find nothing."""
    try:
        with guest_disk(overlay, run_dir) as raw:
            replay = subprocess.run(
                ["e2fsck", "-E", "journal_only", "-y", str(raw)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            proc = subprocess.run(
                ["e2fsck", "-fn", str(raw)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
    except ScenarioError as err:
        return False, f"{err.message}: {err.why}"
    (run_dir / "fsck.log").write_text(replay.stdout + "\n" + proc.stdout)
    return proc.returncode == 0, proc.stdout.strip().splitlines()[-1] if proc.stdout else ""


@contextmanager
def guest_disk(disk: Path, run_dir: Path) -> Iterator[Path]:
    """A raw scratch copy of a guest disk (qcow2) as it is now, for debugfs and e2fsck;
    deleted at the end of the block. It is made in /dev/shm when that has room for the
    whole disk: writing a GiB to the host's disk between two boots takes seconds there."""
    scratch = run_dir
    try:
        size = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(disk)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["virtual-size"]
        shm = os.statvfs("/dev/shm")
        if shm.f_bavail * shm.f_frsize > 2 * size:
            scratch = Path("/dev/shm")
    except (OSError, ValueError, KeyError, subprocess.CalledProcessError):
        pass
    raw = scratch / f"kjt-{os.getpid()}-{disk.stem}.raw"
    conv = subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(disk), str(raw)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        if conv.returncode != 0:
            raise ScenarioError("cannot read the guest disk", why=conv.stdout.strip())
        yield raw
    finally:
        raw.unlink(missing_ok=True)


def read_guest_files(overlay: Path, paths: list[str], run_dir: Path) -> dict[str, Path]:
    """Copy files out of the guest's root filesystem (as a boot loader reads /boot)."""
    with guest_disk(overlay, run_dir) as raw:
        return dump_guest_files(raw, paths, run_dir)


def dump_guest_files(raw: Path, paths: list[str], run_dir: Path) -> dict[str, Path]:
    """``read_guest_files`` from a raw copy (``guest_disk``) already made."""
    out: dict[str, Path] = {}
    for path in paths:
        dst = run_dir / ("guest" + path.replace("/", "_"))
        dst.unlink(missing_ok=True)
        proc = subprocess.run(
            ["debugfs", "-R", f"dump -p {path} {dst}", str(raw)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if (
            proc.returncode != 0
            or not dst.exists()
            or (dst.stat().st_size == 0 and "not found" in proc.stdout)
        ):
            raise ScenarioError(
                f"{path} is not on the guest disk",
                why=proc.stdout.strip().splitlines()[-1:]
                and proc.stdout.strip().splitlines()[-1]
                or "debugfs failed",
                fix="did `kjumpctl setup` run in the guest?",
            )
        out[path] = dst
    return out


def target_sectors(base: Path, run_dir: Path, start: int, length: int) -> list[int]:
    """The disk sectors (512 bytes) holding bytes [start, start+length) of the guest's image
    target file, read from its ext4 extent tree with debugfs on a raw copy of ``base``."""
    with guest_disk(base, run_dir) as raw:
        blocks = range(start // 4096, (start + length + 4095) // 4096)
        cmds = run_dir / "bmap.cmds"
        cmds.write_text("".join(f"bmap {GUEST_TARGET} {b}\n" for b in blocks))
        proc = subprocess.run(
            ["debugfs", "-f", str(cmds), str(raw)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    phys = [int(w) for w in re.findall(r"^(\d+)$", proc.stdout, re.M)]
    if len(phys) != len(blocks) or not all(phys):
        raise ScenarioError(
            f"debugfs could not map {GUEST_TARGET} on the guest disk",
            why=proc.stdout.strip()[-300:],
            fix="was the disk prepared (`kjumpctl setup` in vm-assets)?",
        )
    return [p * 8 for p in phys]  # ext4 blocks of 4 KiB: 8 sectors each


def blkdebug_disk(overlay: Path, run_dir: Path, iotype: str, sectors: list[int]) -> list[str]:
    """QEMU arguments for the guest disk (/dev/vda) behind QEMU's blkdebug driver, which
    fails every ``iotype`` ("read" or "write") request touching one of ``sectors`` with EIO:
    a disk going bad under the target. Everything else reads and writes normally."""
    conf = run_dir / f"blkdebug-{iotype}.conf"
    conf.write_text(
        "".join(
            f'[inject-error]\nevent = "{iotype}_aio"\nerrno = "5"\nsector = "{sec}"\n'
            f'once = "off"\nimmediately = "off"\niotype = "{iotype}"\n\n'
            for sec in sectors
        )
    )
    node = {
        "driver": "raw",
        "node-name": "vda0",
        "cache": {"no-flush": True},
        "file": {
            "driver": "blkdebug",
            "config": str(conf),
            "image": {"driver": "qcow2", "file": {"driver": "file", "filename": str(overlay)}},
        },
    }
    return ["-blockdev", json.dumps(node), "-device", "virtio-blk-pci,drive=vda0"]


@dataclass
class RestoreEntry:
    """The restore-first boot entry as the guest's `kjumpctl setup` installed it."""

    kernel: Path
    initrd: Path
    cmdline: str


GRUB_CFG = "/boot/grub/grub.cfg"
RESTORE_ENTRY_ID = "kjumpd-restore"


GRUBENV = "/boot/grub/grubenv"


def _expand(word: str, env: dict[str, str]) -> list[str]:
    """GRUB's expansion of an unquoted ``$name``/``${name}`` word: its value's words."""
    m = re.fullmatch(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", word)
    if m is None:
        return [word]
    return env.get(m.group(1), "").split()


def parse_grub_entry(
    cfg: str, entry_id: str = RESTORE_ENTRY_ID, env: dict[str, str] | None = None
) -> tuple[str, str, str] | None:
    """(kernel, initrd, cmdline) of the menuentry ``--id entry_id`` in a grub.cfg text, with
    whole-word variables expanded from ``env`` (grubenv), as GRUB boots it."""
    inside = False
    kernel = initrd = cmdline = None
    for raw in cfg.splitlines():
        line = raw.strip()
        if line.startswith("menuentry "):
            inside = f"--id {entry_id}" in line or f"--id '{entry_id}'" in line
            continue
        if not inside:
            continue
        if line.startswith("}"):
            break
        raw = shlex.split(line, posix=False)  # GRUB's quoting: "$" quoted is literal
        words = [w for r in raw for w in _expand(r, env or {})]
        words = [w[1:-1] if len(w) > 1 and w[0] == w[-1] == "'" else w for w in words]
        if words and words[0] in ("linux", "linux16", "linuxefi") and len(words) > 1:
            kernel, cmdline = words[1], " ".join(words[2:])
        elif words and words[0] in ("initrd", "initrd16", "initrdefi") and len(words) > 1:
            initrd = words[1]
    if kernel is None or initrd is None:
        return None
    return kernel, initrd, cmdline or ""


def restore_entry(overlay: Path, run_dir: Path) -> RestoreEntry:
    """What GRUB boots for the kjumpd-restore entry: read /boot/grub/grub.cfg from the guest
    disk, then the kernel and initramfs its linux/initrd lines name (all on the root fs)."""
    from kjumpd.daemon.bootentry import grubenv_parse

    with guest_disk(overlay, run_dir) as raw:
        files = dump_guest_files(raw, [GRUB_CFG], run_dir)
        try:
            env = grubenv_parse(dump_guest_files(raw, [GRUBENV], run_dir)[GRUBENV].read_bytes())
        except ScenarioError:
            env = {}  # no grubenv: GRUB's variables are unset
        entry = parse_grub_entry(files[GRUB_CFG].read_text(errors="replace"), env=env)
        if entry is None:
            raise ScenarioError(
                f"{GRUB_CFG} in the guest has no '{RESTORE_ENTRY_ID}' menu entry",
                fix="kjumpctl setup --bootloader restore-first, then update-grub",
            )
        kernel, initrd, cmdline = entry
        got = dump_guest_files(raw, [kernel, initrd], run_dir)
    return RestoreEntry(got[kernel], got[initrd], " ".join(cmdline.split()))


def _harness():
    try:
        from tests.vm import harness
    except ImportError as err:  # pragma: no cover - the harness is part of the tier
        raise ScenarioError("tests/vm/harness.py is missing", why=str(err)) from err
    return harness


class Runner:
    """Boots one scenario's QEMU runs on one overlay and gathers what the guest printed."""

    def __init__(
        self,
        name: str,
        guest_scenario: str,
        assets: vm_assets.Assets,
        run_dir: Path,
        extra_qemu: tuple[str, ...] = (),
        extra_disks: tuple[Path, ...] = (),
        bus_disks: tuple[tuple[str, Path], ...] = (),
        append_extra: str = "",
        a_append: str = A_APPEND,
        base: str = "prepared",
        memory_mb: int = MEM_MIB,
    ) -> None:
        """``base``: the disk the overlay covers, "prepared" (kjumpctl setup done) or
        "rootfs" (a machine kjumpd was never set up on)."""
        assets.require("kernel", "save_initramfs", "restore_initramfs", "rootfs", base)
        self.h = _harness()
        self.assets = assets
        self.guest_scenario = guest_scenario
        self.outcome = Outcome(name=name, run_dir=run_dir)
        self.overlay = make_overlay(Path(getattr(assets, base)), run_dir)
        self.append = f"{a_append} kjumpvm.scenario={guest_scenario} {append_extra}".strip()
        self.cfg = self.h.VMConfig(
            kernel=Path(assets.kernel),
            append=self.append,
            disks=[self.overlay, *extra_disks],
            disk_format="qcow2",
            memory_mb=memory_mb,
            smp=SMP,
            extra=(*ACPI_SLEEP, *WATCHDOG, *extra_qemu),
            cpu=CPU_OF.get(name, self.h.VMConfig.cpu),
            tpm_state=run_dir / "tpm" if name in TPM else None,
            bus_disks=bus_disks,
        )
        self.vm = self.h.VM(self.cfg, artifacts=run_dir, name=name)
        self.t0 = time.monotonic()
        self._collected = 0

    # -- console -----------------------------------------------------------------------
    def collect(self) -> None:
        """Take the events and verdict of the current QEMU run into the outcome."""
        vm = self.vm
        boot = vm.run
        seen = {(m.name, m.boot) for m in self.outcome.marks}
        for line in vm.lines:
            t = vm.started - self.t0 + line.t
            m = EVENT_RE.search(line.text)
            if m:
                self.outcome.events.append(Event(t, m.group(1), _parse_fields(m.group(2)), boot))
            m = VERDICT_RE.search(line.text)
            if m and not self.outcome.verdict_line:
                parsed = parse_verdict(m.group(0))
                if parsed:
                    self.outcome.passed, self.outcome.verdict = parsed
                    self.outcome.verdict_line = m.group(0)
            if line.text.startswith("KJUMP-RESULT:"):
                try:
                    self.outcome.results.append(json.loads(line.text.split(":", 1)[1]))
                except ValueError:
                    pass
            for mark, rx in MARKS.items():
                if (mark, boot) not in seen and re.search(rx, line.text):
                    seen.add((mark, boot))
                    self.outcome.marks.append(Event(t, mark, {"line": line.text.strip()}, boot))
        if vm.log_path not in self.outcome.logs:
            self.outcome.logs.append(vm.log_path)

    def has_verdict(self) -> bool:
        return any(VERDICT_RE.search(ln.text) for ln in self.vm.lines)

    def boot(self, **changes) -> None:
        if self.vm.proc is None:
            if changes:
                self.vm.cfg = replace(self.vm.cfg, **changes)
            self.vm.start()
        else:
            self.vm.restart(**changes)
        self.outcome.boots.append(
            {
                "boot": self.vm.run,
                "kernel": str(self.vm.cfg.kernel),
                "initrd": str(self.vm.cfg.initrd or ""),
                "append": self.vm.cfg.append,
                "start": self.vm.started - self.t0,
            }
        )

    def wait_exit(self, timeout: float) -> int:
        """Wait for this QEMU run to end (the guest powers off after its verdict). A console
        line saying the guest is stuck (R's rescue shell) ends the run at once."""
        rc = -1
        try:
            self.vm.wait_for(STUCK_RE, timeout)
            self.outcome.problems.append(
                f"stuck: {self.vm.last_line.text.strip()} (see {self.vm.log_path})"
            )
            self.vm.stop()
        except self.h.VMTimeout as err:
            self.outcome.problems.append(str(err))
            self.vm.stop()
        except self.h.VMError:
            rc = self.vm.wait_exit(30)  # it exited: the normal end
        # the moment QEMU exited (the console reader saw it), not when this thread woke up
        end = self.vm.ended if self.vm.ended is not None else time.monotonic()
        self.outcome.boots.append({"boot": self.vm.run, "end": end - self.t0, "rc": rc})
        self.collect()
        return rc

    def wait_suspended(self, timeout: float, required: bool = True) -> bool:
        """Poll QMP until the guest is in S3 (or it printed a verdict, is stuck or exited).
        ``required``: not reaching S3 within ``timeout`` is a problem. A guest that is
        neither in S3 nor printing for QUIET_S is hung (a problem, whatever ``required``):
        its registers are saved beside the console log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.vm.proc is None or self.vm.proc.poll() is not None or self.has_verdict():
                return False
            if self.vm.find(STUCK_RE):
                return False
            try:
                status = self.vm.qmp("query-status")
            except self.h.VMError:
                return False
            if status.get("status") == "suspended":
                self.outcome.events.append(
                    Event(time.monotonic() - self.t0, "host-saw-s3", {}, self.vm.run)
                )
                return True
            if self.vm.quiet_for() > QUIET_S:
                self._hung(status.get("status", "?"))
                return False
            time.sleep(1)
        if required:
            self.outcome.problems.append(f"the guest did not reach S3 within {timeout:.0f} s")
        return False

    def _hung(self, status: str) -> None:
        last = self.vm.lines[-1].text.strip() if self.vm.lines else "(none)"
        regs = self.vm.dump_registers()
        self.outcome.problems.append(
            f"hung: the guest printed nothing for {self.vm.quiet_for():.0f} s and is not in "
            f"S3 (QEMU status {status}); its last line: {last!r} (see {self.vm.log_path}"
            + (f", registers in {regs}" if regs else "")
            + ")"
        )
        self.stop()

    def boot_restore_first(self, timeout: float, wait: bool = True, **changes) -> None:
        """Power on again the way a boot loader would: R's kernel + initramfs + command line
        (``changes``: other VMConfig fields for this power-on, e.g. another RAM size).
        ``wait``: wait for this run to end; else return once it is started."""
        try:
            entry = restore_entry(self.overlay, self.outcome.run_dir)
        except ScenarioError as err:
            self.outcome.problems.append(f"missing: restore-first entry: {err.message}")
            return
        self.outcome.events.append(
            Event(time.monotonic() - self.t0, "host-boots-R", {}, self.vm.run)
        )
        # The entry's own line (kjump.target=, kjump.offset=) plus the VM's serial console,
        # as GRUB_CMDLINE_LINUX would add it; without it R's lines never reach the log.
        # NOTE (reported): `kjumpctl setup` writes the entry without the system's console=.
        append = entry.cmdline if "console=" in entry.cmdline else f"console=ttyS0 {entry.cmdline}"
        self.boot(kernel=entry.kernel, initrd=entry.initrd, append=append, **changes)
        if wait:
            self.wait_exit(timeout)

    def power_cut_at(self, pattern: str, timeout: float) -> bool:
        """Cut the power (QEMU quits: every write the guest issued is on the disk, nothing
        else) as soon as a console line matches ``pattern``. False (a problem noted) when
        the run ended or timed out before such a line."""
        try:
            self.vm.wait_for(pattern, timeout, fail=STUCK_RE)
        except self.h.VMError as err:
            self.outcome.problems.append(f"no power cut at {pattern!r}: {err}")
            self.stop()
            return False
        self.stop()
        self.outcome.events.append(
            Event(time.monotonic() - self.t0, "host-power-cut", {"at": pattern}, self.vm.run)
        )
        return True

    def stop(self) -> None:
        running = self.vm.proc is not None and self.vm.proc.poll() is None
        self.vm.stop()
        if running:
            self.outcome.boots.append(
                {
                    "boot": self.vm.run,
                    "end": time.monotonic() - self.t0,
                    "rc": "stopped by the host",
                }
            )
        self.collect()

    def finish(self, fsck: bool = False) -> Outcome:
        """The outcome once the last run ended; ``fsck``: e2fsck -fn the guest's disk too."""
        if self.vm.proc is not None and self.vm.proc.poll() is None:
            self.stop()
        if not self.outcome.verdict_line and not self.outcome.problems:
            self.outcome.problems.append("the guest printed no verdict")
        said = self.outcome.verdict.get("scenario")
        if self.outcome.verdict_line and said != self.guest_scenario:
            self.outcome.problems.append(
                f"the verdict is scenario {said}'s, not {self.guest_scenario}'s "
                "(the normal kernel booted instead?)"
            )
        if fsck:
            ok, msg = fsck_overlay(self.overlay, self.outcome.run_dir)
            self.outcome.verdict["fsck"] = "clean" if ok else msg
            if not ok:
                self.outcome.problems.append(f"e2fsck -fn after the scenario: {msg}")
        if self.outcome.problems:
            self.outcome.passed = False
        return self.outcome


#: scenarios whose guest builds a storage stack on a blank second disk (/dev/vdb)
STORAGE_DISKS = frozenset(
    {
        "lvm",
        "lvm-raw",
        "btrfs",
        "luks",
        "luks-stale",
        "luks-target",
        "luks-keyfile",
        "luks-tpm2",
        "luks-root",
    }
)
#: scenarios whose blank second disk is on the bus real machines boot from instead of
#: virtio: the target on a partition of an NVMe namespace or of a SATA disk behind AHCI
STORAGE_BUS = {"nvme": "nvme", "sata": "sata"}
#: luks-root's disk holds the whole root filesystem and the target
STORAGE_SIZE = {"luks-root": "3G"}
#: scenarios whose guest disk is checked with e2fsck once the guest is off: the ones with
#: disk writers running through the hibernation, the storage scenarios among them
FSCK_AFTER = (
    frozenset(
        {
            "test",
            "shutdown",
            "platform",
            "rollback",
            "checkpoint",
            "killed",
            "killed-steps",
            "lost-save-up",
            "lost-save-start",
            "lost-save-mid",
            "lost-restore",
            "restore-attempts",
            "ram-changed",
            "io-error-save",
            "io-error-restore",
            "b-panic",
            "b-hang",
            "b-no-disk",
            "high-area",
            "kaslr",
            "encrypted",
            "warm",
        }
    )
    | STORAGE_DISKS
    | frozenset(STORAGE_BUS)
)
#: where the host cuts the power during B's save: B up (nothing written yet), the image
#: begun (header WRITING), a fifth or more of the memory written; all before the commit
SAVE_CUTS = {
    "lost-save-up": r"kjump-agent: save kernel up: role save",
    "lost-save-start": r"kjump-agent: saving +0%",
    "lost-save-mid": r"kjump-agent: saving +[1-9]\d%",
}
#: where the host cuts the power during B's restore: B up, mid-way through A's memory
RESTORE_CUTS = (r"kjump-agent: restoring +0%", r"kjump-agent: restoring +[1-9]\d%")


def _fault_flow(
    r: Runner, name: str, flow: str, timeout: float, run_dir: Path, sectors: list[int]
) -> None:
    """The host's part of the fault matrix: where the power is cut, what the next power-on
    is (R, with more RAM, with a failing disk)."""
    if flow == "lost-save":
        if r.power_cut_at(SAVE_CUTS[name], timeout):
            r.boot_restore_first(timeout)  # R must boot the normal system: no image
        return
    if flow == "b-hang":
        _hang_flow(r, timeout)
        return
    if flow == "b-panic":
        try:
            r.vm.wait_for(r"Kernel panic - not syncing", timeout)
            r.vm.wait_exit(120)  # panic=1: the machine resets (QEMU -no-reboot exits)
        except r.h.VMError as err:
            r.outcome.problems.append(f"the save kernel did not panic and reset: {err}")
            r.stop()
            return
        r.outcome.events.append(Event(time.monotonic() - r.t0, "host-saw-b-panic", {}, r.vm.run))
        r.collect()
        r.boot_restore_first(timeout)  # R: no image was committed, the normal system boots
        return
    r.wait_exit(timeout)  # the first run saves (mode shutdown) and powers off
    if r.has_verdict():
        return  # the guest could not hibernate: its verdict says why
    if flow == "io-error-save":
        return
    if flow == "lost-restore":
        for cut in RESTORE_CUTS:
            r.boot_restore_first(timeout, wait=False)
            if not r.power_cut_at(cut, timeout):
                return
        r.boot_restore_first(timeout)  # the third attempt restores
    elif flow == "restore-attempts":
        for _ in range(3):  # the restore-first default max_attempts
            r.boot_restore_first(timeout, wait=False)
            if not r.power_cut_at(RESTORE_CUTS[0], timeout):
                return
        r.boot_restore_first(timeout)  # R gives up: INVALID(attempts), normal boot
    elif flow == "ram-changed":
        r.boot_restore_first(timeout, memory_mb=MEM_MIB + 256)
    elif flow == "io-error-restore":
        blk = blkdebug_disk(r.overlay, run_dir, "read", sectors)
        r.boot_restore_first(timeout, disks=[], extra=(*r.vm.cfg.extra, *blk))


#: the stall that resets the hanging save kernel in scenario b-hang (kjumpd's default is 120)
HANG_WATCHDOG = 20


def _hang_flow(r: Runner, timeout: float) -> None:
    """The save kernel hangs: once it is saving, the host throttles the disk to a trickle
    (512 bytes/s), so no chunk completes; its watchdog must reset the machine (QEMU reports
    WATCHDOG, and -no-reboot turns the reset into an exit), and R then boots normally."""
    try:
        r.vm.wait_for(SAVE_CUTS["lost-save-start"], timeout, fail=STUCK_RE)
        disks = [b for b in r.vm.qmp("query-block") if b.get("inserted")]
        for blk in disks:
            r.vm.qmp(
                "block_set_io_throttle",
                id=blk["qdev"],
                bps=512,
                bps_rd=0,
                bps_wr=0,
                iops=1,
                iops_rd=0,
                iops_wr=0,
            )
        r.outcome.events.append(
            Event(time.monotonic() - r.t0, "host-stalled-disk", {"disks": len(disks)}, r.vm.run)
        )
        # the stall, then up to the hardware timeout (at most the stall here), then slack
        r.vm.wait_exit(4 * HANG_WATCHDOG + 120)
    except r.h.VMError as err:
        r.outcome.problems.append(f"the hanging save kernel was not reset: {err}")
        r.stop()
        return
    fired = [e for e in r.vm.qmp_events if e.get("event") == "WATCHDOG"]
    if not fired:
        r.outcome.problems.append(
            "QEMU exited without a WATCHDOG event: something else ended the hanging save kernel"
        )
    else:
        action = fired[0].get("data", {}).get("action", "")
        r.outcome.events.append(
            Event(time.monotonic() - r.t0, "host-saw-watchdog", {"action": action}, r.vm.run)
        )
    r.collect()
    r.boot_restore_first(timeout)  # R: the image is incomplete (WRITING), the normal boot


#: how long one QEMU run may take (TCG, 2 vCPUs shared with other work)
BOOT_TIMEOUT = 900.0

#: what the host, playing GRUB, puts before /etc/default/grub's two command line variables
GRUB_ROOT = "root=/dev/vda rw rootfstype=ext4"
#: the systemd scenario's first boot: a Debian machine with a serial console, KASLR on
#: (guest_systemd.GRUB_DEFAULT holds the same words for the boots after it)
SYSTEMD_APPEND = f"{GRUB_ROOT} console=ttyS0 panic=1 no_console_suspend"


def _encrypted_flow(r: Runner, timeout: float) -> None:
    """Scenario encrypted: A hibernates (mode shutdown) with an image key. While the VM is
    off, the host looks for the workload's bytes on the disk (an encrypted image must not
    hold them); then it powers on through R and types at R's prompt a wrong passphrase,
    then the right one."""
    _scan_then_passphrase(r, timeout, [r.overlay], PASSPHRASE_PROMPT, PASSPHRASE)


def _scan_then_passphrase(
    r: Runner, timeout: float, disks: list[Path], prompt: str, passphrase: str
) -> None:
    """Once A powered off with an image: look for the workload's bytes on ``disks`` (none
    may be there in plaintext), power on through R and type at its ``prompt`` a wrong
    passphrase, then the right one."""
    from tests.vm import workload

    r.wait_exit(timeout)
    if r.has_verdict():
        return  # it never powered off with an image: the guest's verdict says why
    page = next(workload.expected_chunks(workload.DEFAULT_SEED, workload.DEFAULT_SIZE))
    needles = [page[4096:8192], page[300000:304096]]
    found = sum(_disk_holds(d, r.outcome.run_dir, needles) for d in disks)
    r.outcome.events.append(
        Event(time.monotonic() - r.t0, "host-scanned-disk", {"plaintext": str(found)}, r.vm.run)
    )
    if found:
        r.outcome.problems.append(f"the workload's memory is on a disk in plaintext ({found})")
    r.boot_restore_first(timeout, wait=False)
    for answer in ("not-the-passphrase", passphrase):
        r.vm.wait_for(prompt, timeout, fail=STUCK_RE)
        r.vm.send(answer + "\n")
    r.wait_exit(timeout)


#: the LUKS passphrase of scenario luks-target (guest_scenarios.LUKS_PASSPHRASE)
LUKS_PASSPHRASE = "kjumpvm-luks-passphrase"
LUKS_PROMPT = (
    r"kjumpd: passphrase for disk (/dev/\S+) \(LUKS [0-9a-f-]+\) to restore the hibernated "
    r"system \(try (\d) of 3"
)


def _luks_target_flow(r: Runner, timeout: float, run_dir: Path) -> None:
    """Scenario luks-target: A hibernates (mode shutdown) to a target inside LUKS2; with the
    machine off the host scans both disks (the image is inside the volume), then types at
    R's prompt for the volume's passphrase a wrong one, then the right one."""
    disks = [r.overlay, run_dir / "storage.qcow2"]
    _scan_then_passphrase(r, timeout, disks, LUKS_PROMPT, LUKS_PASSPHRASE)


def _luks_root_flow(r: Runner, timeout: float) -> None:
    """Scenario luks-root: the first boot copies A's root filesystem into LUKS2 on the second
    disk and powers off (the plaintext disk then holds only /boot); A boots from LUKS through
    the normal initramfs, which unlocks it with its key file, sets the target up on that root
    and hibernates (mode shutdown); R unlocks the volume with the same key file and restores."""
    r.wait_exit(timeout)
    if not r.vm.find(r"KJUMP-EVENT: root-luks-prepared ok=yes"):
        r.outcome.problems.append("the first boot did not copy the root into LUKS")
        return
    if not r.assets.luksroot_initramfs:
        r.outcome.problems.append("missing: the luks-root initramfs asset")
        return
    append = r.append.replace("kjumpvm.root_luks=prepare", "kjumpvm.storage=luks-root")
    append = append.replace("root=/dev/vda", "root=/dev/mapper/cryptroot")
    r.boot(initrd=Path(r.assets.luksroot_initramfs), append=append)
    r.wait_exit(timeout)
    if not r.has_verdict():  # it powered off with an image: boot R
        r.boot_restore_first(timeout)


def _luks_stale_flow(r: Runner, timeout: float, run_dir: Path) -> None:
    """Scenario luks-stale: A hibernates with a filesystem on LVM inside LUKS2 frozen. While
    the machine is off, the host overwrites the sector of that filesystem's superblock on
    the disk (as a mount elsewhere would change it; without the key the host can only change
    ciphertext); then it powers on through R, which must refuse the image as stale."""
    r.wait_exit(timeout)
    if r.has_verdict():
        return  # it never powered off with an image: the guest's verdict says why
    setup = next(
        (m for p in r.outcome.logs if p.exists() for m in re.finditer(
            r"KJUMP-EVENT: storage-setup .*lv_disk_offset=(\d+)", p.read_text(errors="replace")
        )),
        None,
    )  # fmt: skip
    if setup is None:
        r.outcome.problems.append("the storage set-up printed no lv_disk_offset")
        return
    where = int(setup.group(1)) + 1024  # ext4's superblock, in the LV's first extent
    disk = str(run_dir / "storage.qcow2")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {where} 512", disk],
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    r.outcome.events.append(
        Event(time.monotonic() - r.t0, "host-changed-ciphertext", {"at": str(where)}, r.vm.run)
    )
    r.boot_restore_first(timeout)


def _disk_holds(overlay: Path, run_dir: Path, needles: list[bytes]) -> int:
    """How many of ``needles`` occur on the guest disk (the overlay converted to raw)."""
    raw = run_dir / "scan.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(overlay), str(raw)],
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        return len(needles_in_file(raw, needles))
    finally:
        raw.unlink(missing_ok=True)


def needles_in_file(path: Path, needles: list[bytes]) -> set[int]:
    """Indices of the ``needles`` found anywhere in the file (read in overlapping windows)."""
    found: set[int] = set()
    width = max(len(n) for n in needles)
    with open(path, "rb") as f:
        tail = b""
        while block := f.read(16 << 20):
            hay = tail + block
            found |= {i for i, n in enumerate(needles) if n in hay}
            tail = hay[-width:]
    return found


def grub_normal_cmdline(overlay: Path, run_dir: Path) -> str:
    """The normal entry's command line as update-grub builds it from the guest's
    /etc/default/grub: root, GRUB_CMDLINE_LINUX, GRUB_CMDLINE_LINUX_DEFAULT."""
    path = "/etc/default/grub"
    text = read_guest_files(overlay, [path], run_dir)[path].read_text(errors="replace")
    values = {}
    for line in text.splitlines():
        m = re.match(r'^\s*(GRUB_CMDLINE_LINUX(?:_DEFAULT)?)=(["\']?)(.*)\2\s*$', line)
        if m:
            values[m.group(1)] = m.group(3)
    words = [
        GRUB_ROOT,
        values.get("GRUB_CMDLINE_LINUX", ""),
        values.get("GRUB_CMDLINE_LINUX_DEFAULT", ""),
    ]
    return " ".join(" ".join(words).split())


def run_systemd(assets: vm_assets.Assets, run_dir: Path, timeout: float = BOOT_TIMEOUT) -> Outcome:
    """Scenario s: a machine booted by Debian's systemd, kjumpd installed on it as the README
    says (guest_systemd.py). The host is the boot loader: a reboot boots the normal entry
    (the command line /etc/default/grub gives now), a power-off boots the default entry,
    the restore-first one once the install made it."""
    try:
        # kjumpd's idle CPU is a figure, not a check: measured only when asked
        # (KJUMPD_IDLE_WINDOW=61 measures two of its 30 s checks)
        window = os.environ.get("KJUMPD_IDLE_WINDOW", "").strip()
        append = SYSTEMD_APPEND + (f" kjumpvm.idle={float(window):g}" if window else "")
        r = Runner("systemd", "systemd", assets, run_dir, a_append=append, base="rootfs")
    except (KjumpError, OSError, subprocess.CalledProcessError) as err:
        out = Outcome(name="systemd", run_dir=run_dir)
        out.problems.append(f"missing: {err}")
        return out
    try:
        r.boot()
        for _ in range(12):
            action, left = _sleep_in_ram(r, timeout)
            if action == "lose":
                r.boot_restore_first(timeout, wait=False)
                continue
            if r.outcome.problems:  # hung on its way to S3: stopped already
                break
            r.wait_exit(left)
            if r.has_verdict() or r.outcome.problems:
                break
            if r.vm.find(r"reboot: Restarting system"):
                append = grub_normal_cmdline(r.overlay, run_dir)
                r.outcome.events.append(
                    Event(time.monotonic() - r.t0, "host-boots-A", {"append": append}, r.vm.run)
                )
                r.boot(kernel=Path(assets.kernel), initrd=None, append=append)
            else:
                r.boot_restore_first(timeout, wait=False)
        else:
            r.outcome.problems.append("no verdict after 12 boots")
    except (KjumpError, r.h.VMError, OSError, subprocess.CalledProcessError) as err:
        r.outcome.problems.append(f"{type(err).__name__}: {err}")
    return r.finish(fsck=True)


def _sleep_in_ram(r: Runner, timeout: float) -> tuple[str, float]:
    """While this run lasts, answer each S3 the way the guest said before asking for it
    (``s3-plan action=wake|lose``): wake it, or cut the power. Returns ("lose", 0) once
    the power was cut (the run is over), else ("", the time left of ``timeout``) when the
    run ends, says its verdict or is stuck."""
    deadline = time.monotonic() + timeout
    while r.wait_suspended(max(1.0, deadline - time.monotonic()), required=False):
        plans = r.vm.find(r"KJUMP-EVENT: s3-plan action=(\w+)")
        if plans and plans[-1].group(1) == "lose":
            r.stop()
            r.outcome.events.append(Event(time.monotonic() - r.t0, "host-power-lost", {}, r.vm.run))
            return "lose", 0.0
        time.sleep(2)
        r.vm.qmp("system_wakeup")
        r.outcome.events.append(Event(time.monotonic() - r.t0, "host-wakeup", {}, r.vm.run))
    return "", max(30.0, deadline - time.monotonic())


def _blank_disk(run_dir: Path, name: str, size: str = "2G") -> Path:
    """A blank qcow2 disk in the run's directory (it stays across the power cycle)."""
    disk = run_dir / f"{name}.qcow2"
    disk.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), size], check=True)
    return disk


def _random_area(run_dir: Path) -> tuple[str, ...]:
    """QEMU words that fill scenario c's fixed jump area with random bytes at every
    power-on, as a real machine's DRAM holds whatever it held (QEMU's RAM starts zeroed,
    which would hide what the area's old contents cost an image)."""
    junk = run_dir / "area-at-power-on.bin"
    if not junk.exists():
        with open(junk, "wb") as f:
            for _ in range(FIXED_AREA[1] >> 20):
                f.write(os.urandom(1 << 20))
    return ("-device", f"loader,file={junk},addr={FIXED_AREA[0]:#x},force-raw=on")


def _swap_disk(run_dir: Path, size: str = "2G") -> Path:
    return _blank_disk(run_dir, "swap", size)


def run(
    name: str,
    assets: vm_assets.Assets,
    run_dir: Path,
    timeout: float = BOOT_TIMEOUT,
    swap: bool = False,
    append: str = "",
    memory_mb: int = MEM_MIB,
    swap_size: str = "2G",
) -> Outcome:
    """Run scenario ``name`` (a..h, see test_scenarios.py) to a verdict.

    ``append``: more words for A's command line (e.g. ``kjumpvm.finish=jump-back``).

    ``swap``: attach a blank swap disk (``swap_size``) as /dev/vdb and have the guest swapon
    it before the scenario (bench/vm.py: the same VM as swsusp's run, which needs that disk);
    it stays attached across the power cycle. The swsusp scenario always has it.

    ``memory_mb``: the VM's RAM, the same at every power-on of the run.
    """
    flows = {
        "test": ("test", "single"),
        "shutdown": ("shutdown", "power-cycle"),
        "platform": ("platform", "power-cycle"),
        "suspend-wake": ("suspend-wake", "suspend-wake"),
        "suspend-lost": ("suspend-lost", "suspend-lost"),
        "noimage": ("noimage", "noimage"),
        "rollback": ("rollback", "single"),
        "checkpoint": ("checkpoint", "single"),
        "killed": ("killed", "single"),
        "killed-steps": ("killed-steps", "single"),
        "swsusp": ("swsusp", "swsusp"),  # bench/vm.py: the kernel's own hibernation
        # the fault matrix (guest scenarios of the same name without the point's suffix)
        "lost-save-up": ("lost-save", "lost-save"),
        "lost-save-start": ("lost-save", "lost-save"),
        "lost-save-mid": ("lost-save", "lost-save"),
        "lost-restore": ("lost-restore", "lost-restore"),
        "restore-attempts": ("restore-attempts", "restore-attempts"),
        "ram-changed": ("ram-changed", "ram-changed"),
        "io-error-save": ("io-error-save", "io-error-save"),
        "io-error-restore": ("io-error-restore", "io-error-restore"),
        "b-panic": ("b-panic", "b-panic"),
        "b-no-disk": ("b-no-disk", "single"),
        "high-area": ("shutdown", "power-cycle"),
        "b-hang": ("b-hang", "b-hang"),
        "kaslr": ("kaslr", "power-cycle"),
        "warm": ("warm", "power-cycle"),
        "encrypted": ("encrypted", "encrypted"),
        # the image target on the storage stacks of issue 16: the guest builds them on a
        # blank second disk (STORAGE_DISKS)
        "lvm": ("storage", "power-cycle"),
        "lvm-raw": ("storage", "power-cycle"),
        "btrfs": ("storage", "power-cycle"),
        "luks": ("storage", "power-cycle"),
        "luks-stale": ("storage", "luks-stale"),
        "luks-target": ("storage", "luks-target"),
        "luks-keyfile": ("storage", "unattended"),
        "luks-tpm2": ("storage", "unattended"),
        "luks-root": ("storage", "luks-root"),
        "nvme": ("storage", "power-cycle"),
        "sata": ("storage", "power-cycle"),
    }
    extra = {
        # a short watchdog that A outlives after the jump back: B stopped it
        "test": "kjumpvm.watchdog=10",
        "killed": "kjumpvm.kill_daemon=frozen",
        "killed-steps": "kjumpvm.kill_daemon=steps:"
        "preflight,announce,quiesce,boot-entry,freeze-tasks",
        # an init that does not exist: the save kernel panics for real (panic=1 reboots it)
        "b-panic": "kjumpvm.b_append=init=/kjump-no-init,rdinit=/kjump-no-init",
        "b-hang": f"kjumpvm.watchdog={HANG_WATCHDOG}",
        # the save kernel without its disk driver, as one built without the target disk's
        # controller: it finds no target, so it cannot write the image header
        "b-no-disk": "kjumpvm.b_append=initcall_blacklist=virtio_blk_init",
        "encrypted": f"kjumpvm.encrypt={PASSPHRASE}",
        "warm": "kjumpvm.warm=1 kjumpvm.watchdog=30",
        "nvme": "kjumpvm.storage=nvme",
        "sata": "kjumpvm.storage=sata",
        "lvm": "kjumpvm.storage=lvm",
        "lvm-raw": "kjumpvm.storage=lvm-raw",
        "btrfs": "kjumpvm.storage=btrfs",
        "luks": "kjumpvm.storage=luks",
        "luks-stale": "kjumpvm.storage=luks kjumpvm.tamper=1",
        "luks-target": "kjumpvm.storage=luks-target",
        "luks-keyfile": "kjumpvm.storage=luks-keyfile",
        "luks-tpm2": "kjumpvm.storage=luks-tpm2",
        "luks-root": "kjumpvm.root_luks=prepare",
    }.get(name, "")
    extra = f"{extra} {append}".strip()
    if name not in flows:
        raise ScenarioError(f"unknown scenario {name!r}", fix=f"one of {', '.join(flows)}")
    guest, flow = flows[name]
    sectors: list[int] = []
    if flow in ("io-error-save", "io-error-restore"):
        try:
            # 1 MiB of the target a quarter of a GiB in: inside the chunk records
            sectors = target_sectors(Path(assets.prepared), run_dir, 100 << 20, 1 << 20)
        except (KjumpError, OSError) as err:
            out = Outcome(name=name, run_dir=run_dir)
            out.problems.append(f"missing: {err}")
            return out
    try:
        if flow == "swsusp":
            r = Runner(
                name,
                guest,
                assets,
                run_dir,
                extra_disks=(_swap_disk(run_dir, swap_size),),
                append_extra=f"resume=/dev/vdb {extra}".strip(),
                memory_mb=memory_mb,
            )
        elif swap:
            r = Runner(
                name,
                guest,
                assets,
                run_dir,
                extra_disks=(_swap_disk(run_dir, swap_size),),
                append_extra=f"kjumpvm.swap=/dev/vdb {A_APPEND_EXTRA.get(name, '')} {extra}",
                a_append=A_APPEND_OF.get(name, A_APPEND),
                memory_mb=memory_mb,
            )
        else:
            r = Runner(
                name,
                guest,
                assets,
                run_dir,
                extra_qemu=_random_area(run_dir) if name == "platform" else (),
                extra_disks=(_blank_disk(run_dir, "storage", STORAGE_SIZE.get(name, "2G")),)
                if name in STORAGE_DISKS
                else (),
                bus_disks=((STORAGE_BUS[name], _blank_disk(run_dir, "storage")),)
                if name in STORAGE_BUS
                else (),
                append_extra=f"{A_APPEND_EXTRA.get(name, '')} {extra}".strip(),
                a_append=A_APPEND_OF.get(name, A_APPEND),
                memory_mb=memory_mb,
            )
    except (KjumpError, OSError, subprocess.CalledProcessError) as err:
        out = Outcome(name=name, run_dir=run_dir)
        out.problems.append(f"missing: {err.message}")
        return out
    if flow == "io-error-save":
        blk = blkdebug_disk(r.overlay, run_dir, "write", sectors)
        r.vm.cfg = replace(r.vm.cfg, disks=[], extra=(*r.vm.cfg.extra, *blk))
    try:
        if flow != "noimage":
            r.boot()
        if flow == "single":
            r.wait_exit(timeout)
        elif flow == "power-cycle":
            r.wait_exit(timeout)
            if not r.has_verdict():  # it powered off with an image: boot R
                r.boot_restore_first(timeout)
        elif flow in ("suspend-wake", "suspend-lost"):
            if r.wait_suspended(timeout):
                if flow == "suspend-wake":
                    time.sleep(2)
                    r.vm.qmp("system_wakeup")
                    r.outcome.events.append(
                        Event(time.monotonic() - r.t0, "host-wakeup", {}, r.vm.run)
                    )
                    r.wait_exit(timeout)
                else:
                    r.stop()  # power lost while in S3
                    r.outcome.events.append(
                        Event(time.monotonic() - r.t0, "host-power-lost", {}, r.vm.run)
                    )
                    r.boot_restore_first(timeout)
            elif not r.outcome.problems:  # it ended or said its verdict without S3
                r.wait_exit(timeout)
        elif flow == "noimage":
            r.boot_restore_first(timeout)  # the prepared disk: a target, no image
        elif flow == "swsusp":
            r.wait_exit(timeout)
            if not r.has_verdict():  # hibernated to swap: power on, same kernel
                r.boot()
                r.wait_exit(timeout)
        elif flow == "encrypted":
            _encrypted_flow(r, timeout)
        elif flow == "luks-stale":
            _luks_stale_flow(r, timeout, run_dir)
        elif flow == "luks-target":
            _luks_target_flow(r, timeout, run_dir)
        elif flow == "luks-root":
            _luks_root_flow(r, timeout)
        elif flow == "unattended":
            r.wait_exit(timeout)
            if not r.has_verdict():  # it powered off with an image: R must not ask
                r.boot_restore_first(timeout, wait=False)
                r.vm.wait_for(r"kjumpd-rf: decision:", timeout, fail=f"{LUKS_PROMPT}|{STUCK_RE}")
                r.wait_exit(timeout)
        else:
            _fault_flow(r, name, flow, timeout, run_dir, sectors)
    except (KjumpError, r.h.VMError, OSError, subprocess.CalledProcessError) as err:
        r.outcome.problems.append(f"{type(err).__name__}: {err}")
    return r.finish(fsck=name in FSCK_AFTER)
