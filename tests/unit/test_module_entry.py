"""`python -m kjumpd.cli` and `python -m kjumpd` run kjumpctl and the daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def py_m(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd="/",
        timeout=120,
    )


def test_python_m_kjumpd_cli_is_kjumpctl() -> None:
    r = py_m("kjumpd.cli", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: kjumpctl") and "setup" in r.stdout


def test_python_m_kjumpd_cli_reports_errors_like_kjumpctl(tmp_path: Path) -> None:
    r = py_m(
        "kjumpd.cli",
        "--sysroot",
        str(tmp_path),
        "check",
        "--config",
        str(tmp_path),  # a directory: unreadable (a missing file is a usage error, exit 2)
    )
    assert r.returncode == 1 and r.stderr.startswith("kjumpctl: cannot read")
    assert "Traceback" not in r.stderr


def test_python_m_kjumpd_is_the_daemon() -> None:
    r = py_m("kjumpd", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: kjumpd") and "--sysroot" in r.stdout


def test_kjumpctl_starts_without_the_config_module() -> None:
    # kjumpctl hibernate is on the hibernate latency path: building the parser (every
    # command) must not pull kjumpd.daemon.config (tomllib, dataclasses, inspect): ~0.5 s in a TCG
    # guest. The modes it offers are still the config's.
    code = (
        "import sys, kjumpd.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('kjumpd.daemon.config', 'dataclasses', 'tomllib', 'pathlib') "
        "if m in sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd="/",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    from kjumpd.daemon.config import MODES

    r = py_m("kjumpd.cli", "hibernate", "--help")
    assert "{" + ",".join(MODES) + "}" in r.stdout.replace("\n", "").replace(" ", "")
