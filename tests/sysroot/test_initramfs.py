"""savekernel.initramfs: archives that boot (busybox, trimmed python, host binaries), cached by
the hash of their inputs. The chroot tests run the archive's own interpreter and binaries."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kjumpd.cpio import Entry
from savekernel import initramfs
from tests import prereq

INIT = "#!/bin/sh\necho hello\n"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KJUMPD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def need_root() -> None:
    prereq.need(os.geteuid() == 0, "needs root for chroot")


def extract(entries: list[Entry], root: Path) -> None:
    for e in entries:
        p = root / e.name
        if stat.S_ISDIR(e.mode):
            p.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(e.mode):
            os.symlink(e.data.decode(), p)
        elif stat.S_ISREG(e.mode):
            p.write_bytes(e.data)
            os.chmod(p, stat.S_IMODE(e.mode))


def chroot_python(root: Path, *args: str, env: bool = False) -> subprocess.CompletedProcess[str]:
    """The archive's python3 in a chroot of ``root``, as the boot environments start it (-S -B;
    -E unless ``env``)."""
    flags = ["-S", "-B"] if env else ["-S", "-E", "-B"]
    return subprocess.run(
        ["chroot", str(root), "/usr/bin/python3", *flags, *args], capture_output=True, text=True
    )


def test_cached_by_inputs_and_rebuilt_when_one_changes(tmp_path: Path, cache: Path) -> None:
    a = initramfs.build_initramfs(None, INIT, {"etc/motd": b"one"}, name="t")
    b = initramfs.build_initramfs(tmp_path / "copy.gz", INIT, {"etc/motd": b"one"}, name="t")
    c = initramfs.build_initramfs(None, INIT, {"etc/motd": b"two"}, name="t")
    d = initramfs.build_initramfs(None, INIT + "\n", {"etc/motd": b"one"}, name="t")
    assert not a.cached and b.cached and a.key == b.key
    assert (tmp_path / "copy.gz").read_bytes() == a.path.read_bytes()
    assert len({a.key, c.key, d.key}) == 3
    assert a.path.parent == cache / "initramfs"
    assert a.compressed_size % 4 == 0, "an appended job archive must start 4-byte aligned"
    names = {e.name: e for e in initramfs.read_archive(a.path)}
    assert names["init"].data == INIT.encode() and names["init"].mode & 0o111
    assert names["etc/motd"].data == b"one"
    assert stat.S_ISCHR(names["dev/console"].mode)
    assert names["usr/bin/sh"].data == b"busybox"  # applet link
    assert names["bin"].data == b"usr/bin"  # merged /usr like the host


def test_plain_archive_is_uncompressed_cpio_with_its_own_key() -> None:
    gz = initramfs.build_initramfs(None, INIT, name="t")
    plain = initramfs.build_initramfs(None, INIT, name="t", compress=False)
    assert plain.key != gz.key and plain.path != gz.path
    assert plain.path.read_bytes()[:6] == b"070701"
    assert plain.compressed_size == plain.uncompressed_size + (-plain.uncompressed_size % 4)
    assert [e.name for e in initramfs.read_archive(plain.path)] == [
        e.name for e in initramfs.read_archive(gz.path)
    ]


def test_compressed_with_lz4_without_the_lz4_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    # a host without the lz4 tool (Debian installs it only on request) still writes lz4:
    # python3-lz4, which kjumpd needs anyway, writes the stream
    real_run = subprocess.run

    def run(cmd, *a, **kw):  # type: ignore[no-untyped-def]
        assert Path(str(cmd[0])).name != "lz4", "the lz4 tool was run"
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", run)
    a = initramfs.build_initramfs(None, INIT, {"etc/motd": b"one" * 1000}, name="t-nolz4")
    blob = a.path.read_bytes()
    # the kernel's lz4 "legacy" stream (what CONFIG_RD_LZ4 reads), then zeros only: at
    # least a zero block size, which ends the stream for the kernel before an archive
    # appended after it (R's payload, B's job)
    assert a.path.suffix == ".lz4" and blob[:4] == initramfs.LZ4_LEGACY_MAGIC
    end = initramfs.lz4_legacy_length(blob)
    assert blob[end:] == bytes(len(blob) - end) and 4 <= len(blob) - end < 8
    # an archive appended after it (the job) is not taken for part of the stream
    assert initramfs.lz4_legacy_length(blob + b"070701" + bytes(200)) == end
    assert {e.name for e in initramfs.read_archive(a.path)} >= {"init", "etc/motd"}


def test_gzip_when_python3_lz4_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lz4.block", None)  # import fails as when not installed
    a = initramfs.build_initramfs(None, INIT, {"etc/motd": b"two" * 1000}, name="t-nolz4")
    assert a.path.suffix == ".gz" and a.path.read_bytes()[:2] == b"\x1f\x8b"
    assert {e.name for e in initramfs.read_archive(a.path)} >= {"init", "etc/motd"}


def test_a_missing_extra_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(initramfs.InitramfsError, match="missing"):
        initramfs.build_initramfs(None, INIT, {"boot/bzImage": tmp_path / "nope"}, name="t")


def test_shared_libraries_of_several_files_come_from_one_ldd_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = Path(os.path.realpath(sys.executable))
    kexec = Path("/usr/sbin/kexec")
    prereq.need(kexec.is_file(), "needs kexec-tools")
    monkeypatch.setattr(initramfs, "_LDD_CACHE", {})
    alone = {b: initramfs.shared_libraries(b) for b in (python, kexec)}
    assert all(any(lib.name.startswith("libc.so") for lib in libs) for libs in alone.values())
    monkeypatch.setattr(initramfs, "_LDD_CACHE", {})
    runs: list[list[str]] = []
    real = initramfs._run_ldd

    def counted(binaries):  # type: ignore[no-untyped-def]
        runs.append([str(b) for b in binaries])
        return real(binaries)

    monkeypatch.setattr(initramfs, "_run_ldd", counted)
    initramfs.prefetch_shared_libraries([python, kexec, python])
    assert runs == [[str(python), str(kexec)]]
    assert {b: initramfs.shared_libraries(b) for b in (python, kexec)} == alone
    assert len(runs) == 1
    # a static binary in the batch is asked about alone, and still has no libraries
    busybox = initramfs.BUSYBOX
    if busybox.is_file():
        initramfs.prefetch_shared_libraries([busybox, python])
        assert initramfs.shared_libraries(busybox) == []
    # a file that is not there is named, as without the batch
    initramfs.prefetch_shared_libraries([tmp_path / "gone", kexec])
    with pytest.raises(initramfs.InitramfsError, match="gone"):
        initramfs.shared_libraries(tmp_path / "gone")
    # a changed file is asked about again
    copy = tmp_path / "python-copy"
    copy.write_bytes(python.read_bytes())
    initramfs.prefetch_shared_libraries([copy, kexec])
    before = len(runs)
    copy.write_bytes(kexec.read_bytes())
    assert initramfs.shared_libraries(copy) == alone[kexec]
    assert len(runs) == before + 1


def test_host_binary_runs_with_only_the_archives_libraries(tmp_path: Path) -> None:
    need_root()
    img = initramfs.build_initramfs(None, INIT, name="kexec", host_binaries=("/usr/sbin/kexec",))
    root = tmp_path / "root"
    extract(initramfs.read_archive(img.path), root)
    out = subprocess.run(
        ["chroot", str(root), "/usr/sbin/kexec", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "kexec-tools" in out.stdout + out.stderr
    out = subprocess.run(["chroot", str(root), "/bin/sh", "/init"], capture_output=True, text=True)
    assert out.stdout == "hello\n"


def test_save_initramfs_runs_the_agent_on_its_trimmed_python(tmp_path: Path) -> None:
    need_root()
    img = initramfs.build_save_initramfs()
    assert img.compressed_size < 10 << 20, "B's initramfs grew past 10 MB"
    entries = initramfs.read_archive(img.path)
    names = {e.name for e in entries}
    assert "usr/lib/python3.11/os.pyc" in names and "usr/lib/python3.11/os.py" not in names
    assert not any("test/" in n or "tkinter" in n or "libcrypto" in n for n in names)
    root = tmp_path / "root"
    extract(entries, root)
    code = (
        "import " + ", ".join(initramfs.SAVE_ENTRY) + ", lz4.block, hashlib, ctypes\n"
        "print(lz4.block.decompress(lz4.block.compress(b'kjump' * 99)) == b'kjump' * 99,"
        " hashlib.sha256(b'').hexdigest()[:8])"
    )
    out = chroot_python(root, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "e3b0c442"]
    # the agent as /init runs it: no /proc here, so it must stop with a one-line error
    out = chroot_python(root, "-c", initramfs.AGENT_CODE, "boot")
    assert out.returncode == 1
    assert out.stdout.startswith("kjump-agent: error: /proc/cmdline is missing")
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize("which", ["save", "restore"])
def test_the_crypto_variant_encrypts_with_only_its_own_libraries(tmp_path: Path, which) -> None:
    """B (save and restore role) and R with python3-cryptography: sealing, unsealing and
    record encryption work inside the archive alone (libcrypto and the cffi backend are
    in it); the plain variant stays without them, at its size."""
    need_root()
    from bootloader.initramfs import build_restore_initramfs

    build = initramfs.build_save_initramfs if which == "save" else build_restore_initramfs
    img = build(crypto=True)
    root = tmp_path / "root"
    entries = initramfs.read_archive(img.path)
    extract(entries, root)
    names = {e.name for e in entries}
    assert any("libcrypto" in n for n in names)
    code = (
        initramfs.BOOTCACHE_INSTALL + "\n"
        "from kjumpd.image import seal\n"
        "from kjumpd.image.format import ChunkHeader, Header\n"
        "kf = seal.KeyFile.create('pw', n=1024)\n"
        "k = seal.new_image_key()\n"
        "s = seal.seal_key(kf.public, k)\n"
        "ok = seal.unseal_key(kf.unlock('pw'), kf.public, s) == k\n"
        "c = seal.ImageCipher.for_header(k, Header(uuid=bytes(16), created=1.0))\n"
        "ch = ChunkHeader(encoding=1, pages=1, index=3, phys=4096, raw_length=4096,"
        " payload_length=4096, crc=0, tag=0)\n"
        "h, ct = c.seal(ch, b'\\0', b'x' * 4096)\n"
        "print(ok, c.open(h, b'\\0', ct, 0)[1] == b'x' * 4096)"
    )
    out = chroot_python(root, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
    plain = initramfs.read_archive(build().path)
    assert not any("libcrypto" in e.name or "cryptography/" in e.name for e in plain)


def test_rs_crypto_variant_carries_cryptsetup_and_the_tpm2_plugin_with_its_libraries(
    tmp_path: Path,
) -> None:
    """R unlocks a LUKS volume with systemd-cryptenroll's TPM2 token: cryptsetup inside the
    archive loads systemd's plugin (its luksDump shows the token's TPM2 fields, which only the
    plugin prints), and every tpm2-tss library the plugin loads at unlock resolves inside
    the archive alone."""
    import json
    import shutil

    need_root()
    from bootloader.initramfs import TOKEN_PLUGINS, build_restore_initramfs

    plugins = sorted(Path("/usr/lib").glob("*/cryptsetup/libcryptsetup-token-systemd-tpm2.so"))
    prereq.need(
        shutil.which("cryptsetup") is not None and bool(plugins),
        "cryptsetup and systemd's TPM2 plugin are not installed (tools/setup.sh installs them)",
    )
    root = tmp_path / "root"
    extract(initramfs.read_archive(build_restore_initramfs(crypto=True).path), root)
    # what devtmpfs gives R: libgcrypt's RNG opens them
    for name, minor in (("random", 8), ("urandom", 9)):
        os.mknod(root / "dev" / name, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    disk, pw = root / "luks.img", tmp_path / "pw"
    pw.write_bytes(b"pw")
    with open(disk, "wb") as f:
        f.truncate(24 << 20)
    subprocess.run(
        ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--key-file", str(pw), str(disk)],
        check=True, capture_output=True,
    )  # fmt: skip
    token = {"type": "systemd-tpm2", "keyslots": ["0"], "tpm2-blob": "AAAA", "tpm2-pcrs": [7],
             "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc", "tpm2-policy-hash": "00",
             "tpm2-pin": False}  # fmt: skip
    subprocess.run(
        ["cryptsetup", "token", "import", "--json-file", "-", str(disk)],
        input=json.dumps(token).encode(), check=True, capture_output=True,
    )  # fmt: skip
    out = subprocess.run(
        ["chroot", str(root), "/usr/sbin/cryptsetup", "luksDump", "/luks.img"],
        capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "tpm2-pcr-bank:    sha256" in out.stdout
    triplet = plugins[0].parent.parent.name
    for lib in TOKEN_PLUGINS["systemd-tpm2"]:
        listed = subprocess.run(
            ["chroot", str(root), "/lib64/ld-linux-x86-64.so.2", "--list",
             f"/usr/lib/{triplet}/{lib}"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert listed.returncode == 0 and "not found" not in listed.stdout, (lib, listed)


def test_save_agent_creates_its_dataclasses_from_precompiled_code(tmp_path: Path) -> None:
    need_root()
    root = tmp_path / "root"
    extract(initramfs.read_archive(initramfs.build_save_initramfs().path), root)
    code = (
        initramfs.BOOTCACHE_INSTALL + "\nimport " + ", ".join(initramfs.SAVE_ENTRY) + "\n"
        "from kjumpd.job import Job\n"
        "from kjumpd.image.format import BlockExtent\n"
        "import dataclasses, kjumpd_bootcache as c\n"
        "e = BlockExtent(0, 4096, 8192)\n"
        "ok = e == BlockExtent(0, 4096, 8192) and e != BlockExtent(0, 0, 1) and "
        "hash(e) == hash(BlockExtent(0, 4096, 8192)) and repr(e).startswith('BlockExtent(')\n"
        "try:\n    e.length = 1\nexcept dataclasses.FrozenInstanceError:\n    pass\n"
        "else:\n    ok = False\n"
        "print(ok, len(c.misses))"
    )
    out = chroot_python(root, "-c", code)
    assert out.returncode == 0, out.stderr
    # the classes behave as dataclasses; none of their methods was compiled at start-up
    assert out.stdout.split() == ["True", "0"]


#: modules neither boot environment may load: the daemon's D-Bus and process libraries, and
#: argparse (what B's /init and R's python start with is parsed without it)
NOT_AT_BOOT = ("gi", "pydbus", "psutil", "argparse")


def loaded_modules(root: Path, code: str) -> set[str]:
    out = chroot_python(root, "-c", code + "\nimport sys; print(' '.join(sys.modules))")
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_save_agent_starts_without_the_daemons_libraries(tmp_path: Path) -> None:
    need_root()
    root = tmp_path / "root"
    extract(initramfs.read_archive(initramfs.build_save_initramfs().path), root)
    mods = loaded_modules(
        root,
        "import " + ", ".join(initramfs.SAVE_ENTRY) + ", kjumpd.agent.freepages, kjumpd.image.heap",
    )
    assert "kjumpd.image.save" in mods
    assert not mods & set(NOT_AT_BOOT)


def test_restore_first_init_is_compiled_and_starts_without_the_daemons_libraries(
    tmp_path: Path,
) -> None:
    need_root()
    from bootloader.initramfs import RF_MODULE, build_restore_initramfs

    entries = initramfs.read_archive(build_restore_initramfs().path)
    names = {e.name for e in entries}
    assert f"usr/lib/python3.11/{RF_MODULE}.pyc" in names
    assert not any(n.endswith("restore_init.py") for n in names)
    root = tmp_path / "root"
    extract(entries, root)
    # what R's /init runs: not PID 1 and no boot.json here, so it must say so and stop
    out = chroot_python(
        root, "-c", f"import sys, {RF_MODULE}; sys.exit({RF_MODULE}.main())", env=True
    )
    assert out.returncode == 1
    assert out.stdout.startswith("kjumpd-rf: restore-first environment up")
    assert "Traceback" not in out.stdout + out.stderr
    mods = loaded_modules(
        root,
        f"import {RF_MODULE}\n"
        "from kjumpd import fsstamp\nfrom kjumpd.restore import decision\n"
        "from kjumpd.image.store import find_target\n"
        "from kjumpd.image import store",
    )
    assert not mods & set(NOT_AT_BOOT)
