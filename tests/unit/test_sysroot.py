"""Sysroot: a system path maps into the root and never leaves it by its spelling."""

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.errors import KjumpError, SysrootError
from kjumpd.sysroot import Sysroot


@pytest.mark.parametrize(
    "path", ["/..", "/../etc/shadow", "/sys/../../etc/shadow", "/a/b/../../../x", "/./.."]
)
def test_a_dotdot_above_the_root_is_refused(tmp_path, path):
    sr = Sysroot(tmp_path)
    with pytest.raises(SysrootError) as ei:
        sr.path(path)
    err = ei.value
    assert isinstance(err, KjumpError)
    assert "leaves the system root" in err.what and err.why and err.fix
    with pytest.raises(SysrootError):
        sr.read_text(path)


def test_the_real_root_refuses_it_too():
    with pytest.raises(SysrootError, match="leaves the system root"):
        Sysroot().path("/proc/../../etc/shadow")
    assert Sysroot().path("/proc/self/../self") == Path("/proc/self/../self")


def test_a_dotdot_that_stays_inside_is_mapped(tmp_path):
    (tmp_path / "sys/class").mkdir(parents=True)
    (tmp_path / "sys/x").write_text("42\n")
    sr = Sysroot(tmp_path)
    assert sr.read_text("/sys/class/../x") == "42\n"


def test_a_long_hostile_path_is_echoed_clipped(tmp_path):
    with pytest.raises(SysrootError) as ei:
        Sysroot(tmp_path).path("/" + "../" * 100_000)
    assert len(ei.value.message) < 1000


def test_links_are_followed_as_the_kernel_follows_them(tmp_path):
    """The documented choice: a relative link stays in the fake tree; an absolute one points
    at the host (how tests splice a real object in); the mapping itself resolves neither."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "value").write_text("host\n")
    root = tmp_path / "root"
    (root / "sys/devices/d").mkdir(parents=True)
    (root / "sys/devices/d/value").write_text("tree\n")
    (root / "sys/class").mkdir()
    os.symlink("../devices/d", root / "sys/class/rel")
    os.symlink(str(host), root / "sys/class/abs")
    sr = Sysroot(root)
    assert sr.path("/sys/class/rel/value") == root / "sys/class/rel/value"
    assert sr.read_text("/sys/class/rel/value") == "tree\n"
    assert sr.read_text("/sys/class/abs/value") == "host\n"


segments = st.lists(st.sampled_from(["a", "b", "..", ".", ""]), max_size=8)


@given(segments)
def test_mapped_paths_stay_under_the_root_lexically(parts):
    root = "/tmp/kjump-root-that-need-not-exist"
    sr = Sysroot.__new__(Sysroot)
    object.__setattr__(sr, "root", Path(root))
    path = "/" + "/".join(parts)
    depth, escapes = 0, False
    for p in parts:
        if p == "..":
            depth -= 1
            escapes = escapes or depth < 0
        elif p not in ("", "."):
            depth += 1
    if escapes:
        with pytest.raises(SysrootError):
            sr.path(path)
    else:
        mapped = os.path.normpath(sr.path(path))
        assert mapped == root or mapped.startswith(root + "/")


def test_unmapping_a_path_outside_the_root_is_a_sysroot_error(tmp_path):
    sr = Sysroot(tmp_path)
    assert sr.unmap(tmp_path / "sys/x") == "/sys/x"
    with pytest.raises(SysrootError, match="outside the system root"):
        sr.unmap("/etc/shadow")
