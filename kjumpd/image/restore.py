"""Streaming restore: read records through the block map, check each one, decode it on a
thread pool, hand its bytes to a sink at their physical offset (zero pages as zeros).

Before any byte reaches the sink the header (state, version, compression), the metadata and
the data-area bounds are checked. Each chunk is checked (record CRC, payload CRC, place in
the plan, lz4 length) before it is written; chunks are written in order, so nothing past a
bad chunk is ever written. ``divert`` ranges are never written to the sink: their bytes go
to ``on_divert`` instead (the save kernel keeps A's pages that lie in its own low memory
for the jump-back kexec_load).

Writing: the worker that decoded a chunk also writes it (a turnstile: chunk i is written
only once chunks 0..i-1 passed their checks, and never once an earlier chunk failed), so the
reader thread only parses records. A sink with ``concurrent_writes`` (the /dev/mem sink) is
written by several workers at once; any other sink one chunk at a time, in chunk order.
A sink that can ``place`` a chunk (the /dev/mem sink: a view of A's memory) has it decoded
straight into place, without a buffer and a copy, once the record's checksum and those of
the records before it passed: such a sink is A's memory, which a failed restore abandons
whole, so a payload that then fails to decode (only an encoder fault gets past the
checksum) may leave its own range half written.
All-zero chunks go to ``sink.zero`` when the sink has it (a memset into the target, no zero
buffer read), else ``sink.write`` of zeros. Free chunks (format.ENC_FREE: free in the main
kernel, which never looks at a free page's contents) are checked and not written at all: the
memory is left as it is found. They are checked on the thread that reads the records, as they
arrive: a hand-off to a worker and back costs more than that check, and on a lightly used
machine most chunks are free.

Standard library + lz4 only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import logging
import mmap
import queue
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from kjumpd.errors import ImageCorruptError, ImageError, ImageFormatError, ImageKeyError
from kjumpd.image import store
from kjumpd.image.chunk import COMPRESSIONS, check_chunk, decode_into, zeros
from kjumpd.image.device import ImageDevice, close_buffer
from kjumpd.image.format import (
    EMPTY_ENCODINGS,
    ENC_FREE,
    ChunkHeader,
    Header,
    ImageState,
    Metadata,
    chunk_count,
    chunk_plan,
    crc32,
    image_tag,
)
from kjumpd.image.save import Progress, _check_place, _Meter, default_workers, inflight_chunks
from kjumpd.image.stream import RecordReader

log = logging.getLogger(__name__)

RESTORABLE = (ImageState.SAVED, ImageState.RESTORING)


class MemorySink(Protocol):
    def write(self, phys: int, data: bytes | memoryview) -> None: ...


@dataclass
class RestoreStats:
    raw_bytes: int = 0
    zero_pages: int = 0
    chunk_count: int = 0
    seconds: float = 0.0
    diverted_bytes: int = 0
    diverted: list[tuple[int, bytes]] = field(default_factory=list)
    header: Header | None = None
    metadata: Metadata | None = None
    #: where the time went: records (wall, the caller waiting for the next record to be read
    #: and parsed), decode_cpu (CPU seconds of the workers: CRC, lz4, copies), waiting (wall,
    #: waiting for a decode and its write), write (wall, handing bytes to the sink, summed over
    #: the workers), write_cpu (CPU seconds of those writes), turn (wall, decoded chunks
    #: waiting for their turn to be written)
    stages: dict[str, float] = field(default_factory=dict)


def check_image(
    dev: ImageDevice,
    states: Iterable[ImageState] = RESTORABLE,
    action: str = "restore",
    key: bytes | None = None,
) -> tuple[Header, Metadata]:
    """Header + metadata of a restorable image, or a clear error naming what is wrong.
    An encrypted image needs its image ``key``: its header and metadata are authenticated
    here."""
    header = store.read_header(dev)
    store.require_state(header, *states, action=action)
    if header.encrypted and key is None:
        raise ImageKeyError(
            f"the image is encrypted; cannot {action} it without its key",
            why="the image key is sealed to the machine's image key",
            fix="restore through the restore-first boot entry, which asks for the passphrase",
        )
    if header.compression not in COMPRESSIONS:
        raise ImageFormatError(
            f"image compression {header.compression!r} is not supported",
            fix="restore with the kjumpd release that saved it",
            structure="header",
            offset=0,
        )
    meta = store.read_metadata(dev, header)
    if header.encrypted and key is not None:
        cipher(key, header).check_header(
            header, dev.read(header.metadata_offset, header.metadata_length)
        )
    want = chunk_count(meta.extents, header.chunk_size) if header.chunk_size else -1
    if (
        header.chunk_count != want
        or header.raw_bytes != meta.raw_bytes
        or header.data_offset < header.metadata_offset + header.metadata_length
        or header.data_offset + header.data_length > dev.size
    ):
        raise ImageFormatError(
            "image header does not agree with its metadata or the target",
            why=f"{header.chunk_count} chunks for {want} planned, data "
            f"[{header.data_offset}, +{header.data_length}) in a "
            f"{dev.size}-byte target",
            fix="the image cannot be used; boot normally and hibernate again",
            structure="header",
            offset=0,
        )
    return header, meta


def cipher(key: bytes, header: Header) -> Any:
    """The image's seal.ImageCipher (imported only for an encrypted image)."""
    from kjumpd.image.seal import ImageCipher

    return ImageCipher.for_header(key, header)


class _Skipped(ImageError):
    """A decoded chunk that was not written because an earlier one failed (never surfaces:
    the earlier chunk's error is raised first)."""


class _Turns:
    """When chunk i may write: serially, once chunks 0..i-1 were written; overlapped, once
    chunks 0..i were checked (their writes may still be going on). Nobody after a failed
    chunk (check or write) ever starts writing."""

    def __init__(self, overlap: bool = False) -> None:
        self.cv = threading.Condition()
        self.overlap = overlap
        self.next = 0  # serial: first chunk not written; overlap: not checked
        # overlap: checked chunks past ``next``; serial: chunks past ``next`` with nothing to
        # write, counted as written when ``next`` reaches them
        self.checked: set[int] = set()
        self.failed_at: int | None = None

    def check_passed(self, seq: int) -> None:
        if not self.overlap:
            return
        with self.cv:
            self.checked.add(seq)
            self._advance()

    def wait(self, seq: int) -> bool:
        """Block until ``seq`` may write (True) or an earlier chunk failed (False)."""

        def ready() -> bool:
            return self.next > seq if self.overlap else self.next == seq

        with self.cv:
            while not ready() and (self.failed_at is None or self.failed_at > seq):
                self.cv.wait()
            return self.failed_at is None or self.failed_at > seq

    def done(self, seq: int) -> None:
        if self.overlap:
            return
        with self.cv:
            self.next = seq + 1
            self._advance()

    def _advance(self) -> None:
        """Move ``next`` past the chunks already counted in ``checked`` (lock held)."""
        while self.next in self.checked:
            self.checked.discard(self.next)
            self.next += 1
        self.cv.notify_all()

    def nothing_to_write(self, seq: int) -> None:
        """``seq`` passed its checks and writes nothing: it counts as checked (overlapped)
        and, serially, as written once its turn comes."""
        with self.cv:
            self.checked.add(seq)
            self._advance()

    def fail(self, seq: int) -> None:
        with self.cv:
            if self.failed_at is None or seq < self.failed_at:
                self.failed_at = seq
            self.cv.notify_all()


#: writes a checked chunk (phys, decoded bytes or None for an all-zero chunk, length) on a
#: worker thread, in chunk order
Deliver = Callable[[int, "memoryview | None", int], None]

#: decodes a checked chunk straight into the sink: (phys, length, fill) calls fill(view of
#: the destination) and returns True, or returns False (the chunk is then decoded and
#: delivered as usual)
Place = Callable[[int, int, Callable[[memoryview], None]], bool]

#: one record of the data area, as RecordReader.held_records yields it: (header, bitmap,
#: payload, offset, the function that gives the payload's window back)
_Record = tuple[ChunkHeader, bytes, bytes | memoryview, int, Callable[[], None]]

#: the stage clocks iter_image keeps (see RestoreStats.stages; free_left counts bytes)
_STAGES = (
    "records",
    "decode_cpu",
    "waiting",
    "write",
    "write_cpu",
    "turn",
    "free_left",
    "placed",
)


def iter_image(
    dev: ImageDevice,
    header: Header,
    meta: Metadata,
    *,
    workers: int | None = None,
    stages: dict[str, float] | None = None,
    deliver: Deliver | None = None,
    overlap: bool = False,
    key: bytes | None = None,
    place: Place | None = None,
) -> Iterator[tuple[int, int, memoryview | None]]:
    """(phys, length, bytes) of every chunk, in order, each checked before it is yielded.

    The bytes are a view of a reused, page-aligned buffer (chunks are decoded into a small
    ring of them on the worker threads): it is valid until the next item is requested.
    With ``deliver``, each chunk is also handed to it on the worker that decoded it, in chunk
    order (``overlap``: once every earlier chunk passed its checks, so deliveries may run at
    the same time), before it is yielded; a chunk after a bad one is neither delivered nor
    yielded. With ``place`` too (and ``overlap``), a stored chunk is decoded straight into the
    sink when place accepts it, and yielded with None for its bytes.
    """
    workers = workers or default_workers()
    depth = inflight_chunks(workers, header.chunk_size)
    clocks = stages if stages is not None else {}
    for stage in _STAGES:
        clocks.setdefault(stage, 0.0)
    if header.encrypted and key is None:
        raise ImageKeyError("the image is encrypted; its records cannot be read without its key")
    # the consumer's record and every one in flight hold a view of their window
    reader = RecordReader(dev, header.data_offset, header.data_length, held=depth + 1)
    # one buffer per chunk in flight, plus the one the consumer is looking at
    ring = _Ring(depth + 1, header.chunk_size)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kjump-unlz4") as pool:
            opener = cipher(key, header).open if header.encrypted and key is not None else None
            flight = _InFlight(
                pool,
                ring,
                _Turns(overlap),
                deliver,
                clocks,
                opener,
                place=place if deliver is not None and overlap else None,
            )
            try:
                records = _placed_records(reader, header, meta, clocks)
                yield from _decode_in_order(records, flight, depth, header)
            finally:
                flight.stop()
    finally:
        reader.close()
        ring.close()


def _placed_records(
    reader: RecordReader, header: Header, meta: Metadata, clocks: dict[str, float]
) -> Iterator[_Record]:
    """The data area's records, each checked to be this image's next chunk of the plan
    (ImageCorruptError otherwise); the time spent reading them goes to ``records``."""
    plan = iter(chunk_plan(meta.extents, header.chunk_size))
    tag = image_tag(header.uuid, header.created)
    records = reader.held_records()
    while True:
        tr = time.monotonic()
        try:
            record = next(records)
        except StopIteration:
            return
        clocks["records"] += time.monotonic() - tr
        try:
            _check_place(record[0], next(plan, None), record[3], tag)
        except ImageError:
            record[4]()
            raise
        yield record


def _decode_in_order(
    records: Iterator[_Record], flight: _InFlight, depth: int, header: Header
) -> Iterator[tuple[int, int, memoryview | None]]:
    """Keep up to ``depth`` records decoding, hand out the oldest as each new one goes in,
    then check the whole: the chunk count and the checksum of the chunk list."""
    crc = 0
    while True:
        try:
            ch, bitmap, payload, off, give_back = next(records)
        except StopIteration:
            break
        except ImageError:
            # the chunks before the bad record may be good: deliver them in order (a bad one
            # among them raises first), then stop at the bad record
            yield from flight.drain()
            raise
        crc = crc32(struct.pack("<I", ch.crc), crc)
        flight.submit(ch, bitmap, payload, off, give_back)
        if len(flight.pending) >= depth:
            yield from flight.hand_out_oldest()
    if flight.count != header.chunk_count:
        raise ImageCorruptError(
            f"image data ends after {flight.count} of {header.chunk_count} chunks",
            why="the image is truncated",
            fix="the image cannot be used",
            structure="data",
            offset=header.data_offset + header.data_length,
        )
    yield from flight.drain()
    if crc != header.data_crc:
        raise ImageCorruptError(
            "image chunk list does not match the header",
            why="data checksum mismatch",
            fix="the image cannot be used",
            structure="data",
            offset=header.data_offset,
        )


class _Ring:
    """The page-aligned buffers chunks are decoded into, reused; all-zero chunks are handed
    out from one shared zero buffer instead (never written)."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self.free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(count):
            self.free.put(mmap.mmap(-1, size))
        self.zeros = mmap.mmap(-1, size)

    def take(self) -> mmap.mmap:
        """A free buffer; blocks until the consumer gives one back."""
        return self.free.get()

    def give_back(self, buf: mmap.mmap, view: memoryview) -> None:
        try:
            view.release()
            self.free.put(buf)
        except BufferError:  # the consumer kept a view: never reuse this one
            self.free.put(mmap.mmap(-1, self.size))

    def close(self) -> None:
        """Unmap the buffers now, not when the last reference goes (the traceback of a failed
        restore may hold it for a while): after a failed restore the restore-first
        environment starts the normal kernel in the memory they leave."""
        close_buffer(self.zeros)
        while not self.free.empty():
            close_buffer(self.free.get_nowait())


class _Decoded(NamedTuple):
    """A worker's result: the buffer holding the chunk (None: all zero, or placed), its
    length, and the seconds it spent (decode CPU; with a deliver: waiting for its turn,
    writing, and the CPU of that write; a placed chunk's decode counts as its write)."""

    buf: mmap.mmap | None
    length: int
    decode_cpu: float
    turn: float = 0.0
    write: float = 0.0
    write_cpu: float = 0.0
    placed: bool = False


class _InFlight:
    """The chunks submitted to the workers and not yet handed out, oldest first. A worker
    decodes its chunk and, with a deliver, writes it when the turnstile lets it; the
    consumer's thread hands the results out in order and gives the buffers back."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        ring: _Ring,
        turns: _Turns,
        deliver: Deliver | None,
        clocks: dict[str, float],
        opener: Callable[[ChunkHeader, bytes, bytes | memoryview, int], tuple[ChunkHeader, bytes]]
        | None = None,
        place: Place | None = None,
    ) -> None:
        self.pool, self.ring, self.turns = pool, ring, turns
        self.opener = opener  # an encrypted image: each record authenticated, then decoded
        self.deliver, self.clocks = deliver, clocks
        self.place = place
        self.pending: deque[tuple[ChunkHeader, Future[_Decoded]]] = deque()
        self.count = 0  # chunks submitted

    def submit(
        self,
        ch: ChunkHeader,
        bitmap: bytes,
        payload: bytes | memoryview,
        off: int,
        give_back: Callable[[], None],
    ) -> None:
        """Decode a record on a worker; ``give_back`` is called once its payload is used."""
        if ch.encoding == ENC_FREE and self.opener is None:
            try:
                done = self._check_free(self.count, ch, bitmap, payload, off)
            finally:
                give_back()
            self.pending.append((ch, done))
            self.count += 1
            return
        # an all-zero record is checked on a worker and handed out as the shared zeros; a
        # chunk that may be placed takes a buffer only if the sink refuses it
        empty = ch.encoding in EMPTY_ENCODINGS
        try:
            buf = None if empty or self.place is not None else self.ring.take()
            fut = self.pool.submit(self._work, self.count, ch, bitmap, payload, off, buf, give_back)
        except BaseException:
            give_back()
            raise
        self.pending.append((ch, fut))
        self.count += 1

    def hand_out_oldest(self) -> Iterator[tuple[int, int, memoryview | None]]:
        ch, fut = self.pending.popleft()
        yield from self._hand_out(ch, fut)

    def drain(self) -> Iterator[tuple[int, int, memoryview | None]]:
        while self.pending:
            yield from self.hand_out_oldest()

    def stop(self) -> None:
        """Stopped early: nothing more is written, nothing pending is started."""
        if self.pending:
            self.turns.fail(self.count - len(self.pending))
        for _, fut in self.pending:
            fut.cancel()

    def _check_free(
        self, seq: int, ch: ChunkHeader, bitmap: bytes, payload: bytes | memoryview, off: int
    ) -> Future[_Decoded]:
        """A free record is checked here, not on a worker: it writes nothing, and under
        emulation handing a chunk to a worker and back costs far more than its check (most
        of a lightly used machine's chunks are free). Its outcome is a Future already done."""
        done: Future[_Decoded] = Future()
        try:
            out, n, cpu = _decode(ch, bitmap, payload, off, None)
        except ImageError as e:
            self.turns.fail(seq)
            done.set_exception(e)
            return done
        self.turns.nothing_to_write(seq)
        done.set_result(_Decoded(out, n, cpu))
        return done

    def _work(
        self,
        seq: int,
        ch: ChunkHeader,
        bitmap: bytes,
        payload: bytes | memoryview,
        off: int,
        buf: mmap.mmap | None,
        give_back: Callable[[], None],
    ) -> _Decoded:
        try:
            if self.opener is not None:
                ch, payload = self.opener(ch, bitmap, payload, off)
            if self.place is not None and ch.encoding not in EMPTY_ENCODINGS:
                return self._place_in_turn(seq, ch, bitmap, payload, off)
            out, n, cpu = _decode(ch, bitmap, payload, off, buf)
        except BaseException:
            self.turns.fail(seq)
            raise
        finally:
            give_back()
        if self.deliver is None:
            return _Decoded(out, n, cpu)
        return _Decoded(out, n, cpu, *self._write_in_turn(self.deliver, seq, ch, out, n))

    def _place_in_turn(
        self, seq: int, ch: ChunkHeader, bitmap: bytes, payload: bytes | memoryview, off: int
    ) -> _Decoded:
        """Check the record, wait for its turn, then decode it straight into the sink; into
        a ring buffer and through deliver when the sink does not take it there."""
        assert self.place is not None and self.deliver is not None
        place, deliver = self.place, self.deliver
        c0 = time.thread_time()
        check_chunk(ch, bitmap, payload, off)
        cpu = time.thread_time() - c0
        n = ch.raw_length
        taken: list[mmap.mmap] = []  # the ring buffer of a chunk the sink did not place

        def decode(out: memoryview) -> None:
            decode_into(ch, bitmap, payload, off, out, checked=True)

        def write() -> None:
            if place(ch.phys, n, decode):
                return
            taken.append(self.ring.take())
            with memoryview(taken[0]) as whole:
                decode(whole)
                with whole[:n] as mv:
                    deliver(ch.phys, mv, n)

        try:
            times = self._in_turn(seq, ch, write)
        except BaseException:
            if taken:
                self.ring.free.put(taken[0])
            raise
        buf = taken[0] if taken else None
        return _Decoded(buf, n, cpu, *times, placed=buf is None)

    def _write_in_turn(
        self, deliver: Deliver, seq: int, ch: ChunkHeader, out: mmap.mmap | None, n: int
    ) -> tuple[float, float, float]:
        """Deliver a checked chunk once the turnstile lets it: (turn, write, write CPU) s."""

        def write() -> None:
            if ch.encoding == ENC_FREE:
                pass  # free in A, its contents never looked at: left as found
            elif out is None:
                deliver(ch.phys, None, n)
            else:
                with memoryview(out) as whole, whole[:n] as mv:
                    deliver(ch.phys, mv, n)

        return self._in_turn(seq, ch, write)

    def _in_turn(
        self, seq: int, ch: ChunkHeader, write: Callable[[], None]
    ) -> tuple[float, float, float]:
        """Run ``write`` for a chunk that passed its checks once the turnstile lets it:
        (turn, write, write CPU) s."""
        self.turns.check_passed(seq)
        t0 = time.monotonic()
        if not self.turns.wait(seq):
            raise _Skipped(f"chunk {ch.index} not written: an earlier chunk failed")
        t1, c1 = time.monotonic(), time.thread_time()
        try:
            write()
        except BaseException:
            self.turns.fail(seq)
            raise
        self.turns.done(seq)
        return t1 - t0, time.monotonic() - t1, time.thread_time() - c1

    def _hand_out(
        self, ch: ChunkHeader, fut: Future[_Decoded]
    ) -> Iterator[tuple[int, int, memoryview | None]]:
        tw = time.monotonic()
        try:
            done = fut.result()
        except BaseException:
            fut.cancel()
            raise
        clocks = self.clocks
        clocks["waiting"] += time.monotonic() - tw
        clocks["decode_cpu"] += done.decode_cpu
        clocks["turn"] += done.turn
        clocks["write"] += done.write
        clocks["write_cpu"] += done.write_cpu
        if self.deliver is not None and ch.encoding == ENC_FREE:
            clocks["free_left"] += done.length
        if done.placed:
            clocks["placed"] += done.length
            yield ch.phys, done.length, None
            return
        if done.buf is None:
            with memoryview(self.ring.zeros) as z:
                yield ch.phys, done.length, z[: done.length]
            return
        mv = memoryview(done.buf)[: done.length]
        try:
            yield ch.phys, done.length, mv
        finally:
            self.ring.give_back(done.buf, mv)


def _decode(
    ch: ChunkHeader,
    bitmap: bytes,
    payload: bytes | memoryview,
    off: int,
    buf: mmap.mmap | None,
) -> tuple[mmap.mmap | None, int, float]:
    c0 = time.thread_time()
    if buf is None:  # an all-zero record: checked, nothing to decode
        decode_into(ch, bitmap, payload, off, None)
        return None, ch.raw_length, time.thread_time() - c0
    with memoryview(buf) as out:
        decode_into(ch, bitmap, payload, off, out)
    return buf, ch.raw_length, time.thread_time() - c0


def restore_image(
    dev: ImageDevice,
    sink: MemorySink | None,
    *,
    progress: Progress | None = None,
    verify_only: bool = False,
    divert: Iterable[tuple[int, int]] = (),
    on_divert: Callable[[int, bytes], None] | None = None,
    workers: int | None = None,
    states: Iterable[ImageState] = RESTORABLE,
    key: bytes | None = None,
) -> RestoreStats:
    """Write the image's memory into ``sink`` (nothing when ``verify_only``); an encrypted
    image needs its image ``key``."""
    header, meta = check_image(dev, states, action="verify" if verify_only else "restore", key=key)
    stats = RestoreStats(header=header, metadata=meta)
    prepare = getattr(sink, "prepare", None)
    if prepare is not None and not verify_only:  # a file sink allocates the ranges up front
        prepare([(e.start, e.end) for e in meta.extents])
    held = sorted((int(a), int(b)) for a, b in divert)
    meter = _Meter(progress, meta.raw_bytes)
    t0 = time.monotonic()

    divert_lock = threading.Lock()

    def diverted(phys: int, n: int) -> bool:
        return any(a < phys + n and b > phys for a, b in held)

    def deliver(phys: int, data: memoryview | None, n: int) -> None:
        if diverted(phys, n):
            with divert_lock:  # stats.diverted* are shared
                _deliver(
                    sink,
                    phys,
                    data if data is not None else memoryview(zeros(n)),
                    held,
                    on_divert,
                    stats,
                )
        elif data is not None:
            sink.write(phys, data)  # type: ignore[union-attr]
        elif hasattr(sink, "zero"):
            sink.zero(phys, n)  # type: ignore[union-attr]
        else:
            sink.write(phys, memoryview(zeros(n)))  # type: ignore[union-attr]

    sink_place: Place | None = getattr(sink, "place", None)

    def place(phys: int, n: int, fill: Callable[[memoryview], None]) -> bool:
        assert sink_place is not None  # passed on only when the sink has it
        return not diverted(phys, n) and sink_place(phys, n, fill)

    writing = not verify_only and sink is not None
    for _phys, length, _data in iter_image(
        dev,
        header,
        meta,
        workers=workers,
        stages=stats.stages,
        deliver=deliver if writing else None,
        overlap=bool(getattr(sink, "concurrent_writes", False)),
        key=key,
        place=place if sink_place is not None else None,
    ):
        stats.raw_bytes += length
        stats.chunk_count += 1
        meter(stats.raw_bytes)
    stats.zero_pages = header.zero_pages
    stats.seconds = time.monotonic() - t0
    meter(stats.raw_bytes, final=True)
    st = stats.stages
    log.info(
        "%s %d bytes in %d chunks in %.2fs",
        "verified" if verify_only else "restored",
        stats.raw_bytes,
        stats.chunk_count,
        stats.seconds,
    )
    log.info(
        "restore stages: reading records %.2fs, decode %.2fs CPU on the workers, "
        "waiting for decodes %.2fs, writing memory %.2fs (%.2fs CPU, on the workers%s), "
        "chunks waiting for their turn to write %.2fs; %d MiB decoded straight into place; "
        "%d MiB of zero chunks were zero already (read, not written); %d MiB of free memory "
        "left as it was",
        st["records"],
        st["decode_cpu"],
        st["waiting"],
        st["write"],
        st["write_cpu"],
        ", overlapped" if getattr(sink, "concurrent_writes", False) else "",
        st["turn"],
        int(st["placed"]) >> 20,
        getattr(sink, "zero_already", 0) >> 20,
        int(st["free_left"]) >> 20,
    )
    return stats


def _deliver(
    sink: MemorySink | None,
    phys: int,
    data: bytes | memoryview,
    held: list[tuple[int, int]],
    on_divert: Callable[[int, bytes], None] | None,
    stats: RestoreStats,
) -> None:
    end = phys + len(data)
    pos = phys
    mv = memoryview(data)
    for a, b in held:
        if b <= pos or a >= end:
            continue
        if a > pos:
            sink.write(pos, mv[pos - phys : a - phys])  # type: ignore[union-attr]
            pos = a
        stop = min(b, end)
        piece = bytes(mv[pos - phys : stop - phys])
        stats.diverted_bytes += len(piece)
        if on_divert is not None:
            on_divert(pos, piece)
        else:
            stats.diverted.append((pos, piece))
        pos = stop
    if pos < end:
        sink.write(pos, data if pos == phys else mv[pos - phys :])  # type: ignore[union-attr]
