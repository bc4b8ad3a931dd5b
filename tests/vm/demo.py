"""`make demo`: hibernate a running workload with kjumpd in a real kexec-jump VM, power off,
boot again through the restore-first entry, and show the workload carrying on.

Builds what is missing (tests/vm/assets.py, cached), runs scenario b (shutdown mode) and prints
a timeline of each phase with its duration (host clock, from the serial console), then the
image statistics (size, ratio, save/restore MB/s as the agent measured them). Exit status 0
only when the guest's checker found the workload's ~200 MiB byte-exact in the same process
with its counter still running; the last line states the verdict.

Serial logs stay in artifacts/demo/ (or $KJUMPD_ARTIFACTS/demo/).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from tests.vm import assets as vm_assets
from tests.vm import scenarios

REPO = Path(__file__).resolve().parents[2]

#: (label, from mark/event, to mark/event); "boot-N-start"/"boot-N-end" are QEMU runs
TIMELINE = [
    ("boot the main kernel to init", "boot-1-start", "kernel-up@1"),
    ("start kjumpd, dbus and the 200 MiB workload", "kernel-up@1", "workload-ready"),
    ("kjumpd: prepare, freeze, load B, jump; B boots", "hibernate-start", "B-save-up@1"),
    ("B's agent: find the target by content, plan", "B-save-up@1", "B-saving@1"),
    ("B: save the image (read, compress, write, verify)", "B-saving@1", "B-saved@1"),
    ("back in A and power off", "B-saved@1", "boot-1-end"),
    ("(powered off; the host reads the boot entry)", "boot-1-end", "boot-2-start"),
    ("restore-first R: boot and decide", "boot-2-start", "R-decision@2"),
    ("R: start the restore (in R, or kexec the save kernel)", "R-decision@2", "restore-start@2"),
    ("restore the image into memory", "restore-start@2", "B-restored@2"),
    ("jump to A; kjumpd marks CONSUMED, thaws, resumes", "B-restored@2", "hibernate-returned"),
    ("checker verifies the workload", "hibernate-returned", "verdict"),
]


def point(out: scenarios.Outcome, name: str) -> float | None:
    m = re.fullmatch(r"boot-(\d+)-(start|end)", name)
    if m:
        start, end = out.boot_span(int(m.group(1)))
        return start if m.group(2) == "start" else end
    if "@" in name:
        mark, boot = name.split("@")
        hit = next((e for e in out.marks if e.name == mark and e.boot == int(boot)), None)
        return hit.t if hit else None
    if name == "verdict":
        ev = out.event("scenario-end")
        return ev.t if ev else None
    ev = out.event(name)
    return ev.t if ev else None


def timeline(out: scenarios.Outcome) -> list[str]:
    lines = ["", "timeline (host clock, TCG: compare ratios, not absolutes)"]
    for label, a, b in TIMELINE:
        ta, tb = point(out, a), point(out, b)
        if ta is None or tb is None:
            lines.append(f"  {'':>9}  {'':>8}  {label}: not reached")
            continue
        lines.append(f"  {ta:8.2f}s  {tb - ta:7.2f}s  {label}")
    hib = resume = None
    t_start, t_off = point(out, "hibernate-start"), point(out, "boot-1-end")
    t_on, t_back = point(out, "boot-2-start"), point(out, "hibernate-returned")
    if t_start is not None and t_off is not None:
        hib = t_off - t_start
    if t_on is not None and t_back is not None:
        resume = t_back - t_on
    lines.append("")
    lines.append(
        f"  hibernate latency (request -> powered off): "
        f"{f'{hib:.2f} s' if hib is not None else 'n/a'}"
    )
    lines.append(
        f"  resume latency (power on -> workload running): "
        f"{f'{resume:.2f} s' if resume is not None else 'n/a'}"
    )
    return lines


def agent_stats(out: scenarios.Outcome) -> list[str]:
    lines = ["", "image"]
    saved = out.mark("B-saved")
    restored = out.mark("B-restored")
    if saved:
        m = re.search(
            r"SAVED: (\d+) MiB of memory, (\d+) MiB written, (\d+) zero pages skipped, "
            r"in ([\d.]+) s \((\d+) MB/s",
            saved.fields["line"],
        )
        if m:
            raw, stored = int(m.group(1)), int(m.group(2))
            lines.append(f"  memory saved:    {raw} MiB ({int(m.group(3))} zero pages skipped)")
            lines.append(f"  image size:      {stored} MiB (ratio {stored / max(raw, 1):.2f})")
            lines.append(f"  save:            {float(m.group(4)):.2f} s, {m.group(5)} MB/s")
        else:
            lines.append(f"  {saved.fields['line']}")
    if restored:
        m = re.search(r"RESTORED (\d+) MiB in ([\d.]+) s \((\d+) MB/s\)", restored.fields["line"])
        if m:
            lines.append(f"  restore:         {float(m.group(2)):.2f} s, {m.group(3)} MB/s")
        else:
            lines.append(f"  {restored.fields['line']}")
    if len(lines) == 2:
        lines.append("  (the save kernel printed no statistics)")
    return lines


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="demo: %(message)s", stream=sys.stderr)
    a = vm_assets.load()
    if a.missing or not all(Path(p).exists() for p in (a.kernel, a.rootfs, a.prepared) if p):
        a = vm_assets.build_all()
    run_dir = Path(os.environ.get("KJUMPD_ARTIFACTS") or REPO / "artifacts") / "demo"
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("*"):
        if old.is_file():
            old.unlink()
    print(
        "kjumpd demo: hibernate a VM running a 200 MiB workload (mode shutdown), power it "
        "off, boot it through the restore-first entry, check the workload",
        flush=True,
    )
    out = scenarios.run("shutdown", a, run_dir)
    for line in timeline(out) + agent_stats(out):
        print(line)
    print("")
    print(f"serial logs: {', '.join(str(p) for p in out.logs) or run_dir}")
    for d in run_dir.glob("*.qcow2"):
        d.unlink()
    v = out.verdict
    if out.passed and v.get("data") == "byte-exact" and v.get("image") == "CONSUMED":
        print(
            f"VERDICT: PASS - the workload's {int(v.get('size', 0)) >> 20} MiB survived "
            f"byte-exact in the same process (counter {v.get('counter')}), image CONSUMED"
        )
        return 0
    print(f"VERDICT: FAIL - {out.summary()}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
