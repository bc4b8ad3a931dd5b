"""Disk writers for the VM tier: what a busy machine does to its filesystems (in the guest).

``python3 -m kjumpvm.writers sqlite DIR``: commits one row to DIR/db.sqlite every 0.1 s
(WAL journal with its mapped index, synchronous=FULL: what a browser profile does).
``python3 -m kjumpvm.writers append DIR``: appends one 20-byte record to DIR/append.log and
fsyncs it every 0.05 s (what journald and an editor's swap file do); a record is
``%010d %08x\\n``: its sequence number and the CRC-32 of that number.

Each writer publishes, after each commit or fsync has returned, ``pid start_time committed``
in /run/kjumpvm/writer-<kind>.status (tmpfs, rewritten in place at a fixed width), so a
checker knows which records a user could count on.

``check(before)`` is what a user would notice after a hibernation: the same processes are
still writing, and every record committed before the request (and before the check) is on
the disk, whole and in order: ``PRAGMA integrity_check`` ok, sequence numbers 1..N with no
gap, no torn record in the appended file.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

STATUS_DIR = Path("/run/kjumpvm")
DATA_DIR = Path("/var/lib/kjumpvm/writers")
KINDS = ("sqlite", "append")
RECORD = 20


@dataclass(frozen=True)
class WriterStatus:
    pid: int
    start_time: int
    committed: int


def _start_time(pid: int | str = "self") -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])


class _Status:
    def __init__(self, kind: str) -> None:
        STATUS_DIR.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(STATUS_DIR / f"writer-{kind}.status", os.O_RDWR | os.O_CREAT, 0o644)
        self.head = f"{os.getpid()} {_start_time()} "

    def publish(self, committed: int) -> None:
        os.pwrite(self.fd, f"{self.head}{committed:<20d}\n".encode(), 0)


def record(seq: int) -> bytes:
    return b"%010d %08x\n" % (seq, zlib.crc32(b"%d" % seq))


def run_sqlite(directory: Path, period: float = 0.1) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(directory / "db.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS rec (seq INTEGER PRIMARY KEY, t REAL, payload TEXT)")
    status = _Status("sqlite")
    seq = db.execute("SELECT coalesce(max(seq), 0) FROM rec").fetchone()[0]
    status.publish(seq)
    while True:
        db.execute("BEGIN")
        db.execute("INSERT INTO rec VALUES (?, ?, ?)", (seq + 1, time.time(), "x" * 200))
        db.execute("COMMIT")
        seq += 1
        status.publish(seq)
        time.sleep(period)


def run_append(directory: Path, period: float = 0.05) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "append.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    seq = os.fstat(fd).st_size // RECORD
    status = _Status("append")
    status.publish(seq)
    while True:
        os.write(fd, record(seq + 1))
        os.fsync(fd)
        seq += 1
        status.publish(seq)
        time.sleep(period)


def status(kind: str) -> WriterStatus | None:
    try:
        words = (STATUS_DIR / f"writer-{kind}.status").read_text().split()
        return WriterStatus(int(words[0]), int(words[1]), int(words[2]))
    except (OSError, IndexError, ValueError):
        return None


def snapshot() -> dict[str, WriterStatus | None]:
    return {k: status(k) for k in KINDS}


def start(directory: Path = DATA_DIR, timeout: float = 120.0) -> dict[str, WriterStatus]:
    """Start both writers and wait until each has committed a few records."""
    for kind in KINDS:
        subprocess.Popen([sys.executable, "-m", "kjumpvm.writers", kind, str(directory)])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = snapshot()
        if all(s is not None and s.committed >= 10 for s in snap.values()):
            return snap  # type: ignore[return-value]
        time.sleep(0.1)
    raise RuntimeError(f"the disk writers did not start within {timeout:g} s: {snapshot()}")


def _drop_caches() -> None:
    """Clean page cache goes, so what is read next comes from the disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def check_sqlite(path: Path, committed: int) -> tuple[list[str], str]:
    problems = []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        ok = db.execute("PRAGMA integrity_check").fetchall()
        if ok != [("ok",)]:
            problems.append(f"sqlite integrity_check: {ok[:3]}")
        n, lo, hi = db.execute("SELECT count(*), min(seq), max(seq) FROM rec").fetchone()
    finally:
        db.close()
    if not n or lo != 1 or n != hi - lo + 1:
        problems.append(f"sqlite rows have gaps: {n} rows, seq {lo}..{hi}")
    elif hi < committed:
        problems.append(f"sqlite lost committed rows: {hi} on disk, {committed} committed")
    return problems, f"{n}"


def check_append(path: Path, committed: int) -> tuple[list[str], str]:
    problems = []
    data = path.read_bytes()
    whole = len(data) // RECORD
    for i in range(whole):
        if data[i * RECORD : (i + 1) * RECORD] != record(i + 1):
            problems.append(
                f"append.log record {i + 1} is torn or out of order: "
                f"{data[i * RECORD : (i + 1) * RECORD]!r}"
            )
            break
    if whole < committed:
        problems.append(f"append.log lost committed records: {whole} whole, {committed} fsync'd")
    return problems, f"{whole}"


def check(
    before: dict[str, WriterStatus], directory: Path = DATA_DIR, timeout: float = 120.0
) -> tuple[list[str], dict[str, str]]:
    """(problems, verdict fields) after an event: same writers, going on, nothing lost."""
    problems: list[str] = []
    fields: dict[str, str] = {}
    now = snapshot()
    for kind in KINDS:
        b, n = before.get(kind), now.get(kind)
        if b is None or n is None:
            problems.append(f"{kind} writer status missing")
            continue
        if (n.pid, n.start_time) != (b.pid, b.start_time):
            problems.append(f"{kind} writer is another process (pid {b.pid} -> {n.pid})")
        try:
            alive = _start_time(n.pid) == n.start_time
        except (OSError, IndexError, ValueError):
            alive = False
        if not alive:
            problems.append(f"{kind} writer (pid {n.pid}) is gone")
    if problems:
        return problems, fields
    # the writers go on: each commits more after the event
    deadline = time.monotonic() + timeout
    while True:
        later = snapshot()
        going = all(
            later[k] is not None and later[k].committed > now[k].committed + 2  # type: ignore[union-attr]
            for k in KINDS
        )
        if going or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not going:
        problems.append(f"the writers did not go on within {timeout:g} s: {now} -> {later}")
    committed = {k: later[k].committed for k in KINDS if later[k] is not None}  # type: ignore[union-attr]
    _drop_caches()
    p, rows = check_sqlite(directory / "db.sqlite", committed.get("sqlite", 0))
    problems += p
    p, recs = check_append(directory / "append.log", committed.get("append", 0))
    problems += p
    fields["writers"] = "intact" if not problems else "damaged"
    fields["sqlite"] = f"{before['sqlite'].committed}->{rows}"
    fields["append"] = f"{before['append'].committed}->{recs}"
    return problems, fields


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in KINDS:
        print("usage: python3 -m kjumpvm.writers sqlite|append DIR", file=sys.stderr)
        return 2
    (run_sqlite if argv[0] == "sqlite" else run_append)(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
