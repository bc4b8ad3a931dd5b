"""Sleep hooks, run as systemd-sleep runs them.

Executables in /usr/lib/systemd/system-sleep/ and /etc/kjumpd/sleep.d/ (config
``hooks.dirs``; a name in a later directory overrides the same name in an earlier one),
sorted by name, each called with two arguments: ``pre`` or ``post``, and ``hibernate`` (or
``hybrid-sleep`` for mode suspend, which saves an image and then sleeps in RAM), with
SYSTEMD_SLEEP_ACTION set to the same verb. Each hook is bounded by ``timeouts.hooks``.
A failing "pre" hook stops the hibernation when ``hooks.policy`` is "abort" (the hooks that
ran get their "post" call during rollback); with "continue" it is reported and ignored.
"post" failures are always only reported.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass

from kjumpd.errors import HookError
from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HookResult:
    name: str
    path: str
    returncode: int  # -1: timed out or could not start
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def verb(mode: str) -> str:
    return "hybrid-sleep" if mode == "suspend" else "hibernate"


def discover(sysroot: Sysroot, dirs: tuple[str, ...]) -> list[tuple[str, str]]:
    """[(name, system path)] of executable hooks, by name, later dirs overriding."""
    found: dict[str, str] = {}
    for d in dirs:
        for name in sysroot.listdir(d):
            p = f"{d}/{name}"
            real = sysroot.path(p)
            if real.is_file() and os.access(real, os.X_OK):
                found[name] = p
    return sorted(found.items())


def run(
    sysroot: Sysroot,
    dirs: tuple[str, ...],
    phase: str,
    mode: str,
    timeout: float,
    only: list[str] | None = None,
) -> list[HookResult]:
    """Run every hook with (phase, verb); ``only`` restricts to these names (post calls
    for the hooks whose pre ran)."""
    v = verb(mode)
    results = []
    env = dict(os.environ, SYSTEMD_SLEEP_ACTION=v)
    for name, p in discover(sysroot, dirs):
        if only is not None and name not in only:
            continue
        try:
            r = subprocess.run(
                [str(sysroot.path(p)), phase, v],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                stdin=subprocess.DEVNULL,
                check=False,
            )
            res = HookResult(name, p, r.returncode, (r.stdout + r.stderr)[-2000:])
        except subprocess.TimeoutExpired:
            res = HookResult(name, p, -1, f"timed out after {timeout:g} s")
        except OSError as e:
            res = HookResult(name, p, -1, f"cannot run: {e.strerror or e}")
        (log.info if res.ok else log.warning)(
            "sleep hook %s %s %s: rc %d %s", p, phase, v, res.returncode, res.output.strip()[-200:]
        )
        results.append(res)
    return results


def check_policy(results: list[HookResult], policy: str) -> list[HookResult]:
    """Raise HookError for the first failure when policy is "abort"; return the failures."""
    failed = [r for r in results if not r.ok]
    if failed and policy == "abort":
        r = failed[0]
        tail = " | ".join(x.strip() for x in r.output.strip().splitlines()[-3:] if x.strip())
        raise HookError(
            f"sleep hook {r.path} failed",
            why=f"exit status {r.returncode}: {tail[-300:] or 'no output'}",
            fix='fix the hook, remove it, or set hooks.policy = "continue"',
            hook=r.path,
            returncode=r.returncode,
        )
    return failed
