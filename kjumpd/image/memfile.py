"""A memory image in a plain file: the source and sink used by `kjump-agent save/restore`
on files (the save kernel uses /dev/mem classes with the same read/write methods).

Standard library only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading

from kjumpd.errors import AgentError

_ALIGN = 4096
_ZERO_STEP = 1 << 20
log = logging.getLogger(__name__)


def _merge(ranges: "list[tuple[int, int]]") -> "list[tuple[int, int]]":
    """Sorted, non-empty, non-overlapping (start, end) ranges covering the same bytes."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class FileMemorySource:
    """read(phys, length): the bytes at offset ``phys`` of a file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise AgentError(f"cannot open memory file {self.path}", why=e.strerror or str(e),
                             fix="check the --memory path", path=self.path) from None
        self.size = os.fstat(self.fd).st_size

    def read(self, phys: int, length: int) -> bytes:
        if phys + length > self.size:
            raise AgentError(f"memory range {phys:#x}-{phys + length:#x} is past the end of "
                             f"{self.path}", why=f"the file holds {self.size} bytes",
                             fix="give ranges inside the memory file", path=self.path)
        out = []
        got = 0
        while got < length:
            try:
                b = os.pread(self.fd, length - got, phys + got)
            except OSError as e:
                raise AgentError(f"cannot read {self.path}", why=e.strerror or str(e),
                                 path=self.path, offset=phys + got) from None
            if not b:
                raise AgentError(f"short read from {self.path} at {phys + got:#x}",
                                 path=self.path)
            out.append(b)
            got += len(b)
        return out[0] if len(out) == 1 else b"".join(out)

    def readinto(self, phys: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` with the bytes at offset ``phys`` (no new memory per call)."""
        mv = memoryview(buf)
        length = len(mv)
        if phys + length > self.size:
            raise AgentError(f"memory range {phys:#x}-{phys + length:#x} is past the end of "
                             f"{self.path}", why=f"the file holds {self.size} bytes",
                             fix="give ranges inside the memory file", path=self.path)
        got = 0
        while got < length:
            try:
                n = os.preadv(self.fd, [mv[got:]], phys + got)
            except OSError as e:
                raise AgentError(f"cannot read {self.path}", why=e.strerror or str(e),
                                 path=self.path, offset=phys + got) from None
            if n <= 0:
                raise AgentError(f"short read from {self.path} at {phys + got:#x}",
                                 path=self.path)
            got += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "FileMemorySource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileMemorySink:
    """write(phys, data): the bytes at offset ``phys`` of a file (created when missing).

    Like /dev/mem in the save kernel, the file is written around the page cache: page-aligned
    writes from page-aligned buffers (the restore pipeline's mmap buffers) go through O_DIRECT,
    which costs a fraction of the CPU of a buffered write; anything else, or a filesystem
    that refuses O_DIRECT (tmpfs), goes through an ordinary buffered descriptor.

    All-zero chunks (``zero``) are not written where the file already reads as zero: the
    parts of the ranges that ``prepare`` found past the file's old end (allocated there as
    unwritten extents, which read as zeros) or in a hole of it (SEEK_DATA/SEEK_HOLE). Any
    other zero range is written as zeros with O_DIRECT. (FALLOC_FL_PUNCH_HOLE was measured
    here: 256 x 1 MiB in 0.40-0.46 s against 0.38-0.49 s for the writes, half their CPU, but
    it leaves holes that a later restore's O_DIRECT writes must allocate one by one, under
    ext4's exclusive inode lock: not taken.) Scattered zero pages inside a chunk are written
    with the chunk: one write per run of data pages cost 4-5x the time of writing whole
    chunks here (2 GiB of bench memory: 9.2 s for 126k writes against 2.0-2.5 s for 2048).
    """

    def __init__(self, path: str | os.PathLike[str], direct: bool = True) -> None:
        self.path = os.fspath(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise AgentError(f"cannot open memory file {self.path}", why=e.strerror or str(e),
                             fix="check the --memory path", path=self.path) from None
        self.concurrent_writes = True
        self.direct_fd = -1
        self.known_zero: list[tuple[int, int]] = []   # (start, end): reads as zero already
        self.zero_already = 0     # bytes zero() found zero already (not written)
        self._zeros: mmap.mmap | None = None
        self._lock = threading.Lock()
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(self.path, flags | os.O_DIRECT)
            except OSError:
                self.direct_fd = -1          # buffered writes only

    def prepare(self, ranges: "list[tuple[int, int]]") -> None:
        """Before a restore of ``ranges`` ((start, end) pairs): a file shorter than the last
        end is extended, and the new part allocated in one go (unwritten extents), so that
        the restore's writes neither extend the file nor allocate blocks one by one (on ext4
        both serialise concurrent O_DIRECT writes). Existing bytes are not touched. The
        parts of the ranges that read as zero already (past the old end, holes) are noted
        for ``zero``."""
        if not ranges:
            return
        end = max(e for _, e in ranges)
        size = os.fstat(self.fd).st_size
        known: list[tuple[int, int]] = []
        for s, e in ranges:
            known += self._holes(s, min(e, size))
        if end > size:
            try:
                os.ftruncate(self.fd, end)
            except OSError as e:
                log.debug("extending %s: %s", self.path, e)   # writes extend it instead
            else:
                # past the old end the file reads as zeros (a hole, or the unwritten extents
                # allocated below)
                known += [(max(s, size), e) for s, e in ranges if e > size]
                try:
                    for s, e in ranges:
                        s = max(s, size)
                        if e > s:
                            os.posix_fallocate(self.fd, s, e - s)
                except OSError as e:
                    log.debug("preallocating %s: %s", self.path, e)  # writes allocate instead
        self.known_zero = _merge(known)

    def _holes(self, start: int, end: int) -> "list[tuple[int, int]]":
        """The holes of [start, end) (end <= the file's size), by SEEK_DATA/SEEK_HOLE; none
        when the filesystem cannot tell (then everything counts as data)."""
        out = []
        pos = start
        try:
            while pos < end:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:       # no data after pos
                        out.append((pos, end))
                        break
                    raise
                if data > pos:
                    out.append((pos, min(data, end)))
                if data >= end:
                    break
                pos = os.lseek(self.fd, data, os.SEEK_HOLE)
        except (OSError, AttributeError) as e:       # no SEEK_DATA here: all of it is data
            log.debug("looking for holes in %s: %s", self.path, e)
            return []
        return out

    def zero(self, phys: int, length: int) -> None:
        """Make [phys, phys + length) read as zeros, writing as little as possible."""
        pos, end = phys, phys + length
        already = 0
        for a, b in self.known_zero:
            if b <= pos:
                continue
            if a >= end:
                break
            if a > pos:
                self._zero_out(pos, a)
            already += min(b, end) - max(a, pos)
            pos = min(b, end)
        if pos < end:
            self._zero_out(pos, end)
        if already:
            with self._lock:
                self.zero_already += already

    def _zero_out(self, start: int, end: int) -> None:
        """Write zeros over [start, end) (O_DIRECT from a shared, never written zero map)."""
        with self._lock:
            if self._zeros is None:
                self._zeros = mmap.mmap(-1, _ZERO_STEP)
        step = _ZERO_STEP
        with memoryview(self._zeros) as z:
            for o in range(start, end, step):
                self.write(o, z[:min(step, end - o)])

    def write(self, phys: int, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        if (self.direct_fd >= 0 and phys % _ALIGN == 0 and len(mv) % _ALIGN == 0
                and isinstance(mv.obj, mmap.mmap)):
            try:
                self._write(self.direct_fd, phys, mv)
                return
            except _Unaligned:
                pass                     # a buffer slice that is not page-aligned
        self._write(self.fd, phys, mv)

    def _write(self, fd: int, phys: int, mv: memoryview) -> None:
        done = 0
        while done < len(mv):
            try:
                done += os.pwrite(fd, mv[done:], phys + done)
            except OSError as e:
                if e.errno == errno.EINVAL and fd == self.direct_fd and done == 0:
                    raise _Unaligned() from None
                raise AgentError(f"cannot write {self.path}", why=e.strerror or str(e),
                                 fix="check free space", path=self.path,
                                 offset=phys + done) from None

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self._zeros is not None:
            self._zeros.close()
            self._zeros = None
        for attr in ("fd", "direct_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> "FileMemorySink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Unaligned(Exception):
    """O_DIRECT refused a write (EINVAL): retried through the buffered descriptor."""
