"""org.kjump.Manager1 through a real dbus-daemon with a private config and real clients.

kjumpd runs as a real process against a sysroot (an empty tree unless said otherwise) with the
real transaction and preflight code; clients are gdbus, busctl, dbus-send and kjumpctl, as
root and as `nobody` (setpriv).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

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
    run,
)


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    require_tools("dbus-daemon", "gdbus", "busctl", "dbus-send", "setpriv")
    require(os.geteuid() == 0, "needs root (to run clients as nobody)")
    b = PrivateBus()
    yield b
    b.stop()


@pytest.fixture
def empty_sysroot(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
def daemon(bus: PrivateBus, empty_sysroot: Path, tmp_path: Path) -> Iterator[Kjumpd]:
    cfg = tmp_path / "kjumpd.toml"
    cfg.write_text("")  # all defaults
    d = Kjumpd(bus, empty_sysroot, cfg)
    d.wait_ready()
    yield d
    d.stop()


def test_can_hibernate_on_an_empty_sysroot_says_no_with_a_fix_per_reason(bus, daemon) -> None:
    out = busctl_json(bus.address, "call", BUS_NAME, OBJECT_PATH, IFACE, "CanHibernate")
    assert out["type"] == "sas"
    answer, reasons = out["data"]
    assert answer == "no"
    assert len(reasons) >= 3, reasons  # kernel config, jump area, target, save kernel...
    for r in reasons:
        assert "(fix: " in r and not r.endswith("(fix: )"), f"reason without a fix: {r!r}"
    text = " ".join(reasons).lower()
    assert "kexec" in text or "jump" in text  # the missing kernel support is among them


def test_check_returns_the_full_report_and_each_failure_has_a_fix(bus, daemon) -> None:
    out = busctl_json(bus.address, "call", BUS_NAME, OBJECT_PATH, IFACE, "Check")
    assert out["type"] == "ba(sbbss)"
    ok, items = out["data"]
    assert ok is False
    names = [i[0] for i in items]
    assert len(names) == len(set(names)) and len(items) >= 3
    failed = [i for i in items if not i[1] and i[2]]  # failed and fatal
    assert failed
    for name, _ok, _fatal, detail, fix in failed:
        assert detail and fix, f"{name}: a failed check needs a detail and a fix"
    # CanHibernate's reasons are exactly the failed checks
    answer, reasons = busctl_json(
        bus.address, "call", BUS_NAME, OBJECT_PATH, IFACE, "CanHibernate"
    )["data"]
    assert len(reasons) == len(failed)


def test_properties_are_readable_by_anyone(bus, daemon) -> None:
    for user in (None, "nobody"):
        props = busctl_json(
            bus.address,
            "get-property",
            BUS_NAME,
            OBJECT_PATH,
            IFACE,
            "State",
            "Progress",
            "ImageState",
            "LastResult",
            user=user,
        )
        state, progress, image, last = props
        assert state == {"type": "s", "data": "idle"}
        assert progress["type"] == "d"
        assert image["type"] == "s" and image["data"]  # e.g. "unknown: target ... missing"
        assert last == {"type": "a{sv}", "data": {}}


def test_an_unprivileged_caller_is_denied_with_a_named_error(bus, daemon) -> None:
    for method, args in (("Hibernate", ["platform"]), ("SuspendToBoth", []), ("Checkpoint", [])):
        r = gdbus_call(bus.address, method, *args, user="nobody")
        assert r.returncode != 0
        assert "org.kjump.Error.NotAuthorized" in r.stderr, r.stderr
        assert "uid 65534" in r.stderr and "fix:" in r.stderr
    # nothing was started on its behalf
    state = busctl_json(bus.address, "get-property", BUS_NAME, OBJECT_PATH, IFACE, "State")
    assert state["data"] == "idle"
    # and the bus policy keeps it from taking the service's name
    r = run(
        [
            "dbus-send",
            f"--bus={bus.address}",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.RequestName",
            f"string:{BUS_NAME}",
            "uint32:4",
        ],
        user="nobody",
    )
    assert r.returncode != 0 and "AccessDenied" in r.stderr, r.stdout + r.stderr


def test_kjumpctl_as_nobody_exits_6_with_one_line(bus, daemon) -> None:
    r = kjumpctl(bus.address, "hibernate", user="nobody")
    assert r.returncode == 6, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kjumpctl: not authorized"), r.stderr
    assert "Traceback" not in r.stderr and "GDBus.Error" not in r.stderr


def test_a_bad_mode_is_a_named_invalid_args_error(bus, daemon) -> None:
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
    assert "org.kjump.Error.InvalidArgs" in r.stderr and "warp-drive" in r.stderr, r.stderr
    assert "fix:" in r.stderr
    # a wrong argument type is refused by the bus object before any code runs
    r = gdbus_call(bus.address, "Hibernate", "42", "43")
    assert r.returncode != 0 and "InvalidArgs" in r.stderr
    # anyone on the bus may send a huge mode: a bounded part of it comes back, not all of it
    huge = "warp" * 25_000
    r = run(
        [
            "dbus-send",
            f"--bus={bus.address}",
            "--print-reply",
            f"--dest={BUS_NAME}",
            OBJECT_PATH,
            f"{IFACE}.Hibernate",
            f"string:{huge}",
        ]
    )
    assert r.returncode != 0 and "org.kjump.Error.InvalidArgs" in r.stderr, r.stderr[:300]
    assert "(100000 characters)" in r.stderr and len(r.stderr) < 1000, r.stderr[:300]


def test_a_failed_hibernation_is_reported_and_the_system_keeps_running(bus, daemon) -> None:
    mon = Monitor(bus.address)
    try:
        r = gdbus_call(bus.address, "Hibernate", "test")
        assert r.returncode == 0, r.stderr
        mon.wait_for(r"PropertiesChanged.*'State': <'running'>")
        mon.wait_for(r"PropertiesChanged.*'State': <'idle'>.*'LastResult'")
    finally:
        mon.stop()
    last = busctl_json(bus.address, "get-property", BUS_NAME, OBJECT_PATH, IFACE, "LastResult")[
        "data"
    ]
    assert last["result"]["data"] == "failed"
    assert last["mode"]["data"] == "test"
    assert last["error"]["data"].startswith("org.kjump.Error.")
    assert "fix:" in last["message"]["data"]
    # no PrepareForSleep(true) without a matching (false): the preflight stopped it early
    starts = [ln for ln in mon.lines if "PrepareForSleep (true" in ln]
    ends = [ln for ln in mon.lines if "PrepareForSleep (false" in ln]
    assert len(starts) == len(ends)
    # kjumpctl shows the same failure with its exit code and no traceback
    r = kjumpctl(bus.address, "hibernate", "--mode", "test")
    assert r.returncode in (1, 3), (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines()[-1].startswith("kjumpctl: ")
    assert "Traceback" not in r.stderr


def test_kjumpctl_status_json_matches_the_properties(bus, daemon) -> None:
    r = kjumpctl(bus.address, "status", "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["State"] == "idle"
    img = busctl_json(bus.address, "get-property", BUS_NAME, OBJECT_PATH, IFACE, "ImageState")
    assert status["ImageState"] == img["data"]
    r = kjumpctl(bus.address, "status")
    assert r.returncode == 0 and re.search(r"^state:\s+idle$", r.stdout, re.M), r.stdout


def test_cancel_when_idle_is_harmless(bus, daemon) -> None:
    out = busctl_json(bus.address, "call", BUS_NAME, OBJECT_PATH, IFACE, "Cancel")
    assert out == {"type": "b", "data": [False]}
    r = gdbus_call(bus.address, "Cancel", user="nobody")
    assert r.returncode == 0 and "false" in r.stdout


def test_kjumpctl_without_a_daemon_exits_4(bus) -> None:
    for args in (["status"], ["hibernate"], ["checkpoint"], ["cancel"]):
        r = kjumpctl(bus.address, *args)
        assert r.returncode == 4, (args, r.stderr)
        assert "kjumpd is not running" in r.stderr and "fix:" in r.stderr
        assert "Traceback" not in r.stderr
    r = kjumpctl(bus.address, "status", "--json")
    assert r.returncode == 4
    err = json.loads(r.stdout)
    assert err["error"] == "DaemonNotRunningError" and err["fix"]
    r = kjumpctl("unix:path=/nonexistent/bus.sock", "status")
    assert r.returncode == 4 and "fix:" in r.stderr


def test_without_polkit_members_of_the_configured_group_may_hibernate(
    bus, empty_sysroot, tmp_path
) -> None:
    cfg = tmp_path / "group.toml"
    cfg.write_text('[authz]\ngroup = "users"\n')
    d = Kjumpd(bus, empty_sysroot, cfg)
    try:
        d.wait_ready()
        member = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=users"]
        call = [
            "gdbus",
            "call",
            "--address",
            bus.address,
            "--dest",
            BUS_NAME,
            "--object-path",
            OBJECT_PATH,
            "--method",
            f"{IFACE}.Hibernate",
            "test",
        ]
        r = run(member + call)
        assert r.returncode == 0, r.stderr  # accepted: the transition starts
        r = run(call, user="nobody")  # not in the group
        assert "org.kjump.Error.NotAuthorized" in r.stderr and "users" in r.stderr, r.stderr
    finally:
        d.stop()
    assert "allowed org.kjump.hibernate to uid 65534" in d.log


def test_hostile_arguments_are_refused_before_they_reach_the_log(bus, daemon) -> None:
    # a mode that would forge a line in the daemon's log
    r = gdbus_call(bus.address, "Hibernate", "test\nkjumpd: all is well")
    assert r.returncode != 0 and "org.kjump.Error.InvalidArgs" in r.stderr, r.stderr
    assert "control characters" in r.stderr
