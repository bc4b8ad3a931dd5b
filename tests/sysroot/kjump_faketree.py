"""A fake system root for the daemon's transaction, and the fake `kexec` on PATH.

The tree has what a machine booted with crashkernel=128M@512M shows in /proc and /sys, a
"disk" /dev/vda (a sparse file) with partition vda1 at 1 MiB as the image target, a save
kernel and initramfs, sleep hooks, a quirk driver, a network link, an RTC, and a
restore-first boot entry (BLS). The only fake of the kernel boundary is the `kexec`
executable written by :func:`install_fake_kexec`: it records its argv and, on `-e`,
simulates the save kernel by writing the image header with kjumpd.image.store.

Write-only kernel "trigger" files (bind, unbind, memory.reclaim, drop_caches,
sysrq-trigger, /sys/power/state) keep what was written to them in a fake tree; tree_hash
leaves them out and the tests assert their content explicitly.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import struct
import sys
import textwrap
from pathlib import Path

TRIGGERS = {"bind", "unbind", "memory.reclaim", "drop_caches", "sysrq-trigger"}
TRIGGER_PATHS = {"sys/power/state", "dev/kmsg"}
MiB = 1 << 20


def w(root: Path, path: str, text: str | bytes, mode: int | None = None) -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    if mode is not None:
        os.chmod(p, mode)
    return p


def link(root: Path, path: str, target: str) -> None:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, p)


def fake_bzimage(init_size: int = 24 * MiB) -> bytes:
    b = bytearray(8192)
    b[0x202:0x206] = b"HdrS"
    struct.pack_into("<I", b, 0x260, init_size)
    b[0x1000:0x1010] = b"fake save kernel"
    return bytes(b)


def build(
    root: Path,
    hostfiles: Path,
    *,
    mounts: list[tuple[str, str, str, str]] = (),
    config_extra: str = "",
) -> None:
    """Populate ``root``. ``mounts``: (mountpoint, devno, fstype, source) added to mountinfo
    after the root (a tmpfs, never frozen)."""
    w(root, "/proc/cmdline", "BOOT_IMAGE=/vmlinuz console=ttyS0 crashkernel=128M@512M quiet\n")
    w(
        root,
        "/proc/iomem",
        textwrap.dedent("""\
        00000000-00000fff : Reserved
        00001000-0009fbff : System RAM
        0009fc00-0009ffff : Reserved
        000f0000-000fffff : System ROM
        00100000-3ffdffff : System RAM
          01000000-01ffffff : Kernel code
          20000000-27ffffff : Crash kernel
        3ffe0000-3fffffff : Reserved
        """),
    )
    w(root, "/sys/kernel/kexec_crash_size", "134217728\n")
    w(root, "/sys/kernel/kexec_crash_loaded", "0\n")
    w(root, "/sys/kernel/kexec_loaded", "0\n")
    w(root, "/proc/config.gz", gzip.compress(b"CONFIG_KEXEC=y\nCONFIG_KEXEC_JUMP=y\n"))
    w(root, "/proc/sys/kernel/osrelease", "6.12.117-kjump\n")
    w(root, "/proc/sys/kernel/kexec_load_disabled", "0\n")
    notes = struct.pack("<III", 4, 20, 3) + b"GNU\0" + bytes(range(20))
    w(root, "/sys/kernel/notes", notes)
    w(root, "/sys/kernel/security/lockdown", "[none] integrity confidentiality\n")
    w(
        root,
        "/proc/meminfo",
        "MemTotal:        1048576 kB\nMemFree:          524288 kB\nMemAvailable:     700000 kB\n",
    )
    w(root, "/proc/swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
    info = ["22 1 0:21 / / rw,relatime shared:1 - tmpfs rootfs rw"]
    for i, (mp, devno, fstype, source) in enumerate(mounts):
        info.append(f"{30 + i} 22 {devno} / {mp} rw,relatime shared:{2 + i} - {fstype} {source} rw")
    w(root, "/proc/self/mountinfo", "\n".join(info) + "\n")
    # devices
    pci = "/sys/devices/pci0000:00"
    for dev, ctl, wake in (
        ("0000:00:02.0", "auto", "enabled"),
        ("0000:00:03.0", "on", "disabled"),
        ("0000:00:1f.3", "auto", None),
        ("0000:00:04.0/usb1/1-1", "auto", "enabled"),
    ):
        w(root, f"{pci}/{dev}/uevent", "")
        link(root, f"{pci}/{dev}/subsystem", "../../../bus/" + ("usb" if "usb" in dev else "pci"))
        w(root, f"{pci}/{dev}/power/control", ctl + "\n")
        if wake:
            w(root, f"{pci}/{dev}/power/wakeup", wake + "\n")
    w(root, "/sys/devices/pnp0/00:01/uevent", "")
    link(root, "/sys/devices/pnp0/00:01/subsystem", "../../../bus/pnp")
    w(root, "/sys/devices/pnp0/00:01/power/control", "auto\n")
    w(root, "/sys/devices/pnp0/00:01/power/runtime_status", "unsupported\n")
    w(root, "/sys/devices/pnp0/00:01/power/wakeup", "enabled\n")
    link(root, "/sys/class/rtc/rtc0/device", "../../../devices/pnp0/00:01")
    w(root, "/sys/class/rtc/rtc0/since_epoch", "1764000000\n")
    w(root, "/sys/class/rtc/rtc0/wakealarm", "\n")
    w(root, "/sys/class/net/eth0/flags", "0x1003\n")
    w(root, "/sys/class/net/lo/flags", "0x9\n")
    w(root, "/sys/bus/pci/drivers/snd_hda_intel/bind", "")
    w(root, "/sys/bus/pci/drivers/snd_hda_intel/unbind", "")
    link(root, "/sys/bus/pci/devices/0000:00:1f.3", "../../../devices/pci0000:00/0000:00:1f.3")
    link(
        root,
        "/sys/devices/pci0000:00/0000:00:1f.3/driver",
        "../../../bus/pci/drivers/snd_hda_intel",
    )
    w(root, "/sys/fs/cgroup/memory.reclaim", "")
    w(root, "/proc/sys/vm/drop_caches", "")
    w(root, "/proc/sysrq-trigger", "")
    w(root, "/sys/power/state", "freeze mem disk\n")
    w(root, "/sys/power/disk", "[platform] shutdown reboot suspend test_resume\n")
    w(root, "/dev/snapshot", "")
    # the disk and its partition
    vda = "/sys/devices/virtual/block/vda"
    w(root, f"{vda}/dev", "254:0\n")
    w(root, f"{vda}/size", str(48 * MiB // 512) + "\n")
    w(root, f"{vda}/vda1/dev", "254:1\n")
    w(root, f"{vda}/vda1/size", str(32 * MiB // 512) + "\n")
    w(root, f"{vda}/vda1/start", "2048\n")
    w(root, f"{vda}/vda1/partition", "1\n")
    link(root, "/sys/class/block/vda", "../../devices/virtual/block/vda")
    link(root, "/sys/class/block/vda1", "../../devices/virtual/block/vda/vda1")
    link(root, "/sys/dev/block/254:0", "../../devices/virtual/block/vda")
    link(root, "/sys/dev/block/254:1", "../../devices/virtual/block/vda/vda1")
    w(root, "/dev/kmsg", "6,1,1000,-;Linux version 6.12.117-kjump\n")
    disk = root / "dev/vda"
    with open(disk, "wb") as f:
        f.truncate(48 * MiB)
    (root / "dev/vda1").write_bytes(b"")
    # save kernel
    kernel = w(root, "/usr/lib/kjumpd/save/bzImage", fake_bzimage())
    initrd = w(root, "/usr/lib/kjumpd/save/initramfs.cpio.gz", gzip.compress(b"initramfs" * 1000))
    # hooks: a recorder (logs outside the tree, through $KJUMP_HOOK_LOG)
    w(
        root,
        "/usr/lib/systemd/system-sleep/50-record",
        '#!/bin/sh\necho "$1 $2 $SYSTEMD_SLEEP_ACTION" >> "$KJUMP_HOOK_LOG"\n',
        0o755,
    )
    (root / "etc/kjumpd/sleep.d").mkdir(parents=True)
    (root / "run").mkdir()
    # boot entry (restore engineer's module), BLS with an ESP and efivars
    (root / "boot/efi/loader/entries").mkdir(parents=True)
    w(root, "/boot/vmlinuz", fake_bzimage(20 * MiB))  # the normal kernel R boots
    w(root, "/boot/initrd.img", gzip.compress(b"normal initramfs"))
    (root / "sys/firmware/efi/efivars").mkdir(parents=True)
    w(root, "/etc/machine-id", "0123456789abcdef0123456789abcdef\n")
    hostfiles.mkdir(parents=True, exist_ok=True)
    (hostfiles / "vmlinuz").write_bytes(b"restore kernel")
    (hostfiles / "initrd.img").write_bytes(b"restore initrd")
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    w(
        root,
        "/etc/kjumpd/kjumpd.toml",
        textwrap.dedent(f"""\
        [target]
        path = "/dev/vda1"
        [jump_area]
        start = "0x20000000"
        [hibernate]
        mode = "test"
        [save_kernel]
        kernel_sha256 = "{sha(kernel)}"
        initramfs_sha256 = "{sha(initrd)}"
        [quiesce]
        disable_wakeup = true
        keep_wakeup = ["1-1"]
        unbind = [{{bus = "pci", device = "0000:00:1f.3", driver = "snd_hda_intel"}}]
        [timeouts]
        hooks = 10
        """)
        + config_extra,
    )


def grub_machine(root: Path) -> Path:
    """A GRUB machine's tree under ``root``: / on vda1 (not readable here: only /boot
    matters), /boot on vda2, a real 32 MiB ext4 image standing in for vda2 (mkfs.ext4 must be
    installed: callers check with tests.prereq.need)."""
    import subprocess

    for d in ("etc/grub.d", "boot/grub", "proc/self", "dev", "etc/kjumpd"):
        (root / d).mkdir(parents=True)
    disk = root / "dev" / "vda2"
    with open(disk, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True)
    (root / "proc/self/mountinfo").write_text(
        "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        "23 22 254:2 / /boot rw,relatime shared:2 - ext4 /dev/vda2 rw\n"
    )
    return root


def setup_target_and_bootentry(root: Path, hostfiles: Path) -> str:
    """kjumpctl setup --target /dev/vda1 --bootloader bls, through the real code."""
    from kjumpd.daemon import blockmap, bootentry
    from kjumpd.sysroot import Sysroot

    sr = Sysroot(root)
    target, uuid = blockmap.setup(sr, "/dev/vda1", 0)
    bootentry.install(
        sr,
        "bls",
        kernel=hostfiles / "vmlinuz",
        initrd=hostfiles / "initrd.img",
        cmdline=f"kjump.target={uuid} kjump.offset={target.superblock_offset}",
    )
    return uuid


def tree_hash(root: Path, exclude: set[str] = frozenset()) -> dict[str, str]:
    """path -> digest of type, mode and content (or link target), trigger files left out."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if name in TRIGGERS or rel in TRIGGER_PATHS or rel in exclude:
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"dir:{st.st_mode:o}"
            else:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                out[rel] = f"file:{st.st_mode:o}:{h.hexdigest()}"
    return out


FAKE_KEXEC = r'''#!{python}
"""Fake kexec-tools: records argv; on -e simulates the save kernel through kjumpd.image.store."""
import fcntl, json, os, sys
sys.path.insert(0, {repo!r})
log, state_file = os.environ["FAKE_KEXEC_LOG"], os.environ["FAKE_KEXEC_STATE"]
root = os.environ["FAKE_SYSROOT"]
fail = os.environ.get("FAKE_KEXEC_FAIL", "")
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
args = sys.argv[1:]
if "--load-preserve-context" in args:
    if fail == "load":
        # what kexec-tools 2.0.25 prints: the reason, then the segment list
        print("kexec_load failed: Operation not permitted", file=sys.stderr)
        print("entry       = 0x27e5b000 flags = 0x3e0002\nnr_segments = 2", file=sys.stderr)
        for i in range(2):
            print(f"segment[{{i}}].buf   = 0x5573955{{i}}\nsegment[{{i}}].mem   = 0x27e5b000",
                  file=sys.stderr)
        sys.exit(1)
    if fail == "window" and "--mem-min=0x20000000" not in args:
        print("Could not find a free area of memory of 0x9000 bytes...", file=sys.stderr)
        sys.exit(1)
    initrd = next(a.split("=", 1)[1] for a in args if a.startswith("--initrd="))
    # like kexec_load(2): the kernel keeps its own copy of the segments from here on
    with open(initrd, "rb") as f:
        copy = state_file + ".initrd"
        with open(copy, "wb") as out:
            out.write(f.read())
    with open(state_file, "w") as f:
        json.dump({{"initrd": initrd, "copy": copy}}, f)
    sys.exit(0)
if args == ["-u"]:
    gate = os.environ.get("FAKE_KEXEC_UNLOAD_GATE", "")
    if gate:   # a test holds the unload until it has seen what happens meanwhile
        import time
        for _ in range(1200):
            if os.path.exists(gate):
                break
            time.sleep(0.05)
        else:
            print("kexec: the test never opened the unload gate", file=sys.stderr)
            sys.exit(1)
    if os.path.exists(state_file):
        os.unlink(state_file)
    if fail == "unload":
        print("kexec: unload failed", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
if args and args[0] == "-e":
    assert args == ["-e", "-x", "-y"], args
    if not os.path.exists(state_file):
        print("Nothing has been loaded!", file=sys.stderr)
        sys.exit(1)
    with open(state_file) as f:
        st = json.load(f)
    from kjumpd.job import job_from_cpio
    from kjumpd.image import store
    from kjumpd.image.format import ImageState
    with open(st["copy"], "rb") as f:
        blob = f.read()
    with open(os.environ["FAKE_KEXEC_JOB"] + ".initrd-at-jump", "w") as f:
        f.write("present" if os.path.exists(st["initrd"]) else "gone")
    # what B's kernel does: unpack the archives after the (gzip) base initramfs; the job
    # archive starts on a 512-byte boundary after it
    job = None
    for pos in range(0, len(blob), 512):
        if blob[pos:pos + 6] == b"070701":
            job = job_from_cpio(blob[pos:])
            break
    assert job is not None, "no job archive appended to the initrd"
    with open(os.environ["FAKE_KEXEC_JOB"], "w") as f:
        f.write(job.to_json())
    # I1: every filesystem in the job must be frozen now: FIFREEZE again answers EBUSY
    for mp in json.loads(os.environ.get("FAKE_KEXEC_EXPECT_FROZEN", "[]")):
        fd = os.open(mp, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, 0xC0045877, 0)
        except OSError as e:
            if e.errno != 16:
                raise
        else:
            fcntl.ioctl(fd, 0xC0045878, 0)
            print(f"{{mp}} was not frozen during the jump", file=sys.stderr)
            sys.exit(3)
        finally:
            os.close(fd)
    result = os.environ.get("FAKE_KEXEC_RESULT", "saved")
    if result == "freezer":
        # what Linux logs when its freezer gives up on a task stuck in a frozen filesystem
        with open(os.path.join(root, "dev", "kmsg"), "a") as f:
            f.write("3,900,20000000,-;Freezing user space processes failed after 20.005 "
                    "seconds (1 tasks refusing to freeze, wq_busy=0):\n"
                    "6,901,20000001,-;task:appender        state:D stack:0     pid:4242  "
                    "tgid:4242  ppid:1      flags:0x00004002\n"
                    "6,902,20000002,-;Call Trace:\n6,903,20000003,-; __schedule+0x3a4/0xb10\n"
                    "6,904,20000004,-; percpu_rwsem_wait+0x10d/0x130\n"
                    "6,905,20000005,-; vfs_write+0x3c1/0x4b0\n"
                    "6,906,20000006,-;Restarting tasks ... done.\n")
        print("kexec failed: Device or resource busy", file=sys.stderr)
        sys.exit(255)
    if result != "nojump":
        disk = os.path.join(root, "dev", job.device_hint["name"])
        dev, sb = store.open_target(disk, writable=True, offset=job.superblock_device_offset)
        assert sb.uuid_str == job.target_uuid, "target UUID differs from the job"
        if result == "saved":
            store.set_state(dev, ImageState.WRITING)
            store.update_header(dev, state=ImageState.SAVED, mode=job.mode, raw_bytes=12345,
                                stored_bytes=678, chunk_count=3)
        elif result == "restoring":
            store.set_state(dev, ImageState.SAVED)
            store.set_state(dev, ImageState.RESTORING, attempt=1)
        elif result == "aborted":
            store.set_state(dev, ImageState.ABORTED, reason="cancel key pressed")
        dev.close()
    print("kexec failed: Bad file descriptor", file=sys.stderr)
    sys.exit(255)
print("fake kexec: unexpected arguments", args, file=sys.stderr)
sys.exit(2)
'''


def install_fake_kexec(bindir: Path) -> Path:
    bindir.mkdir(parents=True, exist_ok=True)
    repo = str(Path(__file__).resolve().parents[2])
    p = bindir / "kexec"
    p.write_text(FAKE_KEXEC.format(python=sys.executable, repo=repo))
    p.chmod(0o755)
    return p
