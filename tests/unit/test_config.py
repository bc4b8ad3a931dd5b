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
        ('[jump_area]\nstart = "0x1001"', "jump_area.start", "a multiple of 16M"),
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
    if n * mult > cfgmod.PHYS_LIMIT:
        n = cfgmod.PHYS_LIMIT // mult
    assert cfgmod.parse_size(f"{n}{suffix}", "k") == n * mult
    assert cfgmod.parse_size(cfgmod.format_size(n * mult), "k") == n * mult


@pytest.mark.parametrize("value, want", [('"auto"', -1), ('"300M"', 300 << 20), ("0", 0)])
def test_image_size_is_auto_by_default_a_size_or_off(value, want):
    assert cfgmod.Config().image_size == -1
    assert cfgmod.loads(f"[hibernate]\nimage_size = {value}\n").image_size == want
    with pytest.raises(ConfigError, match="image_size"):
        cfgmod.loads('[hibernate]\nimage_size = "half"\n')


# ---------------------------------------------------------------- physical ranges
OUT_OF_RANGE = [
    # (text, key, words the message must carry: the allowed range)
    ('[target]\nsize = "8192T"', "target.size", "at most 4096T"),
    ("[target]\nsize = 4503599627370497", "target.size", "at most 4096T"),
    ('[target]\nsize = "0x10000000000000000"', "target.size", "at most 4096T"),
    ('[target]\nsize = "4K"', "target.size", "at least 1M"),
    ('[hibernate]\nimage_size_limit = "99999T"', "hibernate.image_size_limit", "at most"),
    ('[hibernate]\nimage_size = "99999T"', "hibernate.image_size", "at most"),
    ('[jump_area]\nstart = "0x20000001"', "jump_area.start", "a multiple of 16M"),
    ('[jump_area]\nstart = "0x21000000"', "jump_area.start", None),  # aligned: accepted
    ('[jump_area]\nstart = "8192T"', "jump_area.start", "at most"),
    ('[jump_area]\nstart = "128T"', "jump_area.start", "from 0 to 64T"),
    ('[jump_area]\nstart = "64T"', "jump_area.start", "4-level paging"),
    (f'[jump_area]\nstart = "{(64 << 20) - 128}M"', "jump_area.start", None),
    ('[jump_area]\nsize = "64M"', "jump_area.size", "from 128M"),
    ('[jump_area]\nsize = "200000001"', "jump_area.size", "a multiple of 4K"),
    ('[jump_area]\nagent_memory = "1M"', "jump_area.agent_memory", "from 16M"),
    ('[jump_area]\nagent_memory = "50000000"', "jump_area.agent_memory", None),
    ('[jump_area]\nsize = "65T"', "jump_area.size", "to 64T"),
    ("[timeouts]\nkexec = 86401", "timeouts.kexec", "at most 86400"),
    ("[timeouts]\nkexec = 0", "timeouts.kexec", "above 0"),
    ("[timeouts]\nkexec = nan", "timeouts.kexec", "at most 86400"),
    ("[battery]\nrearm_min_seconds = 0.5", "battery.rearm_min_seconds", "from 1 to 86400"),
    ("[battery]\nrearm_min_seconds = 0", "battery.rearm_min_seconds", "from 1 to 86400"),
    ("[battery]\nfloor_percent = nan", "battery.floor_percent", "between 0 and 100"),
    ('[target]\npath = "/var/lib/../../etc/shadow"', "target.path", "without '..'"),
    ('[target]\npath = "/var/lib/kjumpd/.."', "target.path", "without '..'"),
    ('[save_kernel]\nkernel = "/boot/../x"', "save_kernel.kernel", "without '..'"),
    ('[hooks]\ndirs = ["/etc/kjumpd/../sleep.d"]', "hooks.dirs", "without '..'"),
    ('[save_kernel]\nkexec = "../bin/kexec"', "save_kernel.kexec", "absolute path"),
    ('[save_kernel]\nkexec = "/usr/../sbin/kexec"', "save_kernel.kexec", "without '..'"),
    ('[save_kernel]\nappend = "quiet\\nroot=/dev/sda"', "save_kernel.append", "one line"),
    ('[save_kernel]\nappend = "%s"' % ("x" * 2048), "save_kernel.append", "at most 2047"),
    ('[authz]\ngroup = "wheel users"', "authz.group", "a group name"),
    ('[quiesce]\nkeep_wakeup = [""]', "quiesce.keep_wakeup", "non-empty"),
    (
        '[quiesce]\nunbind = [{bus = "pci", device = "..", driver = "x"}]',
        "quiesce.unbind[0]",
        "plain names",
    ),
]


@pytest.mark.parametrize("text,key,form", OUT_OF_RANGE)
def test_values_outside_their_physical_range_are_refused(text, key, form):
    if form is None:
        cfgmod.loads(text)
        return
    with pytest.raises(ConfigError) as ei:
        cfgmod.loads(text)
    err = ei.value
    assert err.context["key"] == key and key in err.what, err.message
    assert form in err.message, err.message
    assert "got " in err.why or "would end" in err.why
    assert err.fix


def test_a_long_value_is_echoed_clipped():
    text = '[target]\npath = "relative/%s"' % ("a" * 100_000)
    with pytest.raises(ConfigError) as ei:
        cfgmod.loads(text)
    assert len(ei.value.message) < 400 and "100009 characters" in ei.value.why


@given(st.integers(0, (1 << 64) - 1))
def test_any_size_up_to_64_bits_is_either_in_range_or_named(n):
    text = f'[hibernate]\nimage_size_limit = "{n:#x}"\n'
    if n <= cfgmod.PHYS_LIMIT:
        assert cfgmod.loads(text).image_size_limit == n
    else:
        with pytest.raises(ConfigError, match="image_size_limit must be at most 4096T"):
            cfgmod.loads(text)


@given(st.integers(0, cfgmod.JUMP_AREA_END_MAX >> 12))
def test_jump_area_start_must_be_16m_aligned_and_end_below_64t(n):
    start = n << 12  # any page
    text = f'[jump_area]\nstart = "{start:#x}"\n'
    if start % (16 << 20) == 0 and start + (128 << 20) <= cfgmod.JUMP_AREA_END_MAX:
        assert cfgmod.loads(text).jump_area_start == start
    else:
        with pytest.raises(ConfigError, match="jump_area.start"):
            cfgmod.loads(text)


@given(st.lists(st.sampled_from(["a", "b", "..", ".", ""]), min_size=1, max_size=6))
def test_paths_with_a_dotdot_component_are_refused(parts):
    path = "/" + "/".join(parts)
    text = f'[target]\npath = "{path}"\n'
    if ".." in parts:
        with pytest.raises(ConfigError, match="without '..'"):
            cfgmod.loads(text)
    else:
        assert cfgmod.loads(text).target == path


def test_an_unknown_key_of_any_length_is_named_clipped():
    text = '[hibernate]\n"%s" = 1\n' % ("k\\n" * 10_000)
    with pytest.raises(ConfigError) as ei:
        cfgmod.loads(text)
    assert ei.value.what.startswith("unknown key hibernate.'k")
    assert len(ei.value.message) < 400 and "\n" not in ei.value.message


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
