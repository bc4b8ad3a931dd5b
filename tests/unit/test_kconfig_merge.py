"""kjumpd-kernel-config: a distribution's configuration merged with kjumpd's fragment as
scripts/kconfig/merge_config.sh merges (the base's line for an option the fragment sets goes,
the fragment's line comes at the end, the rest stays in order)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from savekernel import kconfig_merge as km

BASE = """\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_64BIT=y
CONFIG_KEXEC=y
# CONFIG_KEXEC_JUMP is not set
CONFIG_HIBERNATION=y
CONFIG_STRICT_DEVMEM=y
CONFIG_NR_CPUS=8192
CONFIG_LOCALVERSION="-amd64"
"""
FRAGMENT = "KEXEC=y\nKEXEC_JUMP=y  # the point\nSTRICT_DEVMEM=n\nCRASH_DUMP=y\n"


def test_the_merge_replaces_what_the_fragment_sets_and_keeps_the_rest() -> None:
    m = km.merge(BASE, km.parse_fragment(FRAGMENT))
    assert m.text == (
        "#\n# Automatically generated file; DO NOT EDIT.\n#\n"
        "CONFIG_64BIT=y\n"
        "CONFIG_HIBERNATION=y\n"
        "CONFIG_NR_CPUS=8192\n"
        'CONFIG_LOCALVERSION="-amd64"\n'
        "CONFIG_KEXEC=y\n"
        "CONFIG_KEXEC_JUMP=y\n"
        "# CONFIG_STRICT_DEVMEM is not set\n"
        "CONFIG_CRASH_DUMP=y\n"
    )
    assert m.redefined == [
        ("CONFIG_KEXEC_JUMP", "n", "y"),
        ("CONFIG_STRICT_DEVMEM", "y", "n"),
    ]
    assert m.added == [("CONFIG_CRASH_DUMP", "y")]
    # merging again changes nothing
    again = km.merge(m.text, km.parse_fragment(FRAGMENT))
    assert again.text == m.text and again.redefined == [] and again.added == []


def test_the_jump_fragment_agrees_with_the_vm_kernel_fragment() -> None:
    vm = dict(km.parse_fragment((Path(km.__file__).parent / "kernel.fragment").read_text()))
    jump = km.parse_fragment(km.JUMP_FRAGMENT.read_text())
    assert ("CONFIG_KEXEC_JUMP", "y") in jump
    for name, value in jump:
        assert vm.get(name) == value, name


def test_the_script_prints_the_merge_and_reports_on_stderr(tmp_path: Path) -> None:
    base = tmp_path / "config-6.12.0-amd64"
    base.write_text(BASE)
    script = Path(km.__file__).parent / "kjumpd-kernel-config"
    proc = subprocess.run([str(script), str(base)], capture_output=True, text=True, check=True)
    assert "CONFIG_KEXEC_JUMP=y\n" in proc.stdout and "CONFIG_NR_CPUS=8192\n" in proc.stdout
    assert (
        "Value of CONFIG_KEXEC_JUMP is redefined by fragment: "
        "# CONFIG_KEXEC_JUMP is not set -> CONFIG_KEXEC_JUMP=y" in proc.stderr
    )
    bad = tmp_path / "bad.fragment"
    bad.write_text("KEXEC_JUMP\n")
    proc = subprocess.run(
        [str(script), "--fragment", str(bad), str(base)], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "'KEXEC_JUMP' is not NAME=value" in proc.stderr
