"""One fuzz target per parser of bytes from a disk or from A, with its seeds and its contract.

A target's ``run(data)`` feeds ``data`` to the parser the way kjumpd reads it (through a file, a
fake sysroot or an ImageDevice where kjumpd reads one) and checks what the parser returns;
``check`` turns the outcome into a finding or None. ``fix`` (optional) recomputes the
structure's own checksums after a mutation, so a mutated input reaches the code behind the
checksum check; it never recomputes a checksum of content (a chunk's payload CRC inside an
image, the image's data CRC), so "wrong memory" stays a question a restore must answer.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import os
import random
import shutil
import stat
import struct
import tempfile
import traceback
import uuid as uuidlib
import zlib
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kjumpd import cpio, zstdframe
from kjumpd.agent import freepages
from kjumpd.bootconfig import BootConfig
from kjumpd.daemon import config as daemon_config
from kjumpd.errors import (
    ConfigError,
    FsStampError,
    ImageError,
    ImageFormatError,
    JobError,
    KjumpError,
)
from kjumpd.fsstamp import read_stamp
from kjumpd.image import format as fmt
from kjumpd.image import restore, save, store
from kjumpd.image.chunk import decode_chunk, encode_chunk
from kjumpd.image.device import ImageDevice
from kjumpd.image.memfile import FileMemorySource
from kjumpd.job import Job, job_from_cpio
from kjumpd.linux import cmdline, kconfig, mountinfo
from kjumpd.sysroot import Sysroot

ROOT = Path(__file__).resolve().parents[2]


class Violation(Exception):
    """The parser returned, but what it returned breaks its contract (wrong memory, a round
    trip that changes the value)."""


@dataclass(frozen=True)
class Target:
    name: str
    what: str  # the parser, for the report
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    #: the errors the parser may raise: named, mapped to an exit code
    allowed: tuple[type[KjumpError], ...] = ()
    fix: Callable[[bytearray], None] | None = None
    max_len: int = 4096


def signature(e: BaseException) -> str:
    """Exception type and the innermost frame in this repository: one finding per place."""
    where = "?"
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        if fr.filename.startswith(str(ROOT)):
            where = f"{os.path.relpath(fr.filename, ROOT)}:{fr.lineno}"
            break
    return f"{type(e).__name__} at {where}"


def check(target: Target, data: bytes) -> str | None:
    """None when the parser kept its contract on ``data``, else the finding's signature."""
    try:
        target.run(data)
    except target.allowed as e:
        if not e.what:
            return f"unnamed {type(e).__name__}"
        return None
    except Violation as e:
        return f"Violation: {e}"
    except Exception as e:  # noqa: BLE001 - anything else escaping a parser is the finding
        return signature(e)
    return None


# ------------------------------------------------------------------------- helpers


def _u32(data: bytes | bytearray, off: int) -> int:
    return int.from_bytes(data[off : off + 4], "little")


def _put_crc(buf: bytearray, start: int, end: int, at: int) -> None:
    """CRC-32 of buf[start:end] stored at ``at`` (when it fits)."""
    if 0 <= start <= end and at + 4 <= len(buf):
        struct.pack_into("<I", buf, at, zlib.crc32(bytes(buf[start:end])))


@functools.cache
def _scratch() -> Path:
    """A private directory for the files a target reads (tmpfs when there is one), removed at
    exit (or by ``make fuzz``, which names it in KJUMP_FUZZ_DIR: libFuzzer exits without
    Python's exit handlers)."""
    given = os.environ.get("KJUMP_FUZZ_DIR")
    if given:
        return Path(given)
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="kjump-fuzz-", dir=base))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _file(name: str, data: bytes) -> Path:
    p = _scratch() / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


# ------------------------------------------------------------- target superblock


def _sb_fix(buf: bytearray) -> None:
    if len(buf) < 48:
        return
    n = min(_u32(buf, 40), (len(buf) - 52) // 24)
    _put_crc(buf, 0, 48 + 24 * n, 48 + 24 * n)


def _sb_seeds() -> list[bytes]:
    uid = bytes(range(16))
    one = fmt.TargetSuperblock(
        uuid=uid, size=8 << 20, block_size=4096, blockmap=(fmt.BlockExtent(0, 0, 8 << 20),)
    )
    three = fmt.TargetSuperblock(
        uuid=uid,
        size=12 << 20,
        block_size=512,
        blockmap=(
            fmt.BlockExtent(0, 1 << 20, 4 << 20),
            fmt.BlockExtent(4 << 20, 64 << 20, 4 << 20),
            fmt.BlockExtent(8 << 20, 16 << 20, 4 << 20),
        ),
    )
    return [one.pack(), three.pack()]


def _sb_run(data: bytes) -> None:
    sb = fmt.TargetSuperblock.unpack(data, base=0)
    if fmt.TargetSuperblock.unpack(sb.pack()) != sb:
        raise Violation("superblock round trip changed it")
    _ = sb.uuid_str


# ---------------------------------------------------------------------- header


def _header_crc_at(buf: bytearray | bytes, start: int, end: int) -> int | None:
    """Where the header slot at buf[start:end] keeps its CRC (its text fields walked)."""
    pos = start + 168
    for _ in range(5):
        if pos + 2 > end:
            return None
        pos += 2 + int.from_bytes(buf[pos : pos + 2], "little")
    return pos if pos + 4 <= end else None


def _header_fix_slot(buf: bytearray, start: int, end: int) -> None:
    at = _header_crc_at(buf, start, end)
    if at is not None:
        _put_crc(buf, start, at, at)


def _header_fix(buf: bytearray) -> None:
    _header_fix_slot(buf, 0, min(len(buf), fmt.HEADER_SLOT_SIZE))


def _sample_header(**kw: object) -> fmt.Header:
    base: dict[str, object] = dict(
        state=fmt.ImageState.SAVED,
        seq=7,
        uuid=bytes(range(16)),
        created=1764095000.5,
        saved=1764095012.25,
        updated=1764095012.25,
        jump_area_start=0x20000000,
        jump_area_size=1 << 27,
        jump_back_entry=0x1234000,
        flags=fmt.FLAG_ZERO_ELISION,
        chunk_size=1 << 20,
        metadata_offset=fmt.METADATA_OFFSET,
        metadata_length=400,
        metadata_crc=0x1234,
        data_crc=0x5678,
        data_offset=128 << 10,
        data_length=1 << 20,
        raw_bytes=4 << 20,
        zero_pages=100,
        stored_bytes=900 << 10,
        chunk_count=4,
        mode="platform",
        compression="lz4",
        main_kernel="6.12.117 ab12",
        save_kernel_hash="sha256:" + "0" * 64,
        reason="",
    )
    base.update(kw)
    return fmt.Header(**base)  # type: ignore[arg-type]


def _header_seeds() -> list[bytes]:
    return [
        _sample_header().pack()[:512],
        _sample_header(state=fmt.ImageState.RESTORING, attempt=2).pack()[:512],
        _sample_header(state=fmt.ImageState.INVALID, reason="corrupt: x é").pack()[:512],
        fmt.Header(state=fmt.ImageState.EMPTY, seq=1).pack()[:512],
    ]


def _header_run(data: bytes) -> None:
    h = fmt.Header.unpack(data, base=fmt.HEADER_SLOT_OFFSETS[0])
    if fmt.Header.unpack(h.pack()).pack() != h.pack():  # bytes: a NaN time never equals itself
        raise Violation("header round trip changed it")
    fmt.pick_header([None, h])
    _ = h.state_text
    json.dumps(h.to_dict())


# -------------------------------------------------------------------- metadata


def _meta_end(buf: bytearray | bytes) -> int | None:
    if len(buf) < 24:
        return None
    n, jlen = _u32(buf, 12), _u32(buf, 20)
    end = 24 + 16 * n + jlen
    return end if end + 4 <= len(buf) else None


def _meta_fix(buf: bytearray) -> None:
    end = _meta_end(buf)
    if end is not None:
        _put_crc(buf, 0, end, end)


def _sample_metadata() -> fmt.Metadata:
    return fmt.Metadata(
        extents=(fmt.MemoryExtent(0x1000, 0x9E000), fmt.MemoryExtent(0x100000, 0x2F0000)),
        identity={
            "main_kernel": "6.12 abc",
            "jump_area": [0x20000000, 1 << 27],
            "fs_stamps": [{"version": 1, "device": "/dev/vda1", "fstype": "ext4", "uuid": "u"}],
        },
    )


def _meta_seeds() -> list[bytes]:
    return [_sample_metadata().pack(), fmt.Metadata(extents=(fmt.MemoryExtent(0, 4096),)).pack()]


def _meta_run(data: bytes) -> None:
    m = fmt.Metadata.unpack(data)
    fmt.chunk_count(m.extents, 1 << 20)
    for _ in zip(range(64), fmt.chunk_plan(m.extents, 1 << 20)):
        pass


# ---------------------------------------------------------------------- chunks


def _chunk_fix(buf: bytearray) -> None:
    if len(buf) < fmt.CHUNK_HEADER_SIZE:
        return
    pages, plen = int.from_bytes(buf[6:8], "little"), _u32(buf, 24)
    start = fmt.CHUNK_HEADER_SIZE
    end = start + (pages + 7) // 8 + plen
    if end <= len(buf):  # standalone: the payload CRC too, so lz4 decoding is reached
        _put_crc(buf, start, end, 28)
    _put_crc(buf, 0, 36, 36)


def _memory_pages(seed: int, n: int) -> bytes:
    """Mixed pages: zero, text-like, short random runs, 0xff (small when compressed)."""
    rnd = random.Random(seed)
    out = bytearray()
    for i in range(n):
        r = rnd.random()
        if r < 0.35:
            out += bytes(fmt.PAGE_SIZE)
        elif r < 0.7:
            line = f"line {i} pid {rnd.randrange(1 << 16)} /usr/lib/x\n".encode()
            out += (line * (fmt.PAGE_SIZE // len(line) + 1))[: fmt.PAGE_SIZE]
        elif r < 0.85:
            out += rnd.randbytes(64) + bytes(fmt.PAGE_SIZE - 64)
        else:
            out += b"\xff" * fmt.PAGE_SIZE
    return bytes(out)


def _chunk_seeds() -> list[bytes]:
    out = []
    for i, (pages, comp) in enumerate([(4, "lz4"), (3, "none"), (2, "lz4"), (9, "lz4")]):
        data = _memory_pages(i, pages)
        c = encode_chunk(i, 0x100000, data, comp, tag=0x1234, length=len(data) - 100 * (i == 3))
        out.append(c.head + c.payload)
    zero = encode_chunk(0, 0, bytes(3 * fmt.PAGE_SIZE))
    return out + [zero.head + zero.payload]


def _chunk_run(data: bytes) -> None:
    ch = fmt.ChunkHeader.unpack(data, base=0)
    bl = ch.bitmap_length
    bitmap = data[fmt.CHUNK_HEADER_SIZE : fmt.CHUNK_HEADER_SIZE + bl]
    payload = data[fmt.CHUNK_HEADER_SIZE + bl : fmt.CHUNK_HEADER_SIZE + bl + ch.payload_length]
    if len(bitmap) + len(payload) < bl + ch.payload_length:
        return  # a record cut short is the record reader's to refuse (the image target)
    out = decode_chunk(ch, bitmap, payload, 0)
    if len(out) != ch.raw_length:
        raise Violation(f"decoded {len(out)} bytes for a {ch.raw_length}-byte chunk")


# ----------------------------------------------------------------------- image

#: the compact form of an image: these many bytes of each structure, then the data area
_SB_KEEP, _SLOT_KEEP, _META_KEEP = 256, 512, 512
_IMG_RANGES = [(0x1000, 0x7000), (0x10000, 0x1D000)]
_IMG_CHUNK = 8192
_IMG_TARGET = store.MIN_TARGET_SIZE


@dataclass(frozen=True)
class _SavedImage:
    memory: bytes  # the memory saved (phys 0 up to the last range's end)
    compact: list[bytes]  # seeds: valid images in the compact form
    data_offset: int


def _compact(raw: bytes, data_offset: int, data_length: int) -> bytes:
    out = (
        b"".join(raw[a : a + n] for a, n in _IMG_PARTS)
        + raw[data_offset : data_offset + data_length]
    )
    rebuilt = _expand(out, data_offset)
    if rebuilt != raw[: len(rebuilt)] or any(raw[len(rebuilt) :]):
        raise AssertionError("the compact form does not hold this image")
    return out


_IMG_PARTS = (
    (0, _SB_KEEP),
    (fmt.HEADER_SLOT_OFFSETS[0], _SLOT_KEEP),
    (fmt.HEADER_SLOT_OFFSETS[1], _SLOT_KEEP),
    (fmt.METADATA_OFFSET, _META_KEEP),
)


def _pieces(compact: bytes, data_offset: int) -> list[tuple[int, bytes]]:
    """(offset, bytes) of the target a compact input stands for (zeros everywhere else)."""
    out, pos = [], 0
    for at, n in _IMG_PARTS:
        out.append((at, compact[pos : pos + n].ljust(n, b"\0")))
        pos += n
    out.append((data_offset, compact[pos : pos + _IMG_TARGET - data_offset]))
    return out


def _expand(compact: bytes, data_offset: int) -> bytes:
    img = bytearray(_IMG_TARGET)
    for at, piece in _pieces(compact, data_offset):
        img[at : at + len(piece)] = piece
    return bytes(img)


class _TargetFile:
    """The one target file the image target rewrites: only what the last input changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_bytes(bytes(_IMG_TARGET))
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self.tail = 0  # bytes of data area the last input wrote

    def put(self, compact: bytes, data_offset: int) -> None:
        for at, piece in _pieces(compact, data_offset):
            if at == data_offset:
                os.pwrite(self.fd, piece.ljust(self.tail, b"\0"), at)
                self.tail = len(piece)
            else:
                os.pwrite(self.fd, piece, at)


@functools.cache
def _saved_image() -> _SavedImage:
    end = _IMG_RANGES[-1][1]
    memory = _memory_pages(11, end // fmt.PAGE_SIZE)
    mem_path = _file("image-memory", memory)
    seeds = []
    data_offset = 0
    for comp in ("lz4", "none"):
        tgt = _scratch() / f"image-seed-{comp}"
        store.create_target(tgt, _IMG_TARGET, uuid=bytes(range(16)))
        with ImageDevice(tgt, writable=True) as dev, FileMemorySource(mem_path) as src:
            stats = save.save_image(
                src,
                _IMG_RANGES,
                dev,
                identity={
                    "main_kernel": "6.12 abc",
                    "jump_area": [0x20000000, 1 << 27],
                    "fs_stamps": [
                        {
                            "version": 1,
                            "device": "/dev/vda1",
                            "fstype": "ext4",
                            "uuid": "0b5e7c1a-6f6e-4c1e-9a77-3d2f1e0c9b8a",
                            "fields": {"mount_count": 3, "mtime": 1764095000},
                        }
                    ],
                },
                mode="test",
                chunk_size=_IMG_CHUNK,
                workers=1,
                compression=comp,
            )
            if comp == "lz4":
                store.set_state(dev, fmt.ImageState.RESTORING)  # the other slot: SAVED
        h = stats.header
        assert h is not None
        data_offset = h.data_offset
        raw = tgt.read_bytes()
        seeds.append(_compact(raw, h.data_offset, h.data_length))
        tgt.unlink()
    return _SavedImage(memory, seeds, data_offset)


def _image_fix(buf: bytearray) -> None:
    """Recompute the superblock's, the metadata's and the header slots' own CRCs (and the
    header's copy of the metadata CRC) and the header CRC of every chunk record with a
    payload; never a payload CRC nor the data CRC, which vouch for the memory."""
    n = len(buf)
    sb = bytearray(buf[:_SB_KEEP])
    _sb_fix(sb)
    buf[: len(sb)] = sb
    m0 = _SB_KEEP + 2 * _SLOT_KEEP
    meta = bytearray(buf[m0 : m0 + _META_KEEP])
    _meta_fix(meta)
    buf[m0 : m0 + len(meta)] = meta
    for s in (_SB_KEEP, _SB_KEEP + _SLOT_KEEP):
        if s + 120 <= n:
            mlen = int.from_bytes(buf[s + 104 : s + 112], "little")
            if 0 < mlen <= _IMG_TARGET - fmt.METADATA_OFFSET:
                padded = bytes(meta[:mlen]) + bytes(max(0, mlen - len(meta)))
                struct.pack_into("<I", buf, s + 112, zlib.crc32(padded))
        _header_fix_slot(buf, s, min(n, s + _SLOT_KEEP))
    pos = m0 + _META_KEEP
    while pos + fmt.CHUNK_HEADER_SIZE <= n and buf[pos : pos + 4] == fmt.CHUNK_MAGIC:
        # not for a record without payload: an all-zero record turned free with a matching
        # CRC leaves memory as found instead of zeroing it, and nothing but that record's
        # header CRC says which it was (a forgery, not a corruption a CRC-32 lets through)
        if buf[pos + 4] not in fmt.EMPTY_ENCODINGS:
            _put_crc(buf, pos, pos + 36, pos + 36)
        pages, plen = int.from_bytes(buf[pos + 6 : pos + 8], "little"), _u32(buf, pos + 24)
        pos += fmt.CHUNK_HEADER_SIZE + (pages + 7) // 8 + plen


@functools.cache
def _target_file() -> _TargetFile:
    return _TargetFile(_scratch() / "image-target")


def _chunk_stream_fix(buf: bytearray) -> None:
    """Every record header's own CRC in a data area (not the payload CRCs)."""
    pos, n = 0, len(buf)
    while pos + fmt.CHUNK_HEADER_SIZE <= n and buf[pos : pos + 4] == fmt.CHUNK_MAGIC:
        _put_crc(buf, pos, pos + 36, pos + 36)
        pages, plen = int.from_bytes(buf[pos + 6 : pos + 8], "little"), _u32(buf, pos + 24)
        pos += fmt.CHUNK_HEADER_SIZE + (pages + 7) // 8 + plen


class _CheckedMemory:
    """A restore's sink that refuses any byte that is not the byte saved at its address."""

    def __init__(self, memory: bytes) -> None:
        self.memory = memory
        self.written: list[tuple[int, int]] = []

    def write(self, phys: int, data: bytes | memoryview) -> None:
        got = bytes(data)
        end = phys + len(got)
        if not any(a <= phys and end <= b for a, b in _IMG_RANGES):
            raise Violation(f"wrong memory: a restore wrote [{phys:#x}, {end:#x}), never saved")
        if got != self.memory[phys:end]:
            raise Violation(f"wrong memory: a restore wrote other bytes at {phys:#x}")
        self.written.append((phys, end))

    def covered(self) -> list[tuple[int, int]]:
        out: list[list[int]] = []
        for a, b in sorted(self.written):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return [(a, b) for a, b in out]


def _image_run(data: bytes) -> None:
    from kjumpd.cli import image_cmds

    saved = _saved_image()
    tf = _target_file()
    tf.put(data, saved.data_offset)
    path = tf.path
    # kjumpctl image info, in text and JSON
    with contextlib.redirect_stdout(io.StringIO()):
        for as_json in (False, True):
            image_cmds.cmd_info(Namespace(file=str(path), offset=0, json=as_json))
    dev, _sb = image_cmds._open(str(path), writable=False, offset=0)
    with dev:
        _restore_first_evidence(dev)
    # the restore itself (B in its restore role, kjump-agent restore): right bytes, or a
    # named refusal
    dev, _sb = image_cmds._open(str(path), writable=False, offset=0)
    sink = _CheckedMemory(saved.memory)
    with dev:
        restore.restore_image(dev, sink, workers=1)
    if sink.covered() != _IMG_RANGES:
        raise Violation(f"wrong memory: a restore succeeded but wrote only {sink.covered()}")


def _restore_first_evidence(dev: ImageDevice) -> None:
    """What R reads before it decides (restore.init.gather without a machine): the header,
    the metadata and its recorded filesystem stamps, the chunk-table walk; then the decision.
    R turns a KjumpError into evidence; anything else would stop its PID 1."""
    from kjumpd.restore import decision
    from kjumpd.restore.init import chunk_table_error

    header = store.read_header(dev)
    hv = decision.HeaderView.of(header)
    stamps, meta_error, chunks_error = None, "", ""
    try:
        meta = store.read_metadata(dev, header)
    except KjumpError as e:
        meta_error = e.message
    else:
        raw = meta.identity.get("fs_stamps")
        stamps = raw if isinstance(raw, list) else None
        try:
            chunks_error = chunk_table_error(dev, header, meta)
        except KjumpError as e:
            chunks_error = e.message
    ev = decision.Evidence(
        target_found=True,
        target_uuid=str(uuidlib.UUID(bytes=header.uuid)),
        header=hv,
        fs_stamps=stamps,
        metadata_error=meta_error,
        chunks_error=chunks_error,
    )
    decision.decide(ev, decision.Expected(header.save_kernel_hash))


def _image_seeds() -> list[bytes]:
    return list(_saved_image().compact)


def _records_seeds() -> list[bytes]:
    head = _SB_KEEP + 2 * _SLOT_KEEP + _META_KEEP
    return [c[head:] for c in _saved_image().compact]


def _read_records(
    dev: ImageDevice, length: int, window: int, held: bool = False
) -> tuple[list[object], str]:
    """The records RecordReader hands out, and its error; ``held``: through held_records
    (each payload copied, then given back)."""
    from kjumpd.image.stream import RecordReader

    got: list[object] = []
    reader = RecordReader(dev, 0, length, window=window, held=2 if held else 0)
    try:
        if held:
            for ch, bitmap, payload, off, give_back in reader.held_records():
                got.append((ch, bitmap, bytes(payload), off))
                give_back()
        else:
            for rec in reader:
                got.append(rec)
    except ImageError as e:
        return got, f"{type(e).__name__}: {e}"
    finally:
        reader.close()
    return got, ""


def _records_run(data: bytes) -> None:
    """The chunk records of a data area as RecordReader cuts them out of its windows: the
    same records and the same error whatever the window size (a record may span windows),
    copied or held as views of the windows."""
    size = max(4096, -(-len(data) // 4096) * 4096)
    path = _file("records", data.ljust(size, b"\0"))
    with ImageDevice(path, writable=False) as dev:
        results = [_read_records(dev, len(data), w) for w in (4096, 12288, 1 << 20)]
        held = [_read_records(dev, len(data), w, held=True) for w in (4096, 1 << 20)]
    if any(r != results[-1] for r in results):
        raise Violation("RecordReader hands out other records with another window size")
    if any(r != results[-1] for r in held):
        raise Violation("RecordReader's held records differ from its copied ones")
    if results[-1][1] and "ImageCorruptError" not in results[-1][1]:
        raise Violation(f"a bad record is not an ImageCorruptError: {results[-1][1]}")


# ------------------------------------------------------------------ job, cpio


def _sample_job() -> Job:
    return Job(
        target_uuid="0b5e7c1a-6f6e-4c1e-9a77-3d2f1e0c9b8a",
        superblock_device_offset=1 << 20,
        device_hint={"devno": "254:0", "name": "vda"},
        blockmap=[(0, 1 << 20, 64 << 20), (64 << 20, 512 << 20, 16 << 20)],
        ranges=[(0x1000, 0x9F000), (0x100000, 0x20000000), (0x28000000, 0x3FFDD000)],
        mode="platform",
        compression="lz4",
        chunk_size=1 << 20,
        main_kernel={"release": "6.12.117", "build_id": "ab" * 20},
        save_kernel_hash="sha256:" + "0" * 64,
        jump_area=(0x20000000, 128 << 20),
        fs_stamps=[{"device": "/dev/vda1", "fstype": "ext4", "mtime": 1, "wtime": 2}],
        created=1764095000,
        cancel_key=True,
        vmcoreinfo=(0x3FF00000, 4096),
    )


def _job_seeds() -> list[bytes]:
    j = _sample_job()
    compact = json.dumps(j.to_dict(), sort_keys=True, separators=(",", ":"))
    return [j.to_json().encode(), compact.encode()]


def _job_run(data: bytes) -> None:
    job = Job.from_json(data)
    _ = job.image_bytes_max
    if Job.from_json(job.to_json()) != job:
        raise Violation("job JSON round trip changed it")


def _job_cpio_seeds() -> list[bytes]:
    return [_sample_job().to_cpio(mtime=1764095000)]


def _job_cpio_run(data: bytes) -> None:
    job = job_from_cpio(data)
    if job_from_cpio(job.to_cpio()) != job:
        raise Violation("job cpio round trip changed it")


def _cpio_seeds() -> list[bytes]:
    a = cpio.write(
        [
            cpio.Entry.directory("dev"),
            cpio.Entry.chardev("dev/console", 5, 1),
            cpio.Entry.symlink("bin/sh", "busybox"),
            cpio.Entry.file("init", b"#!/bin/sh\nexec /bin/sh\n", 0o755),
        ]
    )
    return [a, a + bytes(512) + _sample_job().to_cpio(mtime=0)]


def _cpio_run(data: bytes) -> None:
    entries = cpio.read_concatenated(data)
    cpio.regular_files(entries)
    for e in entries:
        stat.S_ISREG(e.mode)


# ----------------------------------------------------------- filesystem stamps

#: compact form: the first 8 KiB of the device, the 4 KiB at 64 KiB (btrfs), then the rest
_FS_LOW, _FS_BTRFS = 8 << 10, 64 << 10


def _fs_expand(data: bytes) -> bytes:
    low, btr, rest = data[:_FS_LOW], data[_FS_LOW : _FS_LOW + 4096], data[_FS_LOW + 4096 :]
    img = bytearray(_FS_BTRFS + 4096 + len(rest))
    img[: len(low)] = low
    img[_FS_BTRFS : _FS_BTRFS + len(btr)] = btr
    img[_FS_BTRFS + 4096 :] = rest
    return bytes(img)


def _fs_seeds() -> list[bytes]:
    uid = bytes(range(16))
    ext = bytearray(_FS_LOW)
    sb = 1024
    struct.pack_into("<I", ext, sb + 0x0C, 1234)
    struct.pack_into("<II", ext, sb + 0x2C, 1764095000, 1764095001)
    struct.pack_into("<HHHH", ext, sb + 0x34, 3, 0xFFFF, 0xEF53, 1)
    struct.pack_into("<II", ext, sb + 0x5C, 0x4, 0x2C2)
    ext[sb + 0x68 : sb + 0x78] = uid
    # xfs: 512-byte blocks, an internal log of 8 blocks at block 4 whose cycle drops at 5
    xfs = bytearray(_FS_LOW)
    xfs[0:4] = b"XFSB"
    struct.pack_into(">I", xfs, 4, 512)
    xfs[32:48] = uid
    struct.pack_into(">Q", xfs, 48, 4)
    struct.pack_into(">I", xfs, 84, 1 << 12)
    struct.pack_into(">I", xfs, 96, 8)
    struct.pack_into(">H", xfs, 100, 0xB4A5)
    xfs[124] = 12
    struct.pack_into(">Q", xfs, 240, 77)
    for i in range(8):
        off = 4 * 512 + i * 512
        c = 5 if i < 5 else 4
        struct.pack_into(">II", xfs, off, 0xFEEDBABE, c) if i % 4 == 0 else struct.pack_into(
            ">I", xfs, off, c
        )
    btrfs = bytearray(_FS_LOW + 4096)
    btrfs[_FS_LOW + 32 : _FS_LOW + 48] = uid
    btrfs[_FS_LOW + 64 : _FS_LOW + 72] = b"_BHRfS_M"
    struct.pack_into("<QQQQ", btrfs, _FS_LOW + 72, 99, 4096, 8192, 0)
    fat16 = bytearray(1024)
    struct.pack_into("<HBHBHHBH", fat16, 11, 512, 4, 1, 2, 512, 32768, 0xF8, 1)
    fat16[0x25] = 1
    struct.pack_into("<I", fat16, 0x27, 0xABCD1234)
    fat16[0x36:0x3E] = b"FAT16   "
    fat16[510:512] = b"\x55\xaa"
    fat16[512:516] = b"\xf8\xff\xff\xff"
    fat32 = bytearray(2048)
    struct.pack_into("<HBHBHHBH", fat32, 11, 512, 1, 2, 1, 0, 0, 0xF8, 0)
    struct.pack_into("<I", fat32, 36, 1)
    struct.pack_into("<H", fat32, 48, 1)
    fat32[0x41] = 0
    struct.pack_into("<I", fat32, 0x43, 0x1234ABCD)
    fat32[0x52:0x5A] = b"FAT32   "
    fat32[510:512] = b"\x55\xaa"
    fat32[512:516], fat32[512 + 484 : 512 + 488] = b"RRaA", b"rrAa"
    struct.pack_into("<II", fat32, 512 + 488, 100, 3)
    return [bytes(x) for x in (ext[:2048], xfs, btrfs, fat16, fat32)]


def _fs_run(data: bytes) -> None:
    path = _file("fs-device", _fs_expand(data))
    s = read_stamp(path)
    json.dumps(s.to_dict())


# ----------------------------------------------------- config files (A and R)


def _sysroot_with(files: dict[str, bytes]) -> Sysroot:
    root = _scratch() / "sysroot"
    for name, data in files.items():
        p = root / name.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return Sysroot(root)


def _config_seeds() -> list[bytes]:
    return [
        (ROOT / "contrib" / "kjumpd.toml").read_bytes(),
        b'[target]\npath = "/var/lib/kjumpd/image"\nsize = "8G"\n[hibernate]\nchunk_size = "1M"\n'
        b'[quiesce]\nunbind = [{bus = "pci", device = "0000:00:1f.3", driver = "snd"}]\n'
        b"[timeouts]\nfreeze = 30.5\n",
    ]


def _config_run(data: bytes) -> None:
    sr = _sysroot_with({daemon_config.CONFIG_PATH: data})
    cfg = daemon_config.load(sr)
    _ = cfg.sha


def _bootconfig_seeds() -> list[bytes]:
    from tests.unit.test_restorefirst import config

    return [config().to_json().encode()]


def _bootconfig_run(data: bytes) -> None:
    cfg = BootConfig.from_json(data)
    if BootConfig.from_json(cfg.to_json()) != cfg:
        raise Violation("boot.json round trip changed it")


# ------------------------------------------------------------------ zstd frame


def _zstd_seeds() -> list[bytes]:
    raw = b"hello kjumpd\n" * 4
    # single segment, 1-byte content size, a raw last block, a checksum
    one = zstdframe.MAGIC + bytes([0x24, len(raw)]) + ((len(raw) << 3) | 1).to_bytes(3, "little")
    two = zstdframe.MAGIC + bytes([0x40, 0x00]) + (300).to_bytes(2, "little")
    two += ((4 << 3) | 0).to_bytes(3, "little") + b"abcd" + ((7 << 3) | 3).to_bytes(3, "little")
    return [one + raw + b"\x01\x02\x03\x04", two + b"x"]


def _zstd_run(data: bytes) -> None:
    zstdframe.frame(data, scan=False)
    f = zstdframe.frame(data)
    if not 0 < f.length <= len(data):
        raise Violation(f"frame length {f.length} of a {len(data)}-byte blob")


# ------------------------------------------------------- /proc and /boot text


def _linux_seeds() -> list[bytes]:
    return [
        b'BOOT_IMAGE=/vmlinuz root=UUID=1 ro quiet "acpi_osi=Linux x" crashkernel=192M@512M '
        b"kjump.rf=old -- init=/bin/sh\n",
        b"22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        b"23 22 0:5 / /mnt/with\\040space rw - tmpfs tmp\\011fs rw,size=10k\n"
        b"24 22 254:2 /sub /bind ro master:2 - xfs /dev/vdb rw,attr2\n",
        b'CONFIG_KEXEC_JUMP=y\n# CONFIG_HIBERNATION is not set\nCONFIG_LOCALVERSION="-x"\n',
    ]


def _linux_run(data: bytes) -> None:
    import gzip

    sr = _sysroot_with(
        {
            "/proc/cmdline": data,
            "/proc/self/mountinfo": data,
            "/proc/config.gz": data if data[:2] == b"\x1f\x8b" else gzip.compress(data, mtime=0),
            "/proc/sys/kernel/osrelease": b"6.12.117\n",
        }
    )
    text = sr.read_text("/proc/cmdline", default="")
    words = cmdline.params(text)
    for name in list(words)[:4] + ["quiet", "kjump.rf"]:
        cmdline.value(text, name)
        cmdline.flag(text, name)
    cmdline.words(text)
    cmdline.without(text, list(words)[:2])
    for m in mountinfo.parse(sr.read_text("/proc/self/mountinfo", default="")):
        _ = m.depth
    cfg = kconfig.read(sr)
    if cfg is not None:
        cfg.enabled("KEXEC_JUMP")


# ------------------------------------------------------------ A's free pages


def _vmcoreinfo_seeds() -> list[bytes]:
    from tests.unit import test_freepages as tf

    a = tf.build()
    return [tf.note_bytes(tf.vmcoreinfo_text(a)), tf.note_bytes(tf.vmcoreinfo_text(a))[:600]]


def _vmcoreinfo_run(data: bytes) -> None:
    def read(phys: int, n: int) -> bytes:
        return data[phys : phys + n]

    info = freepages.read_vmcoreinfo(read, 0, max(13, min(len(data), freepages.VMCOREINFO_MAX)))
    freepages.page_layout(info)


@functools.cache
def _fake_a() -> object:
    from tests.unit import test_freepages as tf

    return tf.build(leaf=2 << 20)  # struct pages contiguous: the patches land on them


#: where the patches of the free-page target land: A's page tables and its struct pages
_FP_SCAN = [(0x800000, 0x900000)]


def _freepages_seeds() -> list[bytes]:
    return [b"", struct.pack("<IQ", 0, 0), struct.pack("<IQ", 0x20010, 0xF0000000)]


def _freepages_run(data: bytes) -> None:
    """``data`` is a list of (offset u32, value u64) patches into A's memory (its page tables
    and struct pages); the scan over a small range must give a map or a FreePageError."""
    from tests.unit import test_freepages as tf

    a = _fake_a()
    base: Callable[[int, int], bytes] = a.read  # type: ignore[attr-defined]
    patches: dict[int, int] = {}
    for i in range(0, len(data) - 11, 12):
        off, value = struct.unpack_from("<IQ", data, i)
        # the first half of the offsets hits the page-table pool, the rest the struct pages
        if off & 1:
            phys = tf.TABLES + (off >> 1) % (a.next_table - tf.TABLES)  # type: ignore[attr-defined]
        else:
            phys = tf.STRUCTS + 0x800 * tf.SZ + (off >> 1) % (0x100 * tf.SZ)
        patches[phys - phys % 8] = value

    def read(phys: int, n: int) -> bytes:
        got = bytearray(base(phys, n))
        for p, v in patches.items():
            if phys <= p and p + 8 <= phys + n:
                struct.pack_into("<Q", got, p - phys, v)
        return bytes(got)

    info = freepages.read_vmcoreinfo(read, tf.NOTE, 2048)
    fmap = freepages.scan(info, read, _FP_SCAN, trusted=tf.RAM, note=(tf.NOTE, 2048))
    for a0, b0 in fmap.ranges:
        if not (_FP_SCAN[0][0] <= a0 < b0 <= _FP_SCAN[0][1]):
            raise Violation(f"free range [{a0:#x}, {b0:#x}) outside the scanned memory")


# ------------------------------------------------------------------- registry

_IMAGE = (ImageError,)

TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("superblock", "format.TargetSuperblock.unpack", _sb_run, _sb_seeds, _IMAGE, _sb_fix),
        Target(
            "header",
            "format.Header.unpack, pick_header",
            _header_run,
            _header_seeds,
            _IMAGE,
            _header_fix,
        ),
        Target(
            "metadata",
            "format.Metadata.unpack, chunk_plan",
            _meta_run,
            _meta_seeds,
            _IMAGE,
            _meta_fix,
        ),
        Target(
            "chunk",
            "format.ChunkHeader.unpack, chunk.decode_chunk",
            _chunk_run,
            _chunk_seeds,
            _IMAGE,
            _chunk_fix,
            max_len=64 << 10,
        ),
        Target(
            "records",
            "stream.RecordReader (windows of 4 KiB, 12 KiB, 1 MiB agree, copied or held)",
            _records_run,
            _records_seeds,
            _IMAGE,
            _chunk_stream_fix,
            max_len=64 << 10,
        ),
        Target(
            "image",
            "kjumpctl image info + restore.restore_image (store, stream, chunk)",
            _image_run,
            _image_seeds,
            _IMAGE,
            _image_fix,
            max_len=64 << 10,
        ),
        Target("job", "job.Job.from_json", _job_run, _job_seeds, (JobError,)),
        Target("job-cpio", "job.job_from_cpio", _job_cpio_run, _job_cpio_seeds, (JobError,)),
        Target("cpio", "cpio.read_concatenated", _cpio_run, _cpio_seeds, (ImageFormatError,)),
        Target(
            "fsstamp",
            "fsstamp.read_stamp (ext, xfs, btrfs, vfat)",
            _fs_run,
            _fs_seeds,
            (FsStampError,),
            max_len=16 << 10,
        ),
        Target("config", "daemon.config.load (TOML)", _config_run, _config_seeds, (ConfigError,)),
        Target(
            "bootconfig",
            "bootconfig.BootConfig.from_json",
            _bootconfig_run,
            _bootconfig_seeds,
            (ConfigError,),
        ),
        Target("zstdframe", "zstdframe.frame", _zstd_run, _zstd_seeds, (ImageFormatError,)),
        Target("linux", "linux.cmdline, mountinfo, kconfig via Sysroot", _linux_run, _linux_seeds),
        Target(
            "vmcoreinfo",
            "agent.freepages.read_vmcoreinfo",
            _vmcoreinfo_run,
            _vmcoreinfo_seeds,
            (freepages.FreePageError,),
        ),
        Target(
            "freepages",
            "agent.freepages.scan over patched page tables and struct pages",
            _freepages_run,
            _freepages_seeds,
            (freepages.FreePageError,),
            max_len=1200,
        ),
    ]
}
