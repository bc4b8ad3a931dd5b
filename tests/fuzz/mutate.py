"""A small seeded mutator: the inputs of the bounded sample in ``make test`` (no atheris), and
of ``make fuzz`` where atheris is not installed (then without coverage guidance).

Bit flips, interesting integers, byte runs inserted, deleted, repeated or truncated, and
splices of two seeds; a target's ``fix`` then recomputes its own checksums most of the time.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

from tests.fuzz.targets import Target

_INTERESTING = [
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0xFFFF,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    1 << 32,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
    4096,
    4095,
    65536,
]


def mutate(rnd: random.Random, data: bytes, seeds: list[bytes], max_len: int) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.choice((1, 1, 2, 3, 5))):
        op = rnd.randrange(9)
        pos = rnd.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rnd.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rnd.randrange(256)
        elif op == 2:
            width, kind = rnd.choice(
                ((1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q"), (4, ">I"), (8, ">Q"))
            )
            v = rnd.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
            buf[pos : pos + width] = struct.pack(kind, v)
        elif op == 3:
            buf[pos:pos] = rnd.randbytes(rnd.choice((1, 2, 4, 8, 64)))
        elif op == 4:
            del buf[pos : pos + rnd.choice((1, 4, 16, 256, 4096))]
        elif op == 5:
            del buf[pos:]
        elif op == 6 and buf:
            a = rnd.randrange(len(buf))
            piece = buf[a : a + rnd.choice((1, 8, 64, 512))]
            buf[pos:pos] = piece * rnd.choice((1, 2, 50))
        elif op == 7:
            other = rnd.choice(seeds)
            cut = rnd.randrange(len(other) + 1)
            buf[pos:] = other[cut:]
        else:
            txt = rnd.choice(
                (
                    b"\xff\xfe",
                    b"\xc3",
                    b"\x00",
                    b"[" * 1500,
                    b"-0000070",
                    b"9" * 5000,
                    b"-1",
                    b"\xc2\xb2",
                    b"nan",
                    b"1e999",
                    b"\\",
                )
            )
            buf[pos:pos] = txt
    if len(buf) > max_len:
        del buf[max_len:]
    return bytes(buf)


def inputs(target: Target, count: int, seed: int = 0) -> Iterator[bytes]:
    """``count`` inputs for ``target``: its seeds first, then mutants of them."""
    rnd = random.Random(f"{target.name}/{seed}")
    seeds = target.seeds()
    yield from seeds[:count]
    for _ in range(count - len(seeds)):
        data = mutate(rnd, rnd.choice(seeds), seeds, target.max_len)
        if target.fix is not None and rnd.random() < 0.8:
            buf = bytearray(data)
            target.fix(buf)
            data = bytes(buf)
        yield data
