"""The job slot: how a parked save kernel gets its next job without being loaded again
(format version 1).

A warm save kernel (kjumpd.daemon.warm) was booted ahead of time and jumped back; it waits
inside its reboot(2) for the main kernel's next jump. The main kernel cannot write into the
jump area (a distribution kernel refuses /dev/mem writes to RAM), and loading B again would
boot it again. So the job stays in the main kernel's memory, in locked pages, and this 4 KiB
slot on the target says where: written by A (O_DIRECT, through the block map) before the
jump, read by B after it resumes, which reads those pages through /dev/mem as it reads the
rest of A's memory. The slot never holds a key; the job's bytes, which may hold the image
key and the volume key, stay in RAM.

B answers in the same slot: PARKED once its warm-up boot found the target (A checks that
the generation is the one it asked for), REFUSED(reason) when a job it was handed cannot be
run (A then loads B cold and jumps again).

Place: the last 4 KiB of the 64 KiB the target superblock owns (logical [60 KiB, 64 KiB)),
free whenever the block map has at most MAX_SLOT_EXTENTS extents. A target with more has no
slot, and its save kernel is always loaded cold.

Layout (little-endian)::

    0   8  magic b"KJUMPJSL"
    8   2  version (1)
    10  1  kind: 1 JOB (A -> B), 2 PARKED (B -> A), 3 REFUSED (B -> A)
    11  1  reserved (0)
    12  4  run count R (0..MAX_RUNS; 0 unless JOB)
    16  8  generation: a JOB's is above every generation the parked B has seen; PARKED and
           REFUSED repeat the generation they answer
    24  8  job length L (JOB; 1..MAX_JOB_BYTES), else 0
    32 32  SHA-256 of the job's L bytes (JOB), else zeros
    64  2  reason length N (REFUSED; at most MAX_REASON), else 0
    66 200 reason: N bytes of UTF-8, zero padded
    266 16R runs: R x (physical address u64, length u64), page aligned, not overlapping,
           in the job's byte order; together they hold at least L bytes
    .   4  CRC-32 of every byte before it

An all-zero slot was never written (a new target is zeros): read_slot returns None for it.

Standard library only: this runs in the save kernel's initramfs.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kjumpd.errors import ImageCorruptError, ImageFormatError
from kjumpd.image.format import SUPERBLOCK_SIZE, superblock_length

VERSION = 1
MAGIC = b"KJUMPJSL"
SLOT_SIZE = 4096
SLOT_OFFSET = SUPERBLOCK_SIZE - SLOT_SIZE
PAGE = 4096
#: block maps of at most this many extents leave the slot free (superblock + CRC < 60 KiB)
MAX_SLOT_EXTENTS = (SLOT_OFFSET - superblock_length(0)) // (
    superblock_length(1) - superblock_length(0)
)
MAX_REASON = 200
MAX_JOB_BYTES = 16 << 20

_FIXED = struct.Struct("<8sHBBIQQ32sH")  # 66 bytes
_REASON_END = _FIXED.size + MAX_REASON  # 266
_RUN = struct.Struct("<QQ")
MAX_RUNS = (SLOT_SIZE - _REASON_END - 4) // _RUN.size


class SlotKind(enum.IntEnum):
    JOB = 1
    PARKED = 2
    REFUSED = 3


@dataclass(frozen=True)
class JobSlot:
    kind: SlotKind
    generation: int
    length: int = 0
    digest: bytes = bytes(32)
    runs: tuple[tuple[int, int], ...] = ()
    reason: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.generation < 1 << 64:
            raise ImageFormatError(f"job slot generation {self.generation} is out of range")
        if self.kind is SlotKind.JOB:
            if not 0 < self.length <= MAX_JOB_BYTES:
                raise ImageFormatError(f"job slot length {self.length} is out of range")
            if len(self.digest) != 32:
                raise ImageFormatError("job slot digest is not 32 bytes")
            check_runs(self.runs, self.length)
        elif self.runs or self.length or any(self.digest):
            raise ImageFormatError(f"a {self.kind.name} job slot carries no job")
        if len(self.reason.encode("utf-8")) > MAX_REASON:
            raise ImageFormatError(f"job slot reason is longer than {MAX_REASON} bytes")

    @classmethod
    def job(cls, generation: int, data: bytes, runs: Sequence[tuple[int, int]]) -> JobSlot:
        return cls(SlotKind.JOB, generation, len(data), hashlib.sha256(data).digest(), tuple(runs))

    @classmethod
    def refused(cls, generation: int, reason: str) -> JobSlot:
        return cls(SlotKind.REFUSED, generation, reason=clip(reason))

    def pack(self) -> bytes:
        reason = self.reason.encode("utf-8")
        head = _FIXED.pack(
            MAGIC,
            VERSION,
            int(self.kind),
            0,
            len(self.runs),
            self.generation,
            self.length,
            self.digest,
            len(reason),
        )
        body = head + reason.ljust(MAX_REASON, b"\0")
        body += b"".join(_RUN.pack(a, n) for a, n in self.runs)
        body += struct.pack("<I", zlib.crc32(body))
        return body.ljust(SLOT_SIZE, b"\0")

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> JobSlot:
        data = bytes(data)
        if len(data) < SLOT_SIZE:
            raise ImageFormatError(f"job slot is {len(data)} bytes, not {SLOT_SIZE}")
        magic, version, kind, _r, nruns, gen, length, digest, nreason = _FIXED.unpack_from(data)
        if magic != MAGIC:
            raise ImageFormatError("no job slot here", why=f"magic {magic!r}")
        if version != VERSION:
            raise ImageFormatError(
                f"job slot version {version} is not supported",
                fix="use the same kjumpd version in the main and the save kernel",
            )
        if nruns > MAX_RUNS or nreason > MAX_REASON:
            raise ImageCorruptError(
                "job slot is corrupt", why=f"{nruns} runs, reason of {nreason} bytes"
            )
        end = _REASON_END + nruns * _RUN.size
        (crc,) = struct.unpack_from("<I", data, end)
        if crc != zlib.crc32(data[:end]):
            raise ImageCorruptError("job slot is corrupt", why="CRC mismatch")
        try:
            skind = SlotKind(kind)
            reason = data[_FIXED.size : _FIXED.size + nreason].decode("utf-8")
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageCorruptError("job slot is corrupt", why=str(e)) from None
        runs = tuple(_RUN.unpack_from(data, _REASON_END + i * _RUN.size) for i in range(nruns))
        return cls(skind, gen, length, digest, runs, reason)

    def describe(self) -> str:
        text = f"{self.kind.name} generation {self.generation}"
        if self.kind is SlotKind.JOB:
            text += f", {self.length} bytes in {len(self.runs)} run(s)"
        if self.reason:
            text += f": {self.reason}"
        return text


def clip(reason: str) -> str:
    """``reason`` cut to MAX_REASON bytes of UTF-8 on a character boundary."""
    raw = reason.encode("utf-8")[:MAX_REASON]
    return raw.decode("utf-8", errors="ignore")


def check_runs(runs: Iterable[tuple[int, int]], length: int) -> None:
    """ImageFormatError unless ``runs`` are page aligned, within 64 bits, not overlapping,
    at most MAX_RUNS, and hold ``length`` bytes."""
    runs = list(runs)
    if not 0 < len(runs) <= MAX_RUNS:
        raise ImageFormatError(f"a job slot holds 1..{MAX_RUNS} runs, not {len(runs)}")
    spans = []
    for a, n in runs:
        if a % PAGE or n % PAGE or n <= 0 or a < 0 or a + n > 1 << 64:
            raise ImageFormatError(f"job slot run [{a:#x}, +{n:#x}) is not whole pages")
        spans.append((a, a + n))
    spans.sort()
    for (_a0, b0), (a1, _b1) in zip(spans, spans[1:]):
        if a1 < b0:
            raise ImageFormatError(f"job slot runs overlap at {a1:#x}")
    if sum(n for _a, n in runs) < length:
        raise ImageFormatError(f"job slot runs hold fewer than the job's {length} bytes")


def runs_of_frames(frames: Sequence[int]) -> list[tuple[int, int]]:
    """Page frame numbers, in the buffer's order -> (physical address, length) runs,
    physically contiguous neighbours merged."""
    runs: list[list[int]] = []
    for pfn in frames:
        addr = pfn * PAGE
        if runs and runs[-1][0] + runs[-1][1] == addr:
            runs[-1][1] += PAGE
        else:
            runs.append([addr, PAGE])
    return [(a, n) for a, n in runs]


def slot_free(extent_count: int) -> bool:
    """Whether a target whose block map has ``extent_count`` extents has a job slot."""
    return 0 < extent_count <= MAX_SLOT_EXTENTS


def read_slot(dev: Any) -> JobSlot | None:
    """The target's job slot (an ImageDevice), None when it was never written."""
    data = dev.read(SLOT_OFFSET, SLOT_SIZE)
    if not any(data):
        return None
    return JobSlot.unpack(data)


def write_slot(dev: Any, slot: JobSlot) -> None:
    """Write the slot and flush (the reader is another kernel, after a jump)."""
    dev.write(SLOT_OFFSET, slot.pack())
    dev.flush()


def job_bytes(slot: JobSlot, read: Any) -> bytes:
    """The job a JOB slot points at, read through ``read(address, length)``; refused
    (ImageCorruptError) when its digest does not match: the pages moved or were reused."""
    parts, left = [], slot.length
    for addr, n in slot.runs:
        if left <= 0:
            break
        take = min(n, left)
        parts.append(bytes(read(addr, take)))
        left -= take
    data = b"".join(parts)
    if hashlib.sha256(data).digest() != slot.digest:
        raise ImageCorruptError(
            "the job in the main kernel's memory does not match the job slot",
            why="SHA-256 differs: its pages moved or were reused after the slot was written",
            fix="nothing to do: the main kernel loads the save kernel again",
        )
    return data
