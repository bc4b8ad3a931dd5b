"""Pages located through /proc/self/pagemap (root only: others see no frame numbers): the
job handed to a parked save kernel, in locked pages of the daemon, and the save kernel's
anchor page for its jump back."""

from __future__ import annotations

import os

from kjumpd.daemon import warm
from kjumpd.sysroot import Sysroot
from tests.prereq import need


def _locked_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    return 0


def test_the_jobs_pages_are_locked_located_and_wiped():
    need(os.geteuid() == 0, "root (pagemap shows frame numbers to CAP_SYS_ADMIN only)")
    data = os.urandom(3 * 4096 + 100)
    before = _locked_kib()
    box = warm.Mailbox(data, Sysroot())
    try:
        assert _locked_kib() - before >= 16  # four pages
        frames = box.frames()
        assert len(frames) == 4 and len(set(frames)) == 4 and all(frames)
        runs = box.runs()
        assert sum(n for _a, n in runs) == 4 * 4096
        assert bytes(box.map[: len(data)]) == data
    finally:
        view = box.map
        box.close()
    assert view.closed
    assert _locked_kib() == before


def test_the_jump_backs_anchor_is_one_locked_page_of_the_agent():
    need(os.geteuid() == 0, "root (pagemap shows frame numbers to CAP_SYS_ADMIN only)")
    from kjumpd.agent import jumpback

    jumpback._anchor.clear()
    try:
        seg = jumpback.anchor()
        assert seg.mem and seg.mem % 4096 == 0 and len(seg.data) == 4096
        assert jumpback.anchor() is seg  # one page for the agent's whole life
        assert _locked_kib() >= 4
    finally:
        jumpback._anchor.clear()
