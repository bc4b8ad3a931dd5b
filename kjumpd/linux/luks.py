"""An image target inside a LUKS2 volume: what the save kernel (B) and the restore-first
environment (R) need to rebuild the volume's dm-crypt mapping in a kernel that never opened
it, and how the volume key is obtained.

A describes the volume from its live dm-crypt table (``Volume``, a record in the job and in
boot.json, never holding the key); B gets the key in the job (RAM only), R gets it from the
user's passphrase through ``cryptsetup luksDump --dump-volume-key``, which prints it on a pipe
(no file). Both then create the same mapping over the disk through device-mapper ioctls
(kjumpd.linux.devmapper); offsets in the target's block map are offsets in that mapping.

LUKS binary header (both versions, big-endian), the fields read here::

    0    magic  "LUKS\\xba\\xbe"
    6    u16    version (1 or 2)
    168  char   uuid[40], NUL-padded

LUKS2 keeps a JSON area after its binary header (``hdr_size`` at byte 8, u64: the header
and JSON together; a second copy follows at that offset). Its ``tokens`` object holds
kjumpd's hint: a token of type ``kjumpd-image`` ({"type": "kjumpd-image", "keyslots": [],
"target": "<target UUID>"}) is there from just before a hibernation until the image is
consumed or found unrestorable. R asks for the volume's passphrase only when it is there
(or when the JSON cannot be read): a restore-first entry booted at every boot does not ask
twice at a boot with no image.

A token systemd-cryptenroll wrote (``systemd-tpm2`` without a PIN: ``"tpm2-pin": false`` or
absent) lets R unlock without asking: cryptsetup's plugin for it maps the volume
(``cryptsetup open --token-only --disable-keyring``), R reads the key back from that
mapping's table (DM_TABLE_STATUS) and removes it. ``luksDump --dump-volume-key`` uses
passphrases and key files only.

``Volume`` as a dict (job key ``volume``, boot.json ``target.volume``), version 1::

    {"uuid": "<LUKS UUID>", "header_offset": <bytes on the whole disk, 512-aligned>,
     "cipher": "aes-xts-plain64", "key_size": <bytes>, "iv_offset": <sectors>,
     "data_offset": <sectors from the header to the data>, "sectors": <mapping length>,
     "options": ["sector_size:4096", "iv_large_sectors", ...]}
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kjumpd.errors import VolumeError
from kjumpd.linux import devmapper
from kjumpd.sysroot import Sysroot

MAGIC = b"LUKS\xba\xbe"
UUID_AT = 168
SECTOR = 512
#: the name B and R give the mapping they build
MAPPING = "kjumpd-target"

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_CIPHER_RE = re.compile(r"^[A-Za-z0-9_()\-:]{1,64}$")
_OPTION_RE = re.compile(r"^[a-z_]{1,32}(:[0-9]{1,10})?$")


@dataclass(frozen=True)
class Volume:
    uuid: str
    header_offset: int
    cipher: str
    key_size: int
    iv_offset: int
    data_offset: int
    sectors: int
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def bad(what: str, got: Any) -> VolumeError:
            return VolumeError(f"LUKS volume record: {what}", why=f"got {got!r}")

        if not isinstance(self.uuid, str) or not _UUID_RE.match(self.uuid):
            raise bad("uuid must be a lower-case UUID", self.uuid)
        for name in ("header_offset", "key_size", "iv_offset", "data_offset", "sectors"):
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise bad(f"{name} must be an integer >= 0", v)
        if self.header_offset % SECTOR:
            raise bad("header_offset must be a multiple of 512", self.header_offset)
        if not 16 <= self.key_size <= 128 or self.sectors == 0:
            raise bad("key_size (16..128) or sectors (> 0)", (self.key_size, self.sectors))
        if not isinstance(self.cipher, str) or not _CIPHER_RE.match(self.cipher):
            raise bad("cipher", self.cipher)
        if not isinstance(self.options, tuple) or len(self.options) > 16:
            raise bad("options must be a list of at most 16", self.options)
        for o in self.options:
            if not isinstance(o, str) or not _OPTION_RE.match(o):
                raise bad("a dm-crypt option", o)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "header_offset": self.header_offset,
            "cipher": self.cipher,
            "key_size": self.key_size,
            "iv_offset": self.iv_offset,
            "data_offset": self.data_offset,
            "sectors": self.sectors,
            "options": list(self.options),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Volume:
        keys = {"uuid", "header_offset", "cipher", "key_size", "iv_offset", "data_offset"}
        if not isinstance(d, dict) or set(d) != keys | {"sectors", "options"}:
            raise VolumeError(
                "LUKS volume record has the wrong fields",
                why=f"got {sorted(d) if isinstance(d, dict) else type(d).__name__}",
                fix="set the target up again with the same kjumpd release (kjumpctl setup)",
            )
        opts = d["options"]
        return cls(**{**d, "options": tuple(opts) if isinstance(opts, list) else opts})

    def table(self, key: bytes, disk: tuple[int, int]) -> devmapper.TableLine:
        """The dm-crypt table over the whole disk ``disk`` (major, minor) with ``key``."""
        if len(key) != self.key_size:
            raise VolumeError(
                f"the volume key of LUKS volume {self.uuid} has {len(key)} bytes",
                why=f"the volume's mapping uses {self.key_size}",
                fix="set the target up again (kjumpctl setup)",
            )
        start = self.header_offset // SECTOR + self.data_offset
        opts = f" {len(self.options)} {' '.join(self.options)}" if self.options else ""
        params = f"{self.cipher} {key.hex()} {self.iv_offset} {disk[0]}:{disk[1]} {start}{opts}"
        return devmapper.TableLine(0, self.sectors, "crypt", params)


TOKEN_TYPE = "kjumpd-image"
#: bounds on the JSON area read (LUKS2 allows 12 KiB to 4 MiB of header)
_HDR_MIN, _HDR_MAX = 16384, 4 << 20


def header_json(read: Callable[[int, int], bytes]) -> dict[str, Any] | None:
    """The LUKS2 JSON metadata through ``read(offset, size)`` on the volume's device: the
    primary copy, else the secondary (where the primary says, else at the offsets LUKS2
    allows for it); None when none reads."""
    import json

    first = read(0, 4096)
    offsets = [0]
    if len(first) >= 16 and _HDR_MIN <= int.from_bytes(first[8:16], "big") <= _HDR_MAX:
        offsets.append(int.from_bytes(first[8:16], "big"))
    offsets += [_HDR_MIN << k for k in range(9) if _HDR_MIN << k not in offsets]
    for at in offsets:
        head = first if at == 0 else read(at, 4096)
        if len(head) < 4096 or head[:6] not in (MAGIC, b"SKUL\xba\xbe"):
            continue
        size = int.from_bytes(head[8:16], "big")
        if int.from_bytes(head[6:8], "big") != 2 or not _HDR_MIN <= size <= _HDR_MAX:
            continue
        try:
            meta = json.loads(read(at + 4096, size - 4096).split(b"\0", 1)[0])
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(meta, dict):
            return meta
    return None


def read_header_json(path: str) -> dict[str, Any] | None:
    """``header_json`` of the device or file at ``path``; None when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return header_json(lambda off, n: os.pread(fd, n, off))
    except OSError:
        return None
    finally:
        os.close(fd)


def tokens_of(meta: dict[str, Any], kind: str = TOKEN_TYPE) -> list[int]:
    """The ids of the tokens of ``kind`` in LUKS2 metadata."""
    tokens = meta.get("tokens")
    if not isinstance(tokens, dict):
        return []
    return sorted(
        int(k)
        for k, t in tokens.items()
        if k.isdigit() and isinstance(t, dict) and t.get("type") == kind
    )


#: token types R tries before asking, when it holds cryptsetup's plugin for them
UNATTENDED_TOKENS = ("systemd-tpm2",)
#: the short-lived mapping a token opens, for its key to be read back
TOKEN_MAPPING = "kjumpd-token"
#: cryptsetup's plugin for tokens of a kind, in LIBDIR/cryptsetup/
PLUGIN_FILE = "libcryptsetup-token-{kind}.so"
_PLUGIN_RE = re.compile(r"libcryptsetup-token-(.+)\.so")


def plugin_kind(file_name: str) -> str | None:
    """The token kind a plugin file (PLUGIN_FILE) serves, or None for another file."""
    m = _PLUGIN_RE.fullmatch(file_name)
    return m.group(1) if m else None


def unattended_tokens(meta: dict[str, Any] | None) -> list[str]:
    """The token types of UNATTENDED_TOKENS this volume's LUKS2 metadata holds, in that
    order; a token that needs a PIN is left out (the passphrase prompt comes instead)."""
    tokens = meta.get("tokens") if isinstance(meta, dict) else None
    if not isinstance(tokens, dict):
        return []
    found = {
        t.get("type")
        for t in tokens.values()
        if isinstance(t, dict) and t.get("tpm2-pin") is not True
    }
    return [kind for kind in UNATTENDED_TOKENS if kind in found]


def token_plugin(sysroot: Sysroot, kind: str) -> str | None:
    """cryptsetup's plugin for tokens of ``kind`` on this system, or None."""
    for top in ("/usr/lib", "/lib"):
        found = sorted(sysroot.path(top).glob(f"*/cryptsetup/{PLUGIN_FILE.format(kind=kind)}"))
        if found:
            return str(found[0])
    return None


def key_from_table(lines: list[devmapper.TableLine]) -> bytes:
    """The key of a one-target dm-crypt table: ``cipher key iv_offset device offset ...``,
    the key in hex (a key held in the kernel keyring, ``:size:logon:desc``, cannot be read)."""
    if len(lines) != 1 or lines[0].target_type != "crypt":
        raise VolumeError(
            "the mapping a token opened is not one dm-crypt target",
            why=", ".join(t.target_type for t in lines) or "no target",
        )
    words = lines[0].params.split()
    key = words[1] if len(words) >= 5 else ""
    if key.startswith(":"):
        raise VolumeError(
            "the volume key is in the kernel keyring, where it cannot be read back",
            fix="cryptsetup must open the volume with --disable-keyring",
        )
    if not re.fullmatch(r"(?:[0-9a-fA-F]{2}){16,128}", key):
        raise VolumeError("the dm-crypt table holds no hex key", why=f"{len(words)} fields")
    return bytes.fromhex(key)


def token_volume_key(sysroot: Sysroot, node: str, kind: str, *, run: Run = subprocess.run) -> bytes:
    """The volume key of the LUKS volume at ``node`` unlocked by its ``kind`` token through
    cryptsetup's plugin, with nothing to type (stdin is /dev/null): cryptsetup maps the
    volume read-only with the key in the table, the key is read back, the mapping removed."""
    control = str(sysroot.path(devmapper.CONTROL))
    argv = [
        "cryptsetup", "open", "--type", "luks2", "--token-only", "--token-type", kind,
        "--disable-keyring", "--readonly", "--batch-mode", str(sysroot.path(node)),
        TOKEN_MAPPING,
    ]  # fmt: skip
    try:
        proc = run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VolumeError(f"cannot run cryptsetup with the {kind} token", why=str(e)) from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise VolumeError(
            f"the {kind} token does not unlock LUKS volume {node}",
            why=err[-1] if err else f"cryptsetup exited {proc.returncode}",
            fix="a TPM2 token sealed to PCRs opens only while they hold the values it was "
            "enrolled with (systemd-cryptenroll --tpm2-device=auto enrolls it again)",
        )
    try:
        return key_from_table(devmapper.table(TOKEN_MAPPING, control))
    finally:
        devmapper.remove(TOKEN_MAPPING, control)


def image_marked(meta: dict[str, Any] | None) -> bool:
    """Whether R should ask for the passphrase: kjumpd's token is there, or the metadata
    could not be read (asking costs a prompt; not asking could lose the session)."""
    return meta is None or bool(tokens_of(meta))


def keyed_to_dict(vol: Volume, key: bytes) -> dict[str, Any]:
    """The volume with its key ("key": hex): the job's ``volume``, and what R hands to the
    save kernel in the restore role. Lives in RAM only."""
    return {**vol.to_dict(), "key": key.hex()}


def keyed_from_dict(d: Any) -> tuple[Volume, bytes]:
    if not isinstance(d, dict):
        raise VolumeError("LUKS volume record is not an object")
    rest = dict(d)
    key = rest.pop("key", None)
    vol = Volume.from_dict(rest)
    if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]+", key) or len(key) % 2:
        raise VolumeError("LUKS volume record: key must be lower-case hex")
    if len(key) != 2 * vol.key_size:
        raise VolumeError(
            "LUKS volume record: the key does not fit the volume",
            why=f"{len(key) // 2} bytes, the mapping uses {vol.key_size}",
        )
    return vol, bytes.fromhex(key)


def header_uuid(head: bytes) -> tuple[int, str] | None:
    """(version, uuid) of a LUKS header's first bytes, or None."""
    if len(head) < UUID_AT + 40 or head[:6] != MAGIC:
        return None
    version = int.from_bytes(head[6:8], "big")
    uuid = head[UUID_AT : UUID_AT + 40].split(b"\0", 1)[0].decode("ascii", "replace").lower()
    return version, uuid


def _read(path: os.PathLike[str] | str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def find_disk(sysroot: Sysroot, vol: Volume) -> str:
    """The /sys/block name of the one disk with this volume's LUKS header at its offset
    (device names are not trusted across boots)."""
    found: list[str] = []
    for name in sysroot.listdir("/sys/block"):
        if name.startswith(("dm-", "loop", "ram", "zram")) or not sysroot.exists(f"/dev/{name}"):
            continue
        try:
            head = _read(sysroot.path(f"/dev/{name}"), vol.header_offset, 4096)
        except OSError:
            continue
        got = header_uuid(head)
        if got is not None and got[1] == vol.uuid:
            found.append(name)
    if len(found) != 1:
        raise VolumeError(
            f"LUKS volume {vol.uuid} is on {'none' if not found else 'more than one'} of "
            "this kernel's disks",
            why=f"looked for its header at byte {vol.header_offset} of each disk"
            + (f"; found on {', '.join(found)}" if found else ""),
            fix="the kernel needs the driver of the volume's disk; a cloned disk must be detached",
        )
    return found[0]


def node_of(sysroot: Sysroot, disk: str, header_offset: int) -> str:
    """The /dev node whose first byte is the header: the disk, or its partition there
    (cryptsetup reads the volume from its start)."""
    if header_offset == 0:
        return f"/dev/{disk}"
    for name in sysroot.listdir(f"/sys/block/{disk}"):
        start = sysroot.read_text(f"/sys/block/{disk}/{name}/start", "").strip()
        if start.isdigit() and int(start) * SECTOR == header_offset:
            return f"/dev/{name}"
    raise VolumeError(
        f"no partition of {disk} starts at byte {header_offset}, where the LUKS header is",
        fix="set the target up again (kjumpctl setup)",
    )


def existing_mapping(sysroot: Sysroot, name: str = MAPPING) -> str | None:
    """The /dev node of the mapping called ``name`` that this kernel already has."""
    for n in sysroot.listdir("/sys/block"):
        if sysroot.read_text(f"/sys/block/{n}/dm/name", "").strip() == name:
            return f"/dev/{n}"
    return None


def open_mapping(sysroot: Sysroot, vol: Volume, key: bytes, name: str = MAPPING) -> str:
    """Build the volume's mapping over its disk (once: a second call finds the first's);
    the /dev node of the mapping."""
    node = existing_mapping(sysroot, name)
    if node is not None:
        return node
    disk = find_disk(sysroot, vol)
    dev = sysroot.read_text(f"/sys/block/{disk}/dev").strip()
    major, minor = (int(x) for x in dev.split(":"))
    got = devmapper.create(
        name, [vol.table(key, (major, minor))], str(sysroot.path(devmapper.CONTROL))
    )
    link = sysroot.path(f"/sys/dev/block/{got[0]}:{got[1]}")
    dm = os.path.basename(os.path.realpath(link)) if link.exists() else ""
    if not dm or not sysroot.exists(f"/dev/{dm}"):
        raise VolumeError(
            f"the mapping of LUKS volume {vol.uuid} has no device node",
            why=f"device {got[0]}:{got[1]} is not in /dev",
            fix="the kernel needs devtmpfs (CONFIG_DEVTMPFS)",
        )
    return f"/dev/{dm}"


Run = Callable[..., "subprocess.CompletedProcess[bytes]"]


def parse_key_dump(text: str) -> bytes:
    """The volume key from ``cryptsetup luksDump --dump-volume-key`` output ("MK dump:"
    followed by hex bytes over several lines)."""
    m = re.search(r"^MK bits:\s*(\d+)\s*$", text, re.M)
    at = text.find("MK dump:")
    if m is None or at < 0:
        raise VolumeError("cryptsetup printed no volume key", why="no 'MK bits:'/'MK dump:' lines")
    lines = text[at + len("MK dump:") :].split("\n")
    # the dump's first line, then its continuation lines (indented)
    more = itertools.takewhile(lambda ln: ln[:1] in ("\t", " ") and ln.strip(), lines[1:])
    hexdump = " ".join([lines[0], *more])
    key = bytes.fromhex("".join(re.findall(r"\b[0-9a-fA-F]{2}\b", hexdump)))
    if len(key) * 8 != int(m.group(1)):
        raise VolumeError(
            "cryptsetup's volume key dump does not parse",
            why=f"{len(key) * 8} bits read, {m.group(1)} announced",
        )
    return key


def volume_key(
    node: str,
    *,
    key_file: str | None = None,
    passphrase: bytes | None = None,
    run: Run = subprocess.run,
) -> bytes:
    """The volume key of the LUKS volume at ``node``, unlocked by a key file or a
    passphrase (given on a pipe, as a prompt would take it). Raises VolumeError with
    ``wrong=True`` in its context when no keyslot opens with what was given."""
    argv = ["cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode"]
    argv += ["--key-file", key_file if key_file is not None else "-", node]
    try:
        proc = run(argv, input=passphrase or b"", capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VolumeError(
            "cannot run cryptsetup", why=str(e), fix="install cryptsetup (cryptsetup-bin)"
        ) from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        # cryptsetup's exit code 2: no keyslot opened with that key (cryptsetup(8))
        raise VolumeError(
            f"cannot unlock LUKS volume {node}",
            why=(err[-1] if err else f"cryptsetup exited {proc.returncode}"),
            fix="check the passphrase or key file",
            wrong=proc.returncode == 2,
        )
    return parse_key_dump(proc.stdout.decode(errors="replace"))
