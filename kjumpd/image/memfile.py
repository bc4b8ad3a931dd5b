"""A memory image in a plain file: the source and sink used by `kjump-agent save/restore`
on files (the save kernel uses /dev/mem classes with the same read/write methods).

Standard library only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os

from kjumpd.errors import AgentError

_ALIGN = 4096
log = logging.getLogger(__name__)


class FileMemorySource:
    """read(phys, length): the bytes at offset ``phys`` of a file (positioned reads: any
    number of threads at once)."""

    concurrent_reads = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise AgentError(
                f"cannot open memory file {self.path}",
                why=e.strerror or str(e),
                fix="check the --memory path",
                path=self.path,
            ) from None
        self.size = os.fstat(self.fd).st_size

    def read(self, phys: int, length: int) -> bytes:
        if phys + length > self.size:
            raise AgentError(
                f"memory range {phys:#x}-{phys + length:#x} is past the end of {self.path}",
                why=f"the file holds {self.size} bytes",
                fix="give ranges inside the memory file",
                path=self.path,
            )
        out = []
        got = 0
        while got < length:
            try:
                b = os.pread(self.fd, length - got, phys + got)
            except OSError as e:
                raise AgentError(
                    f"cannot read {self.path}",
                    why=e.strerror or str(e),
                    path=self.path,
                    offset=phys + got,
                ) from None
            if not b:
                raise AgentError(f"short read from {self.path} at {phys + got:#x}", path=self.path)
            out.append(b)
            got += len(b)
        return out[0] if len(out) == 1 else b"".join(out)

    def readinto(self, phys: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` with the bytes at offset ``phys`` (no new memory per call)."""
        mv = memoryview(buf)
        length = len(mv)
        if phys + length > self.size:
            raise AgentError(
                f"memory range {phys:#x}-{phys + length:#x} is past the end of {self.path}",
                why=f"the file holds {self.size} bytes",
                fix="give ranges inside the memory file",
                path=self.path,
            )
        got = 0
        while got < length:
            try:
                n = os.preadv(self.fd, [mv[got:]], phys + got)
            except OSError as e:
                raise AgentError(
                    f"cannot read {self.path}",
                    why=e.strerror or str(e),
                    path=self.path,
                    offset=phys + got,
                ) from None
            if n <= 0:
                raise AgentError(f"short read from {self.path} at {phys + got:#x}", path=self.path)
            got += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FileMemorySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileMemorySink:
    """write(phys, data): the bytes at offset ``phys`` of a file (created when missing).

    Like /dev/mem in the save kernel, the file is written around the page cache: page-aligned
    writes from page-aligned buffers (the restore pipeline's mmap buffers) go through O_DIRECT,
    which costs a fraction of the CPU of a buffered write; anything else, or a filesystem
    that refuses O_DIRECT (tmpfs), goes through an ordinary buffered descriptor.
    """

    def __init__(self, path: str | os.PathLike[str], direct: bool = True) -> None:
        self.path = os.fspath(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise AgentError(
                f"cannot open memory file {self.path}",
                why=e.strerror or str(e),
                fix="check the --memory path",
                path=self.path,
            ) from None
        self.concurrent_writes = True
        self.direct_fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(self.path, flags | os.O_DIRECT)
            except OSError:
                self.direct_fd = -1  # buffered writes only

    def prepare(self, ranges: list[tuple[int, int]]) -> None:
        """Before a restore of ``ranges`` ((start, end) pairs): a file shorter than the last
        end is extended, and the new part allocated in one go (unwritten extents), so that
        the restore's writes neither extend the file nor allocate blocks one by one (on ext4
        both serialise concurrent O_DIRECT writes). Existing bytes are not touched."""
        if not ranges:
            return
        end = max(e for _, e in ranges)
        size = os.fstat(self.fd).st_size
        if end <= size:
            return
        try:
            os.ftruncate(self.fd, end)
            for s, e in ranges:
                s = max(s, size)
                if e > s:
                    os.posix_fallocate(self.fd, s, e - s)
        except OSError as e:
            log.debug("preallocating %s: %s", self.path, e)  # writes allocate instead

    def write(self, phys: int, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        if (
            self.direct_fd >= 0
            and phys % _ALIGN == 0
            and len(mv) % _ALIGN == 0
            and isinstance(mv.obj, mmap.mmap)
        ):
            try:
                self._write(self.direct_fd, phys, mv)
                return
            except _Unaligned:
                pass  # a buffer slice that is not page-aligned
        self._write(self.fd, phys, mv)

    def _write(self, fd: int, phys: int, mv: memoryview) -> None:
        done = 0
        while done < len(mv):
            try:
                done += os.pwrite(fd, mv[done:], phys + done)
            except OSError as e:
                if e.errno == errno.EINVAL and fd == self.direct_fd and done == 0:
                    raise _Unaligned() from None
                raise AgentError(
                    f"cannot write {self.path}",
                    why=e.strerror or str(e),
                    fix="check free space",
                    path=self.path,
                    offset=phys + done,
                ) from None

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        for attr in ("fd", "direct_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> FileMemorySink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Unaligned(Exception):
    """O_DIRECT refused a write (EINVAL): retried through the buffered descriptor."""
