"""The wheel carries everything the commands need: installed into a fresh virtual
environment and run from outside the checkout, kjumpd finds its boot entry templates, the
save kernel's config fragment and builders, and the contrib/ files `kjumpctl install` puts
on the system."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _copy_source(dest: Path) -> None:
    """The checkout without what a build or a run leaves in it (pip builds in the tree)."""
    shutil.copytree(
        REPO,
        dest,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "build",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".hypothesis",
            "artifacts",
        ),
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    _copy_source(tmp / "src")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            str(tmp / "src"),
        ],
        check=True,
        capture_output=True,
    )
    (whl,) = (tmp / "dist").glob("kjumpd-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the wheel installed; its dependencies come from the test
    environment's site-packages, added after its own (the checkout is not on its path)."""
    v = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(v)], check=True)
    py = v / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "zz-test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return v


def run_in(venv: Path, cwd: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "KJUMPD_"))}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def test_the_wheel_has_every_package_and_shipped_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in sorted((REPO / "kjumpd").rglob("__init__.py")):
        assert str(init.relative_to(REPO)) in names, "add it to packages in pyproject.toml"
    for folder in ("bootloader", "savekernel"):
        for f in sorted((REPO / folder).rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                assert str(f.relative_to(REPO)) in names
    for f in sorted((REPO / "contrib").rglob("*")):
        if f.is_file():
            assert f"kjumpd/contrib/{f.relative_to(REPO / 'contrib')}" in names


def test_installed_kjumpd_renders_the_boot_entries_outside_the_checkout(
    venv: Path, tmp_path: Path
) -> None:
    code = textwrap.dedent("""\
        import json, kjumpd, savekernel.initramfs, bootloader.initramfs
        from kjumpd import resources
        from kjumpd.daemon import bootentry
        cmd = "kjump.target=0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e kjump.offset=1048576"
        print(json.dumps({
            "kjumpd": kjumpd.__file__,
            "grub": bootentry.render_grub_snippet(kind="restore-first", fs_uuid="1234-ABCD",
                fstype="ext4", kernel="/kjumpd/vmlinuz-restore",
                initrd="/kjumpd/initrd-restore.img", cmdline=cmd),
            "bls": bootentry.render_bls_entry(kernel="/kjumpd/vmlinuz-restore",
                initrd="/kjumpd/initrd-restore.img", cmdline=cmd),
            "fragment": resources.read_text("savekernel", "kernel.fragment"),
            "builder": str(resources.find("savekernel", "build-kernel.sh")),
            "unit": resources.read_text("contrib", "kjumpd.service"),
            "init": str(bootloader.initramfs.INIT),
        }))
    """)
    proc = run_in(venv, tmp_path, [str(venv / "bin" / "python"), "-c", code])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["kjumpd"].startswith(str(venv))
    assert "--id kjumpd-restore" in out["grub"] and "kjump.offset=1048576" in out["grub"]
    assert out["bls"].startswith("# kjumpd restore-first entry")
    assert "KEXEC_JUMP=y" in out["fragment"]
    assert out["builder"].startswith(str(venv)) and os.access(out["builder"], os.X_OK)
    assert "ExecStart=kjumpd" in out["unit"]
    assert out["init"].startswith(str(venv)) and Path(out["init"]).is_file()


def test_installed_kjumpctl_install_dry_run_on_a_fake_machine(venv: Path, tmp_path: Path) -> None:
    from kjump_faketree import build, tree_hash

    root = tmp_path / "root"
    build(root, tmp_path / "host")
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/default/grub").write_text('GRUB_CMDLINE_LINUX="quiet"\n')
    before = tree_hash(root)
    proc = run_in(
        venv,
        tmp_path,
        [
            str(venv / "bin" / "kjumpctl"), "--sysroot", str(root), "install", "--dry-run",
            "--save-initramfs", str(root / "usr/lib/kjumpd/save/initramfs.cpio.gz"),
            "--restore-initrd", str(tmp_path / "host" / "initrd.img"),
        ],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert tree_hash(root) == before
    for dest in (
        "/usr/lib/systemd/system/kjumpd.service",
        "/usr/share/polkit-1/actions/org.kjump.policy",
        "/usr/lib/systemd/system/systemd-logind.service.d/kjumpd.conf",
        "/etc/kernel/postinst.d/zz-kjumpd",
    ):
        assert f"write     {dest}" in proc.stdout
    assert "replace   /etc/default/grub" in proc.stdout
