"""A private dbus-daemon, a real kjumpd process on it, and real D-Bus clients (gdbus, busctl,
dbus-send, kjumpctl) run as root or as `nobody`. Used by tests/sysroot/test_dbus*.py.

The bus mirrors Debian's system bus policy (method calls denied by default) and includes
contrib/org.kjump.Manager1.conf, so the shipped policy file is what lets clients in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests import prereq

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib"
PYTHON = sys.executable
BUS_NAME = "org.kjump.Manager1"
OBJECT_PATH = "/org/kjump/Manager1"
IFACE = "org.kjump.Manager1"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>kjumpd-test</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  {servicedir}
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{policy}</include>
  {includes}
</busconfig>
"""


def require(cond: bool, why: str) -> None:
    """Skip when a prerequisite is missing; fail instead under KJUMPD_REQUIRE_VM=1 (CI)."""
    prereq.need(cond, why)


def require_tools(*tools: str) -> None:
    for t in tools:
        require(shutil.which(t) is not None, f"{t} is not installed")


def as_nobody(cmd: Sequence[str]) -> list[str]:
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]


class PrivateBus:
    def __init__(self, servicedir: Path | None = None, includes: Sequence[Path] = ()) -> None:
        require_tools("dbus-daemon")
        self.dir = Path(tempfile.mkdtemp(prefix="kjumpd-bus-"))
        os.chmod(self.dir, 0o755)  # `nobody` must reach the socket
        self.socket = self.dir / "bus.sock"
        self.address = f"unix:path={self.socket}"
        conf = self.dir / "bus.conf"
        conf.write_text(
            BUS_CONFIG.format(
                socket=self.socket,
                policy=CONTRIB / "org.kjump.Manager1.conf",
                servicedir=f"<servicedir>{servicedir}</servicedir>" if servicedir else "",
                includes="".join(f"<include>{p}</include>" for p in includes),
            )
        )
        self.log = open(self.dir / "dbus-daemon.log", "wb")
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        line = self.proc.stdout.readline().decode()  # type: ignore[union-attr]
        if not line.startswith("unix:"):
            self.stop()
            raise RuntimeError(
                f"dbus-daemon did not start: {(self.dir / 'dbus-daemon.log').read_text()}"
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Kjumpd:
    """kjumpd as a real process on the private bus; readiness from its sd_notify READY=1."""

    def __init__(
        self,
        bus: PrivateBus,
        sysroot: Path,
        config: Path | None = None,
        env: dict[str, str] | None = None,
        notify: bool = True,
        journal: bool = False,
    ) -> None:
        self.bus = bus
        self.messages: list[str] = []
        self.stderr_path = bus.dir / f"kjumpd-{time.monotonic_ns()}.log"
        self.notify_path = bus.dir / f"notify-{time.monotonic_ns()}.sock"
        self.sock: socket.socket | None = None
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.pop("WATCHDOG_USEC", None)
        full_env.pop("JOURNAL_STREAM", None)
        if notify:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.bind(str(self.notify_path))
            full_env["NOTIFY_SOCKET"] = str(self.notify_path)
        full_env.update(env or {})
        cmd = [PYTHON, "-m", "kjumpd.daemon.main", "--sysroot", str(sysroot), "--bus", bus.address]
        if config is not None:
            cmd += ["--config", str(config)]
        self.stderr = open(self.stderr_path, "wb")
        if journal:  # as systemd does: JOURNAL_STREAM names the stream that is our stderr
            st = os.fstat(self.stderr.fileno())
            full_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stderr=self.stderr, stdout=subprocess.DEVNULL
        )

    @property
    def log(self) -> str:
        if not self.stderr.closed:
            self.stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def notifications(self, timeout: float) -> Iterator[str]:
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                if self.proc.poll() is not None:
                    return
                continue
            self.messages.append(data)
            yield data

    def wait_for_notification(self, key: str, timeout: float = 30.0) -> str:
        for msg in self.notifications(timeout):
            if any(line.startswith(key) for line in msg.splitlines()):
                return msg
        raise AssertionError(
            f"no {key} from kjumpd within {timeout}s (exit {self.proc.poll()}); log:\n{self.log}"
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        if self.sock is not None:
            self.wait_for_notification("READY=1", timeout)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            r = subprocess.run(
                ["busctl", f"--address={self.bus.address}", "status", BUS_NAME], capture_output=True
            )
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"kjumpd did not come up; log:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        if self.sock is not None:
            self.sock.setblocking(False)
            try:
                while True:
                    self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                pass
            self.sock.close()
        return self.proc.returncode


class Monitor:
    """`gdbus monitor` on the service: every signal it emits, as text lines."""

    def __init__(self, address: str) -> None:
        require_tools("gdbus")
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            ["gdbus", "monitor", "--address", address, "--dest", BUS_NAME],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        self.wait_for(r"owned by|Monitoring", 10)

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 20.0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if rx.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no signal matching {pattern!r} in:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def run(
    cmd: Sequence[str], user: str | None = None, timeout: float = 60.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    if user == "nobody":
        cmd = as_nobody(cmd)
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, cwd=REPO, input=input
    )


def gdbus_call(
    address: str, method: str, *args: str, user: str | None = None, interface: str = IFACE
) -> subprocess.CompletedProcess[str]:
    return run(
        [
            "gdbus",
            "call",
            "--address",
            address,
            "--dest",
            BUS_NAME,
            "--object-path",
            OBJECT_PATH,
            "--method",
            f"{interface}.{method}",
            *args,
        ],
        user=user,
    )


def busctl_json(address: str, *args: str, user: str | None = None) -> Any:
    r = run(["busctl", f"--address={address}", "--json=short", *args], user=user)
    assert r.returncode == 0, f"busctl {' '.join(args)} failed: {r.stderr}"
    docs = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    return docs[0] if len(docs) == 1 else docs


_FOREIGN: tuple[str, str] | None = None


def foreign_python() -> tuple[str, str]:
    """(interpreter, PYTHONPATH) with which another user runs this checkout's kjumpd.

    The checkout and its venv may sit under a home directory that user cannot enter (0700
    /root, a mktemp -d folder): the package is copied into a world-readable temporary
    prefix, run by the first interpreter that user can start (the venv's base interpreter,
    else the system's python3), each checked by starting it as that user."""
    global _FOREIGN
    if _FOREIGN is not None:
        return _FOREIGN
    prefix = Path(tempfile.mkdtemp(prefix="kjumpd-foreign-"))
    shutil.copytree(
        REPO / "kjumpd", prefix / "kjumpd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    for d in (prefix, *(p for p in prefix.rglob("*") if p.is_dir())):
        os.chmod(d, 0o755)
    for f in (p for p in prefix.rglob("*") if p.is_file()):
        os.chmod(f, 0o644)
    candidates = [
        getattr(sys, "_base_executable", ""),
        os.path.realpath(sys.executable),
        "/usr/bin/python3",
    ]
    probe = "import sys, kjumpd.cli; assert sys.version_info >= (3, 11)"
    tried = []
    for py in dict.fromkeys(c for c in candidates if c):
        r = subprocess.run(
            as_nobody([py, "-c", probe]),
            capture_output=True,
            text=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(prefix)},
            timeout=60,
        )
        if r.returncode == 0:
            _FOREIGN = (py, str(prefix))
            return _FOREIGN
        tried.append(f"{py}: {(r.stderr.strip().splitlines() or [f'rc {r.returncode}'])[-1]}")
    raise AssertionError("no interpreter that `nobody` can run kjumpd with: " + "; ".join(tried))


def kjumpctl(
    address: str, *args: str, user: str | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    cmd = [
        "-c",
        "import sys; from kjumpd.cli import main; sys.exit(main())",
        "--bus",
        address,
        *args,
    ]
    if user is None:
        return run([PYTHON, *cmd], timeout=timeout)
    py, path = foreign_python()
    return subprocess.run(
        as_nobody([py, *cmd]) if user == "nobody" else [py, *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        env={**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"},
    )
