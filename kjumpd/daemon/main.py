"""kjumpd: the daemon process serving org.kjump.Manager1 on the system bus.

    kjumpd [--sysroot DIR] [--bus ADDRESS] [--config FILE] [--log-level LEVEL]

Defaults: sysroot "/", the system bus (or the bus that activated it: DBUS_STARTER_ADDRESS),
/etc/kjumpd/kjumpd.toml (read through the sysroot).
Runs a GLib main loop; the transition runs in a worker thread (kjumpd.daemon.service).

- systemd: Type=notify. READY=1 once the name is owned, STATUS= on every state change,
  WATCHDOG=1 at half of WatchdogSec, STOPPING=1 on SIGTERM (kjumpd.daemon.sdnotify; all optional:
  without NOTIFY_SOCKET nothing is sent, as under the VM tier's plain init).
- Logs: to stderr. Under journald (JOURNAL_STREAM names our stderr) each line carries an
  sd-daemon "<N>" priority prefix and no timestamp; otherwise a timestamped line.
  While filesystems are frozen the transaction holds every record in memory
  (kjumpd.daemon.fsfreeze.HeldLogs swaps the root logger's handlers): journald writes to a frozen
  filesystem, and a blocked stderr must never block the thread that thaws it.
- SIGTERM/SIGINT: with no transition, release the name and exit 0. During one, cancel it (the
  transaction rolls back) and exit once it has finished (bounded by --stop-timeout).
- ``--recover``: thaw what a kjumpd that died inside the frozen window left frozen, undo the
  device writes one that died after quiescing left (kjumpd.daemon.freezeguard, quiesce;
  systemd's ExecStopPost). The daemon does the same at start.
- Exit codes: 0 clean stop; 1 failed to start (one line on stderr saying what, why and the fix).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from kjumpd import subcommands
from kjumpd.errors import ConfigError, KjumpError, UsageError

log = logging.getLogger("kjumpd")
#: seconds between two preflights that keep logind's offer of hibernation true (sleepconf)
SLEEP_OFFER_RECHECK = 30.0

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def journal_priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def stderr_is_journal(stream: TextIO, env: dict[str, str] | os._Environ[str]) -> bool:
    """JOURNAL_STREAM="dev:ino" names the journald stream when it matches our stderr."""
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prio = journal_priority(record.levelno)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def setup_logging(level: str, stream: TextIO | None = None) -> logging.Handler:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream, os.environ):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s kjumpd[%(process)d] %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pydbus logs every exception a method raises with a traceback; ours are expected
    # (named D-Bus errors, logged by kjumpd.daemon.service in one line).
    logging.getLogger("pydbus.registration").setLevel(logging.CRITICAL)
    return handler


def seconds_arg(text: str) -> float:
    """An argparse type: a finite number of seconds from 0 to a day; else exit 2."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number of seconds") from None
    if not 0 <= v <= 86400:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text[:40]} is not between 0 and 86400 seconds")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kjumpd",
        description="kjumpd: hibernation for Linux built on kexec jump "
        "(serves org.kjump.Manager1 on D-Bus)",
        epilog="exit codes: 0 ok, 1 failed, 2 usage",
    )
    p.add_argument(
        "--sysroot",
        default="/",
        type=subcommands.directory,
        help="system root (default /; tests use a fake tree)",
    )
    p.add_argument(
        "--bus",
        default=None,
        metavar="ADDRESS",
        help="D-Bus address to serve on (default: the system bus)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="configuration file (default /etc/kjumpd/kjumpd.toml under the sysroot)",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("KJUMPD_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    p.add_argument(
        "--stop-timeout",
        type=seconds_arg,
        default=60.0,
        metavar="SECONDS",
        help="on SIGTERM during a transition, wait this long for its rollback",
    )
    p.add_argument(
        "--recover",
        action="store_true",
        help="thaw the filesystems and processes a stopped kjumpd left frozen and undo the "
        "device writes it left, then exit (systemd runs this as ExecStopPost; nothing to "
        "do exits 0)",
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def load_config(sysroot: Any, path: str | None) -> Any:
    from kjumpd.daemon import config as cfgmod

    if path is None:
        return cfgmod.load(sysroot)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UsageError(
            f"configuration file {path} does not exist",
            fix="pass an existing file to --config",
            path=path,
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"cannot read {path}", why=str(e), fix="check its permissions", path=path
        ) from None
    return cfgmod.loads(text, path)


def read_image_state(sysroot: Any, cfg: Any) -> str:
    """The image header's state on the configured target, as text (EMPTY, SAVED, ...),
    read as the transaction reads it: through the block map, on the whole disk."""
    return _target_and_state(sysroot, cfg)[1]


def _target_and_state(sysroot: Any, cfg: Any) -> tuple[Any, str]:
    """(the translated target or None, read_image_state's text)."""
    from kjumpd.daemon import blockmap
    from kjumpd.image import store

    if not sysroot.path(cfg.target).exists():
        return None, f"unknown: target {cfg.target} does not exist (fix: run 'kjumpctl setup')"
    target, _uuid = blockmap.current(sysroot, cfg.target, restamp=False)
    dev, _sb = store.open_target(
        sysroot.path(target.disk), writable=False, offset=target.superblock_offset
    )
    try:
        return target, store.read_header(dev).state_text
    finally:
        dev.close()


RESTORABLE_STATES = ("SAVED", "RESTORING")


def oneshot_is_stale(image_state: str) -> bool:
    """True when the image in ``image_state`` (as read_image_state words it) cannot be restored,
    so a one-shot boot into the restore environment would only cost the user a boot.
    A missing target counts as no image; a state that could not be read does not."""
    if image_state.startswith("unknown: target "):
        return True
    if image_state.startswith(("unknown", "unreadable")):
        return False
    return image_state.split("(", 1)[0] not in RESTORABLE_STATES


def clear_stale_oneshot(sysroot: Any, image_state: str, target: Any = None) -> bool:
    """At start-up: when the image is not restorable (e.g. the restore environment
    invalidated it), remove kjumpd's one-shot boot entry, and kjumpd's token from the LUKS
    volume holding ``target`` (R would ask for a passphrase for nothing). True when either
    was removed; never raises."""
    if not oneshot_is_stale(image_state):
        return False
    from kjumpd.daemon import bootentry, volumekey

    undo: list[tuple[str, Callable[[], bool]]] = [
        ("the one-shot boot into the restore environment", lambda: bootentry.clear_oneshot(sysroot))
    ]
    if target is not None and target.volume is not None:
        undo.append(
            (
                f"kjumpd's token in LUKS volume {target.volume.uuid}",
                lambda: volumekey.unmark_image(sysroot, target),
            )
        )
    removed_any = False
    for what, clear in undo:
        try:
            removed = clear()
        except (KjumpError, OSError) as e:
            log.warning("cannot clear %s: %s", what, e.message if isinstance(e, KjumpError) else e)
            continue
        if removed:
            log.info("image is %s: cleared %s", image_state, what)
        removed_any = removed_any or removed
    return removed_any


def _startup_image_state(sysroot: Any, cfg: Any) -> tuple[Any, str]:
    try:
        return _target_and_state(sysroot, cfg)
    except (KjumpError, OSError) as e:
        return None, f"unreadable: {e.message if isinstance(e, KjumpError) else e}"


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        import pydbus
        from gi.repository import GLib

        from kjumpd.daemon import authz, sdnotify, service
        from kjumpd.sysroot import Sysroot

        self.GLib = GLib
        self.args = args
        self.exit_code = 0
        self.sysroot = Sysroot(Path(args.sysroot))
        self.config = load_config(self.sysroot, args.config)
        # a kjumpd that died inside the frozen window, with nothing else to thaw after it
        from kjumpd.daemon import quiesce, taskfreeze

        try:
            taskfreeze.recover(self.sysroot, "an earlier kjumpd stopped inside the frozen window")
            quiesce.recover(self.sysroot)
        except KjumpError as e:
            log.error("%s", e.message)
        target, state = _startup_image_state(self.sysroot, self.config)
        clear_stale_oneshot(self.sysroot, state, target)
        # hash the save kernel's files now, not in the first hibernation's preflight (which
        # then only compares their stat)
        from kjumpd.daemon import preflight

        threading.Thread(
            target=preflight.warm_hashes,
            args=(self.sysroot, self.config),
            name="warm-hashes",
            daemon=True,
        ).start()
        self.notifier = sdnotify.Notifier()
        self.loop = GLib.MainLoop()
        if not args.bus and os.environ.get("DBUS_STARTER_ADDRESS"):
            args.bus = os.environ["DBUS_STARTER_ADDRESS"]  # started by bus activation
        try:
            self.bus = pydbus.connect(args.bus) if args.bus else pydbus.SystemBus()
        except GLib.Error as e:
            raise KjumpError(
                f"cannot connect to the bus {args.bus or '(system)'}",
                why=e.message,
                fix="start dbus-daemon or pass a reachable --bus",
                bus=args.bus or "system",
            ) from None
        self.bus.con.set_exit_on_close(False)
        self.bus.con.connect("closed", self._on_bus_closed)
        group = getattr(self.config, "authz_group", "") or None
        authorizer = authz.Authorizer(self.bus.con, group)

        def make_hibernation(events: Any) -> Any:
            from kjumpd.daemon.transaction import Hibernation

            return Hibernation(self.sysroot, self.config, events)

        from kjumpd.modes import MODES

        self.manager = service.Manager(
            make_hibernation,
            authorizer,
            image_state=lambda: read_image_state(self.sysroot, self.config),
            modes=MODES,
            default_mode=getattr(self.config, "mode", "platform"),
            flush=lambda: self.bus.con.flush_sync(None),
            checked=self._publish_offer,
        )
        self.manager.PropertiesChanged.connect(self._on_props)
        self.registration = service.register(self.bus, self.manager)
        self._own_name(service.BUS_NAME)
        self._stopping = False
        self._recheck_offer = threading.Event()
        self._offer_lock = threading.Lock()
        self._offer_started = 0.0  # when the report last published was started
        threading.Thread(target=self._keep_sleep_offer, name="sleep-offer", daemon=True).start()

    def _keep_sleep_offer(self) -> None:
        """logind offers hibernation exactly when the preflight passes (kjumpd.daemon.sleepconf):
        at start, after each transition, and every SLEEP_OFFER_RECHECK seconds."""
        from kjumpd.daemon import preflight, sleepconf

        self._recheck_offer.set()
        while True:
            self._recheck_offer.wait(SLEEP_OFFER_RECHECK)
            self._recheck_offer.clear()
            if self.manager.busy or not sleepconf.integrated(self.sysroot):
                continue
            started = time.monotonic()
            try:
                report = preflight.run(self.sysroot, self.config)
            except (KjumpError, OSError) as e:
                log.warning("cannot update what logind offers: %s", e)
                continue
            self._publish_offer(report, started)

    def _publish_offer(self, report: Any, started: float | None = None) -> None:
        """Offer hibernation to logind, or withhold it, as this preflight report says (the
        periodic check, and every D-Bus Check(): `kjumpctl install` asks for one). A report
        started before the one last published is dropped: it may predate the change."""
        from kjumpd.daemon import service, sleepconf

        if not sleepconf.integrated(self.sysroot):
            return
        started = time.monotonic() if started is None else started
        reasons = service.preflight_reasons(report)
        with self._offer_lock:
            if started < self._offer_started:
                return
            self._offer_started = started
            try:
                changed = sleepconf.publish(self.sysroot, bool(report.ok), reasons)
            except (KjumpError, OSError) as e:
                log.warning("cannot update what logind offers: %s", e)
                return
        if changed == "offered":
            log.info("logind offers hibernation again: the preflight passes")
        elif changed == "withheld":
            log.info("logind withholds hibernation: %s", reasons[0] if reasons else "")

    def _own_name(self, name: str) -> None:
        GLib = self.GLib
        try:
            (res,) = self.bus.con.call_sync(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "RequestName",
                GLib.Variant("(su)", (name, 4)),
                GLib.VariantType("(u)"),
                0,
                10_000,
                None,
            ).unpack()
        except GLib.Error as e:
            raise KjumpError(
                f"cannot own the bus name {name}",
                why=e.message,
                fix="install contrib/org.kjump.Manager1.conf into "
                "/usr/share/dbus-1/system.d/ and run kjumpd as root",
            ) from None
        if res not in (1, 4):
            raise KjumpError(
                f"cannot own the bus name {name}",
                why="another process (another kjumpd?) owns it",
                fix="stop the other kjumpd (systemctl stop kjumpd)",
            )

    def status_text(self) -> str:
        m = self.manager
        if m.get_property("State") == "idle":
            return f"idle; image {m.get_property('ImageState')}"
        return (
            f"{m.get_property('State')} {m.get_property('Mode')}: "
            f"{m.get_property('Phase')} {m.get_property('Progress'):.0f}%"
        )

    def _on_props(self, iface: str, changed: dict[str, Any], invalidated: list[str]) -> None:
        if {"State", "Phase"} & set(changed):
            self.notifier.status(self.status_text())
        if changed.get("State") == "idle":
            self._recheck_offer.set()

    def _on_bus_closed(self, con: Any, remote_peer_vanished: bool, error: Any) -> None:
        log.error("lost the bus connection%s", f": {error.message}" if error else "")
        self.exit_code = 1
        self.manager.cancel_all()
        self._stop_when_idle()

    def _on_signal(self, signum: int) -> bool:
        name = signal.Signals(signum).name
        if self.manager.busy:
            log.warning("%s during a transition: cancelling it and waiting for its rollback", name)
            self.notifier.stopping("cancelling the running transition")
            self.manager.cancel_all()
        else:
            log.info("%s: stopping", name)
            self.notifier.stopping("stopping")
        self._stop_when_idle()
        return True

    def _stop_when_idle(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        GLib = self.GLib
        deadline = GLib.get_monotonic_time() + int(self.args.stop_timeout * 1e6)

        def check() -> bool:
            if not self.manager.busy or GLib.get_monotonic_time() > deadline:
                if self.manager.busy:
                    log.error(
                        "the transition did not finish within %.0f s; exiting anyway",
                        self.args.stop_timeout,
                    )
                    self.exit_code = 1
                self.loop.quit()
                return False
            return True

        if check():
            GLib.timeout_add(100, check)

    def run(self) -> int:
        GLib = self.GLib
        for sig in (signal.SIGTERM, signal.SIGINT):
            GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, self._on_signal, sig)
        if self.notifier.watchdog:
            GLib.timeout_add(
                max(1, int(self.notifier.watchdog * 1000)), lambda: self.notifier.ping() or True
            )
        self.notifier.ready(self.status_text())
        self.manager.start_warm_up()
        log.info(
            "serving org.kjump.Manager1 on %s (sysroot %s)",
            self.args.bus or "the system bus",
            self.args.sysroot,
        )
        self.loop.run()
        if not self.manager.wait_housekeeping(self.args.stop_timeout):
            log.error(
                "the last transition's housekeeping did not finish within %.0f s",
                self.args.stop_timeout,
            )
        try:
            self.registration.unregister()
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.debug("unregister: %s", e)
        self.notifier.close()
        log.info("stopped")
        return self.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    if args.recover:
        from kjumpd.daemon.freezeguard import recover_main

        return recover_main(args.sysroot)
    try:
        daemon = Daemon(args)
        return daemon.run()
    except UsageError as e:
        return subcommands.usage_error(build_parser(), "kjumpd", e)
    except KjumpError as e:
        log.error("%s", e.message)
        return 1
    except Exception as e:  # a bug: one line for the operator, the traceback at debug level
        log.error("internal error: %s (fix: report a bug with this log)", e or type(e).__name__)
        log.debug("traceback", exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
