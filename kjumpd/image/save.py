"""Streaming save: memory source -> zero-page elision -> lz4 on a thread pool -> block-mapped
writer -> verify (every written window re-read from the device and compared byte for byte) ->
flush -> SAVED header, written last after a flush.
(The record-level check, with decompression, is restore_image(verify_only=True).)

Threads: each worker claims the next chunk of the plan and encodes it, in place when the
source lends a view of memory that cannot change (the save kernel's mapping of the stopped
main kernel), else read into its own reused buffer; the caller's thread is the writer,
taking encoded chunks *in order* and packing them into aligned windows; a verifier thread
reads each window back as soon as its write returned, so the verify pass overlaps the save
instead of following it (SAVED still waits for its last window). Workers stay at most a few
chunks ahead of the writer, so memory use does not depend on the size of the input.
On a cancel or an error the header becomes ABORTED(reason) and a KjumpError is raised.

Standard library + lz4 only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from kjumpd.errors import CancelledError, ImageCorruptError, ImageError, KjumpError, TargetError
from kjumpd.image import store
from kjumpd.image.chunk import COMPRESSIONS, EncodedChunk, encode_chunk, zero_chunk
from kjumpd.image.device import ImageDevice
from kjumpd.image.format import (
    AUTH_SIZE,
    FLAG_ENCRYPTED,
    FLAG_VERIFIED,
    FLAG_ZERO_ELISION,
    METADATA_OFFSET,
    ChunkPlan,
    Header,
    ImageState,
    MemoryExtent,
    Metadata,
    chunk_plan,
    crc32,
    data_offset_for,
    image_tag,
    validate_extents,
)
from kjumpd.image.stream import ReadBackVerifier, RecordWriter

log = logging.getLogger(__name__)

#: the chunk size with the least CPU per byte within the RSS bound: smaller chunks cost more
#: CPU (in the kernel), larger ones save none and raise the peak RSS past the 64 MiB bound.
#: Chunks above 1 MiB are accepted but the RSS bound is only kept up to 1 MiB.
DEFAULT_CHUNK_SIZE = 1024 * 1024

Progress = Callable[[int, int, float, float], None]


class MemorySource(Protocol):
    """``read(phys, length)``; optionally ``readinto(phys, buf)`` (preferred: no new memory
    per chunk) and ``known_zero(phys, length) -> bool`` (True: the range is zero by the
    source's own account, e.g. free pages of the main kernel, and is not read at all), and
    ``restore_zeros`` (default True; False: such ranges are free memory whose contents nobody
    looks at, stored as free records that a restore leaves as it finds them), and
    ``concurrent_reads`` (default False; True: ``readinto`` may run in several workers at
    once, so their copies overlap; otherwise the workers read one at a time), and
    ``view(phys, length) -> memoryview | None`` (a view of memory that stays unchanged while
    referenced, encoded in place instead of copied first; None: read it)."""

    def read(self, phys: int, length: int) -> bytes | bytearray | memoryview: ...


@dataclass
class SaveStats:
    raw_bytes: int
    zero_pages: int
    stored_bytes: int
    chunk_count: int
    data_length: int
    seconds: float
    verify_seconds: float
    header: Header
    #: where the time went: read (wall, reading the source), encode_cpu (CPU seconds of the
    #: workers, all together), write (wall, device writes), readback (wall, the verifier),
    #: waiting (wall, the writer waiting for the next chunk to be encoded)
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.raw_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: memory budget for chunks in flight (raw + encoded), independent of the input size
INFLIGHT_BUDGET = 24 * 1024 * 1024


def inflight_chunks(workers: int, chunk_size: int) -> int:
    """How many chunks may be queued: enough to keep every worker busy, within the budget."""
    return max(2, min(2 * workers + 2, INFLIGHT_BUDGET // (2 * chunk_size)))


def normalize_ranges(ranges: Iterable[Any]) -> tuple[MemoryExtent, ...]:
    """MemoryExtent or (start, end) pairs (end exclusive) -> sorted, checked MemoryExtents."""
    out = []
    for r in ranges:
        if isinstance(r, MemoryExtent):
            out.append(r)
        else:
            start, end = r
            if end <= start:
                raise ImageError(
                    f"memory range {start:#x}-{end:#x} is empty",
                    fix="give START-END with END > START (END exclusive)",
                )
            out.append(MemoryExtent(int(start), int(end) - int(start)))
    out.sort(key=lambda e: e.start)
    if not out:
        raise ImageError("no memory ranges to save", fix="give at least one START-END range")
    try:
        validate_extents(out)
    except ImageError as e:
        raise ImageError(
            "memory ranges are not valid", why=e.why, fix="give ranges that do not overlap"
        ) from None
    return tuple(out)


class _Cancel:
    def __init__(self, cancel: Any) -> None:
        self.cancel = cancel

    def __call__(self) -> bool:
        if self.cancel is None:
            return False
        if hasattr(self.cancel, "is_set"):
            return bool(self.cancel.is_set())
        return bool(self.cancel())


class _Meter:
    """Calls progress(done, total, MB/s, ETA s) at most every ``interval`` seconds."""

    def __init__(self, progress: Progress | None, total: int, interval: float = 0.25) -> None:
        self.progress = progress
        self.total = total
        self.t0 = time.monotonic()
        self.last = 0.0
        self.interval = interval

    def __call__(self, done: int, final: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        rate = done / dt
        eta = (self.total - done) / rate if rate > 0 else 0.0
        self.progress(done, self.total, rate / 1e6, eta)


#: what _Encoders.zero_at holds for a plan position
_UNASKED, _ZERO, _DATA = 0, 1, 2


class _Encoders:
    """Worker threads that each claim the next chunk of the plan, take a view of it from
    the source or read it into their own reused buffer, and encode it; results are handed
    to the writer (the caller's thread) in plan order. A raw record keeps its view, or its
    worker's buffer (the worker goes on with a spare one), until the writer has its bytes:
    no copy before the writer's. At most ``depth`` chunks are claimed and not yet taken by
    the writer, so the memory in use does not depend on the size of the input. Reads from
    the source are serialised unless it takes concurrent ones (``concurrent_reads``).

    A chunk the source knows is zero (free memory, most of an idle machine) has nothing to
    read or encode: the writer makes its record itself and the workers pass over it. Handing
    each such chunk to a worker and back costs a thread switch both ways, about a quarter
    of a millisecond a chunk under emulation. Encrypted records are sealed on a worker, so
    there every chunk goes through the workers.
    """

    def __init__(
        self,
        source: Any,
        plan: ChunkPlan,
        workers: int,
        depth: int,
        chunk_size: int,
        compression: str,
        tag: int,
        cipher: Any = None,
    ) -> None:
        self.source, self.plan, self.depth = source, plan, depth
        self.cipher = cipher  # seal.ImageCipher: records are encrypted
        self.compression, self.tag, self.chunk_size = compression, tag, chunk_size
        self.readinto = getattr(source, "readinto", None)
        self.view = getattr(source, "view", None)
        self.known_zero = getattr(source, "known_zero", None)
        # a source whose known-zero ranges are free memory that need not come back as zeros
        self.free_records = not getattr(source, "restore_zeros", True)
        # the source's answer for each plan position, asked once (sources count what they
        # skip): _UNASKED until asked, then _ZERO or _DATA; a byte a chunk, as the plan
        self.zero_at = bytearray(len(plan))
        self.writer_makes_zero = self.known_zero is not None and cipher is None
        self.cond = threading.Condition()
        self.read_lock = threading.Lock()
        # the lock each read is taken under: the source's own counters need one caller at
        # a time, unless it says otherwise
        self.copy_lock: AbstractContextManager[object] = (
            nullcontext()
            if self.readinto is not None and getattr(source, "concurrent_reads", False)
            else self.read_lock
        )
        self.results: dict[int, EncodedChunk | BaseException] = {}
        self.claimed = 0  # next plan position to hand out
        # chunks claimed by a worker and not yet taken by the writer (the memory in use)
        self.in_flight = 0
        self.stopped = False
        self.read_seconds = 0.0  # wall time in source reads, all workers
        # read buffers lent to raw records (no copy of incompressible memory) come back
        # here once the writer has them in its window; a worker takes one before a new one
        self.spare: list[bytearray] = []
        self.threads = [
            threading.Thread(target=self._work, name=f"kjump-lz4-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for t in self.threads:
            t.join()

    def _work(self) -> None:
        buf = bytearray(self.chunk_size) if self.readinto is not None else None
        while True:
            with self.cond:
                while (
                    not self.stopped
                    and self.claimed < len(self.plan)
                    and self.in_flight >= self.depth
                ):
                    self.cond.wait()
                if self.stopped or self.claimed >= len(self.plan):
                    return
                pos = self.claimed
                self.claimed += 1
                self.in_flight += 1
            item: EncodedChunk | BaseException
            try:
                if self.writer_makes_zero and self._is_zero(pos):
                    # the writer makes this record; this worker claims the next at once,
                    # so no other needs waking for the place it gives back
                    with self.cond:
                        self.in_flight -= 1
                    continue
                encoded = self._encode(pos, buf)
                if self.cipher is not None:
                    encoded = self.cipher.seal_chunk(encoded)
            except BaseException as e:  # noqa: B902 - raised by the writer, in plan order
                item = e
            else:
                item = encoded
                if encoded.lent is not None:
                    buf = self._spare_buffer()
            with self.cond:
                self.results[pos] = item
                self.cond.notify_all()

    def _spare_buffer(self) -> bytearray:
        with self.cond:
            if self.spare:
                return self.spare.pop()
        return bytearray(self.chunk_size)

    def give_back(self, item: EncodedChunk) -> None:
        """The writer has ``item``'s bytes: a read buffer it held may be filled again."""
        if item.lent is not None:
            with self.cond:
                self.spare.append(item.lent)
            item.lent = None

    def _is_zero(self, pos: int) -> bool:
        """Whether the source knows plan position ``pos`` is all zero (asked at most once)."""
        answer = self.zero_at[pos]
        if answer == _UNASKED:
            with self.read_lock:  # sources keep counters: one caller at a time
                answer = self.zero_at[pos]
                if answer == _UNASKED:
                    _index, phys, n = self.plan[pos]
                    zero = bool(self.known_zero(phys, n))  # type: ignore[misc]
                    answer = self.zero_at[pos] = _ZERO if zero else _DATA
        return answer == _ZERO

    def _zero_record(self, pos: int) -> EncodedChunk:
        # zero by the source's account (free: left as found on restore)
        index, phys, n = self.plan[pos]
        return zero_chunk(index, phys, n, self.tag, free=self.free_records)

    def _encode(self, pos: int, buf: bytearray | None) -> EncodedChunk:
        index, phys, n = self.plan[pos]
        if self.known_zero is not None and self._is_zero(pos):
            return self._zero_record(pos)
        data: Any
        with self.copy_lock:
            t0 = time.monotonic()
            # a view of memory that stays as it is (A's, frozen) is encoded in place, and a
            # raw record keeps it instead of a copy
            data = self.view(phys, n) if self.view is not None else None
            borrowed = data is not None
            if not borrowed:
                if buf is not None:
                    with memoryview(buf) as whole:
                        self.readinto(phys, whole[:n])  # type: ignore[misc]
                    data = buf
                else:
                    data = self.source.read(phys, n)
            took = time.monotonic() - t0
        with self.cond:
            self.read_seconds += took
        if data is not buf and len(data) != n:
            raise ImageError(
                f"memory source returned {len(data)} bytes at {phys:#x}, expected {n}",
                why="the range lies beyond the end of the memory",
                fix="check the ranges",
                phys=phys,
            )
        # encrypted records are new bytes: nothing to lend
        lend = data is buf and self.cipher is None
        return encode_chunk(
            index, phys, data, self.compression, self.tag, length=n, lend=lend, borrowed=borrowed
        )

    def take(self, pos: int, timeout: float) -> EncodedChunk | BaseException | None:
        """The result for plan position ``pos`` (None on timeout); lets workers go on."""
        if self.writer_makes_zero and self._is_zero(pos):
            return self._zero_record(pos)
        with self.cond:
            if pos not in self.results:
                self.cond.wait(timeout)
                if pos not in self.results:
                    return None
            self.in_flight -= 1
            self.cond.notify_all()
            return self.results.pop(pos)


def save_image(
    source: MemorySource,
    ranges: Iterable[Any],
    dev: ImageDevice,
    *,
    identity: dict[str, Any],
    mode: str,
    chunk_size: int | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    cancel: Any = None,
    compression: str = "lz4",
    verify: bool = True,
    key: bytes | None = None,
) -> SaveStats:
    """Save ``ranges`` of ``source`` into the target ``dev``; SAVED is written last.

    With ``key`` (an image key, kjumpd.image.seal) every record is encrypted and the header
    and metadata are authenticated; ``identity`` should then hold the key's ``seal``."""
    extents = normalize_ranges(ranges)
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    workers = workers or default_workers()
    if compression not in COMPRESSIONS:
        raise ImageError(
            f"compression {compression!r} is not supported",
            fix=f"use one of {', '.join(COMPRESSIONS)}",
        )
    plan = chunk_plan(extents, chunk_size)  # validates chunk_size
    sb = store.read_superblock(dev)
    meta = Metadata(extents=extents, identity=identity)
    meta_raw = meta.pack()
    data_off = data_offset_for(len(meta_raw))
    if data_off >= dev.size:
        raise TargetError(
            "the target is too small for the image metadata",
            fix="make the target larger",
            path=dev.path,
        )
    first = _writing_header(sb.uuid, identity, mode, chunk_size, compression, meta_raw, data_off)
    cipher = None
    if key is not None:
        from kjumpd.image.seal import ImageCipher

        first = first.evolve(flags=first.flags | FLAG_ENCRYPTED, auth=bytes(AUTH_SIZE))
        cipher = ImageCipher.for_header(key, first)
        first = first.evolve(auth=cipher.header_mac(first, meta_raw))
    header = store.write_header(dev, first)
    tag = image_tag(header.uuid, header.created)
    is_cancelled = _Cancel(cancel)
    total = meta.raw_bytes
    meter = _Meter(progress, total)
    t0 = time.monotonic()
    verifier = ReadBackVerifier(dev) if verify else None
    rw = RecordWriter(dev, data_off, verifier=verifier)
    depth = inflight_chunks(workers, chunk_size)
    encoders = _Encoders(source, plan, workers, depth, chunk_size, compression, tag, cipher)
    readback_s = 0.0
    try:
        if verifier is not None:
            verifier.start()
        dev.write(METADATA_OFFSET, meta_raw)
        written = _write_records(encoders, len(plan), rw, is_cancelled, meter)
        data_len = rw.finish()
        dev.flush()
        seconds_write = time.monotonic() - t0
        meter(total, final=True)
        tv = time.monotonic()
        if verifier is not None:
            # every window was read back (O_DIRECT: from the device) as soon as it was
            # written; this waits for the last ones and raises the first mismatch
            v, verifier = verifier, None
            v.finish()
            readback_s = v.busy_seconds
        verify_seconds = time.monotonic() - tv
        saved = store.write_header(  # flushes: SAVED is the last write
            dev, _saved_header(header, written, data_len, total, verify)
        )
    except KjumpError as e:
        _abort(dev, e.what if isinstance(e, CancelledError) or not e.why else f"{e.what}: {e.why}")
        raise
    except OSError as e:
        _abort(dev, f"I/O error: {e.strerror or e}")
        raise ImageError("save failed", why=e.strerror or str(e), fix="check the disk") from None
    except BaseException as e:
        # a bug or an interrupt: the image must not stay WRITING
        _abort(dev, f"save interrupted: {type(e).__name__}")
        raise
    finally:
        if verifier is not None:
            verifier.abandon()
        rw.close()
    stats = SaveStats(
        raw_bytes=total,
        zero_pages=written.zero_pages,
        stored_bytes=written.stored,
        chunk_count=len(written.crcs),
        data_length=data_len,
        seconds=seconds_write + verify_seconds,
        verify_seconds=verify_seconds,
        header=saved,
        stages={
            "read": encoders.read_seconds,
            "encode_cpu": written.encode_cpu,
            "write": rw.write_seconds,
            "readback": readback_s,
            "waiting": written.waiting,
        },
    )
    _log_stats(stats, workers)
    return stats


@dataclass
class _Written:
    """What the writer put into the data area, and the time it spent waiting for chunks."""

    #: each record's CRC, 4 bytes a chunk (the data CRC is taken over them at the end)
    crcs: array[int] = field(default_factory=lambda: array("I"))
    zero_pages: int = 0
    stored: int = 0
    raw: int = 0
    encode_cpu: float = 0.0
    waiting: float = 0.0

    def add(self, item: EncodedChunk) -> None:
        self.crcs.append(item.crc)
        self.zero_pages += item.zero_pages
        self.stored += item.record_length
        self.raw += item.raw_length
        self.encode_cpu += item.cpu


def _write_records(
    encoders: _Encoders,
    count: int,
    rw: RecordWriter,
    is_cancelled: _Cancel,
    meter: _Meter,
) -> _Written:
    """The writer: the ``count`` records of the plan, in order, each appended to ``rw`` as
    soon as it is encoded. The encoders run only while it does; a cancel stops it between
    records."""
    written = _Written()
    encoders.start()
    try:
        for pos in range(count):
            ts = time.monotonic()
            item = _next_encoded(encoders, pos, is_cancelled, meter, written.raw)
            written.waiting += time.monotonic() - ts
            if is_cancelled():
                raise _cancelled()
            rw.append(item.head)
            rw.append(item.payload)
            encoders.give_back(item)
            written.add(item)
            meter(written.raw)
    finally:
        encoders.stop()
    return written


def _next_encoded(
    encoders: _Encoders, pos: int, is_cancelled: _Cancel, meter: _Meter, raw_done: int
) -> EncodedChunk:
    """The encoded chunk at plan position ``pos`` (its worker's error raised here, in plan
    order); while it is not ready, a cancel is noticed and the progress keeps going."""
    while True:
        item = encoders.take(pos, 0.1)
        if item is not None:
            break
        if is_cancelled():
            raise _cancelled()
        meter(raw_done)
    if isinstance(item, BaseException):
        raise item
    return item


def _saved_header(
    header: Header, written: _Written, data_len: int, total: int, verify: bool
) -> Header:
    """The header that makes the image restorable: SAVED, with what the data area holds."""
    crcs = written.crcs
    if sys.byteorder != "little":  # the data CRC is over the u32 CRCs, little-endian
        crcs = array("I", crcs)
        crcs.byteswap()
    return header.evolve(
        state=ImageState.SAVED,
        saved=time.time(),
        updated=time.time(),
        data_length=data_len,
        raw_bytes=total,
        zero_pages=written.zero_pages,
        stored_bytes=written.stored,
        chunk_count=len(crcs),
        data_crc=crc32(crcs),
        flags=header.flags | (FLAG_VERIFIED if verify else 0),
    )


def _writing_header(
    uuid: bytes,
    identity: dict[str, Any],
    mode: str,
    chunk_size: int,
    compression: str,
    meta_raw: bytes,
    data_off: int,
) -> Header:
    """The header written first (WRITING): what the image will be, before any of it."""
    now = time.time()
    ja = identity.get("jump_area") or (0, 0)
    return Header(
        state=ImageState.WRITING,
        uuid=uuid,
        created=now,
        updated=now,
        jump_area_start=int(ja[0]),
        jump_area_size=int(ja[1]),
        jump_back_entry=int(identity.get("jump_back_entry") or 0),
        flags=FLAG_ZERO_ELISION,
        chunk_size=chunk_size,
        metadata_offset=METADATA_OFFSET,
        metadata_length=len(meta_raw),
        metadata_crc=crc32(meta_raw),
        data_offset=data_off,
        mode=mode,
        compression=compression,
        main_kernel=str(identity.get("main_kernel") or ""),
        save_kernel_hash=str(identity.get("save_kernel_hash") or ""),
    )


def _cancelled() -> CancelledError:
    return CancelledError(
        "save cancelled", why="cancel requested", fix="nothing was lost; the system keeps running"
    )


def _log_stats(stats: SaveStats, workers: int) -> None:
    st = stats.stages
    log.info(
        "saved %d bytes in %d chunks (%d zero pages) as %d bytes in %.2fs (verify %.2fs)",
        stats.raw_bytes,
        stats.chunk_count,
        stats.zero_pages,
        stats.stored_bytes,
        stats.seconds,
        stats.verify_seconds,
    )
    log.info(
        "save stages: read %.2fs, encode %.2fs CPU on %d worker(s), write %.2fs, "
        "read-back %.2fs (overlapped), writer waiting for chunks %.2fs",
        st["read"],
        st["encode_cpu"],
        workers,
        st["write"],
        st["readback"],
        st["waiting"],
    )


def _abort(dev: ImageDevice, reason: str) -> None:
    try:
        store.set_state(dev, ImageState.ABORTED, reason=reason[:500])
    except KjumpError as e:
        log.error("could not mark the image ABORTED: %s", e.message)


def _check_place(ch: Any, expect: tuple[int, int, int] | None, off: int, tag: int) -> None:
    if ch.tag != tag:
        raise ImageCorruptError(
            f"chunk record at byte offset {off} belongs to another image",
            why=f"its image tag is {ch.tag:#010x}, this image's is "
            f"{tag:#010x} (a write of this image never reached the "
            "disk)",
            fix="the image cannot be used; boot normally and hibernate again",
            structure="chunk",
            offset=off,
        )
    if expect is None or (ch.index, ch.phys, ch.raw_length) != expect:
        want = (
            "no more chunks"
            if expect is None
            else f"chunk {expect[0]} at {expect[1]:#x}+{expect[2]}"
        )
        raise ImageCorruptError(
            f"chunk record at byte offset {off} is out of place",
            why=f"found chunk {ch.index} at {ch.phys:#x}+{ch.raw_length}, expected {want}",
            fix="the image cannot be used; boot normally and hibernate again",
            structure="chunk",
            offset=off,
        )
