"""The VM tier's workload and its checker (both run inside the guest).

``serve``: a process that holds SIZE bytes of known data (seeded pseudo-random bytes, mlock'd
where allowed, so the data must come back from the image, never from swap or disk) and a counter
a thread keeps incrementing. It answers on a unix socket (/run/kjumpvm/workload.sock), one JSON
line per request:

  {"cmd": "status"}  -> {"pid", "start_time", "counter", "size", "seed", "mlocked", "digest"}

``digest``: the CRC-32 of each MiB of the data, in hex. It names the MiB that changed, and
it costs a tenth of a SHA-256 of the same bytes under TCG (55 MiB/s there: seconds for
200 MiB, three times a scenario).

``check``: a separate process that regenerates the expected bytes from the seed, asks the
workload for its digest and counter, compares them with a baseline taken before the hibernation,
and prints exactly one verdict line on the console:

  KJUMP-VERDICT: PASS scenario=b data=byte-exact counter=1234->1300 pid=321 ...
  KJUMP-VERDICT: FAIL scenario=b reason="data differs: ..." ...

The host reads that line from the serial log; nothing about the verdict is decided by timing.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import socket
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

SOCKET = Path("/run/kjumpvm/workload.sock")
DEFAULT_SIZE = 200 << 20
DEFAULT_SEED = 0x6B6A756D70  # "kjump"
CHUNK = 1 << 20
VERDICT_PREFIX = "KJUMP-VERDICT:"


def expected_chunks(seed: int, size: int) -> Iterator[bytes]:
    """The workload's data, CHUNK by CHUNK: deterministic for (seed, size).

    One CHUNK of seeded pseudo-random bytes, rotated by a different amount (i * 4099 bytes, not
    a page multiple) for each chunk i: every 4 KiB page of the data is distinct and
    incompressible, and generating it costs slicing, not a random draw per byte (this runs
    under TCG)."""
    return rotated_chunks(random.Random(seed).randbytes(CHUNK), size)


def rotated_chunks(base: bytes, size: int) -> Iterator[bytes]:
    """``size`` bytes as rotations of ``base`` (CHUNK bytes): chunk i rotated by i * 4099."""
    left, i = size, 0
    while left > 0:
        k = (i * 4099) % CHUNK
        chunk = base[k:] + base[:k]
        n = min(CHUNK, left)
        yield chunk[:n]
        left -= n
        i += 1


def digest_of(data: mmap.mmap | bytes) -> str:
    """The CRC-32 of each CHUNK of ``data``, 8 hex digits each."""
    with memoryview(data) as view:
        return "".join(f"{zlib.crc32(view[o : o + CHUNK]):08x}" for o in range(0, len(view), CHUNK))


def expected_digest(seed: int, size: int) -> str:
    return "".join(f"{zlib.crc32(chunk):08x}" for chunk in expected_chunks(seed, size))


def differing_mib(digest: str, expected: str) -> list[int]:
    """The chunks (MiB) whose CRCs differ, the missing or extra ones included."""
    n = max(len(digest), len(expected)) // 8
    return [i for i in range(n) if digest[i * 8 : i * 8 + 8] != expected[i * 8 : i * 8 + 8]]


@dataclass
class Status:
    pid: int
    start_time: float
    counter: int
    size: int
    seed: int
    mlocked: bool
    digest: str


class Workload:
    def __init__(self, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> None:
        self.size = size
        self.seed = seed
        self.buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        off = 0
        for chunk in expected_chunks(seed, size):
            self.buf[off : off + len(chunk)] = chunk
            off += len(chunk)
        self.mlocked = self._mlock()
        self.counter = 0
        self.start_time = time.time()
        self._lock = threading.Lock()

    def _mlock(self) -> bool:
        """Pin the data in RAM (root has CAP_IPC_LOCK); a refusal is reported, not fatal."""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        anchor = ctypes.c_char.from_buffer(self.buf)
        try:
            return libc.mlock(ctypes.addressof(anchor), self.size) == 0
        finally:
            del anchor

    def tick(self) -> None:
        while True:
            with self._lock:
                self.counter += 1
            time.sleep(0.01)

    def status(self) -> Status:
        with self._lock:
            counter = self.counter
        digest = digest_of(self.buf)
        return Status(
            os.getpid(), self.start_time, counter, self.size, self.seed, self.mlocked, digest
        )


def serve(size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED, sock_path: Path = SOCKET) -> None:
    wl = Workload(size, seed)
    threading.Thread(target=wl.tick, daemon=True).start()
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    if sock_path.exists():
        sock_path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(4)
    print(f"workload: ready pid={os.getpid()} size={size} mlocked={wl.mlocked}", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            line = conn.makefile("r").readline()
            try:
                req = json.loads(line)
            except ValueError:
                req = {}
            if req.get("cmd") == "status":
                reply = asdict(wl.status())
            else:
                reply = {"error": f"unknown request {line.strip()!r}"}
            conn.sendall((json.dumps(reply) + "\n").encode())


def query(sock_path: Path = SOCKET, timeout: float = 120.0) -> Status:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    with s:
        s.connect(str(sock_path))
        s.sendall(b'{"cmd": "status"}\n')
        data = s.makefile("r").readline()
    return Status(**json.loads(data))


def wait_ready(sock_path: Path = SOCKET, timeout: float = 300.0) -> Status:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return query(sock_path)
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def verdict(
    scenario: str,
    before: Status | None,
    after: Status | None,
    expected: str,
    extra: dict[str, str] | None = None,
    problems: list[str] | None = None,
) -> tuple[bool, str]:
    """Compare the workload after the event with its baseline; return (ok, verdict line)."""
    problems = list(problems or [])
    fields = {"scenario": scenario}
    if after is None:
        problems.append("workload not reachable after the event")
    else:
        if after.digest != expected:
            bad = differing_mib(after.digest, expected)
            problems.append(
                f"data differs from the seed in {len(bad)} of {len(expected) // 8} MiB "
                f"(the first at MiB {bad[0] if bad else '?'})"
            )
        else:
            fields["data"] = "byte-exact"
        fields["size"] = str(after.size)
        fields["mlocked"] = str(after.mlocked).lower()
        if before is not None:
            fields["counter"] = f"{before.counter}->{after.counter}"
            fields["pid"] = str(after.pid)
            if after.pid != before.pid or after.start_time != before.start_time:
                problems.append(
                    f"workload is a different process (pid {before.pid} -> {after.pid})"
                )
            elif after.counter <= before.counter:
                problems.append(f"counter did not continue ({before.counter} -> {after.counter})")
    fields.update(extra or {})
    ok = not problems
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    if ok:
        return True, f"{VERDICT_PREFIX} PASS {text}"
    reason = "; ".join(problems).replace('"', "'")
    return False, f'{VERDICT_PREFIX} FAIL {text} reason="{reason}"'


def parse_verdict(line: str) -> tuple[bool, dict[str, str]] | None:
    """Parse a verdict line as printed by `verdict` (the host side uses this)."""
    idx = line.find(VERDICT_PREFIX)
    if idx < 0:
        return None
    rest = line[idx + len(VERDICT_PREFIX) :].strip()
    word, _, rest = rest.partition(" ")
    fields: dict[str, str] = {}
    while rest:
        rest = rest.lstrip()
        key, eq, rest = rest.partition("=")
        if not eq:
            break
        if rest.startswith('"'):
            val, _, rest = rest[1:].partition('"')
        else:
            val, _, rest = rest.partition(" ")
        fields[key.strip()] = val
    return word == "PASS", fields


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if not args or args[0] not in ("serve", "status"):
        print("usage: workload.py serve [SIZE_MIB] | status", file=sys.stderr)
        return 2
    if args[0] == "serve":
        size = int(args[1]) << 20 if len(args) > 1 else DEFAULT_SIZE
        serve(size)
        return 0
    print(json.dumps(asdict(query())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
