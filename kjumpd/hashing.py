"""The one file hash: SHA-256 of a file's bytes, as ``sha256sum`` prints it (lower-case hex).
Configuration, boot.json and the job name the save kernel's files by it."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: os.PathLike[str] | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
