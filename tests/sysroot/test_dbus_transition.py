"""Whole transitions over D-Bus: a real kjumpd with the real transaction on the daemon's fake
tree (tests/sysroot/kjump_faketree.py: /proc, /sys, a disk with the target partition, a save
kernel, a BLS boot entry), where the only fake of the kernel boundary is the `kexec`
executable on PATH (on -e it writes the image header as the save kernel would).

A `pre` sleep hook that waits for a file keeps a transition running for as long as a test
needs it (Busy, Cancel, SIGTERM); everything is observed through real clients.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import kjump_faketree as faketree
import pytest
from dbus_env import (
    BUS_NAME,
    IFACE,
    OBJECT_PATH,
    Kjumpd,
    Monitor,
    PrivateBus,
    busctl_json,
    gdbus_call,
    kjumpctl,
    require,
    require_tools,
)

HOOK = """#!/bin/sh
# holds the transition in its "pre" hooks until the test creates $KJUMP_HOLD_RELEASE
[ "$1" = pre ] || exit 0
[ -n "$KJUMP_HOLD_RELEASE" ] || exit 0
touch "$KJUMP_HOLD_RELEASE.waiting"
i=0
while [ ! -e "$KJUMP_HOLD_RELEASE" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
exit 0
"""


class Machine:
    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "root"
        self.root.mkdir()
        host = tmp / "host"
        faketree.build(self.root, host)
        self.uuid = faketree.setup_target_and_bootentry(self.root, host)
        faketree.w(self.root, "/etc/kjumpd/sleep.d/60-hold", HOOK, 0o755)
        # room for a loaded machine: the hold hook may wait up to a minute
        cfg = self.root / "etc/kjumpd/kjumpd.toml"
        text = cfg.read_text()
        assert "\nhooks = 10\n" in text
        cfg.write_text(text.replace("\nhooks = 10\n", "\nhooks = 90\n"))
        bindir = tmp / "bin"
        faketree.install_fake_kexec(bindir)
        self.kexec_log = tmp / "kexec.log"
        self.release = tmp / "release"
        self.env = {
            "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "FAKE_KEXEC_LOG": str(self.kexec_log),
            "FAKE_KEXEC_STATE": str(tmp / "kexec.state"),
            "FAKE_SYSROOT": str(self.root),
            "FAKE_KEXEC_JOB": str(tmp / "job.json"),
            "KJUMP_HOOK_LOG": str(tmp / "hooks.log"),
        }

    def hold(self) -> None:
        self.env["KJUMP_HOLD_RELEASE"] = str(self.release)

    def wait_held(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not Path(f"{self.release}.waiting").exists():
            assert time.monotonic() < deadline, "the transition never reached its pre hook"
            time.sleep(0.05)

    def let_go(self) -> None:
        self.release.touch()

    def kexec_calls(self) -> list[list[str]]:
        if not self.kexec_log.exists():
            return []
        return [json.loads(ln) for ln in self.kexec_log.read_text().splitlines()]

    def jumps(self) -> int:
        """How many times `kexec -e` (the jump to the save kernel) ran."""
        return sum(1 for c in self.kexec_calls() if c and c[0] == "-e")


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    require_tools("dbus-daemon", "gdbus", "busctl", "setpriv")
    require(os.geteuid() == 0, "needs root (target files owned by root, clients as nobody)")
    b = PrivateBus()
    yield b
    b.stop()


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def start(bus: PrivateBus, m: Machine, **env: str) -> Kjumpd:
    d = Kjumpd(bus, m.root, env={**m.env, **env})
    d.wait_ready()
    return d


def prop(bus: PrivateBus, name: str):
    return busctl_json(bus.address, "get-property", BUS_NAME, OBJECT_PATH, IFACE, name)["data"]


def wait_idle(bus: PrivateBus, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while prop(bus, "State") != "idle":
        assert time.monotonic() < deadline, "the transition did not finish"
        time.sleep(0.1)


def test_a_ready_machine_can_hibernate_and_says_so(bus, machine) -> None:
    d = start(bus, machine)
    try:
        answer, reasons = busctl_json(
            bus.address, "call", BUS_NAME, OBJECT_PATH, IFACE, "CanHibernate"
        )["data"]
        assert (answer, reasons) == ("yes", [])
        ok, items = busctl_json(bus.address, "call", BUS_NAME, OBJECT_PATH, IFACE, "Check")["data"]
        assert ok is True and all(i[1] or not i[2] for i in items)
        assert prop(bus, "ImageState") == "EMPTY"
        # an unprivileged caller learns it would not be allowed
        r = gdbus_call(bus.address, "CanHibernate", user="nobody")
        assert r.returncode == 0 and r.stdout.startswith("('no', ['nobody (uid 65534)"), r.stdout
    finally:
        d.stop()


def test_a_concurrent_request_is_busy_and_the_signals_tell_the_story(bus, machine) -> None:
    machine.hold()
    d = start(bus, machine)
    mon = Monitor(bus.address)
    try:
        r = gdbus_call(bus.address, "Hibernate", "test")
        assert r.returncode == 0, r.stderr
        machine.wait_held()
        mon.wait_for(r"PrepareForSleep \(true,\)")
        assert prop(bus, "State") == "running"
        assert prop(bus, "Mode") == "test"
        for method, args in (("Hibernate", ["test"]), ("SuspendToBoth", []), ("Checkpoint", [])):
            r = gdbus_call(bus.address, method, *args)
            assert r.returncode != 0
            assert "org.kjump.Error.Busy" in r.stderr and "kjumpctl cancel" in r.stderr, r.stderr
        r = kjumpctl(bus.address, "checkpoint")
        assert r.returncode == 5 and "another transition is in progress" in r.stderr, r.stderr
        # nobody is refused as not authorized, not told about the running transition
        r = gdbus_call(bus.address, "Hibernate", "test", user="nobody")
        assert "org.kjump.Error.NotAuthorized" in r.stderr, r.stderr
        machine.let_go()
        mon.wait_for(r"PropertiesChanged.*'State': <'idle'>", 60)
        mon.wait_for(r"PrepareForSleep \(false,\)")
    finally:
        mon.stop()
        d.stop()
    lines = mon.lines
    idx = lambda pat: next(i for i, ln in enumerate(lines) if re.search(pat, ln))  # noqa: E731
    assert (
        idx(r"'State': <'running'>")
        < idx(r"PrepareForSleep \(true,\)")
        < idx(r"Progress \('freeze tasks'")
        < idx(r"Progress \('jump'")
        < idx(r"PrepareForSleep \(false,\)")
        < idx(r"'State': <'idle'>")
    )
    assert sum("PrepareForSleep (true" in ln for ln in lines) == 1
    assert sum("PrepareForSleep (false" in ln for ln in lines) == 1
    # the one transition that ran went all the way through the (fake) jump
    assert machine.jumps() == 1
    final = next(ln for ln in lines if "'State': <'idle'>" in ln)
    assert "'result': <'continued'>" in final and "'mode': <'test'>" in final
    assert "'ImageState': <'INVALID(test mode)'>" in final


def test_a_resume_emits_resumed_with_the_stats(bus, machine) -> None:
    d = start(bus, machine, FAKE_KEXEC_RESULT="restoring")
    mon = Monitor(bus.address)
    try:
        r = kjumpctl(bus.address, "hibernate", "--mode", "test")
        assert r.returncode == 0, r.stderr
        assert "test: resumed" in r.stdout
        assert "kjumpctl: the system is going to sleep" in r.stderr
        assert "kjumpctl: jump (50%)" in r.stderr  # progress, a line per phase
        line = mon.wait_for(r"org\.kjump\.Manager1\.Resumed")
        assert "'resumed': <true>" in line and "'durations': <{" in line
        assert prop(bus, "ImageState") == "CONSUMED"
        last = prop(bus, "LastResult")
        assert last["result"]["data"] == "resumed"
        assert last["stats"]["data"]["kexec_rc"]["data"] == 255  # what the (fake) kexec -e said
        assert {"freeze tasks", "freeze filesystems", "load", "jump"} <= set(
            last["durations"]["data"]
        )
        r = kjumpctl(bus.address, "status", "--json")
        assert json.loads(r.stdout)["LastResult"]["result"] == "resumed"
    finally:
        mon.stop()
        d.stop()


def test_cancel_rolls_back_and_reports_cancelled(bus, machine) -> None:
    machine.hold()
    d = start(bus, machine)
    mon = Monitor(bus.address)
    try:
        assert gdbus_call(bus.address, "Hibernate", "test").returncode == 0
        machine.wait_held()
        r = kjumpctl(bus.address, "cancel")
        assert r.returncode == 0 and "cancelling" in r.stderr
        assert prop(bus, "State") == "cancelling"
        machine.let_go()
        wait_idle(bus)
        last = prop(bus, "LastResult")
        assert last["result"]["data"] == "cancelled"
        assert last["error"]["data"] == "org.kjump.Error.Cancelled"
        mon.wait_for(r"PrepareForSleep \(false,\)")
    finally:
        mon.stop()
        d.stop()
    assert machine.jumps() == 0 and machine.kexec_calls() == []  # it never got to kexec
    assert prop_free(machine)


def prop_free(machine: Machine) -> bool:
    """Nothing left behind by a rolled-back transition: no initrd, nothing loaded."""
    return (
        not (machine.root / "run/kjumpd/initrd").exists()
        and not Path(machine.env["FAKE_KEXEC_STATE"]).exists()
    )


def test_sigterm_during_a_transition_cancels_it_then_exits_cleanly(bus, machine) -> None:
    machine.hold()
    d = start(bus, machine)
    try:
        assert gdbus_call(bus.address, "Hibernate", "test").returncode == 0
        machine.wait_held()
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert d.proc.poll() is None  # it waits for the rollback
        machine.let_go()
        assert d.proc.wait(60) == 0, d.log
    finally:
        d.stop()
    assert any("STOPPING=1" in m for m in d.messages)
    assert "cancelling it and waiting for its rollback" in d.log
    assert "test finished: cancelled" in d.log
    assert machine.jumps() == 0 and machine.kexec_calls() == []
    assert prop_free(machine)
