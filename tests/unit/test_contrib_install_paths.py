"""The shipped systemd unit and D-Bus activation file start the kjumpd that `pip install`
puts on this system (Debian: /usr/local/bin), and the example config documents every table."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from kjumpd.daemon import config
from tests import prereq

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
# systemd.service(5): a bare command name is looked up in this fixed search path
SYSTEMD_SEARCH_PATH = (
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
)


def system_pip_scripts_dir() -> str:
    """Where `pip install .` as root with the system python puts console scripts."""
    py = shutil.which("python3", path="/usr/bin")
    prereq.need(py is not None, "no system python3 in /usr/bin")
    return subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_path('scripts'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_the_unit_finds_kjumpd_where_pip_or_a_package_installs_it() -> None:
    (start,) = re.findall(r"^ExecStart=(\S+)", (CONTRIB / "kjumpd.service").read_text(), re.M)
    if start.startswith("/"):
        assert str(Path(start).parent) == system_pip_scripts_dir()
    else:
        assert start == "kjumpd"
        assert system_pip_scripts_dir() in SYSTEMD_SEARCH_PATH and "/usr/bin" in SYSTEMD_SEARCH_PATH


def test_the_dbus_activation_file_execs_the_pip_installed_kjumpd() -> None:
    (exe,) = re.findall(r"^Exec=(\S+)", (CONTRIB / "org.kjump.Manager1.service").read_text(), re.M)
    assert exe.startswith("/")  # dbus-daemon needs an absolute path
    assert str(Path(exe).parent) == system_pip_scripts_dir() and Path(exe).name == "kjumpd"


def test_the_example_config_documents_authz_group() -> None:
    text = (CONTRIB / "kjumpd.toml").read_text()
    assert re.search(r"^\[authz\]$", text, re.M)
    assert re.search(r"^#?\s*group\s*=", text, re.M)
    # uncommenting the example gives a valid config that sets the group
    active = re.sub(r"^#\s*(group\s*=)", r"\1", text, flags=re.M)
    assert config.loads(active).authz_group != ""
