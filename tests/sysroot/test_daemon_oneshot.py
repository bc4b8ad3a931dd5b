"""kjumpd start-up drops its one-shot boot into the restore environment when the image can no
longer be restored (a real kjumpd process on a private bus, a fake tree with a real ext4 /boot)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dbus_env import Kjumpd, PrivateBus, require_tools
from kjump_faketree import grub_machine

from kjumpd.daemon import bootentry
from kjumpd.daemon.bootentry import ENTRY_ID
from kjumpd.sysroot import Sysroot
from tests.prereq import need


@pytest.fixture
def armed_root(tmp_path: Path) -> Path:
    """A GRUB machine with kjumpd's entry installed and the next boot armed to start it."""
    need(shutil.which("mkfs.ext4") is not None, "mkfs.ext4 is not installed")
    root = grub_machine(tmp_path / "root")
    k, i = tmp_path / "bzImage", tmp_path / "restore.img"
    k.write_bytes(b"MZ kernel" * 100)
    i.write_bytes(b"\x1f\x8b initrd" * 100)
    sysroot = Sysroot(root)
    bootentry.install(
        sysroot,
        "grub",
        kernel=k,
        initrd=i,
        cmdline="kjump.target=0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e kjump.offset=1048576 "
        "console=ttyS0",
        machine=False,
    )
    bootentry.grubenv_write(sysroot, {"saved_entry": "gnulinux-simple"})
    assert bootentry.set_oneshot(sysroot)
    return root


@pytest.fixture
def bus():
    require_tools("dbus-daemon", "busctl")
    b = PrivateBus()
    yield b
    b.stop()


def start_and_stop(bus: PrivateBus, root: Path) -> str:
    d = Kjumpd(bus, root)
    try:
        d.wait_for_notification("READY=1")
    finally:
        rc = d.stop()
    assert rc == 0, d.log
    return d.log


def test_no_image_at_start_up_clears_the_one_shot(bus, armed_root: Path) -> None:
    log = start_and_stop(bus, armed_root)  # the configured target does not exist: no image
    env = bootentry.grubenv_read(Sysroot(armed_root))
    assert "next_entry" not in env, log
    assert env["saved_entry"] == "gnulinux-simple"  # the rest of grubenv is untouched
    assert not bootentry.oneshot_pending(Sysroot(armed_root))
    assert "cleared the one-shot boot" in log


def test_an_unreadable_image_keeps_the_one_shot(bus, armed_root: Path) -> None:
    target = armed_root / "var/lib/kjumpd/image"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\xa5" * (1 << 20))  # no image header kjumpd can read
    start_and_stop(bus, armed_root)
    assert bootentry.grubenv_read(Sysroot(armed_root)).get("next_entry") == ENTRY_ID


@pytest.mark.parametrize(
    "state,stale",
    [
        ("SAVED", False),
        ("RESTORING(2)", False),
        ("EMPTY", True),
        ("WRITING", True),
        ("CONSUMED", True),
        ("ABORTED(cancelled)", True),
        ("INVALID(restore failed)", True),
        ("unknown: target /var/lib/kjumpd/image does not exist (fix: run 'kjumpctl setup')", True),
        ("unreadable: cannot read the header", False),
    ],
)
def test_which_image_states_make_the_one_shot_stale(state: str, stale: bool) -> None:
    from kjumpd.daemon.main import oneshot_is_stale

    assert oneshot_is_stale(state) is stale
