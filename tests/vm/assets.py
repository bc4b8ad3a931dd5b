"""Everything the VM tier boots, built when missing and cached under
${KJUMPD_CACHE:-~/.cache/kjumpd}.

``python -m tests.vm.assets`` (run by `make vm-assets`, `make test`, `make demo`):
  - the CONFIG_KEXEC_JUMP kernel (savekernel/build-kernel.sh; one bzImage serves as A, B and R),
  - B's initramfs (savekernel.initramfs, the save-kernel engineer's builder),
  - R's initramfs (the restore-first environment's builder in bootloader/),
  - the guest root filesystem image (tests/vm/rootfs.py; the kernel and B's initramfs inside).

It writes a manifest (``vm-assets.json`` in the cache) that the tests, the demo and the bench
read. A piece that cannot be built is recorded with the reason instead of a path: the build
goes on with the rest, and every scenario that needs the piece FAILS naming it. Exit status is
0 even then (so `make test` still runs the other tiers and the VM tests fail with the reasons);
``--strict`` exits 1 when a piece is missing.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kjumpd.errors import KjumpError
from kjumpd.hashing import sha256_file
from tests.vm import rootfs

log = logging.getLogger("kjumpd.vm.assets")

REPO = rootfs.REPO
#: where the guest image carries the save kernel and B's initramfs
GUEST_SAVE_KERNEL = "/usr/lib/kjumpd/save/bzImage"
GUEST_SAVE_INITRAMFS = "/usr/lib/kjumpd/save/initramfs.cpio.gz"
#: the normal kernel (A) and R's generic initramfs, where `kjumpctl setup` takes them from
GUEST_NORMAL_KERNEL = "/boot/vmlinuz-kjump"
GUEST_RESTORE_KERNEL = "/usr/lib/kjumpd/restore/vmlinuz"
GUEST_RESTORE_INITRAMFS = "/usr/lib/kjumpd/restore/initrd.img"
#: their variants with python3-cryptography (encrypted images; guest_scenarios names them too)
GUEST_SAVE_INITRAMFS_CRYPTO = "/usr/lib/kjumpd/save/initramfs-crypto.cpio.gz"
GUEST_RESTORE_INITRAMFS_CRYPTO = "/usr/lib/kjumpd/restore/initrd-crypto.img"
#: scenario luks-root's normal initramfs (guest_scenarios.LUKSROOT_INITRD)
GUEST_LUKSROOT_INITRD = "/usr/lib/kjumpvm/initrd-luksroot.img"
#: the key file it unlocks the root's LUKS volume with: guest_scenarios.LUKS_PASSPHRASE
LUKSROOT_KEY = b"kjumpvm-luks-passphrase"
#: its /init: what Debian's cryptsetup-initramfs does with a crypttab key file, reduced to
#: the guest's one volume (the first partition of the second disk)
LUKSROOT_INIT = """#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run/cryptsetup /newroot
i=0
while [ ! -b /dev/vdb1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if cryptsetup open --key-file /etc/keys/root.key /dev/vdb1 cryptroot &&
   mount -t ext4 -o rw /dev/mapper/cryptroot /newroot; then
    echo "kjumpvm-initramfs: root unlocked with its key file"
    umount /proc /sys
    mount --move /dev /newroot/dev
    exec switch_root /newroot /sbin/kjump-vm-init
fi
echo "kjumpvm-initramfs: cannot unlock or mount the root filesystem"
poweroff -f
"""


class AssetError(KjumpError):
    """A VM-tier asset is missing or could not be built."""


@dataclass
class Assets:
    kernel: str | None = None
    save_initramfs: str | None = None
    restore_initramfs: str | None = None
    rootfs: str | None = None
    #: rootfs + `kjumpctl setup` done in the guest (qcow2 on top of rootfs): every scenario's base
    prepared: str | None = None
    #: scenario luks-root's normal initramfs (the guest image holds it too)
    luksroot_initramfs: str | None = None
    missing: dict[str, str] = field(default_factory=dict)

    def require(self, *names: str) -> None:
        """Raise AssetError naming every requested piece that is missing."""
        gone = [
            f"{n}: {self.missing.get(n, 'not built')}"
            for n in names
            if not getattr(self, n) or not Path(getattr(self, n)).exists()
        ]
        if gone:
            raise AssetError(
                "VM assets missing",
                why="; ".join(gone),
                fix="run `make vm-assets` and read its output",
            )


def manifest_path() -> Path:
    return rootfs.cache_dir() / "vm-assets.json"


def newer_sources() -> list[Path]:
    """Files of the checkout that the guest's assets are made from and that changed after
    the manifest was written: the assets may not be this checkout's (empty when fresh)."""
    try:
        built = manifest_path().stat().st_mtime
    except OSError:
        return []
    roots = [REPO / name for name in WHEEL_SOURCES] + [Path(__file__).resolve().parent]
    out = []
    for root in roots:
        files = [root] if root.is_file() else root.rglob("*")
        out += [
            f
            for f in files
            if f.is_file() and "__pycache__" not in f.parts and f.stat().st_mtime > built
        ]
    return sorted(out)


def load() -> Assets:
    """The manifest written by the last `make vm-assets` (empty when never built)."""
    try:
        data = json.loads(manifest_path().read_text())
        return Assets(**data)
    except (OSError, ValueError, TypeError):
        return Assets(missing={"manifest": f"{manifest_path()} not found: run `make vm-assets`"})


def build_kernel() -> Path:
    script = REPO / "savekernel" / "build-kernel.sh"
    # the script takes the build's lock itself (it is also run by hand)
    proc = subprocess.run([str(script)], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not out or not Path(out[-1]).is_file():
        raise AssetError(
            "kernel build failed",
            why=f"{script} exited {proc.returncode}",
            fix="read its output above",
        )
    return Path(out[-1])


def build_save_initramfs(crypto: bool = False) -> Path:
    try:
        mod = importlib.import_module("savekernel.initramfs")
    except ImportError as err:
        raise AssetError(
            "B's initramfs builder is missing", why=str(err), fix="see savekernel/initramfs.py"
        ) from err
    return Path(mod.build_save_initramfs(crypto=crypto).path)


def build_restore_initramfs(crypto: bool = False) -> Path:
    """R's initramfs, from bootloader/."""
    if crypto:
        from bootloader.initramfs import build_restore_initramfs as build

        return Path(build(crypto=True).path)
    for name, fn in (
        ("bootloader.initramfs", "build_restore_initramfs"),
        ("savekernel.initramfs", "build_restore_initramfs"),
    ):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, fn):
            return Path(getattr(mod, fn)().path)
    raise AssetError(
        "the restore-first initramfs builder is missing",
        why="neither bootloader.initramfs nor savekernel.initramfs has build_restore_initramfs()",
        fix="see bootloader/initramfs.py",
    )


#: what a user of the systemd scenario downloaded: the wheel and a save kernel
GUEST_DIST = "/root/kjumpd-dist"
#: the project's files a wheel is built from
WHEEL_SOURCES = ("kjumpd", "bootloader", "savekernel", "contrib", "pyproject.toml", "README.md")


def build_wheel() -> Path:
    """The project's wheel (what `pip install .` builds), for the systemd scenario's guest,
    which has no network to build one. Built offline from a copy of the sources with a fixed
    SOURCE_DATE_EPOCH, so the same sources give the same bytes (the guest image's cache key
    covers them) and a change to any of them gives a new wheel."""
    out = rootfs.cache_dir() / "wheel"
    work = out / f"build-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    src = work / "src"
    for name in WHEEL_SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(work / "dist"), str(src)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    wheels = sorted((work / "dist").glob("kjumpd-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AssetError(
            "cannot build the kjumpd wheel", why=proc.stdout.strip()[-500:], fix="make setup"
        )
    dest = out / wheels[0].name
    os.replace(wheels[0], dest)
    shutil.rmtree(work)
    return dest


PREPARE_TIMEOUT = 900.0


def guest_config(kernel: Path | None, save: Path | None) -> Path:
    """tests/vm/guest-kjumpd.toml plus the save kernel's and initramfs' sha256, as an
    administrator records them after installing the save kernel (preflight checks them)."""
    text = (Path(__file__).resolve().parent / "guest-kjumpd.toml").read_text()
    lines = []
    if kernel is not None:
        lines.append(f'kernel_sha256 = "{sha256_file(kernel)}"')
    if save is not None:
        lines.append(f'initramfs_sha256 = "{sha256_file(save)}"')
    table = "".join(ln + "\n" for ln in lines)
    text = text.replace("[save_kernel]\n", "[save_kernel]\n" + table, 1)
    out = rootfs.cache_dir() / "rootfs" / "guest-kjumpd.toml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def prepare_disk(image: Path, kernel: Path) -> Path:
    """Boot the guest once on a qcow2 layer over the image and let it run `kjumpctl setup`
    (target file + restore-first entry), as an administrator would once. Cached next to the
    image (its key covers every payload byte, the guest scenarios included)."""
    from tests.vm import harness, scenarios

    out = image.with_suffix(".prepared.qcow2")
    if out.exists():
        return out
    logs = image.with_suffix(".prepare")
    logs.mkdir(exist_ok=True)
    # per process: two test runs (engineers sharing the cache) may prepare the same image at
    # once; the first to finish publishes it, the other uses that one (overlays made on it
    # name it by path, so a published image is never replaced)
    me = f"prepare-{os.getpid()}"
    tmp = scenarios.make_overlay(image, logs, f"{me}.qcow2")
    cfg = harness.VMConfig(
        kernel=kernel,
        disks=[tmp],
        disk_format="qcow2",
        append=f"{scenarios.A_APPEND} kjumpvm.scenario=prepare",
        memory_mb=scenarios.MEM_MIB,
        smp=scenarios.SMP,
    )
    log.info("preparing the shared disk: `kjumpctl setup` in the guest (console: %s)", logs)
    with harness.VM(cfg, artifacts=logs, name=me) as vm:
        try:
            vm.wait_exit(PREPARE_TIMEOUT)
        except harness.VMError as err:
            raise AssetError("the disk preparation boot did not finish", why=str(err)) from err
        done = vm.find(r"KJUMP-EVENT: prepared")
        verdict = vm.find(r"KJUMP-VERDICT: .*")
    if not done:
        why = verdict[0].group(0) if verdict else f"no 'prepared' event (see {logs})"
        raise AssetError(
            "`kjumpctl setup` did not complete in the guest",
            why=why,
            fix=f"read {logs}/{me}-console-1.log",
        )
    try:
        os.link(tmp, out)  # fails when another run published it first
    except FileExistsError:
        log.info("another run prepared %s first; using it", out)
    tmp.unlink()
    return out


def build_luksroot_initramfs() -> Path:
    """Scenario luks-root's normal initramfs: busybox, cryptsetup and the root's key file."""
    from savekernel.initramfs import build_initramfs

    found = shutil.which("cryptsetup", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise AssetError("cryptsetup is not installed", fix="apt-get install cryptsetup-bin")
    img = build_initramfs(
        None,
        LUKSROOT_INIT,
        {"etc/keys/root.key": LUKSROOT_KEY},
        name="luksroot",
        host_binaries=(found,),
    )
    return Path(img.path)


def build_all() -> Assets:
    a = Assets()

    def attempt(name: str, fn) -> Path | None:
        try:
            path = fn()
        except KjumpError as err:
            a.missing[name] = err.message
            log.error("%s: %s", name, err.message)
            return None
        log.info("%s: %s", name, path)
        return path

    kernel = attempt("kernel", build_kernel)
    save = attempt("save_initramfs", build_save_initramfs)
    restore = attempt("restore_initramfs", build_restore_initramfs)
    # what `kjumpctl install` builds once an image key exists (the encrypted scenario)
    save_crypto = attempt("save_initramfs_crypto", lambda: build_save_initramfs(crypto=True))
    restore_crypto = attempt(
        "restore_initramfs_crypto", lambda: build_restore_initramfs(crypto=True)
    )
    wheel = attempt("wheel", build_wheel)
    luksroot = attempt("luksroot_initramfs", build_luksroot_initramfs)

    def make_rootfs() -> Path:
        payload = rootfs.default_payload()
        if kernel is not None:
            payload.add(GUEST_SAVE_KERNEL, kernel)
            payload.add(GUEST_NORMAL_KERNEL, kernel)
            payload.add(GUEST_RESTORE_KERNEL, kernel)
        if save is not None:
            payload.add(GUEST_SAVE_INITRAMFS, save)
        if restore is not None:
            payload.add(GUEST_RESTORE_INITRAMFS, restore)
        if save_crypto is not None:
            payload.add(GUEST_SAVE_INITRAMFS_CRYPTO, save_crypto)
        if restore_crypto is not None:
            payload.add(GUEST_RESTORE_INITRAMFS_CRYPTO, restore_crypto)
        if luksroot is not None:
            payload.add(GUEST_LUKSROOT_INITRD, luksroot)
        payload.add("/etc/kjumpd/kjumpd.toml", guest_config(kernel, save))
        payload.add("/etc/default/grub", Path(__file__).resolve().parent / "guest-default-grub")
        if wheel is not None:
            payload.add(f"{GUEST_DIST}/{wheel.name}", wheel)
        if kernel is not None:
            payload.add(f"{GUEST_DIST}/bzImage", kernel)
        return rootfs.build_image(payload)

    image = attempt("rootfs", make_rootfs)
    prepared = (
        attempt("prepared", lambda: prepare_disk(image, kernel))
        if image is not None and kernel is not None
        else None
    )
    a.kernel = str(kernel) if kernel else None
    a.save_initramfs = str(save) if save else None
    a.restore_initramfs = str(restore) if restore else None
    a.rootfs = str(image) if image else None
    a.prepared = str(prepared) if prepared else None
    a.luksroot_initramfs = str(luksroot) if luksroot else None
    path = manifest_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")  # runs may overlap
    tmp.write_text(json.dumps(asdict(a), indent=2) + "\n")
    os.replace(tmp, path)
    return a


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="vm-assets: %(message)s", stream=sys.stderr)
    args = argv if argv is not None else sys.argv[1:]
    a = build_all()
    for name in ("kernel", "save_initramfs", "restore_initramfs", "rootfs", "prepared"):
        value = getattr(a, name)
        print(f"{name:18} {value or 'MISSING: ' + a.missing.get(name, '?')}")
    if a.missing:
        print(
            f"vm-assets: {len(a.missing)} piece(s) missing; VM scenarios needing them will FAIL",
            file=sys.stderr,
        )
        return 1 if "--strict" in args else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
