"""The kjumpd process: sd_notify, watchdog, SIGTERM, name ownership, bad config, journald
lines, D-Bus activation with the shipped activation file, the shipped systemd unit.
All against a real private dbus-daemon; kjumpd is a real process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_env import (
    BUS_NAME,
    CONTRIB,
    IFACE,
    OBJECT_PATH,
    PYTHON,
    REPO,
    Kjumpd,
    PrivateBus,
    busctl_json,
    require,
    require_tools,
    run,
)


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    require_tools("dbus-daemon", "busctl")
    b = PrivateBus()
    yield b
    b.stop()


@pytest.fixture
def sysroot(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


def name_owned(bus: PrivateBus) -> bool:
    return run(["busctl", f"--address={bus.address}", "status", BUS_NAME]).returncode == 0


def test_ready_status_and_a_clean_sigterm(bus, sysroot) -> None:
    d = Kjumpd(bus, sysroot)
    try:
        msg = d.wait_for_notification("READY=1")
        assert re.search(r"^STATUS=idle; image ", msg, re.M), msg
        assert name_owned(bus)
    finally:
        rc = d.stop(signal.SIGTERM)
    assert rc == 0, d.log
    assert any("STOPPING=1" in m for m in d.messages)
    assert not name_owned(bus)
    assert "Traceback" not in d.log


def test_watchdog_pings_at_half_the_interval(bus, sysroot) -> None:
    d = Kjumpd(bus, sysroot, env={"WATCHDOG_USEC": "400000"})
    try:
        d.wait_for_notification("READY=1")
        pings = sum("WATCHDOG=1" in m for m in d.notifications(3.0))
    finally:
        d.stop()
    # every 0.2 s: 15 in 3 s; loose bounds for a loaded machine, but neither silent nor
    # pinging at a rate that ignores WATCHDOG_USEC
    assert 5 <= pings <= 20, pings


def test_no_watchdog_pings_for_another_pid(bus, sysroot) -> None:
    d = Kjumpd(bus, sysroot, env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    try:
        d.wait_for_notification("READY=1")
        pings = sum("WATCHDOG=1" in m for m in d.notifications(0.8))
    finally:
        d.stop()
    assert pings == 0


def test_runs_without_notify_socket_and_without_polkit(bus, sysroot) -> None:
    d = Kjumpd(bus, sysroot, notify=False)
    try:
        d.wait_ready()
        state = busctl_json(bus.address, "get-property", BUS_NAME, OBJECT_PATH, IFACE, "State")
        assert state["data"] == "idle"
    finally:
        assert d.stop() == 0, d.log


def test_a_second_daemon_refuses_to_start_with_one_line(bus, sysroot) -> None:
    first = Kjumpd(bus, sysroot)
    try:
        first.wait_ready()
        second = Kjumpd(bus, sysroot, notify=False)
        assert second.proc.wait(30) == 1
        second.stop()
        lines = second.log.strip().splitlines()
        assert len(lines) == 1, second.log
        assert "cannot own the bus name org.kjump.Manager1" in lines[0] and "fix:" in lines[0]
        assert name_owned(bus)  # the first one still serves
    finally:
        first.stop()


@pytest.mark.parametrize(
    "text, key",
    [
        ('[hibernate]\nmode = "warp"\n', "hibernate.mode"),
        ("[nonsense]\n", "nonsense"),
        ("not toml at all ===\n", "not valid TOML"),
    ],
)
def test_a_bad_config_stops_it_with_a_line_naming_the_key(
    bus, sysroot, tmp_path, text, key
) -> None:
    cfg = tmp_path / "kjumpd.toml"
    cfg.write_text(text)
    d = Kjumpd(bus, sysroot, cfg, notify=False)
    assert d.proc.wait(30) == 1
    d.stop()
    lines = d.log.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "fix:" in lines[0], d.log
    assert not name_owned(bus)


def test_an_unreachable_bus_is_one_line(sysroot, tmp_path) -> None:
    r = subprocess.run(
        [
            PYTHON,
            "-m",
            "kjumpd.daemon.main",
            "--sysroot",
            str(sysroot),
            "--bus",
            f"unix:path={tmp_path}/no-bus.sock",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect to the bus" in lines[0] and "fix:" in lines[0]


def test_journald_lines_carry_priorities(bus, sysroot) -> None:
    d = Kjumpd(bus, sysroot, journal=True)
    try:
        d.wait_ready()
        r = run(
            [
                "dbus-send",
                f"--bus={bus.address}",
                "--print-reply",
                f"--dest={BUS_NAME}",
                OBJECT_PATH,
                f"{IFACE}.Hibernate",
                "string:warp-drive",
            ]
        )
        assert r.returncode != 0
    finally:
        d.stop()
    lines = d.log.strip().splitlines()
    assert lines and all(re.match(r"^<[0-7]>", ln) for ln in lines), d.log
    assert any(ln.startswith("<6>kjumpd: serving") for ln in lines)
    assert any(ln.startswith("<4>") and "warp-drive" in ln for ln in lines)  # warning


def test_bus_activation_with_the_shipped_service_file(tmp_path, sysroot) -> None:
    require_tools("dbus-daemon", "busctl")
    shipped = (CONTRIB / "org.kjump.Manager1.service").read_text()
    assert re.search(r"^Name=org\.kjump\.Manager1$", shipped, re.M)
    assert re.search(r"^SystemdService=kjumpd\.service$", shipped, re.M)
    kjumpd_bin = Path(sys.executable).parent / "kjumpd"
    require(kjumpd_bin.exists(), "the kjumpd entry point is not installed in the venv")
    services = tmp_path / "services"
    services.mkdir()
    # the shipped file, with Exec pointing at this checkout and the test sysroot
    (services / "org.kjump.Manager1.service").write_text(
        re.sub(r"^Exec=.*$", f"Exec={kjumpd_bin} --sysroot {sysroot}", shipped, flags=re.M)
    )
    bus = PrivateBus(servicedir=services)
    try:
        assert not name_owned(bus)
        out = busctl_json(bus.address, "get-property", BUS_NAME, OBJECT_PATH, IFACE, "State")
        assert out["data"] == "idle"  # the bus started kjumpd on DBUS_STARTER_ADDRESS
        pid = busctl_json(
            bus.address,
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetConnectionUnixProcessID",
            "s",
            BUS_NAME,
        )["data"][0]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while name_owned(bus) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not name_owned(bus)
    finally:
        bus.stop()


def test_the_shipped_unit_passes_systemd_analyze(tmp_path) -> None:
    require_tools("systemd-analyze")
    unit = (CONTRIB / "kjumpd.service").read_text()
    for line in ("Type=notify", "BusName=org.kjump.Manager1", "NotifyAccess=main"):
        assert re.search(rf"^{re.escape(line)}$", unit, re.M), line
    assert re.search(r"^WatchdogSec=\d+", unit, re.M)
    # however the service stops, what it left frozen is thawed by systemd itself
    assert re.search(r"^ExecStopPost=kjumpd --recover$", unit, re.M)
    kjumpd_bin = Path(sys.executable).parent / "kjumpd"
    require(kjumpd_bin.exists(), "the kjumpd entry point is not installed in the venv")
    copy = tmp_path / "kjumpd.service"
    copy.write_text(
        re.sub(r"^(ExecStart|ExecStopPost)=\S*kjumpd\b", rf"\1={kjumpd_bin}", unit, flags=re.M)
    )
    r = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "kjumpd.service" in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_the_shipped_policy_files_are_well_formed() -> None:
    import xml.etree.ElementTree as ET

    conf = ET.parse(CONTRIB / "org.kjump.Manager1.conf").getroot()
    owners = [
        p
        for p in conf.iter("policy")
        for a in p.iter("allow")
        if a.get("own") == "org.kjump.Manager1"
    ]
    assert [p.get("user") for p in owners] == ["root"]
    actions = ET.parse(CONTRIB / "org.kjump.policy").getroot()
    ids = {a.get("id") for a in actions.iter("action")}
    assert ids == {"org.kjump.hibernate", "org.kjump.checkpoint", "org.kjump.manage"}
    from kjumpd.daemon import authz

    assert ids == set(authz.ACTIONS)


def test_a_check_asked_over_the_bus_updates_what_logind_offers_at_once(bus, sysroot) -> None:
    """`kjumpctl install` asks a running kjumpd to check again (Check()), so logind's offer
    follows the change without waiting for the periodic check (30 s); with no kjumpd on the
    bus the request starts none."""
    from kjumpd.cli.daemon_cmds import recheck
    from kjumpd.daemon import sleepconf
    from kjumpd.daemon.install import SHIPPED

    assert not recheck(bus.address, timeout=5)  # nobody there: nothing started
    (sysroot / sleepconf.SYSTEMD_RUNNING.lstrip("/")).mkdir(parents=True)
    hook = sysroot / next(s.dest for s in SHIPPED if s.name == "kjumpd-hibernate.conf").lstrip("/")
    hook.parent.mkdir(parents=True)
    hook.write_text("[Service]\nExecStart=\nExecStart=kjumpctl hibernate\n")
    dropin = sysroot / sleepconf.DROPIN.lstrip("/")
    d = Kjumpd(bus, sysroot)
    try:
        d.wait_for_notification("READY=1")
        deadline = time.monotonic() + 20
        while not dropin.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        # an empty machine fails the preflight: hibernation is withheld from logind
        assert "AllowHibernation=no" in dropin.read_text(), d.log
        dropin.unlink()
        assert recheck(bus.address)
        assert dropin.exists(), d.log  # written by the Check() itself, not 30 s later
    finally:
        d.stop()
