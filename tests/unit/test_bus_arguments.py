"""Arguments from the bus are checked for type, length and content before anything logs,
compares or echoes them; a refusal is InvalidArgs quoting a bounded part of the argument."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.daemon.service import (
    INTERFACE,
    INTROSPECTION,
    bus_string,
    dbus_error_name,
)
from kjumpd.errors import ECHO_LIMIT, ConfigError
from kjumpd.modes import MODES


def test_a_known_value_passes():
    assert bus_string("mode", "test", allowed=MODES) == "test"


@pytest.mark.parametrize(
    "value, words",
    [
        ("warp" * 25_000, "too long"),
        ("test\n2026-12-03 kjumpd: forged log line", "control characters"),
        ("\x1b[2Jtest", "control characters"),
        ("deep", "unknown mode"),
        (42, "must be a string"),
    ],
)
def test_a_bad_argument_is_invalid_args_with_a_bounded_echo(value, words):
    with pytest.raises(ConfigError) as ei:
        bus_string("mode", value, allowed=MODES, limit=ECHO_LIMIT)
    err = ei.value
    assert dbus_error_name(err) == "org.kjump.Error.InvalidArgs"
    assert words in err.message and "mode" in err.what and err.fix
    assert len(err.message) < 400
    assert "\n" not in err.message and "\x1b" not in err.message


@given(st.text(max_size=2000))
def test_any_string_is_either_allowed_or_refused_with_a_short_message(value):
    try:
        assert bus_string("mode", value, allowed=MODES, limit=ECHO_LIMIT) in MODES
    except ConfigError as e:
        assert len(e.message) < 400 and e.message.isprintable()


def test_every_in_argument_is_a_checked_string():
    # the interface takes only strings (a dict or an array would need its own bounds)
    in_args = re.findall(r'<arg direction="in" type="([^"]+)" name="(\w+)"', INTROSPECTION)
    assert in_args == [("s", "mode")]
    with pytest.raises(ConfigError, match="unknown interface"):
        bus_string("interface", INTERFACE + ".Evil", allowed=(INTERFACE,))
