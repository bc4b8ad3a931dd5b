"""The daemon's record of a parked save kernel: when it may take a job, and why not."""

from __future__ import annotations

from dataclasses import replace

from kjumpd.daemon import warm
from kjumpd.sysroot import Sysroot

FP = warm.Fingerprint(
    jump_area=(0x20000000, 128 << 20),
    target_uuid="0b5f1c9e-6c1a-4d3e-9a57-2f4a8e9d1c30",
    superblock_offset=1 << 20,
    save_kernel_sha256="a" * 64,
    save_initramfs_sha256="b" * 64,
    cmdline="console=ttyS0 kjump.role=save",
    volume_uuid="",
)


def _root(tmp_path, loaded: str) -> Sysroot:
    p = tmp_path / "sys/kernel"
    p.mkdir(parents=True)
    (p / "kexec_loaded").write_text(loaded + "\n")
    return Sysroot(tmp_path)


def test_a_save_kernel_never_parked_is_loaded_cold_with_the_reason(tmp_path):
    state = warm.WarmState()
    assert state.unusable(FP, _root(tmp_path, "1")) == "not warmed up yet"
    state.drop("the warm-up failed: no answer")
    assert state.unusable(FP, _root(tmp_path / "b", "1")) == "the warm-up failed: no answer"


def test_a_parked_save_kernel_takes_jobs_for_what_it_was_started_for(tmp_path):
    state = warm.WarmState()
    state.park(FP, 7, "warm-up")
    assert state.unusable(FP, _root(tmp_path, "1")) == ""


def test_every_change_since_the_park_is_named(tmp_path):
    state = warm.WarmState()
    state.park(FP, 7, "warm-up")
    now = replace(FP, jump_area=(0x30000000, 128 << 20), save_kernel_sha256="c" * 64)
    why = state.unusable(now, _root(tmp_path, "1"))
    assert why == "it was started for another jump area, save kernel sha256"


def test_an_unloaded_kexec_image_means_a_cold_load(tmp_path):
    state = warm.WarmState()
    state.park(FP, 7, "warm-up")
    assert "no kexec image is loaded" in state.unusable(FP, _root(tmp_path, "0"))


def test_generations_only_go_up():
    state = warm.WarmState()
    state.park(FP, 10**30, "warm-up")  # a generation above the clock
    a = state.next_generation()
    b = state.next_generation()
    assert 10**30 < a < b
