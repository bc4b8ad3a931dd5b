"""The hibernation modes: what happens once the image is saved. Importable without the
config module: kjumpctl builds its --mode choices from this at every start, and the save
kernel's agent checks the job's mode against it."""

from __future__ import annotations

from enum import StrEnum


class Mode(StrEnum):
    PLATFORM = "platform"  # ACPI S4 through /dev/snapshot
    SHUTDOWN = "shutdown"  # power off
    REBOOT = "reboot"
    SUSPEND = "suspend"  # S3 with the image as a safety net (suspend-to-both)
    TEST = "test"  # drop the image, continue
    CHECKPOINT = "checkpoint"  # keep the image, continue


#: the mode names, in the order the documentation lists them
MODES: tuple[str, ...] = tuple(m.value for m in Mode)
