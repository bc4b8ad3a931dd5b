"""Installing the restore-first entry into fake system trees; GRUB's own tools check the output.

The /boot filesystem is a real ext4 image made with mkfs (its UUID is read from its superblock);
grub-script-check parses the generated GRUB config and grub-editenv reads the grubenv we write.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from kjump_faketree import grub_machine

from kjumpd.daemon import bootentry
from kjumpd.daemon.bootentry import (
    BLS_ENTRY_ID,
    ENTRY_ID,
    GRUB_SNIPPET,
    LOADER_GUID,
    bls_problems,
    check,
    clear_oneshot,
    install,
    oneshot_pending,
    set_oneshot,
    uninstall,
)
from kjumpd.errors import BootEntryError
from kjumpd.fsstamp import read_stamp
from kjumpd.sysroot import Sysroot
from tests.prereq import need

CMD = "kjump.target=0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e kjump.offset=1048576 console=ttyS0"


@pytest.fixture
def r_files(tmp_path: Path) -> tuple[Path, Path]:
    k, i = tmp_path / "bzImage", tmp_path / "restore.cpio.gz"
    k.write_bytes(b"MZ kernel" * 100)
    i.write_bytes(b"\x1f\x8b initrd" * 100)
    return k, i


@pytest.fixture
def grub_root(tmp_path: Path) -> Sysroot:
    need(shutil.which("mkfs.ext4") is not None, "mkfs.ext4 is not installed")
    return Sysroot(grub_machine(tmp_path / "root"))


def snippet_output(sysroot: Sysroot) -> str:
    return subprocess.run(
        ["sh", str(sysroot.path(GRUB_SNIPPET))], check=True, capture_output=True, text=True
    ).stdout


def grub_script_check(text: str, tmp: Path) -> None:
    need(shutil.which("grub-script-check") is not None, "grub-script-check (grub-common) missing")
    f = tmp / "grub.cfg"
    f.write_text(text)
    r = subprocess.run(["grub-script-check", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("kind", ["grub", "restore-first"])
def test_grub_entry_is_valid_grub_script_and_finds_boot_by_uuid(
    grub_root: Sysroot, r_files, tmp_path: Path, kind: str
) -> None:
    rec = install(grub_root, kind, kernel=r_files[0], initrd=r_files[1], cmdline=CMD, machine=False)
    assert rec.loader == "grub"
    out = snippet_output(grub_root)
    grub_script_check(out, tmp_path)
    boot_uuid = read_stamp(grub_root.path("/dev/vda2")).uuid
    assert f"search --no-floppy --fs-uuid --set=root {boot_uuid}" in out
    # /boot is its own filesystem: GRUB sees the files at /kjumpd/...
    assert f"linux /kjumpd/vmlinuz-restore {CMD}" in out
    assert "initrd /kjumpd/initrd-restore.img" in out
    assert grub_root.path("/boot/kjumpd/vmlinuz-restore").read_bytes() == r_files[0].read_bytes()
    assert os.access(grub_root.path(GRUB_SNIPPET), os.X_OK)
    assert ('set default="kjumpd-restore"' in out) == (kind == "restore-first")


def test_grub_entry_with_a_header_still_parses(grub_root: Sysroot, r_files, tmp_path: Path) -> None:
    """Debian's next_entry logic from 00_header followed by our entry: one valid script."""
    install(
        grub_root, "restore-first", kernel=r_files[0], initrd=r_files[1], cmdline=CMD, machine=False
    )
    header = (
        "if [ -s $prefix/grubenv ]; then\n  load_env\nfi\n"
        'if [ "${next_entry}" ] ; then\n   set default="${next_entry}"\n   set next_entry=\n'
        '   save_env next_entry\n   set boot_once=true\nelse\n   set default="0"\nfi\n'
    )
    grub_script_check(header + snippet_output(grub_root), tmp_path)


def test_grub_one_shot_is_what_grub_editenv_reads(grub_root: Sysroot, r_files) -> None:
    need(shutil.which("grub-editenv") is not None, "grub-editenv (grub-common) missing")
    install(grub_root, "grub", kernel=r_files[0], initrd=r_files[1], cmdline=CMD, machine=False)
    env = grub_root.path("/boot/grub/grubenv")
    subprocess.run(["grub-editenv", str(env), "create"], check=True)
    subprocess.run(["grub-editenv", str(env), "set", "saved_entry=gnulinux-simple"], check=True)
    assert not oneshot_pending(grub_root)
    assert set_oneshot(grub_root) is True
    listed = subprocess.run(
        ["grub-editenv", str(env), "list"], check=True, capture_output=True, text=True
    ).stdout.split()
    assert f"next_entry={ENTRY_ID}" in listed and "saved_entry=gnulinux-simple" in listed
    assert env.stat().st_size == 1024
    assert oneshot_pending(grub_root)
    assert clear_oneshot(grub_root) is True
    listed = subprocess.run(
        ["grub-editenv", str(env), "list"], check=True, capture_output=True, text=True
    ).stdout.split()
    assert listed == ["saved_entry=gnulinux-simple"]
    assert clear_oneshot(grub_root) is False  # nothing of ours left


def test_someone_elses_one_shot_is_left_alone(grub_root: Sysroot, r_files) -> None:
    install(grub_root, "grub", kernel=r_files[0], initrd=r_files[1], cmdline=CMD, machine=False)
    bootentry.grubenv_write(grub_root, {"next_entry": "memtest"})
    assert clear_oneshot(grub_root) is False
    assert bootentry.grubenv_read(grub_root)["next_entry"] == "memtest"


def test_grub_set_oneshot_creates_a_missing_grubenv(grub_root: Sysroot, r_files) -> None:
    install(grub_root, "grub", kernel=r_files[0], initrd=r_files[1], cmdline=CMD, machine=False)
    set_oneshot(grub_root)
    data = grub_root.path("/boot/grub/grubenv").read_bytes()
    assert len(data) == 1024 and f"next_entry={ENTRY_ID}\n".encode() in data


def test_check_reports_what_is_missing_until_it_is_fixed(grub_root: Sysroot, r_files) -> None:
    assert "no restore-first boot entry" in check(grub_root)[0]
    install(grub_root, "grub", kernel=r_files[0], initrd=r_files[1], cmdline=CMD, machine=False)
    problems = check(grub_root)
    assert len(problems) == 1 and "update-grub" in problems[0]
    # what update-grub would produce: the snippet's output inside grub.cfg
    grub_root.path("/boot/grub/grub.cfg").write_text(snippet_output(grub_root))
    assert check(grub_root) == []
    grub_root.path(GRUB_SNIPPET).chmod(0o644)
    assert any("not executable" in p for p in check(grub_root))
    grub_root.path("/boot/kjumpd/initrd-restore.img").unlink()
    assert any("initrd-restore.img is missing" in p for p in check(grub_root))


def test_uninstall_removes_every_file(grub_root: Sysroot, r_files) -> None:
    rec = install(
        grub_root, "grub", kernel=r_files[0], initrd=r_files[1], cmdline=CMD, machine=False
    )
    set_oneshot(grub_root)
    removed = uninstall(grub_root)
    assert set(removed) == set(rec.files) | {"/etc/kjumpd/bootentry.json"}
    assert not oneshot_pending(grub_root)
    assert "next_entry" not in bootentry.grubenv_read(grub_root)


def test_set_oneshot_without_install_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BootEntryError) as e:
        set_oneshot(Sysroot(tmp_path))
    assert "kjumpctl setup" in e.value.fix


# ------------------------------------------------------------------ BLS / systemd-boot


@pytest.fixture
def bls_root(tmp_path: Path) -> Sysroot:
    root = tmp_path / "root"
    for d in ("boot/efi/loader/entries", "sys/firmware/efi/efivars", "etc"):
        (root / d).mkdir(parents=True)
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    return Sysroot(root)


def efivar(sysroot: Sysroot, name: str) -> bytes | None:
    p = sysroot.path(f"/sys/firmware/efi/efivars/{name}-{LOADER_GUID}")
    return p.read_bytes() if p.exists() else None


def test_bls_entry_follows_the_specification(bls_root: Sysroot, r_files) -> None:
    rec = install(
        bls_root,
        "bls",
        kernel=r_files[0],
        initrd=r_files[1],
        cmdline=CMD,
        version="6.12.117",
        machine=False,
    )
    text = bls_root.path(f"/boot/efi/loader/entries/{BLS_ENTRY_ID}").read_text()
    assert bls_problems(text) == []
    assert "linux      /kjumpd/vmlinuz-restore" in text
    assert "machine-id 0123456789abcdef0123456789abcdef" in text
    assert (
        bls_root.path("/boot/efi/kjumpd/initrd-restore.img").read_bytes() == r_files[1].read_bytes()
    )
    assert rec.loader == "bls" and check(bls_root) == []


def test_bls_one_shot_is_the_loader_variable(bls_root: Sysroot, r_files) -> None:
    install(bls_root, "bls", kernel=r_files[0], initrd=r_files[1], cmdline=CMD, machine=False)
    assert efivar(bls_root, "LoaderEntryOneShot") is None
    set_oneshot(bls_root)
    assert efivar(
        bls_root, "LoaderEntryOneShot"
    ) == b"\x07\x00\x00\x00" + "kjumpd-restore.conf\0".encode("utf-16-le")
    assert oneshot_pending(bls_root)
    assert clear_oneshot(bls_root)
    assert efivar(bls_root, "LoaderEntryOneShot") is None


def test_restore_first_with_systemd_boot_makes_r_the_default(bls_root: Sysroot, r_files) -> None:
    bootentry.efivar_write(bls_root, "LoaderEntryDefault", "debian.conf")
    rec = install(
        bls_root, "restore-first", kernel=r_files[0], initrd=r_files[1], cmdline=CMD, machine=False
    )
    assert rec.loader == "bls" and rec.previous_default == "debian.conf"
    assert bootentry.efivar_read(bls_root, "LoaderEntryDefault") == BLS_ENTRY_ID
    assert set_oneshot(bls_root) is False and oneshot_pending(bls_root)
    assert check(bls_root) == []
    uninstall(bls_root)
    assert bootentry.efivar_read(bls_root, "LoaderEntryDefault") == "debian.conf"


def test_bls_without_efi_variables_says_so(bls_root: Sysroot, r_files) -> None:
    install(bls_root, "bls", kernel=r_files[0], initrd=r_files[1], cmdline=CMD, machine=False)
    shutil.rmtree(bls_root.path("/sys/firmware/efi/efivars"))
    assert any("efivars is missing" in p for p in check(bls_root))
    with pytest.raises(BootEntryError) as e:
        set_oneshot(bls_root)
    assert "efivarfs" in e.value.fix


# ------------------------------------------------------------------ R's machine payload


def test_install_appends_this_machines_boot_json_and_files(
    grub_root: Sysroot, r_files, tmp_path: Path
) -> None:
    """`kjumpctl setup --bootloader` on a machine: R's initrd = generic base + boot.json with
    the reserved jump area, the save kernel from the config, the normal kernel and this boot's
    command line; the payload is a newc archive the project's other cpio reader agrees with."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from kjumpd import cpio
    from kjumpd.bootconfig import BootConfig

    root = grub_root.root
    (root / "proc/cmdline").write_text(
        "BOOT_IMAGE=/boot/vmlinuz-6.12-kjump root=/dev/vda1 ro quiet crashkernel=128M@0x20000000\n"
    )
    (root / "proc/iomem").write_text(
        "00100000-3ffdffff : System RAM\n  20000000-27ffffff : Crash kernel\n"
    )
    (root / "boot/vmlinuz-6.12-kjump").write_bytes(b"normal kernel")
    (root / "boot/initrd.img-6.12-kjump").write_bytes(b"normal initrd")
    (root / "usr/lib/kjumpd/save").mkdir(parents=True)
    (root / "usr/lib/kjumpd/save/bzImage").write_bytes(b"save kernel")
    (root / "usr/lib/kjumpd/save/initramfs.cpio.gz").write_bytes(b"save initramfs")
    base = r_files[1].read_bytes()
    (root / "proc/cmdline").write_text(
        "BOOT_IMAGE=/boot/vmlinuz-6.12-kjump root=/dev/vda1 ro quiet console=tty0 "
        "console=ttyS0,115200 crashkernel=128M@0x20000000\n"
    )
    bare = "kjump.target=0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e kjump.offset=1048576"
    rec = install(grub_root, "restore-first", kernel=r_files[0], initrd=r_files[1], cmdline=bare)
    # R's messages go where this system's console is
    assert rec.cmdline == bare + " console=tty0 console=ttyS0,115200"
    # without the firmware's map R is not confined: restores take two boots, and why is kept
    assert "no /sys/firmware/memmap" in rec.two_boots
    assert f"linux /kjumpd/vmlinuz-restore {rec.cmdline}" in snippet_output(grub_root)
    installed = grub_root.path("/boot/kjumpd/initrd-restore.img").read_bytes()
    assert installed.startswith(base)
    members = {e.name: e.data for e in cpio.read(installed[len(base) :])}
    cfg = BootConfig.from_json(members["etc/kjumpd/boot.json"])
    assert (
        cfg.target_uuid == "0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e" and cfg.target_offset == 1 << 20
    )
    assert cfg.jump_area == (0x20000000, 128 << 20)
    assert cfg.normal.cmdline == (
        "root=/dev/vda1 ro quiet console=tty0 console=ttyS0,115200 crashkernel=128M@0x20000000"
    )
    assert members[cfg.normal.kernel.lstrip("/")] == b"normal kernel"
    assert members[cfg.normal.initrd.lstrip("/")] == b"normal initrd"
    assert members[cfg.save.kernel.lstrip("/")] == b"save kernel"
    assert members[cfg.save.initrd.lstrip("/")] == b"save initramfs"
    import hashlib

    assert cfg.save_hash == "sha256:" + hashlib.sha256(b"save kernel").hexdigest()
    # the restore kernel R starts gets the save kernel's watchdog too (a hung restore resets)
    assert cfg.save.cmdline == "console=ttyS0 nokaslr panic=1 kjump.watchdog=120"


def firmware_memmap(root: Path, entries: list[tuple[int, int, str]]) -> None:
    for n, (start, end, kind) in enumerate(entries):
        d = root / f"sys/firmware/memmap/{n}"
        d.mkdir(parents=True)
        (d / "start").write_text(f"{start:#x}\n")
        (d / "end").write_text(f"{end - 1:#x}\n")
        (d / "type").write_text(kind + "\n")


PC_MAP = [
    (0, 0x9FC00, "System RAM"),
    (0x9FC00, 0xA0000, "Reserved"),
    (0xF0000, 0x100000, "Reserved"),
    (0x100000, 0x3FFE0000, "System RAM"),
    (0x3FFE0000, 0x40000000, "Reserved"),
]
BARE = "kjump.target=0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e kjump.offset=1048576"


def machine_files(root: Path) -> None:
    for d in ("proc", "boot", "etc/kjumpd"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "proc/cmdline").write_text("root=/dev/vda1 ro crashkernel=128M@0x20000000\n")
    (root / "proc/iomem").write_text(
        "00100000-3ffdffff : System RAM\n  20000000-27ffffff : Crash kernel\n"
    )
    (root / "boot/vmlinuz-6.12-kjump").write_bytes(b"normal kernel")
    (root / "usr/lib/kjumpd/save").mkdir(parents=True)
    (root / "usr/lib/kjumpd/save/bzImage").write_bytes(b"save kernel")
    (root / "usr/lib/kjumpd/save/initramfs.cpio.gz").write_bytes(b"save initramfs")


def test_each_hibernation_confines_r_to_its_jump_area_through_grubenv(
    grub_root: Sysroot, r_files, tmp_path: Path
) -> None:
    """One boot to restore: the GRUB entry appends $kjumpd_confine, which set_oneshot sets
    in grubenv to memmap= words reserving all RAM outside that hibernation's jump area;
    clear_oneshot takes it out again (R then boots unconfined)."""
    root = grub_root.root
    machine_files(root)
    firmware_memmap(root, PC_MAP)
    rec = install(grub_root, "restore-first", kernel=r_files[0], initrd=r_files[1], cmdline=BARE)
    assert rec.two_boots == "" and "memmap" not in rec.cmdline
    assert "one boot" in bootentry.restore_boots_line(rec)
    out = snippet_output(grub_root)
    assert f"linux /kjumpd/vmlinuz-restore {BARE} $kjumpd_confine" in out
    grub_script_check(out, tmp_path)
    # the area this hibernation's kernel reserved, elsewhere than at install
    assert set_oneshot(grub_root, (0x30000000, 128 << 20))
    env = bootentry.grubenv_read(grub_root)
    # [0x9fc00, 0xa0000) is reserved, but [0xa0000, 0xf0000) is a hole: not joined
    assert env["kjumpd_confine"] == (
        "memmap=0x1fc00$0x80000 memmap=0x2ff00000$0x100000 memmap=0x7fe0000$0x38000000 "
        "rootfstype=ramfs"
    )
    assert "next_entry" not in env  # restore-first: R boots anyway
    if shutil.which("grub-editenv"):
        listed = subprocess.run(
            ["grub-editenv", str(grub_root.path("/boot/grub/grubenv")), "list"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert "kjumpd_confine=memmap=0x1fc00$0x80000 memmap=" in listed
    assert clear_oneshot(grub_root)
    assert "kjumpd_confine" not in bootentry.grubenv_read(grub_root)


def test_bls_options_carry_the_confinement_until_it_is_cleared(bls_root: Sysroot, r_files):
    root = bls_root.root
    machine_files(root)
    firmware_memmap(root, PC_MAP)
    rec = install(bls_root, "bls", kernel=r_files[0], initrd=r_files[1], cmdline=BARE)
    entry = bls_root.path(f"/boot/efi/loader/entries/{BLS_ENTRY_ID}")
    plain = entry.read_text()
    assert set_oneshot(bls_root, (0x20000000, 128 << 20))
    options = bootentry.parse_bls_entry(entry.read_text())["options"][0]
    assert options == f"{rec.cmdline} memmap=0x1fc00$0x80000 memmap=0x1ff00000$0x100000 " + (
        "memmap=0x17fe0000$0x28000000 rootfstype=ramfs"
    )
    assert clear_oneshot(bls_root)
    assert entry.read_text() == plain


def test_an_r_too_big_for_the_jump_area_is_not_confined_and_says_why(
    grub_root: Sysroot, r_files, tmp_path: Path
) -> None:
    """A distribution's initrd in R would not fit a 128 MiB area: the entry is written
    unconfined, the record says why, and no hibernation confines R."""
    root = grub_root.root
    (root / "proc/cmdline").write_text("root=/dev/vda1 ro crashkernel=128M@0x20000000\n")
    (root / "proc/iomem").write_text(
        "00100000-3ffdffff : System RAM\n  20000000-27ffffff : Crash kernel\n"
    )
    firmware_memmap(root, [(0, 0x9FC00, "System RAM"), (0x100000, 0x40000000, "System RAM")])
    (root / "boot/vmlinuz-6.12-kjump").write_bytes(b"normal kernel")
    (root / "boot/initrd.img-6.12-kjump").write_bytes(bytes(70 << 20))  # a distribution's
    (root / "usr/lib/kjumpd/save").mkdir(parents=True)
    (root / "usr/lib/kjumpd/save/bzImage").write_bytes(b"save kernel")
    (root / "usr/lib/kjumpd/save/initramfs.cpio.gz").write_bytes(b"save initramfs")
    bare = "kjump.target=0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e kjump.offset=1048576"
    rec = install(grub_root, "restore-first", kernel=r_files[0], initrd=r_files[1], cmdline=bare)
    assert "memmap" not in rec.cmdline
    assert "half of the jump area (128 MiB)" in rec.two_boots
    assert "two boots" in bootentry.restore_boots_line(rec)
    assert not set_oneshot(grub_root, (0x20000000, 128 << 20))
    assert "kjumpd_confine" not in bootentry.grubenv_read(grub_root)


def test_install_without_a_jump_area_says_what_to_do(grub_root: Sysroot, r_files) -> None:
    from kjumpd.errors import JumpAreaError

    (grub_root.root / "proc/cmdline").write_text("root=/dev/vda1 ro\n")
    with pytest.raises(JumpAreaError) as e:
        install(grub_root, "grub", kernel=r_files[0], initrd=r_files[1], cmdline=CMD)
    assert "crashkernel=" in e.value.fix
    assert not grub_root.path(GRUB_SNIPPET).exists()


@pytest.mark.parametrize(
    "files,cmdline,want",
    [
        (["vmlinuz-kjump"], "root=/dev/vda", ("/boot/vmlinuz-kjump", None)),
        (
            ["vmlinuz-6.1", "initrd.img-6.1", "vmlinuz-6.2", "initrd.img-6.2"],
            "BOOT_IMAGE=/boot/vmlinuz-6.2 ro",
            ("/boot/vmlinuz-6.2", "/boot/initrd.img-6.2"),
        ),
        (["vmlinuz-6.1", "initrd.img"], "ro", ("/boot/vmlinuz-6.1", None)),
        (
            ["vmlinuz", "initrd.img", "vmlinuz-6.1", "vmlinuz-6.2"],
            "ro",
            ("/boot/vmlinuz", "/boot/initrd.img"),
        ),
    ],
)
def test_the_normal_kernel_is_the_one_this_system_booted(
    tmp_path: Path, files, cmdline, want
) -> None:
    from kjumpd.daemon.bootentry import find_normal_kernel

    for d in ("boot", "proc"):
        (tmp_path / d).mkdir()
    for f in files:
        (tmp_path / "boot" / f).write_bytes(b"x")
    (tmp_path / "proc/cmdline").write_text(cmdline + "\n")
    assert find_normal_kernel(Sysroot(tmp_path)) == want


def test_no_normal_kernel_is_a_clear_error(tmp_path: Path) -> None:
    from kjumpd.daemon.bootentry import find_normal_kernel

    (tmp_path / "boot").mkdir()
    with pytest.raises(BootEntryError) as e:
        find_normal_kernel(Sysroot(tmp_path))
    assert e.value.fix


def test_boot_on_dev_root_is_found_by_its_device_number(
    grub_root: Sysroot, r_files, tmp_path: Path
) -> None:
    """A kernel that mounted root= itself shows "/dev/root" in mountinfo: no such node."""
    root = grub_root.root
    (root / "proc/self/mountinfo").write_text(
        "22 1 254:2 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
    )
    (root / "sys/dev/block/254:2").mkdir(parents=True)
    (root / "sys/dev/block/254:2/uevent").write_text("MAJOR=254\nMINOR=2\nDEVNAME=vda2\n")
    install(grub_root, "grub", kernel=r_files[0], initrd=r_files[1], cmdline=CMD, machine=False)
    out = snippet_output(grub_root)
    assert f"--set=root {read_stamp(grub_root.path('/dev/vda2')).uuid}" in out
    # /boot is not its own filesystem here: GRUB sees the files under /boot
    assert "linux /boot/kjumpd/vmlinuz-restore" in out
    grub_script_check(out, tmp_path)


@pytest.mark.parametrize("with_cryptsetup", [True, False])
def test_whether_r_can_unlock_a_luks_volume_is_read_from_its_initramfs(
    grub_root: Sysroot, r_files, tmp_path: Path, with_cryptsetup: bool
) -> None:
    """A target inside LUKS needs cryptsetup in R (the preflight fails without it, since
    every restore would boot the normal system): the installed initramfs is looked into."""
    import gzip

    from kjumpd import cpio
    from kjumpd.daemon.bootentry import restore_unlockers

    plugin = "usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so"
    names = ["usr/sbin/kexec"] + (["usr/sbin/cryptsetup", plugin] if with_cryptsetup else [])
    base = tmp_path / "r.cpio.gz"
    base.write_bytes(gzip.compress(cpio.write(cpio.Entry.file(n, b"\x7fELF") for n in names)))
    assert restore_unlockers(grub_root) is None  # nothing installed
    bare = "kjump.target=0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e kjump.offset=1048576"
    install(grub_root, "grub", kernel=r_files[0], initrd=base, cmdline=bare, machine=False)
    assert restore_unlockers(grub_root) == (
        {"cryptsetup", "systemd-tpm2"} if with_cryptsetup else frozenset()
    )
