"""`make bench-vm`: kjumpd against the kernel's own hibernation (swsusp), same VM, same workload.

Both runs boot the same guest disk (a qcow2 overlay of the shared prepared image), 1 GiB RAM,
2 vCPUs, TCG, with the same ~200 MiB seeded workload (mlock'd), kjumpd's daemon running, and
the same blank 2 GiB swap disk (/dev/vdb, mkswap + swapon in the guest before the workload;
``--no-swap`` leaves it out of kjumpd's run):

- swsusp: ``resume=/dev/vdb`` on the kernel command line, ``echo disk > /sys/power/state``;
  QEMU is started again with the same kernel and command line and the kernel resumes from swap.
  Before its snapshot the kernel reclaims towards /sys/power/image_size (2/5 of RAM), which
  swaps out unlocked anonymous memory.
- kjumpd: ``kjumpctl hibernate --mode shutdown``; QEMU is started again on the restore-first
  entry (scenario b of the VM tier), the swap disk still attached. kjumpd's own image-size
  target (hibernate.image_size, 2/5 of RAM by default) reclaims the same way.

Measured on the host clock from the serial console (never asserted in tests):
  hibernate latency  request in the guest -> QEMU exits (powered off)
  resume latency     QEMU starts again -> the guest's workload answers again
  image size         swsusp: "PM: Image size after compression: N kbytes" (else "Wrote N kbytes");
                     kjumpd: the agent's "SAVED: ... MiB written"
  memory saved       swsusp: "Wrote N kbytes" (pages after its own reclaim);
                     kjumpd: "SAVED: N MiB of memory" (the RAM outside the jump area that
                     the save kernel read: the main kernel's free pages are left out, zero
                     pages among the rest are elided)
A fourth run is scenario l (an encrypted image, a CPU model offering AES-NI, the host typing
a wrong then the right passphrase at R; its resume latency includes that dialogue, about
2 s): encryption's cost beside the plaintext run. A third run repeats kjumpd's with
``[hibernate] finish_in_save_kernel = false``: the save
kernel jumps back and the main kernel powers off, as before the save kernel could power off
itself; its hibernate latency is printed beside the default's (the measurement behind that
default).
All runs must end with the guest's checker verdict PASS (data byte-exact) for the figures to
count. Goal: kjumpd <= 0.7x swsusp's latencies and an image no larger. Exit status: 0
when both runs passed their verdicts (the goal is reported, not enforced), 1 otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

from tests.vm import assets as vm_assets
from tests.vm import scenarios

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.7


def figures(out: scenarios.Outcome) -> dict[str, float | None]:
    """hibernate/resume latency (s) and image size (bytes) of one run."""
    start = out.event("hibernate-start")
    back = out.event("hibernate-returned")
    _, off = out.boot_span(1)
    on, _ = out.boot_span(2)
    hib = off - start.t if start and off is not None else None
    res = back.t - on if back and on is not None else None
    size = memory = None
    for mark in out.marks:
        text = mark.fields.get("line", "")
        m = re.search(r"SAVED: (\d+) MiB of memory, (\d+) MiB written", text)
        if m:
            memory, size = int(m.group(1)) << 20, int(m.group(2)) << 20
    for log in out.logs:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        # swsusp with compression prints the pages it wrote, then the compressed size
        m = re.search(r"PM: Image size after compression: (\d+) kbytes", text) or re.search(
            r"PM: (?:hibernation: )?Wrote (\d+) kbytes in", text
        )
        if m:
            size = int(m.group(1)) << 10
        m = re.search(r"PM: (?:hibernation: )?Wrote (\d+) kbytes in", text)
        if m:
            memory = int(m.group(1)) << 10
    return {"hibernate_s": hib, "resume_s": res, "image_bytes": size, "memory_bytes": memory}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "MiB":
        return f"{v / (1 << 20):.0f} MiB"
    return f"{v:.2f} {unit}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="bench-vm: %(message)s", stream=sys.stderr)
    a = vm_assets.load()
    if a.missing:
        a = vm_assets.build_all()
    base = Path(os.environ.get("KJUMPD_ARTIFACTS") or REPO / "artifacts") / "bench-vm"
    # the same VM for both: kjumpd's run gets swsusp's swap disk too, unless --no-swap
    swap = "--no-swap" not in (argv if argv is not None else sys.argv[1:])
    runs = {}
    for key, name, append, who in (
        ("swsusp", "swsusp", "", "swsusp"),
        ("shutdown", "shutdown", "", "kjumpd"),
        ("jump-back", "shutdown", "kjumpvm.finish=jump-back", "kjumpd, jumping back first"),
        ("encrypted", "encrypted", "", "kjumpd, encrypted (AES-NI CPU model)"),
    ):
        run_dir = base / key
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"bench-vm: running {who} (logs in {run_dir})", flush=True)
        runs[key] = scenarios.run(name, a, run_dir, swap=swap, append=append)
        for d in run_dir.glob("*.qcow2"):
            d.unlink()
    sw, kj = figures(runs["swsusp"]), figures(runs["shutdown"])
    rows = [
        ("hibernate latency", "hibernate_s", "s"),
        ("resume latency", "resume_s", "s"),
        ("image size", "image_bytes", "MiB"),
        ("memory saved", "memory_bytes", "MiB"),
    ]
    print("")
    print(f"{'':20} {'swsusp':>12} {'kjumpd':>12} {'kjumpd/swsusp':>14}  goal")
    report = {}
    for label, key, unit in rows:
        r = ratio(kj[key], sw[key])
        limit = GOAL if unit == "s" else 1.0
        goal = (
            "-"
            if key == "memory_bytes"
            else f"<= {limit}x: {'met' if r is not None and r <= limit else 'NOT met'}"
        )
        report[key] = {"swsusp": sw[key], "kjumpd": kj[key], "ratio": r}
        print(
            f"{label:20} {fmt(sw[key], unit):>12} {fmt(kj[key], unit):>12} "
            f"{(f'{r:.2f}x' if r is not None else 'n/a'):>14}  {goal}"
        )
    jb = figures(runs["jump-back"])
    r_finish = ratio(kj["hibernate_s"], jb["hibernate_s"])
    print(
        f"{'hibernate latency, B powers off vs jump back + A powers off':<60} "
        f"{fmt(kj['hibernate_s'], 's')} vs {fmt(jb['hibernate_s'], 's')}"
        f" ({f'{r_finish:.2f}x' if r_finish is not None else 'n/a'})"
    )
    en = figures(runs["encrypted"])
    for label, key, unit in rows[:3]:
        r = ratio(en[key], kj[key])
        print(
            f"{'encrypted vs plaintext, ' + label:<60} {fmt(en[key], unit)} vs "
            f"{fmt(kj[key], unit)} ({f'{r:.2f}x' if r is not None else 'n/a'})"
        )
        report.setdefault("encrypted", {})[key] = {"encrypted": en[key], "plaintext": kj[key]}
    report["finish_in_save_kernel"] = {
        "power_off_in_b_s": kj["hibernate_s"],
        "jump_back_s": jb["hibernate_s"],
        "ratio": r_finish,
    }
    ok = True
    for name, out in runs.items():
        who = {
            "swsusp": "swsusp",
            "jump-back": "kjumpd (jump back)",
            "encrypted": "kjumpd (encrypted)",
        }.get(name, "kjumpd")
        print(
            f"{who} verdict: {out.verdict_line or 'none'}"
            + (f" | host: {'; '.join(out.problems)}" if out.problems else "")
        )
        ok = ok and out.passed
    (base / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {base / 'results.json'} (TCG figures: compare ratios, not absolutes)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
