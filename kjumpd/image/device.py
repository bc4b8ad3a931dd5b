"""ImageDevice: a target file or block device seen through its block map.

Callers use *logical* offsets; the block map (list of BlockExtent) turns them into device
offsets, and any byte outside the map is refused before a system call is made. A plain
file without a map is one extent covering the whole file.

Aligned I/O goes through page-aligned mmap buffers, with O_DIRECT when the filesystem or
device accepts it (tmpfs does not: the device then falls back to buffered I/O and
``flush()`` is an fsync). Unaligned reads and writes are widened to the block size
(read-modify-write for writes).

Standard library only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
from collections.abc import Iterable

from kjumpd.errors import ImageError, TargetError
from kjumpd.image.format import BlockExtent

log = logging.getLogger(__name__)

ALIGN = 4096


def close_buffer(buf: mmap.mmap) -> None:
    """Unmap ``buf`` unless a view of it is still held (BufferError): after a failed read or
    write the traceback of the error being raised may hold one; the mapping then goes with
    that view, and the real error must reach the user, not this one."""
    try:
        buf.close()
    except BufferError:
        pass


class ImageDevice:
    def __init__(
        self,
        path: str | os.PathLike[str],
        blockmap: Iterable[BlockExtent] | None = None,
        *,
        writable: bool,
        direct: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        self.direct = False
        self.fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, flags | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise self._open_error(e) from None
                log.debug("%s: O_DIRECT refused, using buffered I/O", self.path)
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, flags)
            except OSError as e:
                raise self._open_error(e) from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISBLK(st.st_mode):
                self.device_size = os.lseek(self.fd, 0, os.SEEK_END)
            else:
                self.device_size = st.st_size
            if blockmap is None:
                if self.device_size < ALIGN:
                    raise TargetError(
                        f"target {self.path} is too small ({self.device_size} bytes)",
                        fix="create it with `kjumpctl setup` or kjump-agent save",
                        path=self.path,
                    )
                usable = self.device_size // ALIGN * ALIGN
                blockmap = [BlockExtent(0, 0, usable)]
            self.blockmap = sorted(blockmap, key=lambda e: e.logical)
            self.size = 0
            for ext in self.blockmap:
                if ext.logical != self.size:
                    raise TargetError(
                        f"block map of {self.path} has a hole at logical {self.size}",
                        fix="run `kjumpctl setup` again",
                        path=self.path,
                    )
                if ext.device_offset + ext.length > self.device_size:
                    raise TargetError(
                        f"block map of {self.path} points past the device end",
                        why=f"extent at device offset {ext.device_offset} + "
                        f"{ext.length} > {self.device_size}",
                        fix="run `kjumpctl setup` again",
                        path=self.path,
                    )
                self.size += ext.length
        except BaseException:
            os.close(self.fd)
            raise
        self._bounce: mmap.mmap | None = None

    def _open_error(self, e: OSError) -> TargetError:
        return TargetError(
            f"cannot open target {self.path}",
            why=e.strerror or str(e),
            fix="check the path and that you are root",
            path=self.path,
        )

    # -------------------------------------------------------------------- mapping

    def map(self, logical: int, length: int) -> list[tuple[int, int, int]]:
        """[(device_offset, length, buffer_offset)] for logical [logical, logical+length)."""
        if logical < 0 or length < 0 or logical + length > self.size:
            raise TargetError(
                "I/O outside the target's block map refused",
                why=f"logical bytes [{logical}, {logical + length}) are outside [0, {self.size})",
                fix="the image does not fit the target; make the target larger",
                path=self.path,
                offset=logical,
                length=length,
            )
        out = []
        pos, done = logical, 0
        for e in self.blockmap:
            if pos >= e.logical + e.length or done == length:
                continue
            take = min(length - done, e.logical + e.length - pos)
            out.append((e.device_offset + pos - e.logical, take, done))
            pos += take
            done += take
        return out

    # -------------------------------------------------------------------- I/O

    def _aligned(self, logical: int, length: int) -> bool:
        return logical % ALIGN == 0 and length % ALIGN == 0

    def _buffer(self, size: int) -> mmap.mmap:
        if self._bounce is None or len(self._bounce) < size:
            if self._bounce is not None:
                self._bounce.close()
            self._bounce = mmap.mmap(-1, max(size, ALIGN))
        return self._bounce

    def readinto(self, logical: int, buf: mmap.mmap | memoryview | bytearray) -> None:
        """Fill ``buf`` (page-aligned memory, aligned size when direct) from logical offset."""
        mv = memoryview(buf)
        for dev_off, n, boff in self.map(logical, len(mv)):
            self._preadv_full(mv[boff : boff + n], dev_off, logical + boff)

    def _preadv_full(self, mv: memoryview, dev_off: int, logical: int) -> None:
        got = 0
        while got < len(mv):
            try:
                n = os.preadv(self.fd, [mv[got:]], dev_off + got)
            except OSError as e:
                raise ImageError(
                    f"read error on {self.path}",
                    why=e.strerror or str(e),
                    fix="check the disk",
                    path=self.path,
                    offset=logical + got,
                ) from None
            if n == 0:
                raise ImageError(
                    f"unexpected end of {self.path}",
                    why="short read",
                    path=self.path,
                    offset=logical + got,
                )
            got += n

    def read(self, logical: int, length: int) -> bytes:
        """Any offset and length; widened to aligned blocks internally."""
        start = logical // ALIGN * ALIGN
        end = -(-(logical + length) // ALIGN) * ALIGN
        if logical + length <= self.size:
            end = min(end, self.size)
        buf = self._buffer(end - start)
        mv = memoryview(buf)[: end - start]
        try:
            self.readinto(start, mv)
            return bytes(mv[logical - start : logical - start + length])
        finally:
            mv.release()

    def write_aligned(self, logical: int, buf: mmap.mmap | memoryview | bytearray | bytes) -> None:
        """Write an aligned buffer at an aligned logical offset (the fast path)."""
        if not self.writable:
            raise TargetError(f"target {self.path} is open read-only", path=self.path)
        mv = memoryview(buf)
        for dev_off, n, boff in self.map(logical, len(mv)):
            done = 0
            while done < n:
                try:
                    w = os.pwritev(self.fd, [mv[boff + done : boff + n]], dev_off + done)
                except OSError as e:
                    raise ImageError(
                        f"write error on {self.path}",
                        why=e.strerror or str(e),
                        fix="check the disk and that the target is not full",
                        path=self.path,
                        offset=logical + boff + done,
                    ) from None
                if w <= 0:
                    raise ImageError(
                        f"write error on {self.path}",
                        why="short write",
                        path=self.path,
                        offset=logical + boff + done,
                    )
                done += w

    def write(self, logical: int, data: bytes | bytearray | memoryview) -> None:
        """Any offset and length (read-modify-write of partial blocks when needed)."""
        length = len(data)
        if length == 0:
            return
        start = logical // ALIGN * ALIGN
        end = -(-(logical + length) // ALIGN) * ALIGN
        self.map(logical, length)  # refuses anything outside the block map
        end = min(end, self.size)
        buf = self._buffer(end - start)
        mv = memoryview(buf)[: end - start]
        try:
            if start != logical or end != logical + length:
                self.readinto(start, mv)
            mv[logical - start : logical - start + length] = data
            self.write_aligned(start, mv)
        finally:
            mv.release()

    def flush(self) -> None:
        """Make every write durable (device cache flush)."""
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise ImageError(
                f"flush of {self.path} failed",
                why=e.strerror or str(e),
                fix="check the disk",
                path=self.path,
            ) from None

    def close(self) -> None:
        bounce, self._bounce = self._bounce, None
        if bounce is not None:
            close_buffer(bounce)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ImageDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
