"""`make bench-vm`: kjumpd against the kernel's own hibernation (swsusp), same VM, same loads.

Every run boots the same guest disk (a qcow2 overlay of the shared prepared image), 3 GiB of
RAM, 2 vCPUs, TCG, kjumpd's daemon running, two disk writers busy, and a blank 4 GiB swap disk
(/dev/vdb, mkswap + swapon in the guest before the load). The load is the guest's workload
(``kjumpvm.load=ANON:CACHE``): ANON MiB of incompressible anonymous memory (mlock'd, so it
must come back from the image) and a file set of CACHE MiB read into the page cache beside it.

- swsusp at its best setting: ``resume=/dev/vdb hibernate.compressor=lz4`` (its default
  threads), ``echo disk > /sys/power/state``; QEMU starts again with the same kernel and
  command line, and the kernel resumes from swap. Before its snapshot it reclaims towards
  /sys/power/image_size (2/5 of RAM).
- kjumpd: ``kjumpctl hibernate --mode shutdown`` to a 2.5 GiB target file; QEMU starts again
  on the restore-first entry. kjumpd's own image-size target (hibernate.image_size, 2/5 of RAM
  by default) reclaims the same way.

The loads: small (about 0.2 GiB: 150 MiB anonymous, 64 MiB of files), large (about 1.5 GiB:
1 GiB anonymous, 512 MiB of files), and above half of RAM (1.75 GiB anonymous, none of it
swappable): the kernel must refuse that one (its snapshot is a copy in free RAM), kjumpd must
hibernate and restore it.

Measured on the host clock from the serial console (never asserted in tests):
  hibernate latency  request in the guest -> QEMU exits (powered off)
  resume latency     QEMU starts again -> the guest's workload answers again
  image size         swsusp: "PM: Image size after compression: N kbytes" (else "Wrote N kbytes");
                     kjumpd: the agent's "SAVED: ... MiB written"
  memory saved       the pages that are not zero and not free: swsusp's "Wrote N kbytes";
                     kjumpd's "SAVED: N MiB of memory" less its zero pages that were not free
  file set kept      after the resume, how much of the file set (in the page cache at the
                     request) is still cached (fincore)
  time to warm       after the resume, re-reading the file set that was in the page cache at
                     the request (and, for scale, the same read with the cache dropped)
  daemon's anon      kjumpd's daemon's anonymous memory (RssAnon) when the guest asks,
                     from the guest's KJUMP-PROCS line: it runs idle in swsusp's runs, and
                     what it holds is saved by both systems
  phases             the console lines of tests/vm/scenarios.py MARKS, drawn side by side in
                     phases.svg
  phases in A        kjumpd's own phase durations and timed steps, from the result record
                     of `kjumpctl hibernate --json` (where "A prepares" and "A resumes" go)
From the small and the large load: each system's fixed cost and its cost per GiB of load
(a straight line through the two points). All runs must end with the guest's checker verdict
PASS (data byte-exact) for their figures to count.

``--warm`` runs kjumpd with ``[save_kernel] warm = true``: the save kernel is booted and
parked at the daemon's start, and the guest waits for that (the SaveKernel property) before
the request; the hibernation is one jump into it. Its results go to bench-vm/warm/.

``--classic`` runs the earlier set instead: 1 GiB VM, 200 MiB load, 2 GiB swap disk; swsusp,
kjumpd, kjumpd with ``finish_in_save_kernel = false`` (the save kernel jumps back and the main
kernel powers off) and kjumpd encrypted (an AES-NI CPU model, the host typing a wrong then the
right passphrase at R).

Goals: hibernate and resume <= 0.7x swsusp at the large load and <= 1.0x at the small load;
image <= 1.0x; the above-half load restored intact. Exit status 0 when every run's verdict
passed (the goals are reported, not enforced), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from kjumpd.daemon.transaction import STEPS
from tests.vm import assets as vm_assets
from tests.vm import scenarios

REPO = Path(__file__).resolve().parents[1]
GiB = 1 << 30
MiB = 1 << 20

#: the VM and its target for the runs at scale
SCALE_MEM_MIB = 3072
PAGE = 4096
SCALE_SWAP = "4G"
SCALE_TARGET = "2560M"
SWSUSP_BEST = "hibernate.compressor=lz4"


@dataclass(frozen=True)
class Load:
    key: str
    anon_mib: int
    cache_mib: int
    #: the latency goal against swsusp (None: no latency goal, the load is about capacity)
    goal: float | None

    @property
    def gib(self) -> float:
        return (self.anon_mib + self.cache_mib) / 1024

    @property
    def append(self) -> str:
        return f"kjumpvm.load={self.anon_mib}:{self.cache_mib}"


LOADS = (
    Load("small", 150, 64, 1.0),
    Load("large", 1024, 512, 0.7),
    Load("over-half", 1792, 0, None),
)

#: (label, first mark or boot edge, last) per phase; "request", "off", "on" and "answers"
#: are the run's own edges (the request, QEMU's exit, its next start, the workload back)
PHASES = {
    "kjumpd": {
        "hibernate": (
            ("A prepares, B boots or resumes", "request", "B-start"),
            ("B saves", "B-start", "B-saved"),
            ("power-off", "B-saved", "off"),
        ),
        "resume": (
            ("R boots, decides", "on", "R-decision"),
            ("restore starts (in R, or B boots)", "R-decision", "restore-start"),
            ("restore", "restore-start", "B-restored"),
            ("A resumes", "B-restored", "answers"),
        ),
    },
    "swsusp": {
        "hibernate": (
            ("freeze, reclaim", "request", "swsusp-snapshot"),
            ("snapshot, write", "swsusp-snapshot", "off"),
        ),
        "resume": (
            ("kernel boots", "on", "swsusp-restore"),
            ("load image, resume", "swsusp-restore", "answers"),
        ),
    },
}
#: (label, figure, unit) of each line of a comparison
ROWS = (
    ("hibernate latency", "hibernate_s", "s"),
    ("resume latency", "resume_s", "s"),
    ("image size", "image_bytes", "MiB"),
    ("memory saved", "memory_bytes", "MiB"),
    ("file set kept", "kept_bytes", "MiB"),
    ("time to warm", "warm_s", "s"),
    ("same read, cold", "cold_s", "s"),
    ("daemon's anon memory", "daemon_anon_bytes", "MiB"),
)
COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2")


def figures(out: scenarios.Outcome) -> dict[str, float | str | None]:
    """Latencies (s), sizes (bytes), time to warm (s) and phase edges of one run."""
    start = out.event("hibernate-start")
    back = out.event("hibernate-returned")
    _, off = out.boot_span(1)
    on, _ = out.boot_span(2)
    refused = out.verdict.get("swsusp", "").startswith("refused")
    hib = off - start.t if start and off is not None and not refused else None
    res = back.t - on if back and on is not None and not refused else None
    size = memory = None
    for mark in out.marks:
        text = mark.fields.get("line", "")
        m = re.search(
            r"SAVED: (\d+) MiB of memory, (\d+) MiB written, (\d+) zero pages skipped "
            r"\((\d+) of them free",
            text,
        )
        if m:
            # counted as swsusp counts what it wrote: the pages that are not zero (its
            # "Wrote" leaves zero pages out too); "N MiB of memory" includes zero pages
            zero_in_use = (int(m.group(3)) - int(m.group(4))) * PAGE
            memory, size = (int(m.group(1)) << 20) - zero_in_use, int(m.group(2)) << 20
    for log in out.logs:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        # swsusp with compression prints the pages it wrote, then the compressed size
        wrote = re.search(r"PM: (?:hibernation: )?Wrote (\d+) kbytes in", text)
        m = re.search(r"PM: Image size after compression: (\d+) kbytes", text) or wrote
        if m:
            size = int(m.group(1)) << 10
        if wrote:
            memory = int(wrote.group(1)) << 10
    warm = out.event("warm")
    # kjumpd's daemon at the request (the guest's KJUMP-PROCS line: name:pid:anon+file kB):
    # it runs in both systems' runs, idle in swsusp's
    procs = out.console(r"KJUMP-PROCS: \S+ .*?\bkjumpd:\d+:(\d+)\+\d+")
    daemon_anon = int(procs[0].group(1)) << 10 if procs else None
    edges: dict[str, float | None] = {
        "request": start.t if start else None,
        "off": off,
        "on": on,
        "answers": back.t if back else None,
    }
    for m in out.marks:
        edges.setdefault(m.name, m.t)
    # B starts its save when it boots for it (cold) or takes the job (a warm save kernel,
    # which booted before the request)
    edges["B-start"] = next(
        (
            m.t
            for m in out.marks
            if m.name in ("B-save-up", "B-job") and start is not None and m.t >= start.t
        ),
        None,
    )
    return {
        "a_phases": a_phases(out),
        "hibernate_s": hib,
        "resume_s": res,
        "image_bytes": size,
        "memory_bytes": memory,
        "warm_s": float(warm.fields["seconds"]) if warm else None,
        "cold_s": float(warm.fields["cold"]) if warm else None,
        "kept_bytes": _mib(warm.fields.get("cached_mib")) if warm else None,
        "daemon_anon_bytes": daemon_anon,
        "swsusp": out.verdict.get("swsusp", ""),
        "edges": edges,  # type: ignore[dict-item]
    }


def _mib(text: str | None) -> int | None:
    try:
        return int(float(text) * MiB) if text is not None else None
    except ValueError:  # "?": the guest could not tell
        return None


#: the prefix of a timed step's name among the phases (a_phases)
STEP = "step: "
#: the daemon's phases in the order they run (its result record keeps no order)
A_PHASES = (*dict.fromkeys(step.phase for step in STEPS), "jump", "return", "undo")


def a_phases(out: scenarios.Outcome) -> dict[str, float]:
    """The daemon's phase durations (s) of the run's last hibernation, in the order they
    run, then its timed steps by name as "step: NAME": where "A prepares" goes. A's clock
    stops during the jump, so its "jump" phase does not hold B's time."""
    for record in reversed(out.results):
        durations = record.get("durations")
        if isinstance(durations, dict) and durations:
            order = {name: i for i, name in enumerate(A_PHASES)}
            ranked = sorted(durations.items(), key=lambda kv: order.get(kv[0], len(order)))
            steps = (record.get("stats") or {}).get("steps") or {}
            return {str(k): float(v) for k, v in ranked} | {
                f"{STEP}{k}": float(v) for k, v in sorted(steps.items())
            }
    return {}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(v: float | str | None, unit: str) -> str:
    if v is None or isinstance(v, str):
        return "n/a" if not v else str(v)
    if unit == "MiB":
        return f"{v / MiB:.0f} MiB"
    return f"{v:.2f} {unit}"


def line_fit(
    points: list[tuple[float, float | None]],
) -> tuple[float | None, float | None]:
    """(fixed cost, cost per GiB) of the straight line through two (GiB, seconds) points."""
    (x1, y1), (x2, y2) = points
    if y1 is None or y2 is None or x2 == x1:
        return None, None
    slope = (y2 - y1) / (x2 - x1)
    return y1 - slope * x1, slope


def phases(system: str, which: str, f: dict) -> list[tuple[str, float]]:
    """(label, seconds) of each phase of ``which`` (hibernate/resume) of one run."""
    edges = f["edges"]
    out = []
    for label, a, b in PHASES[system][which]:
        ta, tb = edges.get(a), edges.get(b)
        out.append((label, tb - ta if ta is not None and tb is not None and tb >= ta else 0.0))
    return out


def svg(rows: list[tuple[str, str, list[tuple[str, float]]]], path: Path) -> None:
    """A bar per (run, hibernate|resume), its phases stacked left to right, to scale."""
    width, left, bar, gap = 900, 230, 22, 10
    longest = max((sum(s for _, s in ph) for _, _, ph in rows), default=1.0) or 1.0
    scale = (width - left - 20) / longest
    height = 40 + len(rows) * (bar + gap) + 60
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        '<text x="10" y="20" font-size="14">Hibernate and resume phases, seconds '
        "(3 GiB VM under TCG, one run each)</text>",
    ]
    y = 40
    legend: dict[str, str] = {}
    for label, which, ph in rows:
        parts.append(f'<text x="10" y="{y + 15}">{label}, {which}</text>')
        x = float(left)
        for i, (name, secs) in enumerate(ph):
            colour = COLOURS[i % len(COLOURS)]
            legend.setdefault(f"{name}", colour)
            w = secs * scale
            parts.append(
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{colour}">'
                f"<title>{name}: {secs:.2f} s</title></rect>"
            )
            if w > 28:
                parts.append(f'<text x="{x + 3:.1f}" y="{y + 15}" fill="white">{secs:.1f}</text>')
            x += w
        total = sum(s for _, s in ph)
        parts.append(f'<text x="{x + 4:.1f}" y="{y + 15}">{total:.1f} s</text>')
        y += bar + gap
    lx = 10
    y += 10
    for name, colour in legend.items():
        parts.append(f'<rect x="{lx}" y="{y}" width="12" height="12" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 16}" y="{y + 11}">{name}</text>')
        lx += 24 + 7 * len(name)
        if lx > width - 150:
            lx, y = 10, y + 18
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def _run(
    a: vm_assets.Assets, base: Path, key: str, who: str, name: str, **kw: object
) -> scenarios.Outcome:
    run_dir = base / key
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench-vm: running {who} (logs in {run_dir})", flush=True)
    out = scenarios.run(name, a, run_dir, **kw)  # type: ignore[arg-type]
    for d in run_dir.glob("*.qcow2"):
        d.unlink()
    print(
        f"bench-vm: {who}: {out.verdict_line or 'no verdict'}"
        + (f" | host: {'; '.join(out.problems)}" if out.problems else ""),
        flush=True,
    )
    return out


def scale(a: vm_assets.Assets, base: Path, only: set[str], warm: bool = False) -> int:
    runs: dict[tuple[str, str], scenarios.Outcome] = {}
    for load in LOADS:
        if only and load.key not in only:
            continue
        common = {"memory_mb": SCALE_MEM_MIB, "swap_size": SCALE_SWAP}
        runs[("swsusp", load.key)] = _run(
            a,
            base,
            f"swsusp-{load.key}",
            f"swsusp, load {load.key}",
            "swsusp",
            append=f"{load.append} {SWSUSP_BEST}",
            **common,
        )
        runs[("kjumpd", load.key)] = _run(
            a,
            base,
            f"kjumpd-{load.key}",
            f"kjumpd, load {load.key}",
            "shutdown",
            swap=True,
            append=f"{load.append} kjumpvm.target_size={SCALE_TARGET}"
            + (" kjumpvm.warm=1" if warm else ""),
            **common,
        )
    figs = {k: figures(v) for k, v in runs.items()}
    report: dict = {"vm_mib": SCALE_MEM_MIB, "warm": warm, "loads": {}}
    print("")
    print(
        f"bench-vm at scale: {SCALE_MEM_MIB} MiB VM, 2 vCPUs, TCG; swsusp with {SWSUSP_BEST}; "
        f"kjumpd's save kernel {'warm (parked before the request)' if warm else 'cold'}"
    )
    rows = ROWS
    for load in LOADS:
        sw, kj = figs.get(("swsusp", load.key)), figs.get(("kjumpd", load.key))
        if sw is None or kj is None:
            continue
        print("")
        print(
            f"load {load.key}: {load.anon_mib} MiB anonymous + {load.cache_mib} MiB of files "
            f"({load.gib:.2f} GiB)"
        )
        print(f"  {'':20} {'swsusp':>14} {'kjumpd':>12} {'kjumpd/swsusp':>14}  goal")
        entry: dict = {}
        refused = str(sw["swsusp"]).startswith("refused")
        for label, key, unit in rows:
            r = ratio(kj[key], sw[key])  # type: ignore[arg-type]
            if refused:
                goal = "-"  # nothing to compare with: the kernel refused the load
            elif key in ("hibernate_s", "resume_s") and load.goal is not None:
                met = r is not None and r <= load.goal
                goal = f"<= {load.goal}x: {'met' if met else 'NOT met'}"
            elif key == "image_bytes":
                goal = f"<= 1.0x: {'met' if r is not None and r <= 1.0 else 'NOT met'}"
            else:
                goal = "-"
            swv = sw["swsusp"] if sw[key] is None and refused else sw[key]
            entry[key] = {"swsusp": sw[key], "kjumpd": kj[key], "ratio": r}
            print(
                f"  {label:20} {fmt(swv, unit):>14} {fmt(kj[key], unit):>12} "
                f"{(f'{r:.2f}x' if r is not None else 'n/a'):>14}  {goal}"
            )
        if kj["a_phases"]:
            in_a: dict[str, float] = kj["a_phases"]  # type: ignore[assignment]
            for title, items in (
                (
                    "kjumpd's phases in A",
                    [(k, v) for k, v in in_a.items() if not k.startswith(STEP)],
                ),
                (
                    "its timed steps",
                    [(k.removeprefix(STEP), v) for k, v in in_a.items() if k.startswith(STEP)],
                ),
            ):
                if items:
                    print(f"  {title}: " + ", ".join(f"{k} {v:.2f} s" for k, v in items))
            entry["a_phases"] = in_a
        entry["swsusp_outcome"] = sw["swsusp"]
        entry["passed"] = {
            "swsusp": runs[("swsusp", load.key)].passed,
            "kjumpd": runs[("kjumpd", load.key)].passed,
        }
        report["loads"][load.key] = entry
    small, large = LOADS[0], LOADS[1]
    if all((s, ld.key) in figs for s in ("swsusp", "kjumpd") for ld in (small, large)):
        print("")
        print(f"  {'straight line through small and large':40} {'fixed':>9} {'per GiB':>9}")
        fits: dict = {}
        for system in ("swsusp", "kjumpd"):
            for key in ("hibernate_s", "resume_s"):
                fixed, slope = line_fit(
                    [(ld.gib, figs[(system, ld.key)][key]) for ld in (small, large)]  # type: ignore[misc]
                )
                fits[f"{system}.{key}"] = {"fixed_s": fixed, "per_gib_s": slope}
                print(
                    f"  {system + ' ' + key.split('_')[0]:40} {fmt(fixed, 's'):>9} "
                    f"{fmt(slope, 's'):>9}"
                )
        report["fits"] = fits
        bars = []
        for load in (small, large):
            for system in ("swsusp", "kjumpd"):
                for which in ("hibernate", "resume"):
                    bars.append(
                        (
                            f"{system} {load.key}",
                            which,
                            phases(system, which, figs[(system, load.key)]),
                        )
                    )
        svg(bars, base / "phases.svg")
        report["phases"] = {f"{lbl} {w}": ph for lbl, w, ph in bars}
        print(f"  phases: {base / 'phases.svg'}")
    ok = all(out.passed for out in runs.values())
    over = runs.get(("swsusp", "over-half"))
    if over is not None:
        verdict = figs[("swsusp", "over-half")]["swsusp"]
        print(
            f"\nabove half of RAM: swsusp {verdict or 'no outcome'} (it must refuse), kjumpd "
            f"{'restored it intact' if runs[('kjumpd', 'over-half')].passed else 'FAILED'}"
        )
        if not str(verdict).startswith("refused"):
            print("  the kernel did not refuse the above-half load: this run is not that case")
    (base / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results: {base / 'results.json'} (TCG figures: compare ratios, not absolutes)")
    return 0 if ok else 1


def classic(a: vm_assets.Assets, base: Path, swap: bool) -> int:
    runs = {}
    for key, name, append, who in (
        ("swsusp", "swsusp", "", "swsusp"),
        ("shutdown", "shutdown", "", "kjumpd"),
        ("jump-back", "shutdown", "kjumpvm.finish=jump-back", "kjumpd, jumping back first"),
        ("encrypted", "encrypted", "", "kjumpd, encrypted (AES-NI CPU model)"),
    ):
        runs[key] = _run(a, base, key, who, name, swap=swap, append=append)
    sw, kj = figures(runs["swsusp"]), figures(runs["shutdown"])
    rows = ROWS[:4]  # no file set in these runs
    print("")
    print(f"{'':20} {'swsusp':>12} {'kjumpd':>12} {'kjumpd/swsusp':>14}")
    report: dict = {}
    for label, key, unit in rows:
        r = ratio(kj[key], sw[key])  # type: ignore[arg-type]
        report[key] = {"swsusp": sw[key], "kjumpd": kj[key], "ratio": r}
        print(
            f"{label:20} {fmt(sw[key], unit):>12} {fmt(kj[key], unit):>12} "
            f"{(f'{r:.2f}x' if r is not None else 'n/a'):>14}"
        )
    jb = figures(runs["jump-back"])
    r_finish = ratio(kj["hibernate_s"], jb["hibernate_s"])  # type: ignore[arg-type]
    print(
        f"{'hibernate latency, B powers off vs jump back + A powers off':<60} "
        f"{fmt(kj['hibernate_s'], 's')} vs {fmt(jb['hibernate_s'], 's')}"
        f" ({f'{r_finish:.2f}x' if r_finish is not None else 'n/a'})"
    )
    en = figures(runs["encrypted"])
    for label, key, unit in rows[:3]:
        r = ratio(en[key], kj[key])  # type: ignore[arg-type]
        print(
            f"{'encrypted vs plaintext, ' + label:<60} {fmt(en[key], unit)} vs "
            f"{fmt(kj[key], unit)} ({f'{r:.2f}x' if r is not None else 'n/a'})"
        )
    (base / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results: {base / 'results.json'} (TCG figures: compare ratios, not absolutes)")
    return 0 if all(out.passed for out in runs.values()) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.vm", description=__doc__.split("\n")[0])
    ap.add_argument("--classic", action="store_true", help="the 1 GiB VM set instead")
    ap.add_argument(
        "--no-swap", action="store_true", help="--classic: no swap disk in kjumpd's runs"
    )
    ap.add_argument(
        "--load",
        action="append",
        default=[],
        choices=[ld.key for ld in LOADS],
        help="run only this load (repeatable; default: every load)",
    )
    ap.add_argument(
        "--warm",
        action="store_true",
        help="kjumpd with [save_kernel] warm = true (parked before the request)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bench-vm: %(message)s", stream=sys.stderr)
    a = vm_assets.load()
    changed = vm_assets.newer_sources()
    if changed:
        # a bench of assets built from other sources would measure other code
        where = changed[0].relative_to(REPO)
        print(
            f"bench-vm: {len(changed)} source file(s) changed since the VM assets were built "
            f"({where}, ...): building them again",
            file=sys.stderr,
        )
    if a.missing or changed:
        a = vm_assets.build_all()
    if a.missing:
        print(f"bench-vm: VM assets missing: {', '.join(a.missing)}; see above", file=sys.stderr)
        return 1
    base = Path(os.environ.get("KJUMPD_ARTIFACTS") or REPO / "artifacts") / "bench-vm"
    if args.classic:
        return classic(a, base / "classic", swap=not args.no_swap)
    if args.warm:
        return scale(a, base / "warm", set(args.load), warm=True)
    return scale(a, base, set(args.load))


if __name__ == "__main__":
    sys.exit(main())
