"""Reading an initramfs as the kernel does: its first archive, gzip'd, lz4'd (the "legacy"
stream of ``lz4 -l``), zstd'd or plain newc cpio (kjumpd.cpio); and writing the lz4 one.

The kernel's initramfs unpacker recognises the compressions by these magics
(lib/decompress.c). An lz4 legacy stream is the magic, then blocks of (u32 little-endian
compressed size, lz4 block) of LZ4_LEGACY_BLOCK unpacked bytes each but the last; it ends
where no whole block follows (zero padding, or the next archive). gzip and lz4 are read in
Python (zlib, python3-lz4), and lz4 is written there too; zstd is read with the host's
``zstd`` tool.
"""

from __future__ import annotations

import gzip
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kjumpd import cpio, zstdframe
from kjumpd.errors import InitrdError, KjumpError
from kjumpd.linux import pagecache

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = zstdframe.MAGIC
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZ4_LEGACY_BLOCK = 8 << 20


#: lz4's high-compression level for written streams: what ``lz4 -l -9`` writes
LZ4_LEGACY_LEVEL = 9


def lz4_legacy_compress(raw: bytes) -> bytes:
    """``raw`` as an lz4 legacy stream, the one ``lz4 -l -9`` writes (python3-lz4: no lz4
    tool needed). It has no end mark: what follows it must start with a zero size or
    another archive's magic."""
    import lz4.block

    out = [LZ4_LEGACY_MAGIC]
    view = memoryview(raw)
    for at in range(0, len(raw), LZ4_LEGACY_BLOCK):
        block = lz4.block.compress(
            view[at : at + LZ4_LEGACY_BLOCK],
            mode="high_compression",
            compression=LZ4_LEGACY_LEVEL,
            store_size=False,
        )
        out += (len(block).to_bytes(4, "little"), block)
    return b"".join(out)


def lz4_legacy_blocks(blob: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each compressed block of the lz4 legacy stream at blob's start."""
    out = []
    pos = 4
    while pos + 4 <= len(blob):
        size = int.from_bytes(blob[pos : pos + 4], "little")
        if size == 0 or blob[pos : pos + 4] == LZ4_LEGACY_MAGIC or pos + 4 + size > len(blob):
            break
        out.append((pos + 4, size))
        pos += 4 + size
    return out


def lz4_legacy_length(blob: bytes) -> int:
    """Bytes of the lz4 legacy stream at the start of blob (magic and whole blocks)."""
    blocks = lz4_legacy_blocks(blob)
    return blocks[-1][0] + blocks[-1][1] if blocks else 4


def decompress(blob: bytes) -> bytes:
    """The first archive of a gzip'd, lz4'd, zstd'd or plain initramfs, uncompressed."""
    if blob[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(blob)
        except (OSError, EOFError) as e:
            raise InitrdError("the gzip archive cannot be read", why=str(e)) from None
    if blob[:4] == LZ4_LEGACY_MAGIC:
        import lz4.block

        try:
            return b"".join(
                lz4.block.decompress(blob[o : o + n], uncompressed_size=LZ4_LEGACY_BLOCK)
                for o, n in lz4_legacy_blocks(blob)
            )
        except lz4.block.LZ4BlockError as e:
            raise InitrdError("the lz4 archive cannot be read", why=str(e)) from None
    if blob[:4] == ZSTD_MAGIC:
        end = zstdframe.frame(blob).length  # the padding / next archive stay out
        return _unpack_with("zstd", ["-d", "-q", "-c", "-"], blob[:end])
    return blob


def _unpack_with(tool: str, args: list[str], data: bytes) -> bytes:
    """``data`` decompressed by the host's ``tool``."""
    try:
        proc = subprocess.run([tool, *args], input=data, capture_output=True, check=False)
    except FileNotFoundError:
        raise InitrdError(
            f"a {tool} archive needs the {tool} tool to be read", fix=f"apt-get install {tool}"
        ) from None
    if proc.returncode != 0:
        raise InitrdError(
            f"the {tool} archive cannot be read", why=proc.stderr.decode(errors="replace").strip()
        )
    return proc.stdout


def read_archive(path: str | Path) -> list[cpio.Entry]:
    """The members of an initramfs file's first archive (its pages dropped from the page
    cache after reading: kernels and the boot loader read these files, not kjumpd, and a
    cached copy would be saved in the next image)."""
    return cpio.read(decompress(pagecache.read_once(path)))


T = TypeVar("T")
#: (what, path) -> (the file's version, the answer): see per_version
_ANSWERS: dict[tuple[str, str], tuple[tuple[int, ...], Any]] = {}


def per_version(what: str, path: str | Path, compute: Callable[[], T]) -> T:
    """``compute()``'s answer about the file at ``path``, computed again only once the file
    changed: the preflight asks every 30 s about the installed archives. OSError when the
    file is not there."""
    st = os.stat(path)
    version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _ANSWERS.get((what, str(path)))
    if hit is None or hit[0] != version:
        hit = _ANSWERS[(what, str(path))] = (version, compute())
    answer: T = hit[1]
    return answer


def _names_or_error(path: str | Path) -> frozenset[str] | KjumpError:
    try:
        return frozenset(e.name for e in read_archive(path))
    except KjumpError as e:
        return e


def member_names(path: str | Path) -> frozenset[str]:
    """The member names of ``read_archive(path)``, read once per version of the file; an
    archive that does not read raises the same error each time without being read again."""
    got = per_version("names", path, lambda: _names_or_error(path))
    if isinstance(got, KjumpError):
        raise got
    return got


def lz4_legacy_size(path: str | Path) -> int | None:
    """The unpacked size of the lz4 legacy stream in the file at ``path``: LZ4_LEGACY_BLOCK
    per block but the last, whose size comes from unpacking it (None when the stream does
    not parse or the file cannot be read). Read once per version of the file, and dropped
    from the page cache after reading (the next image would save it)."""
    try:
        return per_version("lz4 size", path, lambda: _lz4_legacy_size_of(path))
    except OSError:
        return None


def _lz4_legacy_size_of(path: str | Path) -> int | None:
    try:
        import lz4.block

        blob = pagecache.read_once(path)
    except (ImportError, OSError):
        return None
    blocks = lz4_legacy_blocks(blob)
    if not blocks:
        return None
    o, n = blocks[-1]
    try:
        tail = len(lz4.block.decompress(blob[o : o + n], uncompressed_size=LZ4_LEGACY_BLOCK))
    except lz4.block.LZ4BlockError:
        return None
    return (len(blocks) - 1) * LZ4_LEGACY_BLOCK + tail
