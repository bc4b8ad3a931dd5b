"""Encrypted images end to end on a real CONFIG_KEXEC_JUMP kernel under QEMU (TCG, with a CPU
model that offers AES-NI).

One encrypted save, shared: A (tests/vm/restorefirst_guest.py) plants a random 64-byte
secret in its memory, seals a fresh image key to the machine's image key (as the daemon
does) and jumps to B, whose initramfs carries python3-cryptography; B encrypts every record
and A powers off with the image SAVED. Then, each on a copy of the disks, R (whose payload
holds the passphrase-protected key) boots:

- the secret, and the plaintext of A's memory, appear nowhere on the raw disks (scanned
  from the host);
- restore: R asks for the passphrase on the console; the harness types a wrong one, then
  the right one; B restores and A checks its memory and the secret (``KJR-VERDICT: PASS``);
- three wrong passphrases: the normal system boots (kjump.rf=kept:passphrase), the image
  stays SAVED for a later boot;
- an altered header (the jump-back address, CRCs recomputed): R refuses it after the
  passphrase, INVALID(altered: ...), before B runs;
- an altered record (one payload byte, both CRCs recomputed: damage detection cannot see
  it): B refuses it before it reaches memory, INVALID(altered: chunk 0 ... fails
  authentication).

A second encrypted save, by an A with a jump area wide enough to confine R to it (as the
boot entry boots R after such a hibernation: KASLR on, the rest of RAM reserved): R itself
decrypts and restores in one boot, with no save kernel after it, and refuses an altered
record as altered (kjump.rf=invalid:altered) before it reaches memory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
from pathlib import Path

import pytest

from bootloader.initramfs import build_restore_initramfs
from kjumpd.image import seal, store
from kjumpd.image.format import CHUNK_HEADER_SIZE, crc32
from savekernel.initramfs import (
    CRYPTO_MODULES,
    CRYPTO_PACKAGES,
    InitramfsImage,
    build_initramfs,
    build_save_initramfs,
    crypto_host_files,
)
from tests.unit.test_image_seal import records, rewrite_record
from tests.vm.harness import (
    JUMP_AREA_START,
    MAIN_APPEND,
    VM,
    VMConfig,
    artifacts_dir,
)
from tests.vm.restorefirst_guest import fill
from tests.vm.scenarios import AES_CPU, needles_in_file
from tests.vm.test_restorefirst import (
    A_INIT,
    GUEST,
    GUEST_MODULES,
    NORMAL,
    PANIC,
    R_BASE_APPEND,
    WIDE_AREA_SIZE,
    T,
    confined,
    copy_disks,
    header,
    make_disks,
    r_initrd,
    wide_append,
)
from tests.vm.test_restorefirst import kernel as kernel  # noqa: F401 - the shared fixture

pytestmark = pytest.mark.vm

PASSPHRASE = "kjumpd test passphrase"
PROMPT = r"kjumpd: passphrase for the hibernation image \(key (\w+), try (\d) of 3"


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("key") / "image-key.json"
    path.write_text(seal.KeyFile.create(PASSPHRASE).to_json())
    return path


@pytest.fixture(scope="module")
def b_crypto(kernel: Path) -> InitramfsImage:
    return build_save_initramfs(crypto=True)


@pytest.fixture(scope="module")
def a_crypto(kernel: Path, b_crypto: InitramfsImage, keyfile: Path) -> InitramfsImage:
    return build_initramfs(
        None,
        A_INIT,
        {
            "boot/bzImage": kernel,
            "boot/b.cpio.gz": b_crypto.path,
            "kjr/guest.py": GUEST,
            "kjr/image-key.json": keyfile,
        },
        name="kjr-guest-crypto",
        python_modules=(*GUEST_MODULES, *CRYPTO_MODULES),
        python_packages=("kjumpd", "lz4", *CRYPTO_PACKAGES),
        host_binaries=("/usr/sbin/kexec", *crypto_host_files()),
    )


@pytest.fixture(scope="module")
def r_crypto(kernel: Path) -> InitramfsImage:
    return build_restore_initramfs(crypto=True)


def r_cfg(kernel: Path, initrd: Path, uuid: str, disks) -> VMConfig:
    return VMConfig(
        kernel=kernel,
        initrd=initrd,
        append=f"{R_BASE_APPEND} kjump.target={uuid} kjump.offset=0",
        disks=list(disks),
        memory_mb=1024,
        smp=2,
        cpu=AES_CPU,
    )


def r_vm(kernel: Path, initrd: Path, uuid: str, disks, art: Path) -> VM:
    return VM(r_cfg(kernel, initrd, uuid, disks), art, name="r")


@pytest.fixture(scope="module")
def saved(kernel, a_crypto, tmp_path_factory) -> tuple[Path, Path, str, bytes]:
    """Disks holding an encrypted SAVED image of A with a secret in its memory."""
    return save_encrypted(kernel, a_crypto, tmp_path_factory.mktemp("enc-saved"), MAIN_APPEND)


@pytest.fixture(scope="module")
def saved_wide(kernel, a_crypto, tmp_path_factory) -> tuple[Path, Path, str, bytes]:
    """As ``saved``, by an A whose jump area is WIDE_AREA_SIZE at the same start: R can be
    confined to it and restore in one boot."""
    d = tmp_path_factory.mktemp("enc-saved-wide")
    return save_encrypted(kernel, a_crypto, d, wide_append(), "_wide")


def save_encrypted(
    kernel: Path, a_crypto: InitramfsImage, d: Path, append: str, suffix: str = ""
) -> tuple[Path, Path, str, bytes]:
    target, data, uuid = make_disks(d)
    secret = secrets.token_bytes(64)
    cfg = VMConfig(
        kernel=kernel,
        initrd=a_crypto.path,
        append=f"{append} kjr.step=save kjr.mib=32 kjr.secret={secret.hex()}",
        disks=[target, data],
        memory_mb=1024,
        smp=2,
        cpu=AES_CPU,
    )
    art = artifacts_dir(f"encrypted_save{suffix}")
    with VM(cfg, art, name="save") as vm:
        vm.wait_for(r"KJR: image SAVED|KJR-VERDICT: FAIL.*", timeout=T, fail=PANIC)
        line = vm.last_line.text if vm.last_line else ""
        assert "image SAVED" in line, line
        assert vm.find(r"KJR: image encrypted: a fresh image key sealed")
        assert vm.find(r"kjump-agent: saving .*AES-256-GCM"), "B did not say it encrypts"
        saved_line = vm.find(r"kjump-agent: SAVED.*")
        vm.wait_exit(timeout=120)
    (art / "figures.json").write_text(
        json.dumps({"agent": [m.group(0) for m in saved_line]}, indent=1) + "\n"
    )
    h = header(target)
    assert h.state_text == "SAVED" and h.encrypted
    return target, data, uuid, secret


def test_the_secret_and_the_memory_never_reach_the_disks_in_plaintext(saved) -> None:
    target, data, _uuid, secret = saved
    # A's fill pattern (random bytes, incompressible: a plaintext image stores it as is)
    pattern = bytes(fill(1, 777)[: 1 << 20])
    needles = [secret, secret.hex().encode(), pattern[4096:8192], pattern[500000:504096]]
    for disk in (target, data):
        assert needles_in_file(disk, needles) == set(), f"plaintext found on {disk.name}"
    # the check can fail: the same scan finds the pattern in a plaintext copy of it
    probe = target.with_name("probe.raw")
    probe.write_bytes(os.urandom(4096) + pattern[4096:8192] + os.urandom(4096))
    assert needles_in_file(probe, needles[2:3]) == {0}
    probe.unlink()


def test_restore_asks_the_passphrase_and_brings_the_secret_back(
    request, kernel, a_crypto, b_crypto, r_crypto, keyfile, saved, tmp_path
) -> None:
    target, data = copy_disks(saved[:2], tmp_path / "disks")
    rimg = r_initrd(
        tmp_path / "r.img", kernel, a_crypto, b_crypto, r_crypto, saved[2], image_key=keyfile
    )
    with r_vm(kernel, rimg, saved[2], (target, data), artifacts_dir(request.node.name)) as vm:
        m = vm.wait_for(PROMPT, timeout=T, fail=PANIC)
        assert m.group(2) == "1"
        vm.send("not the passphrase\n")
        m = vm.wait_for(PROMPT, timeout=T, fail=PANIC)
        assert m.group(2) == "2"
        assert vm.find(r"kjumpd-rf: wrong passphrase \(1 of 3\)")
        vm.send(PASSPHRASE + "\n")
        m = vm.wait_for(r"KJR-VERDICT: (PASS|FAIL) (.*)|KJR-NORMAL.*", timeout=T, fail=PANIC)
        assert vm.find(r"kjumpd-rf: image key unsealed; header and metadata authenticated")
        assert vm.find(r"kjump-agent: save kernel up: role restore")
        assert not vm.find(PASSPHRASE), "the passphrase was echoed on the console"
        assert m.group(1) == "PASS", m.group(0)
        assert "data=intact" in m.group(2) and "now=CONSUMED" in m.group(2), m.group(0)
    assert header(target).state_text == "CONSUMED"


def test_three_wrong_passphrases_boot_normally_and_keep_the_image(
    request, kernel, a_crypto, b_crypto, r_crypto, keyfile, saved, tmp_path
) -> None:
    target, data = copy_disks(saved[:2], tmp_path / "disks")
    rimg = r_initrd(
        tmp_path / "r.img", kernel, a_crypto, b_crypto, r_crypto, saved[2], image_key=keyfile
    )
    with r_vm(kernel, rimg, saved[2], (target, data), artifacts_dir(request.node.name)) as vm:
        for attempt in (1, 2, 3):
            m = vm.wait_for(PROMPT, timeout=T, fail=PANIC)
            assert m.group(2) == str(attempt)
            vm.send(f"wrong {attempt}\n")
        m = vm.wait_for(NORMAL, timeout=T, fail=PANIC)
        assert not vm.find(r"kjump-agent"), "B ran without the passphrase"
    assert m.group(1) == "kept:passphrase" and m.group(2) == "SAVED", m.group(0)
    assert header(target).state_text == "SAVED"


def test_an_altered_header_is_refused_before_the_save_kernel_runs(
    request, kernel, a_crypto, b_crypto, r_crypto, keyfile, saved, tmp_path
) -> None:
    target, data = copy_disks(saved[:2], tmp_path / "disks")
    dev, _ = store.open_target(target, writable=True, offset=0)
    with dev:  # a crafted jump-back address, every CRC recomputed
        h = store.read_header(dev)
        store.update_header(dev, jump_back_entry=h.jump_back_entry + 0x1000)
    rimg = r_initrd(
        tmp_path / "r.img", kernel, a_crypto, b_crypto, r_crypto, saved[2], image_key=keyfile
    )
    with r_vm(kernel, rimg, saved[2], (target, data), artifacts_dir(request.node.name)) as vm:
        vm.wait_for(PROMPT, timeout=T, fail=PANIC)
        vm.send(PASSPHRASE + "\n")
        m = vm.wait_for(NORMAL, timeout=T, fail=PANIC)
        assert not vm.find(r"kjump-agent"), "B ran for an altered image"
    assert m.group(1) == "invalid:altered", m.group(0)
    assert m.group(2).startswith("INVALID(altered: the image header or metadata was altered")


def test_an_altered_record_is_refused_before_it_reaches_memory(
    request, kernel, a_crypto, b_crypto, r_crypto, keyfile, saved, tmp_path
) -> None:
    target, data = copy_disks(saved[:2], tmp_path / "disks")
    index = alter_a_record(target)
    rimg = r_initrd(
        tmp_path / "r.img", kernel, a_crypto, b_crypto, r_crypto, saved[2], image_key=keyfile
    )
    art = artifacts_dir(request.node.name)
    vm = r_vm(kernel, rimg, saved[2], (target, data), art)
    try:
        vm.start()
        vm.wait_for(PROMPT, timeout=T, fail=PANIC)
        vm.send(PASSPHRASE + "\n")
        vm.wait_for(rf"kjump-agent: restore failed: .*chunk {index} .*fails authentication", T)
        vm.wait_exit(timeout=T)  # B reboots; QEMU runs with -no-reboot
        vm.restart()
        m = vm.wait_for(NORMAL, timeout=T, fail=PANIC)
    finally:
        vm.stop()
    assert m.group(2).startswith("INVALID(altered: chunk"), m.group(0)
    assert "fails authentication" in m.group(2), m.group(0)


def alter_a_record(target: Path) -> int:
    """Change one payload byte of the first record that has a payload, with both CRCs and
    the header's checksum over every record's CRC redone, as a forger would (every damage
    check passes; only the authentication tag can see it). Returns the record's index."""
    off, ch, bitmap = next(r for r in records(target) if r[1].payload_length > 16)
    with open(target, "rb") as f:
        f.seek(off + CHUNK_HEADER_SIZE + len(bitmap))
        payload = bytearray(f.read(ch.payload_length))
    payload[len(payload) // 2] ^= 0x01
    rewrite_record(target, off, ch, bitmap, bytes(payload))
    crcs = [rec.crc for _off, rec, _bm in records(target)]
    dev, _ = store.open_target(target, writable=True, offset=0)
    with dev:
        store.update_header(dev, data_crc=crc32(struct.pack(f"<{len(crcs)}I", *crcs)))
    return ch.index


ONE_BOOT = r"kjumpd-rf: image marked RESTORING\(1\); restoring it in this kernel"


def one_boot(
    request: pytest.FixtureRequest,
    kernel: Path,
    images: tuple[InitramfsImage, InitramfsImage, InitramfsImage],
    keyfile: Path,
    uuid: str,
    disks: tuple[Path, Path],
    until: str,
    out: Path,
) -> tuple[re.Match[str], VM]:
    """R booted as the boot entry boots it after a hibernation in a wide jump area (confined
    to the area, the image key in its payload; ``images``: A's, B's and R's initramfs), the
    passphrase typed, run until ``until``; asserts that R restored by itself (one boot)."""
    a_crypto, b_crypto, r_crypto = images
    area = (JUMP_AREA_START, WIDE_AREA_SIZE)
    rimg = r_initrd(
        out, kernel, a_crypto, b_crypto, r_crypto, uuid, image_key=keyfile, jump_area=area
    )
    cfg = confined(r_cfg(kernel, rimg, uuid, disks), rimg, r_crypto, a_crypto, kernel, area)
    with VM(cfg, artifacts_dir(request.node.name), name="r") as vm:
        vm.wait_for(PROMPT, timeout=T, fail=PANIC)
        vm.send(PASSPHRASE + "\n")
        m = vm.wait_for(until, timeout=T, fail=PANIC)
        here = vm.find(ONE_BOOT)
        agent = vm.find(r"kjump-agent: save kernel up")
    assert here, "R did not restore in one boot (where did KASLR put it?)"
    assert not agent, "B ran although R restores in one boot"
    return m, vm


def test_r_confined_to_the_jump_area_decrypts_the_image_and_restores_it_in_one_boot(
    request, kernel, a_crypto, b_crypto, r_crypto, keyfile, saved_wide, tmp_path
) -> None:
    target, data = copy_disks(saved_wide[:2], tmp_path / "disks")
    m, _vm = one_boot(
        request,
        kernel,
        (a_crypto, b_crypto, r_crypto),
        keyfile,
        saved_wide[2],
        (target, data),
        r"KJR-VERDICT: (PASS|FAIL) (.*)|KJR-NORMAL.*",
        tmp_path / "r.img",
    )
    assert m.group(1) == "PASS", m.group(0)
    assert "data=intact" in m.group(2) and "now=CONSUMED" in m.group(2), m.group(0)
    assert header(target).state_text == "CONSUMED"


def test_r_confined_to_the_jump_area_refuses_an_altered_record_as_altered(
    request, kernel, a_crypto, b_crypto, r_crypto, keyfile, saved_wide, tmp_path
) -> None:
    """R restoring by itself checks each record's tag as it reads it: the altered record is
    refused before it reaches memory, the image is INVALID(altered: ...), A is not jumped
    to, and the normal system boots with kjump.rf=invalid:altered."""
    target, data = copy_disks(saved_wide[:2], tmp_path / "disks")
    index = alter_a_record(target)
    m, vm = one_boot(
        request,
        kernel,
        (a_crypto, b_crypto, r_crypto),
        keyfile,
        saved_wide[2],
        (target, data),
        NORMAL,
        tmp_path / "r.img",
    )
    assert not vm.find(r"KJR-VERDICT"), "A was jumped into from an altered image"
    assert m.group(1) == "invalid:altered", m.group(0)
    assert m.group(2).startswith(f"INVALID(altered: chunk {index} "), m.group(0)
    assert "fails authentication" in m.group(2), m.group(0)
    assert header(target).state_text.startswith("INVALID(altered:")
