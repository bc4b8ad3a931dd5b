"""kjumpctl install / uninstall on a fake machine: --dry-run changes nothing and names every
change, install puts each file where the system looks for it and records it, a second install
changes nothing, uninstall gives back the tree as it was; the boot loader's command line gets
the jump area and keeps the user's parameters; commands go through the runner."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kjump_faketree import build, fake_bzimage, tree_hash, w

from kjumpd.daemon import blockmap, bootentry, install
from kjumpd.daemon import config as cfgmod
from kjumpd.sysroot import Sysroot

GRUB = (
    "GRUB_DEFAULT=0\n"
    'GRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
    'GRUB_CMDLINE_LINUX="splash mitigations=auto"\n'
)


@pytest.fixture
def machine(tmp_path: Path) -> tuple[Sysroot, Path]:
    """A machine before kjumpd is installed: an image target, the jump area reserved, GRUB's
    defaults file, no save kernel files, no kjumpd files; the save kernel and R's files are
    given on the command line."""
    root, given = tmp_path / "root", tmp_path / "given"
    build(root, tmp_path / "host")
    given.mkdir()
    for name in ("bzImage", "initramfs.cpio.gz"):
        shutil.move(root / "usr/lib/kjumpd/save" / name, given / name)
    (root / "usr/lib/kjumpd/save").rmdir()
    (given / "restore-vmlinuz").write_bytes(fake_bzimage(16 << 20))
    (given / "restore-initrd.img").write_bytes(b"\x1f\x8b generic restore initramfs" * 50)
    w(
        root,
        "/etc/kjumpd/kjumpd.toml",
        '[target]\npath = "/dev/vda1"\n[jump_area]\nstart = "0x20000000"\n',
    )
    w(root, "/etc/default/grub", GRUB)
    sr = Sysroot(root)
    blockmap.setup(sr, "/dev/vda1", 0)
    return sr, given


def opts(given: Path, **kw: object) -> install.Options:
    return install.Options(
        save_kernel=given / "bzImage",
        save_initramfs=given / "initramfs.cpio.gz",
        restore_kernel=given / "restore-vmlinuz",
        restore_initrd=given / "restore-initrd.img",
        **kw,  # type: ignore[arg-type]
    )


def kjumpctl(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kjumpd.cli", "--sysroot", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def given_args(given: Path) -> list[str]:
    return [
        "--save-kernel", str(given / "bzImage"),
        "--save-initramfs", str(given / "initramfs.cpio.gz"),
        "--restore-kernel", str(given / "restore-vmlinuz"),
        "--restore-initrd", str(given / "restore-initrd.img"),
    ]  # fmt: skip


def test_dry_run_names_every_change_and_makes_none(machine) -> None:
    sr, given = machine
    before = tree_hash(sr.root)
    proc = kjumpctl(sr.root, "install", "--dry-run", *given_args(given))
    assert proc.returncode == 0, proc.stderr
    assert tree_hash(sr.root) == before
    out = proc.stdout
    for s in install.SHIPPED:
        assert f"write     {s.dest}" in out
    assert "write     /usr/lib/kjumpd/save/bzImage" in out
    assert "replace   /etc/kjumpd/kjumpd.toml" in out
    assert "replace   /etc/default/grub  (kernel command line: crashkernel=128M@512M)" in out
    assert "boot entry after-files" in out
    assert "run       systemctl daemon-reload" in out and "run       update-grub" not in out


def test_install_then_again_then_uninstall(machine) -> None:
    sr, given = machine
    before = tree_hash(sr.root)
    ran: list[list[str]] = []

    def runner(argv):
        ran.append(list(argv))
        return 0

    said: list[str] = []
    p = install.plan(sr, opts(given))
    man = install.apply(sr, p, runner, said.append)
    # the save kernel, its hashes in the config (the rest of the config kept)
    for name, dest in (("bzImage", "bzImage"), ("initramfs.cpio.gz", "initramfs.cpio.gz")):
        assert sr.path(f"/usr/lib/kjumpd/save/{dest}").read_bytes() == (given / name).read_bytes()
    cfg = cfgmod.load(sr)
    assert cfg.target == "/dev/vda1"
    assert cfg.save_kernel_sha256 == install.sha256_file(given / "bzImage")
    assert cfg.save_initramfs_sha256 == install.sha256_file(given / "initramfs.cpio.gz")
    # contrib/ files where systemd, D-Bus and polkit look; hooks executable
    for s in install.SHIPPED:
        real = sr.path(s.dest)
        assert real.read_bytes() == install.resources.find("contrib", s.name).read_bytes()
        assert real.stat().st_mode & 0o777 == s.mode
    dropin = sr.path("/usr/lib/systemd/system/systemd-hibernate.service.d/kjumpd.conf")
    assert "ExecStart=\nExecStart=kjumpctl hibernate\n" in dropin.read_text()
    # the jump area joins the user's parameters
    grub = sr.read_text("/etc/default/grub")
    assert 'GRUB_CMDLINE_LINUX="splash mitigations=auto crashkernel=128M@512M"' in grub
    assert 'GRUB_CMDLINE_LINUX_DEFAULT="quiet"' in grub
    # the restore-first entry, told the boot loader's command line and the jump area
    rec = bootentry.read_record(sr)
    assert rec is not None and rec.kind == "restore-first" and man.boot_entry
    assert rec.normal_cmdline == "splash mitigations=auto crashkernel=128M@512M quiet"
    assert rec.normal_kernel == "/boot/vmlinuz"
    assert rec.jump_area == [0x20000000, 128 << 20]
    assert bootentry.check(sr) == [], bootentry.check(sr)
    assert ran == [["systemctl", "daemon-reload"], ["systemctl", "enable", "kjumpd.service"],
                   ["grub-mkconfig", "-o", "/boot/grub/grub.cfg"]]  # fmt: skip
    recorded = {f["path"] for f in json.loads(sr.read_text(install.MANIFEST_PATH))["files"]}
    assert {s.dest for s in install.SHIPPED} <= recorded
    assert "/etc/default/grub" in recorded

    # a second install changes nothing and says so
    installed = tree_hash(sr.root)
    proc = kjumpctl(sr.root, "install", *given_args(given))
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout
    assert tree_hash(sr.root) == installed

    # uninstall gives back the machine as it was
    ran.clear()
    install.uninstall(sr, runner, said.append)
    assert tree_hash(sr.root) == before
    assert ["systemctl", "disable", "kjumpd.service"] in ran
    assert ["systemctl", "daemon-reload"] in ran


def test_uninstall_leaves_a_file_changed_since_install(machine) -> None:
    sr, given = machine
    install.apply(sr, install.plan(sr, opts(given)), lambda a: 0, lambda s: None)
    unit = sr.path("/usr/lib/systemd/system/kjumpd.service")
    unit.write_text(unit.read_text() + "# the admin's own line\n")
    grub = sr.read_text("/etc/default/grub").replace('DEFAULT="quiet"', 'DEFAULT="quiet nosmt"')
    w(sr.root, "/etc/default/grub", grub)
    said: list[str] = []
    install.uninstall(sr, lambda a: 0, said.append)
    assert unit.is_file() and "the admin's own line" in unit.read_text()
    assert any("keep      /usr/lib/systemd/system/kjumpd.service" in s for s in said)
    assert not sr.path("/usr/share/polkit-1/actions/org.kjump.policy").exists()
    # the command line loses kjumpd's word only: the user's later change stays
    assert sr.read_text("/etc/default/grub") == GRUB.replace('"quiet"', '"quiet nosmt"')
    assert any(s.startswith("revert    /etc/default/grub  (crashkernel=128M@512M") for s in said)


def test_uninstall_puts_back_the_crashkernel_install_replaced(machine) -> None:
    sr, given = machine
    w(sr.root, "/etc/default/grub", GRUB.replace("splash", "splash crashkernel=auto"))
    install.apply(sr, install.plan(sr, opts(given)), lambda a: 0, lambda s: None)
    assert "crashkernel=auto" not in sr.read_text("/etc/default/grub")
    w(sr.root, "/etc/default/grub", sr.read_text("/etc/default/grub") + "GRUB_TIMEOUT=3\n")
    install.uninstall(sr, lambda a: 0, lambda s: None)
    assert sr.read_text("/etc/default/grub") == (
        GRUB.replace('"splash mitigations=auto"', '"splash mitigations=auto crashkernel=auto"')
        + "GRUB_TIMEOUT=3\n"
    )


def test_uninstall_dry_run_changes_nothing(machine) -> None:
    sr, given = machine
    install.apply(sr, install.plan(sr, opts(given)), lambda a: 0, lambda s: None)
    installed = tree_hash(sr.root)
    proc = kjumpctl(sr.root, "uninstall", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert tree_hash(sr.root) == installed
    assert "restore   /etc/default/grub" in proc.stdout
    assert "remove    /usr/lib/systemd/system/kjumpd.service" in proc.stdout


def test_set_save_kernel_hashes_keeps_the_rest() -> None:
    text = '[target]\npath = "/x"\n[save_kernel]\n# kernel_sha256 = "..."\nappend = "a"\n[hooks]\n'
    out = install.set_save_kernel_hashes(text, "a" * 64, "b" * 64)
    assert out == (
        '[target]\npath = "/x"\n[save_kernel]\ninitramfs_sha256 = "' + "b" * 64 + '"\n'
        'kernel_sha256 = "' + "a" * 64 + '"\nappend = "a"\n[hooks]\n'
    )
    assert install.set_save_kernel_hashes(out, "a" * 64, "b" * 64) == out
    added = install.set_save_kernel_hashes('[target]\npath = "/x"', "c" * 64, "d" * 64)
    cfg = cfgmod.loads(added)
    assert (cfg.target, cfg.save_kernel_sha256) == ("/x", "c" * 64)


@pytest.fixture
def installed(machine) -> tuple[Sysroot, Path]:
    sr, given = machine
    install.apply(sr, install.plan(sr, opts(given)), lambda a: 0, lambda s: None)
    assert bootentry.check(sr) == []
    return sr, given


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return kjumpctl(root, "check", "--mode", "test")


def test_check_fails_after_a_kernel_upgrade_until_the_entry_is_refreshed(installed) -> None:
    sr, _given = installed
    w(sr.root, "/boot/vmlinuz-6.13.2-amd64", fake_bzimage(21 << 20))
    w(sr.root, "/boot/initrd.img-6.13.2-amd64", b"\x1f\x8b new initrd")
    w(sr.root, "/boot/vmlinuz-6.13.10-amd64", fake_bzimage(22 << 20))
    w(sr.root, "/boot/initrd.img-6.13.10-amd64", b"\x1f\x8b newest initrd")
    proc = check(sr.root)
    assert proc.returncode == 3
    line = next(ln for ln in proc.stdout.splitlines() if "default kernel" in ln)
    assert "/boot/vmlinuz-6.13.10-amd64" in line and "run kjumpctl install" in line
    # what the kernel upgrade hooks run
    proc = kjumpctl(sr.root, "install", "--refresh-boot-entry")
    assert proc.returncode == 0, proc.stderr
    assert bootentry.check(sr) == []
    rec = bootentry.read_record(sr)
    assert rec is not None and rec.normal_kernel == "/boot/vmlinuz-6.13.10-amd64"
    payload = sr.path(rec.initrd).read_bytes()
    assert b"newest initrd" in payload and b"new initrd" not in payload.replace(b"newest", b"")


def test_check_fails_when_the_boot_loader_command_line_changed(installed) -> None:
    sr, given = installed
    grub = sr.read_text("/etc/default/grub").replace('DEFAULT="quiet"', 'DEFAULT="quiet nosmt"')
    w(sr.root, "/etc/default/grub", grub)
    problems = bootentry.check(sr)
    assert len(problems) == 1 and "nosmt" in problems[0] and "kjumpctl install" in problems[0]
    # install refreshes the entry (the grub file is the user's: kept as it is)
    proc = kjumpctl(sr.root, "install", *given_args(given))
    assert proc.returncode == 0, proc.stderr
    assert "boot entry installed: restore-first (bls)" in proc.stdout
    assert bootentry.check(sr) == []
    assert "nosmt" in sr.read_text("/etc/default/grub")


def test_a_jump_area_that_moved_needs_no_new_entry(installed) -> None:
    """KASLR or crashkernel=SIZE may place A's area elsewhere at a boot: R loads the save
    kernel where the image says A's area was, so the entry stays good."""
    sr, _given = installed
    cmd = sr.read_text("/proc/cmdline").replace("crashkernel=128M@512M", "crashkernel=128M")
    w(sr.root, "/proc/cmdline", cmd)
    iomem = sr.read_text("/proc/iomem").replace(
        "20000000-27ffffff : Crash kernel", "37000000-3effffff : Crash kernel"
    )
    w(sr.root, "/proc/iomem", iomem)
    assert bootentry.check(sr) == []


def _grub_crashkernel(sr: Sysroot, value: str | None) -> None:
    text = "\n".join(
        ln for ln in sr.read_text("/etc/default/grub").splitlines() if "crashkernel" not in ln
    )
    if value is not None:
        text += f'\nGRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX crashkernel={value}"'
    w(sr.root, "/etc/default/grub", text + "\n")


def _item(proc: subprocess.CompletedProcess[str], name: str) -> str:
    lines = proc.stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if f"] {name}:" in ln)
    return "\n".join(lines[i : i + 2])


def test_a_boot_loader_that_drops_or_shrinks_the_jump_area_fails_check(installed) -> None:
    """This boot still has its reservation, but the next boot would not: check says so,
    naming the value and the fix, and one `kjumpctl install` puts it right."""
    sr, given = installed
    assert check(sr.root).returncode == 0
    for value, said in ((None, "has no crashkernel="), ("16M", "crashkernel=16M")):
        _grub_crashkernel(sr, value)
        proc = check(sr.root)
        item = _item(proc, "jump area, next boot")
        assert proc.returncode == 3 and item.startswith("[FAIL]"), proc.stdout
        assert said in item and "fix: run `kjumpctl install`" in item, item
        assert "kjumpctl install" in item and "[ok  ] jump area:" in proc.stdout
    proc = kjumpctl(sr.root, "install", *given_args(given))
    assert proc.returncode == 0, proc.stderr
    assert "crashkernel=128M@512M" in sr.read_text("/etc/default/grub")
    # the entry was planned after the edit: it boots the command line the boot loader has now
    proc = check(sr.root)
    assert proc.returncode == 0, proc.stdout


def test_a_larger_jump_area_for_the_next_boot_is_followed_not_reverted(installed) -> None:
    """The user asks the boot loader for more room: the entry is stale until refreshed (the
    command line changed), install keeps the user's value, check then passes and says when
    it takes effect."""
    sr, given = installed
    _grub_crashkernel(sr, "192M@512M")
    assert check(sr.root).returncode == 3
    proc = kjumpctl(sr.root, "install", *given_args(given))
    assert proc.returncode == 0, proc.stderr
    assert "crashkernel=192M@512M" in sr.read_text("/etc/default/grub")
    proc = check(sr.root)
    assert proc.returncode == 0, proc.stdout
    item = _item(proc, "jump area, next boot")
    assert "crashkernel=192M@512M" in item and "takes effect at the next boot" in item, item
    # a form that reserves no single area is refused for the next boot as for this one
    _grub_crashkernel(sr, "256M,high")
    proc = check(sr.root)
    assert proc.returncode == 3 and "above 4 GiB" in _item(proc, "jump area, next boot")


def test_the_ranges_form_of_a_kdump_setup_is_judged_by_this_machine_s_ram(installed) -> None:
    """crashkernel=START-[END]:SIZE,... (what kdump packages write) reserves the size of the
    range holding this machine's RAM (1 GiB here): that size must serve the save kernel,
    at [jump_area] start when the config pins one."""
    sr, given = installed
    for value, said in (
        ("512M-4G:192M,4G-:256M", "needs 128M at 512M"),  # no offset, the config pins one
        ("2G-:256M@512M", "none of its ranges holds this machine's 1023 MiB of RAM"),
        ("512M-4G:64M,4G-:256M@512M", "needs 128M at 512M"),
    ):
        _grub_crashkernel(sr, value)
        proc = check(sr.root)
        item = _item(proc, "jump area, next boot")
        assert proc.returncode == 3 and said in item, item
    _grub_crashkernel(sr, "512M-4G:192M,4G-:256M@512M")
    proc = check(sr.root)
    item = _item(proc, "jump area, next boot")
    assert item.startswith("[ok  ]") and "crashkernel=512M-4G:192M,4G-:256M@512M" in item, item
    # install keeps a value that serves (the entry is refreshed for the new command line)
    proc = kjumpctl(sr.root, "install", *given_args(given))
    assert proc.returncode == 0, proc.stderr
    assert "crashkernel=512M-4G:192M,4G-:256M@512M" in sr.read_text("/etc/default/grub")
    proc = check(sr.root)
    assert proc.returncode == 0, proc.stdout


def test_the_kernel_hooks_refresh_the_entry(installed, tmp_path: Path) -> None:
    """contrib's postinst.d hook and kernel-install plugin, with kjumpctl on PATH working on
    the fake root: the new kernel becomes the one R boots."""
    sr, _given = installed
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "kjumpctl"
    fake.write_text(f'#!/bin/sh\nexec {sys.executable} -m kjumpd.cli --sysroot {sr.root} "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    w(sr.root, "/boot/vmlinuz-7.0.0", fake_bzimage(23 << 20))
    w(sr.root, "/boot/initrd.img-7.0.0", b"\x1f\x8b initrd 7")
    hook = install.resources.find("contrib", "zz-kjumpd")
    proc = subprocess.run(
        [str(hook), "7.0.0", "/boot/vmlinuz-7.0.0"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    rec = bootentry.read_record(sr)
    assert rec is not None and rec.normal_kernel == "/boot/vmlinuz-7.0.0"
    assert bootentry.check(sr) == []
    # kernel-install: the image it was given, the initrd its earlier plugins made
    w(sr.root, "/boot/vmlinuz-7.1.0", fake_bzimage(24 << 20))
    w(sr.root, "/boot/entries/7.1.0/initrd", b"\x1f\x8b initrd 7.1")
    plugin = install.resources.find("contrib", "90-kjumpd.install")
    proc = subprocess.run(
        [str(plugin), "add", "7.1.0", "/boot/entries/7.1.0", "/boot/vmlinuz-7.1.0"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    rec = bootentry.read_record(sr)
    assert rec is not None and rec.normal_kernel == "/boot/vmlinuz-7.1.0"
    assert b"initrd 7.1" in sr.path(rec.initrd).read_bytes()
    # a hook failing never fails the kernel installation: it says so
    sr.path(install.R_KERNEL).unlink()
    w(sr.root, "/boot/vmlinuz-7.2.0", fake_bzimage(24 << 20))
    proc = subprocess.run(
        [str(hook), "7.2.0", "/boot/vmlinuz-7.2.0"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "run kjumpctl check" in proc.stderr


def test_kernel_install_machines_get_the_jump_area_in_etc_kernel_cmdline(machine) -> None:
    sr, given = machine
    sr.path("/etc/default/grub").unlink()
    w(sr.root, "/etc/kernel/cmdline", "root=UUID=1234 ro rhgb quiet crashkernel=auto\n")
    install.apply(sr, install.plan(sr, opts(given)), lambda a: 0, lambda s: None)
    assert sr.read_text("/etc/kernel/cmdline") == (
        "root=UUID=1234 ro rhgb quiet crashkernel=128M@512M\n"
    )
    rec = bootentry.read_record(sr)
    assert (
        rec is not None
        and rec.normal_cmdline == "root=UUID=1234 ro rhgb quiet crashkernel=128M@512M"
    )
    install.uninstall(sr, lambda a: 0, lambda s: None)
    assert sr.read_text("/etc/kernel/cmdline") == "root=UUID=1234 ro rhgb quiet crashkernel=auto\n"


def test_without_a_given_initramfs_it_is_built_from_this_hosts_python(machine) -> None:
    from savekernel import initramfs

    sr, given = machine
    o = install.Options(
        save_kernel=given / "bzImage",
        restore_kernel=given / "restore-vmlinuz",
        restore_initrd=given / "restore-initrd.img",
    )
    p = install.plan(sr, o)
    assert any("built from this host's python3" in n for n in p.notes)
    install.apply(sr, p, lambda a: 0, lambda s: None)
    installed = sr.path("/usr/lib/kjumpd/save/initramfs.cpio.gz")
    names = {e.name for e in initramfs.read_archive(installed)}
    assert any(n.endswith("/kjumpd/agent/kernel_role.py") for n in names)
    assert "init" in names
    assert cfgmod.load(sr).save_initramfs_sha256 == install.sha256_file(installed)


def test_a_failing_command_is_named_and_what_was_done_stays_recorded(machine) -> None:
    sr, given = machine

    def runner(argv):
        return 1 if argv[0] == "grub-mkconfig" else 0

    with pytest.raises(install.InstallError, match="grub-mkconfig -o /boot/grub/grub.cfg"):
        install.apply(sr, install.plan(sr, opts(given)), runner, lambda s: None)
    man = install.read_manifest(sr)
    assert man is not None and ["systemctl", "disable", "kjumpd.service"] in man.undo
    assert man.entry("/etc/default/grub") is not None
    install.uninstall(sr, lambda a: 0, lambda s: None)
    assert sr.read_text("/etc/default/grub") == GRUB


def test_a_machine_without_a_reservation_gets_a_size_the_kernel_places(machine) -> None:
    """The shipped configuration pins no start: install writes crashkernel=SIZE (placed by
    the kernel, KASLR or not), says a reboot must reserve it, and leaves the entry for the
    run after that reboot."""
    sr, given = machine
    w(sr.root, "/etc/kjumpd/kjumpd.toml", '[target]\npath = "/dev/vda1"\n')
    w(sr.root, "/proc/cmdline", "BOOT_IMAGE=/vmlinuz console=ttyS0 quiet\n")
    p = install.plan(sr, opts(given))
    grub = next(f for f in p.files if f.path == "/etc/default/grub")
    assert 'GRUB_CMDLINE_LINUX="splash mitigations=auto crashkernel=112M"' in grub.data.decode()
    assert any("reboot to reserve the jump area (crashkernel=112M)" in n for n in p.notes)
    assert p.boot_entry is not None and p.boot_entry.state == "pending"


def test_grub_d_snippets_that_extend_a_variable_keep_what_it_had(machine) -> None:
    """Ubuntu's kdump-tools and others append to a variable in /etc/default/grub.d:
    the command line R boots keeps the words before the reference."""
    sr, _given = machine
    w(
        sr.root,
        "/etc/default/grub.d/kdump-tools.cfg",
        'GRUB_CMDLINE_LINUX_DEFAULT="${GRUB_CMDLINE_LINUX_DEFAULT} crashkernel=192M"\n'
        "GRUB_CMDLINE_LINUX='$GRUB_CMDLINE_LINUX'\n",
    )
    g = bootentry.grub_defaults(sr)
    assert g["GRUB_CMDLINE_LINUX_DEFAULT"] == "quiet crashkernel=192M"
    assert g["GRUB_CMDLINE_LINUX"] == "$GRUB_CMDLINE_LINUX"  # single quotes: as written
    assert "quiet crashkernel=192M" in bootentry.boot_loader_cmdline(sr)


def test_install_with_an_image_key_builds_for_encryption_and_gives_r_the_key(machine) -> None:
    """An image key exists: install builds the save kernel's initramfs with cryptography
    (it can encrypt), puts the key into R's payload (root-only initrd) and records its id;
    check then says images are encrypted. A new key makes the entry stale until install."""
    from kjumpd.image import seal
    from savekernel import initramfs

    sr, given = machine
    kf = seal.KeyFile.create("pw", n=1 << 10)
    w(sr.root, "/etc/kjumpd/image-key.json", kf.to_json())
    o = install.Options(
        save_kernel=given / "bzImage",
        restore_kernel=given / "restore-vmlinuz",
        restore_initrd=given / "restore-initrd.img",
    )
    p = install.plan(sr, o)
    assert any("with python3-cryptography" in n for n in p.notes), p.notes
    install.apply(sr, p, lambda a: 0, lambda s: None)
    names = {
        e.name for e in initramfs.read_archive(sr.path("/usr/lib/kjumpd/save/initramfs.cpio.gz"))
    }
    assert any(n.endswith("/cryptography/__init__.py") for n in names)
    rec = bootentry.read_record(sr)
    assert rec is not None and rec.image_key_id == kf.key_id
    r_initrd = sr.path(rec.initrd)
    assert kf.to_json().encode() in r_initrd.read_bytes()
    assert r_initrd.stat().st_mode & 0o777 == 0o600
    assert bootentry.check(sr) == []
    line = next(ln for ln in check(sr.root).stdout.splitlines() if "] image encryption:" in ln)
    assert line.startswith("[ok  ]") and kf.key_id in line, line
    # a new key: R could not open the images sealed to it
    other = seal.KeyFile.create("pw2", n=1 << 10)
    w(sr.root, "/etc/kjumpd/image-key.json", other.to_json())
    problems = bootentry.check(sr)
    assert any(kf.key_id in p and other.key_id in p and "kjumpctl install" in p for p in problems)
