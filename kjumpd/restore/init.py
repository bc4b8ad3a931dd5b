#!/usr/bin/python3 -SEBu
"""The restore-first environment R (kboot style) that a boot loader starts first; run by the
/init shell script of bootloader/initramfs.py once /proc, /sys and /dev are mounted.

It mounts the kernel filesystems, reads /etc/kjumpd/boot.json (written by ``kjumpctl setup``
into this initramfs), finds the image target *by content* (magic + UUID at ``kjump.offset=``
on this kernel's command line, scanning every /sys/block disk; device names are not trusted),
gathers the evidence the guards need (header, metadata, chunk table, the stamps of every
filesystem on every block device, its own copies of the save kernel; the chunk table and the
save kernel only when it will start the save kernel, see restore_here) and lets
:func:`kjumpd.restore.decision.decide` choose:

- Restore(n): write RESTORING(n) durably; when R runs inside the image's jump area (the
  hibernation confined it there, kjumpd.confine), restore the image itself with B's restore
  code and jump into A (one boot); else ``kexec -l`` the save kernel B into the jump area in
  restore role (a plain load), ``kexec -e``;
- Invalidate(reason): write INVALID(reason) durably, then boot the normal kernel;
- BootNormal: boot the normal kernel (``kexec -l`` with its own command line and initrd from
  boot.json, ``kexec -e``).

R never mounts a disk: every read is of raw block devices (O_DIRECT), every write is one
header slot of the target. Lines on the console start with ``kjumpd-rf:``. If even the normal
kernel cannot be started, a shell is offered on the console (nothing else can be done).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kjumpd import confine
from kjumpd.errors import ImageAlteredError, ImageCorruptError, ImageFormatError, KjumpError
from kjumpd.linux import cmdline
from kjumpd.sysroot import Sysroot

TAG = "kjumpd-rf:"


def say(text: str) -> None:
    print(f"{TAG} {text}", flush=True)


def uptime(sysroot: Sysroot) -> float:
    try:
        return float(sysroot.read_text("/proc/uptime", default="0").split()[0])
    except (ValueError, IndexError):
        return 0.0


def mount_kernel_filesystems() -> None:
    for fstype, where in (("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")):
        os.makedirs(where, exist_ok=True)
        if os.path.ismount(where):
            continue
        subprocess.run(["mount", "-t", fstype, fstype, where], check=False)


# ------------------------------------------------------------------ evidence


class FileHashes:
    """SHA-256 of R's copies of the save kernel files, computed by ``sha256sum`` (busybox's
    in R) in a separate process while R reads the rest of the evidence.

    R's python has no OpenSSL (its builtin SHA-256 holds the GIL): hashing the save kernel
    and its initramfs in-process would stall R's decision for as long as it takes; a child
    process runs it on another CPU. ``result`` waits for it, and hashes in-process
    whatever the child did not report (no ``sha256sum``, a failure): the check is the same
    either way, only where it runs changes."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = [p for p in paths if p]
        self.proc: subprocess.Popen[bytes] | None = None
        if not self.paths:
            return
        try:
            self.proc = subprocess.Popen(
                ["sha256sum", *self.paths],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            self.proc = None

    def result(self) -> dict[str, str]:
        """path -> hex digest, for every path (OSError when a file cannot be read)."""
        got: dict[str, str] = {}
        if self.proc is not None:
            out, _ = self.proc.communicate()
            if self.proc.returncode == 0:
                for line in out.decode(errors="replace").splitlines():
                    digest, _, name = line.partition("  ")
                    if len(digest) == 64 and name in self.paths:
                        got[name] = digest.lower()
        missing = [p for p in self.paths if p not in got]
        if missing:
            from kjumpd.hashing import sha256_file  # hashlib only when sha256sum did not answer

            got.update((p, sha256_file(p)) for p in missing)
        return got


#: bytes read at once while walking the chunk records (see chunk_table_error)
WALK_WINDOW = 64 * 1024


def chunk_table_error(dev: Any, header: Any, meta: Any) -> str:
    """ "" when the chunk records (headers only) match the plan, the data length and the data
    CRC of the header; else what is wrong. Payloads are checked by B before each write."""
    from kjumpd.image.format import CHUNK_HEADER_SIZE, ChunkHeader, chunk_count, chunk_plan, crc32

    want = chunk_count(meta.extents, header.chunk_size) if header.chunk_size else -1
    if header.chunk_count != want or header.raw_bytes != meta.raw_bytes:
        return (
            f"header says {header.chunk_count} chunks / {header.raw_bytes} bytes, the "
            f"extent table {want} chunks / {meta.raw_bytes} bytes"
        )
    pos, end = header.data_offset, header.data_offset + header.data_length
    if header.data_offset < header.metadata_offset + header.metadata_length or end > dev.size:
        return f"data area [{pos}, {end}) is outside the target"
    plan = iter(chunk_plan(meta.extents, header.chunk_size))
    crc = 0
    # One read per window, not per record: a read costs about the same for 4 KiB and 64 KiB
    # (in a VM each is a request to the host), and the records of zero chunks are a few
    # hundred bytes each, so a window holds many headers.
    win, win_start = b"", 0
    for i in range(header.chunk_count):
        if pos + CHUNK_HEADER_SIZE > end:
            return f"truncated after {i} of {header.chunk_count} chunks"
        if pos + CHUNK_HEADER_SIZE > win_start + len(win):
            win_start = pos
            win = dev.read(pos, min(WALK_WINDOW, end - pos))
        ch = ChunkHeader.unpack(
            win[pos - win_start : pos - win_start + CHUNK_HEADER_SIZE], base=pos
        )
        expect = next(plan, None)
        if expect is None or (ch.index, ch.phys, ch.raw_length) != expect:
            return f"record at byte {pos} is chunk {ch.index}, expected {expect}"
        crc = crc32(struct.pack("<I", ch.crc), crc)
        pos += ch.record_length
    if pos != end:
        return f"records end at byte {pos}, the header says {end}"
    if crc != header.data_crc:
        return "data checksum (over the chunk CRCs) does not match the header"
    return ""


def restores_elsewhere(sysroot: Sysroot, confined: bool, area: tuple[int, int]) -> str:
    """Empty when this kernel runs inside the image's jump area ``area`` (start, size) and so
    restores the image itself (one boot); else why it must load the save kernel there."""
    if not confined:
        return "it was not confined to it (`kjumpctl setup --bootloader` says why)"
    start, size = area
    return confine.outside_area(sysroot.read_text("/proc/iomem", default=""), (start, start + size))


def _short(e: KjumpError) -> str:
    """An error for a header reason: what and why, without the fix."""
    return f"{e.what}: {e.why}" if e.why else e.what


@dataclass
class Gathered:
    evidence: Any  # decision.Evidence
    dev: Any = None  # the open target (writable) or None
    device: str = ""
    header: Any = None  # format.Header of a SAVED/RESTORING image
    meta: Any = None  # its format.Metadata, when it reads
    #: "" when this kernel runs in the header's jump area (it restores by itself), else
    #: why it must start the save kernel (restores_elsewhere)
    elsewhere: str = "the image was not read"


def gather(sysroot: Sysroot, cfg: Any, uuid: str, offset: int, confined: bool = False) -> Gathered:
    """Read everything the guards need. Never raises for what it reads: errors become
    evidence (``*_error``). ``confined``: this kernel's command line confines it
    (kjumpd.confine.requested)."""
    from kjumpd import fsstamp
    from kjumpd.image import store
    from kjumpd.image.store import find_target
    from kjumpd.linux import iomem
    from kjumpd.restore.decision import Evidence, HeaderView

    t0 = time.monotonic()
    try:
        device = find_target(sysroot, uuid, offset)
    except KjumpError as e:
        say(f"no target: {e.message}")
        return Gathered(Evidence(target_found=False))
    try:
        dev, _sb = store.open_target(sysroot.path(device), writable=True, offset=offset)
    except (KjumpError, OSError) as e:
        say(f"target on {device} cannot be opened: {e}")
        return Gathered(Evidence(target_found=False))
    say(f"target {uuid} found on {device} at byte {offset} ({time.monotonic() - t0:.2f} s)")
    try:
        header = store.read_header(dev)
    except KjumpError as e:
        return Gathered(
            Evidence(target_found=True, target_uuid=uuid, header_error=_short(e)), dev, device
        )
    hv = HeaderView.of(header)
    say(f"image state {header.state_text}")
    if hv.state not in ("SAVED", "RESTORING"):
        return Gathered(Evidence(target_found=True, target_uuid=uuid, header=hv), dev, device)
    # inside the image's jump area R restores by itself (one boot): its copies of the save
    # kernel are not started, and the chunk records are checked as they are restored
    elsewhere = restores_elsewhere(
        sysroot, confined, (int(header.jump_area_start), int(header.jump_area_size))
    )
    checks = (
        ()
        if not elsewhere
        else (
            ("save kernel", cfg.save.kernel, cfg.save_kernel_sha256),
            ("save initramfs", cfg.save.initrd, cfg.save_initrd_sha256),
        )
    )
    local = {path: str(sysroot.path(path)) for _w, path, _h in checks if path}
    hashes = FileHashes(list(local.values()))  # runs while the image is read
    clock = Steps()
    stamps, meta_error, chunks_error = None, "", ""
    meta = None
    try:
        meta = store.read_metadata(dev, header)
        raw = meta.identity.get("fs_stamps")
        if not isinstance(raw, list):
            meta_error = "the identity has no fs_stamps list"
        else:
            stamps = raw
    except KjumpError as e:
        meta_error = _short(e)
    clock.step("metadata")
    if not elsewhere:
        # restoring here checks every record before it is written and the checksum over all
        # of them before the jump (kjumpd.image.restore): a walk now would read them twice
        clock.step("chunk table (checked while restoring)")
    else:
        if meta is not None:
            try:
                chunks_error = chunk_table_error(dev, header, meta)
            except KjumpError as e:
                chunks_error = _short(e)
        clock.step(f"chunk table ({header.chunk_count} records)")
    current = fsstamp.scan(sysroot, stamps) if stamps else {}
    clock.step("filesystem stamps")
    try:
        ram_now = iomem.read(sysroot)
    except KjumpError as e:
        say(f"this boot's RAM map: {e.message}")
        ram_now = {}
    if confined:
        # confined, this kernel's own RAM is not the machine's: only the firmware's map
        # describes it
        ram_now.pop("iomem", None)
    setup_error = ""
    try:
        got = hashes.result()
        for what, path, want in checks:
            if path and got[local[path]] != want:
                setup_error = f"{what} {path} does not match its sha256 in boot.json"
                break
    except OSError as e:
        setup_error = f"cannot read the save kernel files: {e.strerror or e}"
    clock.step("save kernel files (waited for)" if checks else "save kernel files (not used)")
    say(f"evidence read: {clock}")
    if current:
        say(
            "filesystems: "
            + ", ".join(
                f"{fstype} {fsuuid} on {' and '.join(st.device for st in found)}"
                for (fstype, fsuuid), found in sorted(current.items())
                if any(rec.get("uuid") == fsuuid for rec in stamps or [])
            )
        )
    ev = Evidence(
        target_found=True,
        target_uuid=uuid,
        header=hv,
        fs_stamps=stamps,
        metadata_error=meta_error,
        chunks_error=chunks_error,
        current=current,
        setup_error=setup_error,
        extents=[(e.start, e.end) for e in meta.extents] if meta is not None else [],
        ram_saved=meta.identity.get("ram_map") if meta is not None else None,
        ram_now=ram_now,
    )
    return Gathered(ev, dev, device, header, meta, elsewhere)


class Steps:
    """Wall time per named step, for R's console (where its decision time goes)."""

    def __init__(self) -> None:
        self.t = time.monotonic()
        self.parts: list[str] = []

    def step(self, name: str) -> None:
        now = time.monotonic()
        self.parts.append(f"{name} {now - self.t:.2f} s")
        self.t = now

    def __str__(self) -> str:
        return ", ".join(self.parts)


# ------------------------------------------------------------------ acting


Runner = Callable[[Sequence[str]], int]


def run_cmd(argv: Sequence[str]) -> int:
    say("$ " + " ".join(argv))
    try:
        return subprocess.run(list(argv)).returncode
    except OSError as e:
        say(f"cannot run {argv[0]}: {e.strerror or e}")
        return 127


def kexec_into(args: list[str], run: Runner, kexec: str) -> bool:
    """Load and execute; returns only when the kernel could not be started."""
    args = [kexec] + args[1:]
    if run(args) != 0:
        say("kexec load failed")
        return False
    run([kexec, "-e"])
    say("kexec -e returned")
    return False


def localize(cfg: Any, sysroot: Sysroot) -> Any:
    """boot.json with its file paths mapped through the sysroot (identity on a real R)."""
    from dataclasses import replace

    def m(p: str | None) -> str | None:
        return str(sysroot.path(p)) if p else p

    return replace(
        cfg,
        normal=replace(cfg.normal, kernel=m(cfg.normal.kernel), initrd=m(cfg.normal.initrd)),
        save=replace(cfg.save, kernel=m(cfg.save.kernel), initrd=m(cfg.save.initrd)),
    )


def boot_normal(cfg: Any, note: str, run: Runner, kexec: str, sysroot: Sysroot) -> None:
    from kjumpd.restore.decision import normal_kexec_args

    args = normal_kexec_args(localize(cfg, sysroot), note)
    say(
        f"booting the normal kernel{f' ({note})' if note else ''} at uptime {uptime(sysroot):.2f} s"
    )
    kexec_into(args, run, kexec)


#: the kernel's words when it could not unpack all of an initramfs (init/initramfs.c)
UNPACK_FAILED = "Initramfs unpacking failed"


def unpack_failure(sysroot: Sysroot) -> str:
    """The kernel log's line saying R's initramfs was not unpacked whole (e.g. out of
    memory), or "" (also when the log cannot be read)."""
    from kjumpd.linux.kmsg import KernelLog, text_of

    log = KernelLog(sysroot).open(at_end=False)
    try:
        lines = log.read(limit=100_000)
    finally:
        log.close()
    return next((text_of(x).strip() for x in lines if UNPACK_FAILED in x), "")


def release_restore_memory() -> None:
    """After a restore that failed in this kernel: free what it still holds (objects in
    reference cycles with its frames), so that the normal kernel and its initrd fit in the
    jump area's memory when kexec copies them (kjumpd.confine.fit_problem counts either the
    restore or that copy, not both)."""
    import gc

    gc.collect()


def restore_here(sysroot: Sysroot, cfg: Any, dev: Any, header: Any, key: bytes | None) -> None:
    """Restore the image in state RESTORING on ``dev`` from this kernel and jump into A, as
    B's restore role does (kjumpd.agent.kernel_role.restore_memory): R runs in the image's
    jump area. Closes ``dev``; returns only by raising (the image is then INVALID, or A's
    entry could not be jumped to)."""
    from kjumpd.agent import kernel_role

    seconds = cmdline.params(cfg.save.cmdline).get("kjump.watchdog", "0")
    wd = None
    if seconds.isdigit() and int(seconds):
        from kjumpd.agent import watchdog

        wd = watchdog.start(sysroot, int(seconds), say)
    try:
        held = kernel_role.restore_memory(sysroot, dev, header, key, wd, refused_as="corrupt")
    finally:
        dev.close()
    kernel_role.jump_back(sysroot, header.jump_back_entry, held, watchdog=wd)


def restore_first(
    sysroot: Sysroot,
    cfg_path: str = "/etc/kjumpd/boot.json",
    *,
    run: Runner = run_cmd,
    kexec: str = "kexec",
    ask: Callable[[str], str | None] | None = None,
) -> str:
    """One pass of R; returns what it did ("restore", "normal", "invalid:<code>",
    "kept:<why>") when the kexec did not take over (always in tests with a fake kexec).
    ``ask`` reads a passphrase for an encrypted image (default: the console)."""
    from kjumpd.bootconfig import BootConfig
    from kjumpd.image import store
    from kjumpd.image.format import ImageState
    from kjumpd.restore.decision import (
        BootNormal,
        Invalidate,
        Restore,
        decide,
        expected_of,
        restore_kexec_args,
    )

    t0 = time.monotonic()
    cfg = BootConfig.from_json(sysroot.path(cfg_path).read_bytes())
    cut = unpack_failure(sysroot)
    if cut:
        # R's files may be cut short: its checks of them would judge the image wrongly
        say(f"this environment is incomplete ({cut}); the image is left as it is")
        boot_normal(cfg, "kept:initramfs", run, kexec, sysroot)
        return "kept:initramfs"
    own_cmdline = sysroot.read_text("/proc/cmdline", default="")
    params = cmdline.params(own_cmdline)
    confined = confine.requested(own_cmdline)
    uuid = params.get("kjump.target") or cfg.target_uuid
    try:
        offset = int(params.get("kjump.offset") or cfg.target_offset, 0)
    except ValueError:
        offset = cfg.target_offset
    to_b: dict[str, bytes] = {}  # what B's restore role gets with its initramfs
    if cfg.target_volume is not None:
        from kjumpd.linux import luks
        from kjumpd.restore import unlock

        unlocked = unlock.open_volume(sysroot, cfg.target_volume, ask or unlock.ask_console, say)
        if isinstance(unlocked, unlock.Unmarked):
            say(unlocked.why)
            boot_normal(cfg, "", run, kexec, sysroot)
            return "normal"
        if isinstance(unlocked, unlock.Kept):
            say(f"the target's LUKS volume is not opened: {unlocked.why}")
            boot_normal(cfg, f"kept:{unlocked.note}", run, kexec, sysroot)
            return f"kept:{unlocked.note}"
        say(f"LUKS volume {cfg.target_volume.uuid} unlocked")
        to_b[unlock.RESTORE_VOLUME] = json.dumps(
            luks.keyed_to_dict(cfg.target_volume, unlocked.key)
        ).encode()
    g = gather(sysroot, cfg, uuid, offset, confined)
    decision = decide(g.evidence, expected_of(cfg))
    say(f"decision: {decision} ({time.monotonic() - t0:.2f} s)")
    try:
        if isinstance(decision, Restore):
            b_cfg = cfg
            image_key: bytes | None = None
            if g.header is not None and g.header.encrypted:
                from dataclasses import replace

                from kjumpd.restore import unlock

                opened = unlock.open_image(
                    sysroot,
                    g.header,
                    g.meta.identity if g.meta is not None else {},
                    g.dev.read(g.header.metadata_offset, g.header.metadata_length),
                    ask or unlock.ask_console,
                    say,
                )
                if isinstance(opened, unlock.Kept):
                    say(f"image kept ({g.header.state_text}): {opened.why}")
                    g.dev.close()
                    g.dev = None
                    boot_normal(cfg, f"kept:{opened.note}", run, kexec, sysroot)
                    return f"kept:{opened.note}"
                if isinstance(opened, unlock.Refused):
                    store.set_state(g.dev, ImageState.INVALID, reason=opened.reason)
                    say(f"image refused and marked INVALID({opened.reason})")
                    g.dev.close()
                    g.dev = None
                    boot_normal(cfg, "invalid:altered", run, kexec, sysroot)
                    return "invalid:altered"
                say("image key unsealed; header and metadata authenticated")
                image_key = opened.key
                to_b[unlock.RESTORE_KEY] = opened.key.hex().encode() + b"\n"
            elsewhere = g.elsewhere  # decision.jump_area is the header's, which gather judged
            if not elsewhere:
                store.set_state(g.dev, ImageState.RESTORING, attempt=decision.attempt)
                say(
                    f"image marked RESTORING({decision.attempt}); restoring it in this kernel "
                    "(it runs in the image's jump area: one boot)"
                )
                dev, g.dev = g.dev, None  # restore_here closes it
                refused = "invalid:corrupt"
                try:
                    restore_here(sysroot, cfg, dev, store.read_header(dev), image_key)
                    return "restore"  # only where the jump into A is not a real one (tests)
                except ImageAlteredError:
                    # a record of the encrypted image does not authenticate (INVALID(altered:
                    # ...)); it was refused before it reached memory
                    refused = "invalid:altered"
                except (ImageCorruptError, ImageFormatError):
                    # what the chunk-table guard refuses in two boots, found while restoring
                    # (the image is marked INVALID(corrupt: ...)); A's memory was not live
                    pass
                # out of the except clause: its traceback no longer holds the restore's memory
                release_restore_memory()
                boot_normal(cfg, refused, run, kexec, sysroot)
                return refused
            if to_b:
                from dataclasses import replace

                from kjumpd.restore import unlock

                initrd = unlock.b_initrd_with(sysroot, cfg.save.initrd or "", to_b)
                b_cfg = replace(cfg, save=replace(cfg.save, initrd=initrd))
            store.set_state(g.dev, ImageState.RESTORING, attempt=decision.attempt)
            say(
                f"image marked RESTORING({decision.attempt}); loading the save kernel (two "
                f"boots: this kernel does not run in the image's jump area, {elsewhere})"
            )
            g.dev.close()
            g.dev = None
            args = restore_kexec_args(
                localize(b_cfg, sysroot), decision.attempt, decision.jump_area
            )
            kexec_into(args, run, kexec)
            # B could not be started: the attempt is counted; boot normally
            boot_normal(cfg, "restore-failed", run, kexec, sysroot)
            return "restore"
        if isinstance(decision, Invalidate):
            store.set_state(g.dev, ImageState.INVALID, reason=decision.reason)
            say(f"image refused and marked INVALID({decision.reason})")
            g.dev.close()
            g.dev = None
            boot_normal(cfg, f"invalid:{decision.code}", run, kexec, sysroot)
            return f"invalid:{decision.code}"
        assert isinstance(decision, BootNormal)
        if g.dev is not None:
            g.dev.close()
            g.dev = None
        boot_normal(cfg, "", run, kexec, sysroot)
        return "normal"
    finally:
        if g.dev is not None:
            g.dev.close()


def main(argv: Sequence[str] | None = None) -> int:
    as_init = os.environ.get("KJUMPD_RF_INIT") == "1" or os.getpid() == 1
    if as_init:
        os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        mount_kernel_filesystems()
        # the restore's own lines (its stages, what it left as found) reach the console as
        # the save kernel's do
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="kjumpd-rf[%(levelname)s] %(name)s: %(message)s",
        )
    sysroot = Sysroot()
    say(f"restore-first environment up at uptime {uptime(sysroot):.2f} s")
    failed = False
    try:
        restore_first(sysroot)
    except KjumpError as e:
        say(f"error: {e.message}")
        failed = True
    except Exception as e:  # noqa: BLE001 - PID 1 must not die with a traceback
        say(f"internal error: {type(e).__name__}: {e}")
    if failed:  # out of the except clause: its traceback no longer holds the restore's memory
        release_restore_memory()
        try:
            from kjumpd.bootconfig import BootConfig

            cfg = BootConfig.from_json(sysroot.path("/etc/kjumpd/boot.json").read_bytes())
            boot_normal(cfg, "rf-error", run_cmd, "kexec", sysroot)
        except (KjumpError, OSError) as e2:
            say(f"cannot boot the normal kernel either: {e2}")
    if os.getpid() != 1:
        return 1  # R's /init (a shell script) offers the rescue shell
    say("nothing could be started; a shell follows (exit powers off)")
    subprocess.run(["sh"])
    subprocess.run(["poweroff", "-f"])
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
