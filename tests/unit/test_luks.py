"""A target inside LUKS: the volume record, its dm-crypt table, the LUKS header fields read,
cryptsetup's key dump, the device-mapper ioctl buffer (pure)."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.errors import VolumeError
from kjumpd.linux import devmapper, luks

UUID = "3f2a0c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b"


def _vol(**kw):
    d = dict(
        uuid=UUID,
        header_offset=1 << 20,
        cipher="aes-xts-plain64",
        key_size=64,
        iv_offset=0,
        data_offset=32768,
        sectors=4161536,
        options=("sector_size:4096",),
    )
    d.update(kw)
    return luks.Volume(**d)


def test_the_save_kernel_maps_the_volume_where_its_data_is_on_the_disk():
    """The table B loads: the volume's cipher and key, its data starting after the header
    (header's place on the disk + LUKS's data offset), its options as dm-crypt counts them."""
    key = bytes(range(64))
    t = _vol().table(key, (252, 16))
    assert (t.start, t.length, t.target_type) == (0, 4161536, "crypt")
    assert t.params == (f"aes-xts-plain64 {key.hex()} 0 252:16 {2048 + 32768} 1 sector_size:4096")
    assert _vol(options=()).table(key, (8, 0)).params.endswith("8:0 34816")


def test_a_key_that_does_not_fit_the_volume_is_refused():
    with pytest.raises(VolumeError, match="32 bytes") as ei:
        _vol().table(bytes(32), (8, 0))
    assert ei.value.fix


@pytest.mark.parametrize(
    "field,value",
    [
        ("uuid", "not-a-uuid"),
        ("header_offset", 1000),  # not a sector boundary
        ("key_size", 8),
        ("sectors", 0),
        ("cipher", "aes xts"),  # a space would smuggle table words
        ("options", ("sector_size:4096 allow_discards",)),
        ("options", ("x" * 40,)),
        ("iv_offset", -1),
        ("data_offset", True),
    ],
)
def test_a_damaged_volume_record_is_refused(field, value):
    with pytest.raises(VolumeError):
        _vol(**{field: value})


volumes = st.builds(
    luks.Volume,
    uuid=st.uuids().map(str),
    header_offset=st.integers(0, 1 << 40).map(lambda x: x * 512),
    cipher=st.sampled_from(["aes-xts-plain64", "aes-cbc-essiv:sha256", "capi:xts(aes)-plain64"]),
    key_size=st.sampled_from([32, 64]),
    iv_offset=st.integers(0, 1 << 40),
    data_offset=st.integers(0, 1 << 30),
    sectors=st.integers(1, 1 << 40),
    options=st.lists(
        st.sampled_from(["sector_size:4096", "iv_large_sectors", "allow_discards"]), max_size=3
    ).map(tuple),
)


@given(volumes, st.data())
def test_the_volume_with_its_key_round_trips(vol, data):
    key = data.draw(st.binary(min_size=vol.key_size, max_size=vol.key_size))
    assert luks.Volume.from_dict(vol.to_dict()) == vol
    assert luks.keyed_from_dict(luks.keyed_to_dict(vol, key)) == (vol, key)


@given(volumes, st.sampled_from(["uuid", "cipher", "key", "sectors", "options"]), st.data())
def test_a_changed_or_missing_field_is_refused_or_still_valid(vol, name, data):
    d = luks.keyed_to_dict(vol, bytes(vol.key_size))
    if data.draw(st.booleans()):
        del d[name]
        with pytest.raises(VolumeError):
            luks.keyed_from_dict(d)
    else:
        d[name] = data.draw(st.one_of(st.none(), st.integers(), st.text(max_size=8)))
        try:
            got, key = luks.keyed_from_dict(d)
        except VolumeError:
            return
        # what parses is a volume whose table is still one well-formed line
        assert "\n" not in got.table(key, (8, 0)).params


def test_the_luks_header_gives_version_and_uuid():
    head = bytearray(4096)
    head[:6] = luks.MAGIC
    head[6:8] = (2).to_bytes(2, "big")
    head[168 : 168 + 36] = UUID.upper().encode()
    assert luks.header_uuid(bytes(head)) == (2, UUID)
    assert luks.header_uuid(b"SKUL\xba\xbe" + bytes(4090)) is None
    assert luks.header_uuid(luks.MAGIC) is None


DUMP = (
    "LUKS header information for /dev/vdb1\n"
    "Cipher name:   \taes\n"
    "Cipher mode:   \txts-plain64\n"
    "Payload offset:\t32768\n"
    "UUID:          \t3f2a0c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b\n"
    "MK bits:       \t256\n"
    "MK dump:\t42 0f b6 7c 49 4e 66 8e b5 71 33 f3 3b 19 d8 b5 \n"
    "\t\t8b 62 15 c2 1d b3 bd a4 ee e5 18 65 b4 77 0d b5 \n"
)


def test_the_volume_key_is_read_from_cryptsetups_dump():
    key = luks.parse_key_dump(DUMP)
    assert key[:4] == bytes.fromhex("420fb67c") and len(key) == 32
    # what a later cryptsetup may print after the dump is not taken for key bytes
    assert luks.parse_key_dump(DUMP + "Keyslots:\n  0: luks2\n\tab cd ef\n") == key


@pytest.mark.parametrize(
    "text", [DUMP.replace("MK bits:       \t256", "MK bits:       \t512"), "nothing", ""]
)
def test_a_key_dump_that_does_not_add_up_is_refused(text):
    with pytest.raises(VolumeError):
        luks.parse_key_dump(text)


def test_a_wrong_passphrase_is_told_from_other_failures():
    """cryptsetup exits 2 when no keyslot opens: R asks again; anything else ends the
    asking (the reason is shown)."""

    class Done:
        def __init__(self, rc, err=b""):
            self.returncode, self.stdout, self.stderr = rc, b"", err

    with pytest.raises(VolumeError) as ei:
        luks.volume_key("/dev/vdb1", passphrase=b"x", run=lambda *a, **k: Done(2, b"No key"))
    assert ei.value.context["wrong"] is True
    with pytest.raises(VolumeError) as ei:
        luks.volume_key("/dev/vdb1", passphrase=b"x", run=lambda *a, **k: Done(4, b"no device"))
    assert ei.value.context["wrong"] is False and "no device" in ei.value.why


def test_the_ioctl_buffer_carries_the_table_after_the_header():
    """dm-ioctl.h's layout: a 312-byte struct dm_ioctl, then 8-aligned target specs, each
    with its NUL-terminated parameters; data_size covers it all."""
    buf = devmapper.pack(
        "kjumpd-target",
        devmapper.DM_SECURE_DATA_FLAG,
        [devmapper.TableLine(0, 2048, "crypt", "abc")],
    )
    v0, v1, v2, size, start, count, _open, flags = struct.unpack_from("=3I I I I i I", buf)
    assert (v0, size, start, count) == (4, len(buf), 312, 1)
    assert flags & devmapper.DM_SECURE_DATA_FLAG
    assert buf[48:61] == b"kjumpd-target" and buf[61] == 0
    sector, length, _status, nxt, kind = devmapper.SPEC.unpack_from(buf, 312)
    assert (sector, length, kind.rstrip(b"\0")) == (0, 2048, b"crypt")
    assert nxt % 8 == 0 and 312 + nxt == len(buf)
    assert buf[352:356] == b"abc\0"


def test_the_device_number_is_decoded_as_the_kernel_encodes_it():
    buf = bytearray(devmapper.HEADER.size)
    struct.pack_into("=Q", buf, 40, (253 << 8) | 3 | (0x1 << 20))  # minor 259
    assert devmapper.unpack_dev(bytes(buf)) == (253, 259)


@pytest.mark.parametrize("name", ["", "a/b", "x" * 128])
def test_a_bad_mapping_name_is_refused(name):
    with pytest.raises(VolumeError):
        devmapper.pack(name)


def _luks2(meta: dict, size: int = 16384) -> bytearray:
    """A LUKS2 header area as cryptsetup lays it out: two copies of binary header + JSON."""
    import json

    one = bytearray(size)
    one[:6] = luks.MAGIC
    one[6:8] = (2).to_bytes(2, "big")
    one[8:16] = size.to_bytes(8, "big")
    text = json.dumps(meta).encode()
    one[4096 : 4096 + len(text)] = text
    two = bytearray(one)
    two[:6] = b"SKUL\xba\xbe"
    return one + two


def _reader(blob: bytes):
    return lambda off, n: bytes(blob[off : off + n])


def test_kjumpds_token_is_found_in_the_header_json():
    meta = {
        "keyslots": {},
        "tokens": {"0": {"type": "systemd-tpm2"}, "3": {"type": luks.TOKEN_TYPE}},
    }
    got = luks.header_json(_reader(_luks2(meta)))
    assert got == meta and luks.tokens_of(got) == [3] and luks.image_marked(got)
    assert not luks.image_marked({"tokens": {"0": {"type": "systemd-tpm2"}}})


@given(st.binary(min_size=1, max_size=64), st.integers(0, 2 * 16384 - 1))
def test_a_damaged_header_is_read_from_its_copy_or_makes_r_ask(junk, at):
    """Never an exception: a damaged primary falls back to the secondary; a header that
    reads as nothing counts as marked (R asks rather than lose the session)."""
    meta = {"tokens": {"0": {"type": luks.TOKEN_TYPE}}}
    blob = _luks2(meta)
    blob[at : at + len(junk)] = junk
    got = luks.header_json(_reader(blob))
    assert got is None or isinstance(got, dict)
    if at >= 16384 + 4096 + 100 or at + len(junk) <= 8:  # only unused bytes changed
        assert got == meta
    assert luks.image_marked(got) or luks.tokens_of(got) == []


def _status_answer(lines, flags=0):
    """A DM_TABLE_STATUS answer as dm-ioctl.c's retrieve_status writes it: specs from
    data_start, each ``next`` counted from data_start, parameters NUL-terminated, 8-aligned."""
    data = b""
    for t in lines:
        params = t.params.encode() + b"\0"
        size = devmapper.SPEC.size + len(params)
        size += -size % 8
        spec = devmapper.SPEC.pack(t.start, t.length, 0, len(data) + size, t.target_type.encode())
        data += (spec + params).ljust(size, b"\0")
    head = devmapper.HEADER.pack(
        4, 48, 0, 312 + len(data) + 64, 312, len(lines), 0, flags, 0, 0, 0, b"x", b"", b""
    )
    return bytearray(head + data + bytes(64))


@given(
    st.lists(
        st.tuples(
            st.integers(0, 1 << 40),
            st.integers(1, 1 << 40),
            st.sampled_from(["crypt", "linear", "striped"]),
            st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=300),
        ),
        max_size=4,
    )
)
def test_the_live_table_is_read_back_from_the_kernels_answer(targets):
    lines = [devmapper.TableLine(*t) for t in targets]
    assert devmapper.unpack_table(_status_answer(lines)) == lines


def test_a_table_answer_cut_short_is_refused():
    buf = _status_answer([devmapper.TableLine(0, 8, "crypt", "aes 00 0 8:0 0")])
    struct.pack_into("=I", buf, 12, 312 + 20)  # data_size ends inside the spec
    with pytest.raises(VolumeError):
        devmapper.unpack_table(buf)


def test_the_key_is_read_from_the_mapping_a_token_opened():
    """cryptsetup opened with --disable-keyring: the key is the table's second field; a key
    in the kernel keyring cannot be read and says how to avoid it."""
    key = bytes(range(64))
    line = devmapper.TableLine(0, 8, "crypt", f"aes-xts-plain64 {key.hex()} 0 254:17 32768")
    assert luks.key_from_table([line]) == key
    keyring = devmapper.TableLine(0, 8, "crypt", "aes-xts-plain64 :64:logon:cryptsetup:x 0 8:1 0")
    with pytest.raises(VolumeError, match="keyring") as ei:
        luks.key_from_table([keyring])
    assert "--disable-keyring" in ei.value.fix
    with pytest.raises(VolumeError):
        luks.key_from_table([devmapper.TableLine(0, 8, "linear", "8:1 0")])
    with pytest.raises(VolumeError):
        luks.key_from_table([line, line])


def test_r_tries_a_tpm2_token_only_when_it_needs_no_pin():
    """systemd-cryptenroll's TPM2 token opens without anyone at the keyboard unless it was
    enrolled with a PIN; FIDO2 and PKCS#11 tokens need a person, so R asks instead."""
    tpm2 = {"type": "systemd-tpm2", "keyslots": ["2"], "tpm2-pcrs": [7]}
    assert luks.unattended_tokens({"tokens": {"1": tpm2}}) == ["systemd-tpm2"]
    assert luks.unattended_tokens({"tokens": {"1": {**tpm2, "tpm2-pin": False}}}) == [
        "systemd-tpm2"
    ]
    assert luks.unattended_tokens({"tokens": {"1": {**tpm2, "tpm2-pin": True}}}) == []
    assert luks.unattended_tokens({"tokens": {"0": {"type": "systemd-fido2"}}}) == []
    assert luks.unattended_tokens({"tokens": "junk"}) == []
    assert luks.unattended_tokens(None) == []


def test_a_token_that_does_not_open_names_cryptsetups_reason(tmp_path):
    from kjumpd.sysroot import Sysroot

    class Done:
        returncode, stdout, stderr = 1, b"", b"No usable token is available.\n"

    with pytest.raises(VolumeError, match="systemd-tpm2 token does not unlock") as ei:
        luks.token_volume_key(
            Sysroot(tmp_path), "/dev/vdb1", "systemd-tpm2", run=lambda *a, **k: Done()
        )
    assert ei.value.why == "No usable token is available."
