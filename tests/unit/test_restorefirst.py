"""The restore-first decision: every guard, and the property that only a clean image restores."""

from __future__ import annotations

import dataclasses
import json
import uuid as uuidlib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kjumpd.bootconfig import BootConfig, KernelSpec
from kjumpd.errors import ConfigError
from kjumpd.fsstamp import FsStamp
from kjumpd.linux import cmdline
from kjumpd.linux.iomem import RamMap
from kjumpd.restore.decision import (
    CODES,
    BootNormal,
    Evidence,
    Expected,
    HeaderView,
    Invalidate,
    Restore,
    check_jump_area,
    check_stamps,
    decide,
    explain,
    normal_kexec_args,
    restore_cmdline,
    restore_kexec_args,
)

TARGET = "0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e"
HASH = "sha256:" + "ab" * 32
AREA = (0x20000000, 128 << 20)
EXP = Expected(HASH, 3)
ROOT = FsStamp("/dev/vda", "ext4", str(uuidlib.UUID(int=1)), {"mount_count": 5, "wtime": 100})
DATA = FsStamp("/dev/vdb", "xfs", str(uuidlib.UUID(int=2)), {"lsn": 7, "log_head": 40})


def header(state: str = "SAVED", attempt: int = 0, **kw) -> HeaderView:
    d = dict(state=state, attempt=attempt, uuid=TARGET, save_kernel_hash=HASH, jump_area=AREA)
    d.update(kw)
    return HeaderView(**d)


def current(*stamps: FsStamp) -> dict:
    out: dict = {}
    for s in stamps:
        out.setdefault(s.key, []).append(s)
    return out


def evidence(**kw) -> Evidence:
    d = dict(
        target_found=True,
        target_uuid=TARGET,
        header=header(),
        fs_stamps=[ROOT.to_dict(), DATA.to_dict()],
        current=current(ROOT, DATA),
    )
    d.update(kw)
    return Evidence(**d)


def test_a_clean_saved_image_is_restored_as_attempt_one() -> None:
    assert decide(evidence(), EXP) == Restore(1, AREA)


def test_an_unfinished_restore_is_retried_with_the_next_attempt() -> None:
    assert decide(evidence(header=header("RESTORING", 2)), EXP) == Restore(3, AREA)


def test_the_device_name_may_differ_in_r() -> None:
    renamed = FsStamp("/dev/sda", ROOT.fstype, ROOT.uuid, dict(ROOT.fields))
    assert decide(evidence(current=current(renamed, DATA)), EXP) == Restore(1, AREA)


def test_no_target_boots_normally_without_touching_anything() -> None:
    d = decide(Evidence(target_found=False), EXP)
    assert isinstance(d, BootNormal) and "no kjumpd target" in d.reason


@pytest.mark.parametrize("state", ["EMPTY", "CONSUMED", "ABORTED", "INVALID"])
def test_no_image_boots_normally_and_leaves_the_header(state: str) -> None:
    d = decide(evidence(header=header(state)), EXP)
    assert isinstance(d, BootNormal) and state in d.reason


def code(d) -> str:
    assert isinstance(d, Invalidate), d
    assert d.code in CODES
    assert d.reason.startswith(d.code + ": ")
    return d.code


def test_unreadable_header_is_invalidated_as_corrupt() -> None:
    assert code(decide(evidence(header=None, header_error="checksum mismatch"), EXP)) == "corrupt"


def test_an_interrupted_save_is_invalidated() -> None:
    assert code(decide(evidence(header=header("WRITING")), EXP)) == "incomplete"


def test_metadata_and_chunk_table_damage_is_refused() -> None:
    assert (
        code(decide(evidence(metadata_error="checksum mismatch", fs_stamps=None), EXP)) == "corrupt"
    )
    assert code(decide(evidence(chunks_error="record 3: magic"), EXP)) == "corrupt"


def test_a_header_of_another_target_is_refused() -> None:
    d = decide(evidence(header=header(uuid=str(uuidlib.UUID(int=9)))), EXP)
    assert code(d) == "foreign"


def test_attempts_stop_at_the_maximum() -> None:
    assert decide(evidence(header=header("RESTORING", 2)), EXP) == Restore(3, AREA)
    d = decide(evidence(header=header("RESTORING", 3)), EXP)
    assert code(d) == "attempts" and "3 restore attempts" in d.detail


def test_another_save_kernel_is_refused() -> None:
    d = decide(evidence(header=header(save_kernel_hash="sha256:" + "cd" * 32)), EXP)
    assert code(d) == "save-kernel"


def test_b_is_restored_into_the_jump_area_the_image_was_saved_with() -> None:
    """With KASLR (or crashkernel=SIZE) A's area may sit elsewhere at each boot: R follows
    the image, not what it was told at setup."""
    moved = (0x37000000, 128 << 20)
    assert decide(evidence(header=header(jump_area=moved)), EXP) == Restore(1, moved)
    args = restore_kexec_args(config(), 1, moved)
    assert "--mem-min=0x37000000" in args and "--mem-max=0x3effffff" in args
    assert "memmap=131072K@901120K" in args[-1]


@pytest.mark.parametrize(
    "area, extents, ram, why",
    [
        ((0x20000800, 128 << 20), [], None, "whole number of pages"),
        ((0x20000000, 0), [], None, "whole number of pages"),
        ((0x20000000, 128 << 20), [(0x27FFF000, 0x28001000)], None, "inside its jump area"),
        ((0x80000000, 128 << 20), [], (0x100000, 1 << 30), "not RAM on this boot"),
    ],
)
def test_a_jump_area_b_cannot_run_in_is_refused(area, extents, ram, why) -> None:
    now = {"iomem": RamMap.of("iomem", [ram])} if ram else {}
    ev = evidence(header=header(jump_area=area), extents=extents, ram_now=now)
    d = decide(ev, EXP)
    assert code(d) == "jump-area" and why in d.detail


def test_broken_r_setup_is_refused() -> None:
    assert code(decide(evidence(setup_error="bzImage hash mismatch"), EXP)) == "setup"


def test_a_remounted_filesystem_makes_the_image_stale() -> None:
    mounted = FsStamp("/dev/vda", ROOT.fstype, ROOT.uuid, {**ROOT.fields, "mount_count": 6})
    d = decide(evidence(current=current(mounted, DATA)), EXP)
    assert code(d) == "stale" and "mount_count 5 -> 6" in d.detail


def test_a_missing_or_duplicated_filesystem_is_refused() -> None:
    assert code(decide(evidence(current=current(ROOT)), EXP)) == "stale"
    twin = FsStamp("/dev/vdc", DATA.fstype, DATA.uuid, dict(DATA.fields))
    d = decide(evidence(current=current(ROOT, DATA, twin)), EXP)
    assert code(d) == "stale" and "found 2 times" in d.detail


def test_a_damaged_stamp_record_is_refused() -> None:
    d = decide(evidence(fs_stamps=[{"version": 99}]), EXP)
    assert code(d) == "stale"


def test_reason_fits_the_header() -> None:
    d = Invalidate("stale", "x" * 5000)
    assert len(d.reason) <= 400 and d.reason.startswith("stale: ")


# ------------------------------------------------ property: only a clean image restores

states = st.sampled_from(
    ["EMPTY", "WRITING", "SAVED", "RESTORING", "CONSUMED", "ABORTED", "INVALID", "BOGUS"]
)
hashes = st.sampled_from([HASH, "sha256:" + "cd" * 32, ""])
areas = st.sampled_from([AREA, (0x30000000, 128 << 20), (0x20000000, 64 << 20)])
field_vals = st.integers(0, 3)


@st.composite
def any_evidence(draw) -> Evidence:
    if not draw(st.booleans()) and draw(st.booleans()):
        return Evidence(target_found=False)
    hv = None
    if draw(st.integers(0, 9)):
        hv = header(
            draw(states),
            draw(st.integers(0, 5)),
            uuid=draw(st.sampled_from([TARGET, str(uuidlib.UUID(int=3))])),
            save_kernel_hash=draw(hashes),
            jump_area=draw(areas),
        )
    recorded = [
        FsStamp(
            f"/dev/vd{i}", "ext4", str(uuidlib.UUID(int=i + 10)), {"mount_count": draw(field_vals)}
        )
        for i in range(draw(st.integers(0, 3)))
    ]
    cur: dict = {}
    for r in recorded:
        for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
            cur.setdefault(r.key, []).append(
                FsStamp("/dev/x", r.fstype, r.uuid, {"mount_count": draw(field_vals)})
            )
    return Evidence(
        target_found=True,
        target_uuid=TARGET,
        header=hv,
        fs_stamps=[r.to_dict() for r in recorded] if draw(st.integers(0, 9)) else None,
        metadata_error=draw(st.sampled_from(["", "", "", "bad crc"])),
        chunks_error=draw(st.sampled_from(["", "", "", "torn"])),
        setup_error=draw(st.sampled_from(["", "", "", "bad hash"])),
        current=cur,
    )


@settings(max_examples=600)
@given(any_evidence(), st.integers(1, 4))
def test_restore_happens_only_when_every_guard_holds(ev: Evidence, max_attempts: int) -> None:
    exp = Expected(HASH, max_attempts)
    d = decide(ev, exp)
    assert isinstance(d, (Restore, BootNormal, Invalidate))
    clean = (
        ev.target_found
        and ev.header is not None
        and ev.header.state in ("SAVED", "RESTORING")
        and ev.header.uuid == TARGET
        and ev.fs_stamps is not None
        and not ev.metadata_error
        and not ev.chunks_error
        and not ev.setup_error
        and (ev.header.attempt if ev.header.state == "RESTORING" else 0) < max_attempts
        and ev.header.save_kernel_hash == HASH
        and check_jump_area(ev.header.jump_area, ev) is None
        and check_stamps(ev.fs_stamps, ev.current) is None
    )
    assert isinstance(d, Restore) == clean
    if isinstance(d, Restore):
        prev = ev.header.attempt if ev.header.state == "RESTORING" else 0
        assert d.attempt == prev + 1 <= max_attempts
    if isinstance(d, BootNormal):  # the image is left alone only when there is none
        assert not ev.target_found or ev.header.state in ("EMPTY", "CONSUMED", "ABORTED", "INVALID")


@given(any_evidence())
def test_a_restore_never_follows_a_changed_filesystem(ev: Evidence) -> None:
    assume(ev.fs_stamps)
    changed = any(
        len(ev.current.get((r["fstype"], r["uuid"]), [])) != 1
        or ev.current[(r["fstype"], r["uuid"])][0].fields != r["fields"]
        for r in ev.fs_stamps
    )
    if changed:
        assert not isinstance(decide(ev, EXP), Restore)


# ------------------------------------------------ status view


def test_explain_names_the_refusal() -> None:
    e = explain("INVALID", "stale: ext4 ... mount_count 5 -> 6")
    assert e["refused"] and e["code"] == "stale" and "changed" in e["summary"]
    assert not explain("INVALID", "invalidated by user")["refused"]
    assert "attempt 2" in explain("RESTORING", "", 2)["summary"]
    assert explain("EMPTY", "")["summary"] == ""


# ------------------------------------------------ boot.json


def config(**kw) -> BootConfig:
    d = dict(
        target_uuid=TARGET,
        target_offset=1 << 20,
        normal=KernelSpec(
            "/boot/vmlinuz", "/boot/initrd.img", "root=/dev/vda ro quiet kjump.rf=old"
        ),
        save=KernelSpec(
            "/kjump/save/bzImage",
            "/kjump/save/initrd.cpio.gz",
            "console=ttyS0 nokaslr panic=1 memmap=1G@0",
        ),
        save_hash=HASH,
        save_kernel_sha256="1" * 64,
        save_initrd_sha256="2" * 64,
        jump_area=AREA,
        max_attempts=3,
    )
    d.update(kw)
    return BootConfig(**d)


def _volume():
    from kjumpd.linux.luks import Volume

    return Volume(
        "3f2a0c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b", 1 << 20, "aes-xts-plain64", 64, 0, 32768, 8192
    )


@given(
    st.integers(0, 2**40).map(lambda x: x * 4096),
    st.integers(1, 100),
    st.one_of(st.none(), st.text(min_size=1, max_size=20)),
    st.text(max_size=60),
    st.booleans(),
)
def test_boot_config_round_trips(
    offset: int, attempts: int, initrd, cmdline: str, in_luks: bool
) -> None:
    c = config(
        target_offset=offset,
        max_attempts=attempts,
        normal=KernelSpec("/boot/vmlinuz", initrd, cmdline),
        target_volume=_volume() if in_luks else None,
    )
    assert BootConfig.from_json(c.to_json()) == c


def test_a_target_in_luks_tells_r_the_volume_and_never_its_key() -> None:
    text = config(target_volume=_volume()).to_json()
    vol = json.loads(text)["target"]["volume"]
    assert vol["uuid"] == "3f2a0c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b" and "key" not in vol
    assert "volume" not in json.loads(config().to_json())["target"]


@pytest.mark.parametrize(
    "path,value",
    [
        (("version",), 2),
        (("target", "uuid"), "NOT-A-UUID"),
        (("target", "offset"), 100),
        (("target", "offset"), -4096),
        (("save", "hash"), "md5:00"),
        (("save", "kernel_sha256"), "x"),
        (("jump_area",), [0x20000000]),
        (("jump_area",), [1, 4096]),
        (("max_attempts",), 0),
        (("normal", "kernel"), ""),
        (("normal", "initrd"), 5),
        (("normal",), None),
        (("save", "kernel"), None),
        (("target", "volume", "header_offset"), 7),
        (("target", "volume", "cipher"), "aes xts 0 8:0"),
        (("target", "volume", "key"), "ab" * 32),  # R's copy never holds a key
    ],
)
def test_a_damaged_boot_config_is_a_clear_error(path, value) -> None:
    d = json.loads(config(target_volume=_volume()).to_json())
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as e:
        BootConfig.from_json(json.dumps(d))
    assert "kjumpctl setup" in e.value.fix


@given(st.binary(max_size=200))
def test_garbage_boot_config_never_crashes(blob: bytes) -> None:
    try:
        BootConfig.from_json(blob)
    except ConfigError:
        pass


def test_b_is_loaded_into_the_jump_area_in_restore_role() -> None:
    args = restore_kexec_args(config(), 2, AREA)
    assert args[:6] == [
        "kexec",
        "-l",
        "--no-checks",
        "--mem-min=0x20000000",
        "--mem-max=0x27ffffff",
        "/kjump/save/bzImage",
    ]
    assert "--initrd=/kjump/save/initrd.cpio.gz" in args
    kv = cmdline.params(args[-1].split("=", 1)[1])
    assert kv["kjump.role"] == "restore" and kv["kjump.target"] == TARGET
    assert kv["kjump.offset"] == str(1 << 20) and kv["kjump.attempt"] == "2"
    line = restore_cmdline(config(), 2, AREA)
    assert "memmap=exactmap memmap=512K@0K memmap=131072K@524288K" in line
    # B restores without legacy ptys (0.8 s of pty_init under TCG) and with a small bounce
    # buffer pool, each exactly once, even when boot.json's save command line has them
    assert line.split().count("pty.legacy_count=0") == 1
    assert line.split().count("swiotlb=2048,1") == 1
    assert (
        restore_cmdline(
            dataclasses.replace(
                config(),
                save=dataclasses.replace(
                    config().save,
                    cmdline=config().save.cmdline + " pty.legacy_count=0 swiotlb=65536",
                ),
            ),
            2,
            AREA,
        )
        == line
    )
    assert "memmap=1G@0" not in line and "-c" not in args and "--load-preserve-context" not in args


def test_the_normal_kernel_gets_its_own_command_line() -> None:
    args = normal_kexec_args(config(), "invalid:stale")
    assert args == [
        "kexec",
        "-l",
        "--no-checks",
        "/boot/vmlinuz",
        "--initrd=/boot/initrd.img",
        "--append=root=/dev/vda ro quiet kjump.rf=invalid:stale",
    ]
    no_initrd = config(normal=KernelSpec("/boot/vmlinuz", None, "root=/dev/vda"))
    assert normal_kexec_args(no_initrd) == [
        "kexec",
        "-l",
        "--no-checks",
        "/boot/vmlinuz",
        "--append=root=/dev/vda",
    ]


def test_the_normal_command_line_drops_per_boot_words() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from kjumpd.daemon.bootentry import normal_cmdline

    assert (
        normal_cmdline(
            "BOOT_IMAGE=/vmlinuz-6.1 root=UUID=ab ro quiet kjump.rf=invalid:stale "
            "crashkernel=128M@0x20000000 initrd=/x"
        )
        == "root=UUID=ab ro quiet crashkernel=128M@0x20000000"
    )


def test_a_boot_config_nested_too_deep_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not JSON"):
        BootConfig.from_json("[" * 100_000)
