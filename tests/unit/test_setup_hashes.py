"""`kjumpctl setup --save-kernel` names the exact [save_kernel] hash keys and values that
preflight compares the installed save kernel and initramfs with (a real kjumpctl process)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from kjumpd.daemon import config

REPO = Path(__file__).resolve().parents[2]


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kjumpd.cli", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )


def tree(tmp_path: Path) -> tuple[Path, Path, str, str]:
    root = tmp_path / "root"
    k = root / "boot/kjump/bzImage"
    i = root / "boot/kjump/initramfs.img"
    k.parent.mkdir(parents=True)
    k.write_bytes(b"MZ save kernel" * 1000)
    i.write_bytes(b"\x1f\x8b save initramfs" * 1000)
    conf = tmp_path / "kjumpd.toml"
    conf.write_text(
        '[save_kernel]\nkernel = "/boot/kjump/bzImage"\ninitramfs = "/boot/kjump/initramfs.img"\n'
    )
    return (
        root,
        conf,
        hashlib.sha256(k.read_bytes()).hexdigest(),
        hashlib.sha256(i.read_bytes()).hexdigest(),
    )


def test_prints_the_lines_that_make_the_config_match(tmp_path: Path) -> None:
    root, conf, kh, ih = tree(tmp_path)
    r = ctl("--sysroot", str(root), "setup", "--config", str(conf), "--save-kernel")
    assert r.returncode == 0, r.stderr
    assert f'kernel_sha256 = "{kh}"' in r.stdout and f'initramfs_sha256 = "{ih}"' in r.stdout
    # pasting the printed lines into the [save_kernel] table gives a config preflight accepts
    pasted = conf.read_text() + "".join(
        line.strip() + "\n" for line in r.stdout.splitlines() if line.startswith("  ")
    )
    cfg = config.loads(pasted)
    assert (cfg.save_kernel_sha256, cfg.save_initramfs_sha256) == (kh, ih)
    conf.write_text(pasted)
    r = ctl("--sysroot", str(root), "setup", "--config", str(conf), "--save-kernel")
    assert r.returncode == 0 and "kernel_sha256 = " not in r.stdout
    assert "save_kernel.kernel_sha256 matches" in r.stdout


def test_a_replaced_save_kernel_gets_its_new_hash(tmp_path: Path) -> None:
    root, conf, kh, ih = tree(tmp_path)
    conf.write_text(conf.read_text() + f'kernel_sha256 = "{kh}"\ninitramfs_sha256 = "{ih}"\n')
    (root / "boot/kjump/bzImage").write_bytes(b"MZ a newer save kernel")
    new = hashlib.sha256(b"MZ a newer save kernel").hexdigest()
    r = ctl("--sysroot", str(root), "setup", "--config", str(conf), "--save-kernel")
    assert r.returncode == 0, r.stderr
    assert f'kernel_sha256 = "{new}"' in r.stdout and "initramfs_sha256 matches" in r.stdout


def test_a_missing_save_kernel_is_an_error_that_says_so(tmp_path: Path) -> None:
    root, conf, _, _ = tree(tmp_path)
    (root / "boot/kjump/bzImage").unlink()
    r = ctl("--sysroot", str(root), "setup", "--config", str(conf), "--save-kernel")
    assert r.returncode == 1
    assert "/boot/kjump/bzImage is not installed" in r.stdout and "Traceback" not in r.stderr
