"""logind's offer of hibernation follows kjumpd's preflight on a machine whose systemd
hibernation kjumpctl install made kjumpd's: a runtime sleep.conf drop-in withholds it while
the preflight fails, and is gone once it passes; a machine without the integration (or
without systemd) is left alone."""

from __future__ import annotations

from pathlib import Path

from kjumpd.daemon import sleepconf
from kjumpd.daemon.install import SHIPPED
from kjumpd.sysroot import Sysroot

HOOK = next(s.dest for s in SHIPPED if s.name == "kjumpd-hibernate.conf")


def machine(tmp_path: Path, systemd: bool = True, integrated: bool = True) -> Sysroot:
    if systemd:
        (tmp_path / sleepconf.SYSTEMD_RUNNING.lstrip("/")).mkdir(parents=True)
    if integrated:
        hook = tmp_path / HOOK.lstrip("/")
        hook.parent.mkdir(parents=True)
        hook.write_text("[Service]\nExecStart=\nExecStart=kjumpctl hibernate\n")
    return Sysroot(str(tmp_path))


def test_a_failing_preflight_withholds_hibernation_until_it_passes(tmp_path: Path) -> None:
    sr = machine(tmp_path)
    dropin = sr.path(sleepconf.DROPIN)
    why = ["boot entry: no restore-first boot entry is installed\n(fix: kjumpctl install)"]
    assert sleepconf.publish(sr, False, why) == "withheld"
    text = dropin.read_text()
    assert (
        "[Sleep]\nAllowHibernation=no\nAllowHybridSleep=no\nAllowSuspendThenHibernate=no\n" in text
    )
    # the reason is one comment line, whatever it held
    assert (
        "# boot entry: no restore-first boot entry is installed (fix: kjumpctl install)\n" in text
    )
    assert sleepconf.publish(sr, False, why) is None  # nothing changed
    assert sleepconf.publish(sr, True, []) == "offered"
    assert not dropin.exists()
    assert sleepconf.publish(sr, True, []) is None


def test_without_kjumpds_hibernation_or_without_systemd_nothing_is_written(tmp_path: Path) -> None:
    for i, (systemd, integrated) in enumerate(((True, False), (False, True))):
        sr = machine(tmp_path / str(i), systemd=systemd, integrated=integrated)
        assert sleepconf.publish(sr, False, ["target: missing"]) is None
        assert not sr.path(sleepconf.DROPIN).exists()
