"""Guest side of tests/vm/test_savekernel.py: runs as the main kernel's (A) userspace, and as the
restore-first stand-in (R), inside a busybox + python initramfs (savekernel.initramfs).

``kjt.step=`` on the kernel command line says what to do:

- ``jump``    fill ``kjt.mib`` MiB with known data, make /dev/vda a kjumpd target, write a job
              (mode ``kjt.mode``, default test; A's /sys/kernel/vmcoreinfo in it so B skips
              A's free pages; ``kjt.freecheck=1``: B also checks each free page reads as zero,
              for an A booted with init_on_free=1), load B with kexec -c
              --load-preserve-context into the jump area, ``kexec -e``. Back in A: read the
              header, check the data, print
              ``KJT-VERDICT: PASS|FAIL ...``. With mode shutdown and a SAVED header: power off
              (the restore continues this very process, after ``kexec -e`` returns again).
- ``bootrounds`` B without a job (``kjt.variants``: gz, plain initramfs, quiet = gz with
              ``quiet`` on B's command line; ``kjt.rounds`` times each): B
              jumps straight back; A checks its data and that no image appeared.
- ``restore`` (R) check the header is SAVED, write RESTORING(attempt+1), kexec -l B in restore
              role naming the target by UUID and offset, ``kexec -e``.

A resumed by a restore sees RESTORING: it checks its data, marks the image CONSUMED and prints
the verdict. Every line the test reads starts with ``KJT``.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import subprocess
import sys
import time
import uuid as uuidlib
import zlib

from kjumpd.image import store
from kjumpd.image.device import ImageDevice
from kjumpd.image.format import BlockExtent, ImageState
from kjumpd.job import Job

DISK = "/dev/vda"
B_KERNEL = "/boot/bzImage"
B_INITRD = "/boot/b.cpio.gz"
B_INITRD_PLAIN = "/boot/b.cpio"
JUMP_START, JUMP_SIZE = 0x20000000, 128 << 20
B_APPEND = (
    "console=ttyS0 nokaslr panic=1 memmap=exactmap memmap=512K@0K "
    f"memmap={JUMP_SIZE >> 20}M@{JUMP_START >> 20}M"
)
MIB = 1 << 20


def say(text: str) -> None:
    print(f"KJT: {text}", flush=True)


def verdict(ok: bool, text: str) -> None:
    print(f"KJT-VERDICT: {'PASS' if ok else 'FAIL'} {text}", flush=True)


def cmdline() -> dict[str, str]:
    with open("/proc/cmdline") as f:
        return dict(w.split("=", 1) for w in f.read().split() if "=" in w)


def fill(mib: int, seed: int) -> mmap.mmap:
    """mib MiB of known, incompressible data: a random MiB rotated differently per MiB."""
    base = random.Random(seed).randbytes(MIB)
    m = mmap.mmap(-1, mib * MIB)
    for i in range(mib):
        r = (i * 4099 * 8) % MIB
        m[i * MIB : (i + 1) * MIB] = base[r:] + base[:r]
    return m


def digest(m: mmap.mmap) -> str:
    """The CRC-32 of each MiB (a SHA-256 of this much takes seconds under TCG)."""
    with memoryview(m) as view:
        return "".join(f"{zlib.crc32(view[o : o + MIB]):08x}" for o in range(0, len(view), MIB))


def ram_ranges() -> list[tuple[int, int]]:
    out = []
    with open("/proc/iomem") as f:
        for line in f:
            if line.startswith(" ") or not line.rstrip().endswith(": System RAM"):
                continue
            a, b = (int(x, 16) for x in line.split(":")[0].strip().split("-"))
            out.append((a, b + 1))
    ranges = []
    for a, b in out:  # minus the jump area, page aligned inward
        for s, e in ((a, min(b, JUMP_START)), (max(a, JUMP_START + JUMP_SIZE), b)):
            s, e = -(-s // 4096) * 4096, e // 4096 * 4096
            if s < e:
                ranges.append((s, e))
    return ranges


def disk_size() -> int:
    with open("/sys/block/vda/size") as f:
        return int(f.read()) * 512 // 4096 * 4096


def make_target() -> tuple[str, list[tuple[int, int, int]]]:
    size = disk_size()
    bm = [BlockExtent(0, 0, size)]
    with ImageDevice(DISK, bm, writable=True) as dev:
        sb = store.stamp_superblock(dev, bm, uuid=str(uuidlib.uuid4()))
        store.init_header(dev, sb.uuid)
    return sb.uuid_str, [(0, 0, size)]


def header() -> store.Header:
    dev, _ = store.open_target(DISK, writable=False, offset=0)
    with dev:
        return store.read_header(dev)


def run(cmd: list[str]) -> int:
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd).returncode


def vmcoreinfo() -> tuple[int, int] | None:
    """A's VMCOREINFO note (address, size), as the daemon puts it in the job."""
    try:
        with open("/sys/kernel/vmcoreinfo") as f:
            addr, size = (int(w, 16) for w in f.read().split()[:2])
    except (OSError, ValueError):
        return None
    say(f"vmcoreinfo note at {addr:#x}, {size} bytes")
    return addr, size


def step_jump(args: dict[str, str]) -> None:
    mib = int(args.get("kjt.mib", "128"))
    mode = args.get("kjt.mode", "test")
    seed = int(args.get("kjt.seed", "4242"))
    t = time.monotonic()
    data = fill(mib, seed)
    before = digest(data)
    say(f"filled {mib} MiB in {time.monotonic() - t:.1f} s, CRCs {before[:16]}")
    uuid, bm = make_target()
    ranges = ram_ranges()
    say(f"target {uuid} on {DISK}; ranges {[(hex(a), hex(b)) for a, b in ranges]}")
    with open(B_INITRD if args.get("kjt.plain") != "1" else B_INITRD_PLAIN, "rb") as f:
        b_initrd = f.read()
    job = Job(
        target_uuid=uuid,
        superblock_device_offset=0,
        device_hint={"devno": "253:0", "name": "vda"},
        blockmap=bm,
        ranges=ranges,
        mode=mode,
        compression=args.get("kjt.compression", "lz4"),
        chunk_size=int(args.get("kjt.chunk", str(4 * MIB))),
        main_kernel={"release": os.uname().release, "build_id": ""},
        save_kernel_hash="sha256:" + hashlib.sha256(b_initrd).hexdigest(),
        jump_area=(JUMP_START, JUMP_SIZE),
        fs_stamps=[],
        created=int(time.time()),
        cancel_key=args.get("kjt.cancel", "1") == "1",
        vmcoreinfo=vmcoreinfo(),
        free_page_check=args.get("kjt.freecheck") == "1",
    )
    with open("/run/b-initrd", "wb") as f:
        # as the daemon does (kjumpd.daemon.kexec.write_initrd): the job archive starts on a
        # 512-byte boundary after B's compressed initramfs (zstd leaves no padding of its own)
        pad = b"\0" * (-len(b_initrd) % 512)
        f.write(b_initrd + (pad + job.to_cpio() if args.get("kjt.nojob") != "1" else b""))
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
        verdict(False, f"kexec load failed with status {rc}")
        return
    say("jumping to the save kernel")
    run(["kexec", "-e"])  # returns 255 "Bad file descriptor" after a jump back: harmless
    say("back in the main kernel")
    if args.get("kjt.again") == "1":
        # B is still loaded and resumes inside its own jump back: it must come straight back
        say("jumping to the save kernel again")
        run(["kexec", "-e"])
        say("back in the main kernel again")
    h = header()
    after = digest(data)
    intact = after == before
    say(f"header {h.state_text}; data {'intact' if intact else 'CHANGED'}")
    if h.state == ImageState.SAVED and mode == "shutdown":
        say(
            f"image SAVED ({h.raw_bytes >> 20} MiB raw, {h.stored_bytes >> 20} MiB stored); "
            "powering off"
        )
        os.sync()
        run(["poweroff", "-f"])
        time.sleep(60)
        return
    if h.state == ImageState.RESTORING:
        if intact:
            dev, _ = store.open_target(DISK, writable=True, offset=0)
            with dev:
                store.set_state(dev, ImageState.CONSUMED)
        verdict(
            intact,
            f"restored state={h.state_text} data={'intact' if intact else 'CHANGED'}"
            f" mib={mib} consumed={'yes' if intact else 'no'}",
        )
        return
    expect = args.get("kjt.expect", "SAVED")
    ok = intact and h.state_text.startswith(expect)
    verdict(
        ok,
        f"jumped back state={h.state_text} data={'intact' if intact else 'CHANGED'} "
        f"mib={mib} raw={h.raw_bytes} stored={h.stored_bytes} zero_pages={h.zero_pages}",
    )


def step_bootrounds(args: dict[str, str]) -> None:
    """B without a job, gzip'd and plain initramfs alternately: B cannot save, jumps back at
    once, and A finds no new image (header EMPTY) and its data intact, every round."""
    rounds = int(args.get("kjt.rounds", "2"))
    data = fill(int(args.get("kjt.mib", "16")), 99)
    before = digest(data)
    make_target()
    ok = True
    variants = {"gz": (B_INITRD, ""), "plain": (B_INITRD_PLAIN, ""), "quiet": (B_INITRD, " quiet")}
    for r in range(1, rounds + 1):
        for variant in args.get("kjt.variants", "gz,plain,quiet").split(","):
            path, extra = variants[variant]
            rc = run(
                [
                    "kexec",
                    "-c",
                    "--load-preserve-context",
                    f"--mem-min={JUMP_START:#x}",
                    f"--mem-max={JUMP_START + JUMP_SIZE - 1:#x}",
                    "--no-checks",
                    B_KERNEL,
                    f"--initrd={path}",
                    f"--append={B_APPEND}{extra} kjump.role=save",
                ]
            )
            say(f"jumping to the save kernel ({variant}, round {r})")
            run(["kexec", "-e"])
            h = header()
            intact = digest(data) == before
            say(
                f"back in the main kernel ({variant}, round {r}): load rc {rc}, header "
                f"{h.state_text}, data {'intact' if intact else 'CHANGED'}"
            )
            ok = ok and rc == 0 and intact and h.state == ImageState.EMPTY
    verdict(ok, f"bootrounds rounds={rounds} state={header().state_text}")


def step_restore(args: dict[str, str]) -> None:
    dev, sb = store.open_target(DISK, writable=True, offset=0)
    with dev:
        h = store.read_header(dev)
        if h.state != ImageState.SAVED:
            verdict(False, f"restore-first: image is {h.state_text}, not SAVED")
            return
        store.set_state(dev, ImageState.RESTORING, attempt=h.attempt + 1)
    say(
        f"restore-first: image SAVED, marked RESTORING({h.attempt + 1}); loading the restore kernel"
    )
    rc = run(
        [
            "kexec",
            "-l",
            f"--mem-min={JUMP_START:#x}",
            f"--mem-max={JUMP_START + JUMP_SIZE - 1:#x}",
            "--no-checks",
            B_KERNEL,
            f"--initrd={B_INITRD}",
            f"--append={B_APPEND} kjump.role=restore kjump.target={sb.uuid_str} kjump.offset=0",
        ]
    )
    if rc != 0:
        verdict(False, f"restore-first: kexec load failed with status {rc}")
        return
    say("restore-first: executing the restore kernel")
    run(["kexec", "-e"])
    verdict(False, "restore-first: kexec -e returned")


def main() -> None:
    args = cmdline()
    step = args.get("kjt.step", "jump")
    say(f"guest up, step {step}")
    try:
        if step == "jump":
            step_jump(args)
        elif step == "restore":
            step_restore(args)
        elif step == "bootrounds":
            step_bootrounds(args)
        else:
            verdict(False, f"unknown kjt.step={step}")
    except Exception as e:  # noqa: BLE001 - the test reads the verdict, not a traceback
        import traceback

        traceback.print_exc()
        verdict(False, f"guest error {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
