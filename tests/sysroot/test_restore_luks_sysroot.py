"""R and a target inside a LUKS volume (kjumpd/restore/unlock.py open_volume), against a fake
system tree holding a real LUKS2 volume (cryptsetup luksFormat on a file) and a real image.
The passphrase comes from a scripted console; cryptsetup is the real one. The mapping the
kernel would build is the one stand-in: device-mapper is not on this machine, so
``open_mapping`` records the key it was given and "maps" the volume to the plaintext target.

What a user of an encrypted laptop expects: R asks for the disk's passphrase; the right one
restores, with the volume key handed to B in RAM only; a wrong one three times, or none,
boots the normal system with the image kept (its initramfs asks again)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from kjumpd.image.format import ImageState
from kjumpd.linux import luks
from kjumpd.restore import unlock
from tests.prereq import need
from tests.sysroot.test_restore_encrypted_sysroot import Console
from tests.sysroot.test_restore_init_sysroot import MIB, World

PASS = "correct horse battery"


def mark(disk: Path, uuid: str) -> None:
    token = json.dumps({"type": luks.TOKEN_TYPE, "keyslots": [], "target": uuid})
    subprocess.run(
        ["cryptsetup", "token", "import", "--json-file", "-", str(disk)],
        input=token.encode(), check=True, capture_output=True,
    )  # fmt: skip


class LuksWorld(World):
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        need(shutil.which("cryptsetup") is not None, "cryptsetup is not installed")
        super().__init__(tmp, monkeypatch)
        disk = self.root / "dev/vdc"
        with open(disk, "wb") as f:
            f.truncate(24 * MIB)
        pw = tmp / "pw"
        pw.write_bytes(PASS.encode())
        subprocess.run(
            ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
             "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
             "--key-file", str(pw), str(disk)],
            check=True, capture_output=True,
        )  # fmt: skip
        (self.root / "sys/block/vdc").mkdir(parents=True)
        (self.root / "sys/block/vdc/size").write_text(str(24 * MIB // 512) + "\n")
        (self.root / "sys/block/vdc/dev").write_text("252:32\n")
        version, uuid = luks.header_uuid(disk.read_bytes()[:4096]) or (0, "")
        assert version == 2
        self.volume = luks.Volume(uuid, 0, "aes-xts-plain64", 64, 0, 32768, 8192)
        self.cfg = replace(self.cfg, target_volume=self.volume)
        self.write_config()
        dump = subprocess.run(
            ["cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file",
             str(pw), str(disk)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        self.volume_key = luks.parse_key_dump(dump.stdout)
        self.mapped: list[bytes] = []

        def open_mapping(sysroot, vol, key, name=luks.MAPPING):
            assert vol == self.volume
            self.mapped.append(key)
            return "/dev/vda"

        monkeypatch.setattr(luks, "open_mapping", open_mapping)

    def save(self, *a, **kw) -> None:
        """What A does: the image, and kjumpd's token in the volume's header first."""
        mark(self.root / "dev/vdc", self.sb.uuid_str)
        super().save(*a, **kw)

    def run_with(self, console: Console) -> str:
        from kjumpd.restore.init import restore_first

        return restore_first(self.sysroot, ask=console)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LuksWorld:
    return LuksWorld(tmp_path, monkeypatch)


def test_the_disks_passphrase_unlocks_the_volume_and_b_gets_its_key_in_ram(world) -> None:
    world.save()
    console = Console(PASS)
    assert world.run_with(console) == "restore"
    assert len(console.prompts) == 1
    assert re.search(r"passphrase for disk /dev/vdc \(LUKS [0-9a-f-]{36}\)", console.prompts[0])
    assert world.mapped == [world.volume_key]
    assert world.header().state == ImageState.RESTORING
    load = world.kexec_calls()[0]
    m = re.search(r"--initrd=(\S+)", load)
    assert m and m.group(1) == f"{world.root}{unlock.B_INITRD}"
    blob = Path(m.group(1)).read_bytes()
    base = (world.root / "kjump/save/initramfs.cpio.gz").read_bytes()
    handed = blob[len(base) :]
    assert b"kjump/restore-volume.json" in handed
    at = handed.index(b'{"')
    record = json.loads(handed[at : handed.index(b"}", at) + 1])
    assert luks.keyed_from_dict(record) == (world.volume, world.volume_key)
    assert world.volume_key not in world.target.read_bytes()


def test_a_wrong_passphrase_is_asked_again(world) -> None:
    world.save()
    console = Console("wrong", PASS)
    assert world.run_with(console) == "restore"
    assert "try 2 of 3" in console.prompts[1]


def test_three_wrong_passphrases_boot_normally_and_keep_the_image(world) -> None:
    world.save()
    before = world.target.read_bytes()
    assert world.run_with(Console("a", "b", "c", PASS)) == "kept:passphrase"
    assert world.mapped == [] and world.target.read_bytes() == before
    assert world.header().state == ImageState.SAVED
    calls = world.kexec_calls()
    assert "kjump.rf=kept:passphrase" in calls[0] and "kjump/normal/vmlinuz" in calls[0]


def test_no_passphrase_boots_normally_and_keeps_the_image(world) -> None:
    world.save()
    assert world.run_with(Console("")) == "kept:skipped"
    assert world.header().state == ImageState.SAVED


def test_a_volume_on_none_of_the_disks_boots_normally(world) -> None:
    world.save()
    (world.root / "dev/vdc").unlink()
    console = Console(PASS)
    assert world.run_with(console) == "kept:no-volume"
    assert console.prompts == []  # nothing to ask for
    assert "kjump.rf=kept:no-volume" in world.kexec_calls()[0]


def test_a_volume_without_kjumpds_token_boots_normally_without_asking(world) -> None:
    """The restore-first entry boots at every boot: with no hibernation marked in the
    volume's header, R asks nothing (the normal initramfs asks for the passphrase once)."""
    World.save(world)  # an image, but A's token never written (or since removed)
    console = Console(PASS)
    assert world.run_with(console) == "normal"
    assert console.prompts == [] and world.mapped == []
    assert world.header().state == ImageState.SAVED
    assert world.kexec_calls()[0].endswith("--append=root=/dev/vda2 ro quiet")


def test_the_token_is_found_in_the_secondary_header_when_the_primary_is_damaged(world) -> None:
    mark(world.root / "dev/vdc", world.sb.uuid_str)
    disk = world.root / "dev/vdc"
    assert luks.image_marked(luks.read_header_json(str(disk)))
    with open(disk, "r+b") as f:
        f.seek(4096)
        f.write(b"{ damaged" + bytes(100))
    meta = luks.read_header_json(str(disk))
    assert meta is not None and luks.tokens_of(meta) == [0]
    with open(disk, "r+b") as f:
        f.write(bytes(64 << 10))  # both copies gone: R asks rather than lose a session
    assert luks.read_header_json(str(disk)) is None
    assert luks.image_marked(None)


def test_the_key_file_of_the_normal_initramfs_unlocks_without_asking(world, tmp_path) -> None:
    """This system's initramfs unlocks the volume with a key file (crypttab +
    KEYFILE_PATTERN): R holds the same file and asks nothing."""
    world.save()
    keyfile = world.root / unlock.LUKS_KEY_FILE.lstrip("/")
    keyfile.write_bytes(PASS.encode())
    console = Console()
    assert world.run_with(console) == "restore"
    assert console.prompts == [] and world.mapped == [world.volume_key]


def test_a_key_file_that_no_longer_opens_falls_back_to_the_passphrase(world) -> None:
    world.save()
    (world.root / unlock.LUKS_KEY_FILE.lstrip("/")).write_bytes(b"an old key")
    console = Console(PASS)
    assert world.run_with(console) == "restore"
    assert len(console.prompts) == 1 and world.mapped == [world.volume_key]


#: what systemd-cryptenroll --tpm2-device=auto writes (the sealed blob shortened)
TPM2_TOKEN = {
    "type": "systemd-tpm2", "keyslots": ["0"], "tpm2-blob": "AAAA", "tpm2-pcrs": [7],
    "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc", "tpm2-policy-hash": "00",
    "tpm2-pin": False,
}  # fmt: skip
PLUGIN = "usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so"


def enroll_tpm2(world: LuksWorld, plugin: bool = True) -> None:
    subprocess.run(
        ["cryptsetup", "token", "import", "--json-file", "-", str(world.root / "dev/vdc")],
        input=json.dumps(TPM2_TOKEN).encode(), check=True, capture_output=True,
    )  # fmt: skip
    if plugin:
        (world.root / PLUGIN).parent.mkdir(parents=True, exist_ok=True)
        (world.root / PLUGIN).write_bytes(b"")


def test_the_tpm2_token_systemd_enrolled_unlocks_without_asking(world, monkeypatch) -> None:
    """The user enrolled the TPM (systemd-cryptenroll) and R carries cryptsetup's plugin:
    nobody is asked. The TPM is stood in (this machine has none; the VM tier's scenario
    luks-tpm2 unseals with swtpm)."""
    world.save()
    enroll_tpm2(world)
    asked: list[tuple[str, str]] = []

    def unsealed(sysroot, node, kind, **kw):
        asked.append((node, kind))
        return world.volume_key

    monkeypatch.setattr(luks, "token_volume_key", unsealed)
    console = Console()
    assert world.run_with(console) == "restore"
    assert console.prompts == [] and world.mapped == [world.volume_key]
    assert asked == [("/dev/vdc", "systemd-tpm2")]


def test_a_tpm2_token_that_does_not_open_falls_back_to_the_passphrase(world, capsys) -> None:
    """PCR 7 changed (Secure Boot toggled), the TPM cleared, or no TPM at all: cryptsetup
    (the real one) fails, R says why and asks for the passphrase."""
    world.save()
    enroll_tpm2(world)
    console = Console(PASS)
    assert world.run_with(console) == "restore"
    assert len(console.prompts) == 1 and world.mapped == [world.volume_key]
    assert "the systemd-tpm2 token does not open /dev/vdc" in capsys.readouterr().out


def test_a_tpm2_token_r_has_no_plugin_for_is_named_and_the_passphrase_asked(world, capsys) -> None:
    world.save()
    enroll_tpm2(world, plugin=False)
    console = Console(PASS)
    assert world.run_with(console) == "restore"
    assert len(console.prompts) == 1
    out = capsys.readouterr().out
    assert "has a systemd-tpm2 token and this restore environment no cryptsetup plugin" in out
    assert "--refresh-boot-entry" in out


def test_an_encrypted_image_inside_luks_asks_for_the_disk_then_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both layers: R unlocks the volume first (the image is inside it), then the image key;
    B gets the volume and the image key, in RAM."""
    from tests.sysroot.test_restore_encrypted_sysroot import EncryptedWorld

    class Both(LuksWorld, EncryptedWorld):
        pass

    world = Both(tmp_path, monkeypatch)
    mark(world.root / "dev/vdc", world.sb.uuid_str)
    key = world.save_encrypted()
    console = Console(PASS, PASS)
    assert world.run_with(console) == "restore"
    assert "passphrase for disk /dev/vdc" in console.prompts[0]
    assert "passphrase for the hibernation image" in console.prompts[1]
    blob = Path(re.search(r"--initrd=(\S+)", world.kexec_calls()[0]).group(1)).read_bytes()
    assert b"kjump/restore-volume.json" in blob and b"kjump/restore-key" in blob
    assert key.hex().encode() in blob and world.volume_key.hex().encode() in blob
