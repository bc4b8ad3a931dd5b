"""Authorization through a real polkitd on the private bus.

polkitd (Debian's, unmodified) runs in its own mount namespace where its actions directory is
contrib/org.kjump.policy (+ the host's actions) and its rules directory holds one test rule;
the host's directories are untouched. It owns org.freedesktop.PolicyKit1 on the private bus
(DBUS_SYSTEM_BUS_ADDRESS), so kjumpd must ask it, and the answers must follow the rule and the
shipped action defaults, not kjumpd's local root/group fallback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_env import BUS_NAME, CONTRIB, Kjumpd, PrivateBus, gdbus_call, require, require_tools, run

POLKITD = Path("/usr/lib/polkit-1/polkitd")
POLKIT_BUS_CONF = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")
RULE = """polkit.addRule(function(action, subject) {
    // the test's stand-in for a site policy: nobody may hibernate, nothing else
    if (action.id == "org.kjump.hibernate" && subject.user == "nobody") {
        return polkit.Result.YES;
    }
});
"""


class Polkitd:
    def __init__(self, bus: PrivateBus, tmp: Path) -> None:
        actions, rules = tmp / "actions", tmp / "rules"
        actions.mkdir()
        rules.mkdir()
        for f in Path("/usr/share/polkit-1/actions").glob("*.policy"):
            shutil.copy(f, actions)
        shutil.copy(CONTRIB / "org.kjump.policy", actions)
        (rules / "10-kjump-test.rules").write_text(RULE)
        for d in (tmp, actions, rules):
            os.chmod(d, 0o755)
        script = (
            f"mount --bind {actions} /usr/share/polkit-1/actions && "
            f"mount --bind {rules} /etc/polkit-1/rules.d && exec {POLKITD} --no-debug"
        )
        self.log = open(tmp / "polkitd.log", "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = run(["busctl", f"--address={bus.address}", "status", "org.freedesktop.PolicyKit1"])
            if r.returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError("polkitd did not come up: " + (tmp / "polkitd.log").read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def polkit_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    require_tools("dbus-daemon", "gdbus", "busctl", "setpriv", "unshare")
    require(os.geteuid() == 0, "needs root (mount namespace for polkitd, clients as nobody)")
    require(POLKITD.exists() and POLKIT_BUS_CONF.exists(), "polkitd is not installed")
    bus = PrivateBus(includes=[POLKIT_BUS_CONF])
    pk_dir = tmp_path / "polkit"
    pk_dir.mkdir()
    pk = Polkitd(bus, pk_dir)
    yield bus
    pk.stop()
    bus.stop()


@pytest.fixture
def daemon(polkit_bus: PrivateBus, tmp_path: Path) -> Iterator[Kjumpd]:
    root = tmp_path / "root"
    root.mkdir()
    d = Kjumpd(polkit_bus, root)
    d.wait_ready()
    yield d
    d.stop()


def test_polkit_decides_for_unprivileged_callers(polkit_bus, daemon) -> None:
    # the rule allows nobody to hibernate: accepted (and then fails in the empty sysroot's
    # preflight, inside the transition), although kjumpd's local fallback would refuse uid 65534
    r = gdbus_call(polkit_bus.address, "Hibernate", "test", user="nobody")
    assert r.returncode == 0, r.stderr
    assert "allowed org.kjump.hibernate to uid 65534 (polkit)" in daemon.log
    deadline = time.monotonic() + 30
    while "test finished" not in daemon.log and time.monotonic() < deadline:
        time.sleep(0.1)
    # a checkpoint needs an administrator (auth_admin for callers outside an active session);
    # without an authentication agent polkit says no
    r = gdbus_call(polkit_bus.address, "Checkpoint", user="nobody")
    assert r.returncode != 0
    assert "org.kjump.Error.NotAuthorized" in r.stderr and "polkit refused" in r.stderr, r.stderr
    assert "org.kjump.checkpoint" in r.stderr


def test_can_hibernate_says_challenge_when_polkit_wants_authentication(
    polkit_bus, tmp_path
) -> None:
    from test_dbus_transition import Machine

    (tmp_path / "machine").mkdir()
    m = Machine(tmp_path / "machine")
    d = Kjumpd(polkit_bus, m.root, env=m.env)
    try:
        d.wait_ready()

        def can(user: str) -> str:
            import pwd

            gid = pwd.getpwnam(user).pw_gid
            r = run(
                [
                    "setpriv",
                    f"--reuid={user}",
                    f"--regid={gid}",
                    "--clear-groups",
                    "gdbus",
                    "call",
                    "--address",
                    polkit_bus.address,
                    "--dest",
                    BUS_NAME,
                    "--object-path",
                    "/org/kjump/Manager1",
                    "--method",
                    "org.kjump.Manager1.CanHibernate",
                ]
            )
            assert r.returncode == 0, r.stderr
            return r.stdout

        assert can("root") == "('yes', @as [])\n"
        assert can("nobody") == "('yes', @as [])\n"  # the rule
        out = can("daemon")  # auth_admin_keep, no session
        assert out.startswith("('challenge', ['polkit refused org.kjump.hibernate to daemon"), out
    finally:
        d.stop()
