"""R's side of an encrypted image, and of a target inside a LUKS volume: ask for the
passphrase on the console, unseal the image key (check the header and metadata) or unlock
the volume (build its mapping), and hand the key to the save kernel in memory.

What R does when it cannot open an image (every case boots the normal system):

- no usable image key in R, or the image was sealed to another key: the image is kept (a
  refreshed restore-first entry may open it at a later boot);
- the passphrase is left empty, or is wrong ``TRIES`` times: the image is kept, as an
  encrypted Ubuntu or Fedora boot keeps its disk closed until the right passphrase comes;
- the seal, the header or the metadata was altered: the image is refused (INVALID).

A LUKS volume is unlocked as an encrypted Ubuntu or Fedora boot would: with the key file
the system's own initramfs holds for it (crypttab + Debian's KEYFILE_PATTERN or dracut's
install_items), else the
TPM2 token systemd-cryptenroll enrolled (without a PIN), else its passphrase, up to
``TRIES`` times; empty, or wrong every time, boots the normal system with
the image kept (the normal initramfs then asks for the passphrase itself).

The keys go to B as ``kjump/restore-key`` (hex) and ``kjump/restore-volume.json`` in an
archive appended to B's initramfs, in R's RAM: they never reach a disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kjumpd import cpio
from kjumpd.errors import ImageCorruptError, ImageKeyError
from kjumpd.sysroot import Sysroot

TRIES = 3
KEY_FILE = "/etc/kjumpd/image-key.json"  # bootentry.R_IMAGE_KEY: the payload puts it here
LUKS_KEY_FILE = "/etc/kjumpd/luks-volume.key"  # bootentry.R_LUKS_KEY
RESTORE_KEY = "kjump/restore-key"  # agent.kernel_role.RESTORE_KEY_FILE, inside B
RESTORE_VOLUME = "kjump/restore-volume.json"  # agent.kernel_role.RESTORE_VOLUME_FILE
#: where R writes B's initramfs with the key appended (R's root is in RAM)
B_INITRD = "/run/kjumpd-restore-initrd"

Ask = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Opened:
    key: bytes


@dataclass(frozen=True)
class Kept:
    """Not opened this time; the image stays as it is. ``note`` goes on the normal kernel's
    command line (kjump.rf=kept:NOTE)."""

    note: str
    why: str


@dataclass(frozen=True)
class Unmarked:
    """The volume's header says no image waits in it: boot normally without asking."""

    why: str


@dataclass(frozen=True)
class Refused:
    reason: str  # the header's INVALID(reason)


def open_image(
    sysroot: Sysroot,
    header: Any,
    identity: dict[str, Any],
    metadata: bytes,
    ask: Ask,
    say: Callable[[str], None],
) -> Opened | Kept | Refused:
    """Unlock the image key and authenticate the header + metadata."""
    from kjumpd.image import seal

    path = sysroot.path(KEY_FILE)
    if not path.is_file():
        return Kept(
            "no-key",
            "the image is encrypted and this restore environment holds no image key "
            "(run `kjumpctl install --refresh-boot-entry` in the normal system)",
        )
    try:
        kf = seal.KeyFile.load(path)
    except ImageKeyError as e:  # R's own copy is damaged: not the image's fault
        return Kept("no-key", f"this restore environment's image key is unusable: {e.message}")
    try:
        sealed = seal.check_seal(identity.get("seal"), "the image's seal")
    except ImageKeyError as e:
        return Refused(f"altered: {e.what}")
    if sealed["key_id"] != kf.key_id:
        return Kept(
            "other-key",
            f"the image was sealed to image key {sealed['key_id']}; this restore environment "
            f"holds {kf.key_id}",
        )

    def unlock_private(typed: str) -> Any:
        try:
            return kf.unlock(typed)
        except ImageKeyError:
            return None

    private = _ask_passphrase(
        ask,
        say,
        lambda attempt: (
            f"kjumpd: passphrase for the hibernation image (key {kf.key_id}, "
            f"try {attempt} of {TRIES}; empty: boot without restoring): "
        ),
        unlock_private,
        skipped="the image is kept for a later boot",
        wrong="the image is kept",
    )
    if isinstance(private, Kept):
        return private
    try:
        key = seal.unseal_key(private, kf.public, sealed)
        seal.ImageCipher.for_header(key, header).check_header(header, metadata)
    except (ImageKeyError, ImageCorruptError) as e:
        return Refused(f"altered: {e.what}")
    return Opened(key)


def open_volume(
    sysroot: Sysroot, vol: Any, ask: Ask, say: Callable[[str], None]
) -> Opened | Kept | Unmarked:
    """Unlock the LUKS volume ``vol`` (kjumpd.linux.luks.Volume) with a passphrase typed on
    the console and build its mapping, in which R then looks for the target. Nothing is
    asked when the volume's LUKS2 header carries no kjumpd token (no image waits)."""
    from kjumpd.errors import VolumeError
    from kjumpd.linux import luks

    try:
        node = luks.node_of(sysroot, luks.find_disk(sysroot, vol), vol.header_offset)
    except VolumeError as e:
        return Kept("no-volume", e.message)
    meta = luks.read_header_json(str(sysroot.path(node)))
    if not luks.image_marked(meta):
        return Unmarked(f"LUKS volume {vol.uuid} holds no hibernation image (no kjumpd token)")
    keyfile = sysroot.path(LUKS_KEY_FILE)
    if keyfile.is_file():
        # the key file the normal initramfs holds (crypttab, KEYFILE_PATTERN): no prompt
        try:
            key = luks.volume_key(str(sysroot.path(node)), key_file=str(keyfile))
            luks.open_mapping(sysroot, vol, key)
            say(f"{node} unlocked with the key file this system's initramfs holds")
            return Opened(key)
        except VolumeError as e:
            say(f"the initramfs's key file does not open {node} ({e.why or e.what})")
    for kind in luks.unattended_tokens(meta):
        # what systemd-cryptenroll enrolled (TPM2): no prompt when it opens
        if luks.token_plugin(sysroot, kind) is None:
            say(
                f"{node} has a {kind} token and this restore environment no cryptsetup plugin "
                "for it (`kjumpctl install --refresh-boot-entry` on a system with systemd's "
                "cryptsetup plugins adds it)"
            )
            continue
        try:
            key = luks.token_volume_key(sysroot, node, kind)
            luks.open_mapping(sysroot, vol, key)
            say(f"{node} unlocked with its {kind} token")
            return Opened(key)
        except VolumeError as e:
            say(f"the {kind} token does not open {node} ({e.why or e.what})")

    def unlock_volume(typed: str) -> Opened | Kept | None:
        try:
            key = luks.volume_key(str(sysroot.path(node)), passphrase=typed.encode())
        except VolumeError as e:
            return None if e.context.get("wrong") else Kept("volume", e.message)
        try:
            luks.open_mapping(sysroot, vol, key)
        except VolumeError as e:
            return Kept("volume", e.message)
        return Opened(key)

    return _ask_passphrase(
        ask,
        say,
        lambda attempt: (
            f"kjumpd: passphrase for disk {node} (LUKS {vol.uuid}) to restore the "
            f"hibernated system (try {attempt} of {TRIES}; empty: boot without restoring): "
        ),
        unlock_volume,
        skipped="the volume stays locked",
        wrong="the volume stays locked",
    )


def _ask_passphrase(
    ask: Ask,
    say: Callable[[str], None],
    prompt: Callable[[int], str],
    unlock: Callable[[str], Any],
    *,
    skipped: str,
    wrong: str,
) -> Any:
    """Up to TRIES passphrases, each given to ``unlock``, which returns what it opened, or
    None for a wrong passphrase. Kept when none is typed (``skipped`` says what stays) or
    every one is wrong (``wrong``)."""
    for attempt in range(1, TRIES + 1):
        typed = ask(prompt(attempt))
        if not typed:
            return Kept("skipped", f"no passphrase given; {skipped}")
        got = unlock(typed)
        if got is not None:
            return got
        say(f"wrong passphrase ({attempt} of {TRIES})")
    return Kept("passphrase", f"wrong passphrase {TRIES} times; {wrong}")


def b_initrd_with(sysroot: Sysroot, b_initrd: str, files: dict[str, bytes]) -> str:
    """B's initramfs with an archive of ``files`` (kjump/NAME -> bytes, mode 0600)
    appended, written to B_INITRD; its path."""
    data = sysroot.path(b_initrd).read_bytes()
    archive = cpio.write(
        [cpio.Entry.directory("kjump")]
        + [cpio.Entry.file(name, content, 0o600) for name, content in sorted(files.items())]
    )
    out = sysroot.path(B_INITRD)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        # the kernel takes an appended archive only at a 4-byte boundary; 512 as A does
        os.write(fd, data + bytes(-len(data) % 512) + archive)
    finally:
        os.close(fd)
    return B_INITRD


def ask_console(prompt: str, console: str = "/dev/console") -> str | None:
    """One line typed on the console, not echoed; None when there is no console to ask.

    The prompt is a whole line, written once echo is off: a serial console (and a test
    harness reading it) sees it at once, and nothing typed after it is echoed."""
    import termios

    try:
        fd = os.open(console, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None
    try:
        try:
            old = termios.tcgetattr(fd)
        except termios.error:
            old = None
        if old is not None:
            new = list(old)
            new[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSANOW, new)
        try:
            os.write(fd, prompt.rstrip().encode() + b"\n")
            line = b""
            while not line.endswith((b"\n", b"\r")):
                chunk = os.read(fd, 1)
                if not chunk:
                    return None if not line else line.decode("utf-8", "replace")
                line += chunk
        finally:
            if old is not None:
                termios.tcsetattr(fd, termios.TCSANOW, old)
        return line.decode("utf-8", "replace").rstrip("\r\n")
    finally:
        os.close(fd)
