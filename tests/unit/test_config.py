"""kjumpd.toml: defaults, every key converted, errors that name the key and the form."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.daemon import config as cfgmod
from kjumpd.errors import ConfigError

EXAMPLE = """
[target]
path = "/var/lib/kjumpd/image"
size = "8G"
[jump_area]
start = "0x20000000"
size = "192M"
agent_memory = "48M"
[hibernate]
mode = "suspend"
image_size_limit = "2G"
compression = "none"
chunk_size = "512K"
cancel_key = false
[save_kernel]
kernel = "/boot/kjump/bzImage"
initramfs = "/boot/kjump/initrd"
kernel_sha256 = "%s"
append = "console=tty0"
[quiesce]
disable_wakeup = true
keep_wakeup = ["PNP0C0C:00"]
runtime_pm_on = false
network_down = false
unbind = [{bus = "pci", device = "0000:00:1f.3", driver = "snd_hda_intel"}]
[hooks]
dirs = ["/etc/kjumpd/sleep.d"]
policy = "continue"
[timeouts]
hooks = 5
shrink = 2.5
[battery]
floor_percent = 7
rearm_min_seconds = 120
""" % ("ab" * 32)


def test_every_key_is_read():
    c = cfgmod.loads(EXAMPLE)
    assert c.target_size == 8 << 30 and c.jump_area_start == 0x20000000
    assert c.jump_area_size == 192 << 20 and c.agent_memory == 48 << 20
    assert c.mode == "suspend" and c.image_size_limit == 2 << 30 and c.compression == "none"
    assert c.chunk_size == 512 << 10 and c.cancel_key is False
    assert c.save_kernel == "/boot/kjump/bzImage" and c.save_kernel_sha256 == "ab" * 32
    assert c.keep_wakeup == ("PNP0C0C:00",) and not c.runtime_pm_on and not c.network_down
    assert c.unbind[0].driver == "snd_hda_intel" and c.hook_policy == "continue"
    assert c.timeout_hooks == 5.0 and c.timeout_shrink == 2.5
    assert c.battery_floor_percent == 7.0 and c.battery_rearm_min_seconds == 120


def test_the_shipped_example_is_valid():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "contrib/kjumpd.toml").read_text()
    c = cfgmod.loads(text)
    assert c.mode in cfgmod.MODES


def test_empty_file_gives_defaults():
    assert cfgmod.loads("") == cfgmod.Config()


@pytest.mark.parametrize(
    "text,key,form",
    [
        ('[hibernate]\nmode = "deep"', "hibernate.mode", "one of"),
        ('[target]\nsize = "eight gigs"', "target.size", "a size"),
        ('[target]\npath = "relative/path"', "target.path", "absolute path"),
        ('[hibernate]\nchunk_size = "3K"', "hibernate.chunk_size", "power of two"),
        ('[hibernate]\ncancel_key = "yes"', "hibernate.cancel_key", "true or false"),
        ('[save_kernel]\nkernel_sha256 = "xyz"', "save_kernel.kernel_sha256", "hex"),
        ('[hooks]\npolicy = "ignore"', "hooks.policy", '"abort" or "continue"'),
        ("[timeouts]\nhooks = -1", "timeouts.hooks", "seconds"),
        ("[battery]\nfloor_percent = 120", "battery.floor_percent", "percentage"),
        ('[quiesce]\nunbind = [{bus = "pci"}]', "quiesce.unbind[0]", "bus, device, driver"),
        ('[jump_area]\nstart = "0x1001"', "jump_area.start", "page aligned"),
        ('[hibernate]\nmood = "x"', "hibernate.mood", "unknown key"),
        ("[sleep]\nx = 1", "sleep", "unknown section"),
    ],
)
def test_errors_name_the_key_and_the_form(text, key, form):
    with pytest.raises(ConfigError) as ei:
        cfgmod.loads(text)
    msg = str(ei.value)
    assert key in msg and form in msg and ei.value.fix


def test_syntax_error_is_one_line():
    with pytest.raises(ConfigError) as ei:
        cfgmod.loads("[target\npath=")
    assert "not valid TOML" in str(ei.value) and "\n" not in ei.value.what


@given(st.integers(0, 1 << 50), st.sampled_from(["", "K", "M", "G", "T"]))
def test_sizes_round_trip(n, suffix):
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[suffix]
    assert cfgmod.parse_size(f"{n}{suffix}", "k") == n * mult
    assert cfgmod.parse_size(cfgmod.format_size(n * mult), "k") == n * mult


@pytest.mark.parametrize("value, want", [('"auto"', -1), ('"300M"', 300 << 20), ("0", 0)])
def test_image_size_is_auto_by_default_a_size_or_off(value, want):
    assert cfgmod.Config().image_size == -1
    assert cfgmod.loads(f"[hibernate]\nimage_size = {value}\n").image_size == want
    with pytest.raises(ConfigError, match="image_size"):
        cfgmod.loads('[hibernate]\nimage_size = "half"\n')


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 100_000,  # nested too deep
        "[target]\nsize = " + "9" * 5000,  # past int()'s 4300 digits, in TOML
        '[target]\nsize = "' + "9" * 5000 + '"',  # and as a size string
    ],
)
def test_absurd_toml_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        cfgmod.loads(text)
