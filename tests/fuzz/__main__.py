"""``make fuzz``: every target for FUZZ_RUNS inputs, then inputs run, findings and time each.

``python -m tests.fuzz [--runs N] [--out DIR] [TARGET...]``; ``--replay FILE TARGET`` runs one
input again and shows its traceback. With atheris (the ``[fuzz]``
extra) each target runs under libFuzzer in a process of its own, with coverage guidance;
without it the seeded mutator (tests.fuzz.mutate) runs the same inputs count, unguided.
Findings land in DIR/TARGET (default DIR: build/fuzz) as .txt (signature, traceback) + .bin
(the input).
Exit status 1 when there is any finding.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tmp() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _atheris_run(name: str, runs: int, out: Path) -> tuple[int, list[str]]:
    """Inputs run and findings of one target under libFuzzer; a libFuzzer crash (a hang, a
    memory blow-up) is a finding too, and the fuzzing restarts for the inputs left."""
    done, crashes, attempt = 0, [], 0
    while done < runs and attempt < 5:
        attempt += 1
        log = out / "libfuzzer.log"
        scratch = tempfile.mkdtemp(prefix=f"kjump-fuzz-{name}-", dir=_tmp())
        with open(log, "w") as f:
            rc = subprocess.call(
                [
                    sys.executable,
                    "-m",
                    "tests.fuzz.one",
                    name,
                    str(runs - done),
                    str(out),
                    str(attempt),
                ],
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, "KJUMP_FUZZ_DIR": scratch},
            )
        shutil.rmtree(scratch, ignore_errors=True)
        text = log.read_text(errors="replace")
        m = re.search(r"Done (\d+) runs", text)
        if m:
            done += int(m.group(1))
        else:
            last = re.findall(r"#(\d+)\s", text)
            done += int(last[-1]) if last else 0
        if rc != 0:
            kind = re.search(r"ERROR: libFuzzer: ([\w-]+)", text)
            crashes.append(f"libFuzzer {kind.group(1) if kind else f'exit {rc}'}")
            (out / f"crash-{attempt}.log").write_text(text)
    found = sorted(p.read_text().splitlines()[0].split(": ", 1)[1] for p in out.glob("*.txt"))
    return done, found + crashes


def _mutator_run(name: str, runs: int, out: Path) -> tuple[int, list[str]]:
    from tests.fuzz import mutate, targets

    t = targets.TARGETS[name]
    found: dict[str, bytes] = {}
    n = 0
    for data in mutate.inputs(t, runs, seed=int(time.time())):
        n += 1
        sig = targets.check(t, data)
        if sig and sig not in found:
            found[sig] = data
            (out / f"{len(found)}.bin").write_bytes(data)
            (out / f"{len(found)}.txt").write_text(f"{name}: {sig}\n")
    return n, sorted(found)


def main(argv: list[str] | None = None) -> int:
    from tests.fuzz.targets import TARGETS

    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    p.add_argument("--runs", type=int, default=100_000, help="inputs per target")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "fuzz")
    p.add_argument("--replay", type=Path, help="run TARGET once on this input, show the error")
    p.add_argument("targets", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    args = p.parse_args(argv)
    if args.replay is not None:
        if len(args.targets) != 1 or args.targets[0] not in TARGETS:
            p.error("--replay FILE takes one TARGET")
        TARGETS[args.targets[0]].run(args.replay.read_bytes())  # its traceback, if any
        print("no exception (a named error would have been shown)")
        return 0
    names = args.targets or list(TARGETS)
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}")
    guided = importlib.util.find_spec("atheris") is not None
    mode = "atheris (coverage-guided)" if guided else "seeded mutator (atheris not installed)"
    print(f"fuzzing {len(names)} target(s), {args.runs} inputs each, {mode}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        t0 = time.monotonic()
        runs, found = (_atheris_run if guided else _mutator_run)(name, args.runs, out)
        secs = time.monotonic() - t0
        rows.append(
            {
                "target": name,
                "parser": TARGETS[name].what,
                "inputs": runs,
                "findings": found,
                "seconds": round(secs),
            }
        )
        print(f"{name:12s} {runs:>9d} inputs  {len(found):>3d} findings  {secs:7.0f} s", flush=True)
        for f in found:
            print(f"    {f}", flush=True)
    summary = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "mode": mode,
        "targets": rows,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    total = sum(len(r["findings"]) for r in rows)
    short = [r["target"] for r in rows if r["inputs"] < args.runs]
    print(
        f"{total} finding(s); details in {args.out}" + (f"; short runs: {short}" if short else "")
    )
    return 1 if total or short else 0


if __name__ == "__main__":
    sys.exit(main())
