"""A bad option, argument or combination is exit code 2 with a usage message, for kjumpctl,
kjumpd and kjump-agent alike: argparse's own errors and the checks made after parsing."""

import subprocess
import sys
from pathlib import Path

import pytest

from kjumpd.agent import cli as agent_cli
from kjumpd.cli import main as kjumpctl_main

REPO = Path(__file__).resolve().parents[2]


def code(main, argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


KJUMPCTL = [
    ["--bogus"],
    [],
    ["--sysroot", "/nonexistent-kjump-root", "check"],
    ["setup"],
    ["setup", "--size", "eight gigs"],
    ["setup", "--size", "99999T"],
    ["setup", "--target", "/var/lib/kjumpd/image"],  # a file target needs a size
    ["check", "--config", "/nonexistent-kjump.toml"],
    ["plan", "--config", "/nonexistent-kjump.toml"],
    ["image", "info", "img", "--offset", "-1"],
    ["image", "verify", "img", "--offset", "zz"],
    ["image"],
    ["hibernate", "--mode", "deep"],
    ["status", "extra"],
]


@pytest.mark.parametrize("argv", KJUMPCTL, ids=" ".join)
def test_kjumpctl_usage_errors_exit_2(root, capsys, argv):
    argv = [a.replace("img", str(root / "img")) for a in argv]
    if "--sysroot" not in argv:
        argv = ["--sysroot", str(root), *argv]
    assert code(kjumpctl_main, argv) == 2
    assert list(root.iterdir()) == []  # refused before anything was made
    cap = capsys.readouterr()
    assert "usage: kjumpctl" in cap.err + cap.out and "Traceback" not in cap.err


def test_kjumpctl_setup_needs_something_names_the_options(root, capsys):
    assert code(kjumpctl_main, ["--sysroot", str(root), "setup"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: kjumpctl") and "--jump-area" in err


def test_kjumpctl_a_failure_is_still_exit_1(root, capsys):
    """Not everything is a usage error: a valid command that fails stays 1."""
    cfg = root / "bad.toml"
    cfg.write_text('[hibernate]\nmode = "deep"\n')
    assert code(kjumpctl_main, ["--sysroot", str(root), "check", "--config", str(cfg)]) == 1


@pytest.fixture
def mem(tmp_path):
    p = tmp_path / "mem"
    p.write_bytes(bytes(1 << 20))
    return p


AGENT = [
    ["--bogus"],
    [],
    ["save", "--memory", "mem", "--ranges", "0-4096", "--target", "t", "--workers", "0"],
    ["save", "--memory", "mem", "--ranges", "0-4096", "--target", "t", "--chunk-size", "5000"],
    ["save", "--memory", "mem", "--ranges", "0-4096", "--target", "t", "--chunk-size", "2M"],
    ["save", "--memory", "mem", "--ranges", "4096-0", "--target", "t"],
    ["save", "--memory", "mem", "--ranges", "0-0x200000", "--target", "t"],
    ["save", "--memory", "mem", "--ranges", "0-4096", "--target", "t", "--compression", "xz"],
    ["restore", "--target", "t"],
]


@pytest.mark.parametrize("argv", AGENT, ids=" ".join)
def test_agent_usage_errors_exit_2(tmp_path, mem, capsys, argv):
    argv = [{"mem": str(mem), "t": str(tmp_path / "t"), "2M": str(2 << 20)}.get(a, a) for a in argv]
    assert code(agent_cli.main, argv) == 2
    err = capsys.readouterr().err
    assert "usage: kjump-agent" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()  # refused before a target is created


def kjumpd(*args):
    return subprocess.run(
        [sys.executable, "-m", "kjumpd.daemon.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


KJUMPD = [
    ["--bogus"],
    ["--stop-timeout", "nan"],
    ["--stop-timeout", "-1"],
    ["--log-level", "loud"],
    ["--sysroot", "/nonexistent-kjump-root"],
    ["--config", "/nonexistent-kjump.toml"],
]


@pytest.mark.parametrize("argv", KJUMPD, ids=" ".join)
def test_kjumpd_usage_errors_exit_2(root, argv):
    if "--sysroot" not in argv:
        argv = ["--sysroot", str(root), *argv]
    r = kjumpd(*argv, "--bus", "unix:path=/nonexistent-kjump-bus")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("usage: kjumpd") and "Traceback" not in r.stderr
