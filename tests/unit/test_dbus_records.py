"""Pure parts of the D-Bus API: records as D-Bus values (through the wire format), named
errors, CanHibernate reasons, and how kjumpctl turns replies into messages and exit codes."""

from __future__ import annotations

import io

import pytest
from gi.repository import GLib  # noqa: E402  (PyGObject is a dependency: no skip)
from hypothesis import given, settings
from hypothesis import strategies as st

from kjumpd.cli import daemon_cmds as dc  # noqa: E402
from kjumpd.cli import exit_code_for  # noqa: E402
from kjumpd.daemon.preflight import PreflightItem, PreflightReport  # noqa: E402
from kjumpd.daemon.service import (
    as_dbus_error,
    is_resume,
    is_success,
    outcome_record,  # noqa: E402
    preflight_reasons,
    to_vardict,
    to_variant,
)
from kjumpd.daemon.transaction import Outcome  # noqa: E402
from kjumpd.errors import (
    BusyError,
    CancelledError,
    ConfigError,
    ImageStateError,  # noqa: E402
    KjumpError,
    NotAuthorizedError,
    UnsupportedError,
)

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20)
scalar = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    text,
    st.floats(allow_nan=False, allow_infinity=False),
)
value = st.recursive(
    scalar,
    lambda inner: st.one_of(st.lists(text, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=12,
)


def wire(v: GLib.Variant) -> GLib.Variant:
    """Serialize as D-Bus does and parse back untrusted."""
    data = v.get_data_as_bytes()
    back = GLib.Variant.new_from_bytes(v.get_type(), data, False)
    assert back.is_normal_form()
    return back


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(text, value, max_size=6))
def test_records_survive_the_wire_as_a_sv(record) -> None:
    v = to_variant(record)
    assert v.get_type_string() in ("a{sv}", "a{sd}")
    assert wire(v).unpack() == record


def test_a_nul_in_a_string_is_escaped_not_a_truncation() -> None:
    v = wire(to_variant({"message": "bad\0tail", "k\0": ["a\0b"]}))
    assert v.unpack() == {"message": "bad\\x00tail", "k\\x00": ["a\\x00b"]}


def test_the_transactions_outcome_becomes_last_result() -> None:
    out = Outcome(
        result="resumed",
        mode="platform",
        image_state="CONSUMED",
        resumed=True,
        durations={"preflight": 0.1, "jump": 3.5},
        stats={"raw_bytes": 1 << 30, "frozen": ["/", "/home"]},
    )
    rec = outcome_record(out)
    vd = to_vardict(rec)
    assert vd["durations"].get_type_string() == "a{sd}"
    assert vd["resumed"].unpack() is True
    assert wire(GLib.Variant("a{sv}", vd)).unpack()["stats"]["frozen"] == ["/", "/home"]
    assert "error" not in vd  # None fields are left out, not sent as ""
    assert is_success(rec) and is_resume(rec)
    cont = outcome_record(Outcome(result="continued", mode="checkpoint"))
    assert is_success(cont) and not is_resume(cont)
    for bad in ("failed", "cancelled", "rolled-back"):
        assert not is_success({"result": bad})


def test_last_result_has_image_size_ratio_and_throughput_when_an_image_was_written() -> None:
    out = Outcome(
        result="continued",
        mode="test",
        durations={"load": 0.5, "jump": 0.7},
        stats={"raw_bytes": 800_000_000, "stored_bytes": 200_000_000, "save_seconds": 4.0},
    )
    rec = outcome_record(out)
    assert rec["image_size"] == 200_000_000
    assert rec["ratio"] == pytest.approx(4.0)
    assert rec["throughput"] == pytest.approx(200.0)  # MB/s over B's save, not the jump
    text = "\n".join(dc.describe_result({**rec, "finished": 0.0, "elapsed": 5.0}))
    assert "200,000,000 bytes" in text and "4.00" in text and "200.0 MB/s" in text
    bare = outcome_record(Outcome(result="rolled-back", mode="test"))
    assert not {"image_size", "ratio", "throughput"} & set(bare)


def test_dbus_errors_are_named_after_the_error_and_carry_its_message() -> None:
    e = BusyError("another transition is in progress", why="platform is in phase jump", fix="wait")
    d = as_dbus_error(e)
    assert type(d).__name__ == "org.kjump.Error.Busy"
    assert str(d) == e.message
    assert type(as_dbus_error(BusyError("x"))) is type(d)
    assert type(as_dbus_error(ConfigError("bad"))).__name__ == "org.kjump.Error.InvalidArgs"
    assert type(as_dbus_error(KjumpError("x"))).__name__ == "org.kjump.Error.Failed"


def test_can_hibernate_reasons_are_fatal_failures_with_their_fix() -> None:
    rep = PreflightReport(
        [
            PreflightItem("kernel", True, "CONFIG_KEXEC_JUMP=y"),
            PreflightItem("jump area", False, "no crashkernel=", "add crashkernel=128M@512M"),
            PreflightItem(
                "image size limit", False, "no init_on_free", "add init_on_free=1", fatal=False
            ),
            PreflightItem("target", False, "missing", ""),
        ]
    )
    assert preflight_reasons(rep) == [
        "jump area: no crashkernel= (fix: add crashkernel=128M@512M)",
        "target: missing",
    ]


@pytest.mark.parametrize(
    "name, code",
    [
        ("org.kjump.Error.Busy", 5),
        ("org.kjump.Error.NotAuthorized", 6),
        ("org.kjump.Error.NotSupported", 3),
        ("org.kjump.Error.InvalidArgs", 1),
        ("org.kjump.Error.Cancelled", 1),
        ("org.kjump.Error.Failed", 1),
        ("org.freedesktop.DBus.Error.ServiceUnknown", 4),
        ("org.freedesktop.DBus.Error.NameHasNoOwner", 4),
        ("org.freedesktop.DBus.Error.AccessDenied", 6),
        ("org.freedesktop.DBus.Error.Timeout", 1),
        # a freeze or a jump that did not happen is a failure, never "image invalid" (7)
        ("org.kjump.Error.TasksNotFrozen", 1),
        ("org.kjump.Error.JumpFailed", 1),
        ("org.kjump.Error.FreezeFailed", 1),
    ],
)
def test_kjumpctl_maps_dbus_errors_to_documented_exit_codes(name, code) -> None:
    err = dc.error_from_dbus(name, "what: why (fix: do this)")
    assert isinstance(err, KjumpError)
    assert exit_code_for(err) == code
    assert "what: why" in err.message


def test_a_failed_last_result_becomes_the_error_that_stopped_it() -> None:
    rec = {
        "result": "failed",
        "error": "org.kjump.Error.Failed",
        "error_class": "ImageStateError",
        "message": "the save kernel did not save an image (fix: see the console)",
    }
    err = dc.result_error(rec)
    assert isinstance(err, ImageStateError) and exit_code_for(err) == 7
    assert err.message == rec["message"]
    err = dc.result_error(
        {
            "result": "failed",
            "error": "org.kjump.Error.NotSupported",
            "error_class": "NoSuchClass",
            "message": "m",
        }
    )
    assert isinstance(err, UnsupportedError)
    err = dc.result_error({"result": "cancelled", "error_class": "CancelledError", "message": "c"})
    assert isinstance(err, CancelledError)
    assert dc.result_error({"result": "resumed"}) is None
    assert dc.result_error({"result": "continued"}) is None
    assert isinstance(dc.error_from_dbus("org.kjump.Error.NotAuthorized", "m"), NotAuthorizedError)


def test_a_freezer_failure_is_reported_as_itself() -> None:
    from kjumpd.errors import JumpError, TaskFreezeError

    rec = {
        "result": "failed",
        "error": "org.kjump.Error.TasksNotFrozen",
        "error_class": "TaskFreezeError",
        "message": "user space did not stop within 20 s: /sys/fs/cgroup/user.slice: pid 412 "
        "(sqlite3) state D wchan percpu_rwsem_wait (fix: ...)",
    }
    err = dc.result_error(rec)
    assert isinstance(err, TaskFreezeError) and exit_code_for(err) == 1
    assert "pid 412 (sqlite3)" in err.message
    err = dc.result_error(
        {
            "result": "failed",
            "error": "org.kjump.Error.JumpFailed",
            "error_class": "JumpError",
            "message": "m",
        }
    )
    assert isinstance(err, JumpError) and exit_code_for(err) == 1


def test_progress_is_a_bar_on_a_terminal_and_a_line_per_phase_otherwise() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    t = Tty()
    view = dc.ProgressView(t, width=10)
    view.update("save", 55.0)
    view.update("save", 150.0)
    view.end()
    assert "[#####.....]  55.0% save" in t.getvalue()
    assert "[##########] 100.0% save" in t.getvalue()
    assert t.getvalue().endswith("\n")
    p = io.StringIO()
    view = dc.ProgressView(p)
    for ph, pct in (("preflight", 0), ("freeze tasks", 28), ("freeze tasks", 29), ("jump", 50)):
        view.update(ph, pct)
    assert p.getvalue().splitlines() == [
        "kjumpctl: preflight (0%)",
        "kjumpctl: freeze tasks (28%)",
        "kjumpctl: jump (50%)",
    ]


def test_status_text_shows_the_last_result() -> None:
    lines = dc.describe_status(
        {
            "State": "idle",
            "Mode": "test",
            "Phase": "",
            "Progress": 100.0,
            "ImageState": "SAVED",
            "LastResult": {
                "mode": "test",
                "result": "continued",
                "finished": 0.0,
                "elapsed": 4.25,
                "durations": {"jump": 3.0},
                "throughput": 250.0,
            },
        }
    )
    text = "\n".join(lines)
    assert "state:     idle" in text and "image:     SAVED" in text
    assert "test: continued" in text and "4.2 s" in text and "jump 3.00 s" in text
    assert "250.0 MB/s" in text
    assert dc.describe_status({"State": "idle", "LastResult": {}})[-1].startswith("last:")
