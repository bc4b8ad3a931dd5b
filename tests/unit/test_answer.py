"""The save kernel's answer page (kjumpd.answer): what B writes reads back as written, B
writes only over this hibernation's blank page, and any damage reads as no answer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kjumpd import answer
from kjumpd.answer import Answer

nonces = st.binary(min_size=answer.NONCE_SIZE, max_size=answer.NONCE_SIZE)
texts = st.text(max_size=3000)


@given(nonces, texts, texts, texts)
@settings(max_examples=200)
def test_an_answer_reads_back_as_written_cut_to_the_page(nonce, what, why, fix):
    page = answer.answered(nonce, Answer(what, why, fix))
    assert len(page) == answer.PAGE
    got = answer.read(page, nonce)
    assert got is not None
    for said, wrote in ((got.what, what), (got.why, why), (got.fix, fix)):
        assert wrote.startswith(said)  # whole, or cut
        assert said == wrote or len(said.encode()) <= answer.FIELD_MAX


def test_short_answers_are_kept_whole():
    nonce = bytes(range(16))
    said = Answer(
        "the image target 1234 is on none of this kernel's disks",
        "no kjumpd superblock with that UUID at byte 4096 of vda",
        "the save kernel needs the driver for the target's disk",
    )
    assert answer.read(answer.answered(nonce, said), nonce) == said


@given(nonces, nonces)
def test_another_hibernations_page_is_neither_blank_nor_an_answer(nonce, other):
    if nonce == other:
        return
    assert not answer.is_blank(answer.blank(other), nonce)
    assert answer.read(answer.answered(other, Answer("x")), nonce) is None


@given(nonces)
def test_the_blank_page_is_blank_and_no_answer(nonce):
    page = answer.blank(nonce)
    assert answer.is_blank(page, nonce)
    assert answer.read(page, nonce) is None
    # an answered page is not blank: B never writes over an answer
    assert not answer.is_blank(answer.answered(nonce, Answer("x")), nonce)


@given(nonces, st.data())
@settings(max_examples=300)
def test_any_damaged_byte_reads_as_no_answer_and_not_blank(nonce, data):
    for page in (answer.answered(nonce, Answer("what", "why", "fix")), answer.blank(nonce)):
        at = data.draw(st.integers(0, answer.PAGE - 1))
        flip = data.draw(st.integers(1, 255))
        bad = bytearray(page)
        bad[at] ^= flip
        assert answer.read(bytes(bad), nonce) is None
        assert not answer.is_blank(bytes(bad), nonce)


def test_a_page_of_another_size_or_zeros_is_nothing():
    nonce = bytes(16)
    assert answer.read(bytes(answer.PAGE), nonce) is None
    assert not answer.is_blank(bytes(answer.PAGE), nonce)
    assert answer.read(answer.blank(nonce)[:-1], nonce) is None


def test_a_record_whose_text_is_not_an_answer_object_is_no_answer():
    nonce = bytes(16)
    page = answer._pack(nonce, answer.ANSWERED, b'["not", "an", "object"]')
    assert answer.read(page, nonce) is None
    page = answer._pack(nonce, answer.ANSWERED, b'{"what": 1, "why": "", "fix": ""}')
    assert answer.read(page, nonce) is None


def test_a_nonce_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError):
        answer.blank(bytes(8))
