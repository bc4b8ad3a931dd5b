"""savekernel/cpio.py: the newc archive the kernel unpacks (round trip, corruption, layout)."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kjumpd import cpio
from kjumpd.errors import ImageFormatError
from tests import prereq

names = st.lists(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=12).filter(
        lambda s: s not in (".", "..")
    ),
    min_size=1,
    max_size=3,
).map("/".join)
files = st.dictionaries(names, st.binary(max_size=300), min_size=1, max_size=8)


def _filter_prefixes(d: dict[str, bytes]) -> dict[str, bytes]:
    # a name cannot be both a file and the parent directory of another file
    return {k: v for k, v in d.items() if not any(o.startswith(k + "/") for o in d)}


@given(files.map(_filter_prefixes))
@settings(max_examples=150)
def test_round_trip_keeps_every_file_and_its_parents(d: dict[str, bytes]) -> None:
    blob = cpio.write(cpio.Entry.file(k, v, 0o640) for k, v in d.items())
    assert len(blob) % 4 == 0
    back = cpio.read(blob)
    got = {e.name: e.data for e in back if stat.S_ISREG(e.mode)}
    assert got == d
    seen: set[str] = set()
    for e in back:  # every parent directory comes before its members
        parent = e.name.rsplit("/", 1)[0] if "/" in e.name else None
        assert parent is None or parent in seen
        seen.add(e.name)
    assert all(stat.S_IMODE(e.mode) == 0o640 for e in back if stat.S_ISREG(e.mode))


@given(files.map(_filter_prefixes), st.data())
@settings(max_examples=150)
def test_corruption_is_refused_or_changes_nothing_silently(d: dict[str, bytes], data) -> None:
    blob = bytearray(cpio.write(cpio.Entry.file(k, v) for k, v in d.items()))
    cut = data.draw(st.integers(0, len(blob) - 1))
    truncated = bytes(blob[:cut])
    try:
        back = cpio.read(truncated)
    except ImageFormatError:
        return
    # a cut exactly inside padding after the trailer's name can still parse; it must be whole
    assert {e.name: e.data for e in back if stat.S_ISREG(e.mode)} == d


def test_bad_magic_and_hex_are_named() -> None:
    blob = bytearray(cpio.write([cpio.Entry.file("a", b"x")]))
    bad = bytes(blob)
    with pytest.raises(ImageFormatError, match="not a cpio newc"):
        cpio.read(b"070707" + bad[6:])
    nonhex = bytearray(bad)
    nonhex[6:14] = b"ZZZZZZZZ"
    with pytest.raises(ImageFormatError, match="non-hex"):
        cpio.read(bytes(nonhex))


def test_names_must_stay_inside_the_archive() -> None:
    for bad in ("../etc/passwd", "a/../../b", "", "/"):
        with pytest.raises(ImageFormatError):
            cpio.write([cpio.Entry.file(bad, b"")])
    with pytest.raises(ImageFormatError, match="twice"):
        cpio.write([cpio.Entry.file("a", b""), cpio.Entry.file("a", b"")])


def test_gnu_cpio_reads_what_we_write(tmp_path) -> None:
    prereq.need(shutil.which("cpio") is not None, "GNU cpio not installed (apt-get install cpio)")
    blob = cpio.write(
        [
            cpio.Entry.file("dir/f", b"hello\n", 0o755),
            cpio.Entry.symlink("dir/link", "f"),
            cpio.Entry.directory("empty"),
        ]
    )
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=blob, cwd=tmp_path, check=True
    )
    assert (tmp_path / "dir" / "f").read_bytes() == b"hello\n"
    assert (tmp_path / "dir" / "f").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "dir" / "link").readlink().as_posix() == "f"
    assert (tmp_path / "empty").is_dir()


def test_a_negative_file_size_is_refused_not_walked_backwards() -> None:
    """int("-0000070", 16) is -112: the reader would step back to the same header forever."""
    head = b"070701" + b"00000001" + b"000081a4" + b"0" * 32 + b"-0000070" + b"0" * 32
    blob = head + b"00000002" + b"00000000" + b"a\0"
    with pytest.raises(ImageFormatError, match="non-hex"):
        cpio.read_concatenated(blob + bytes(-len(blob) % 4) + bytes(200))
