"""VM guest helper: append each PrepareForSleep signal of login1 to a log, as a desktop
session sees them (``python3 -m kjumpvm.sleepwatch NAME LOG [once]``). With ``once`` it
exits at the first PrepareForSleep(true): run under ``systemd-inhibit --mode=delay`` it is a
delay inhibitor that lets the sleep go on once it has been told. ``LOG.NAME`` is created
once the subscription is in place."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from gi.repository import GLib
    from pydbus import SystemBus

    name, log = argv[0], Path(argv[1])
    once = "once" in argv[2:]
    loop = GLib.MainLoop()

    def fired(_sender, _obj, _iface, _signal, params) -> None:
        with open(log, "a") as f:
            f.write(f"{name} PrepareForSleep {params[0]}\n")
        if once and params[0]:
            loop.quit()

    SystemBus().subscribe(
        iface="org.freedesktop.login1.Manager", signal="PrepareForSleep", signal_fired=fired
    )
    Path(f"{log}.{name}").touch()
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
