"""`kjump-agent save/restore` and `kjumpctl image ...` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests import prereq

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def run(args, python=sys.executable, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [python, *args], capture_output=True, text=True, env=env, timeout=300, **kw
    )


def agent(*args, **kw):
    return run(["-m", "kjumpd.agent.cli", *args], **kw)


def ctl(*args):
    return run(["-c", "import sys; from kjumpd.cli import main; sys.exit(main())", *args])


def mixed(size, seed=3):
    rnd = random.Random(seed)
    out = bytearray()
    for i in range(size // 4096):
        r = rnd.random()
        out += (
            bytes(4096)
            if r < 0.4
            else rnd.randbytes(4096)
            if r < 0.7
            else (b"kernel text %d " % i * 400)[:4096]
        )
    return bytes(out)


@pytest.fixture
def mem(tmp_path):
    data = mixed(3 * MiB)
    p = tmp_path / "mem"
    p.write_bytes(data)
    return p, data


def test_save_restore_round_trip_keeps_other_bytes(tmp_path, mem):
    p, data = mem
    r = agent(
        "save",
        "--memory",
        str(p),
        "--ranges",
        "0x1000-0x9f000,1048576-0x2c0000",
        "--target",
        str(tmp_path / "img"),
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    out.write_bytes(b"\x55" * (3 * MiB))
    r = agent("restore", "--target", str(tmp_path / "img"), "--memory", str(out))
    assert r.returncode == 0, r.stderr
    got = out.read_bytes()
    assert got[0x1000:0x9F000] == data[0x1000:0x9F000]
    assert got[0x100000:0x2C0000] == data[0x100000:0x2C0000]
    assert got[:0x1000] == b"\x55" * 0x1000
    assert got[0x9F000:0x100000] == b"\x55" * (0x100000 - 0x9F000)
    assert got[0x2C0000:] == b"\x55" * (3 * MiB - 0x2C0000)


def test_restore_into_a_new_file(tmp_path, mem):
    p, data = mem
    assert (
        agent(
            "save", "--memory", str(p), "--ranges", "4096-8192", "--target", str(tmp_path / "img")
        ).returncode
        == 0
    )
    assert (
        agent(
            "restore", "--target", str(tmp_path / "img"), "--memory", str(tmp_path / "new")
        ).returncode
        == 0
    )
    assert (tmp_path / "new").read_bytes()[4096:8192] == data[4096:8192]


@pytest.mark.parametrize(
    "ranges,words",
    [
        ("0x2000-0x1000", "empty"),
        ("0-0x1000,0x800-0x3000", "overlap"),
        ("zz-0x1000", "bad number"),
        ("0x1000", "not START-END"),
        ("0-0x400000", "past the end"),
    ],
)
def test_bad_ranges_fail_with_one_line(tmp_path, mem, ranges, words):
    r = agent(
        "save", "--memory", str(mem[0]), "--ranges", ranges, "--target", str(tmp_path / "img")
    )
    assert r.returncode == 2  # a usage error, like argparse's own
    assert words in r.stderr
    usage, error = r.stderr.splitlines()
    assert usage.startswith("usage: kjump-agent") and error.startswith("kjump-agent: error: ")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "img").exists()  # refused before a target is created


def test_restore_refuses_a_non_image_and_a_missing_file(tmp_path, mem):
    r = agent("restore", "--target", str(mem[0]), "--memory", str(tmp_path / "out"))
    assert r.returncode == 1 and "not valid" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = agent("restore", "--target", str(tmp_path / "nope"), "--memory", str(tmp_path / "out"))
    assert r.returncode == 1 and "cannot open target" in r.stderr


def test_save_refuses_to_overwrite_a_non_target(tmp_path, mem):
    other = tmp_path / "precious"
    other.write_bytes(b"do not touch" * 100000)
    r = agent("save", "--memory", str(mem[0]), "--ranges", "0-4096", "--target", str(other))
    assert r.returncode == 1 and "not a kjumpd target" in r.stderr
    assert other.read_bytes() == b"do not touch" * 100000


def test_kjumpctl_image_info_verify_invalidate(tmp_path, mem):
    img = tmp_path / "img"
    assert (
        agent(
            "save", "--memory", str(mem[0]), "--ranges", "0-0x200000", "--target", str(img)
        ).returncode
        == 0
    )
    r = ctl("image", "info", str(img))
    assert r.returncode == 0 and "SAVED" in r.stdout and "0x000000200000" in r.stdout
    r = ctl("image", "info", str(img), "--json")
    d = json.loads(r.stdout)
    assert d["header"]["state"] == "SAVED" and d["extents"] == [[0, 0x200000]]
    assert d["header"]["raw_bytes"] == 0x200000 and d["header"]["zero_pages"] > 0
    r = ctl("image", "verify", str(img))
    assert r.returncode == 0 and "image OK" in r.stdout
    # corrupt one byte in the data area: verify names the chunk and exits 7
    off = d["header"]["data_offset"] + 100
    with open(img, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 1]))
    r = ctl("image", "verify", str(img))
    assert r.returncode == 7 and "chunk 0" in r.stderr and "Traceback" not in r.stderr
    r = ctl("image", "invalidate", str(img))
    assert r.returncode == 0
    r = ctl("image", "info", str(img), "--json")
    assert json.loads(r.stdout)["header"]["state_text"] == "INVALID(invalidated by kjumpctl)"
    r = agent("restore", "--target", str(img), "--memory", str(tmp_path / "o"))
    assert r.returncode == 1 and "INVALID" in r.stderr


def test_kjumpctl_image_info_shows_a_header_time_that_is_no_time(tmp_path):
    from kjumpd.image import store
    from kjumpd.image.device import ImageDevice

    img = tmp_path / "img"
    store.create_target(img, MiB)
    with ImageDevice(img, writable=True) as dev:
        store.update_header(dev, created=1e300, updated=float("nan"))
    r = ctl("image", "info", str(img))
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "1e+300 (not a time)" in r.stdout and "nan (not a time)" in r.stdout


def test_kjumpctl_image_on_a_non_image(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01" * MiB)
    r = ctl("image", "verify", str(junk))
    assert r.returncode == 7 and "magic" in r.stderr and "Traceback" not in r.stderr
    r = ctl("image", "info", str(junk), "--json")
    assert r.returncode == 7 and json.loads(r.stdout)["error"] == "ImageFormatError"


def test_pipeline_runs_on_debian_python_with_stdlib_and_lz4_only(tmp_path, mem):
    """The save kernel runs /usr/bin/python3 with python3-lz4 and nothing else."""
    py = "/usr/bin/python3"
    prereq.need(
        os.path.exists(py) and not run(["-c", "import lz4.block"], python=py).returncode,
        "/usr/bin/python3 with python3-lz4 (apt install python3-lz4)",
    )
    p, data = mem
    code = (
        "import sys\n"
        "from kjumpd.agent.cli import main\n"
        f"assert main(['save', '--memory', {str(p)!r}, '--ranges', '0-0x300000', "
        f"'--target', {str(tmp_path / 'img')!r}]) == 0\n"
        f"assert main(['restore', '--target', {str(tmp_path / 'img')!r}, '--memory', "
        f"{str(tmp_path / 'out')!r}]) == 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('psutil', 'pydbus', 'pyudev', 'gi', 'hypothesis'))\n"
        "assert not bad, bad\n"
        "import lz4; print(lz4.__version__)\n"
    )
    r = run(["-c", code], python=py)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == data


@pytest.mark.parametrize("cpus,workers", [(1, 4), (2, 8), (3, 8), (64, 8)])
def test_file_restore_workers_grow_with_cpus_but_stay_bounded(cpus, workers):
    """More writers than CPUs keep O_DIRECT writes in flight, but a big machine does not start
    a worker per core: each adds its buffers to the agent's peak RSS (bounded at 64 MiB)."""
    from kjumpd.agent.cli import restore_file_workers

    assert restore_file_workers(cpus) == workers


# -- hostile or careless input: a named error and its exit code, never a traceback or a hang --
def test_numbers_that_cannot_be_are_usage_errors(tmp_path):
    mem = tmp_path / "mem.bin"
    mem.write_bytes(bytes(1 << 20))
    for opt in (
        ["--workers=-1"],
        ["--workers", "0"],
        ["--chunk-size", "0"],
        ["--target-size", "-5"],
    ):
        r = agent(
            "save",
            "--memory",
            str(mem),
            "--ranges",
            "0-0x100000",
            "--target",
            str(tmp_path / "img"),
            *opt,
        )
        assert r.returncode == 2, (opt, r.stderr)
        assert "must be at least 1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "img").exists()


def test_a_directory_or_a_truncated_image_is_a_named_image_error(tmp_path):
    r = ctl("image", "info", str(tmp_path))
    assert r.returncode == 7, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Is a directory" in lines[0], r.stderr
    mem, img = tmp_path / "mem.bin", tmp_path / "img"
    mem.write_bytes(mixed(8 * MiB))
    assert (
        agent(
            "save", "--memory", str(mem), "--ranges", f"0-{8 * MiB}", "--target", str(img)
        ).returncode
        == 0
    )
    with open(img, "r+b") as f:
        f.truncate(f.seek(0, 2) // 3)
    for cmd in (["info"], ["verify"]):
        r = ctl("image", *cmd, str(img))
        assert r.returncode == 7, (cmd, r.stderr)
        assert "Traceback" not in r.stderr and "BufferError" not in r.stderr, r.stderr
        assert "internal error" not in r.stderr


def test_a_long_invalidation_reason_is_cut_and_the_image_invalidated(tmp_path):
    mem, img = tmp_path / "mem.bin", tmp_path / "img"
    mem.write_bytes(mixed(4 * MiB))
    assert (
        agent(
            "save", "--memory", str(mem), "--ranges", f"0-{4 * MiB}", "--target", str(img)
        ).returncode
        == 0
    )
    r = ctl("image", "invalidate", str(img), "--reason", "x" * 2048)
    assert r.returncode == 0, r.stderr
    r = ctl("image", "info", str(img), "--json")
    header = json.loads(r.stdout)["header"]
    assert header["state"] == "INVALID", header
    assert len(header["reason"]) == 400 and header["reason"].endswith("..."), header["reason"]


def test_encrypted_images_through_the_agent_and_kjumpctl(tmp_path, mem):
    """`kjump-agent save/restore --image-key` round-trips; `kjumpctl image info` says the
    image is encrypted and to which key; `image verify` opens it with the key file and its
    passphrase, and refuses a wrong passphrase with exit 7 and the reason."""
    from kjumpd.image import seal, store
    from kjumpd.image.device import ImageDevice
    from kjumpd.image.memfile import FileMemorySource
    from kjumpd.image.save import save_image

    p, data = mem
    key = seal.new_image_key()
    (tmp_path / "k").write_text(key.hex() + "\n")
    img = tmp_path / "img"
    r = agent(
        "save", "--memory", str(p), "--ranges", "0-0x300000", "--target", str(img),
        "--image-key", str(tmp_path / "k"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = agent("restore", "--target", str(img), "--memory", str(tmp_path / "out"))
    assert r.returncode == 1 and "encrypted" in r.stderr and not (tmp_path / "out").exists()
    r = agent(
        "restore", "--target", str(img), "--memory", str(tmp_path / "out"),
        "--image-key", str(tmp_path / "k"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes()[:0x300000] == data[:0x300000]
    # an image the daemon would save: the key sealed into the identity
    kf = seal.KeyFile.create("pw", n=1 << 10)
    (tmp_path / "key.json").write_text(kf.to_json())
    (tmp_path / "pw").write_text("pw\n")
    (tmp_path / "bad").write_text("nope\n")
    img2 = tmp_path / "img2"
    store.create_target(img2, 8 * MiB)
    with ImageDevice(img2, writable=True) as dev, FileMemorySource(p) as src:
        save_image(
            src, [(0, 0x100000)], dev, identity={"seal": seal.seal_key(kf.public, key)},
            mode="test", key=key,
        )  # fmt: skip
    r = ctl("image", "info", str(img2))
    assert f"encryption  AES-256-GCM, image key sealed to key {kf.key_id}" in r.stdout
    verify = ("image", "verify", str(img2), "--key", str(tmp_path / "key.json"))
    r = ctl(*verify, "--passphrase-file", str(tmp_path / "pw"))
    assert r.returncode == 0 and "image OK" in r.stdout, r.stderr
    r = ctl(*verify, "--passphrase-file", str(tmp_path / "bad"))
    assert r.returncode == 7 and "passphrase does not open" in r.stderr, r.stderr
    r = ctl("image", "info", str(img))
    assert "encryption  AES-256-GCM, image key sealed to key ?" in r.stdout
