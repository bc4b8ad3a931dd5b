"""boot.json: what the restore-first environment (R) is told about this machine.

Written by ``kjumpctl setup`` (A) into R's initramfs as /etc/kjumpd/boot.json, read by R; the
save kernel's command line in both roles starts from QUICK_BOOT_PARAMS and B_ONLY_PARAMS.
``BootConfig``, UTF-8 JSON, version 1::

    {"version": 1,
     "target": {"uuid": "<uuid>", "offset": <bytes>,
                "volume": {...}},           (only for a target inside a LUKS volume)
     "normal": {"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img" | null,
                "cmdline": "root=... ro quiet"},
     "save": {"kernel": "/kjump/save/bzImage", "initrd": "/kjump/save/initrd.cpio.gz",
              "hash": "sha256:<64 hex>", "kernel_sha256": "<hex>", "initrd_sha256": "<hex>",
              "cmdline": "console=ttyS0 nokaslr panic=1"},
     "jump_area": [start, size],
     "max_attempts": 3}

``target.volume`` (kjumpd.linux.luks.Volume, without its key): R unlocks that volume with
the user's passphrase, builds its mapping and finds the target inside it (``offset`` is then
a byte offset in the volume's plaintext).

``jump_area`` is A's reservation when R was set up, for the record: R loads the save kernel
into the area the image header names (A's reservation when it saved). Paths are paths inside
R's initramfs. ``save.hash`` is the save kernel hash the daemon records
in the image header ("sha256:" + SHA-256 of the save kernel file, see ``save_kernel_hash``;
compared with the header); ``kernel_sha256``/``initrd_sha256`` are the
SHA-256 of the two files R will load (R checks its own copies against them before trusting
``save.hash``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from kjumpd.errors import ConfigError

BOOT_CONFIG_VERSION = 1
BOOT_CONFIG_PATH = "/etc/kjumpd/boot.json"
DEFAULT_MAX_ATTEMPTS = 3

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")

#: Kernel parameters kjumpd adds for its own short-lived kernels, which run inside the jump
#: area (B in both roles, and R's boot entry):
#: - no legacy BSD ptys. CONFIG_LEGACY_PTYS (Debian's kernels and savekernel/'s have it, 256
#:   pairs) makes pty_init register 512 devices at every boot, one of the costliest
#:   initcalls of a boot that the user waits for, for devices neither B nor R ever opens;
#: - a 4 MiB bounce buffer pool in one area instead of the default 64 MiB. x86 sets up
#:   swiotlb whenever the kernel's memory map reaches above 4 GiB, which B's does on every
#:   machine with more than about 3.5 GiB of RAM (A's RAM is ACPI data to it); 64 MiB out
#:   of a 128 MiB jump area leaves B too little to unpack its own initramfs. The pool only
#:   serves devices that cannot reach a buffer's address; B's own buffers lie in the jump
#:   area.
QUICK_BOOT_PARAMS = "pty.legacy_count=0 swiotlb=2048,1"
#: Kernel parameters for B alone, in both roles: its TPM drivers (TIS, CRB) are not started.
#: B never uses the TPM; a driver's probe would start and self-test it at every hibernation
#: (up to a second on a discrete chip) while A's driver holds it suspended. R keeps them: it
#: unseals a LUKS volume's TPM2 token.
B_ONLY_PARAMS = "initcall_blacklist=init_tis,crb_acpi_driver_init"


@dataclass(frozen=True)
class KernelSpec:
    kernel: str
    initrd: str | None
    cmdline: str


@dataclass(frozen=True)
class BootConfig:
    target_uuid: str
    target_offset: int
    normal: KernelSpec
    save: KernelSpec
    save_hash: str
    save_kernel_sha256: str
    save_initrd_sha256: str
    jump_area: tuple[int, int]
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    target_volume: Any = None  # kjumpd.linux.luks.Volume

    def to_dict(self) -> dict[str, Any]:
        target: dict[str, Any] = {"uuid": self.target_uuid, "offset": self.target_offset}
        if self.target_volume is not None:
            target["volume"] = self.target_volume.to_dict()
        return {
            "version": BOOT_CONFIG_VERSION,
            "target": target,
            "normal": {
                "kernel": self.normal.kernel,
                "initrd": self.normal.initrd,
                "cmdline": self.normal.cmdline,
            },
            "save": {
                "kernel": self.save.kernel,
                "initrd": self.save.initrd,
                "cmdline": self.save.cmdline,
                "hash": self.save_hash,
                "kernel_sha256": self.save_kernel_sha256,
                "initrd_sha256": self.save_initrd_sha256,
            },
            "jump_area": list(self.jump_area),
            "max_attempts": self.max_attempts,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> BootConfig:
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # nested too deep
            raise _cfg("is not JSON", str(e)) from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Any) -> BootConfig:
        if not isinstance(d, dict):
            raise _cfg("is not a JSON object")
        if d.get("version") != BOOT_CONFIG_VERSION:
            raise _cfg(
                f"has version {d.get('version')!r}",
                f"this kjumpd reads version {BOOT_CONFIG_VERSION}",
            )
        t, n, s = _obj(d, "target"), _obj(d, "normal"), _obj(d, "save")
        uid = _str(t, "target.uuid")
        if not _UUID_RE.match(uid):
            raise _cfg(f"target.uuid {uid!r} is not a lower-case UUID")
        offset = _int(t, "target.offset")
        if offset % 4096:
            raise _cfg(f"target.offset {offset} is not 4096-aligned")
        save_hash = _str(s, "save.hash")
        if not _HASH_RE.match(save_hash):
            raise _cfg("save.hash must be sha256:<64 hex>")
        ksum, isum = _str(s, "save.kernel_sha256"), _str(s, "save.initrd_sha256")
        if not (_HEX_RE.match(ksum) and _HEX_RE.match(isum)):
            raise _cfg("save.kernel_sha256 and save.initrd_sha256 must be 64 hex digits")
        area = d.get("jump_area")
        if not (
            isinstance(area, list)
            and len(area) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in area)
            and area[1] > 0
            and area[0] % 4096 == 0
            and area[1] % 4096 == 0
        ):
            raise _cfg("jump_area must be [start, size], page aligned, size > 0")
        attempts = d.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
        if not isinstance(attempts, int) or isinstance(attempts, bool) or not 1 <= attempts <= 100:
            raise _cfg("max_attempts must be an integer 1..100")
        save_initrd = _str(s, "save.initrd")
        volume = None
        if t.get("volume") is not None:
            from kjumpd.errors import VolumeError
            from kjumpd.linux.luks import Volume

            try:
                volume = Volume.from_dict(t["volume"])
            except VolumeError as e:
                raise _cfg(f"target.volume: {e.what}", e.why) from None
        return cls(
            target_uuid=uid,
            target_offset=offset,
            normal=KernelSpec(
                _str(n, "normal.kernel"),
                _opt_str(n, "normal.initrd"),
                _str(n, "normal.cmdline", empty=True),
            ),
            save=KernelSpec(
                _str(s, "save.kernel"), save_initrd, _str(s, "save.cmdline", empty=True)
            ),
            save_hash=save_hash,
            save_kernel_sha256=ksum,
            save_initrd_sha256=isum,
            jump_area=(area[0], area[1]),
            max_attempts=attempts,
            target_volume=volume,
        )


def _cfg(what: str, why: str = "") -> ConfigError:
    return ConfigError(
        f"{BOOT_CONFIG_PATH} {what}",
        why=why,
        fix="run `kjumpctl setup` again to rewrite the restore-first files",
        path=BOOT_CONFIG_PATH,
    )


def _obj(d: dict[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key)
    if not isinstance(v, dict):
        raise _cfg(f"lacks the object {key!r}")
    return v


def _str(d: dict[str, Any], dotted: str, empty: bool = False) -> str:
    v = d.get(dotted.rsplit(".", 1)[-1])
    if not isinstance(v, str) or (not empty and not v):
        raise _cfg(f"{dotted} must be a{'' if empty else ' non-empty'} string")
    return v


def _opt_str(d: dict[str, Any], dotted: str) -> str | None:
    v = d.get(dotted.rsplit(".", 1)[-1])
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise _cfg(f"{dotted} must be a non-empty string or null")
    return v


def _int(d: dict[str, Any], dotted: str) -> int:
    v = d.get(dotted.rsplit(".", 1)[-1])
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _cfg(f"{dotted} must be a non-negative integer")
    return v


def save_kernel_hash(kernel_sha256: str, initrd_sha256: str = "") -> str:
    """The save kernel's identity as the daemon records it in a job and the image header:
    "sha256:" + the SHA-256 of the save kernel file (kjumpd/daemon/transaction.py). The initramfs is
    not part of it; R checks its own copy of the initramfs against boot.json instead."""
    return "sha256:" + kernel_sha256
