"""/etc/kjumpd/kjumpd.toml, validated: every error names the key and the expected form.

See contrib/kjumpd.toml for a commented example. Sizes are integers (bytes) or strings
with a binary suffix ("128M", "8G", "512K"); addresses may be hex strings ("0x20000000").
A missing file means all defaults (which are enough for ``kjumpctl check`` to say what
is missing).
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, fields
from typing import Any

from kjumpd.errors import ConfigError
from kjumpd.job import MAX_CHUNK_SIZE
from kjumpd.modes import MODES
from kjumpd.sysroot import Sysroot

CONFIG_PATH = "/etc/kjumpd/kjumpd.toml"
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.I)


def parse_size(value: Any, key: str) -> int:
    """123, "123", "128M", "8G", "0x20000000" -> bytes; ConfigError naming ``key`` otherwise."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int) and value >= 0:
        return value
    elif isinstance(value, str):
        v = value.strip()
        if v.lower().startswith("0x"):
            try:
                return int(v, 16)
            except ValueError:
                pass
        m = _SIZE_RE.match(v)
        if m and len(m.group(1)) <= 30:  # more digits: no size, and past int()'s limit
            return int(m.group(1)) * _SUFFIX[m.group(2).upper()]
    raise ConfigError(
        f"{key} must be a size",
        why=f"got {value!r}",
        fix=f'write {key} = "128M" (bytes, or K/M/G/T suffix, or 0x hex)',
        key=key,
    )


def format_size(n: int) -> str:
    for suf in ("T", "G", "M", "K"):
        if n and n % _SUFFIX[suf] == 0:
            return f"{n // _SUFFIX[suf]}{suf}"
    return str(n)


@dataclass(frozen=True)
class UnbindQuirk:
    bus: str  # "pci", "usb", "platform", ...
    device: str  # "0000:00:1f.3"
    driver: str  # "snd_hda_intel"


@dataclass(frozen=True)
class Config:
    # [target]
    target: str = "/var/lib/kjumpd/image"
    target_size: int = 0  # 0: setup sizes it from RAM
    # [jump_area]
    jump_area_start: int | None = None  # expected crashkernel offset (None: any)
    jump_area_size: int | None = None  # expected crashkernel size (None: computed)
    agent_memory: int = 64 << 20  # working memory the agent needs in the area
    # [hibernate]
    mode: str = "platform"
    image_size_limit: int = 0  # 0: no limit (a hard limit: refuses above it)
    image_size: int = -1  # target, best effort (shrink.py); -1 "auto": 2/5 of RAM
    compression: str = "lz4"
    chunk_size: int = 1 << 20
    cancel_key: bool = True
    free_page_exclusion: bool = True  # B leaves A's free pages out of the image
    free_page_check: bool = False  # debug (A with init_on_free=1): B verifies them
    # [save_kernel]
    save_kernel: str = "/usr/lib/kjumpd/save/bzImage"
    save_initramfs: str = "/usr/lib/kjumpd/save/initramfs.cpio.gz"
    save_kernel_sha256: str = ""
    save_initramfs_sha256: str = ""
    save_append: str = "console=ttyS0 nokaslr panic=1"
    kexec: str = "kexec"  # kexec-tools binary (PATH lookup)
    # [quiesce]
    disable_wakeup: bool = True
    keep_wakeup: tuple[str, ...] = ()  # device names/paths keeping power/wakeup
    runtime_pm_on: bool = True
    network_down: bool = True
    unbind: tuple[UnbindQuirk, ...] = ()
    # [hooks]
    hook_dirs: tuple[str, ...] = ("/usr/lib/systemd/system-sleep", "/etc/kjumpd/sleep.d")
    hook_policy: str = "abort"  # abort | continue
    # [timeouts] seconds
    timeout_hooks: float = 30.0
    timeout_inhibitors: float = 5.0
    timeout_shrink: float = 30.0
    timeout_kexec: float = 120.0
    timeout_freeze: float = 20.0  # user space must stop within this (cgroup freezer)
    # [battery]
    battery_floor_percent: float = 10.0
    battery_rearm_min_seconds: int = 300
    # [authz] without polkit: members of this group may use the D-Bus API (root always may)
    authz_group: str = ""

    def sha(self) -> dict[str, str]:
        return {"kernel": self.save_kernel_sha256, "initramfs": self.save_initramfs_sha256}


# TOML key -> (Config field, kind)
_SCHEMA: dict[str, dict[str, tuple[str, str]]] = {
    "target": {"path": ("target", "abspath"), "size": ("target_size", "size")},
    "jump_area": {
        "start": ("jump_area_start", "size"),
        "size": ("jump_area_size", "size"),
        "agent_memory": ("agent_memory", "size"),
    },
    "hibernate": {
        "mode": ("mode", "mode"),
        "image_size_limit": ("image_size_limit", "size"),
        "image_size": ("image_size", "image_size"),
        "compression": ("compression", "compression"),
        "chunk_size": ("chunk_size", "chunk"),
        "cancel_key": ("cancel_key", "bool"),
        "free_page_exclusion": ("free_page_exclusion", "bool"),
        "free_page_check": ("free_page_check", "bool"),
    },
    "save_kernel": {
        "kernel": ("save_kernel", "abspath"),
        "initramfs": ("save_initramfs", "abspath"),
        "kernel_sha256": ("save_kernel_sha256", "sha256"),
        "initramfs_sha256": ("save_initramfs_sha256", "sha256"),
        "append": ("save_append", "str"),
        "kexec": ("kexec", "str"),
    },
    "quiesce": {
        "disable_wakeup": ("disable_wakeup", "bool"),
        "keep_wakeup": ("keep_wakeup", "strlist"),
        "runtime_pm_on": ("runtime_pm_on", "bool"),
        "network_down": ("network_down", "bool"),
        "unbind": ("unbind", "unbind"),
    },
    "hooks": {"dirs": ("hook_dirs", "pathlist"), "policy": ("hook_policy", "policy")},
    "timeouts": {
        "hooks": ("timeout_hooks", "seconds"),
        "inhibitors": ("timeout_inhibitors", "seconds"),
        "shrink": ("timeout_shrink", "seconds"),
        "kexec": ("timeout_kexec", "seconds"),
        "freeze": ("timeout_freeze", "seconds"),
    },
    "battery": {
        "floor_percent": ("battery_floor_percent", "percent"),
        "rearm_min_seconds": ("battery_rearm_min_seconds", "seconds_int"),
    },
    "authz": {"group": ("authz_group", "str")},
}


def _bad(key: str, expected: str, value: Any, example: str) -> ConfigError:
    return ConfigError(
        f"{key} must be {expected}",
        why=f"got {value!r}",
        fix=f"in {CONFIG_PATH} write {key} = {example}",
        key=key,
    )


def _convert(kind: str, key: str, v: Any) -> Any:
    if kind == "size":
        return parse_size(v, key)
    if kind == "image_size":
        if isinstance(v, str) and v.strip().lower() == "auto":
            return -1
        return parse_size(v, key)
    if kind == "chunk":
        n = parse_size(v, key)
        if n < 4096 or n & (n - 1) or n > MAX_CHUNK_SIZE:
            raise ConfigError(
                f"{key} must be a power of two between 4K and 1M",
                why=(f"got {v!r}; larger chunks push the save agent past its 64 MiB memory bound"),
                fix=f'in {CONFIG_PATH} write {key} = "1M"',
                key=key,
            )
        return n
    if kind == "bool":
        if not isinstance(v, bool):
            raise _bad(key, "true or false", v, "true")
        return v
    if kind == "str":
        if not isinstance(v, str):
            raise _bad(key, "a string", v, '"..."')
        return v
    if kind == "abspath":
        if not isinstance(v, str) or not v.startswith("/"):
            raise _bad(key, "an absolute path", v, '"/var/lib/kjumpd/image"')
        return v
    if kind == "sha256":
        if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{64}", v):
            raise _bad(key, "64 lower-case hex digits (sha256sum output)", v, '"<sha256>"')
        return v
    if kind == "mode":
        if v not in MODES:
            raise _bad(key, "one of " + ", ".join(MODES), v, '"platform"')
        return v
    if kind == "compression":
        if v not in ("lz4", "none"):
            raise _bad(key, '"lz4" or "none"', v, '"lz4"')
        return v
    if kind == "policy":
        if v not in ("abort", "continue"):
            raise _bad(key, '"abort" or "continue"', v, '"abort"')
        return v
    if kind in ("strlist", "pathlist"):
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise _bad(key, "a list of strings", v, '["..."]')
        if kind == "pathlist" and not all(x.startswith("/") for x in v):
            raise _bad(key, "a list of absolute paths", v, '["/etc/kjumpd/sleep.d"]')
        return tuple(v)
    if kind in ("seconds", "seconds_int"):
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not math.isfinite(v)
            or v <= 0
            or v > 86400
        ):
            raise _bad(key, "a number of seconds in (0, 86400]", v, "30")
        return int(v) if kind == "seconds_int" else float(v)
    if kind == "percent":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
            raise _bad(key, "a percentage between 0 and 100", v, "10")
        return float(v)
    if kind == "unbind":
        if not isinstance(v, list):
            raise _bad(
                key,
                "a list of tables {bus, device, driver}",
                v,
                '[{bus = "pci", device = "0000:00:1f.3", driver = "snd_hda_intel"}]',
            )
        out = []
        for i, q in enumerate(v):
            if (
                not isinstance(q, dict)
                or set(q) != {"bus", "device", "driver"}
                or not all(isinstance(x, str) and x and "/" not in x for x in q.values())
            ):
                raise _bad(
                    f"{key}[{i}]",
                    "a table {bus, device, driver} of plain names",
                    q,
                    '{bus = "pci", device = "0000:00:1f.3", driver = "snd_hda_intel"}',
                )
            out.append(UnbindQuirk(q["bus"], q["device"], q["driver"]))
        return tuple(out)
    raise AssertionError(kind)


def from_dict(data: dict[str, Any]) -> Config:
    values: dict[str, Any] = {}
    for section, body in data.items():
        if section not in _SCHEMA:
            raise ConfigError(
                f"unknown section [{section}]",
                why="known: " + ", ".join(sorted(_SCHEMA)),
                fix=f"remove or rename [{section}] in {CONFIG_PATH}",
                key=section,
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{section} must be a table", fix=f"write [{section}]", key=section)
        for k, v in body.items():
            key = f"{section}.{k}"
            if k not in _SCHEMA[section]:
                raise ConfigError(
                    f"unknown key {key}",
                    why="known: " + ", ".join(sorted(_SCHEMA[section])),
                    fix=f"remove or rename {key} in {CONFIG_PATH}",
                    key=key,
                )
            name, kind = _SCHEMA[section][k]
            values[name] = _convert(kind, key, v)
    cfg = Config(**values)
    if cfg.jump_area_start is not None and cfg.jump_area_start % 4096:
        raise _bad("jump_area.start", "page aligned", hex(cfg.jump_area_start), '"0x20000000"')
    return cfg


def loads(text: str, source: str = CONFIG_PATH) -> Config:
    try:
        data = tomllib.loads(text)
    # ValueError: an integer of more than 4300 digits; RecursionError: nested too deep
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(
            f"{source} is not valid TOML",
            why=str(e),
            fix="fix the syntax (see contrib/kjumpd.toml)",
            path=source,
        ) from None
    return from_dict(data)


def load(sysroot: Sysroot, path: str = CONFIG_PATH) -> Config:
    """Read the config through the sysroot; a missing file gives the defaults."""
    p = sysroot.path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"cannot read {path}", why=str(e), fix="check its permissions", path=path
        ) from None
    return loads(text, path)


def field_names() -> list[str]:
    return [f.name for f in fields(Config)]
