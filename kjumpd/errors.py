"""One exception hierarchy for the whole project.

Every error says what failed, why, and what to do (``fix``), and carries the context a
user or a test needs (paths, offsets, figures). ``str(err)`` is a one-line message fit for
a terminal; ``err.to_dict()`` is what the D-Bus API and ``--json`` print.
"""

from __future__ import annotations

from typing import Any

#: how much of a value from outside (a config value, a D-Bus argument) an error echoes
ECHO_LIMIT = 40


def shown(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` cut to about ``limit`` characters, saying how long the whole was:
    an error echoes what it refused, but never a megabyte of it into a log or a reply."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}... ({len(value)} {unit})"
    text = repr(value)
    if len(text) > limit:
        return f"{text[:limit]}... ({len(text)} characters)"
    return text


class KjumpError(Exception):
    """Base class: a failure with a reason and a remedy."""

    #: D-Bus error name suffix (org.kjump.Error.<name>)
    dbus_name = "Failed"

    def __init__(self, what: str, *, why: str = "", fix: str = "", **context: Any) -> None:
        self.what = what
        self.why = why
        self.fix = fix
        self.context = context
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [self.what]
        if self.why:
            parts.append(self.why)
        text = ": ".join(parts)
        if self.fix:
            text += f" (fix: {self.fix})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "what": self.what,
            "why": self.why,
            "fix": self.fix,
            "context": {
                k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                for k, v in self.context.items()
            },
        }


class ConfigError(KjumpError):
    """The configuration file or an argument is not what it must be (names the key)."""

    dbus_name = "InvalidArgs"


class UsageError(ConfigError):
    """A command-line option, argument or combination is wrong: exit code 2, like argparse."""


class SysrootError(KjumpError):
    """A /sys, /proc or /dev file is missing or says something unexpected."""


class UnsupportedError(KjumpError):
    """The running kernel or machine cannot do kexec-jump hibernation."""

    dbus_name = "NotSupported"


class JumpAreaError(KjumpError):
    """The crashkernel= reservation is missing, too small or occupied."""

    dbus_name = "NotSupported"


class MemoryMapError(KjumpError):
    """The memory extent list cannot be built."""


class BlockMapError(KjumpError):
    """The image target cannot be mapped to device blocks safely."""


class TargetError(KjumpError):
    """The image target is missing, too small, or not a kjumpd target."""


class ImageError(KjumpError):
    """An image on disk is unreadable, corrupt, or in the wrong state."""


class ImageFormatError(ImageError):
    """Bad magic, unknown version, or a structure that does not parse."""


class ImageCorruptError(ImageError):
    """A checksum does not match; context names the structure and the offset."""


class ImageAlteredError(ImageCorruptError):
    """An encrypted image's header, metadata or record does not authenticate: its bytes
    were changed after the save (checksums recomputed or not), or are not this image's."""


class ImageKeyError(ImageError):
    """The image key: missing, unreadable, the wrong passphrase, or an image it cannot open."""


class ImageStateError(ImageError):
    """The image is in a state that forbids the requested operation."""


class StaleImageError(ImageError):
    """A filesystem changed after the image was saved; restoring would corrupt it."""


class InitrdError(KjumpError):
    """An initramfs file could not be read (kjumpd.initrd)."""


class JobError(KjumpError):
    """The job handed from the daemon to the save kernel is malformed."""


class QuiesceError(KjumpError):
    """A sysfs write of the quiesce plan failed."""


class FreezeError(KjumpError):
    """FIFREEZE/FITHAW failed for a filesystem."""

    dbus_name = "FreezeFailed"


class TaskFreezeError(KjumpError):
    """User space could not be stopped before the jump (the cgroup freezer within its bound,
    or the kernel's own freezer at ``kexec -e``); names the tasks that did not stop."""

    dbus_name = "TasksNotFrozen"


class FsStampError(KjumpError):
    """A filesystem superblock cannot be read or is not a filesystem kjumpd knows."""


class VolumeError(KjumpError):
    """A LUKS volume or the device-mapper device kjumpd builds over it."""


class BootEntryError(KjumpError):
    """The restore-first boot loader entry cannot be installed, checked or armed."""


class KexecError(KjumpError):
    """kexec-tools or kexec_load(2) failed."""


class JumpError(KexecError):
    """``kexec -e`` came back without the save kernel having written to the image: the
    jump did not happen, or the save kernel stopped before its first write."""

    dbus_name = "JumpFailed"


class PlatformError(KjumpError):
    """Entering S3/S4/S5 or arming the RTC failed."""


class HookError(KjumpError):
    """A sleep hook failed."""


class ShrinkError(KjumpError):
    """Memory could not be brought under the image size limit."""


class BusyError(KjumpError):
    """Another transition is in progress."""

    dbus_name = "Busy"


class CancelledError(KjumpError):
    """The user cancelled the operation."""

    dbus_name = "Cancelled"


class NotAuthorizedError(KjumpError):
    """The caller may not do this."""

    dbus_name = "NotAuthorized"


class DaemonNotRunningError(KjumpError):
    """kjumpctl could not reach kjumpd on the bus."""


class AgentError(KjumpError):
    """The save/restore agent failed."""


class InstallError(KjumpError):
    """kjumpd's own files (templates, contrib/, the save kernel) cannot be found, installed
    or removed."""
