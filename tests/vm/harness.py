"""QEMU harness for the VM tier: boot a kernel under TCG, watch its serial console, drive QMP.

    from tests.vm.harness import VM, VMConfig, require_vm_prereqs, kernel_image

    kernel = kernel_image()                     # cached CONFIG_KEXEC_JUMP bzImage (or skip/fail)
    cfg = VMConfig(kernel=kernel, initrd=initrd, append="...", disks=[disk])
    with VM(cfg, artifacts=tmp_path / "vm", name="save") as vm:
        vm.wait_for(r"KJT-VERDICT: (\\w+)", timeout=300)  # -> re.Match, timeout -> VMTimeout
        vm.send("c")                            # keys on the serial console
        vm.qmp("query-status"); vm.qmp("system_wakeup")
        vm.wait_exit(timeout=120)               # -> QEMU's exit status
        vm.restart(append="...")                # same disks, new console log (console-2.log)

The command line is the one KJUMP-FACTS.md verified: ``-accel tcg -cpu qemu64,+pdpe1gb -m 1024
-nographic -no-reboot -kernel -initrd -append`` and virtio disks, with the serial console on a
pipe (so tests can type on it) and a QMP unix socket. Every console is written, with the host's
time of each line, to ``<artifacts>/console-<n>.log`` (+ ``qemu-<n>.cmdline``); the artifacts
directory is tests' ``artifacts/vm/<test>/`` (gitignored; ``$KJUMPD_ARTIFACTS/vm/<test>/`` when set)
or a pytest tmp dir.

Prerequisites (qemu-system-x86_64, the kernel) are checked by :func:`require_vm_prereqs`: a
missing one skips the test, or FAILS it when KJUMPD_REQUIRE_VM=1 (CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
#: where tests keep serial logs (gitignored); $KJUMPD_ARTIFACTS/vm when set, as tests/vm/conftest.py
ARTIFACTS = Path(os.environ.get("KJUMPD_ARTIFACTS") or REPO / "artifacts") / "vm"
#: the jump area every VM-tier guest reserves
JUMP_AREA_START = 0x20000000
JUMP_AREA_SIZE = 128 << 20
MAIN_APPEND = (
    f"console=ttyS0 nokaslr panic=1 no_console_suspend "
    f"crashkernel={JUMP_AREA_SIZE >> 20}M@{JUMP_AREA_START:#x}"
)


class VMError(Exception):
    """The VM did not do what the test expected (message names the console log)."""


class VMTimeout(VMError):
    pass


def require_vm() -> bool:
    return os.environ.get("KJUMPD_REQUIRE_VM") == "1"


def missing_prereq(why: str) -> None:
    """Skip the calling test, or fail it when KJUMPD_REQUIRE_VM=1 (tests/prereq.py's rule)."""
    from tests import prereq

    prereq.need(False, f"VM: {why}")


def kernel_image(series: str = "6.12", build: bool | None = None) -> Path:
    """The cached kjump bzImage; KJUMPD_KERNEL overrides. Builds it when ``build`` (default:
    when KJUMPD_REQUIRE_VM=1); otherwise a missing kernel skips the test."""
    env = os.environ.get("KJUMPD_KERNEL")
    if env:
        p = Path(env)
        if not p.is_file():
            missing_prereq(f"KJUMPD_KERNEL={env} is not a file")
        return p
    cache = Path(os.environ.get("KJUMPD_CACHE") or Path.home() / ".cache" / "kjumpd") / "kernel"
    frag = REPO / "savekernel" / "kernel.fragment"
    import hashlib

    frag_hash = hashlib.sha256(frag.read_bytes()).hexdigest()[:12]
    found = sorted(cache.glob(f"{series}*-{frag_hash}/bzImage"))
    if found:
        return found[-1]
    if build is None:
        build = require_vm()
    if not build:
        missing_prereq(
            f"no kjump kernel for {series} with this fragment in {cache} "
            "(run savekernel/build-kernel.sh)"
        )
    out = subprocess.run(
        [str(REPO / "savekernel" / "build-kernel.sh"), series],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        missing_prereq(f"savekernel/build-kernel.sh {series} failed (status {out.returncode})")
    return Path(lines[-1])


def require_vm_prereqs() -> None:
    if shutil.which(QEMU) is None:
        missing_prereq(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    if not Path("/usr/sbin/kexec").exists() and shutil.which("kexec") is None:
        missing_prereq("kexec-tools is not installed")


def artifacts_dir(test_name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)[:120]
    d = ARTIFACTS / safe
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass(frozen=True)
class VMConfig:
    kernel: Path
    initrd: Path | None = None
    append: str = MAIN_APPEND
    disks: Sequence[Path] = ()
    memory_mb: int = 1024
    smp: int = 2
    #: extra QEMU arguments, e.g. ("-global", "PIIX4_PM.disable_s4=0")
    extra: Sequence[str] = ()
    disk_format: str = "raw"
    #: QEMU's CPU model; "+ssse3,+sse4.1,+sse4.2,+aes,+pclmulqdq" offers AES-NI to the
    #: guest (encrypted images; OpenSSL's AES-NI code also uses SSSE3)
    cpu: str = "qemu64,+pdpe1gb"
    #: a TPM 2.0 (QEMU's tpm-tis over swtpm) whose state lives in this directory, kept
    #: across power cycles as a machine's TPM is; None: no TPM
    tpm_state: Path | None = None
    #: more disks on the buses real machines have, after the virtio ones: ("nvme", path)
    #: is an NVMe controller with that namespace, ("sata", path) a disk on an AHCI port
    bus_disks: Sequence[tuple[str, Path]] = ()


@dataclass
class ConsoleLine:
    t: float  # seconds since this QEMU start (host monotonic clock)
    text: str


class VM:
    """One QEMU machine; ``restart()`` boots it again (new process) on the same disks."""

    def __init__(self, cfg: VMConfig, artifacts: Path, name: str = "vm") -> None:
        self.cfg = cfg
        self.artifacts = Path(artifacts)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.run = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[ConsoleLine] = []
        self._partial = b""
        self._cursor = 0  # index into self.lines for wait_for
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._log = None
        self.started = 0.0
        #: host monotonic time QEMU closed the console (it exited); None while it runs
        self.ended: float | None = None
        self.qmp_path = Path()
        self._qmp: socket.socket | None = None
        self._qmp_buf = b""
        #: QMP events of this run ({"event": "WATCHDOG", "data": {...}, ...}), in order; QEMU
        #: sends them only while a QMP client is connected (any qmp() call connects)
        self.qmp_events: list[dict[str, Any]] = []
        self.last_line: ConsoleLine | None = None
        self._tpm: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        c = self.cfg
        cmd = [
            QEMU,
            "-accel",
            "tcg",
            "-cpu",
            c.cpu,
            "-m",
            str(c.memory_mb),
            "-smp",
            str(c.smp),
            "-display",
            "none",
            "-vga",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel",
            str(c.kernel),
            "-append",
            c.append,
        ]
        if c.initrd is not None:
            cmd += ["-initrd", str(c.initrd)]
        for d in c.disks:
            cmd += ["-drive", f"file={d},format={c.disk_format},if=virtio,cache=unsafe"]
        for i, (bus, d) in enumerate(c.bus_disks):
            drive = f"file={d},format={c.disk_format},if=none,id=bus{i},cache=unsafe"
            if bus == "nvme":
                cmd += ["-drive", drive, "-device", f"nvme,serial=kjump{i},drive=bus{i}"]
            elif bus == "sata":
                cmd += [
                    "-drive", drive,
                    "-device", f"ahci,id=ahci{i}",
                    "-device", f"ide-hd,drive=bus{i},bus=ahci{i}.0",
                ]  # fmt: skip
            else:
                raise ValueError(f"bus {bus!r}: nvme or sata")
        if c.tpm_state is not None:
            cmd += [
                "-chardev", f"socket,id=chrtpm,path={self._tpm_socket}",
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                "-device", "tpm-tis,tpmdev=tpm0",
            ]  # fmt: skip
        cmd += list(c.extra)
        return cmd

    @property
    def _tpm_socket(self) -> Path:
        return Path(f"/tmp/kjt-tpm-{os.getpid()}-{id(self) & 0xFFFF:x}.sock")

    def _start_tpm(self) -> None:
        """swtpm for this power-on (it ends when QEMU closes its socket)."""
        state = self.cfg.tpm_state
        assert state is not None
        if shutil.which("swtpm") is None:
            missing_prereq("swtpm is not installed (apt-get install swtpm)")
        state.mkdir(parents=True, exist_ok=True)
        sock = self._tpm_socket
        sock.unlink(missing_ok=True)
        log = open(self.artifacts / f"{self.name}-swtpm-{self.run}.log", "w")
        self._tpm = subprocess.Popen(
            [
                "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
                "--ctrl", f"type=unixio,path={sock}", "--terminate",
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self._tpm.poll() is not None or time.monotonic() > deadline:
                raise VMError(f"swtpm did not start (see {self.artifacts})")
            time.sleep(0.05)

    def _stop_tpm(self) -> None:
        if self._tpm is None:
            return
        try:
            self._tpm.wait(5)
        except subprocess.TimeoutExpired:
            self._tpm.kill()
            self._tpm.wait()
        self._tpm = None
        self._tpm_socket.unlink(missing_ok=True)

    @property
    def log_path(self) -> Path:
        return self.artifacts / f"{self.name}-console-{self.run}.log"

    def start(self) -> VM:
        if self.proc is not None and self.proc.poll() is None:
            raise VMError("VM already running")
        self.run += 1
        # unix socket paths are limited to ~108 bytes: keep it short
        self.qmp_path = Path(f"/tmp/kjt-qmp-{os.getpid()}-{id(self) & 0xFFFF:x}-{self.run}.sock")
        self.qmp_path.unlink(missing_ok=True)
        if self.cfg.tpm_state is not None:
            self._start_tpm()
        cmd = self.command()
        (self.artifacts / f"{self.name}-qemu-{self.run}.cmdline").write_text(" ".join(cmd) + "\n")
        self.lines = []
        self.qmp_events = []
        self._cursor = 0
        self._partial = b""
        self._log = open(self.log_path, "w", buffering=1)
        self.ended = None
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def restart(self, **changes: Any) -> VM:
        """Stop (if running) and boot again on the same disks; VMConfig fields may change."""
        self.stop()
        if changes:
            self.cfg = replace(self.cfg, **changes)
        return self.start()

    def stop(self, timeout: float = 10) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.qmp("quit")
            except (VMError, OSError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._finish()

    def _finish(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None
        if self._qmp is not None:
            self._qmp_drain()
            self._qmp.close()
            self._qmp = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self.qmp_path.unlink(missing_ok=True)
        self._stop_tpm()

    def __enter__(self) -> VM:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ console
    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        while True:
            chunk = os.read(out.fileno(), 65536)
            if not chunk:
                break
            with self._cond:
                data = self._partial + chunk
                *done, self._partial = data.split(b"\n")
                now = time.monotonic() - self.started
                for raw in done:
                    text = raw.decode("utf-8", "replace").rstrip("\r")
                    self.lines.append(ConsoleLine(now, text))
                    if self._log is not None:
                        self._log.write(f"[{now:9.3f}] {text}\n")
                self._cond.notify_all()
        # EOF: QEMU closed its stdout, i.e. it exited. Record when (latencies end here, not
        # when a waiter next polls) and wake the waiters.
        self.proc.wait()
        with self._cond:
            self.ended = time.monotonic()
            if self._partial:
                text = self._partial.decode("utf-8", "replace").rstrip("\r")
                self.lines.append(ConsoleLine(time.monotonic() - self.started, text))
                if self._log is not None:
                    self._log.write(f"[{self.lines[-1].t:9.3f}] {text}\n")
                self._partial = b""
            self._cond.notify_all()

    def send(self, text: str) -> None:
        """Type on the serial console."""
        if self.proc is None or self.proc.stdin is None:
            raise VMError("VM is not running")
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_for(self, pattern: str, timeout: float, *, fail: str | None = None) -> re.Match[str]:
        """The first console line (after the previous match) matching pattern.

        Raises VMTimeout after ``timeout`` seconds, VMError if QEMU exits first or a line
        matches ``fail`` (e.g. "Kernel panic"). Returns the match; ``self.last_line`` has its
        ConsoleLine (with the host time).
        """
        rx = re.compile(pattern)
        frx = re.compile(fail) if fail else None
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._cursor < len(self.lines):
                    line = self.lines[self._cursor]
                    self._cursor += 1
                    m = rx.search(line.text)
                    if m:
                        self.last_line = line
                        return m
                    if frx is not None and frx.search(line.text):
                        raise VMError(f"console line {line.text!r} (see {self.log_path})")
                if self.proc is None or self.ended is not None:
                    raise VMError(
                        f"QEMU exited (status {self.proc.returncode if self.proc else '?'}) "
                        f"before a line matched {pattern!r} (see {self.log_path})"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMTimeout(
                        f"no console line matched {pattern!r} within {timeout:.0f} s "
                        f"(see {self.log_path})"
                    )
                self._cond.wait(min(left, 1.0))

    def find(self, pattern: str) -> list[re.Match[str]]:
        """Every console line so far (this run) that matches."""
        rx = re.compile(pattern)
        with self._cond:
            return [m for m in (rx.search(ln.text) for ln in self.lines) if m]

    def quiet_for(self) -> float:
        """Seconds since the console's last line (since QEMU started when it printed none)."""
        with self._cond:
            last = self.lines[-1].t if self.lines else 0.0
        return time.monotonic() - self.started - last

    def dump_registers(self) -> Path | None:
        """Every vCPU's registers (HMP ``info registers -a``) into the run's artifacts, for
        a guest that stopped printing: its instruction pointers say where it hangs. None when
        QEMU does not answer."""
        try:
            text = self.qmp("human-monitor-command", **{"command-line": "info registers -a"})
        except VMError:
            return None
        path = self.artifacts / f"{self.name}-registers-{self.run}.txt"
        path.write_text(str(text))
        return path

    def line_time(self, pattern: str) -> float | None:
        """Host time (s since start) of the first line matching pattern, this run."""
        rx = re.compile(pattern)
        with self._cond:
            for ln in self.lines:
                if rx.search(ln.text):
                    return ln.t
        return None

    def wait_exit(self, timeout: float) -> int:
        if self.proc is None:
            raise VMError("VM is not running")
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise VMTimeout(
                f"QEMU still running after {timeout:.0f} s (see {self.log_path})"
            ) from None
        self._finish()
        return rc

    # ------------------------------------------------------------------ QMP
    def _qmp_connect(self) -> socket.socket:
        if self._qmp is not None:
            return self._qmp
        deadline = time.monotonic() + 10
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(self.qmp_path))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                    raise VMError(f"cannot connect to QMP at {self.qmp_path}") from None
                time.sleep(0.1)
        s.settimeout(30)
        self._qmp = s
        self._qmp_buf = b""
        self._qmp_recv()  # greeting
        self._qmp_send({"execute": "qmp_capabilities"})
        self._qmp_reply()
        return s

    def _qmp_send(self, msg: dict[str, Any]) -> None:
        assert self._qmp is not None
        try:
            self._qmp.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:  # QEMU exited meanwhile (the guest powered off)
            raise VMError(f"QMP connection closed: {e}") from None

    def _qmp_recv(self) -> dict[str, Any]:
        assert self._qmp is not None
        while b"\n" not in self._qmp_buf:
            try:
                chunk = self._qmp.recv(65536)
            except ConnectionError as e:
                raise VMError(f"QMP connection closed: {e}") from None
            if not chunk:
                raise VMError("QMP connection closed")
            self._qmp_buf += chunk
        line, self._qmp_buf = self._qmp_buf.split(b"\n", 1)
        return json.loads(line)

    def _qmp_reply(self) -> Any:
        while True:
            msg = self._qmp_recv()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise VMError(f"QMP error: {msg['error']}")
            self.qmp_events.append(msg)

    def _qmp_drain(self) -> None:
        """Keep the events QEMU sent before it closed the connection (it exited)."""
        assert self._qmp is not None
        try:
            self._qmp.settimeout(2)
            while True:
                msg = self._qmp_recv()
                if "event" in msg:
                    self.qmp_events.append(msg)
        except (VMError, OSError, ValueError):
            pass

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command ("query-status", "system_wakeup", "quit", ...); its return value."""
        self._qmp_connect()
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._qmp_send(msg)
        try:
            return self._qmp_reply()
        except VMError:
            if command == "quit":
                return {}
            raise
