"""bench-vm's arithmetic and picture: the fixed cost and cost per GiB it reports, the phases
it draws, and a refused swsusp run reported as refused, not as a time."""

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench import vm
from tests.vm.scenarios import Event, Outcome


def test_the_line_through_two_loads_gives_fixed_cost_and_cost_per_gib():
    fixed, slope = vm.line_fit([(0.2, 10.0), (1.5, 15.2)])
    assert slope == pytest.approx(4.0)
    assert fixed == pytest.approx(9.2)
    assert vm.line_fit([(0.2, None), (1.5, 15.2)]) == (None, None)


def outcome(tmp_path: Path, verdict: dict[str, str], marks=(), boots=()) -> Outcome:
    out = Outcome(name="x", run_dir=tmp_path, verdict=verdict)
    out.events = [
        Event(10.0, "hibernate-start", {}, 1),
        Event(40.0, "hibernate-returned", {}, 2),
        Event(45.0, "warm", {"seconds": "2.50", "cold": "1.00", "cached_mib": "63.5"}, 2),
    ]
    out.boots = list(boots) or [{"boot": 1, "start": 0.0, "end": 20.0}, {"boot": 2, "start": 25.0}]
    out.marks = [Event(t, name, {"line": ""}, 1) for name, t in marks]
    return out


def test_a_run_reports_its_latencies_and_phases(tmp_path):
    f = vm.figures(
        outcome(
            tmp_path,
            {"swsusp": ""},
            marks=[
                ("B-save-up", 14.0),
                ("B-saved", 19.0),
                ("R-decision", 28.0),
                ("B-restore-up", 30.5),
                ("restore-start", 31.0),
                ("B-restored", 37.0),
            ],
        )
    )
    assert (f["hibernate_s"], f["resume_s"]) == (10.0, 15.0)
    assert (f["warm_s"], f["cold_s"], f["kept_bytes"]) == (2.5, 1.0, int(63.5 * (1 << 20)))
    hib = vm.phases("kjumpd", "hibernate", f)
    res = vm.phases("kjumpd", "resume", f)
    assert [s for _, s in hib] == [4.0, 5.0, 1.0]
    assert [s for _, s in res] == [3.0, 3.0, 6.0, 3.0]
    assert sum(s for _, s in hib) == f["hibernate_s"]
    assert sum(s for _, s in res) == f["resume_s"]


def test_a_warm_save_kernel_starts_its_save_when_it_takes_the_job(tmp_path):
    """B booted (and parked) before the request: the save starts at the job, not the boot."""
    f = vm.figures(
        outcome(
            tmp_path,
            {"swsusp": ""},
            marks=[("B-save-up", 3.0), ("B-job", 12.5), ("B-saved", 19.0)],
        )
    )
    assert [s for _, s in vm.phases("kjumpd", "hibernate", f)] == [2.5, 6.5, 1.0]


def test_memory_saved_counts_the_pages_that_are_not_zero_as_swsusp_does(tmp_path):
    """swsusp's "Wrote N kbytes" leaves zero pages out; kjumpd's "N MiB of memory" has the
    zero pages that were not free in it, so the bench takes those out again."""
    out = outcome(tmp_path, {"swsusp": ""})
    line = (
        "kjump-agent: SAVED: 380 MiB of memory, 253 MiB written, 143401 zero pages skipped "
        "(131482 of them free in the main kernel, not read), in 2.76 s"
    )
    out.marks = [Event(20.0, "B-saved", {"line": line}, 1)]
    f = vm.figures(out)
    assert f["image_bytes"] == 253 << 20
    assert f["memory_bytes"] == (380 << 20) - (143401 - 131482) * 4096


def test_the_daemons_anonymous_memory_is_read_from_the_guests_process_line(tmp_path):
    log = tmp_path / "console-1.log"
    log.write_text(
        "[   46.571] KJUMP-PROCS: shutdown python3:97:161408+8996 kjumpd:53:34524+14344 "
        "dbus-daemon:52:492+3488\n"
    )
    out = outcome(tmp_path, {"swsusp": ""})
    out.logs = [log]
    assert vm.figures(out)["daemon_anon_bytes"] == 34524 << 10
    log.write_text("[   46.571] KJUMP-PROCS: swsusp python3:97:161408+8996\n")
    assert vm.figures(out)["daemon_anon_bytes"] is None


def test_a_refused_swsusp_has_no_latency(tmp_path):
    f = vm.figures(outcome(tmp_path, {"swsusp": "refused:ENOMEM"}))
    assert f["hibernate_s"] is None and f["resume_s"] is None
    assert f["swsusp"] == "refused:ENOMEM"


def test_the_picture_draws_each_phase_to_scale(tmp_path):
    path = tmp_path / "phases.svg"
    vm.svg(
        [
            ("kjumpd small", "hibernate", [("a", 2.0), ("b", 6.0)]),
            ("swsusp", "resume", [("c", 4.0)]),
        ],
        path,
    )
    rects = [
        r
        for r in ET.parse(path).getroot().iter("{http://www.w3.org/2000/svg}rect")
        if r.find("{http://www.w3.org/2000/svg}title") is not None
    ]
    widths = {
        r.find("{http://www.w3.org/2000/svg}title").text: float(r.get("width")) for r in rects
    }
    assert widths["b: 6.00 s"] == pytest.approx(3 * widths["a: 2.00 s"])
    assert widths["c: 4.00 s"] == pytest.approx(2 * widths["a: 2.00 s"])


def test_the_report_compares_each_load_and_says_when_the_kernel_refused(
    tmp_path, monkeypatch, capsys
):
    marks = [("B-save-up", 14.0), ("B-saved", 19.0), ("R-decision", 28.0)]

    def run(a, base, key, who, name, **kw):
        system, load = key.split("-", 1)
        if system == "swsusp" and load == "over-half":
            out = outcome(tmp_path, {"swsusp": "refused:ENOMEM"}, boots=[{"boot": 1, "end": 30.0}])
        else:
            out = outcome(tmp_path, {"swsusp": "resumed"} if system == "swsusp" else {}, marks)
            if system == "kjumpd":
                out.results = [
                    {
                        "durations": {"jump": 0.25, "preflight": 0.5},
                        "stats": {"steps": {"kexec load": 0.125}},
                    }
                ]
        out.passed = True
        return out

    monkeypatch.setattr(vm, "_run", run)
    assert vm.scale(None, tmp_path, set()) == 0  # type: ignore[arg-type]
    text = capsys.readouterr().out
    over = text[text.index("load over-half") :]
    assert "refused:ENOMEM" in over.splitlines()[2] and "NOT met" not in over.split("straight")[0]
    assert "swsusp refused:ENOMEM (it must refuse), kjumpd restored it intact" in text
    assert re.search(r"hibernate latency +10\.00 s +10\.00 s +1\.00x  <= 1\.0x: met", text)
    assert re.search(r"hibernate latency +10\.00 s +10\.00 s +1\.00x  <= 0\.7x: NOT met", text)
    assert "  kjumpd's phases in A: preflight 0.50 s, jump 0.25 s\n" in text
    assert "  its timed steps: kexec load 0.12 s\n" in text
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["loads"]["small"]["a_phases"]["preflight"] == 0.5
    assert report["fits"]["kjumpd.hibernate_s"]["per_gib_s"] == pytest.approx(0.0)
    assert (tmp_path / "phases.svg").exists()


def test_a_run_reports_the_daemons_own_phases_and_steps(tmp_path):
    """Where "A prepares" goes: the phases and steps of the daemon's result record."""
    out = outcome(tmp_path, {"swsusp": ""})
    out.results = [
        {"result": "rolled-back", "durations": {"preflight": 9.0}},
        {
            "result": "resumed",
            # as the guest prints it: keys sorted by name
            "durations": {"freeze tasks": 0.5, "jump": 0.1, "preflight": 0.25, "undo": 0.2},
            "stats": {"steps": {"undo thaw": 0.1, "cgroup freeze": 0.4}},
        },
    ]
    got = vm.figures(out)["a_phases"]
    assert list(got.items()) == [
        ("preflight", 0.25),
        ("freeze tasks", 0.5),
        ("jump", 0.1),
        ("undo", 0.2),
        ("step: cgroup freeze", 0.4),
        ("step: undo thaw", 0.1),
    ]
    assert vm.figures(outcome(tmp_path, {"swsusp": ""}))["a_phases"] == {}


def test_assets_older_than_a_changed_source_are_reported_stale(tmp_path, monkeypatch):
    """A bench of VM assets built before a source changed would measure the old code."""
    import os

    from tests.vm import assets

    manifest = tmp_path / "vm-assets.json"
    manifest.write_text("{}")
    monkeypatch.setattr(assets, "manifest_path", lambda: manifest)
    source = assets.REPO / "kjumpd" / "image" / "chunk.py"
    built = source.stat().st_mtime + 10
    os.utime(manifest, (built, built))
    assert source not in assets.newer_sources()
    os.utime(manifest, (built - 3600 * 24 * 365 * 30, built - 3600 * 24 * 365 * 30))
    assert source in assets.newer_sources()
