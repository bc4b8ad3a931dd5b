"""What logind offers follows ``kjumpctl check``.

Once `kjumpctl install` routes systemd's hibernation through kjumpd (its drop-in for
systemd-hibernate.service), logind's CanHibernate must answer "yes" exactly when a
hibernation through kjumpd can work, and desktops must stop offering it when it cannot.
logind reads sleep.conf and its drop-ins, /run/systemd/sleep.conf.d/ among them, on every
CanHibernate and Hibernate call (src/shared/sleep-config.c); ``AllowHibernation=no`` there
makes it answer "na" and refuse. So the daemon keeps a runtime drop-in in that directory
while its preflight fails, and removes it once the preflight passes. /run is empty at the
next boot: a stopped or uninstalled kjumpd leaves nothing that outlives it.
"""

from __future__ import annotations

import logging
import os

from kjumpd.sysroot import Sysroot

log = logging.getLogger(__name__)

DROPIN = "/run/systemd/sleep.conf.d/kjumpd.conf"
#: exists while systemd is the service manager (sd_booted())
SYSTEMD_RUNNING = "/run/systemd/system"
#: what logind stops offering: every sleep kjumpd's drop-ins route through kjumpctl
WITHHELD = ("AllowHibernation", "AllowHybridSleep", "AllowSuspendThenHibernate")


def dropin_text(reasons: list[str]) -> str:
    """The drop-in that withholds hibernation, naming the first failed check."""
    first = " ".join((reasons[0] if reasons else "kjumpctl check fails").split())
    return (
        "# kjumpd: hibernation through kjumpd is not possible now; this runtime file goes away\n"
        "# when `kjumpctl check` passes again. First problem:\n"
        f"# {first}\n"
        "[Sleep]\n" + "".join(f"{key}=no\n" for key in WITHHELD)
    )


def integrated(sysroot: Sysroot) -> bool:
    """systemd runs the machine and `kjumpctl install` made its hibernation kjumpd's."""
    from kjumpd.daemon.install import SHIPPED

    hook = next(s.dest for s in SHIPPED if s.name == "kjumpd-hibernate.conf")
    return sysroot.exists(SYSTEMD_RUNNING) and sysroot.exists(hook)


def publish(sysroot: Sysroot, ok: bool, reasons: list[str]) -> str | None:
    """Offer (remove the drop-in) or withhold (write it) hibernation; return "offered" or
    "withheld" when that changed, None when nothing did (or systemd's hibernation is not
    kjumpd's, which is then left alone)."""
    if not integrated(sysroot):
        return None
    path = sysroot.path(DROPIN)
    if ok:
        if not path.exists():
            return None
        path.unlink()
        return "offered"
    text = dropin_text(reasons)
    try:
        if path.read_text() == text:
            return None
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return "withheld"
