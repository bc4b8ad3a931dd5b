"""A bounded, seeded sample of the fuzz targets (tests/fuzz): every parser of bytes from a
disk or from A keeps its contract over a few hundred to 2000 mutated inputs: only its named
errors escape, and a restore never writes a byte that was not saved. ``make fuzz`` runs the
same targets for 100,000 inputs each, coverage-guided."""

from __future__ import annotations

import pytest

from tests.fuzz import mutate, targets

#: inputs per target: the slow ones (a file or a restore per input) fewer
SAMPLE = {
    "image": 500,
    "records": 500,
    "linux": 1000,
    "config": 1000,
    "fsstamp": 1500,
    "freepages": 1000,
}


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_seeds_parse_and_mutants_keep_the_contract(name: str) -> None:
    t = targets.TARGETS[name]
    for seed in t.seeds():  # a valid input is accepted as it is (the contract is not vacuous)
        if name != "freepages" or seed:
            t.run(seed)
    found: dict[str, int] = {}
    for data in mutate.inputs(t, SAMPLE.get(name, 2000)):
        sig = targets.check(t, data)
        if sig is not None:
            found[sig] = found.get(sig, 0) + 1
    assert found == {}


def test_the_image_target_sees_wrong_memory() -> None:
    """A forged image (a payload byte changed, every CRC recomputed to match) restores other
    bytes than were saved: the image target must call that a finding, or its "0 findings"
    would mean nothing."""
    import struct
    import zlib

    from kjumpd.image import format as fmt

    t = targets.TARGETS["image"]
    buf = bytearray(t.seeds()[1])  # saved without compression: raw payloads
    slots = (targets._SB_KEEP, targets._SB_KEEP + targets._SLOT_KEEP)
    pos = targets._SB_KEEP + 2 * targets._SLOT_KEEP + targets._META_KEEP
    data_crc, forged = 0, False
    while pos + fmt.CHUNK_HEADER_SIZE <= len(buf):
        ch = fmt.ChunkHeader.unpack(buf[pos : pos + fmt.CHUNK_HEADER_SIZE])
        body = pos + fmt.CHUNK_HEADER_SIZE
        if ch.encoding == fmt.ENC_RAW and not forged:
            buf[body + ch.bitmap_length] ^= 0x5A
            struct.pack_into("<I", buf, pos + 28, zlib.crc32(buf[body : pos + ch.record_length]))
            struct.pack_into("<I", buf, pos + 36, zlib.crc32(buf[pos : pos + 36]))
            forged = True
        data_crc = zlib.crc32(buf[pos + 28 : pos + 32], data_crc)
        pos += ch.record_length
    assert forged
    for s in slots:
        struct.pack_into("<I", buf, s + 116, data_crc)
        targets._header_fix_slot(buf, s, s + targets._SLOT_KEEP)
    sig = targets.check(t, bytes(buf))
    assert sig is not None and sig.startswith("Violation: wrong memory: a restore wrote other")
