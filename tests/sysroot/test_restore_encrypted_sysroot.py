"""R and an encrypted image (kjumpd/restore/unlock.py) against a fake system tree: a real
target holding a real encrypted image, a real ext4 stamp, the image key in R's tree; the
passphrase comes from a scripted console, kexec is the logging fake.

What a user of an encrypted laptop expects: the right passphrase restores; a wrong one
three times, or none, boots the normal system and keeps the image for a later boot; an
altered header is refused (INVALID) with the reason; the key reaches B only in RAM."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kjumpd.image import seal, store
from kjumpd.image.format import ImageState, crc32
from kjumpd.image.save import save_image
from kjumpd.restore import unlock
from kjumpd.restore.init import restore_first
from tests.sysroot.test_restore_init_sysroot import AREA, MIB, Memory, World

PASS = "correct horse battery"


class Console:
    """What the user types, one answer per prompt; records the prompts."""

    def __init__(self, *answers: str | None) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str | None:
        self.prompts.append(prompt)
        return self.answers.pop(0) if self.answers else None


class EncryptedWorld(World):
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(tmp, monkeypatch)
        self.keyfile = seal.KeyFile.create(PASS, n=1 << 10)
        (self.root / unlock.KEY_FILE.lstrip("/")).write_text(self.keyfile.to_json())

    def save_encrypted(self, public: bytes | None = None) -> bytes:
        from kjumpd.fsstamp import read_stamp

        key = seal.new_image_key()
        ident = {
            "jump_area": list(AREA),
            "jump_back_entry": 0x1000000,
            "save_kernel_hash": self.cfg.save_hash,
            "fs_stamps": [read_stamp(self.fs).to_dict()],
            "seal": seal.seal_key(public or self.keyfile.public, key),
        }
        dev, _ = store.open_target(self.target, writable=True)
        with dev:
            save_image(
                Memory(2 * MIB),
                [(0x100000, 0x100000 + 2 * MIB)],
                dev,
                identity=ident,
                mode="shutdown",
                chunk_size=256 * 1024,
                workers=1,
                key=key,
            )
        return key

    def run_with(self, console: Console) -> str:
        return restore_first(self.sysroot, ask=console)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EncryptedWorld:
    return EncryptedWorld(tmp_path, monkeypatch)


def test_the_right_passphrase_restores_and_hands_the_key_to_b_in_ram(world) -> None:
    key = world.save_encrypted()
    console = Console(PASS)
    assert world.run_with(console) == "restore"
    assert len(console.prompts) == 1 and "passphrase" in console.prompts[0]
    h = world.header()
    assert h.state == ImageState.RESTORING and h.attempt == 1
    load = world.kexec_calls()[0]
    # B gets its initramfs with the key archive appended, from R's RAM (/run)
    m = re.search(r"--initrd=(\S+)", load)
    assert m and m.group(1) == f"{world.root}{unlock.B_INITRD}"
    blob = Path(m.group(1)).read_bytes()
    base = (world.root / "kjump/save/initramfs.cpio.gz").read_bytes()
    assert blob.startswith(base)
    assert key.hex().encode() in blob[len(base) :]
    assert b"kjump/restore-key" in blob[len(base) :]
    # nothing of the key on the target
    assert key not in world.target.read_bytes() and key.hex().encode() not in (
        world.target.read_bytes()
    )


def test_a_wrong_passphrase_is_asked_again(world) -> None:
    world.save_encrypted()
    console = Console("wrong", PASS)
    assert world.run_with(console) == "restore"
    assert len(console.prompts) == 2 and "try 2 of 3" in console.prompts[1]


def test_three_wrong_passphrases_boot_normally_and_keep_the_image(world) -> None:
    world.save_encrypted()
    before = world.target.read_bytes()
    assert world.run_with(Console("a", "b", "c", PASS)) == "kept:passphrase"
    assert world.header().state == ImageState.SAVED
    assert world.target.read_bytes() == before  # not even an attempt counted
    calls = world.kexec_calls()
    assert "kjump.rf=kept:passphrase" in calls[0] and "kjump/normal/vmlinuz" in calls[0]
    # the next boot asks again and restores
    world.log.unlink()
    assert world.run_with(Console(PASS)) == "restore"


def test_an_empty_passphrase_boots_normally_and_keeps_the_image(world) -> None:
    world.save_encrypted()
    assert world.run_with(Console("")) == "kept:skipped"
    assert world.header().state == ImageState.SAVED


def test_no_console_keeps_the_image(world) -> None:
    world.save_encrypted()
    assert world.run_with(Console(None)) == "kept:skipped"
    assert world.header().state == ImageState.SAVED


def test_an_image_sealed_to_another_key_is_kept_with_the_key_ids(world, capsys) -> None:
    other = seal.KeyFile.create("x", n=1 << 10)
    world.save_encrypted(public=other.public)
    console = Console(PASS)
    assert world.run_with(console) == "kept:other-key"
    assert console.prompts == []  # nobody is asked for a passphrase that cannot work
    out = capsys.readouterr().out
    assert other.key_id in out and world.keyfile.key_id in out


def test_r_without_the_key_file_keeps_the_image(world) -> None:
    world.save_encrypted()
    (world.root / unlock.KEY_FILE.lstrip("/")).unlink()
    assert world.run_with(Console(PASS)) == "kept:no-key"
    assert world.header().state == ImageState.SAVED


def test_a_damaged_key_file_in_r_keeps_the_image(world) -> None:
    world.save_encrypted()
    (world.root / unlock.KEY_FILE.lstrip("/")).write_text("{not json")
    assert world.run_with(Console(PASS)) == "kept:no-key"
    assert world.header().state == ImageState.SAVED


def test_an_image_without_a_usable_seal_is_refused(world) -> None:
    key = world.save_encrypted()
    dev, _ = store.open_target(world.target, writable=True)
    with dev:  # the identity's seal replaced (its CRCs redone): the image cannot be opened
        h = store.read_header(dev)
        meta = store.read_metadata(dev, h)
        ident = dict(meta.identity, seal={"version": 1})
        raw = type(meta)(extents=meta.extents, identity=ident).pack()
        assert len(raw) <= h.data_offset - h.metadata_offset
        dev.write(h.metadata_offset, raw)
        store.update_header(dev, metadata_length=len(raw), metadata_crc=crc32(raw))
    assert world.run_with(Console(PASS)) == "invalid:altered"
    assert world.header().reason.startswith("altered: the image's seal")
    assert key.hex().encode() not in world.target.read_bytes()


@pytest.mark.parametrize("change", [{"jump_back_entry": 0x2000000}, {"mode": "reboot"}])
def test_an_altered_header_is_refused_before_b_runs(world, change) -> None:
    world.save_encrypted()
    dev, _ = store.open_target(world.target, writable=True)
    with dev:
        store.update_header(dev, **change)
    assert world.run_with(Console(PASS)) == "invalid:altered"
    h = world.header()
    assert h.state == ImageState.INVALID
    assert h.reason.startswith("altered: the image header or metadata was altered")
    calls = world.kexec_calls()
    assert "kjump.role=restore" not in " ".join(calls)
    assert "kjump.rf=invalid:altered" in calls[0]


def test_an_unencrypted_image_asks_nothing(world) -> None:
    world.save()
    console = Console(PASS)
    assert world.run_with(console) == "restore"
    assert console.prompts == []


def test_r_in_the_jump_area_refuses_an_altered_record_as_altered_before_it_reaches_memory(
    world, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One boot: R restores the records itself. A record changed with both checksums redone
    passes every damage check but not authentication: the image is INVALID(altered: ...) as
    an altered header is, the normal system is told so, and no byte of it reaches A's memory."""
    import struct

    from kjumpd.restore.decision import explain
    from tests.sysroot.test_restore_init_sysroot import CONFINED_IOMEM, confined
    from tests.unit.test_image_seal import records, rewrite_record

    world.save_encrypted()
    off, ch, bitmap = next(r for r in records(world.target) if r[1].payload_length > 16)
    with open(world.target, "rb") as f:
        f.seek(off + len(ch.pack()) + len(bitmap))
        payload = bytearray(f.read(ch.payload_length))
    payload[len(payload) // 2] ^= 0x01
    rewrite_record(world.target, off, ch, bitmap, bytes(payload))
    crcs = [rec.crc for _off, rec, _bm in records(world.target)]
    dev, _ = store.open_target(world.target, writable=True)
    with dev:
        store.update_header(dev, data_crc=crc32(struct.pack(f"<{len(crcs)}I", *crcs)))
    jumps = confined(world, monkeypatch, CONFINED_IOMEM)
    assert world.run_with(Console(PASS)) == "invalid:altered"
    h = world.header()
    assert h.state == ImageState.INVALID
    assert h.reason.startswith(f"altered: chunk {ch.index} at byte offset {off} fails auth")
    assert jumps == []
    calls = world.kexec_calls()
    assert "kjump.rf=invalid:altered" in calls[0] and "kjump.role=restore" not in calls[0]
    lo, hi = ch.phys, ch.phys + ch.raw_length
    assert (world.root / "dev/mem").read_bytes()[lo:hi] == bytes(hi - lo)
    seen = explain(h.state_text.split("(")[0], h.reason)
    assert seen["refused"] and seen["code"] == "altered"
    assert "changed after it was saved" in seen["summary"]
