"""Run one target under atheris (libFuzzer): ``python -m tests.fuzz.one TARGET RUNS OUTDIR``.

kjumpd is instrumented for coverage as it is imported. A finding is written to OUTDIR as
``<hash>.txt`` (its signature and traceback) and ``<hash>.bin`` (the input), once per
signature, and the fuzzing goes on; libFuzzer's own crash (a hang past -timeout, memory past
-rss_limit_mb) stops this process, and the caller counts it. libFuzzer prints "Done N runs".
"""

from __future__ import annotations

import hashlib
import random
import sys
import tempfile
import traceback
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["kjumpd"]):
    from tests.fuzz import targets


def main() -> None:
    name, runs, outdir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    t = targets.TARGETS[name]
    seeds = t.seeds()
    max_len = max([t.max_len] + [len(s) + 1024 for s in seeds])
    corpus = Path(tempfile.mkdtemp(prefix="corpus-", dir=targets._scratch()))
    for i, s in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(s)
    seen: set[str] = set()

    def one(data: bytes) -> None:
        try:
            t.run(data)
            return
        except t.allowed as e:
            if e.what:
                return
            sig, tb = f"unnamed {type(e).__name__}", traceback.format_exc()
        except targets.Violation as e:
            sig, tb = f"Violation: {e}", traceback.format_exc()
        except Exception as e:  # noqa: BLE001 - anything else escaping a parser is the finding
            sig, tb = targets.signature(e), traceback.format_exc()
        if sig not in seen:
            seen.add(sig)
            h = hashlib.sha1(sig.encode()).hexdigest()[:10]
            (outdir / f"{h}.bin").write_bytes(data)
            (outdir / f"{h}.txt").write_text(f"{name}: {sig}\n\n{tb}")
            print(f"FINDING {name}: {sig}", file=sys.stderr, flush=True)

    rnd = random.Random(seed)

    def mutator(data: bytes, size: int, _seed: int) -> bytes:
        data = atheris.Mutate(data, size)
        if t.fix is not None and rnd.random() < 0.8:
            buf = bytearray(data)
            t.fix(buf)
            data = bytes(buf[:size])
        return data

    atheris.Setup(
        [
            sys.argv[0],
            f"-runs={runs}",
            f"-max_len={max_len}",
            f"-seed={seed}",
            "-timeout=30",
            "-rss_limit_mb=3072",
            "-print_final_stats=1",
            f"-artifact_prefix={outdir}/crash-",
            str(corpus),
        ],
        one,
        custom_mutator=mutator if t.fix is not None else None,
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main()
