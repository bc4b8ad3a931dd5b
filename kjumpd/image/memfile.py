"""A memory image in a plain file: the source and sink used by `kjump-agent save/restore`
on files (the save kernel uses /dev/mem classes with the same read/write methods).

Standard library only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import os

from kjumpd.errors import AgentError


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
    """write(phys, data): the bytes at offset ``phys`` of a file (created when missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise AgentError(f"cannot open memory file {self.path}", why=e.strerror or str(e),
                             fix="check the --memory path", path=self.path) from None

    def write(self, phys: int, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            try:
                done += os.pwrite(self.fd, mv[done:], phys + done)
            except OSError as e:
                raise AgentError(f"cannot write {self.path}", why=e.strerror or str(e),
                                 fix="check free space", path=self.path,
                                 offset=phys + done) from None

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "FileMemorySink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
