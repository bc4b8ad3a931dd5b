"""`make soak`: N hibernate / restore cycles of one VM (default 50), the workload and two disk
writers carrying on throughout.

Each cycle is ``kjumpctl hibernate --mode shutdown`` in the guest, a power-off, and a
power-on through the restore-first entry, as a user's laptop would go. The guest checks
every cycle (image CONSUMED, the workload byte-exact in the same process, the writers
intact and going on) and prints the daemon's resident memory and open file descriptors;
the host adds each cycle's latency (request to workload answering again, host clock).

Prints a table and a summary (failures, latencies, the daemon's RSS and descriptors over
the cycles) and writes artifacts/soak/report.json. Exit status 0 when every cycle passed.
Not part of `make test`: 50 cycles take about half an hour under TCG.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

from tests.vm import assets as vm_assets
from tests.vm import scenarios

REPO = Path(__file__).resolve().parents[2]
SOAK_RE = re.compile(r"KJUMP-SOAK: cycle=(\d+) result=(\S+) rss_kib=(\d+) fds=(\d+)")


def run(cycles: int, run_dir: Path) -> tuple[scenarios.Outcome, list[dict]]:
    a = vm_assets.build_all()
    r = scenarios.Runner("soak", "soak", a, run_dir, append_extra=f"kjumpvm.cycles={cycles}")
    r.boot()
    for _ in range(2 * cycles + 2):
        r.wait_exit(scenarios.BOOT_TIMEOUT)
        if r.has_verdict() or r.outcome.problems:
            break
        r.boot_restore_first(scenarios.BOOT_TIMEOUT, wait=False)
    out = r.finish()
    rows: dict[int, dict] = {}
    for log in out.logs:
        for m in SOAK_RE.finditer(log.read_text(errors="replace") if log.exists() else ""):
            rows[int(m.group(1))] = {
                "cycle": int(m.group(1)),
                "result": m.group(2),
                "rss_kib": int(m.group(3)),
                "fds": int(m.group(4)),
            }
    starts = {e.fields.get("cycle"): e.t for e in out.events if e.name == "hibernate-start"}
    for e in out.events:
        if e.name == "hibernate-returned" and e.fields.get("cycle") in starts:
            n = int(e.fields["cycle"])
            if n in rows:
                rows[n]["seconds"] = round(e.t - starts[e.fields["cycle"]], 2)
    return out, [rows[k] for k in sorted(rows)]


def report(out: scenarios.Outcome, rows: list[dict], cycles: int) -> str:
    lines = [f"{'cycle':>5} {'result':<8} {'seconds':>8} {'RSS MiB':>8} {'fds':>4}"]
    for row in rows:
        sec = f"{row['seconds']:.1f}" if "seconds" in row else "-"
        lines.append(
            f"{row['cycle']:>5} {row['result'][:8]:<8} {sec:>8} "
            f"{row['rss_kib'] / 1024:>8.1f} {row['fds']:>4}"
        )
    done = [r for r in rows if r["cycle"] > 0]
    failed = [r for r in done if r["result"] != "ok"]
    secs = [r["seconds"] for r in done if "seconds" in r]
    lines.append("")
    lines.append(
        f"soak: {len(done)} of {cycles} cycles ran, {len(failed)} failed; verdict "
        f"{'PASS' if out.passed else 'FAIL'}"
    )
    if secs:
        lines.append(
            f"soak: cycle latency (request -> workload answering again) min "
            f"{min(secs):.1f} s, median {statistics.median(secs):.1f} s, max {max(secs):.1f} s"
        )
    if rows:
        rss = [r["rss_kib"] / 1024 for r in rows]
        fds = [r["fds"] for r in rows]
        lines.append(
            f"soak: kjumpd RSS {rss[0]:.1f} -> {rss[-1]:.1f} MiB (max {max(rss):.1f}); "
            f"open fds {fds[0]} -> {fds[-1]} (max {max(fds)})"
        )
    if not out.passed:
        lines.append(f"soak: {out.summary()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=int(os.environ.get("CYCLES", "50")))
    args = p.parse_args(argv)
    if args.cycles < 1:
        p.error("--cycles must be at least 1")
    base = Path(os.environ.get("KJUMPD_ARTIFACTS") or REPO / "artifacts") / "soak"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    out, rows = run(args.cycles, base)
    text = report(out, rows, args.cycles)
    print(text)
    (base / "report.json").write_text(
        json.dumps({"cycles": args.cycles, "passed": out.passed, "rows": rows}, indent=1)
    )
    (base / "disk.qcow2").unlink(missing_ok=True)
    return 0 if out.passed and all(r["result"] == "ok" for r in rows if r["cycle"] > 0) else 1


if __name__ == "__main__":
    sys.exit(main())
