"""Pages of this process locked in RAM, and the page frames they occupy.

Memory another kernel reads through /dev/mem must stay where it was found: the job a parked
save kernel takes from the main kernel's memory (kjumpd.daemon.warm) and the save kernel's
own jump-back anchor page (kjumpd.agent.jumpback). Such pages are an anonymous mapping,
mlock(2)ed, located through /proc/self/pagemap: one little-endian u64 per virtual page, bit
63 "present", bits 0-54 the page frame number (0 unless the reader has CAP_SYS_ADMIN).

Standard library only: this runs in the save kernel's initramfs too.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

from kjumpd.errors import KexecError

PAGE = 4096
PAGEMAP = "/proc/self/pagemap"
_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class LockedPages:
    """``data`` in locked, page-aligned memory of this process (zero padded to whole
    pages); ``what`` names them in errors (KexecError, with ``fix``). :meth:`close` zeroes
    and unlocks them."""

    def __init__(self, data: bytes, what: str, fix: str = "", pagemap: str = PAGEMAP) -> None:
        self.what, self.fix, self.pagemap = what, fix, pagemap
        size = max(PAGE, -(-len(data) // PAGE) * PAGE)
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.map[: len(data)] = data
        self._view = ctypes.c_char.from_buffer(self.map)  # released before the unmap
        self.address = ctypes.addressof(self._view)
        if _libc().mlock(ctypes.c_void_p(self.address), ctypes.c_size_t(size)) != 0:
            err = ctypes.get_errno()
            self.close()
            raise KexecError(f"cannot lock {what} in memory", why=os.strerror(err), fix=fix)

    def frames(self) -> list[int]:
        """The page frame number of each page, in order (KexecError when one is unknown)."""
        n = len(self.map) // PAGE
        try:
            with open(self.pagemap, "rb", buffering=0) as f:
                raw = os.pread(f.fileno(), 8 * n, self.address // PAGE * 8)
        except OSError as e:
            raise KexecError(
                f"cannot locate {self.what}", why=f"{self.pagemap}: {e.strerror or e}", fix=self.fix
            ) from None
        entries = [e for (e,) in struct.iter_unpack("<Q", raw[: len(raw) // 8 * 8])]
        if len(entries) != n or any(not e & _PRESENT or not e & _PFN_MASK for e in entries):
            raise KexecError(
                f"cannot locate {self.what}",
                why=f"{self.pagemap} shows no page frame (not CAP_SYS_ADMIN?)",
                fix=self.fix,
            )
        return [e & _PFN_MASK for e in entries]

    def close(self) -> None:
        if self.map.closed:
            return
        self.map[:] = bytes(len(self.map))
        _libc().munlock(ctypes.c_void_p(self.address), ctypes.c_size_t(len(self.map)))
        self.address = 0
        del self._view
        self.map.close()
