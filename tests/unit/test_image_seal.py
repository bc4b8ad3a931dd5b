"""Encrypted, authenticated images: the key file, the seal, encrypted records and the
header tag. A secret in memory never appears on the target; any change to an image (a
record's bytes with its CRC recomputed, the header's jump-back address, the metadata, a
record from another image) is refused before a byte of it reaches memory."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kjumpd.errors import ImageAlteredError, ImageKeyError
from kjumpd.image import restore, save, seal, store
from kjumpd.image.device import ImageDevice
from kjumpd.image.format import (
    CHUNK_HEADER_SIZE,
    HEADER_SLOT_OFFSETS,
    PAGE_SIZE,
    ChunkHeader,
    Header,
    crc32,
)
from kjumpd.image.memfile import FileMemorySink, FileMemorySource
from tests.unit.test_pipeline import CHUNK, RANGES, MiB, make_memory

#: cheap scrypt for tests (the default costs 32 MiB per try)
FAST_N = 1 << 10
SECRET = bytes(range(64)) * 2  # 128 bytes no page of make_memory holds


@pytest.fixture(scope="module")
def keyfile():
    return seal.KeyFile.create("correct horse", n=FAST_N)


def _identity(kf, image_key):
    return {
        "main_kernel": "6.12 abc",
        "jump_area": [0x20000000, 1 << 27],
        "jump_back_entry": 0x1234000,
        "save_kernel_hash": "sha256:x",
        "seal": seal.seal_key(kf.public, image_key),
    }


@pytest.fixture
def encrypted(tmp_path, keyfile):
    mem = bytearray(make_memory(tmp_path / "mem", 4 * MiB))
    at = 0x100000 + 5 * PAGE_SIZE + 100
    mem[at : at + len(SECRET)] = SECRET
    (tmp_path / "mem").write_bytes(mem)
    tgt = tmp_path / "target"
    store.create_target(tgt, 8 * MiB)
    image_key = seal.new_image_key()
    with ImageDevice(tgt, writable=True) as dev, FileMemorySource(tmp_path / "mem") as src:
        save.save_image(
            src,
            RANGES,
            dev,
            identity=_identity(keyfile, image_key),
            mode="test",
            chunk_size=CHUNK,
            workers=2,
            key=image_key,
        )
    return tmp_path, bytes(mem), tgt, image_key


def _restore(tgt, out, key):
    with ImageDevice(tgt, writable=False) as dev, FileMemorySink(out) as sink:
        return restore.restore_image(dev, sink, workers=2, key=key)


def records(tgt):
    """(offset, ChunkHeader, bitmap) of every record in the data area."""
    with ImageDevice(tgt, writable=False) as dev:
        h = store.read_header(dev)
        blob = dev.read(h.data_offset, h.data_length)
    out, pos = [], 0
    while pos < len(blob):
        ch = ChunkHeader.unpack(blob[pos : pos + CHUNK_HEADER_SIZE])
        bm = blob[pos + CHUNK_HEADER_SIZE : pos + CHUNK_HEADER_SIZE + ch.bitmap_length]
        out.append((h.data_offset + pos, ch, bm))
        pos += ch.record_length
    return out


# ------------------------------------------------------------------ key file and seal


def test_key_file_opens_with_its_passphrase_only(keyfile):
    again = seal.KeyFile.from_json(keyfile.to_json())
    assert again == keyfile
    private = again.unlock("correct horse")
    image_key = seal.new_image_key()
    sealed = seal.seal_key(keyfile.public, image_key)
    assert seal.unseal_key(private, keyfile.public, sealed) == image_key
    with pytest.raises(ImageKeyError) as ei:
        again.unlock("Correct horse")
    assert "wrong passphrase" in ei.value.why


def test_key_file_holds_no_private_key_in_the_clear(keyfile):
    private = keyfile.unlock("correct horse")
    text = keyfile.to_json()
    assert private.hex() not in text and "correct horse" not in text


def test_an_empty_passphrase_is_refused():
    with pytest.raises(ImageKeyError, match="empty"):
        seal.KeyFile.create("")


def test_a_seal_for_another_key_names_the_key_ids(keyfile):
    other = seal.KeyFile.create("x", n=FAST_N)
    sealed = seal.seal_key(other.public, seal.new_image_key())
    with pytest.raises(ImageKeyError) as ei:
        seal.unseal_key(keyfile.unlock("correct horse"), keyfile.public, sealed)
    assert other.key_id in ei.value.why and keyfile.key_id in ei.value.why


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_an_altered_seal_is_refused(keyfile, data):
    sealed = seal.seal_key(keyfile.public, seal.new_image_key())
    field = data.draw(st.sampled_from(["ephemeral", "wrapped"]))
    raw = bytearray.fromhex(sealed[field])
    raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(ImageKeyError):
        seal.unseal_key(
            keyfile.unlock("correct horse"), keyfile.public, {**sealed, field: raw.hex()}
        )


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_malformed_key_file_is_an_image_key_error(keyfile, data):
    d = json.loads(keyfile.to_json())
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(st.one_of(st.none(), st.integers(), st.text(max_size=8), st.just({})))
    try:
        kf = seal.KeyFile.from_json(json.dumps(d))
    except ImageKeyError:
        return
    # only a change nothing reads (the same value drawn again) may pass
    assert kf == keyfile


# ------------------------------------------------------------------ records and header


def test_encrypted_round_trip_and_no_plaintext_on_the_target(encrypted):
    tmp, mem, tgt, image_key = encrypted
    raw = tgt.read_bytes()
    assert SECRET[:32] not in raw
    # the text-like pages of make_memory are not on the target either
    assert b"/usr/lib/x\nline" not in raw
    _restore(tgt, tmp / "out", image_key)
    out = (tmp / "out").read_bytes()
    for a, b in RANGES:
        assert out[a:b] == mem[a:b]


def test_restore_with_a_cryptography_that_takes_only_bytes(encrypted, monkeypatch):
    """Debian 12's cryptography (38) refuses a payload handed over as a view of the read
    window ("data must be bytes"): the restore must pass it bytes."""
    tmp, mem, tgt, image_key = encrypted
    real = seal._crypto()

    class BytesOnlyAESGCM:
        def __init__(self, key):
            self.aead = real.AESGCM(key)

        def encrypt(self, nonce, data, associated_data):
            return self.aead.encrypt(nonce, data, associated_data)

        def decrypt(self, nonce, data, associated_data):
            if not isinstance(data, bytes):
                raise TypeError("data must be bytes")
            return self.aead.decrypt(nonce, data, associated_data)

    bytes_only = SimpleNamespace(**{**vars(real), "AESGCM": BytesOnlyAESGCM})
    monkeypatch.setattr(seal, "_crypto", lambda: bytes_only)
    _restore(tgt, tmp / "out", image_key)
    out = (tmp / "out").read_bytes()
    for a, b in RANGES:
        assert out[a:b] == mem[a:b]


def test_the_header_says_encrypted_and_restore_needs_the_key(encrypted):
    tmp, _mem, tgt, _key = encrypted
    with ImageDevice(tgt, writable=False) as dev:
        h = store.read_header(dev)
        assert h.encrypted and len(h.auth) == 32
    with pytest.raises(ImageKeyError, match="encrypted"):
        _restore(tgt, tmp / "out", None)
    assert not (tmp / "out").exists() or not (tmp / "out").read_bytes().strip(b"\0")


def test_the_wrong_image_key_is_refused_before_any_write(encrypted):
    tmp, _mem, tgt, _key = encrypted
    with pytest.raises(ImageAlteredError, match="altered"):
        _restore(tgt, tmp / "out", seal.new_image_key())
    assert not (tmp / "out").exists() or not (tmp / "out").read_bytes().strip(b"\0")


def rewrite_record(tgt, offset, ch, bitmap, payload):
    """Replace a record's payload, recomputing both CRCs: damage detection cannot see it."""
    new = ChunkHeader(
        encoding=ch.encoding,
        pages=ch.pages,
        index=ch.index,
        phys=ch.phys,
        raw_length=ch.raw_length,
        payload_length=len(payload),
        crc=crc32(payload, crc32(bitmap)),
        tag=ch.tag,
    )
    assert len(payload) == ch.payload_length
    with ImageDevice(tgt, writable=True) as dev:
        dev.write(offset, new.pack() + bitmap + payload)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_a_crafted_record_with_its_crc_recomputed_is_refused(encrypted, data):
    tmp, _mem, tgt, image_key = encrypted
    recs = records(tgt)
    i = data.draw(st.integers(0, len(recs) - 1))
    off, ch, bm = recs[i]
    with ImageDevice(tgt, writable=False) as dev:
        payload = bytearray(dev.read(off + CHUNK_HEADER_SIZE + len(bm), ch.payload_length))
    orig = bytes(payload)
    pos = data.draw(st.integers(0, len(payload) - 1))
    payload[pos] ^= 1 << data.draw(st.integers(0, 7))
    rewrite_record(tgt, off, ch, bm, bytes(payload))
    out = tmp / f"out{i}-{pos}"
    try:
        with pytest.raises(ImageAlteredError) as ei:
            _restore(tgt, out, image_key)
        assert "fails authentication" in ei.value.what and f"chunk {ch.index}" in ei.value.what
        # nothing of the altered chunk (or after it) reached memory
        if out.exists():
            got = out.read_bytes()
            assert not got[ch.phys : ch.phys + ch.raw_length].strip(b"\0")
    finally:
        rewrite_record(tgt, off, ch, bm, orig)


def test_a_record_from_another_place_is_refused(encrypted):
    """Swapping two records' payloads (each moved with its own CRC) is refused: the
    associated data binds a payload to its index, address and bitmap."""
    tmp, _mem, tgt, image_key = encrypted
    recs = [r for r in records(tgt) if r[1].payload_length > 16]
    (o1, c1, b1), (o2, c2, b2) = recs[0], recs[1]
    with ImageDevice(tgt, writable=False) as dev:
        p1 = dev.read(o1 + CHUNK_HEADER_SIZE + len(b1), c1.payload_length)
    moved = p1[: c2.payload_length].ljust(c2.payload_length, b"\0")
    rewrite_record(tgt, o2, c2, b2, moved)
    with pytest.raises(ImageAlteredError, match="fails authentication"):
        _restore(tgt, tmp / "out", image_key)


@pytest.mark.parametrize(
    "change",
    [
        {"jump_back_entry": 0x9999000},
        {"jump_area_start": 0x30000000},
        {"mode": "reboot"},
        {"main_kernel": "6.12 other"},
    ],
)
def test_an_altered_header_is_refused_with_the_reason(encrypted, change):
    tmp, _mem, tgt, image_key = encrypted
    with ImageDevice(tgt, writable=True) as dev:
        store.update_header(dev, **change)
    with pytest.raises(ImageAlteredError) as ei:
        _restore(tgt, tmp / "out", image_key)
    assert "header or metadata was altered" in ei.value.what
    assert not (tmp / "out").exists() or not (tmp / "out").read_bytes().strip(b"\0")


def test_altered_metadata_is_refused(encrypted):
    tmp, _mem, tgt, image_key = encrypted
    with ImageDevice(tgt, writable=True) as dev:
        h = store.read_header(dev)
        meta = bytearray(dev.read(h.metadata_offset, h.metadata_length))
        at = meta.find(b"6.12 abc") + 5
        meta[at] ^= 0x20  # "abc" -> "Abc" in the identity, the CRCs recomputed
        meta[-4:] = struct.pack("<I", crc32(bytes(meta[:-4])))
        dev.write(h.metadata_offset, bytes(meta))
        store.update_header(dev, metadata_crc=crc32(bytes(meta)))
    with pytest.raises(ImageAlteredError, match="header or metadata was altered"):
        _restore(tgt, tmp / "out", image_key)


def test_state_changes_keep_the_tag(encrypted):
    """R marks RESTORING and A marks CONSUMED: the tag covers neither, so the image stays
    restorable after a RESTORING attempt."""
    from kjumpd.image.format import ImageState

    tmp, mem, tgt, image_key = encrypted
    with ImageDevice(tgt, writable=True) as dev:
        store.set_state(dev, ImageState.RESTORING, attempt=1)
    _restore(tgt, tmp / "out", image_key)
    assert (tmp / "out").read_bytes()[RANGES[0][0] : RANGES[0][1]] == mem[
        RANGES[0][0] : RANGES[0][1]
    ]


def test_header_auth_survives_pack_unpack(encrypted):
    _tmp, _mem, tgt, _key = encrypted
    with ImageDevice(tgt, writable=False) as dev:
        raw = dev.read(HEADER_SLOT_OFFSETS[0], 4096)
        raw2 = dev.read(HEADER_SLOT_OFFSETS[1], 4096)
    hs = [Header.unpack(r) for r in (raw, raw2)]
    assert any(h.encrypted and h.auth for h in hs)
