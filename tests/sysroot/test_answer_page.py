"""The save kernel's answer page, each side on this machine: A's locked page found through
the real /proc/self/pagemap, and B's write through a file standing in for /dev/mem (the
same mmap code path B uses on A's memory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kjumpd import answer
from kjumpd.agent.kernel_role import leave_answer
from kjumpd.answer import Answer
from kjumpd.daemon.answerpage import AnswerPage
from kjumpd.sysroot import Sysroot
from tests import prereq
from tests.unit.test_job import make_job

SIZE = 8 << 20
RANGES = [(0x1000, 0x9F000), (0x100000, 0x7FF000)]
PAGE_AT = 0x200000
SAID = Answer(
    "the image target 1b4e28ba-2fa1-11d2-883f-0016d3cca427 is on none of this kernel's disks",
    "no kjumpd superblock with that UUID at byte 1048576 of any disk",
    "the save kernel needs the driver for the target's disk (kernel.fragment)",
)


@pytest.fixture
def b_root(tmp_path: Path) -> Sysroot:
    """B's view: its own RAM in /proc/iomem, A's memory in a /dev/mem file."""
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "mem").write_bytes(bytes(SIZE))
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "iomem").write_text(
        "00001000-0007ffff : System RAM\n00800000-00ffffff : System RAM\n"
    )
    return Sysroot(tmp_path)


def put(root: Sysroot, phys: int, data: bytes) -> None:
    with open(root.path("/dev/mem"), "r+b") as f:
        f.seek(phys)
        f.write(data)


def page(root: Sysroot, phys: int) -> bytes:
    with open(root.path("/dev/mem"), "rb") as f:
        f.seek(phys)
        return f.read(answer.PAGE)


def test_b_writes_its_answer_over_this_jobs_blank_page(b_root) -> None:
    nonce = os.urandom(16)
    put(b_root, PAGE_AT, answer.blank(nonce))
    job = make_job(ranges=RANGES, answer=(PAGE_AT, nonce.hex()))
    leave_answer(b_root, job, SAID)
    assert answer.read(page(b_root, PAGE_AT), nonce) == SAID


def test_b_leaves_alone_a_page_that_is_not_this_jobs_blank(b_root) -> None:
    """The page moved in A since the job was made: its old frame holds something else."""
    nonce = os.urandom(16)
    other = answer.blank(os.urandom(16))
    put(b_root, PAGE_AT, other)
    leave_answer(b_root, make_job(ranges=RANGES, answer=(PAGE_AT, nonce.hex())), SAID)
    assert page(b_root, PAGE_AT) == other
    busy = bytes(range(256)) * 16  # a frame reused for something else
    put(b_root, PAGE_AT, busy)
    leave_answer(b_root, make_job(ranges=RANGES, answer=(PAGE_AT, nonce.hex())), SAID)
    assert page(b_root, PAGE_AT) == busy


def test_b_never_writes_into_its_own_memory(b_root) -> None:
    nonce = os.urandom(16)
    at = 0x40000  # in B's own low memory, and in the job's ranges
    put(b_root, at, answer.blank(nonce))
    leave_answer(b_root, make_job(ranges=RANGES, answer=(at, nonce.hex())), SAID)
    assert answer.is_blank(page(b_root, at), nonce)


def test_a_job_without_an_answer_page_writes_nothing(b_root) -> None:
    leave_answer(b_root, make_job(ranges=RANGES), SAID)
    assert page(b_root, PAGE_AT) == bytes(answer.PAGE)


def test_a_finds_its_page_and_reads_what_lands_in_it() -> None:
    prereq.need(os.geteuid() == 0, "page frame numbers in /proc/self/pagemap need root")
    p = AnswerPage(Sysroot(Path("/")))
    try:
        phys, nonce_hex = p.job_field()
        assert phys > 0 and phys % answer.PAGE == 0
        p.reset()
        assert not p.moved and p.read() is None  # blank: B said nothing
        # what B's write through /dev/mem leaves in the frame, seen through A's mapping
        p.map[: answer.PAGE] = answer.answered(bytes.fromhex(nonce_hex), SAID)
        assert p.read() == SAID
        p.reset()  # the next jump starts blank
        assert p.read() is None
    finally:
        p.close()
