"""A memory image in a plain file: the source and sink used by `kjump-agent save/restore`
on files (the save kernel uses /dev/mem classes with the same read/write methods).

Standard library + lz4 (through kjumpd.image.chunk) only.
"""

from __future__ import annotations

import os

from kjumpd.errors import AgentError
from kjumpd.image.chunk import find_zero_pages
from kjumpd.image.format import PAGE_SIZE


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

    Bytes that lie before the file's end when it was opened are always written (the file may
    hold other data). Beyond that end the file reads as zeros already, so all-zero pages are
    skipped there (left as holes, like ``lz4 -d``'s sparse output) and the file is extended
    to its full length on flush/close.
    """

    def __init__(self, path: str | os.PathLike[str], sparse: bool = True) -> None:
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self.fresh_from = os.fstat(self.fd).st_size if sparse else -1
        except OSError as e:
            raise AgentError(f"cannot open memory file {self.path}", why=e.strerror or str(e),
                             fix="check the --memory path", path=self.path) from None
        self.end = 0

    def write(self, phys: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self.end = max(self.end, phys + n)
        if self.fresh_from < 0 or phys + n <= self.fresh_from:
            self._pwrite(phys, memoryview(data))
            return
        if phys < self.fresh_from:          # the part over old data is written as is
            cut = self.fresh_from - phys
            self._pwrite(phys, memoryview(data)[:cut])
            data, phys = memoryview(data)[cut:], self.fresh_from
        if isinstance(data, memoryview):
            data = bytes(data)
        mv = memoryview(data)
        pos = 0
        for i in find_zero_pages(data):     # pages relative to ``phys``
            o = i * PAGE_SIZE
            if o > pos:
                self._pwrite(phys + pos, mv[pos:o])
            pos = o + PAGE_SIZE
        if pos < len(mv):
            self._pwrite(phys + pos, mv[pos:])

    def _pwrite(self, phys: int, mv: memoryview) -> None:
        done = 0
        while done < len(mv):
            try:
                done += os.pwrite(self.fd, mv[done:], phys + done)
            except OSError as e:
                raise AgentError(f"cannot write {self.path}", why=e.strerror or str(e),
                                 fix="check free space", path=self.path,
                                 offset=phys + done) from None

    def _extend(self) -> None:
        try:
            if os.fstat(self.fd).st_size < self.end:
                os.ftruncate(self.fd, self.end)      # trailing zero pages were skipped
        except OSError as e:
            raise AgentError(f"cannot extend {self.path}", why=e.strerror or str(e),
                             path=self.path) from None

    def flush(self) -> None:
        self._extend()
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise AgentError(f"cannot flush {self.path}", why=e.strerror or str(e),
                             path=self.path) from None

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self._extend()
            finally:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> "FileMemorySink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
