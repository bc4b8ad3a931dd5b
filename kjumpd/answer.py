"""The save kernel's answer: why B could not save, for A, in a page of A's memory.

The image header is B's usual channel back to A, but B can only write it once it has found
the image target. When it cannot (the target's disk has no driver in the save kernel, the
disk is gone) A sees an unchanged header and nothing else. So A lends B one locked page of
its own memory (kjumpd.daemon.answerpage), named in the job (``answer``: its physical
address and a nonce). B writes the page through /dev/mem before it jumps back; A reads it
through its own mapping.

A page can move while A waits for the jump (the kernel may migrate even locked pages), and
the job already names the old place. So B writes only over a page that still holds A's
*blank* record with this hibernation's nonce. A moved page's old frame is then either free
(B's write lands in free memory) or reused (the nonce is gone and B writes nothing); A finds
its own page still blank and falls back to what it knows.

Format (version 1), one page (PAGE bytes), little-endian::

    0   8  magic    b"KJANSWER"
    8   2  version  1
    10  2  state    0 blank (A's, waiting), 1 answered (B's)
    12 16  nonce    random bytes A chose for this hibernation
    28  4  length   bytes of text (0 when blank)
    32  4  crc      CRC-32 of bytes 0..31 and the text
    36  .. text     UTF-8 JSON {"what": str, "why": str, "fix": str}: B's KjumpError

The rest of the page is zero. A record that is not exactly this, or another hibernation's,
reads as no answer.

Standard library only: this runs in the save kernel's initramfs too.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

PAGE = 4096
MAGIC = b"KJANSWER"
VERSION = 1
NONCE_SIZE = 16
BLANK, ANSWERED = 0, 1
_HEAD = struct.Struct("<8sHH16sI")  # magic, version, state, nonce, length
_CRC = struct.Struct("<I")
TEXT_AT = _HEAD.size + _CRC.size
TEXT_MAX = PAGE - TEXT_AT
#: the most UTF-8 bytes of each of what/why/fix kept (less when JSON's escapes need room)
FIELD_MAX = 1300


@dataclass(frozen=True)
class Answer:
    what: str
    why: str = ""
    fix: str = ""


def _pack(nonce: bytes, state: int, text: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"an answer nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
    if len(text) > TEXT_MAX:
        raise ValueError(f"an answer's text is at most {TEXT_MAX} bytes, not {len(text)}")
    head = _HEAD.pack(MAGIC, VERSION, state, nonce, len(text))
    crc = zlib.crc32(text, zlib.crc32(head)) & 0xFFFFFFFF
    page = head + _CRC.pack(crc) + text
    return page + bytes(PAGE - len(page))


def blank(nonce: bytes) -> bytes:
    """The page A lends: waiting for an answer of this hibernation (``nonce``)."""
    return _pack(nonce, BLANK, b"")


def _cut(text: str, limit: int) -> str:
    raw = text.encode()
    return text if len(raw) <= limit else raw[:limit].decode(errors="ignore")


def answered(nonce: bytes, answer: Answer) -> bytes:
    """The page B writes: ``answer``, each field cut to what fits (FIELD_MAX bytes at most)."""
    limit = FIELD_MAX
    while True:
        body = {k: _cut(getattr(answer, k), limit) for k in ("what", "why", "fix")}
        text = json.dumps(body, ensure_ascii=False).encode()
        if len(text) <= TEXT_MAX:
            return _pack(nonce, ANSWERED, text)
        limit //= 2


def _parse(page: bytes) -> tuple[int, bytes, bytes] | None:
    """(state, nonce, text) of a well-formed record, else None."""
    if len(page) != PAGE:
        return None
    magic, version, state, nonce, length = _HEAD.unpack_from(page)
    if magic != MAGIC or version != VERSION or state not in (BLANK, ANSWERED):
        return None
    if length > TEXT_MAX or (state == BLANK) != (length == 0):
        return None
    text = page[TEXT_AT : TEXT_AT + length]
    (crc,) = _CRC.unpack_from(page, _HEAD.size)
    if crc != zlib.crc32(text, zlib.crc32(page[: _HEAD.size])) & 0xFFFFFFFF:
        return None
    if any(page[TEXT_AT + length :]):
        return None
    return state, nonce, text


def is_blank(page: bytes, nonce: bytes) -> bool:
    """Whether ``page`` is A's blank page for this hibernation: the only page B writes over."""
    got = _parse(page)
    return got is not None and got[0] == BLANK and got[1] == nonce


def read(page: bytes, nonce: bytes) -> Answer | None:
    """B's answer for this hibernation, or None (blank, another hibernation's, damaged)."""
    got = _parse(page)
    if got is None or got[0] != ANSWERED or got[1] != nonce:
        return None
    try:
        body = json.loads(got[2].decode())
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or not all(
        isinstance(body.get(k), str) for k in ("what", "why", "fix")
    ):
        return None
    return Answer(body["what"], body["why"], body["fix"])
