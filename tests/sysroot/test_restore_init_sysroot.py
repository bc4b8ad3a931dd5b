"""R's /init logic (kjumpd/restore/init.py) against a fake system tree.

The target is a real kjumpd target file holding a real saved image (kjumpd.image.save), the
recorded filesystem is a real ext4 image made with mkfs; the only fake is the `kexec`
executable on PATH (it logs its arguments). R must find both by content, decide, write the
header, and call kexec with the right arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid as uuidlib
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # bootloader/ is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bootloader.initramfs import restore_config
from kjumpd.errors import ImageError, KjumpError
from kjumpd.fsstamp import read_stamp
from kjumpd.image import store
from kjumpd.image.device import ImageDevice
from kjumpd.image.format import ImageState
from kjumpd.image.save import save_image
from kjumpd.restore.init import restore_first
from kjumpd.sysroot import Sysroot
from tests.prereq import need

AREA = (0x20000000, 128 << 20)
MIB = 1 << 20


class Memory:
    def __init__(self, size: int) -> None:
        self.data = bytearray(os.urandom(size // 2)) + bytearray(size - size // 2)

    def read(self, phys: int, length: int) -> bytes:
        return bytes(self.data[phys - 0x100000 : phys - 0x100000 + length])


class World:
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        need(shutil.which("mkfs.ext4") is not None, "mkfs.ext4 is not installed")
        self.root = tmp / "root"
        for d in (
            "proc",
            "dev",
            "sys/block/vda",
            "sys/class/block/vda",
            "sys/class/block/vdb",
            "etc/kjumpd",
            "kjump/normal",
            "kjump/save",
            "bin",
        ):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.sysroot = Sysroot(self.root)
        # the target: a whole "disk" with the superblock at 0
        self.target = self.root / "dev/vda"
        self.sb = store.create_target(self.target, 8 * MIB)
        sectors = str(8 * MIB // 512)
        for d in ("sys/block/vda", "sys/class/block/vda"):
            (self.root / d / "size").write_text(sectors + "\n")
        # a filesystem A had mounted
        self.fs = self.root / "dev/vdb"
        with open(self.fs, "wb") as f:
            f.truncate(32 * MIB)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.fs)], check=True)
        (self.root / "sys/class/block/vdb/size").write_text(str(32 * MIB // 512) + "\n")
        # R's files and boot.json
        host = tmp / "host"
        host.mkdir()
        for name in ("vmlinuz", "initrd.img", "bzImage", "save.cpio.gz"):
            (host / name).write_bytes(name.encode() * 1000)
        self.cfg, files = restore_config(
            target_uuid=self.sb.uuid_str,
            target_offset=0,
            normal_kernel=host / "vmlinuz",
            normal_initrd=host / "initrd.img",
            normal_cmdline="root=/dev/vda2 ro quiet",
            save_kernel=host / "bzImage",
            save_initrd=host / "save.cpio.gz",
            save_cmdline="console=ttyS0 nokaslr panic=1",
            jump_area=AREA,
            max_attempts=3,
        )
        for arc, src in files.items():
            shutil.copyfile(src, self.sysroot.path(arc))
        self.write_config()
        (self.root / "proc/cmdline").write_text(
            f"console=ttyS0 kjump.target={self.sb.uuid_str} kjump.offset=0\n"
        )
        # the one fake: kexec logs its arguments
        self.log = tmp / "kexec.log"
        fake = self.root / "bin/kexec"
        fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {self.log}\nexit 0\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{self.root / 'bin'}:{os.environ['PATH']}")

    def write_config(self) -> None:
        (self.root / "etc/kjumpd/boot.json").write_text(self.cfg.to_json())

    def save(self, stamps: list | None = None, **identity) -> None:
        if stamps is None:
            stamps = [read_stamp(self.fs).to_dict()]
        mem = self.mem = Memory(2 * MIB)
        ident = {
            "jump_area": list(AREA),
            "jump_back_entry": 0x1000000,
            "save_kernel_hash": self.cfg.save_hash,
            "fs_stamps": stamps,
            **identity,
        }
        dev, _ = store.open_target(self.target, writable=True)
        with dev:
            save_image(
                mem,
                [(0x100000, 0x100000 + 2 * MIB)],
                dev,
                identity=ident,
                mode="shutdown",
                chunk_size=256 * 1024,
                workers=1,
            )

    def header(self):
        dev, _ = store.open_target(self.target, writable=False)
        with dev:
            return store.read_header(dev)

    def set_state(self, state, **kw) -> None:
        dev, _ = store.open_target(self.target, writable=True)
        with dev:
            store.set_state(dev, state, **kw)

    def kexec_calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def run(self) -> str:
        return restore_first(self.sysroot)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    return World(tmp_path, monkeypatch)


def test_a_clean_image_is_restored_through_the_save_kernel(world: World) -> None:
    world.save()
    assert world.run() == "restore"
    h = world.header()
    assert h.state == ImageState.RESTORING and h.attempt == 1
    calls = world.kexec_calls()
    load = calls[0]
    assert load.startswith("-l --no-checks --mem-min=0x20000000 --mem-max=0x27ffffff ")
    assert f"{world.root}/kjump/save/bzImage" in load
    assert f"--initrd={world.root}/kjump/save/initramfs.cpio.gz" in load
    assert "kjump.role=restore" in load and f"kjump.target={world.sb.uuid_str}" in load
    assert "kjump.attempt=1" in load and "memmap=exactmap memmap=512K@0K" in load
    assert calls[1] == "-e"
    # here kexec -e "returned" (fake): R falls back to the normal kernel and says why
    assert "kjump.rf=restore-failed" in calls[2]


def test_no_image_boots_the_normal_kernel_and_touches_nothing(world: World) -> None:
    before = world.target.read_bytes()
    assert world.run() == "normal"
    assert world.target.read_bytes() == before
    assert world.kexec_calls() == [
        f"-l --no-checks {world.root}/kjump/normal/vmlinuz "
        f"--initrd={world.root}/kjump/normal/initrd.img "
        "--append=root=/dev/vda2 ro quiet",
        "-e",
    ]


def test_no_target_on_any_disk_boots_normally(world: World) -> None:
    world.save()
    (world.root / "proc/cmdline").write_text(f"kjump.target={uuidlib.uuid4()} kjump.offset=0\n")
    assert world.run() == "normal"
    assert world.header().state == ImageState.SAVED


def test_a_filesystem_changed_since_the_save_is_refused(world: World) -> None:
    need(shutil.which("tune2fs") is not None, "tune2fs is not installed")
    world.save()
    # what a read-write mount does to the superblock: the mount count goes up
    subprocess.run(["tune2fs", "-C", "7", str(world.fs)], check=True, capture_output=True)
    assert world.run() == "invalid:stale"
    h = world.header()
    assert h.state == ImageState.INVALID and h.reason.startswith("stale: ")
    assert "mount_count 0 -> 7" in h.reason
    assert world.kexec_calls()[0].endswith(
        "--append=root=/dev/vda2 ro quiet kjump.rf=invalid:stale"
    )


def test_a_filesystem_that_vanished_is_refused(world: World) -> None:
    ghost = read_stamp(world.fs).to_dict()
    ghost["uuid"] = str(uuidlib.uuid4())
    world.save(stamps=[ghost])
    assert world.run() == "invalid:stale"
    assert "not found" in world.header().reason


def test_corrupt_metadata_is_refused(world: World) -> None:
    world.save()
    with open(world.target, "r+b") as f:
        f.seek(72 * 1024 + 30)
        b = f.read(1)
        f.seek(72 * 1024 + 30)
        f.write(bytes([b[0] ^ 0xFF]))
    assert world.run() == "invalid:corrupt"
    assert world.header().reason.startswith("corrupt: image metadata")


def test_a_damaged_chunk_record_is_refused_before_b_runs(world: World) -> None:
    world.save()
    h = world.header()
    with open(world.target, "r+b") as f:
        f.seek(h.data_offset + 12)  # the first record's physical address
        f.write(b"\xff\xff\xff\xff")
    assert world.run() == "invalid:corrupt"
    assert world.header().reason.startswith("corrupt: chunk table")
    assert not any("kjump.role=restore" in c for c in world.kexec_calls())


def test_attempts_stop_at_the_maximum(world: World) -> None:
    world.save()
    world.set_state(ImageState.RESTORING, attempt=2)
    assert world.run() == "restore"
    assert world.header().attempt == 3
    world.log.unlink()
    assert world.run() == "invalid:attempts"
    assert world.header().state == ImageState.INVALID
    assert not any("kjump.role=restore" in c for c in world.kexec_calls())


def test_another_save_kernel_is_refused(world: World) -> None:
    world.save(save_kernel_hash="sha256:" + "0" * 64)
    assert world.run() == "invalid:save-kernel"


def test_a_tampered_save_kernel_copy_in_r_is_refused(world: World) -> None:
    world.save()
    (world.root / "kjump/save/bzImage").write_bytes(b"tampered")
    assert world.run() == "invalid:setup"


def test_b_is_loaded_where_the_image_says_as_jump_area(world: World) -> None:
    """A's area at the save (KASLR or crashkernel=SIZE may move it between boots), not the
    one R was given at setup."""
    world.save(jump_area=[0x30000000, 128 << 20])
    assert world.run() == "restore"
    load = world.kexec_calls()[0]
    assert load.startswith("-l --no-checks --mem-min=0x30000000 --mem-max=0x37ffffff ")
    assert "memmap=131072K@786432K" in load


def test_a_jump_area_over_the_saved_memory_is_refused(world: World) -> None:
    world.save(jump_area=[0x100000, 128 << 20])  # the saved memory is at 1 MiB
    assert world.run() == "invalid:jump-area"
    assert "inside its jump area" in world.header().reason


def test_an_interrupted_save_is_refused(world: World) -> None:
    world.save()
    world.set_state(ImageState.WRITING)
    assert world.run() == "invalid:incomplete"


def test_boot_json_is_what_setup_wrote(world: World) -> None:
    d = json.loads((world.root / "etc/kjumpd/boot.json").read_text())
    assert d["version"] == 1 and d["target"] == {"uuid": world.sb.uuid_str, "offset": 0}
    assert d["save"]["hash"].startswith("sha256:") and d["jump_area"] == list(AREA)


#: /proc/iomem of R confined to AREA by its entry's memmap= words, its kernel inside
CONFINED_IOMEM = """\
00000000-00000fff : Reserved
00001000-0007ffff : System RAM
00080000-1fffffff : Reserved
20000000-27ffffff : System RAM
  21000000-21bfffff : Kernel code
  21c00000-21ffffff : Kernel data
28000000-3fffffff : Reserved
"""


def confined(world: World, monkeypatch: pytest.MonkeyPatch, iomem: str) -> list:
    """R as its confined entry boots it: /proc/iomem, and A's memory as /dev/mem (a file
    of the physical address space). The jump into A (kexec_load + reboot) is recorded."""
    (world.root / "proc/iomem").write_text(iomem)
    (world.root / "proc/cmdline").write_text(
        f"kjump.target={world.sb.uuid_str} kjump.offset=0 "
        "memmap=0x1ff80000$0x80000 memmap=0x18000000$0x28000000\n"
    )
    for n, (start, end) in enumerate([(0, 0x9FC00), (0x100000, 0x40000000)]):
        d = world.root / f"sys/firmware/memmap/{n}"
        d.mkdir(parents=True)
        (d / "start").write_text(f"{start:#x}\n")
        (d / "end").write_text(f"{end - 1:#x}\n")
        (d / "type").write_text("System RAM\n")
    with open(world.root / "dev/mem", "wb") as f:
        f.truncate(4 * MIB)
    jumps: list = []
    from kjumpd.agent import kernel_role

    monkeypatch.setattr(
        kernel_role, "jump_back", lambda _s, entry, held, **_kw: jumps.append((entry, held))
    )
    return jumps


def test_r_in_the_jump_area_restores_by_itself_in_one_boot(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    world.save()
    jumps = confined(world, monkeypatch, CONFINED_IOMEM)
    assert world.run() == "restore"
    out = capsys.readouterr().out
    assert "restoring it in this kernel" in out
    # neither walked nor hashed beforehand: the restore checks the records, B is not started
    assert "chunk table (checked while restoring)" in out
    assert "save kernel files (not used)" in out
    # A's memory is back, byte for byte, and R jumps to A's saved entry without kexec
    dev, _ = store.open_target(world.target, writable=False)
    with dev:
        header = store.read_header(dev)
    assert header.state == ImageState.RESTORING and header.attempt == 1
    written = (world.root / "dev/mem").read_bytes()[0x100000 : 0x100000 + 2 * MIB]
    assert written == bytes(world.mem.data)
    assert world.kexec_calls() == []
    assert jumps == [(0x1000000, [])]


def test_r_in_the_jump_area_refuses_a_damaged_chunk_record_as_corrupt_without_jumping(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    world.save()
    h = world.header()
    with open(world.target, "r+b") as f:
        f.seek(h.data_offset + 12)  # the first record's physical address
        f.write(b"\xff\xff\xff\xff")
    jumps = confined(world, monkeypatch, CONFINED_IOMEM)
    assert world.run() == "invalid:corrupt"
    assert "chunk table (checked while restoring)" in capsys.readouterr().out
    reason = world.header().reason
    assert reason.startswith("corrupt: chunk record header at byte offset"), reason
    assert jumps == []
    calls = world.kexec_calls()
    assert len(calls) == 2 and "kjump.rf=invalid:corrupt" in calls[0], calls
    assert not any("kjump.role=restore" in c for c in calls)


def test_r_in_the_jump_area_refuses_a_wrong_checksum_over_the_records_before_the_jump(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.save()
    dev, _ = store.open_target(world.target, writable=True)
    with dev:
        store.update_header(dev, data_crc=store.read_header(dev).data_crc ^ 1)
    jumps = confined(world, monkeypatch, CONFINED_IOMEM)
    assert world.run() == "invalid:corrupt"
    assert world.header().reason.startswith("corrupt: image chunk list does not match")
    assert jumps == []


def test_r_in_the_jump_area_hit_by_a_read_error_marks_the_image_invalid_and_says_why(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fails under the records R restores (it did not read them beforehand): the
    read error reaches the caller, which boots the normal kernel, and the image is INVALID."""
    world.save()
    data_offset = world.header().data_offset
    jumps = confined(world, monkeypatch, CONFINED_IOMEM)
    real = ImageDevice._preadv_full

    def failing(self, mv, dev_off, logical):  # noqa: ANN001 - the method's own signature
        if logical >= data_offset:  # as the real one words a failed preadv
            raise ImageError(f"read error on {self.path}", why="Input/output error")
        return real(self, mv, dev_off, logical)

    monkeypatch.setattr(ImageDevice, "_preadv_full", failing)
    with pytest.raises(KjumpError) as err:
        world.run()
    assert "read error" in err.value.message and "Input/output error" in err.value.message
    monkeypatch.setattr(ImageDevice, "_preadv_full", real)
    assert world.header().reason.startswith("restore failed: "), world.header().reason
    assert jumps == []


def test_r_whose_kernel_landed_outside_the_area_restores_in_two_boots(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    world.save()
    outside = CONFINED_IOMEM.replace(
        "21000000-21bfffff : Kernel code", "01000000-01bfffff : Kernel code"
    )
    jumps = confined(world, monkeypatch, outside)
    assert world.run() == "restore"
    out = capsys.readouterr().out
    assert "two boots: this kernel does not run in the image's jump area" in out
    assert "kernel image lies at [0x1000000, 0x1c00000)" in out
    assert jumps == [] and world.kexec_calls()[0].startswith("-l --no-checks --mem-min=0x20000000")
    assert (world.root / "dev/mem").read_bytes() == bytes(4 * MIB)


def test_r_booted_without_confinement_says_so_and_restores_in_two_boots(
    world: World, capsys
) -> None:
    world.save()
    assert world.run() == "restore"
    assert "two boots: this kernel does not run in the image's jump area, it was not confined" in (
        capsys.readouterr().out
    )


def test_an_r_whose_initramfs_was_cut_short_leaves_the_image_alone(world: World) -> None:
    """The kernel could not unpack all of R's files (out of memory): R's checks of them
    would refuse a good image; it boots the normal kernel and the image stays SAVED."""
    world.save()
    (world.root / "dev/kmsg").write_text(
        "6,101,805457,-;Unpacking initramfs...\n"
        "3,102,1265411,-;Initramfs unpacking failed: write error\n"
    )
    assert world.run() == "kept:initramfs"
    assert world.header().state == ImageState.SAVED
    assert world.kexec_calls()[0].endswith("kjump.rf=kept:initramfs")
