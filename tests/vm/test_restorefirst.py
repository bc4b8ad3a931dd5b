"""The restore-first environment R on a real CONFIG_KEXEC_JUMP kernel under QEMU (TCG).

One save, shared: A (a busybox + python guest, tests/vm/restorefirst_guest.py) mounts an ext4
data disk, freezes it, records its superblock stamp in the job, jumps to B (mode shutdown) and
powers off with the image SAVED. Each scenario then boots a copy of those disks through R (the
restore-first kernel: the same bzImage with bootloader/'s initramfs + boot.json) and reads what
happened on the consoles:

- restore: R marks RESTORING(1) and kexecs B in restore role; A continues after its
  ``kexec -e`` and checks its memory (``KJR-VERDICT: PASS restored``);
- no image: R boots the normal kernel (same bzImage, the guest initramfs, kjr.step=normal);
  the extra cost of going through R is measured against a direct boot (figures.json);
- stale: the data filesystem is mounted read-write on the host between save and restore; R
  refuses (INVALID(stale: ...)) and boots the normal kernel with kjump.rf=invalid:stale;
- corrupt: one byte of the first chunk record is flipped; R refuses (INVALID(corrupt: ...));
  R confined to the jump area restores by itself and refuses the record as it reads it;
- keeps failing: R's save kernel crashes at every restore (rdinit=/usr/bin/false on its
  command line); after max_attempts R stops (INVALID(attempts: ...)) and boots normally.

Verdicts come from the guests and R's console lines; timings are only reported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bootloader.initramfs import build_restore_initramfs, make_restore_initrd, restore_config
from kjumpd import confine
from kjumpd.daemon.bootentry import R_IMAGE_KEY
from kjumpd.image import store
from kjumpd.image.device import ImageDevice
from kjumpd.image.format import BlockExtent
from savekernel.initramfs import InitramfsImage, build_initramfs, build_save_initramfs
from tests.vm.harness import (
    JUMP_AREA_SIZE,
    JUMP_AREA_START,
    MAIN_APPEND,
    VM,
    VMConfig,
    artifacts_dir,
    kernel_image,
    missing_prereq,
    require_vm_prereqs,
)

pytestmark = pytest.mark.vm

GUEST = Path(__file__).resolve().parent / "restorefirst_guest.py"
A_INIT = """#!/bin/sh
export PATH=/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
/usr/bin/python3 -S -E -B -u /kjr/guest.py
echo "KJR: guest script ended; powering off"
sync
poweroff -f
"""
GUEST_MODULES = (
    "kjumpd.image.store",
    "kjumpd.image.device",
    "kjumpd.job",
    "kjumpd.fsstamp",
    "kjumpd.bootconfig",
    "kjumpd.restore.decision",
    "hashlib",
    "mmap",
    "random",
    "subprocess",
    "uuid",
    "traceback",
    "fcntl",
)
PANIC = r"Kernel panic|general protection fault|BUG: unable to handle"
TARGET_SIZE = 1 << 30
FS_SIZE = 64 << 20
R_BASE_APPEND = "console=ttyS0 nokaslr panic=1"
NORMAL = r"KJR-NORMAL: rf=(\S*) state=(.*)"
T = 900  # seconds: TCG on a shared 2-core host


@pytest.fixture(scope="module")
def kernel() -> Path:
    require_vm_prereqs()
    for tool in ("mkfs.ext4", "mount", "losetup"):
        if shutil.which(tool) is None:
            missing_prereq(f"{tool} is not installed")
    if os.geteuid() != 0:
        missing_prereq("root is needed to loop-mount the data disk (stale-image scenario)")
    return kernel_image()


@pytest.fixture(scope="module")
def b_initramfs(kernel: Path) -> InitramfsImage:
    return build_save_initramfs()


@pytest.fixture(scope="module")
def a_initramfs(kernel: Path, b_initramfs: InitramfsImage) -> InitramfsImage:
    return build_initramfs(
        None,
        A_INIT,
        {"boot/bzImage": kernel, "boot/b.cpio.gz": b_initramfs.path, "kjr/guest.py": GUEST},
        name="kjr-guest",
        python_modules=GUEST_MODULES,
        python_packages=("kjumpd", "lz4"),
        host_binaries=("/usr/sbin/kexec",),
    )


@pytest.fixture(scope="module")
def r_base(kernel: Path) -> InitramfsImage:
    return build_restore_initramfs()


def make_disks(d: Path) -> tuple[Path, Path, str]:
    """A fresh target disk (EMPTY header) and an ext4 data disk; returns the target UUID."""
    d.mkdir(parents=True, exist_ok=True)
    target, data = d / "target.raw", d / "data.raw"
    with open(target, "wb") as f:
        f.truncate(TARGET_SIZE)
    bm = [BlockExtent(0, 0, TARGET_SIZE)]
    with ImageDevice(target, bm, writable=True) as dev:
        sb = store.stamp_superblock(dev, bm)
        store.init_header(dev, sb.uuid)
    with open(data, "wb") as f:
        f.truncate(FS_SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "kjr-data", str(data)], check=True)
    return target, data, sb.uuid_str


def copy_disks(src: tuple[Path, Path], d: Path) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for p in src:
        q = d / p.name
        subprocess.run(["cp", "--sparse=always", str(p), str(q)], check=True)
        out.append(q)
    return out[0], out[1]


def damage_first_record(target: Path) -> None:
    """Flip one bit of the physical address in the image's first chunk record."""
    h = header(target)
    with open(target, "r+b") as f:
        f.seek(h.data_offset + 12)
        b = f.read(1)
        f.seek(h.data_offset + 12)
        f.write(bytes([b[0] ^ 0x40]))


def header(target: Path):
    dev, _ = store.open_target(target, writable=False, offset=0)
    with dev:
        return store.read_header(dev)


def r_initrd(
    out: Path,
    kernel: Path,
    a: InitramfsImage,
    b: InitramfsImage,
    r: InitramfsImage,
    uuid: str,
    max_attempts: int = 3,
    save_cmdline: str = R_BASE_APPEND,
    image_key: Path | None = None,
    jump_area: tuple[int, int] = (JUMP_AREA_START, JUMP_AREA_SIZE),
) -> Path:
    """R's initrd for these disks (``image_key``: the key file R opens encrypted images
    with, where `kjumpctl install` puts it)."""
    cfg, files = restore_config(
        target_uuid=uuid,
        target_offset=0,
        normal_kernel=kernel,
        normal_initrd=a.path,
        normal_cmdline=f"{MAIN_APPEND} kjr.step=normal",
        save_kernel=kernel,
        save_initrd=b.path,
        save_cmdline=save_cmdline,
        jump_area=jump_area,
        max_attempts=max_attempts,
    )
    if image_key is not None:
        files[R_IMAGE_KEY] = image_key
    return make_restore_initrd(out, cfg, files, base=r.path)


def r_config(kernel: Path, initrd: Path, uuid: str, disks: tuple[Path, Path]) -> VMConfig:
    return VMConfig(
        kernel=kernel,
        initrd=initrd,
        append=f"{R_BASE_APPEND} kjump.target={uuid} kjump.offset=0",
        disks=list(disks),
        memory_mb=1024,
        smp=2,
    )


def confined(
    cfg: VMConfig,
    rimg: Path,
    r_base: InitramfsImage,
    normal_initrd: InitramfsImage,
    kernel: Path,
    area: tuple[int, int],
) -> VMConfig:
    """``cfg`` (R's VM, 1 GiB) booting R confined to the jump area ``area`` (start, size) as
    the boot entry boots it: KASLR on, the rest of RAM reserved. Asserts first that R fits
    there, which the product checks before it confines R
    (kjumpd.daemon.bootentry.confinement_problem)."""
    payload = rimg.stat().st_size - r_base.path.stat().st_size
    normal = kernel.stat().st_size + normal_initrd.path.stat().st_size
    unpacked = int(r_base.path.stat().st_size * confine.UNPACK_FACTOR) + payload
    assert confine.fit_problem(area[1], rimg.stat().st_size, unpacked, normal) == ""
    assert cfg.memory_mb == 1024
    ram = [(0, 0x9FC00, "System RAM"), (0x100000, 0x3FFE0000, "System RAM")]  # QEMU, 1 GiB
    words = " ".join(confine.boot_words(confine.confine(ram, (area[0], area[0] + area[1]))))
    return replace(cfg, append=cfg.append.replace("nokaslr ", "") + " " + words)


def figures(name: str, **values: object) -> None:
    out = artifacts_dir(name) / "figures.json"
    out.write_text(json.dumps(values, indent=1) + "\n")


@pytest.fixture(scope="module")
def saved(kernel: Path, a_initramfs: InitramfsImage, tmp_path_factory) -> tuple[Path, Path, str]:
    """Disks holding a SAVED image of A (mode shutdown) with the data filesystem frozen."""
    d = tmp_path_factory.mktemp("rf-saved")
    return save_image(kernel, a_initramfs, d, MAIN_APPEND, "restorefirst_save")


#: a jump area R confined to it fits in with this test's files (kjumpd.confine.fit_problem:
#: the guest's normal initrd, staged twice by kexec, does not fit beside R in 128 MiB)
WIDE_AREA_SIZE = 256 << 20


@pytest.fixture(scope="module")
def saved_wide(
    kernel: Path, a_initramfs: InitramfsImage, tmp_path_factory
) -> tuple[Path, Path, str]:
    """As ``saved``, by an A whose jump area is WIDE_AREA_SIZE at the same start."""
    d = tmp_path_factory.mktemp("rf-saved-wide")
    return save_image(kernel, a_initramfs, d, wide_append(), "restorefirst_save_wide")


def wide_append() -> str:
    """A's command line with its jump area WIDE_AREA_SIZE at the usual start."""
    wide = MAIN_APPEND.replace(
        f"crashkernel={JUMP_AREA_SIZE >> 20}M@", f"crashkernel={WIDE_AREA_SIZE >> 20}M@"
    )
    assert wide != MAIN_APPEND
    return wide


def save_image(
    kernel: Path, a_initramfs: InitramfsImage, d: Path, append: str, name: str
) -> tuple[Path, Path, str]:
    target, data, uuid = make_disks(d)
    cfg = VMConfig(
        kernel=kernel,
        initrd=a_initramfs.path,
        append=f"{append} kjr.step=save kjr.mib=32",
        disks=[target, data],
        memory_mb=1024,
        smp=2,
    )
    with VM(cfg, artifacts_dir(name), name="save") as vm:
        vm.wait_for(r"KJR: image SAVED|KJR-VERDICT: FAIL.*", timeout=T, fail=PANIC)
        line = vm.last_line.text if vm.last_line else ""
        assert "image SAVED" in line, line
        vm.wait_exit(timeout=120)
        t_jump = vm.line_time(r"KJR: jumping to the save kernel")
        t_saved = vm.line_time(r"kjump-agent: SAVED")
        figures(
            name,
            jump_to_saved_s=(round(t_saved - t_jump, 2) if t_jump and t_saved else None),
            agent=[m.group(0) for m in vm.find(r"kjump-agent: SAVED.*")],
        )
    assert header(target).state_text == "SAVED"
    return target, data, uuid


def test_restore_through_the_restore_first_entry(
    request, kernel, a_initramfs, b_initramfs, r_base, saved, tmp_path
) -> None:
    target, data = copy_disks(saved[:2], tmp_path / "disks")
    rimg = r_initrd(tmp_path / "r.img", kernel, a_initramfs, b_initramfs, r_base, saved[2])
    with VM(
        r_config(kernel, rimg, saved[2], (target, data)), artifacts_dir(request.node.name), name="r"
    ) as vm:
        m = vm.wait_for(r"KJR-VERDICT: (PASS|FAIL) (.*)|KJR-NORMAL.*", timeout=T, fail=PANIC)
        assert vm.find(r"kjumpd-rf: image marked RESTORING\(1\)"), "R did not choose to restore"
        assert vm.find(r"kjump-agent: save kernel up: role restore"), "B never ran in restore role"
        t = {
            k: vm.line_time(p)
            for k, p in (
                ("r_up", r"kjumpd-rf: restore-first environment up"),
                ("r_decided", r"kjumpd-rf: decision"),
                ("b_up", r"kjump-agent: save kernel up"),
                ("restored", r"kjump-agent: RESTORED"),
                ("a_back", r"KJR: back in the main kernel"),
            )
        }
        figures(
            request.node.name,
            host_seconds_since_qemu_start=t,
            agent=[x.group(0) for x in vm.find(r"kjump-agent: RESTORED.*")],
        )
        assert m.group(1) == "PASS", m.group(0)
        assert "state=RESTORING(1)" in m.group(2) and "data=intact" in m.group(2)
        assert "now=CONSUMED" in m.group(2)
    assert header(target).state_text == "CONSUMED"


def test_no_image_boots_the_normal_kernel_and_costs_one_short_boot(
    request, kernel, a_initramfs, b_initramfs, r_base, tmp_path
) -> None:
    target, data, uuid = make_disks(tmp_path / "disks")
    art = artifacts_dir(request.node.name)
    # the normal kernel booted directly, as a boot loader would without R
    direct = VMConfig(
        kernel=kernel,
        initrd=a_initramfs.path,
        append=f"{MAIN_APPEND} kjr.step=normal",
        disks=[target, data],
    )
    with VM(direct, art, name="direct") as vm:
        vm.wait_for(NORMAL, timeout=T, fail=PANIC)
        t_direct = vm.last_line.t
        d_unpack = [
            ln.t
            for ln in vm.lines
            if "Unpacking initramfs" in ln.text or "Freeing initrd memory" in ln.text
        ]
    rimg = r_initrd(tmp_path / "r.img", kernel, a_initramfs, b_initramfs, r_base, uuid)
    with VM(r_config(kernel, rimg, uuid, (target, data)), art, name="r") as vm:
        m = vm.wait_for(NORMAL, timeout=T, fail=PANIC)
        t_via_r = vm.last_line.t
        r_up = vm.line_time(r"kjumpd-rf: restore-first environment up")
        r_kexec = vm.line_time(r"kjumpd-rf: booting the normal kernel")
        up = vm.find(r"kjumpd-rf: booting the normal kernel at uptime ([\d.]+) s")
        unpack = [
            ln.t
            for ln in vm.lines
            if "Unpacking initramfs" in ln.text or "Freeing initrd memory" in ln.text
        ]
        assert vm.find(r"kjumpd-rf: image state EMPTY")
        assert not vm.find(r"kjump-agent"), "B must not run without an image"
    assert m.group(1) == "" and m.group(2) == "EMPTY", m.group(0)
    figures(
        request.node.name,
        direct_boot_to_normal_userspace_s=round(t_direct, 2),
        via_r_to_normal_userspace_s=round(t_via_r, 2),
        extra_cost_of_r_s=round(t_via_r - t_direct, 2),
        r_userspace_up_s=r_up and round(r_up, 2),
        r_up_to_normal_kexec_s=(round(r_kexec - r_up, 2) if r_up and r_kexec else None),
        r_kernel_uptime_at_normal_kexec_s=float(up[0].group(1)) if up else None,
        initramfs_unpack_s_direct=[round(b - a, 2) for a, b in zip(d_unpack[0::2], d_unpack[1::2])],
        initramfs_unpack_s_r_then_normal=[
            round(b - a, 2) for a, b in zip(unpack[0::2], unpack[1::2])
        ],
        r_initrd_bytes=rimg.stat().st_size,
        r_base_gzip_bytes=r_base.compressed_size,
    )


def test_stale_image_is_refused_and_the_normal_kernel_boots(
    request, kernel, a_initramfs, b_initramfs, r_base, saved, tmp_path
) -> None:
    target, data = copy_disks(saved[:2], tmp_path / "disks")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # the data filesystem is used between the save and the restore
    subprocess.run(["mount", "-o", "loop", str(data), str(mnt)], check=True)
    try:
        (mnt / "written-between").write_text("this write makes the image stale\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    rimg = r_initrd(tmp_path / "r.img", kernel, a_initramfs, b_initramfs, r_base, saved[2])
    with VM(
        r_config(kernel, rimg, saved[2], (target, data)), artifacts_dir(request.node.name), name="r"
    ) as vm:
        m = vm.wait_for(NORMAL, timeout=T, fail=PANIC)
        assert not vm.find(r"kjump-agent"), "B ran although the image is stale"
    assert m.group(1) == "invalid:stale", m.group(0)
    assert m.group(2).startswith("INVALID(stale: ext4 "), m.group(0)
    assert "mount_count" in m.group(2)
    assert header(target).state_text.startswith("INVALID(stale:")


def test_corrupted_image_is_refused(
    request, kernel, a_initramfs, b_initramfs, r_base, saved, tmp_path
) -> None:
    target, data = copy_disks(saved[:2], tmp_path / "disks")
    damage_first_record(target)
    rimg = r_initrd(tmp_path / "r.img", kernel, a_initramfs, b_initramfs, r_base, saved[2])
    with VM(
        r_config(kernel, rimg, saved[2], (target, data)), artifacts_dir(request.node.name), name="r"
    ) as vm:
        m = vm.wait_for(NORMAL, timeout=T, fail=PANIC)
        assert not vm.find(r"kjump-agent"), "B ran although the image is corrupt"
    assert m.group(1) == "invalid:corrupt", m.group(0)
    assert m.group(2).startswith("INVALID(corrupt: chunk table"), m.group(0)


def test_corrupted_image_is_refused_by_r_restoring_in_one_boot(
    request, kernel, a_initramfs, b_initramfs, r_base, saved_wide, tmp_path
) -> None:
    """R confined to the jump area (KASLR on, the rest of RAM reserved, as the boot entry
    boots it) restores by itself and checks the records as it goes: the damaged record is
    refused before it is written, the image is INVALID(corrupt: ...), A is not jumped to,
    and R starts the normal kernel in what the failed restore left of the area."""
    saved = saved_wide
    target, data = copy_disks(saved[:2], tmp_path / "disks")
    damage_first_record(target)
    area = (JUMP_AREA_START, WIDE_AREA_SIZE)
    rimg = r_initrd(
        tmp_path / "r.img", kernel, a_initramfs, b_initramfs, r_base, saved[2], jump_area=area
    )
    cfg = confined(
        r_config(kernel, rimg, saved[2], (target, data)), rimg, r_base, a_initramfs, kernel, area
    )
    with VM(cfg, artifacts_dir(request.node.name), name="r") as vm:
        m = vm.wait_for(NORMAL, timeout=T, fail=PANIC)
        here = vm.find(r"kjumpd-rf: image marked RESTORING\(1\); restoring it in this kernel")
        walked = vm.find(
            r"kjumpd-rf: evidence read: .*chunk table \(checked while restoring\).*"
            r"save kernel files \(not used\)"
        )
        agent = vm.find(r"kjump-agent: save kernel up")
    assert here and walked, "R did not restore in one boot (where did KASLR put it?)"
    assert not agent, "B ran although R restores in one boot"
    assert not vm.find(r"KJR-VERDICT"), "A was jumped into from a corrupt image"
    assert m.group(1) == "invalid:corrupt", m.group(0)
    assert m.group(2).startswith("INVALID(corrupt: chunk record header at byte offset"), m.group(0)


def test_a_restore_that_keeps_failing_stops_at_the_maximum(
    request, kernel, a_initramfs, b_initramfs, r_base, saved, tmp_path
) -> None:
    target, data = copy_disks(saved[:2], tmp_path / "disks")
    # B crashes at every restore before touching A's memory: its init does not exist
    rimg = r_initrd(
        tmp_path / "r.img",
        kernel,
        a_initramfs,
        b_initramfs,
        r_base,
        saved[2],
        max_attempts=2,
        save_cmdline=f"{R_BASE_APPEND} rdinit=/kjump-no-such-init",
    )
    art = artifacts_dir(request.node.name)
    vm = VM(r_config(kernel, rimg, saved[2], (target, data)), art, name="r")
    seen = []
    try:
        for attempt in (1, 2):  # each boot: R restores, B dies, the machine resets
            vm.start() if attempt == 1 else vm.restart()
            vm.wait_for(rf"kjumpd-rf: image marked RESTORING\({attempt}\)", timeout=T)
            vm.wait_exit(timeout=T)
            seen.append(header(target).state_text)
        vm.restart()
        m = vm.wait_for(NORMAL, timeout=T, fail=PANIC)
    finally:
        vm.stop()
    assert seen == ["RESTORING(1)", "RESTORING(2)"]
    assert m.group(1) == "invalid:attempts", m.group(0)
    assert m.group(2).startswith("INVALID(attempts: 2 restore attempts failed"), m.group(0)
