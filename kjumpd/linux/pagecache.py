"""Dropping a file's clean pages from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``).

Whatever the page cache holds when the system hibernates is memory the image saves. Files
that only the boot loader or the kernel's kexec reads again (kernels, initramfs images, R's
boot image) have no business staying there after kjumpd read or wrote them. Advice only:
dirty pages are not dropped (write them first), and a kernel built without
CONFIG_ADVISE_SYSCALLS answers ENOSYS, which changes nothing but the image's size.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def forget_fd(fd: int) -> str:
    """Drop the clean cached pages of the open file ``fd``. Best effort: "" when the advice
    was taken, else why not (a pipe, a kernel without fadvise: nothing is lost)."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        log.debug("fadvise(DONTNEED) of fd %d: %s", fd, e)
        return str(e)
    return ""


def forget(path: os.PathLike[str] | str) -> None:
    """Drop the clean cached pages of the file at ``path``. Best effort: a file that cannot
    be opened is left alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        forget_fd(fd)
    finally:
        os.close(fd)


def read_once(path: os.PathLike[str] | str) -> bytes:
    """The bytes of the file at ``path``, its pages dropped from the cache after reading: for
    files kjumpd reads once and only the boot loader or kexec reads again. OSError as
    ``Path.read_bytes``."""
    with open(path, "rb") as f:
        data = f.read()
        forget_fd(f.fileno())
    return data
