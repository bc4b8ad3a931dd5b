"""A new target leaves no page cache behind. Afterwards it is read and written only with
O_DIRECT, and pages of it still cached are memory the next hibernation saves: a 2.5 GiB
target made in the same boot put 619 MiB of zero file pages into the image of the 3 GiB
bench VM. Measured with mincore(2) on this machine's own filesystem."""

import ctypes
import errno
import fcntl
import mmap
import os
import subprocess
from pathlib import Path

from kjumpd import cpio, initrd
from kjumpd.daemon import blockmap, jumparea
from kjumpd.image import store
from tests.prereq import need

MiB = 1 << 20
TMPFS_MAGIC = 0x01021994


def resident_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache (mincore of a shared map, nothing faulted)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    size = path.stat().st_size
    vec = (ctypes.c_ubyte * (size // mmap.PAGESIZE))()
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as m:
        anchor = ctypes.c_char.from_buffer(m)
        try:
            rc = libc.mincore(ctypes.addressof(anchor), size, vec)
        finally:
            del anchor
    if rc != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(b & 1 for b in vec) * mmap.PAGESIZE


def on_disk(path: Path) -> bool:
    """tmpfs keeps a file's pages as the file itself: nothing to drop there."""
    out = subprocess.run(
        ["stat", "-f", "-c", "%t", str(path)], capture_output=True, text=True
    ).stdout.strip()
    return out != "" and int(out, 16) != TMPFS_MAGIC


def test_a_new_target_is_not_left_in_the_page_cache(tmp_path):
    need(on_disk(tmp_path), f"{tmp_path} is on tmpfs, which has no page cache to drop")
    size = 64 * MiB
    written = tmp_path / "plain"
    with open(written, "wb") as f:  # the same writes without the drop: the control
        f.write(bytes(size))
        f.flush()
        os.fsync(f.fileno())
    assert resident_bytes(written) > size // 2, "this filesystem caches what is written"

    target = tmp_path / "image"
    made = store.create_target(target, size)
    assert resident_bytes(target) < MiB
    dev, sb = store.open_target(target, writable=False)
    dev.close()
    assert (sb.uuid, sb.size) == (made.uuid, size)


def test_a_new_targets_zeros_go_around_the_page_cache_as_written_extents(tmp_path, monkeypatch):
    """Without the advice to drop them afterwards, the zeros never entered the cache (they
    would have pushed the machine's cached files out first); and every extent is written,
    not merely reserved, so the block map B writes through stays valid."""
    need(on_disk(tmp_path), f"{tmp_path} is on tmpfs, which has no O_DIRECT")
    monkeypatch.setattr(store.pagecache, "forget_fd", lambda fd: "not asked in this test")
    size = 64 * MiB + 8192  # not a whole number of the writer's blocks
    target = tmp_path / "image"
    store.create_target(target, size)
    assert resident_bytes(target) < MiB
    with open(target, "rb") as f:
        extents = blockmap.fiemap(f.fileno(), size)
        assert blockmap.validate_extents(extents, size, str(target))
        f.seek(2 * MiB)
        assert f.read() == bytes(size - 2 * MiB)  # past the superblock and headers: zeros


def test_a_device_refusing_the_page_aligned_direct_writes_gets_them_through_the_cache(
    tmp_path, monkeypatch
):
    """A disk whose alignment is coarser than a page answers EINVAL to O_DIRECT writes:
    the rest of the zeros go through the cache and the target is made."""
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            assert len(refused) < 10, "the same write is retried with O_DIRECT"
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(store.os, "pwrite", pwrite)
    made = store.create_target(tmp_path / "image", 16 * MiB)
    monkeypatch.setattr(store.os, "pwrite", real)
    dev, sb = store.open_target(tmp_path / "image", writable=False)
    dev.close()
    assert sb.uuid == made.uuid
    if on_disk(tmp_path):
        assert refused == [0]


def test_a_target_on_tmpfs_is_written_through_the_cache(monkeypatch):
    """tmpfs refuses O_DIRECT: the zeros are written through the cache instead."""
    shm = Path("/dev/shm")
    need(shm.is_dir() and not on_disk(shm), "needs /dev/shm on tmpfs")
    target = shm / f"kjumpd-test-target-{os.getpid()}"
    try:
        made = store.create_target(target, 8 * MiB)
        assert target.stat().st_blocks * 512 >= 8 * MiB
        dev, sb = store.open_target(target, writable=False)
        dev.close()
        assert sb.uuid == made.uuid
    finally:
        target.unlink(missing_ok=True)


def test_a_kernel_without_fadvise_still_gets_its_target(tmp_path, monkeypatch):
    """CONFIG_ADVISE_SYSCALLS=n answers ENOSYS: the advice is dropped, the target is made."""

    def enosys(*args):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(os, "posix_fadvise", enosys)
    made = store.create_target(tmp_path / "image", 8 * MiB)
    dev, sb = store.open_target(tmp_path / "image", writable=False)
    dev.close()
    assert sb.uuid == made.uuid


def _written(path: Path, data: bytes) -> Path:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def test_sizing_the_jump_area_and_listing_an_initramfs_leave_it_uncached(tmp_path):
    """The preflight (every 30 s while the daemon runs) sizes the jump area from the save
    initramfs, which for an lz4 stream (how ours is built) means unpacking its last block;
    it left the whole file in the page cache, and every image saved it (8.5 MiB in the
    bench VM). Listing an archive's members (the restore-first entry's unlockers, the save
    initramfs's cryptography) read whole files the same way."""
    need(on_disk(tmp_path), f"{tmp_path} is on tmpfs, which has no page cache to drop")
    import lz4.block

    # incompressible members, so that the file is megabytes of pages
    members = [cpio.Entry(f"lib/m{i}.so", 0o100644, os.urandom(MiB)) for i in range(6)]
    raw = cpio.write(members)
    blob = bytearray(initrd.LZ4_LEGACY_MAGIC)
    for o in range(0, len(raw), initrd.LZ4_LEGACY_BLOCK):
        block = lz4.block.compress(raw[o : o + initrd.LZ4_LEGACY_BLOCK], store_size=False)
        blob += len(block).to_bytes(4, "little") + block
    archive = _written(tmp_path / "initramfs.cpio.gz", bytes(blob))
    assert resident_bytes(archive) > 4 * MiB, "this filesystem caches what is written"
    kernel = _written(tmp_path / "vmlinuz", bytes(0x202) + b"HdrS" + bytes(0x6A) + bytes(16))
    need_bytes = jumparea.required_size_for(kernel, archive, 64 * MiB)
    assert need_bytes >= len(raw) + 64 * MiB
    assert resident_bytes(archive) == 0
    assert {e.name for e in initrd.read_archive(archive)} >= {f"lib/m{i}.so" for i in range(6)}
    assert resident_bytes(archive) == 0
