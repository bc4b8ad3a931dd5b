"""A kjumpd killed between quiescing devices and undoing it: the next start (or
``kjumpd --recover``) puts every device setting back, and leaves a living owner's alone."""

from __future__ import annotations

import json
import os

from kjumpd.daemon import quiesce
from kjumpd.daemon.quiesce import JOURNAL, Journal, Write
from kjumpd.sysroot import Sysroot


def _device(root, name: str, value: str) -> str:
    path = f"/sys/devices/pci0000:00/{name}/power/control"
    (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (root / path.lstrip("/")).write_text(value)
    return path


def test_a_dead_owners_writes_are_undone_in_reverse(tmp_path) -> None:
    sr = Sysroot(str(tmp_path))
    (tmp_path / "proc").mkdir()
    a = _device(tmp_path, "0000:00:02.0", "on")
    b = _device(tmp_path, "0000:00:03.0", "on")
    j = Journal(sr)
    for path in (a, b):
        sr.write_text(path, "auto")
        j.record(Write(path, "auto", path, "on", "runtime PM"))
    # the owner is gone: rewrite the header as a pid that does not exist in this sysroot
    lines = (tmp_path / JOURNAL.lstrip("/")).read_text().splitlines()
    assert json.loads(lines[0]) == {"owner": os.getpid()}
    lines[0] = json.dumps({"owner": 999999})
    lines.insert(2, "not json")
    lines.append(
        json.dumps(
            {
                "path": "/x",
                "value": "1",
                "undo_path": "/etc/passwd",
                "undo_value": "pwned",
                "why": "hostile",
            }
        )
    )
    (tmp_path / JOURNAL.lstrip("/")).write_text("\n".join(lines) + "\n")
    assert quiesce.recover(sr) == []
    assert sr.read_text(a) == "on" and sr.read_text(b) == "on"
    assert not (tmp_path / JOURNAL.lstrip("/")).exists()
    assert not (tmp_path / "etc/passwd").exists()  # a write outside /sys is never made
    assert quiesce.recover(sr) == []  # nothing left: nothing to do


def test_a_living_owners_journal_is_left_to_it(tmp_path) -> None:
    sr = Sysroot(str(tmp_path))
    a = _device(tmp_path, "0000:00:02.0", "auto")
    stat = tmp_path / "proc/4242/stat"
    stat.parent.mkdir(parents=True)
    stat.write_text("4242 (kjumpd) S 1 4242 4242 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0\n")
    (tmp_path / JOURNAL.lstrip("/")).parent.mkdir(parents=True)
    (tmp_path / JOURNAL.lstrip("/")).write_text(
        json.dumps({"owner": 4242})
        + "\n"
        + json.dumps(
            {"path": a, "value": "auto", "undo_path": a, "undo_value": "on", "why": "runtime PM"}
        )
        + "\n"
    )
    assert quiesce.recover(sr) == []
    assert sr.read_text(a) == "auto"  # still the owner's to undo
    assert (tmp_path / JOURNAL.lstrip("/")).exists()
