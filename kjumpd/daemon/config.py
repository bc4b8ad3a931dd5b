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

from kjumpd.errors import ECHO_LIMIT, ConfigError, shown
from kjumpd.job import MAX_CHUNK_SIZE
from kjumpd.modes import MODES
from kjumpd.sysroot import Sysroot

CONFIG_PATH = "/etc/kjumpd/kjumpd.toml"
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.I)

#: The largest size or address a key may hold: 4 PiB. x86-64 physical addresses are at most
#: 52 bits wide (MAXPHYADDR <= 52, the reach of 5-level paging), so no RAM, no reservation
#: in it and no image of it can be larger; anything above is a typo, and every value stays
#: far inside 64 bits when offsets are added to it.
PHYS_LIMIT = 1 << 52
#: the kernel reserves crashkernel=SIZE@OFFSET with this alignment on x86-64 (CRASH_ALIGN):
#: at an unaligned OFFSET it reserves nothing
JUMP_AREA_ALIGN = 16 << 20
#: the jump area must end below 64 TiB, the reach of 4-level paging (the kernel's
#: CRASH_ADDR_HIGH_MAX on x86-64): a kernel that pages with 4 levels cannot run above it
JUMP_AREA_END_MAX = 1 << 46
#: the smallest jump area kjumpd asks for (the save kernel, its initramfs and the agent)
MIN_JUMP_AREA = 128 << 20
#: below this the save kernel's Python and the agent's buffers do not fit
MIN_AGENT_MEMORY = 16 << 20
PAGE = 4096
#: Linux's PATH_MAX; a longer path cannot be opened
PATH_MAX = 4096
#: the x86 kernel command line holds at most 2047 characters (COMMAND_LINE_SIZE 2048)
CMDLINE_MAX = 2047
#: the longest file name: a bus, device or driver name is one in sysfs
NAME_MAX = 255
#: the longest group name shadow-utils creates
GROUP_MAX = 32


def parse_size(value: Any, key: str) -> int:
    """123, "123", "128M", "8G", "0x20000000" -> bytes (at most PHYS_LIMIT); ConfigError
    naming ``key``, the value and the allowed form otherwise."""
    n: int | None = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, int) and value >= 0:
        n = value
    elif isinstance(value, str):
        v = value.strip()
        if v.lower().startswith("0x"):
            try:
                n = int(v, 16)
            except ValueError:
                pass
        m = _SIZE_RE.match(v) if n is None else None
        if m and len(m.group(1)) <= 30:  # more digits: no size, and past int()'s limit
            n = int(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if n is None:
        raise ConfigError(
            f"{key} must be a size",
            why=f"got {shown(value)}",
            fix=f'write {key} = "128M" (bytes, or K/M/G/T suffix, or 0x hex)',
            key=key,
        )
    if n > PHYS_LIMIT:
        raise ConfigError(
            f"{key} must be at most {format_size(PHYS_LIMIT)} ({PHYS_LIMIT:#x})",
            why=f"got {shown(value)}, which no x86-64 machine can address",
            fix=f'write {key} as a size up to {format_size(PHYS_LIMIT)}, e.g. "8G"',
            key=key,
        )
    return n


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
    # modes shutdown and reboot: B powers off / reboots once the image is SAVED, instead of
    # jumping back for A to do it (kjumpd.job: finish)
    finish_in_save_kernel: bool = True
    # [save_kernel]
    save_kernel: str = "/usr/lib/kjumpd/save/bzImage"
    save_initramfs: str = "/usr/lib/kjumpd/save/initramfs.cpio.gz"
    save_kernel_sha256: str = ""
    save_initramfs_sha256: str = ""
    save_append: str = "console=ttyS0 nokaslr panic=1"
    kexec: str = "kexec"  # kexec-tools binary (PATH lookup)
    save_kernel_watchdog: int = 120  # seconds B may make no progress before a reset; 0: off
    # boot B ahead of time and park it (kjumpd.daemon.warm): a hibernation is one jump
    warm_save_kernel: bool = False
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

    encryption: str = "auto"  # auto | required | off (kjumpd.daemon.encryption)
    image_key: str = "/etc/kjumpd/image-key.json"

    def save_kernel_append(self) -> str:
        """B's configured command-line words: ``append`` and the watchdog's (kjumpd.agent)."""
        wd = self.save_kernel_watchdog
        return f"{self.save_append} kjump.watchdog={wd}" if wd else self.save_append

    def sha(self) -> dict[str, str]:
        return {"kernel": self.save_kernel_sha256, "initramfs": self.save_initramfs_sha256}


# TOML key -> (Config field, kind)
_SCHEMA: dict[str, dict[str, tuple[str, str]]] = {
    "target": {"path": ("target", "abspath"), "size": ("target_size", "target_size")},
    "jump_area": {
        "start": ("jump_area_start", "jump_area_start"),
        "size": ("jump_area_size", "jump_area_size"),
        "agent_memory": ("agent_memory", "agent_memory"),
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
        "finish_in_save_kernel": ("finish_in_save_kernel", "bool"),
    },
    "save_kernel": {
        "kernel": ("save_kernel", "abspath"),
        "initramfs": ("save_initramfs", "abspath"),
        "kernel_sha256": ("save_kernel_sha256", "sha256"),
        "initramfs_sha256": ("save_initramfs_sha256", "sha256"),
        "append": ("save_append", "cmdline"),
        "kexec": ("kexec", "program"),
        "watchdog": ("save_kernel_watchdog", "watchdog"),
        "warm": ("warm_save_kernel", "bool"),
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
    "authz": {"group": ("authz_group", "group")},
    "encryption": {"mode": ("encryption", "encryption"), "key": ("image_key", "abspath")},
}


def _bad(key: str, expected: str, value: Any, example: str) -> ConfigError:
    return ConfigError(
        f"{key} must be {expected}",
        why=f"got {shown(value)}",
        fix=f"in {CONFIG_PATH} write {key} = {example}",
        key=key,
    )


def _size_in(key: str, v: Any, low: int, high: int, align: int, example: str) -> int:
    """A size in [low, high], a multiple of ``align``: what the kernel or the agent needs."""
    n = parse_size(v, key)
    if not low <= n <= high or n % align:
        form = f"a size from {format_size(low)} to {format_size(high)}"
        if align > 1:
            form += f", a multiple of {format_size(align)}"
        raise _bad(key, form, v, example)
    return n


def _path_ok(v: Any) -> bool:
    """Absolute, openable, and with no ``..``: it names one place, whatever the cwd or links
    above it, and a reviewer of the file sees where."""
    return (
        isinstance(v, str)
        and v.startswith("/")
        and len(v) <= PATH_MAX
        and "\0" not in v
        and ".." not in v.split("/")
    )


def _plain_text(v: Any, limit: int) -> bool:
    """One line of printable text: nothing that could end a command line or forge a log line."""
    return isinstance(v, str) and len(v) <= limit and v.isprintable()


def _convert(kind: str, key: str, v: Any) -> Any:
    if kind == "size":
        return parse_size(v, key)
    if kind == "target_size":
        from kjumpd.image.store import MIN_TARGET_SIZE

        n = parse_size(v, key)
        if 0 < n < MIN_TARGET_SIZE:
            raise _bad(
                key, f"0 (sized by setup) or at least {format_size(MIN_TARGET_SIZE)}", v, '"8G"'
            )
        return n
    if kind == "jump_area_start":
        return _size_in(key, v, 0, JUMP_AREA_END_MAX, JUMP_AREA_ALIGN, '"0x20000000"')
    if kind == "jump_area_size":
        # kexec loads whole pages into it
        return _size_in(key, v, MIN_JUMP_AREA, JUMP_AREA_END_MAX, PAGE, '"192M"')
    if kind == "agent_memory":
        # it lives inside the jump area: a plain amount, no alignment of its own
        return _size_in(key, v, MIN_AGENT_MEMORY, JUMP_AREA_END_MAX, 1, '"64M"')
    if kind == "image_size":
        if isinstance(v, str) and v.strip().lower() == "auto":
            return -1
        return parse_size(v, key)
    if kind == "chunk":
        n = parse_size(v, key)
        if n < 4096 or n & (n - 1) or n > MAX_CHUNK_SIZE:
            raise ConfigError(
                f"{key} must be a power of two between 4K and 1M",
                why=f"got {shown(v)}; larger chunks push the save agent past its 64 MiB memory "
                "bound",
                fix=f'in {CONFIG_PATH} write {key} = "1M"',
                key=key,
            )
        return n
    if kind == "bool":
        if not isinstance(v, bool):
            raise _bad(key, "true or false", v, "true")
        return v
    if kind == "cmdline":
        if not _plain_text(v, CMDLINE_MAX):
            raise _bad(
                key, f"one line of at most {CMDLINE_MAX} printable characters", v, '"console=ttyS0"'
            )
        return v
    if kind == "program":
        if not _plain_text(v, PATH_MAX) or not v or ("/" in v and not _path_ok(v)):
            raise _bad(
                key, "a program name or an absolute path without '..'", v, '"/usr/sbin/kexec"'
            )
        return v
    if kind == "group":
        if (
            not isinstance(v, str)
            or not re.fullmatch(r"([A-Za-z0-9_][A-Za-z0-9_.-]*\$?)?", v)
            or len(v) > GROUP_MAX
        ):
            raise _bad(
                key, f"a group name (letters, digits, _ . -, at most {GROUP_MAX})", v, '"wheel"'
            )
        return v
    if kind == "abspath":
        if not _path_ok(v):
            raise _bad(
                key,
                f"an absolute path without '..' (at most {PATH_MAX} characters)",
                v,
                '"/var/lib/kjumpd/image"',
            )
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
    if kind == "encryption":
        if v not in ("auto", "required", "off"):
            raise _bad(key, '"auto", "required" or "off"', v, '"auto"')
        return v
    if kind == "policy":
        if v not in ("abort", "continue"):
            raise _bad(key, '"abort" or "continue"', v, '"abort"')
        return v
    if kind in ("strlist", "pathlist"):
        if not isinstance(v, list) or not all(_plain_text(x, PATH_MAX) and x for x in v):
            raise _bad(
                key, f"a list of non-empty strings (at most {PATH_MAX} characters)", v, '["..."]'
            )
        if kind == "pathlist" and not all(_path_ok(x) for x in v):
            raise _bad(key, "a list of absolute paths without '..'", v, '["/etc/kjumpd/sleep.d"]')
        return tuple(v)
    if kind == "seconds":
        # a day: the longest any one step of a transition may sensibly be waited for
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not math.isfinite(v)
            or v <= 0
            or v > 86400
        ):
            raise _bad(key, "a number of seconds above 0 and at most 86400", v, "30")
        return float(v)
    if kind == "watchdog":
        # under 10 s an ordinary pause of a disk (a spin-up, a cache flush) would reset it
        if isinstance(v, bool) or not isinstance(v, int) or not (v == 0 or 10 <= v <= 86400):
            raise _bad(
                key, "0 (no watchdog) or a whole number of seconds from 10 to 86400", v, "120"
            )
        return v
    if kind == "seconds_int":
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 86400:
            raise _bad(key, "a whole number of seconds from 1 to 86400", v, "300")
        return v
    if kind == "percent":
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not math.isfinite(v)
            or not 0 <= v <= 100
        ):
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
                or not all(
                    _plain_text(x, NAME_MAX) and x and "/" not in x and x not in (".", "..")
                    for x in q.values()
                )
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


def _key_name(name: str) -> str:
    """A key or section name from the file as an error shows it: quoted and cut short when
    it is long or not plain (TOML allows any text in a quoted key)."""
    return name if _plain_text(name, ECHO_LIMIT) else shown(name)


def from_dict(data: dict[str, Any]) -> Config:
    values: dict[str, Any] = {}
    for section, body in data.items():
        if section not in _SCHEMA:
            name = _key_name(section)
            raise ConfigError(
                f"unknown section [{name}]",
                why="known: " + ", ".join(sorted(_SCHEMA)),
                fix=f"remove or rename [{name}] in {CONFIG_PATH}",
                key=name,
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{section} must be a table", fix=f"write [{section}]", key=section)
        for k, v in body.items():
            key = f"{section}.{k}"
            if k not in _SCHEMA[section]:
                name = f"{section}.{_key_name(k)}"
                raise ConfigError(
                    f"unknown key {name}",
                    why="known: " + ", ".join(sorted(_SCHEMA[section])),
                    fix=f"remove or rename {name} in {CONFIG_PATH}",
                    key=name,
                )
            name, kind = _SCHEMA[section][k]
            values[name] = _convert(kind, key, v)
    cfg = Config(**values)
    if cfg.jump_area_start is not None:
        end = cfg.jump_area_start + (cfg.jump_area_size or MIN_JUMP_AREA)
        if end > JUMP_AREA_END_MAX:
            raise ConfigError(
                "jump_area.start + jump_area.size must be at most "
                f"{format_size(JUMP_AREA_END_MAX)} ({JUMP_AREA_END_MAX:#x})",
                why=f"the area would end at {end:#x}, where a kernel with 4-level paging "
                "(the save kernel's) cannot run",
                fix=f'in {CONFIG_PATH} write jump_area.start = "0x20000000"',
                key="jump_area.start",
            )
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
