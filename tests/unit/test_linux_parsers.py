"""One reading of the kernel command line and of the kernel's build configuration, the
kernel's own: the daemon's checks and its job can never disagree about a parameter."""

from __future__ import annotations

import gzip
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.daemon import kexec, preflight
from kjumpd.daemon.config import Config
from kjumpd.linux import cmdline, kconfig, mountinfo
from kjumpd.sysroot import Sysroot


@pytest.mark.parametrize(
    "line, want",
    [
        ("init_on_free=1", True),
        ("init_on_free=0", False),
        ("init_on_free=1 init_on_free=0", False),  # the last one counts
        ("init_on_free=0 quiet init_on_free=1", True),
        ("init_on_free=on", True),
        ("init_on_free=off", False),
        ("init_on_free=Y", True),
        ("init_on_free=true", True),
        ("init_on_free=no", False),
        ("init_on_free=maybe", None),
        ("init_on_free=", None),
        ("init_on_free", None),
        ("", None),
    ],
)
def test_boolean_parameters_read_as_the_kernel_reads_them(line, want):
    assert cmdline.flag(line, "init_on_free") is want


def write(root, path, text):
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text) if isinstance(text, str) else p.write_bytes(text)


@pytest.mark.parametrize(
    "line", ["init_on_free=1 init_on_free=0", "init_on_free=on", "init_on_free=off init_on_free=y"]
)
def test_the_check_and_the_job_agree_on_init_on_free(tmp_path, line):
    write(tmp_path, "/proc/cmdline", line + "\n")
    sr = Sysroot(tmp_path)
    zeroed, _ = kexec.free_pages_zeroed(sr)
    rep = preflight.run(sr, Config(image_size_limit=1 << 30, free_page_exclusion=False))
    item = next(i for i in rep.items if i.name == "image size limit")
    assert item.ok is zeroed is cmdline.flag(line, "init_on_free")


def test_quoted_values_keep_their_blanks_and_lose_their_quotes():
    line = 'root=/dev/vda1 dyndbg="file foo.c +p" quiet kjump.rf=x'
    assert cmdline.words(line) == [
        "root=/dev/vda1",
        'dyndbg="file foo.c +p"',
        "quiet",
        "kjump.rf=x",
    ]
    assert cmdline.params(line) == {
        "root": "/dev/vda1",
        "dyndbg": "file foo.c +p",
        "quiet": "",
        "kjump.rf": "x",
    }
    assert cmdline.without(line, ["kjump.rf", "quiet"]) == 'root=/dev/vda1 dyndbg="file foo.c +p"'
    assert cmdline.value("a=1 b a=2", "a") == "2" and cmdline.value("b", "b") is None


values = st.text(st.characters(codec="ascii", exclude_characters='" \t\n\r\v\f'), max_size=6)
names = st.text("abcdefgh._-", min_size=1, max_size=6)


@given(
    st.lists(
        st.tuples(names, st.one_of(st.none(), values, values.map(lambda v: v + " x"))), max_size=8
    )
)
def test_a_command_line_written_from_parameters_reads_back_the_same(pairs):
    line = " ".join(
        k if v is None else (f'{k}="{v}"' if " " in v else f"{k}={v}") for k, v in pairs
    )
    want: dict[str, str] = {}
    for k, v in pairs:
        want[k] = "" if v is None else v
    assert cmdline.params(line) == want
    assert cmdline.params(" ".join(cmdline.words(line))) == want
    if pairs:
        k = pairs[0][0]
        assert k not in cmdline.params(cmdline.without(line, [k]))


def test_the_kernel_config_is_read_from_proc_then_boot(tmp_path):
    sr = Sysroot(tmp_path)
    assert kconfig.read(sr) is None
    write(tmp_path, "/proc/sys/kernel/osrelease", "6.12.1-test\n")
    write(
        tmp_path,
        "/boot/config-6.12.1-test",
        "CONFIG_KEXEC_JUMP=y\n# CONFIG_HIBERNATION is not set\nCONFIG_NR_CPUS=8\n",
    )
    c = kconfig.read(sr)
    assert c is not None and c.source == "/boot/config-6.12.1-test"
    assert c.get("KEXEC_JUMP") == "y" and c.enabled("CONFIG_KEXEC_JUMP")
    assert c.get("HIBERNATION") is None and not c.enabled("HIBERNATION")
    assert c.get("NR_CPUS") == "8"
    write(tmp_path, "/proc/config.gz", gzip.compress(b"CONFIG_KEXEC_JUMP=n\n"))
    c = kconfig.read(sr)
    assert c is not None and c.source == "/proc/config.gz" and not c.enabled("KEXEC_JUMP")
    assert preflight.kexec_jump_config(sr) == (False, "/proc/config.gz")


def test_a_mount_point_that_is_not_utf8_reads_as_the_path_it_is(tmp_path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_bytes(
        b"22 1 254:1 / / rw - ext4 /dev/vda1 rw\n30 22 8:17 / /mnt/caf\xe9 rw - vfat /dev/sdb1 rw\n"
    )
    text = Sysroot(tmp_path).read_text("/proc/self/mountinfo")
    (m,) = [m for m in mountinfo.parse(text) if m.fstype == "vfat"]
    assert os.fsencode(m.mountpoint) == b"/mnt/caf\xe9"


def test_a_mount_id_that_only_looks_like_a_number_skips_the_line() -> None:
    text = "\u00b2 1 254:1 / /x rw - ext4 /dev/vda1 rw\n22 1 254:1 / / rw - ext4 /dev/vda1 rw\n"
    assert [m.mountpoint for m in mountinfo.parse(text)] == ["/"]
