"""A's side of a target inside a LUKS volume, on a fake system tree: the volume located on
its disk from the dm-crypt table and sysfs (blockmap.volume_of), and kjumpd's key file
enrolled in and opening a real LUKS2 volume (cryptsetup on a file; volumekey)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from kjumpd.errors import BlockMapError, VolumeError
from kjumpd.linux import luks
from kjumpd.sysroot import Sysroot
from tests.prereq import need
from tests.sysroot.test_steps import _blockdev

MIB = 1 << 20
PASS = b"correct horse battery"


def _luks_file(path: Path, size: int, tmp: Path) -> bytes:
    """A LUKS2 volume in ``path`` (passphrase PASS, fast PBKDF); its volume key."""
    need(shutil.which("cryptsetup") is not None, "cryptsetup is not installed")
    with open(path, "wb") as f:
        f.truncate(size)
    pw = tmp / "pass"
    pw.write_bytes(PASS)
    subprocess.run(
        ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--key-file", str(pw), str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    return luks.volume_key(str(path), key_file=str(pw))


def _stack(root: Path, tmp: Path, kind: str = "LUKS2") -> tuple[Sysroot, str]:
    """sdb with a LUKS2 volume on partition 1 (from 1 MiB), its mapping dm-0, an LV dm-1
    inside; the LUKS header really on the disk file at the partition's start."""
    vol = tmp / "vol"
    _luks_file(vol, 20 * MIB, tmp)
    disk = root / "dev/sdb"
    disk.parent.mkdir(parents=True, exist_ok=True)
    with open(disk, "wb") as f:
        f.truncate(32 * MIB)
        f.seek(MIB)
        f.write(vol.read_bytes()[: 16 * MIB])
    uuid = luks.header_uuid(vol.read_bytes()[:4096])[1]
    _blockdev(root, "sdb", "8:16", size=str(32 * MIB // 512))
    _blockdev(
        root, "sdb1", "8:17", parent="sdb", partition="1", start="2048", size=str(20 * MIB // 512)
    )
    _blockdev(
        root,
        "dm-0",
        "253:0",
        dm__uuid=f"CRYPT-{kind}-{uuid.replace('-', '')}-luks",
        dm__name="luks",
    )
    _blockdev(root, "dm-1", "253:1", dm__uuid="LVM-abc", dm__name="vg-data")
    return Sysroot(root), uuid


TABLES = {
    "dm-0": "0 24576 crypt aes-xts-plain64 :64:logon:cryptsetup:x-d0 0 8:17 32768 "
    "1 sector_size:4096\n",
    "dm-1": "0 2048 linear 253:0 2048\n2048 4096 linear 253:0 16384\n",
}


def test_a_target_on_lvm_inside_luks_is_mapped_into_the_volume_and_the_volume_located(tmp_path):
    """Ubuntu's stack: the walk stops at the dm-crypt device (the block map is in the
    volume's plaintext, through the LV's segments) and the volume is found on sdb where its
    LUKS header is, with the table's cipher, offsets and options."""
    from kjumpd.daemon import blockmap

    root = tmp_path / "root"
    sr, uuid = _stack(root, tmp_path)
    dm_table = lambda s, d: TABLES[d.name]  # noqa: E731
    disk, ext = blockmap.to_disk(
        sr, blockmap.device_by_devno(sr, "253:1"), [(0, 0, 2 * MIB)], dm_table=dm_table,
        stop_at_crypt=True,
    )  # fmt: skip
    assert disk.name == "dm-0"
    assert ext == [(0, 2048 * 512, MIB), (MIB, 16384 * 512, MIB)]
    vol, node = blockmap.volume_of(sr, disk, dm_table)
    assert node == "/dev/sdb1"
    assert vol == luks.Volume(
        uuid, MIB, "aes-xts-plain64", 64, 0, 32768, 24576, ("sector_size:4096",)
    )


def test_plain_dm_crypt_is_refused_with_the_reason(tmp_path):
    from kjumpd.daemon import blockmap

    root = tmp_path / "root"
    sr, _uuid = _stack(root, tmp_path, kind="PLAIN")
    with pytest.raises(BlockMapError, match="plain dm-crypt") as ei:
        blockmap.volume_of(sr, blockmap.device_by_name(sr, "dm-0"), lambda s, d: TABLES[d.name])
    assert "unlock" in ei.value.why and ei.value.fix


def test_a_volume_whose_header_is_not_where_the_table_says_is_refused(tmp_path):
    from kjumpd.daemon import blockmap

    root = tmp_path / "root"
    sr, _uuid = _stack(root, tmp_path)
    with open(root / "dev/sdb", "r+b") as f:
        f.seek(MIB)
        f.write(bytes(4096))
    with pytest.raises(BlockMapError, match="no LUKS header"):
        blockmap.volume_of(sr, blockmap.device_by_name(sr, "dm-0"), lambda s, d: TABLES[d.name])


def _target(root: Path, tmp: Path, kind: str = "file") -> tuple[SimpleNamespace, bytes]:
    node = root / "dev/vdc1"
    node.parent.mkdir(parents=True, exist_ok=True)
    key = _luks_file(node, 20 * MIB, tmp)
    uuid = luks.header_uuid(node.read_bytes()[:4096])[1]
    vol = luks.Volume(uuid, MIB, "aes-xts-plain64", 64, 0, 32768, 8192)
    (root / "srv/enc").mkdir(parents=True, mode=0o700)
    path = "/srv/enc/image" if kind == "file" else "/dev/mapper/vg-image"
    return SimpleNamespace(path=path, kind=kind, volume=vol, volume_node="/dev/vdc1"), key


def test_setup_enrolls_a_key_file_that_opens_the_volume_at_each_hibernation(tmp_path):
    """The key file lies beside the target (inside the volume), root's alone; it opens a
    keyslot of its own, and what it derives is the volume's key."""
    from kjumpd.daemon import volumekey

    root = tmp_path / "root"
    target, key = _target(root, tmp_path)
    sr = Sysroot(root)
    said = volumekey.enroll(sr, target, str(tmp_path / "pass"))
    path = root / f"srv/enc/luks-{target.volume.uuid}.key"
    assert said.startswith("enrolled key file") and path.is_file()
    assert os.stat(path).st_mode & 0o777 == 0o400 and len(path.read_bytes()) == 64
    assert volumekey.derive(sr, target) == key
    # the user's passphrase still opens the volume; a second setup adds no keyslot
    assert luks.volume_key(str(root / "dev/vdc1"), passphrase=PASS) == key
    assert "opens" in volumekey.enroll(sr, target, str(tmp_path / "pass"))
    dump = subprocess.run(
        ["cryptsetup", "luksDump", str(root / "dev/vdc1")], capture_output=True, text=True
    ).stdout
    assert dump.count(": luks2") == 2


def test_a_wrong_existing_key_enrolls_nothing_and_says_so(tmp_path):
    from kjumpd.daemon import volumekey

    root = tmp_path / "root"
    target, _key = _target(root, tmp_path)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not it")
    with pytest.raises(VolumeError, match="cannot enroll") as ei:
        volumekey.enroll(Sysroot(root), target, str(wrong))
    assert "wrong passphrase" in ei.value.why and "--luks-key-file" in ei.value.fix
    assert not (root / f"srv/enc/luks-{target.volume.uuid}.key").exists()


def test_a_removed_keyslot_fails_the_hibernation_before_anything_changes(tmp_path):
    """The key file no longer opens the volume (its keyslot killed): the derivation, done
    in the preflight, names the cause and the fix."""
    from kjumpd.daemon import volumekey

    root = tmp_path / "root"
    target, _key = _target(root, tmp_path)
    sr = Sysroot(root)
    volumekey.enroll(sr, target, str(tmp_path / "pass"))
    subprocess.run(
        ["cryptsetup", "luksKillSlot", "--batch-mode", "--key-file", str(tmp_path / "pass"),
         str(root / "dev/vdc1"), "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    with pytest.raises(VolumeError, match="no longer opens") as ei:
        volumekey.derive(sr, target)
    assert "kjumpctl setup" in ei.value.fix


def test_no_key_file_for_a_raw_device_on_an_unencrypted_etc(tmp_path):
    """A raw LV target inside the volume has no filesystem of its own: the key file would go
    to /etc/kjumpd, which here is not encrypted: refused, with the way out."""
    from kjumpd.daemon import volumekey

    root = tmp_path / "root"
    (root / "etc/kjumpd").mkdir(parents=True)
    (root / "sys/dev/block").mkdir(parents=True)
    target, _key = _target(root, tmp_path, kind="partition")
    with pytest.raises(VolumeError, match="no safe place") as ei:
        volumekey.key_file(Sysroot(root), target)
    assert "file on a filesystem inside the volume" in ei.value.fix


def test_a_hibernation_marks_the_volume_and_its_end_unmarks_it(tmp_path):
    """kjumpd's token in the LUKS2 header, what R looks for before asking: written before
    the freeze, replaced (never doubled) by the next hibernation, removed by the undo."""
    from kjumpd.daemon import volumekey

    root = tmp_path / "root"
    target, _key = _target(root, tmp_path)
    sr = Sysroot(root)
    node = str(root / "dev/vdc1")
    assert not luks.image_marked(luks.read_header_json(node))
    assert volumekey.mark_image(sr, target, "0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e")
    assert volumekey.mark_image(sr, target, "0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e")
    meta = luks.read_header_json(node)
    assert len(luks.tokens_of(meta)) == 1 and luks.image_marked(meta)
    token = meta["tokens"][str(luks.tokens_of(meta)[0])]
    assert token["target"] == "0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e"
    assert volumekey.unmark_image(sr, target)
    assert not luks.image_marked(luks.read_header_json(node))
    assert not volumekey.unmark_image(sr, target)
    # the volume still opens with its passphrase: only the token changed
    assert luks.volume_key(node, passphrase=PASS) == _key


def test_a_luks1_volume_is_not_marked_and_r_always_asks(tmp_path):
    from kjumpd.daemon import volumekey

    need(shutil.which("cryptsetup") is not None, "cryptsetup is not installed")
    root = tmp_path / "root"
    target, _key = _target(root, tmp_path)
    node = root / "dev/vdc1"
    pw = tmp_path / "pass"
    subprocess.run(
        ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1", "--pbkdf-force-iterations",
         "1000", "--key-file", str(pw), str(node)],
        check=True, capture_output=True,
    )  # fmt: skip
    assert luks.read_header_json(str(node)) is None
    assert volumekey.mark_image(Sysroot(root), target, "x") is False
    assert luks.image_marked(None)


@pytest.mark.parametrize(
    "device,pattern,found",
    [
        ("UUID={uuid}", '"/etc/keys/*.key"', True),
        ("/dev/vdc1", "/etc/keys/*", True),
        ("UUID={uuid}", None, False),  # the initramfs holds no key file: R asks
        ("UUID=0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e", '"/etc/keys/*.key"', False),
        # Ubuntu's installer names the partition; udev links it
        ("PARTUUID=6f1c9a2e-01", '"/etc/keys/*.key"', True),
        ("LABEL=cryptroot", '"/etc/keys/*.key"', True),
        ("PARTUUID=0000aaaa-02", '"/etc/keys/*.key"', False),  # another partition
    ],
)
def test_r_gets_the_key_file_the_normal_initramfs_unlocks_the_volume_with(
    tmp_path, device, pattern, found
):
    from kjumpd.daemon import volumekey

    root = tmp_path / "root"
    target, _key = _target(root, tmp_path)
    for link in ("by-partuuid/6f1c9a2e-01", "by-label/cryptroot", "by-partuuid/0000aaaa-02"):
        (root / "dev/disk" / link).parent.mkdir(parents=True, exist_ok=True)
    (root / "dev/disk/by-partuuid/6f1c9a2e-01").symlink_to("../../vdc1")
    (root / "dev/disk/by-label/cryptroot").symlink_to("../../vdc1")
    (root / "dev/vdd2").write_bytes(b"")
    (root / "dev/disk/by-partuuid/0000aaaa-02").symlink_to("../../vdd2")
    (root / "etc/keys").mkdir(parents=True)
    (root / "etc/keys/vol.key").write_bytes(b"k" * 64)
    dev = device.format(uuid=target.volume.uuid)
    (root / "etc/crypttab").write_text(f"vol_crypt {dev} /etc/keys/vol.key luks\n")
    if pattern:
        (root / "etc/cryptsetup-initramfs").mkdir(parents=True)
        (root / "etc/cryptsetup-initramfs/conf-hook").write_text(f"KEYFILE_PATTERN={pattern}\n")
    got = volumekey.initramfs_key_file(Sysroot(root), target)
    assert got == ("/etc/keys/vol.key" if found else None)


@pytest.mark.parametrize("r_has_plugin", [True, False])
def test_the_preflight_says_whether_r_unlocks_with_the_tpm2_token(tmp_path, r_has_plugin):
    """The user enrolled the volume to the TPM (systemd-cryptenroll): `kjumpctl check` says R
    unlocks with it, or warns (not fatal: someone can still type the passphrase) that R will
    ask, and how to give R the plugin."""
    import json

    from kjumpd.daemon import preflight

    root = tmp_path / "root"
    target, _key = _target(root, tmp_path)
    token = {"type": "systemd-tpm2", "keyslots": ["0"], "tpm2-blob": "AAAA", "tpm2-pcrs": [7],
             "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc", "tpm2-policy-hash": "00",
             "tpm2-pin": False}  # fmt: skip
    subprocess.run(
        ["cryptsetup", "token", "import", "--json-file", "-", str(root / "dev/vdc1")],
        input=json.dumps(token).encode(), check=True, capture_output=True,
    )  # fmt: skip
    rep = SimpleNamespace(items=[])
    got = frozenset({"cryptsetup", "systemd-tpm2"} if r_has_plugin else {"cryptsetup"})
    preflight._volume_tokens(Sysroot(root), target, got, rep)
    [item] = rep.items
    assert item.name == "volume token" and item.ok is r_has_plugin and not item.fatal
    if r_has_plugin:
        assert "unlocks LUKS volume" in item.detail and "systemd-tpm2 token" in item.detail
    else:
        assert "will ask for the volume's passphrase" in item.detail
        assert "--refresh-boot-entry" in item.fix
    rep = SimpleNamespace(items=[])
    subprocess.run(["cryptsetup", "token", "remove", "--token-id", "0", str(root / "dev/vdc1")])
    preflight._volume_tokens(Sysroot(root), target, got, rep)
    assert rep.items == []  # no token: nothing to say


def test_r_gets_the_key_file_fedoras_dracut_puts_in_the_initramfs(tmp_path):
    """Fedora's way: crypttab names the key file and a dracut configuration file lists it in
    install_items; one in /etc/dracut.conf.d hides the same name in /usr/lib."""
    from kjumpd.daemon import volumekey

    root = tmp_path / "root"
    target, _key = _target(root, tmp_path)
    (root / "etc/keys").mkdir(parents=True)
    (root / "etc/keys/vol.key").write_bytes(b"k" * 64)
    (root / "etc/crypttab").write_text(
        f"luks-{target.volume.uuid} UUID={target.volume.uuid} /etc/keys/vol.key discard\n"
    )
    assert volumekey.initramfs_key_file(Sysroot(root), target) is None
    (root / "usr/lib/dracut/dracut.conf.d").mkdir(parents=True)
    (root / "usr/lib/dracut/dracut.conf.d/50-keys.conf").write_text(
        'install_items+=" /etc/keys/vol.key "\n'
    )
    assert volumekey.initramfs_key_file(Sysroot(root), target) == "/etc/keys/vol.key"
    (root / "etc/dracut.conf.d").mkdir(parents=True)
    (root / "etc/dracut.conf.d/50-keys.conf").write_text("# no key files in the initramfs\n")
    assert volumekey.initramfs_key_file(Sysroot(root), target) is None
