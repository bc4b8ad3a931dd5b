"""Whether a hibernation encrypts its image, and to which key ([encryption] in kjumpd.toml).

- ``auto`` (default): encrypt whenever the image key exists; without one, refuse when the
  root filesystem lies on dm-crypt (the image would hold what the disk encryption protects,
  in the clear, on a disk anyone can read).
- ``required``: refuse without the image key.
- ``off``: never encrypt.

The daemon needs only the key's public half: hibernation stays unattended. Each image gets
a fresh random key, sealed to it (kjumpd.image.seal); the key itself goes to the save kernel
in the job, in memory only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kjumpd import initrd
from kjumpd.daemon import blockmap
from kjumpd.daemon.config import Config
from kjumpd.errors import ImageKeyError, InitrdError, KjumpError
from kjumpd.linux import mountinfo
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

CREATE = "kjumpctl image-key create"


@dataclass(frozen=True)
class EncryptionPlan:
    public: bytes | None  # None: the image is saved in plaintext
    key_id: str
    detail: str  # what `check` shows

    def job_fields(self) -> dict[str, Any]:
        """The job's image_key and seal (a fresh image key per call), or nothing."""
        if self.public is None:
            return {}
        from kjumpd.image import seal

        key = seal.new_image_key()
        return {"image_key": key.hex(), "seal": seal.seal_key(self.public, key)}


def wanted(sysroot: Sysroot, config: Config) -> bool:
    """Images are to be encrypted: the save kernel and R need python3-cryptography."""
    return config.encryption != "off" and sysroot.path(config.image_key).is_file()


def save_initramfs_can_encrypt(sysroot: Sysroot, config: Config) -> bool:
    """B's installed initramfs holds the cryptography package (read once per file
    version: the preflight runs every 30 s)."""
    path = sysroot.path(config.save_initramfs)
    try:
        return initrd.per_version("can encrypt", path, lambda: _can_encrypt(path))
    except OSError:
        return False  # the "save initramfs" item names this


def _can_encrypt(path: Path) -> bool:
    try:
        names = [e.name for e in initrd.read_archive(path)]
    except InitrdError as e:
        # not readable here (a zstd archive without the zstd tool): B's own import of
        # the package is the check, and a save without it aborts and rolls back
        log.warning("cannot list %s (%s): assuming it can encrypt", path, e)
        return True
    except (KjumpError, OSError):
        return False  # not an archive at all: the save kernel could not boot from it
    return any(n.endswith("/cryptography/__init__.py") for n in names)


def encrypted_root(sysroot: Sysroot) -> str | None:
    """The dm-crypt device under the root filesystem, or None."""
    mounts = mountinfo.parse(sysroot.read_text("/proc/self/mountinfo", default=""))
    root = [m for m in mounts if m.mountpoint == "/"]
    return blockmap.encrypted_device(sysroot, root[-1].devno) if root else None


def plan(sysroot: Sysroot, config: Config, target_volume: Any = None) -> EncryptionPlan:
    """What this hibernation does about encryption; ImageKeyError when policy refuses it.
    ``target_volume``: the LUKS volume (kjumpd.linux.luks.Volume) the target is inside; it
    encrypts the image by itself, so the policy asks no image key then."""
    from kjumpd.image import seal

    mode = config.encryption
    if mode == "off":
        return EncryptionPlan(None, "", 'off ([encryption] mode = "off"): images in plaintext')
    path = sysroot.path(config.image_key)
    if path.exists():
        kf = seal.KeyFile.load(path)
        seal._crypto()  # the package must be here before anything is frozen
        if not save_initramfs_can_encrypt(sysroot, config):
            raise ImageKeyError(
                "the save kernel's initramfs cannot encrypt images",
                why=f"{config.save_initramfs} has no python3-cryptography (it was built "
                "before the image key existed)",
                fix="run `kjumpctl install`: it rebuilds the initramfs and the restore-first "
                "entry with the key",
            )
        return EncryptionPlan(
            kf.public,
            kf.key_id,
            f"AES-256-GCM, the image key sealed to {config.image_key} (key id {kf.key_id})",
        )
    if mode == "required":
        raise ImageKeyError(
            "images must be encrypted and there is no image key",
            why=f'[encryption] mode = "required" and {config.image_key} does not exist',
            fix=f"run `{CREATE}`, then `kjumpctl install --refresh-boot-entry`",
        )
    if target_volume is not None:
        return EncryptionPlan(
            None,
            "",
            f"by LUKS volume {target_volume.uuid} that holds the target ({target_volume.cipher}"
            "; not authenticated: an image key adds that)",
        )
    crypt = encrypted_root(sysroot)
    if crypt is not None:
        raise ImageKeyError(
            "the root filesystem is encrypted and the image would not be",
            why=f"/ lies on dm-crypt ({crypt}); without an image key the hibernation image "
            "would hold its data, and this session's, in plaintext",
            fix=f"run `{CREATE}` (a passphrase asked for at each restore), then "
            '`kjumpctl install --refresh-boot-entry`; or set [encryption] mode = "off" '
            "to accept plaintext images",
        )
    return EncryptionPlan(None, "", f"none (no image key at {config.image_key})")
