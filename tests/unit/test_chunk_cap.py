"""Image chunks are at most 1 MiB wherever a chunk size is chosen or accepted: larger chunks
push the save agent past its 64 MiB RSS bound (4 MiB chunks measured 64-67 MiB)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kjumpd.daemon import config
from kjumpd.errors import ConfigError
from kjumpd.job import MAX_CHUNK_SIZE

REPO = Path(__file__).resolve().parents[2]


def test_the_cap_is_one_mebibyte() -> None:
    assert MAX_CHUNK_SIZE == 1 << 20


@pytest.mark.parametrize("value", ['"2M"', '"4M"', '"64M"'])
def test_config_refuses_chunks_above_1m_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.loads(f"[hibernate]\nchunk_size = {value}\n")
    assert "hibernate.chunk_size" in str(e.value) and "1M" in str(e.value)


@pytest.mark.parametrize("value,size", [('"1M"', 1 << 20), ('"256K"', 256 << 10)])
def test_config_accepts_chunks_up_to_1m(value: str, size: int) -> None:
    assert config.loads(f"[hibernate]\nchunk_size = {value}\n").chunk_size == size


def test_the_save_agent_never_uses_chunks_above_1m() -> None:
    """A job from an older daemon may ask for 4 MiB: B saves with 1 MiB chunks instead."""
    from kjumpd.agent.kernel_role import bounded_chunk_size

    assert bounded_chunk_size(4 << 20, 2 << 30, 8) == 1 << 20
    assert bounded_chunk_size(64 << 20, 2 << 30, 1) == 1 << 20
    assert bounded_chunk_size(256 << 10, 2 << 30, 8) == 256 << 10  # smaller: unchanged


def test_agent_cli_refuses_chunk_size_above_1m(tmp_path: Path) -> None:
    mem = tmp_path / "mem"
    mem.write_bytes(bytes(1 << 20))
    target = tmp_path / "img"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kjumpd.agent.cli",
            "save",
            "--memory",
            str(mem),
            "--ranges",
            "0-0x100000",
            "--target",
            str(target),
            "--chunk-size",
            str(4 << 20),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "--chunk-size" in r.stderr and "Traceback" not in r.stderr
    assert not target.exists()  # refused before anything was written
