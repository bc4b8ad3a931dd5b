"""The one file hash: SHA-256 of a file's bytes, as ``sha256sum`` prints it (lower-case hex).
Configuration, boot.json and the job name the save kernel's files by it.

The files hashed are kernels and initramfs images, checked before every hibernation: read
once and left in the page cache, they would be saved in the image (a distribution's vmlinuz
is 12-15 MiB of compressed bytes). So the hash drops the file's clean pages afterwards
(``POSIX_FADV_DONTNEED``); only the boot loader reads these files again.
"""

from __future__ import annotations

import hashlib
import os

from kjumpd.linux.pagecache import forget_fd


def sha256_file(path: os.PathLike[str] | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
        forget_fd(f.fileno())
    return h.hexdigest()
