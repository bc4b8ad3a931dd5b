"""kjumpctl's plain-socket D-Bus client against GLib's own marshalling (GDBusMessage)."""

from __future__ import annotations

import pytest
from gi.repository import Gio, GLib  # noqa: E402  (PyGObject is a dependency: no skip)
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.cli import busclient

RECORD = {
    "result": GLib.Variant("s", "resumed"),
    "resumed": GLib.Variant("b", True),
    "elapsed": GLib.Variant("d", 48.4),
    "image_size": GLib.Variant("x", 265524986),
    "durations": GLib.Variant("a{sd}", {"preflight": 0.3, "quiesce": 1.07}),
    "stats": GLib.Variant(
        "a{sv}",
        {
            "frozen": GLib.Variant("as", ["/", "/home"]),
            "big": GLib.Variant("t", 2**63 + 5),
            "mixed": GLib.Variant("av", [GLib.Variant("i", -3), GLib.Variant("y", 7)]),
            "empty": GLib.Variant("a{sv}", {}),
        },
    ),
}


def _glib_blob(order: Gio.DBusMessageByteOrder) -> bytes:
    m = Gio.DBusMessage.new_signal(
        "/org/kjump/Manager1", "org.freedesktop.DBus.Properties", "PropertiesChanged"
    )
    m.set_serial(7)
    m.set_byte_order(order)
    m.set_body(
        GLib.Variant(
            "(sa{sv}as)",
            (
                "org.kjump.Manager1",
                {"State": GLib.Variant("s", "idle"), "LastResult": GLib.Variant("a{sv}", RECORD)},
                ["Phase"],
            ),
        )
    )
    return bytes(m.to_blob(Gio.DBusCapabilityFlags.NONE))


@pytest.mark.parametrize("order", ["LITTLE_ENDIAN", "BIG_ENDIAN"])
def test_a_signal_glib_wrote_reads_as_glib_unpacks_it(order):
    blob = _glib_blob(getattr(Gio.DBusMessageByteOrder, order))
    assert busclient.message_length(blob[:16]) == len(blob)
    m = busclient.decode(blob)
    assert (m.type, m.serial, m.path, m.interface, m.member) == (
        busclient.SIGNAL,
        7,
        "/org/kjump/Manager1",
        "org.freedesktop.DBus.Properties",
        "PropertiesChanged",
    )
    iface, changed, invalidated = m.body
    assert iface == "org.kjump.Manager1" and invalidated == ["Phase"]
    assert changed["State"] == "idle"
    assert changed["LastResult"] == GLib.Variant("a{sv}", RECORD).unpack()


def test_a_call_we_write_is_what_glib_reads():
    blob = busclient.encode(
        busclient.CALL,
        3,
        [
            (1, "o", "/org/kjump/Manager1"),
            (2, "s", "org.kjump.Manager1"),
            (3, "s", "Hibernate"),
            (6, "s", "org.kjump.Manager1"),
        ],
        "s",
        ("shutdown",),
        busclient.ALLOW_INTERACTIVE_AUTHORIZATION,
    )
    m = Gio.DBusMessage.new_from_blob(blob, Gio.DBusCapabilityFlags.NONE)
    assert m.get_message_type() == Gio.DBusMessageType.METHOD_CALL
    assert (m.get_path(), m.get_interface(), m.get_member(), m.get_destination()) == (
        "/org/kjump/Manager1",
        "org.kjump.Manager1",
        "Hibernate",
        "org.kjump.Manager1",
    )
    assert m.get_serial() == 3 and m.get_body().unpack() == ("shutdown",)
    assert m.get_flags() & Gio.DBusMessageFlags.ALLOW_INTERACTIVE_AUTHORIZATION


@given(
    st.lists(
        st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",))),
        max_size=4,
    ),
    st.dictionaries(st.text(alphabet="abcxyz", min_size=1), st.floats(allow_nan=False), max_size=4),
)
def test_our_messages_read_back(words, durations):
    sig = "as" + "a{sd}" + "s" * len(words)
    blob = busclient.encode(
        busclient.SIGNAL,
        1,
        [(1, "o", "/x"), (2, "s", "a.b"), (3, "s", "C")],
        sig,
        (words, durations, *words),
    )
    assert busclient.decode(blob).body == (words, durations, *words)
    via_glib = Gio.DBusMessage.new_from_blob(blob, Gio.DBusCapabilityFlags.NONE)
    assert via_glib.get_body().unpack() == (words, durations, *words)


def test_addresses_and_signatures():
    assert busclient.socket_addresses(
        "tcp:host=x;unix:path=/run/a%20b,guid=1;unix:abstract=/tmp/dbus-x"
    ) == ["/run/a b", "\0/tmp/dbus-x"]
    assert busclient.split_types("sa{sv}as(id)v") == ["s", "a{sv}", "as", "(id)", "v"]
    with pytest.raises(busclient.BusError):
        busclient.split_types("a{sv")
    with pytest.raises(busclient.BusError):
        busclient.decode(b"Z" + bytes(15))
