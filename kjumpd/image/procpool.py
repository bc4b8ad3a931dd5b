"""Encoder processes: the save pipeline's chunk encoding (zero-page scan, lz4, CRC) in
forked worker processes over shared memory, so that no interpreter lock is shared.

With threads, the parts of an encode that hold Python's lock (the zero-page scan, copies,
record building) serialise the workers; in processes they run on every core at once.

Shared memory (anonymous MAP_SHARED, created before the fork, so parent and workers see
the same pages): ``slots`` input slots of ``chunk_size`` bytes, and as many output slots of
``out_size`` bytes (room for an lz4 payload or a raw one). The parent reads a chunk into a
free input slot and sends a request down that worker's pipe; the worker encodes the slot,
copies the payload into the output slot of the same number and answers on the one result
pipe. A slot is handed out again only after the writer has consumed its output
(``release``).

Messages (little-endian; each written with one write(2) of at most PIPE_BUF bytes, so the
workers' answers never interleave):

  request  ``<IIQI``      slot, chunk index, physical address, length
  answer   ``<IIIIIdI``   slot, status (0 ok, 1 error), payload length, record CRC,
                          zero pages, CPU seconds, blob length; then the blob: the record
                          header + zero-page bitmap (ok) or the error text, UTF-8 (error)

A worker exits when its request pipe closes. The parent notices a worker that died (its
answer never comes) and fails the save instead of waiting for ever.

Standard library + lz4 only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import struct
import threading
import time
from concurrent.futures import Future

from kjumpd.errors import ImageError
from kjumpd.image.chunk import EncodedChunk, encode_chunk

REQUEST = struct.Struct("<IIQI")
ANSWER = struct.Struct("<IIIIIdI")
OK, FAILED = 0, 1


def out_size_for(chunk_size: int) -> int:
    """Room for the payload of a chunk: lz4's worst case (LZ4_COMPRESSBOUND), page-rounded."""
    bound = chunk_size + chunk_size // 255 + 16
    return -(-bound // mmap.PAGESIZE) * mmap.PAGESIZE


def available() -> bool:
    return hasattr(os, "fork") and hasattr(os, "pipe")


class EncoderProcesses:
    """``workers`` forked encoder processes and ``slots`` shared chunk slots."""

    def __init__(self, workers: int, chunk_size: int, slots: int, compression: str,
                 tag: int) -> None:
        if workers < 1 or slots < workers:
            raise ValueError("need at least one worker and a slot per worker")
        self.chunk_size = chunk_size
        self.out_size = out_size_for(chunk_size)
        self.slots = slots
        self.inmem = mmap.mmap(-1, slots * chunk_size)
        self.outmem = mmap.mmap(-1, slots * self.out_size)
        self._outview = memoryview(self.outmem)
        self.compression, self.tag = compression, tag
        self.pids: list[int] = []
        self._req: list[int] = []               # parent's write ends, one per worker
        self._futures: dict[int, tuple[Future[EncodedChunk], int, int, int]] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._closed = False
        self.error: BaseException | None = None
        self.peak_rss = 0                         # workers' VmHWM, summed (read at close)
        res_r, res_w = os.pipe()
        child_ends: list[int] = []
        try:
            for _ in range(workers):
                req_r, req_w = os.pipe()
                pid = os.fork()
                if pid == 0:                      # the worker: never returns
                    keep = {req_r, res_w}
                    for fd in [res_r, req_w, *self._req, *child_ends]:
                        if fd not in keep:
                            _close(fd)
                    _worker(req_r, res_w, self)
                os.close(req_r)
                self.pids.append(pid)
                self._req.append(req_w)
        except BaseException:
            for fd in self._req:
                _close(fd)
            _close(res_r)
            _close(res_w)
            self._reap(kill=True)
            raise
        os.close(res_w)                           # EOF once every worker has exited
        self._res = res_r
        self._collector = threading.Thread(target=self._collect, name="kjump-encoders",
                                           daemon=True)
        self._collector.start()

    # ------------------------------------------------------------------ parent side

    def in_slot(self, slot: int, length: int) -> memoryview:
        """The input slot's first ``length`` bytes, to read a chunk into."""
        base = slot * self.chunk_size
        return memoryview(self.inmem)[base:base + length]

    def submit(self, slot: int, index: int, phys: int, length: int) -> Future[EncodedChunk]:
        fut: Future[EncodedChunk] = Future()
        with self._lock:
            if self.error is not None:
                fut.set_exception(self.error)
                return fut
            self._futures[slot] = (fut, index, phys, length)
            worker = self._next
            self._next = (self._next + 1) % len(self._req)
        try:
            os.write(self._req[worker], REQUEST.pack(slot, index, phys, length))
        except OSError as e:
            self._fail(ImageError("an encoder process is gone", why=e.strerror or str(e),
                                  fix="see the console for what killed it (out of memory?)"))
        return fut

    def _collect(self) -> None:
        buf = bytearray()
        try:
            while True:
                ready, _, _ = select.select([self._res], [], [], 0.5)
                if not ready:
                    self._check_workers()
                    continue
                data = os.read(self._res, 65536)
                if not data:
                    if not self._closed:
                        self._fail(ImageError("the encoder processes exited",
                                              why="their result pipe closed mid-save"))
                    return
                buf += data
                while len(buf) >= ANSWER.size:
                    slot, status, plen, crc, zero, cpu, blen = ANSWER.unpack_from(buf)
                    if len(buf) < ANSWER.size + blen:
                        break
                    blob = bytes(buf[ANSWER.size:ANSWER.size + blen])
                    del buf[:ANSWER.size + blen]
                    self._answer(slot, status, plen, crc, zero, cpu, blob)
        except BaseException as e:  # noqa: B902 - every waiter gets it
            self._fail(e)

    def _answer(self, slot: int, status: int, plen: int, crc: int, zero: int, cpu: float,
                blob: bytes) -> None:
        with self._lock:
            entry = self._futures.pop(slot, None)
        if entry is None:
            return
        fut, index, phys, length = entry
        if status != OK:
            fut.set_exception(ImageError(f"encoding chunk {index} at {phys:#x} failed",
                                         why=blob.decode(errors="replace"),
                                         fix="this is a bug; report it with the console log"))
            return
        base = slot * self.out_size
        fut.set_result(EncodedChunk(index=index, phys=phys, raw_length=length, head=blob,
                                    payload=self._outview[base:base + plen], crc=crc,
                                    zero_pages=zero, cpu=cpu, slot=slot))

    def _check_workers(self) -> None:
        for pid in self.pids:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done and not self._closed:
                how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                       else f"exit status {os.waitstatus_to_exitcode(status)}")
                self._fail(ImageError("an encoder process died", why=how,
                                      fix="see the console for what killed it "
                                          "(out of memory?)"))
                return

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = e
            pending = list(self._futures.values())
            self._futures.clear()
        for fut, *_ in pending:
            if not fut.done():
                fut.set_exception(self.error)

    def close(self) -> None:
        """Stop the workers (they finish the chunk at hand) and free the shared memory."""
        if self._closed:
            return
        self._closed = True
        self.peak_rss = sum(_vm_hwm(pid) for pid in self.pids)
        for fd in self._req:
            _close(fd)
        self._reap(kill=False)
        self._collector.join(timeout=5)
        _close(self._res)
        try:
            self._outview.release()
            self.inmem.close()
            self.outmem.close()
        except BufferError:       # a payload view is still held by a failed writer
            pass

    def _reap(self, kill: bool) -> None:
        deadline = time.monotonic() + (0 if kill else 10)
        for pid in self.pids:
            while True:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done:
                    break
                if time.monotonic() >= deadline:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    deadline = float("inf")
                    continue
                time.sleep(0.01)

    def __enter__(self) -> "EncoderProcesses":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- worker side

def _worker(req: int, res: int, pool: EncoderProcesses) -> None:
    """The worker's whole life: answer requests until the pipe closes, then _exit."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent decides about ^C
        cs, osz = pool.chunk_size, pool.out_size
        local = bytearray(cs)                            # bytes-like with find()/startswith()
        while True:
            msg = _read_exact(req, REQUEST.size)
            if msg is None:
                break
            slot, index, phys, length = REQUEST.unpack(msg)
            try:
                base = slot * cs
                with memoryview(pool.inmem) as whole:
                    local[:length] = whole[base:base + length]
                enc = encode_chunk(index, phys, local, pool.compression, pool.tag,
                                   length=length)
                ob = slot * osz
                pool.outmem[ob:ob + len(enc.payload)] = enc.payload
                answer = ANSWER.pack(slot, OK, len(enc.payload), enc.crc, enc.zero_pages,
                                     enc.cpu, len(enc.head)) + enc.head
            except Exception as e:  # noqa: BLE001 - reported to the parent, which fails
                text = f"{type(e).__name__}: {e}".encode()[:1000]
                answer = ANSWER.pack(slot, FAILED, 0, 0, 0, 0.0, len(text)) + text
            os.write(res, answer)
    except BaseException:  # noqa: B902 - a worker never unwinds into the parent's code
        code = 1
    finally:
        os._exit(code)


def _read_exact(fd: int, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        part = os.read(fd, n - len(out))
        if not part:
            return None
        out += part
    return out


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
