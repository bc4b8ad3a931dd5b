"""Bounded memory: the agent's peak RSS stays <= 64 MiB on an input far larger than that.

The input is a 768 MiB memory file, sparse-ish (holes read as zero pages) with random and
text-like regions spread over all of it; peak RSS is the agent's VmHWM (/proc/self/status) at its
end.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
LIMIT = 64 * MiB
SIZE = 768 * MiB


def peak_rss(args: list[str]) -> tuple[int, int, str]:
    """Exit code, the agent's own peak RSS (VmHWM it reports with --stats), stderr.

    Not wait4()'s ru_maxrss: that includes this (large) pytest process's memory, which the
    fork()ed child held until exec().
    """
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "kjumpd.agent.cli", *args, "--stats"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode:
        return r.returncode, 0, r.stderr
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["peak_rss"] > 4 * MiB  # a real figure was read (Python alone is more)
    return 0, stats["peak_rss"], r.stderr


def test_save_and_restore_peak_rss_is_bounded(tmp_path):
    try:
        _save_and_restore(tmp_path)
    finally:  # ~2 GB of files: do not leave them in pytest's kept temp dirs
        for p in tmp_path.iterdir():
            p.unlink()


def _save_and_restore(tmp_path):
    mem = tmp_path / "mem"
    rnd = random.Random(5)
    with open(mem, "wb") as f:
        f.truncate(SIZE)
        for off in range(0, SIZE, 8 * MiB):  # 1 MiB random + 1 MiB text every 8 MiB
            f.seek(off)
            f.write(rnd.randbytes(MiB))
            f.write((b"struct page %d " % off * 70000)[:MiB])
    img = tmp_path / "img"
    rc, rss, err = peak_rss(
        [
            "save",
            "--memory",
            str(mem),
            "--ranges",
            f"0-{SIZE}",
            "--target",
            str(img),
            "--target-size",
            str(400 * MiB),
        ]
    )
    assert rc == 0, err
    assert rss <= LIMIT, f"save peak RSS {rss / MiB:.1f} MiB > 64 MiB"
    out = tmp_path / "out"
    rc, rss_r, err = peak_rss(["restore", "--target", str(img), "--memory", str(out)])
    assert rc == 0, err
    assert rss_r <= LIMIT, f"restore peak RSS {rss_r / MiB:.1f} MiB > 64 MiB"
    # and the data really went through: compare a sample of regions
    with open(mem, "rb") as a, open(out, "rb") as b:
        for off in (0, 8 * MiB + 123 * 4096, SIZE - 9 * MiB, SIZE - 4096):
            a.seek(off)
            b.seek(off)
            assert a.read(2 * MiB) == b.read(2 * MiB)
    print(f"peak RSS: save {rss / MiB:.1f} MiB, restore {rss_r / MiB:.1f} MiB")
