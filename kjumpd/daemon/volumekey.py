"""The volume key of a LUKS volume that holds the image target, for the save kernel.

Distribution kernels keep a LUKS2 volume key in the kernel keyring as a ``logon`` key that
no program can read back, so the daemon cannot take it from the live mapping. Instead
``kjumpctl setup`` enrolls a keyslot of the volume with a random 64-byte key file (the
user's passphrase, asked once by cryptsetup, authorises it). At each hibernation the daemon
unlocks that keyslot with ``cryptsetup luksDump --dump-volume-key``, which prints the key on
a pipe, and puts it in the job, in RAM only.

The key file (root's alone, 0400) lies inside the volume it opens: next to a file target,
or in /etc/kjumpd when the target is a raw device and /etc/kjumpd is itself on an encrypted
device. With the machine off it is ciphertext like everything else there.
Its keyslot uses PBKDF2 at the minimum count: the key file has full entropy, and a memory-hard
KDF would only slow every hibernation.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from kjumpd.errors import VolumeError
from kjumpd.linux import luks
from kjumpd.sysroot import Sysroot

log = logging.getLogger("kjumpd.volumekey")

KEY_BYTES = 64
ETC_DIR = "/etc/kjumpd"


def key_file(sysroot: Sysroot, target: Any) -> str:
    """Where the key file of ``target``'s volume lies (a system path)."""
    from kjumpd.daemon import blockmap

    vol = target.volume
    assert vol is not None
    if target.kind == "file":
        return str(Path(target.path).parent / f"luks-{vol.uuid}.key")
    try:
        st = os.stat(sysroot.path(ETC_DIR))
    except OSError as e:
        raise VolumeError(f"cannot look at {ETC_DIR}", why=e.strerror or str(e)) from None
    if blockmap.encrypted_device(sysroot, f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}") is None:
        raise VolumeError(
            f"no safe place for the key file of LUKS volume {vol.uuid}",
            why=f"the target is a raw device and {ETC_DIR} is on an unencrypted filesystem, "
            "where the key file would open the volume to anyone holding the disk",
            fix="put the target as a file on a filesystem inside the volume "
            "(kjumpctl setup --target /path/in/volume/image --size SIZE)",
        )
    return f"{ETC_DIR}/luks-{vol.uuid}.key"


def derive(sysroot: Sysroot, target: Any, run: Any = subprocess.run) -> bytes:
    """The volume key, unlocked with the enrolled key file."""
    vol = target.volume
    assert vol is not None
    path = key_file(sysroot, target)
    if not sysroot.path(path).is_file():
        raise VolumeError(
            f"the target is inside LUKS volume {vol.uuid} and kjumpd holds no key for it",
            why=f"{path} does not exist",
            fix=f"run `kjumpctl setup --target {target.path}` again: it enrolls a key file "
            "(your passphrase is asked once)",
        )
    try:
        key = luks.volume_key(
            str(sysroot.path(target.volume_node)), key_file=str(sysroot.path(path)), run=run
        )
    except VolumeError as e:
        raise VolumeError(
            f"kjumpd's key file no longer opens LUKS volume {vol.uuid}",
            why=f"{path}: {e.why or e.what}",
            fix=f"run `kjumpctl setup --target {target.path}` again to enroll a new key file "
            "(a keyslot may have been removed with cryptsetup luksKillSlot)",
        ) from None
    if len(key) != vol.key_size:
        raise VolumeError(
            f"LUKS volume {vol.uuid} opened with a {len(key)}-byte key",
            why=f"its mapping uses {vol.key_size} bytes: the volume was re-encrypted",
            fix=f"run `kjumpctl setup --target {target.path}` again",
        )
    return key


def enroll(
    sysroot: Sysroot, target: Any, existing_key_file: str | None = None, run: Any = subprocess.run
) -> str:
    """Make sure kjumpd holds a key file that opens ``target``'s volume; returns what was
    done. A new keyslot is added with ``cryptsetup luksAddKey``, which asks for an existing
    passphrase on the terminal unless ``existing_key_file`` is given."""
    vol = target.volume
    assert vol is not None
    path = key_file(sysroot, target)
    real = sysroot.path(path)
    if real.is_file():
        try:
            derive(sysroot, target, run)
            return f"key file {path} opens LUKS volume {vol.uuid}"
        except VolumeError as e:
            log.warning("%s; enrolling a new one", e.what)
            real.unlink()
    real.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
    try:
        os.write(fd, os.urandom(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    argv = [
        "cryptsetup", "luksAddKey", "--batch-mode",
        "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
    ]  # fmt: skip
    if existing_key_file:
        argv += ["--key-file", existing_key_file]
    argv += [str(sysroot.path(target.volume_node)), str(real)]
    try:
        proc = run(argv, timeout=600)
        rc = proc.returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        rc, e_text = -1, str(e)
    else:
        e_text = f"cryptsetup luksAddKey exited {rc}"
    if rc != 0:
        real.unlink(missing_ok=True)
        raise VolumeError(
            f"cannot enroll a key for LUKS volume {vol.uuid} ({target.volume_node})",
            why=e_text + (" (wrong passphrase)" if rc == 2 else ""),
            fix="run `kjumpctl setup` again on a terminal and type the volume's passphrase, "
            "or pass one of its key files with --luks-key-file",
        )
    derive(sysroot, target, run)
    return f"enrolled key file {path} in a new keyslot of LUKS volume {vol.uuid}"


def mark_image(sysroot: Sysroot, target: Any, uuid: str, run: Any = subprocess.run) -> bool:
    """Put kjumpd's token in the volume's LUKS2 header: R asks for the passphrase only while
    it is there. Before anything is frozen (it writes the header); undone by
    ``unmark_image``. False for a LUKS1 volume, which has no tokens (R then always asks)."""
    import json

    node = str(sysroot.path(target.volume_node))
    if luks.read_header_json(node) is None:
        return False
    unmark_image(sysroot, target, run)
    token = json.dumps({"type": luks.TOKEN_TYPE, "keyslots": [], "target": uuid})
    _cryptsetup(run, ["token", "import", "--json-file", "-", node], token.encode(), "mark")
    return True


def unmark_image(sysroot: Sysroot, target: Any, run: Any = subprocess.run) -> bool:
    """Remove kjumpd's tokens from the volume's header; True when there was one."""
    node = str(sysroot.path(target.volume_node))
    meta = luks.read_header_json(node)
    ids = luks.tokens_of(meta) if meta is not None else []
    for i in ids:
        _cryptsetup(run, ["token", "remove", "--token-id", str(i), node], b"", "unmark")
    return bool(ids)


def _cryptsetup(run: Any, args: list[str], stdin: bytes, what: str) -> None:
    try:
        proc = run(["cryptsetup", *args], input=stdin, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VolumeError(
            f"cannot {what} the LUKS volume for the restore", why=str(e), fix="install cryptsetup"
        ) from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise VolumeError(
            f"cannot {what} the LUKS volume's header for the restore",
            why=err[-1] if err else f"cryptsetup exited {proc.returncode}",
            fix="check the volume with `cryptsetup luksDump`",
        )


def _dracut_confs(sysroot: Sysroot) -> list[str]:
    """dracut's configuration files' contents, in the order dracut reads them."""
    from kjumpd.linux import crypttab

    confs = [sysroot.read_text(crypttab.DRACUT_CONF, default="")]
    by_name: dict[str, str] = {}
    for d in crypttab.DRACUT_CONF_DIRS:
        for name in sysroot.listdir(d):
            if name.endswith(".conf"):
                by_name[name] = f"{d}/{name}"
    return confs + [sysroot.read_text(by_name[n], default="") for n in sorted(by_name)]


def initramfs_key_file(sysroot: Sysroot, target: Any) -> str | None:
    """The key file that unlocks ``target``'s volume in this system's own initramfs
    (crypttab names it; Debian's KEYFILE_PATTERN or dracut's install_items puts it there),
    for R to unlock the volume the same way: without a passphrase. None when the volume is
    asked for."""
    from kjumpd.linux import crypttab

    vol = target.volume
    if vol is None:
        return None
    pattern = crypttab.keyfile_pattern(sysroot.read_text(crypttab.CONF_HOOK, default=""))
    items = crypttab.dracut_install_items(_dracut_confs(sysroot))
    node = os.path.realpath(sysroot.path(target.volume_node))
    for entry in crypttab.parse(sysroot.read_text(crypttab.CRYPTTAB, default="")):
        dev = entry.device
        if dev.upper().startswith("UUID=") and dev[5:].strip("\"'").lower() == vol.uuid:
            same = True  # the LUKS header's own UUID, with or without udev's link
        else:
            path = crypttab.device_path(dev)
            same = path is not None and os.path.realpath(sysroot.path(path)) == node
        if not same:
            continue
        path = crypttab.initramfs_key_file(entry, pattern, items)
        if path is not None and sysroot.path(path).is_file():
            return path
    return None
