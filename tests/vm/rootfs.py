"""The VM tier's guest root filesystem: Debian 12 (debootstrap --variant=minbase) + the project.

Two cached layers under ``${KJUMPD_CACHE:-~/.cache/kjumpd}/rootfs/``:

1. ``tree-<key>/``: the debootstrap tree. ``<key>`` hashes PACKAGES, SUITE, the mirror and
   TREE_RECIPE; only a change to those re-runs debootstrap (minutes).
2. ``image-<key>.raw``: an ext4 filesystem image (no partition table; the guest sees it as
   /dev/vda) made with ``mkfs.ext4 -d`` from the tree after the project's payload was copied in
   (the kjumpd package into /usr/lib/python3/dist-packages, entry points, the guest init
   /sbin/kjump-vm-init, the workload, the kernel and B's initramfs). ``<key>`` hashes the tree
   key and every payload byte, so a checkout change costs one mkfs (seconds), not a debootstrap.

Scenarios never write this image: each boots a copy-on-write qcow2 overlay on top of it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kjumpd.errors import KjumpError
from savekernel import buildcache

log = logging.getLogger("kjumpd.vm.rootfs")

SUITE = "bookworm"
PACKAGES = (
    "python3",
    "python3-pydbus",
    "python3-gi",
    "python3-pyudev",
    "python3-lz4",
    "python3-psutil",
    "python3-cryptography",
    # named: python3-cryptography depends on it through virtual packages (the cffi backend's
    # API range), which debootstrap's resolver does not follow
    "python3-cffi-backend",
    "dbus",
    "kexec-tools",
    "e2fsprogs",
    "util-linux",
    "procps",
    "cpio",
    "kmod",
    # the systemd scenario (s): Debian's systemd as PID 1 with udev, logind and journald,
    # and what the README's install needs (pip for the wheel, busybox-static for the
    # initramfs archives kjumpctl install builds); the fast scenarios boot init= and never
    # start them
    "systemd-sysv",
    "udev",
    "python3-pip",
    "busybox-static",
    # the storage scenarios: an image target and frozen filesystems on LVM and on btrfs,
    # a frozen filesystem on LVM on LUKS2
    "lvm2",
    "btrfs-progs",
    "cryptsetup-bin",
    # the TPM2 scenario: systemd-cryptenroll (in systemd) loads these with dlopen
    "libtss2-esys-3.0.2-0",
    "libtss2-rc0",
    "libtss2-mu0",
    "libtss2-tcti-device0",
)
#: Bump when the way the tree is made changes (not for payload changes).
TREE_RECIPE = "tree-v2"
#: Bump when the way the image is assembled changes.
IMAGE_RECIPE = "image-v2"
IMAGE_SIZE = 4 << 30  # sparse; the guest needs room for the image target and the workload
PRUNE_AGE = 2 * 3600  # seconds an image stays safe from pruning after its last use (a CI run
#                       takes at most 90 minutes)
#: images kept whatever their age: each is up to ~2.5 GiB with its prepared layer, and a day of
#: changes under kjumpd/ made dozens of them (47 GiB, a full disk)
MAX_IMAGES = 4

REPO = Path(__file__).resolve().parents[2]
#: tests/vm modules that also run inside the guest (as the package kjumpvm)
GUEST_MODULES = (
    "__init__.py",
    "workload.py",
    "writers.py",
    "vminit.py",
    "guest_scenarios.py",
    "guest_systemd.py",
    "sleepwatch.py",
)


class RootfsError(KjumpError):
    """The guest root filesystem could not be built."""


def cache_dir() -> Path:
    return buildcache.cache_root()


def debian_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> str:
    """The machine's own Debian mirror (first URIs: line), else deb.debian.org."""
    try:
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split(":", 1)[1].split()[0]
                if "security" not in uri:
                    return uri
    except OSError:
        pass
    return "http://deb.debian.org/debian"


def tree_key(mirror: str) -> str:
    h = hashlib.sha256()
    h.update("\n".join([TREE_RECIPE, SUITE, mirror, *sorted(PACKAGES)]).encode())
    return h.hexdigest()[:16]


@dataclass
class Payload:
    """Files copied into the tree before mkfs: guest path -> host path (file or dir)."""

    files: dict[str, Path] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # guest path -> symlink target

    def add(self, guest: str, host: Path, mode: int | None = None) -> None:
        self.files[guest] = host
        if mode is not None:
            self.modes[guest] = mode

    def link(self, guest: str, target: str) -> None:
        self.links[guest] = target

    def digest(self) -> str:
        h = hashlib.sha256(IMAGE_RECIPE.encode())
        for guest in sorted(self.links):
            h.update(f"link {guest} -> {self.links[guest]}\0".encode())
        for guest in sorted(self.files):
            host = self.files[guest]
            h.update(guest.encode() + b"\0")
            paths = sorted(p for p in host.rglob("*") if p.is_file()) if host.is_dir() else [host]
            for p in paths:
                if "__pycache__" in p.parts:
                    continue
                h.update(str(p.relative_to(host) if host.is_dir() else p.name).encode() + b"\0")
                h.update(hashlib.sha256(p.read_bytes()).digest())
            h.update(str(self.modes.get(guest, "")).encode())
        return h.hexdigest()[:16]


def _run(cmd: list[str], what: str, **kw) -> None:
    log.info("$ %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
        )
    except OSError as err:
        raise RootfsError(what, why=str(err), fix=f"install {cmd[0]} (tools/setup.sh)") from err
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise RootfsError(
            what,
            why=f"{cmd[0]} exited {proc.returncode}: {tail}",
            fix="read the output above; rerun `make vm-assets`",
        )


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return sorted((p for p in points if (p + "/").startswith(prefix)), key=len, reverse=True)


def _safe_rmtree(path: Path) -> None:
    """Remove a (possibly half-made) debootstrap tree without ever descending into a mount
    (debootstrap mounts /proc and /sys inside the tree while it works)."""
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], check=False)
    left = _mounts_under(path)
    if left:
        raise RootfsError(
            f"cannot remove {path}",
            why=f"still mounted: {', '.join(left)}",
            fix="unmount them by hand",
        )
    shutil.rmtree(path)


def build_tree(cache: Path | None = None) -> Path:
    """Run debootstrap once per package list; return the tree's path."""
    cache = cache or cache_dir()
    mirror = debian_mirror()
    tree = cache / "rootfs" / f"tree-{tree_key(mirror)}"
    if (tree / ".kjumpd-complete").exists():
        return tree
    if os.geteuid() != 0:
        raise RootfsError(
            "cannot build the guest root filesystem",
            why="debootstrap needs root",
            fix="run `make vm-assets` as root",
        )
    if shutil.which("debootstrap") is None:
        raise RootfsError(
            "cannot build the guest root filesystem",
            why="debootstrap is not installed",
            fix="apt-get install debootstrap (tools/setup.sh does it)",
        )

    def debootstrap(partial: Path) -> None:
        log.info("debootstrap %s into %s (minutes, once)", SUITE, partial)
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=" + ",".join(PACKAGES),
                SUITE,
                str(partial),
                mirror,
            ],
            "debootstrap failed",
        )
        # Trim what the guest never uses: apt caches and docs (keeps the image small).
        for sub in ("var/cache/apt/archives", "usr/share/doc", "usr/share/man", "usr/share/locale"):
            p = partial / sub
            if p.is_dir():
                for child in p.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    elif child.name != "lock":
                        child.unlink()
        (partial / "etc/hostname").write_text("kjumpvm\n")
        (partial / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
        (partial / ".kjumpd-complete").write_text(mirror + "\n")
        if _mounts_under(partial):
            raise RootfsError(
                "debootstrap left mounts in the tree",
                why=", ".join(_mounts_under(partial)),
                fix="unmount them and rerun `make vm-assets`",
            )

    buildcache.build_entry(
        tree,
        debootstrap,
        valid=lambda t: (t / ".kjumpd-complete").exists(),
        remove=_safe_rmtree,
    )
    return tree


def default_payload() -> Payload:
    """What goes into every guest image: the project as of this checkout, the VM tier's
    init/workload/config (tests/vm/assets.py adds the kernels and initramfs archives)."""
    p = Payload()
    here = Path(__file__).resolve().parent
    p.add("/usr/lib/python3/dist-packages/kjumpd", REPO / "kjumpd")
    if (REPO / "bootloader").is_dir():  # restore-first init, templates, R's initramfs builder
        p.add("/usr/lib/python3/dist-packages/bootloader", REPO / "bootloader")
    for name in GUEST_MODULES:
        p.add(f"/usr/lib/python3/dist-packages/kjumpvm/{name}", here / name)
    p.add("/sbin/kjump-vm-init", here / "vminit.py", 0o755)
    # the systemd scenario's driver, started by systemd when the command line names it
    unit = "/etc/systemd/system/kjumpvm-systemd.service"
    p.add(unit, here / "kjumpvm-systemd.service")
    p.link("/etc/systemd/system/multi-user.target.wants/kjumpvm-systemd.service", unit)
    policy = REPO / "contrib" / "org.kjump.Manager1.conf"
    if policy.exists():
        p.add("/usr/share/dbus-1/system.d/org.kjump.Manager1.conf", policy)
    return p


ENTRY_POINTS = {
    "kjumpd": "kjumpd.daemon.main",
    "kjumpctl": "kjumpd.cli",
    "kjump-agent": "kjumpd.agent.cli",
}


def _install_payload(tree: Path, payload: Payload) -> None:
    for guest, host in payload.files.items():
        dst = tree / guest.lstrip("/")
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif dst.exists() or dst.is_symlink():
            dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        if host.is_dir():
            shutil.copytree(host, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(host, dst)
        if guest in payload.modes:
            dst.chmod(payload.modes[guest])
    for guest, target in payload.links.items():
        dst = tree / guest.lstrip("/")
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(target)
    # The host plays the boot loader (it boots what the restore-first entry names); GRUB's
    # configuration directories are where `kjumpctl setup --bootloader` installs that entry.
    for d in ("etc/grub.d", "boot/grub"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    bindir = tree / "usr/local/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for name, module in ENTRY_POINTS.items():
        script = bindir / name
        script.write_text(
            f"#!/usr/bin/python3\nimport sys\nfrom {module} import main\nsys.exit(main())\n"
        )
        script.chmod(0o755)


def build_image(payload: Payload, cache: Path | None = None) -> Path:
    """Return the cached ext4 image for (tree, payload); mkfs it when missing."""
    cache = cache or cache_dir()
    tree = build_tree(cache)
    key = hashlib.sha256((tree.name + payload.digest()).encode()).hexdigest()[:16]
    image = cache / "rootfs" / f"image-{key}.raw"
    if image.exists():
        os.utime(image)  # marks it in use: pruning spares recently used images
        return image

    def mkfs(tmp: Path) -> None:
        with buildcache.locked(tree):  # the one tree holds one payload at a time
            _install_payload(tree, payload)
            with open(tmp, "wb") as f:
                f.truncate(IMAGE_SIZE)
            _run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-L",
                    "kjumpvm-root",
                    "-E",
                    "root_owner=0:0",
                    "-d",
                    str(tree),
                    str(tmp),
                ],
                "mkfs.ext4 -d failed for the guest image",
            )

    if buildcache.build_entry(image, mkfs):
        prune_images(cache / "rootfs")
    return image


def prune_images(rootfs: Path, now: float | None = None) -> list[Path]:
    """Remove old guest images (and what tests/vm/assets.py derived from them); return them.

    Keeps the two newest images and any used in the last PRUNE_AGE seconds (another
    checkout's test run, or a CI run beside a session, may still be booting from it), but
    never more than MAX_IMAGES in all: the oldest go first."""
    now = time.time() if now is None else now
    olds = sorted(rootfs.glob("image-*.raw"), key=lambda p: p.stat().st_mtime, reverse=True)
    gone = [
        old
        for i, old in enumerate(olds)
        if i >= MAX_IMAGES or (i >= 2 and now - old.stat().st_mtime >= PRUNE_AGE)
    ]
    for old in gone:
        old.unlink()
        # and what tests/vm/assets.py derived from it (the prepared layer, its logs)
        old.with_suffix(".prepared.qcow2").unlink(missing_ok=True)
        logs = old.with_suffix(".prepare")
        if logs.is_dir():
            shutil.rmtree(logs)
    return gone


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="rootfs: %(message)s", stream=sys.stderr)
    args = argv if argv is not None else sys.argv[1:]
    try:
        if args and args[0] == "tree":
            print(build_tree())
        else:
            print(build_image(default_payload()))
    except KjumpError as err:
        print(f"rootfs: {err.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
