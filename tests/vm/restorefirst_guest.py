"""Guest side of tests/vm/test_restorefirst.py, in a busybox + python initramfs.

``kjr.step=`` on the kernel command line:

- ``save``   (A) fill ``kjr.mib`` MiB with known data; mount /dev/vdb (ext4) read-write at
             /mnt and write a file; FIFREEZE it and take its superblock stamp (kjumpd.fsstamp)
             for the job; jump to B (mode shutdown) on the target the host prepared on
             /dev/vda. Back with SAVED: power off with /mnt frozen. When a restore brings A
             back after ``kexec -e`` (header RESTORING): check the data, mark the image
             CONSUMED, thaw /mnt, write to it, print ``KJR-VERDICT: PASS restored ...``.
             With /kjr/image-key.json in the initramfs the image is encrypted (a fresh image
             key sealed to that key's public half, as the daemon does); ``kjr.secret=HEX``
             plants those bytes in A's memory, checked after the restore as the data is.
- ``normal`` the normal kernel that R boots when it does not restore: print
             ``KJR-NORMAL: rf=<kjump.rf from the command line> state=<image header state>``.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import random
import subprocess
import sys
import time

from kjumpd.bootconfig import save_kernel_hash
from kjumpd.fsstamp import read_stamp
from kjumpd.image import store
from kjumpd.image.format import ImageState
from kjumpd.job import Job

TARGET = "/dev/vda"
FS_DEV = "/dev/vdb"
MNT = "/mnt"
B_KERNEL = "/boot/bzImage"
B_INITRD = "/boot/b.cpio.gz"


def crash_area(default: tuple[int, int] = (0x20000000, 128 << 20)) -> tuple[int, int]:
    """The jump area: this kernel's crashkernel= reservation ("Crash kernel" in /proc/iomem;
    the test that boots it chooses its size), else ``default``."""
    try:
        with open("/proc/iomem") as f:
            for line in f:
                if line.rstrip().endswith(": Crash kernel"):
                    a, b = (int(x, 16) for x in line.split(":")[0].strip().split("-"))
                    return a, b + 1 - a
    except OSError:
        pass
    return default


JUMP_START, JUMP_SIZE = crash_area()
B_APPEND = (
    "console=ttyS0 nokaslr panic=1 memmap=exactmap memmap=512K@0K "
    f"memmap={JUMP_SIZE >> 20}M@{JUMP_START >> 20}M"
)
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
MIB = 1 << 20
KEY_FILE = "/kjr/image-key.json"


def say(text: str) -> None:
    print(f"KJR: {text}", flush=True)


def cmdline() -> dict[str, str]:
    with open("/proc/cmdline") as f:
        return dict(w.split("=", 1) for w in f.read().split() if "=" in w)


def run(cmd: list[str]) -> int:
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd).returncode


def fill(mib: int, seed: int) -> mmap.mmap:
    base = random.Random(seed).randbytes(MIB)
    m = mmap.mmap(-1, mib * MIB)
    for i in range(mib):
        r = (i * 4099 * 8) % MIB
        m[i * MIB : (i + 1) * MIB] = base[r:] + base[:r]
    return m


def ram_ranges() -> list[tuple[int, int]]:
    ram = []
    with open("/proc/iomem") as f:
        for line in f:
            if line.startswith(" ") or not line.rstrip().endswith(": System RAM"):
                continue
            a, b = (int(x, 16) for x in line.split(":")[0].strip().split("-"))
            ram.append((a, b + 1))
    out = []
    for a, b in ram:
        for s, e in ((a, min(b, JUMP_START)), (max(a, JUMP_START + JUMP_SIZE), b)):
            s, e = -(-s // 4096) * 4096, e // 4096 * 4096
            if s < e:
                out.append((s, e))
    return out


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def header_text() -> str:
    dev, _ = store.open_target(TARGET, writable=False, offset=0)
    with dev:
        return store.read_header(dev).state_text


def step_save(args: dict[str, str]) -> None:
    mib = int(args.get("kjr.mib", "32"))
    data = fill(mib, 777)
    before = hashlib.sha256(data).hexdigest()
    # the secret lives only in A's memory: a page-aligned mapping of its own
    secret = mmap.mmap(-1, 4096)
    planted = bytes.fromhex(args.get("kjr.secret", ""))
    secret[: len(planted)] = planted
    os.makedirs(MNT, exist_ok=True)
    if run(["mount", "-t", "ext4", FS_DEV, MNT]) != 0:
        print("KJR-VERDICT: FAIL cannot mount the data filesystem", flush=True)
        return
    with open(f"{MNT}/before-save", "w") as f:
        f.write("written by A before the save\n")
    os.sync()
    mfd = os.open(MNT, os.O_RDONLY)
    fcntl.ioctl(mfd, FIFREEZE, 0)
    stamp = read_stamp(FS_DEV)
    say(
        f"{MNT} frozen; stamp {stamp.fstype} {stamp.uuid} mount_count="
        f"{stamp.fields.get('mount_count')}"
    )
    dev, sb = store.open_target(TARGET, writable=False, offset=0)
    dev.close()
    b_hash = save_kernel_hash(sha256_file(B_KERNEL), sha256_file(B_INITRD))
    with open(B_INITRD, "rb") as f:
        b_initrd = f.read()
    job = Job(
        target_uuid=sb.uuid_str,
        superblock_device_offset=0,
        device_hint={"devno": "253:0", "name": "vda"},
        blockmap=[(e.logical, e.device_offset, e.length) for e in sb.blockmap],
        ranges=ram_ranges(),
        mode="shutdown",
        compression="lz4",
        chunk_size=4 * MIB,
        main_kernel={"release": os.uname().release, "build_id": ""},
        save_kernel_hash=b_hash,
        jump_area=(JUMP_START, JUMP_SIZE),
        fs_stamps=[stamp.to_dict()],
        created=int(time.time()),
        cancel_key=False,
        **encryption(),
    )
    with open("/run/b-initrd", "wb") as f:
        # as the daemon does (kjumpd.daemon.kexec.write_initrd): the job archive on a
        # 512-byte boundary
        f.write(b_initrd + b"\0" * (-len(b_initrd) % 512) + job.to_cpio())
    rc = run(
        [
            "kexec",
            "-c",
            "--load-preserve-context",
            f"--mem-min={JUMP_START:#x}",
            f"--mem-max={JUMP_START + JUMP_SIZE - 1:#x}",
            "--no-checks",
            B_KERNEL,
            "--initrd=/run/b-initrd",
            f"--append={B_APPEND} kjump.role=save",
        ]
    )
    if rc != 0:
        print(f"KJR-VERDICT: FAIL kexec load failed ({rc})", flush=True)
        return
    say("jumping to the save kernel")
    run(["kexec", "-e"])
    say("back in the main kernel")
    dev, _ = store.open_target(TARGET, writable=True, offset=0)
    with dev:
        h = store.read_header(dev)
        say(f"header {h.state_text}")
        if h.state == ImageState.SAVED:
            say(
                f"image SAVED ({h.raw_bytes >> 20} MiB raw, {h.stored_bytes >> 20} MiB stored); "
                "powering off with the filesystem frozen"
            )
            run(["poweroff", "-f"])
            time.sleep(120)
            return
        intact = hashlib.sha256(data).hexdigest() == before and secret[: len(planted)] == planted
        if h.state == ImageState.RESTORING and intact:
            store.set_state(dev, ImageState.CONSUMED)
    fcntl.ioctl(mfd, FITHAW, 0)
    os.close(mfd)
    with open(f"{MNT}/after-resume", "w") as f:
        f.write("written by A after the resume\n")
    run(["umount", MNT])
    ok = h.state == ImageState.RESTORING and intact
    print(
        f"KJR-VERDICT: {'PASS' if ok else 'FAIL'} restored state={h.state_text} "
        f"attempt={h.attempt} data={'intact' if intact else 'CHANGED'} now={header_text()}",
        flush=True,
    )


def encryption() -> dict[str, object]:
    """The job's image_key and seal when the host gave A an image key (as the daemon's
    kjumpd.daemon.encryption does), else nothing."""
    if not os.path.exists(KEY_FILE):
        return {}
    from kjumpd.image import seal

    kf = seal.KeyFile.load(KEY_FILE)
    key = seal.new_image_key()
    say(f"image encrypted: a fresh image key sealed to key {kf.key_id}")
    return {"image_key": key.hex(), "seal": seal.seal_key(kf.public, key)}


def step_normal(args: dict[str, str]) -> None:
    try:
        state = header_text()
    except Exception as e:  # noqa: BLE001 - reported, not raised
        state = f"unreadable({type(e).__name__})"
    print(f"KJR-NORMAL: rf={args.get('kjump.rf', '')} state={state}", flush=True)


def main() -> None:
    args = cmdline()
    step = args.get("kjr.step", "normal")
    say(f"guest up, step {step}")
    try:
        if step == "save":
            step_save(args)
        else:
            step_normal(args)
    except Exception as e:  # noqa: BLE001 - the test reads the verdict, not a traceback
        import traceback

        traceback.print_exc()
        print(f"KJR-VERDICT: FAIL guest error {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
