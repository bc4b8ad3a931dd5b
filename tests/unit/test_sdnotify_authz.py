"""sd_notify datagrams, the journald line format, and the local authorization rule."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kjumpd.daemon import authz, sdnotify
from kjumpd.daemon import main as daemon
from kjumpd.errors import ConfigError


@given(
    st.dictionaries(
        st.from_regex(r"[A-Z_]{1,12}", fullmatch=True),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
        min_size=1,
        max_size=5,
    )
)
def test_a_message_is_one_assignment_per_line(fields) -> None:
    msg = sdnotify.format_message(fields).decode()
    assert msg.endswith("\n")
    lines = msg[:-1].split("\n")  # the receiver splits on newlines only
    assert lines == [f"{k}={v.replace(chr(10), ' ')}" for k, v in fields.items()]


def test_abstract_socket_names() -> None:
    assert sdnotify.socket_address("@kjumpd/notify") == b"\0kjumpd/notify"
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"


@pytest.mark.parametrize(
    "env, interval",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_pid(env, interval) -> None:
    assert sdnotify.watchdog_interval(env, os.getpid()) == interval


def test_notifier_sends_datagrams_and_is_a_no_op_without_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    rx.settimeout(5)
    n = sdnotify.Notifier({"NOTIFY_SOCKET": str(path)})
    assert n.ready("idle; image EMPTY")
    assert rx.recv(4096) == b"READY=1\nSTATUS=idle; image EMPTY\n"
    assert n.ping() and rx.recv(4096) == b"WATCHDOG=1\n"
    assert n.stopping() and rx.recv(4096) == b"STOPPING=1\n"
    n.close()
    rx.close()
    off = sdnotify.Notifier({})
    assert not off.enabled and not off.ready("x") and not off.ping()
    gone = sdnotify.Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.ready() is False  # a warning in the log, never an exception


def test_journal_lines_have_a_priority_per_line() -> None:
    f = daemon.JournalFormatter("%(name)s: %(message)s")
    rec = logging.LogRecord("kjumpd", logging.WARNING, __file__, 1, "two\nlines", (), None)
    assert f.format(rec) == "<4>kjumpd: two\n<4>lines"
    assert [
        daemon.journal_priority(ln)
        for ln in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
    ] == [7, 6, 4, 3, 2]


def test_journal_stream_must_name_our_stderr(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as f, open(tmp_path / "other", "w") as g:
        st_ = os.fstat(f.fileno())
        other = os.fstat(g.fileno())
        assert daemon.stderr_is_journal(f, {"JOURNAL_STREAM": f"{st_.st_dev}:{st_.st_ino}"})
        assert not daemon.stderr_is_journal(f, {"JOURNAL_STREAM": f"{other.st_dev}:{other.st_ino}"})
        assert not daemon.stderr_is_journal(f, {"JOURNAL_STREAM": "garbage"})
        assert not daemon.stderr_is_journal(f, {})


def test_root_and_the_configured_group_may_others_may_not() -> None:
    root = authz.Caller(":1.1", 0)
    member = authz.Caller(":1.2", 1000, (100, 2001))
    other = authz.Caller(":1.3", 1001, (100,))
    assert authz.local_decision(root, authz.ACTION_HIBERNATE, None).allowed
    assert authz.local_decision(member, authz.ACTION_HIBERNATE, 2001).allowed
    assert not authz.local_decision(member, authz.ACTION_HIBERNATE, None).allowed
    d = authz.local_decision(other, authz.ACTION_CHECKPOINT, 2001)
    assert not d.allowed and "uid 1001" in d.reason and authz.ACTION_CHECKPOINT in d.reason
    assert "2001" in d.details["fix"] or "group" in d.details["fix"]


def test_an_unknown_group_is_a_config_error_naming_the_key() -> None:
    assert authz.resolve_group(None) is None
    assert authz.resolve_group("root") == 0
    with pytest.raises(ConfigError) as e:
        authz.resolve_group("no-such-group-kjumpd")
    assert "no-such-group-kjumpd" in e.value.message and e.value.fix


def test_a_receiver_that_does_not_read_never_blocks_the_daemon(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    n = sdnotify.Notifier({"NOTIFY_SOCKET": str(path)})
    sent = [n.status(f"state {i}") for i in range(2000)]  # far beyond the queue length
    assert sent[0] is True and sent[-1] is False
    n.close()
    rx.close()
