"""The job (A -> B): JSON round trip, cpio round trip, validation, corruption."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kjumpd.errors import JobError, KjumpError
from kjumpd.job import JOB_PATH, MODES, Job, job_from_cpio, read_cpio

PAGE = 4096


def make_job(**kw) -> Job:
    base = dict(
        target_uuid="0b5e7c1a-6f6e-4c1e-9a77-3d2f1e0c9b8a",
        superblock_device_offset=1 << 20,
        device_hint={"devno": "254:0", "name": "vda"},
        blockmap=[(0, 1 << 20, 64 << 20), (64 << 20, 512 << 20, 16 << 20)],
        ranges=[(0x1000, 0x9F000), (0x100000, 0x20000000), (0x28000000, 0x3FFDD000)],
        mode="platform",
        compression="lz4",
        chunk_size=1 << 20,
        main_kernel={"release": "6.12.117", "build_id": "ab" * 20},
        save_kernel_hash="sha256:" + "0" * 64,
        jump_area=(0x20000000, 128 << 20),
        fs_stamps=[{"device": "/dev/vda1", "fstype": "ext4", "mtime": 1, "wtime": 2}],
        created=1764095000,
        cancel_key=True,
    )
    base.update(kw)
    return Job(**base)


#: a target inside LUKS: the volume and its key, as the daemon puts them in the job
VOLUME = {
    "uuid": "3f2a0c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b",
    "header_offset": 1 << 20,
    "cipher": "aes-xts-plain64",
    "key_size": 64,
    "iv_offset": 0,
    "data_offset": 32768,
    "sectors": 4161536,
    "options": ["sector_size:4096"],
    "key": "ab" * 64,
}


@st.composite
def jobs(draw):
    n = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, 1 << 30), min_size=n, max_size=n))
    blockmap, lo = [], 0
    for ln in lengths:
        blockmap.append((lo, draw(st.integers(0, 1 << 40)), ln))
        lo += ln
    ja_start = draw(st.integers(1, 1 << 20)) * PAGE
    ja_size = draw(st.integers(1, 1 << 16)) * PAGE
    bounds = sorted(set(draw(st.lists(st.integers(0, 1 << 22), min_size=0, max_size=10))))
    ranges = []
    for s, e in zip(bounds[::2], bounds[1::2]):
        s, e = s * PAGE, e * PAGE
        if s < e and not (s < ja_start + ja_size and ja_start < e):
            ranges.append((s, e))
    return make_job(
        blockmap=blockmap,
        jump_area=(ja_start, ja_size),
        ranges=ranges,
        mode=draw(st.sampled_from(MODES)),
        compression=draw(st.sampled_from(["lz4", "none"])),
        chunk_size=1 << draw(st.integers(12, 26)),
        created=draw(st.integers(0, 1 << 40)),
        cancel_key=draw(st.booleans()),
        free_pages_zeroed=draw(st.booleans()),
        volume=draw(st.one_of(st.none(), st.just(VOLUME))),
        answer=draw(
            st.one_of(
                st.none(),
                st.tuples(
                    st.integers(0, 1 << 40).map(lambda n: n * PAGE),
                    st.binary(min_size=16, max_size=16).map(bytes.hex),
                ),
            )
        ),
        superblock_device_offset=draw(st.integers(0, 1 << 50)),
        fs_stamps=draw(
            st.lists(
                st.fixed_dictionaries(
                    {"device": st.text(max_size=20), "wtime": st.integers(0, 1 << 40)}
                ),
                max_size=4,
            )
        ),
    )


@given(jobs())
@settings(max_examples=150)
def test_json_round_trip(job):
    assert Job.from_json(job.to_json()) == job


@given(jobs())
@settings(max_examples=100)
def test_cpio_round_trip(job):
    blob = job.to_cpio()
    assert len(blob) % 4 == 0
    assert job_from_cpio(blob) == job
    # appended to a (zero padded) initramfs, the job is still found
    assert job_from_cpio(b"\0" * 512 + blob) == job


@given(jobs(), st.data())
@settings(max_examples=150)
def test_json_corruption_is_detected_or_harmless(job, data):
    """Any byte flip either fails with a JobError or yields a job that still validates."""
    text = bytearray(job.to_json().encode())
    i = data.draw(st.integers(0, len(text) - 1))
    text[i] = data.draw(st.integers(0, 255).filter(lambda b: b != text[i]))
    try:
        j2 = Job.from_json(bytes(text))
    except JobError:
        return
    # a flip inside free text (a stamp's device name, a build id) is accepted; what is
    # accepted is a valid job that survives its own round trip
    assert Job.from_json(j2.to_json()) == j2


@given(jobs(), st.data())
@settings(max_examples=100)
def test_cpio_truncation_is_detected(job, data):
    blob = job.to_cpio()
    cut = data.draw(st.integers(1, len(blob) - 1))
    try:
        got = job_from_cpio(blob[:cut])
    except JobError:
        return
    # a cut at or inside the trailer entry (its 110-byte header, then its name) leaves the job
    # entry whole
    assert got == job and cut >= blob.index(b"TRAILER!!!") - 110


def test_version_mismatch_is_refused_with_a_fix():
    d = json.loads(make_job().to_json())
    d["version"] = 2
    with pytest.raises(JobError) as ei:
        Job.from_json(json.dumps(d))
    assert "version 2" in str(ei.value) and ei.value.fix


@pytest.mark.parametrize(
    "field,value,word",
    [
        ("target_uuid", "not-a-uuid", "target_uuid"),
        ("mode", "hibernate-now", "mode"),
        ("compression", "zstd", "compression"),
        ("chunk_size", 3000, "chunk_size"),
        ("blockmap", [(0, 0, 10), (11, 0, 10)], "contiguous"),
        ("blockmap", [], "empty"),
        ("ranges", [(0x2000, 0x1000)], "ranges"),
        ("ranges", [(0x20000000, 0x20001000)], "jump area"),
        ("save_kernel_hash", "md5:00", "save_kernel_hash"),
        ("jump_area", (0x1001, 4096), "aligned"),
        ("cancel_key", "yes", "cancel_key"),
        ("created", -1, "created"),
        ("free_pages_zeroed", 0, "free_pages_zeroed"),
        ("answer", (0x1001, "00" * 16), "aligned"),
        ("answer", (0x1000, "xyz"), "nonce"),
        ("answer", (-4096, "00" * 16), "answer address"),
        ("answer", (0x1000,), "[phys, nonce]"),
    ],
)
def test_invalid_fields_are_named(field, value, word):
    with pytest.raises(JobError) as ei:
        make_job(**{field: value})
    assert word in str(ei.value)
    assert isinstance(ei.value, KjumpError)


def test_a_job_without_free_pages_zeroed_restores_free_pages_as_zeros():
    """An older daemon's job (no key) keeps the old, safe behaviour."""
    d = json.loads(make_job(free_pages_zeroed=False).to_json())
    assert d["free_pages_zeroed"] is False
    del d["free_pages_zeroed"]
    assert Job.from_json(json.dumps(d)).free_pages_zeroed is True


def test_missing_and_unknown_fields_are_refused():
    d = json.loads(make_job().to_json())
    del d["mode"]
    d["extra"] = 1
    with pytest.raises(JobError) as ei:
        Job.from_json(json.dumps(d))
    assert "mode" in ei.value.why and "extra" in ei.value.why


def test_cpio_layout_is_what_the_kernel_unpacks():
    blob = make_job().to_cpio()
    files = read_cpio(blob)
    assert list(files) == [JOB_PATH]
    assert blob.startswith(b"070701")
    assert b"kjump\0" in blob and blob.rstrip(b"\0").endswith(b"TRAILER!!!")
    assert json.loads(files[JOB_PATH])["version"] == 1


def test_a_job_nested_too_deep_is_a_job_error() -> None:
    with pytest.raises(JobError, match="not valid JSON"):
        Job.from_json("[" * 100_000)


def test_the_volume_key_reaches_b_with_the_volume_it_opens():
    from kjumpd.job import volume_of
    from kjumpd.linux.luks import Volume

    job = Job.from_json(make_job(volume=VOLUME).to_json())
    vol, key = volume_of(job)
    assert isinstance(vol, Volume) and vol.header_offset == 1 << 20 and key == b"\xab" * 64
    assert "ab" * 64 not in repr(job)  # never in a log line
    assert volume_of(make_job()) is None


@pytest.mark.parametrize(
    "change",
    [
        {"key": "ab" * 32},  # a key the mapping does not use
        {"key": "AB" * 64},
        {"key": None},
        {"cipher": "aes xts"},
        {"header_offset": 513},
        {"options": "sector_size:4096"},
    ],
)
def test_a_damaged_volume_in_the_job_is_refused(change):
    with pytest.raises(JobError, match="volume"):
        make_job(volume={**VOLUME, **change})
