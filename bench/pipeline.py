"""`make bench`: the save/restore pipeline against `lz4 -1`, `lz4 -d` and a raw copy.

Generates (once, cached in $KJUMPD_CACHE/bench, default ~/.cache/kjumpd/bench) a 2 GiB
memory file of mixed pages: ~40 % zero pages, ~35 % text-like pages, ~25 % random pages.
Then, in one run, on the same disk, with the input in the page cache, each contender timed
in every round (the order rotated from round to round) and its best time kept:

  save     kjump-agent save (O_DIRECT writer, verify pass, SAVED header, fsync)
           vs `lz4 -1` of the same bytes and vs a raw `cat` copy, each followed by fsync
  restore  kjump-agent restore into a memory file (+ fsync) vs `lz4 -d` (+ fsync), both on
           the disk; and both into RAM (files on /dev/shm, as the save kernel restores into
           memory), when /dev/shm has room
  RSS      peak RSS of the agent (its own VmHWM, printed with --stats)
  AES      the same save and restore of an encrypted image (AES-256-GCM, --image-key), as
           the cost of encryption: its time over the plaintext run's, in the same rounds

and prints the ratios against the targets: save <= 0.5x lz4 -1 and <= 1.0x raw copy,
restore <= 0.3x lz4 -d, RSS <= 64 MiB. The machine may be shared: the load average is
printed with the figures. Nothing here asserts a time; it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from savekernel import buildcache

MiB = 1024 * 1024
PAGE = 4096
REPO = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    d = buildcache.cache_root() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def generate(path: Path, size: int, seed: int = 2026) -> None:
    """Mixed memory: zero, text-like and random pages, deterministic."""

    def write(tmp: Path) -> None:
        rnd = random.Random(seed)
        words = (
            b"the of and to in is for task_struct page mm vma inode dentry kmalloc slab "
            b"0x00000000 0xffffffff81000000 /usr/lib/x86_64-linux-gnu/libc.so.6 GLIBC_2.34 "
            b"return NULL; static int __init void *ptr = NULL; if (err) goto out; "
            b"LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin HOME=/root"
        ).split()
        corpus = b" ".join(rnd.choice(words) for _ in range(400_000))  # ~4 MB of "text"
        print(f"bench: generating {size >> 20} MiB of mixed memory in {path} ...", file=sys.stderr)
        zero = bytes(PAGE)
        with open(tmp, "wb") as f:
            batch = bytearray()
            for _ in range(size // PAGE):
                r = rnd.random()
                if r < 0.40:
                    batch += zero
                elif r < 0.75:
                    o = rnd.randrange(len(corpus) - PAGE)
                    batch += corpus[o : o + PAGE]
                else:
                    batch += rnd.randbytes(PAGE)
                if len(batch) >= 8 * MiB:
                    f.write(batch)
                    batch = bytearray()
            f.write(batch)
            f.flush()
            os.fsync(f.fileno())

    buildcache.build_entry(path, write, valid=lambda p: p.exists() and p.stat().st_size == size)


def fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(
    cmd: list[str], out: Path | None = None, stdout_to: Path | None = None
) -> tuple[float, int, str]:
    """Wall time (including fsync of ``out``), CPU seconds (user + system), stderr."""
    t0 = time.monotonic()
    fout = open(stdout_to, "wb") if stdout_to else subprocess.DEVNULL
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        p = subprocess.Popen(cmd, stdout=fout, stderr=subprocess.PIPE, env=env)
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        _, status, ru = os.wait4(p.pid, 0)
    finally:
        if stdout_to:
            fout.close()  # type: ignore[union-attr]
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed (rc {rc}): {err.strip()}")
    if out is not None:
        fsync_path(out)
    return time.monotonic() - t0, ru.ru_utime + ru.ru_stime, err


def drop(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048, help="memory size in MiB (default 2048)")
    ap.add_argument(
        "--chunk-sweep",
        action="store_true",
        help="also time saves with 256 KiB, 1 MiB and 4 MiB chunks",
    )
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument(
        "--repeat",
        type=int,
        default=6,
        help="rounds; the best time of each contender is reported (default 6)",
    )
    args = ap.parse_args(argv)
    if not shutil.which("lz4"):
        raise SystemExit("bench: the lz4 command is missing (apt install lz4)")
    d = cache_dir()
    size = args.size * MiB
    mem = d / f"mem-{args.size}M.bin"
    generate(mem, size)
    py = sys.executable
    agent = [py, "-m", "kjumpd.agent.cli"]
    img, lz, cp, back, back_lz = (
        d / "image.kjump",
        d / "mem.lz4",
        d / "mem.copy",
        d / "restored.bin",
        d / "restored-lz4.bin",
    )
    for p in (img, lz, cp, back, back_lz):
        drop(p)
    os.sync()
    load0 = os.getloadavg()
    # warm the input into the page cache (all contenders read it from memory)
    timed(["cat", str(mem)])
    # the target exists before a hibernation (kjumpctl setup): create it outside the timing
    timed(
        agent[:1]
        + [
            "-c",
            "import sys; from kjumpd.image import store; "
            f"store.create_target({str(img)!r}, {size + 64 * MiB})",
        ]
    )
    st = d / "stats.json"
    key = d / "image.key"
    key.write_text(os.urandom(32).hex() + "\n")
    img_enc, back_enc = d / "image-aes.kjump", d / "restored-aes.bin"
    drop(img_enc)
    timed(
        agent[:1]
        + [
            "-c",
            "import sys; from kjumpd.image import store; "
            f"store.create_target({str(img_enc)!r}, {size + 64 * MiB})",
        ]
    )
    best: dict[str, float] = {}
    rss_save = rss_rest = stored = 0
    verify_s = 0.0
    stages: dict[str, float] = {}
    r_stages: dict[str, float] = {}
    same = True

    cpu: dict[str, float] = {}

    def keep_best(name: str, t: float, c: float) -> None:
        best[name] = min(t, best.get(name, float("inf")))
        cpu[name] = min(c, cpu.get(name, float("inf")))
        os.sync()  # let writeback of this step finish outside the next timing

    def step_lz4() -> None:
        t, c, _ = timed(["lz4", "-1", "-f", "-q", str(mem), str(lz)], out=lz)
        keep_best("lz4", t, c)

    def step_cat() -> None:
        t, c, _ = timed(["cat", str(mem)], out=cp, stdout_to=cp)
        drop(cp)
        keep_best("cat", t, c)

    def step_save() -> None:
        nonlocal stored, rss_save, verify_s, stages
        t, c, _ = timed(
            agent
            + [
                "save",
                "--memory",
                str(mem),
                "--ranges",
                f"0-{size}",
                "--target",
                str(img),
                "--stats",
            ],
            out=img,
            stdout_to=st,
        )
        keep_best("save", t, c)
        s_st = json.loads(st.read_text().splitlines()[-1])
        stored, rss_save = s_st["stored_bytes"], max(rss_save, s_st["peak_rss"])
        if best["save"] == t:
            verify_s, stages = s_st["verify_seconds"], s_st.get("stages", {})

    def step_lz4d() -> None:
        t, c, _ = timed(["lz4", "-d", "-f", "-q", str(lz), str(back_lz)], out=back_lz)
        drop(back_lz)
        keep_best("lz4d", t, c)

    def step_restore() -> None:
        nonlocal rss_rest, r_stages
        drop(back)
        t, c, _ = timed(
            agent + ["restore", "--target", str(img), "--memory", str(back), "--stats"],
            out=back,
            stdout_to=st,
        )
        keep_best("restore", t, c)
        r_st = json.loads(st.read_text().splitlines()[-1])
        rss_rest = max(rss_rest, r_st["peak_rss"])
        if best["restore"] == t:
            r_stages = r_st.get("stages", {})

    ram = Path("/dev/shm")
    on_ram = ram.is_dir() and shutil.disk_usage(ram).free > 3 * size
    back_ram, back_lz_ram = ram / "kjumpd-bench-restored.bin", ram / "kjumpd-bench-lz4.bin"

    def step_lz4d_ram() -> None:
        t, c, _ = timed(["lz4", "-d", "-f", "-q", str(lz), str(back_lz_ram)])
        drop(back_lz_ram)
        keep_best("lz4d_ram", t, c)

    def step_restore_ram() -> None:
        nonlocal same
        drop(back_ram)
        t, c, _ = timed(agent + ["restore", "--target", str(img), "--memory", str(back_ram)])
        keep_best("restore_ram", t, c)
        same = same and subprocess.run(["cmp", "-s", str(mem), str(back_ram)]).returncode == 0
        drop(back_ram)

    def step_save_aes() -> None:
        t, c, _ = timed(
            agent
            + ["save", "--memory", str(mem), "--ranges", f"0-{size}", "--target", str(img_enc)]
            + ["--image-key", str(key), "--stats"],
            out=img_enc,
            stdout_to=st,
        )
        keep_best("save_aes", t, c)

    def step_restore_aes() -> None:
        nonlocal same
        drop(back_enc)
        t, c, _ = timed(
            agent
            + ["restore", "--target", str(img_enc), "--memory", str(back_enc)]
            + ["--image-key", str(key), "--stats"],
            out=back_enc,
            stdout_to=st,
        )
        keep_best("restore_aes", t, c)
        same = same and subprocess.run(["cmp", "-s", str(mem), str(back_enc)]).returncode == 0
        drop(back_enc)

    # each round runs the contenders in a rotated order, so that none of them always follows
    # the same heavy writer (the disk's and the page cache's state differ after each)
    saving = [step_lz4, step_cat, step_save, step_save_aes]
    restoring = [step_lz4d, step_restore, step_restore_aes]
    if on_ram:
        restoring += [step_lz4d_ram, step_restore_ram]
    for rnd in range(args.repeat):
        k, j = rnd % len(saving), rnd % len(restoring)
        for step in saving[k:] + saving[:k]:
            step()
        for step in restoring[j:] + restoring[:j]:
            step()
        same = same and subprocess.run(["cmp", "-s", str(mem), str(back)]).returncode == 0
        print(
            f"bench: round {rnd + 1}/{args.repeat} done (load {os.getloadavg()[0]:.2f})",
            file=sys.stderr,
        )
    t_lz4, t_cat, t_save, t_lz4d, t_rest = (
        best[k] for k in ("lz4", "cat", "save", "lz4d", "restore")
    )
    sweep = []
    if args.chunk_sweep:
        for cs in (128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024):  # the agent caps at 1 MiB
            t, c, _ = timed(
                agent
                + [
                    "save",
                    "--memory",
                    str(mem),
                    "--ranges",
                    f"0-{size}",
                    "--target",
                    str(img),
                    "--chunk-size",
                    str(cs),
                    "--stats",
                ],
                out=img,
                stdout_to=st,
            )
            sweep.append((cs, t, json.loads(st.read_text().splitlines()[-1])["peak_rss"]))
    load1 = os.getloadavg()
    lz_size = lz.stat().st_size
    if not args.keep:
        for p in (lz, back, img, img_enc):
            drop(p)

    def row(name: str, ours: float, base: float, target: float) -> str:
        ratio = ours / base if base else float("inf")
        ok = "MET" if ratio <= target else "MISSED"
        return (
            f"{name:<26} {ours:8.2f} s  vs {base:8.2f} s   ratio {ratio:5.2f}  "
            f"(target <= {target:.2f})  {ok}"
        )

    cpus = len(os.sched_getaffinity(0))
    print(
        f"kjumpd pipeline bench: {size >> 20} MiB mixed memory (~40% zero, ~35% text, "
        f"~25% random pages), {cpus} CPU(s)"
    )
    print(
        f"best of {args.repeat} round(s) per contender (order rotated each round), each "
        f"timing includes fsync of its output; input in the page cache"
    )
    print(
        f"load average before {load0[0]:.2f} {load0[1]:.2f}, after {load1[0]:.2f} "
        f"{load1[1]:.2f} (a shared machine skews every figure)"
    )
    print(
        f"save: {size / MiB / t_save:.0f} MiB/s, stored {stored >> 20} MiB "
        f"(lz4 -1: {lz_size >> 20} MiB), waiting for the verify pass after the last write "
        f"{verify_s:.2f} s"
    )
    if stages:
        print(
            "save stages (best run): "
            + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())
            + " (encode is CPU of all workers; read-back overlaps the save)"
        )
    print(row("save vs lz4 -1", t_save, t_lz4, 0.5))
    print(row("save vs raw copy (cat)", t_save, t_cat, 1.0))
    if r_stages:
        print(
            "restore stages (best run): " + ", ".join(f"{k} {v:.2f} s" for k, v in r_stages.items())
        )
    print(row("restore vs lz4 -d", t_rest, t_lz4d, 0.3))
    if on_ram:
        print(row("restore vs lz4 -d, in RAM", best["restore_ram"], best["lz4d_ram"], 0.3))
    else:
        print(f"{'restore into RAM':<26} not measured: /dev/shm is missing or too small")
    print(
        f"{'CPU s (user+sys, best)':<26} save {cpu['save']:.2f} vs lz4 -1 {cpu['lz4']:.2f}, "
        f"cat {cpu['cat']:.2f}; restore {cpu['restore']:.2f} vs lz4 -d {cpu['lz4d']:.2f} "
        f"(load-independent work; wall = CPU / parallelism on an idle machine)"
    )
    print(
        f"{'agent peak RSS':<26} save {rss_save / MiB:.1f} MiB, restore "
        f"{rss_rest / MiB:.1f} MiB (target <= 64)  "
        f"{'MET' if max(rss_save, rss_rest) <= 64 * MiB else 'MISSED'}"
    )
    print(
        f"{'AES-256-GCM save':<26} {best['save_aes']:8.2f} s  vs plaintext {t_save:8.2f} s   "
        f"cost {best['save_aes'] / t_save:5.2f}x  (CPU {cpu['save_aes']:.2f} vs "
        f"{cpu['save']:.2f} s)"
    )
    print(
        f"{'AES-256-GCM restore':<26} {best['restore_aes']:8.2f} s  vs plaintext {t_rest:8.2f} s"
        f"   cost {best['restore_aes'] / t_rest:5.2f}x  (CPU {cpu['restore_aes']:.2f} vs "
        f"{cpu['restore']:.2f} s)"
    )
    aes = "aes" in open("/proc/cpuinfo").read().split()
    print(f"{'CPU offers AES-NI':<26} {'yes' if aes else 'no'}")
    print(f"{'restore byte-exact':<26} {'yes' if same else 'NO'} (plaintext and AES-256-GCM)")
    for cs, t, r in sweep:
        print(f"chunk {cs >> 10:5d} KiB: save {t:6.2f} s, peak RSS {r / MiB:.1f} MiB")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
