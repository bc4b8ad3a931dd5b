"""Sequential record I/O on the data area of a target, in aligned windows.

RecordWriter packs chunk records back to back into a page-aligned buffer and writes whole
windows (O_DIRECT-friendly); RecordReader reads the same area window by window and yields
parsed records. Memory use is one window plus one record.

Standard library only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import mmap
import queue
import threading
import time
from collections.abc import Callable, Iterator

from kjumpd.errors import ImageCorruptError, TargetError
from kjumpd.image import memops
from kjumpd.image.device import ALIGN, ImageDevice, close_buffer
from kjumpd.image.format import CHUNK_HEADER_SIZE, ChunkHeader

WINDOW = 2 * 1024 * 1024


class RecordWriter:
    """Packs records into page-aligned windows and writes each full window once.

    With a ``verifier`` the written window is handed over for read-back and the writer goes
    on with a spare one (a few windows rotate; the writer waits when all are being checked).
    """

    def __init__(
        self,
        dev: ImageDevice,
        start: int,
        window: int = WINDOW,
        verifier: ReadBackVerifier | None = None,
        spares: int = 2,
    ) -> None:
        if start % ALIGN:
            raise ValueError("data area must be aligned")
        self.dev = dev
        self.start = start
        self.buf = mmap.mmap(-1, window)
        self.fill = 0
        self.flushed = 0  # bytes of the data area already on the device
        self.length = 0  # bytes appended
        self.window = window
        self.writes = 0
        self.write_seconds = 0.0  # wall time in the device writes
        self.verifier = verifier
        self.spare: queue.Queue[mmap.mmap] = queue.Queue()
        self._all = [self.buf]
        if verifier is not None:
            for _ in range(spares):
                m = mmap.mmap(-1, window)
                self._all.append(m)
                self.spare.put(m)

    @property
    def capacity(self) -> int:
        return self.dev.size - self.start

    def append(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if self.start + self.length + n > self.dev.size:
            raise TargetError(
                "the target is full",
                why=f"the image needs more than the {self.capacity} bytes of "
                f"data area (target {self.dev.size} bytes)",
                fix="make the target larger (or shrink memory first)",
                path=self.dev.path,
                offset=self.start + self.length,
            )
        mv = memoryview(data)
        done = 0
        while done < n:
            take = min(n - done, len(self.buf) - self.fill)
            with memoryview(self.buf) as window:
                # a record's 1 MiB payload: with the GIL released the workers go on encoding
                memops.copy_into(window[self.fill : self.fill + take], mv[done : done + take])
            self.fill += take
            done += take
            if self.fill == len(self.buf):
                self._write(self.fill)
        self.length += n

    def _write(self, n: int) -> None:
        padded = -(-n // ALIGN) * ALIGN
        if padded > n:
            self.buf[n:padded] = bytes(padded - n)
        at = self.start + self.flushed
        t0 = time.monotonic()
        with memoryview(self.buf) as whole:
            self.dev.write_aligned(at, whole[:padded])
        self.write_seconds += time.monotonic() - t0
        self.writes += 1
        if self.verifier is not None:
            self.verifier.submit(at, padded, self.buf, self.spare)
            self.buf = self._next_spare()
        self.flushed += n
        self.fill = 0

    def _next_spare(self) -> mmap.mmap:
        while True:
            try:
                return self.spare.get(timeout=0.5)
            except queue.Empty:
                if self.verifier is not None and not self.verifier.is_alive():
                    raise self.verifier.error or RuntimeError("the verifier stopped") from None

    def finish(self) -> int:
        """Write the last partial window (zero-padded to the block size); the data length."""
        if self.fill:
            if self.start + self.flushed + -(-self.fill // ALIGN) * ALIGN > self.dev.size:
                raise TargetError(
                    "the target is full", fix="make the target larger", path=self.dev.path
                )
            self._write(self.fill)
        return self.length

    def close(self) -> None:
        for m in self._all:
            close_buffer(m)


class ReadBackVerifier(threading.Thread):
    """The verify pass, overlapped with the save: each window a RecordWriter wrote is read
    back from the device (O_DIRECT when the device has it) as soon as its write returned and
    compared byte for byte with the window that was sent, which then goes back to the
    writer. ``finish()`` waits for the last window and raises the first mismatch or read
    error.
    """

    def __init__(self, dev: ImageDevice, window: int = WINDOW) -> None:
        super().__init__(name="kjump-verify", daemon=True)
        self.dev = dev
        self.q: queue.Queue[tuple[int, int, mmap.mmap, queue.Queue[mmap.mmap]] | None] = (
            queue.Queue()
        )
        self.buf = mmap.mmap(-1, window)
        self.error: BaseException | None = None
        self.checked = 0  # bytes read back and found equal
        self.windows = 0
        self.busy_seconds = 0.0  # wall time reading back and comparing

    def submit(
        self, logical: int, length: int, sent: mmap.mmap, give_back: queue.Queue[mmap.mmap]
    ) -> None:
        self.q.put((logical, length, sent, give_back))

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            off, length, sent, give_back = item
            t0 = time.monotonic()
            try:
                if self.error is None:
                    self._check(off, length, sent)
            except BaseException as e:  # noqa: B902 - handed to finish(), raised there
                self.error = e
            finally:
                self.busy_seconds += time.monotonic() - t0
                give_back.put(sent)

    def _check(self, off: int, length: int, sent: mmap.mmap) -> None:
        if length > len(self.buf):
            self.buf.close()
            self.buf = mmap.mmap(-1, length)
        with (
            memoryview(self.buf) as whole,
            whole[:length] as got,
            memoryview(sent) as sent_view,
            sent_view[:length] as want,
        ):
            self.dev.readinto(off, got)
            same = memops.equal(got, want)
        if not same:
            raise ImageCorruptError(
                f"image data at byte offset {off} reads back differently from what was written",
                why="read-back mismatch",
                fix="the disk or its block map is not reliable; check "
                "it and run `kjumpctl setup` again",
                structure="data",
                offset=off,
            )
        self.checked += length
        self.windows += 1

    def finish(self) -> None:
        """Wait until every submitted window was checked; raise the first failure."""
        self.q.put(None)
        self.join()
        self.buf.close()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Stop without raising (the save failed for another reason)."""
        if self.is_alive():
            self.q.put(None)
            self.join()
        close_buffer(self.buf)


class _Prefetch(threading.Thread):
    """Reads aligned windows of [start, end) ahead of the consumer (a ring of mmap buffers)."""

    def __init__(self, dev: ImageDevice, start: int, end: int, window: int, depth: int = 2) -> None:
        super().__init__(name="kjump-prefetch", daemon=True)
        self.dev, self.first, self.end, self.window = dev, start, end, window
        self.bufs = [mmap.mmap(-1, window) for _ in range(depth + 1)]
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(len(self.bufs)):
            self.free.put(i)
        self.ready: queue.Queue[tuple[int, int, int] | BaseException | None] = queue.Queue()
        self.stop = threading.Event()

    def run(self) -> None:
        pos = self.first
        try:
            while pos < self.end and not self.stop.is_set():
                i = self.free.get()
                if i < 0:
                    break
                want = min(self.window, -(-(self.end - pos) // ALIGN) * ALIGN, self.dev.size - pos)
                mv = memoryview(self.bufs[i])[:want]
                try:
                    self.dev.readinto(pos, mv)
                finally:
                    mv.release()
                self.ready.put((i, pos, min(want, self.end - pos)))
                pos += want
            self.ready.put(None)
        except BaseException as e:  # noqa: B902 - handed to the consumer, raised there
            self.ready.put(e)

    def close(self) -> None:
        self.stop.set()
        self.free.put(-1)
        self.join()
        for b in self.bufs:
            close_buffer(b)  # a failed read's traceback may still hold a view of one


def _nothing() -> None:
    pass


class RecordReader:
    """Yield (ChunkHeader, bitmap, payload, logical_offset) from [start, start+length).

    Records are cut straight out of the prefetched windows (one copy: the bytes handed out);
    only a record that spans two windows is pieced together from both.

    ``held_records()`` hands each payload out as a view of its window instead, with the
    function that gives it back: the copy would be made by the one reading thread every
    chunk waits for. A window is read into again only once every payload cut out of it was
    given back. ``held``: how many records may hold a view at once (the windows are sized
    for them; more only slow the reading down).
    """

    def __init__(
        self, dev: ImageDevice, start: int, length: int, window: int = WINDOW, held: int = 0
    ) -> None:
        self.dev = dev
        self.start = start
        self.end = start + length
        self.done = False
        self._win: memoryview | None = None  # the current window (first `keep` bytes)
        self._win_i = -1
        self._pos = 0  # position in the current window
        self.offset = start  # logical offset of the next byte handed out
        # a spare window per four held records: enough to keep the reading ahead of the
        # workers (fewer held records per window only make it wait for one to be given
        # back), while the windows stay within the agent's memory budget
        self._pf = _Prefetch(dev, start, self.end, window, depth=2 + (held + 3) // 4)
        #: per window: the views of it handed out and not given back, plus 1 while current
        self._refs = [0] * len(self._pf.bufs)
        self._lock = threading.Lock()
        self._pf.start()

    def _next_window(self, what: str, offset: int) -> None:
        self._drop_window()
        item = None if self.done else self._pf.ready.get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item is None:
            self.done = True
            raise ImageCorruptError(
                f"image data ends inside {what} at byte offset {offset}",
                why="the image is truncated",
                fix="the image cannot be used; boot normally and hibernate again",
                structure=what,
                offset=offset,
            )
        i, _pos, keep = item
        self._win_i, self._pos = i, 0
        with self._lock:
            self._refs[i] = 1
        self._win = memoryview(self._pf.bufs[i])[:keep]

    def _drop_window(self) -> None:
        if self._win is not None:
            self._win.release()
            self._win = None
            self._unref(self._win_i)

    def _unref(self, i: int) -> None:
        with self._lock:
            self._refs[i] -= 1
            last = self._refs[i] == 0
        if last:
            self._pf.free.put(i)

    def _take_held(
        self, n: int, what: str, offset: int
    ) -> tuple[bytes | memoryview, Callable[[], None]]:
        """The next ``n`` bytes as a view of their window and the function that gives it
        back (a copy and a function that does nothing when they span two windows)."""
        if n and (self._win is None or self._pos == len(self._win)):
            self._next_window(what, offset)
        win = self._win
        if n == 0 or win is None or self._pos + n > len(win):
            return self._take(n, what, offset), _nothing
        view = win[self._pos : self._pos + n]
        self._pos += n
        self.offset += n
        i = self._win_i
        with self._lock:
            self._refs[i] += 1
        out = [view]  # emptied by the first give_back

        def give_back() -> None:
            with self._lock:
                if not out:
                    return
                given = out.pop()
            try:
                given.release()
            except BufferError:
                pass  # a traceback still holds a view of it: the window is reused all the same
            self._unref(i)

        return view, give_back

    def _take(self, n: int, what: str, offset: int) -> bytes:
        """The next ``n`` bytes of the data area (copied out of the window(s))."""
        self.offset += n
        if n == 0:
            return b""
        if self._win is None or self._pos == len(self._win):
            self._next_window(what, offset)
        win = self._win
        assert win is not None
        if self._pos + n <= len(win):
            out = bytes(win[self._pos : self._pos + n])
            self._pos += n
            return out
        parts = []
        need = n
        while need:
            win = self._win
            if win is None or self._pos == len(win):
                self._next_window(what, offset)
                continue
            k = min(need, len(win) - self._pos)
            parts.append(bytes(win[self._pos : self._pos + k]))
            self._pos += k
            need -= k
        return b"".join(parts)

    def __iter__(self) -> Iterator[tuple[ChunkHeader, bytes, bytes, int]]:
        for ch, bitmap, payload, off, give_back in self.held_records():
            copy = bytes(payload)
            give_back()
            yield ch, bitmap, copy, off

    def held_records(
        self,
    ) -> Iterator[tuple[ChunkHeader, bytes, bytes | memoryview, int, Callable[[], None]]]:
        """(ChunkHeader, bitmap, payload, logical_offset, give_back) of each record: the
        payload is valid until give_back() is called, which must be called (once is enough;
        more calls do nothing) for its window to be read into again."""
        while self.offset < self.end:
            off = self.offset
            head = self._take(CHUNK_HEADER_SIZE, "chunk record header", off)
            ch = ChunkHeader.unpack(head, base=off)
            bitmap = self._take(ch.bitmap_length, f"chunk {ch.index}", off)
            payload, give_back = self._take_held(ch.payload_length, f"chunk {ch.index}", off)
            yield ch, bitmap, payload, off, give_back

    def close(self) -> None:
        if self._win is not None:
            self._win.release()
            self._win = None
        self._pf.close()
