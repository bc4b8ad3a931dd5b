"""The target as a store of one image: create, stamp, read and update its header state.

Used by the daemon (A), the restore-first environment (R), the agent (B) and kjumpctl.
Byte formats are in kjumpd.image.format; the header update protocol is: read both slots,
write the new header (sequence + 1) into the slot that does *not* hold the current header,
then flush. A torn write therefore leaves the previous header intact.

Standard library only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import time
import uuid as uuidlib
from typing import Any

from kjumpd.errors import (
    ImageCorruptError,
    ImageFormatError,
    ImageStateError,
    KjumpError,
    TargetError,
)
from kjumpd.image.device import ALIGN, ImageDevice
from kjumpd.image.format import (
    DATA_ALIGN,
    HEADER_SLOT_OFFSETS,
    HEADER_SLOT_SIZE,
    METADATA_OFFSET,
    SUPERBLOCK_MAGIC,
    SUPERBLOCK_SIZE,
    BlockExtent,
    Header,
    ImageState,
    Metadata,
    TargetSuperblock,
    clip_reason,
    crc32,
    pick_header,
)
from kjumpd.linux import pagecache
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

#: smallest target: superblock, headers, metadata and one data window
MIN_TARGET_SIZE = 1024 * 1024


def create_target(
    path: str | os.PathLike[str], size: int, uuid: bytes | str | None = None
) -> TargetSuperblock:
    """Create (or overwrite) a fully allocated target file of ``size`` bytes.

    On btrfs the file is made nodatacow before its first byte. The space is reserved first
    (posix_fallocate: a full filesystem fails at once, not after gigabytes of writes), then
    every byte is written once (zeros), so the file is never sparse and its block map does
    not change afterwards; then the superblock is stamped and the header is EMPTY. If any
    step fails, a file this call created is removed (a half-made target is never left for a
    later run to find); a file that was there before is left in place, and the error says so.
    """
    size = -(-int(size) // ALIGN) * ALIGN
    name = os.fspath(path)
    if size < MIN_TARGET_SIZE:
        raise TargetError(
            f"target size {size} is too small",
            why=f"a target needs at least {MIN_TARGET_SIZE} bytes",
            fix="choose a larger size",
            path=name,
        )
    created = True
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            created = False
            fd = os.open(path, os.O_RDWR | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as e:
        raise TargetError(
            f"cannot create target {name}",
            why=e.strerror or str(e),
            fix="check the directory and permissions",
            path=name,
        ) from None
    try:
        try:
            _nocow_on_btrfs(fd)
            _allocate(fd, size)
        finally:
            os.close(fd)
        with ImageDevice(path, writable=True) as dev:
            sb = stamp_superblock(dev, [BlockExtent(0, 0, size)], uuid=uuid)
            init_header(dev, sb.uuid)
    except (OSError, KjumpError) as e:
        why = (e.strerror or str(e)) if isinstance(e, OSError) else e.message
        if created:
            discard_new_file(path)
            left = "the partial file was removed"
        else:
            left = "the file that was there is left in place, no longer a target"
        raise TargetError(
            f"cannot write target {name} ({size} bytes)",
            why=f"{why}; {left}",
            fix="free disk space or choose a smaller size, on a filesystem that can hold it",
            path=name,
        ) from None
    return sb


def _nocow_on_btrfs(fd: int) -> None:
    """On btrfs, make the (empty) file nodatacow: the save kernel writes its blocks raw, so
    btrfs must neither checksum nor relocate them (kjumpd.linux.btrfs)."""
    from kjumpd.linux import btrfs

    if btrfs.is_btrfs(fd):
        btrfs.set_nocow(fd)
        if not btrfs.nocow(fd):
            raise OSError(errno.EOPNOTSUPP, "btrfs did not keep the nodatacow attribute")


def _allocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes, then write them once with zeros and flush.

    The zeros go around the page cache (O_DIRECT) where the filesystem allows it: written
    through it, a target of several GiB would first push the machine's cached files out for
    pages nobody reads, and copy every byte once more on the way (under an emulator, most
    of `kjumpctl setup`'s time). Where O_DIRECT is refused (tmpfs) they are written
    through the cache, then dropped from it."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # a filesystem without fallocate: the writes below find out whether it fits
    direct = _set_direct(fd, True)
    block = mmap.mmap(-1, ZERO_BLOCK)  # page-aligned zeros, as O_DIRECT needs
    try:
        # every view is released before the close below, so it cannot fail over an export
        # and hide a write error
        with memoryview(block) as zeros:
            done = 0
            while done < size:
                with zeros[: min(ZERO_BLOCK, size - done)] as part:
                    try:
                        done += os.pwrite(fd, part, done)
                    except OSError as e:
                        if not (direct and e.errno == errno.EINVAL):
                            raise
                        # the device's alignment is coarser than a page: through the cache
                        direct = _set_direct(fd, False)
                if direct and done % ALIGN:
                    direct = _set_direct(fd, False)  # a short write: the rest through the cache
    finally:
        block.close()
    os.fsync(fd)
    # The target is only ever read and written with O_DIRECT: its zeros left in the page
    # cache would be memory the next hibernation saves (gigabytes after `kjumpctl setup`).
    refused = pagecache.forget_fd(fd)
    if refused:
        log.info("the new target stays in the page cache until reclaimed (fadvise: %s)", refused)


#: the zeros written at a time when a target is created
ZERO_BLOCK = 4 * 1024 * 1024


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; whether it is on now (False where refused)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, want)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False
    return on


def discard_new_file(path: str | os.PathLike[str]) -> None:
    """Remove a file this run created and could not finish (already gone is fine)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove the partial target %s: %s", os.fspath(path), e)


def _uuid_bytes(uuid: bytes | str | None) -> bytes:
    if uuid is None:
        return uuidlib.uuid4().bytes
    if isinstance(uuid, bytes):
        if len(uuid) != 16:
            raise TargetError("target UUID must be 16 bytes")
        return uuid
    try:
        return uuidlib.UUID(uuid).bytes
    except ValueError:
        raise TargetError(f"{uuid!r} is not a UUID") from None


def stamp_superblock(
    dev: ImageDevice,
    blockmap: list[BlockExtent],
    uuid: bytes | str | None = None,
    block_size: int = ALIGN,
) -> TargetSuperblock:
    """Write the superblock with ``blockmap`` at logical 0 and flush.

    The UUID is kept from an existing valid superblock unless ``uuid`` is given.
    """
    if uuid is None:
        try:
            uuid = read_superblock(dev).uuid
        except (ImageFormatError, ImageCorruptError):
            uuid = None
    size = sum(e.length for e in blockmap)
    sb = TargetSuperblock(
        uuid=_uuid_bytes(uuid), size=size, block_size=block_size, blockmap=tuple(blockmap)
    )
    raw = sb.pack()
    dev.write(0, raw + bytes(-len(raw) % ALIGN))
    dev.flush()
    return sb


def read_superblock(dev: ImageDevice) -> TargetSuperblock:
    data = dev.read(0, min(SUPERBLOCK_SIZE, dev.size))
    return TargetSuperblock.unpack(data, base=0)


def open_target(
    path: str | os.PathLike[str], *, writable: bool, offset: int = 0, direct: bool = True
) -> tuple[ImageDevice, TargetSuperblock]:
    """Open a target by its superblock at device ``offset``, through the block map it records.

    For a plain target file the offset is 0 and the map is the whole file; for a partition
    or disk the superblock names the extents (relative to the device opened).
    """
    probe = ImageDevice(path, writable=False, direct=direct)
    try:
        if offset % ALIGN or offset >= probe.size:
            raise TargetError(
                f"superblock offset {offset} is not valid for {os.fspath(path)}",
                fix="pass the offset recorded by `kjumpctl setup`",
            )
        data = probe.read(offset, min(SUPERBLOCK_SIZE, probe.size - offset))
    finally:
        probe.close()
    sb = TargetSuperblock.unpack(data, base=offset)
    if sb.blockmap[0].device_offset != offset:
        raise TargetError(
            f"superblock at {offset} of {os.fspath(path)} maps logical 0 elsewhere",
            why=f"block map starts at device offset {sb.blockmap[0].device_offset}",
            fix="run `kjumpctl setup` again",
        )
    dev = ImageDevice(path, sb.blockmap, writable=writable, direct=direct)
    return dev, sb


def init_header(dev: ImageDevice, uuid: bytes) -> Header:
    """Write an EMPTY header into both slots (sequence 1 and 0) and flush."""
    now = time.time()
    h = Header(state=ImageState.EMPTY, seq=1, uuid=uuid, created=now, updated=now)
    dev.write(HEADER_SLOT_OFFSETS[0], h.pack())
    dev.write(HEADER_SLOT_OFFSETS[1], h.evolve(seq=0).pack())
    dev.flush()
    return h


def read_header_slots(dev: ImageDevice) -> list[Header | None]:
    data = dev.read(HEADER_SLOT_OFFSETS[0], 2 * HEADER_SLOT_SIZE)
    slots: list[Header | None] = []
    for i, off in enumerate(HEADER_SLOT_OFFSETS):
        try:
            slots.append(
                Header.unpack(data[i * HEADER_SLOT_SIZE : (i + 1) * HEADER_SLOT_SIZE], base=off)
            )
        except (ImageFormatError, ImageCorruptError) as e:
            log.debug("header slot %d: %s", i, e)
            slots.append(None)
    return slots


def read_header(dev: ImageDevice) -> Header:
    """The valid header with the highest sequence number."""
    slots = read_header_slots(dev)
    if all(s is None for s in slots):
        # say precisely why slot 0 failed (version, magic or checksum)
        Header.unpack(
            dev.read(HEADER_SLOT_OFFSETS[0], HEADER_SLOT_SIZE), base=HEADER_SLOT_OFFSETS[0]
        )
    return pick_header(slots)[1]


def write_header(dev: ImageDevice, header: Header) -> Header:
    """Write ``header`` (sequence = current + 1) into the older slot, then flush."""
    slots = read_header_slots(dev)
    try:
        cur_index, cur = pick_header(slots)
        seq = cur.seq + 1
        target = 1 - cur_index
    except ImageFormatError:
        seq, target = 1, 0
    new = header.evolve(seq=seq)
    dev.write(HEADER_SLOT_OFFSETS[target], new.pack())
    dev.flush()
    return new


def update_header(dev: ImageDevice, **changes: Any) -> Header:
    """Change fields of the current header; ``updated`` is set to now."""
    cur = read_header(dev)
    changes.setdefault("updated", time.time())
    return write_header(dev, cur.evolve(**changes))


def set_state(
    dev: ImageDevice, state: ImageState, reason: str = "", attempt: int | None = None
) -> Header:
    """Record a new state (reason for ABORTED/INVALID, attempt for RESTORING). A reason
    longer than the header holds is cut (a state change is never lost to its wording)."""
    changes: dict[str, Any] = {"state": ImageState(state), "reason": clip_reason(reason)}
    if attempt is not None:
        changes["attempt"] = attempt
    return update_header(dev, **changes)


def require_state(header: Header, *states: ImageState, action: str = "use") -> None:
    if header.state not in states:
        allowed = ", ".join(s.name for s in states)
        raise ImageStateError(
            f"cannot {action} the image: it is {header.state_text}",
            why=f"this needs state {allowed}",
            fix="save a new image" if header.state != ImageState.SAVED else "",
            state=header.state.name,
        )


def read_metadata(dev: ImageDevice, header: Header) -> Metadata:
    """The metadata the header points at, checked against the header's CRC."""
    off, n = header.metadata_offset, header.metadata_length
    if off != METADATA_OFFSET or n <= 0 or off + n > dev.size or n > 64 * 1024 * 1024:
        raise ImageFormatError(
            "image metadata location is not valid",
            why=f"header says offset {off}, length {n} (target is {dev.size} bytes)",
            fix="the image cannot be used; save a new one",
            structure="header",
            offset=HEADER_SLOT_OFFSETS[0] + 96,
        )
    data = dev.read(off, n)
    if crc32(data) != header.metadata_crc:
        raise ImageCorruptError(
            f"image metadata at byte offset {off} is corrupt",
            why="checksum does not match the header",
            fix="the image cannot be used; boot normally and hibernate again",
            structure="image metadata",
            offset=off,
        )
    return Metadata.unpack(data, base=off)


__all__ = [
    "create_target",
    "discard_new_file",
    "stamp_superblock",
    "read_superblock",
    "open_target",
    "init_header",
    "read_header",
    "read_header_slots",
    "write_header",
    "update_header",
    "set_state",
    "require_state",
    "read_metadata",
    "DATA_ALIGN",
    "MIN_TARGET_SIZE",
]


def find_target(sysroot: Sysroot, uuid: str, offset: int) -> str:
    """The /dev path of the one whole disk whose bytes at ``offset`` are the target with
    ``uuid`` (magic + UUID); device names are not trusted."""
    found: list[str] = []
    looked: list[str] = []
    for name in sysroot.listdir("/sys/block"):
        try:
            size = int(sysroot.read_text(f"/sys/block/{name}/size", "0").strip() or 0) * 512
        except ValueError:
            continue
        dev = f"/dev/{name}"
        if size < offset + 4096 or not sysroot.exists(dev):
            continue
        looked.append(name)
        try:
            with ImageDevice(sysroot.path(dev), writable=False) as d:
                head = d.read(offset, min(SUPERBLOCK_SIZE, d.size - offset))
        except (KjumpError, OSError) as e:
            log.info("%s: not readable (%s)", dev, e)
            continue
        if head[:8] != SUPERBLOCK_MAGIC:
            continue
        try:
            sb = TargetSuperblock.unpack(head, base=offset)
        except KjumpError as e:
            log.info("%s: target superblock at %d does not parse (%s)", dev, offset, e)
            continue
        if sb.uuid_str == uuid:
            found.append(dev)
    if not found:
        raise TargetError(
            f"the image target {uuid} is on none of this kernel's disks",
            why=f"no kjumpd superblock with that UUID at byte {offset} of "
            f"{', '.join(looked) or 'any disk'}",
            fix="the save kernel needs the driver for the target's disk "
            "(kernel.fragment), and the target must be on a whole disk's "
            "block map",
            uuid=uuid,
            offset=offset,
        )
    if len(found) > 1:
        raise TargetError(
            f"the image target {uuid} is on more than one disk",
            why=f"{', '.join(found)} carry the same superblock (a cloned disk?)",
            fix="give one of them a new target with `kjumpctl setup`",
            uuid=uuid,
            devices=",".join(found),
        )
    return found[0]
