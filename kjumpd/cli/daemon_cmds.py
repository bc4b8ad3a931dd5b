"""kjumpctl commands that talk to kjumpd over D-Bus (org.kjump.Manager1).

  hibernate [--mode MODE]  save the image and perform MODE (default: the configured mode)
  suspend-to-both          save the image, then suspend to RAM
  checkpoint               save the image and keep running
  status [--json]          state, phase, image state and the last result
  cancel                   stop the running transition (it rolls back)

The transition commands show a live progress bar (from the Progress signal) on a terminal, a
line per phase otherwise, and wait for the outcome (LastResult); ``--no-wait`` returns once
kjumpd has accepted the request. Ctrl-C while waiting asks kjumpd to cancel. They talk to the
bus through kjumpd.cli.busclient (a plain socket: no gi import on the way to the request);
status and cancel use GDBus.
When kjumpd is not on the bus: a one-line message and exit code 4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from kjumpd import errors
from kjumpd.cli import utc_text
from kjumpd.errors import (
    BusyError,
    CancelledError,
    ConfigError,
    DaemonNotRunningError,
    KjumpError,
    NotAuthorizedError,
    UnsupportedError,
)

BUS_NAME = "org.kjump.Manager1"
OBJECT_PATH = "/org/kjump/Manager1"
INTERFACE = "org.kjump.Manager1"
PROPS = "org.freedesktop.DBus.Properties"

#: a start may wait for a polkit authentication dialog
START_TIMEOUT_MS = 130_000
CALL_TIMEOUT_MS = 60_000

_NOT_RUNNING = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
    "org.freedesktop.DBus.Error.NoReply",
}
_BY_DBUS_NAME: dict[str, type[KjumpError]] = {
    "Busy": BusyError,
    "Cancelled": CancelledError,
    "NotAuthorized": NotAuthorizedError,
    "InvalidArgs": ConfigError,
    "NotSupported": UnsupportedError,
    "Failed": KjumpError,
    "FreezeFailed": errors.FreezeError,
    "TasksNotFrozen": errors.TaskFreezeError,
    "JumpFailed": errors.JumpError,
}


def error_from_dbus(name: str, message: str) -> KjumpError:
    """The KjumpError a D-Bus error stands for (the message already says what, why and fix)."""
    if name in _NOT_RUNNING:
        return DaemonNotRunningError(
            "kjumpd is not running",
            why=message,
            fix="start it: systemctl start kjumpd (or run kjumpd as root)",
        )
    if name == "org.freedesktop.DBus.Error.AccessDenied":
        return NotAuthorizedError(
            "the bus refused the call",
            why=message,
            fix="install contrib/org.kjump.Manager1.conf, or run as root",
        )
    if name.startswith("org.kjump.Error."):
        cls = _BY_DBUS_NAME.get(name.rsplit(".", 1)[1], KjumpError)
        return cls(message)
    return KjumpError(f"kjumpd call failed: {message}", why=name)


def error_class(name: str) -> type[KjumpError]:
    """kjumpd.errors.<name> when it is a KjumpError class (LastResult's error_class)."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, KjumpError):
        return cls
    return KjumpError


def result_error(record: dict[str, Any]) -> KjumpError | None:
    """The error a LastResult record reports, or None when the transition succeeded."""
    if str(record.get("result", "")).lower() not in {"failed", "cancelled", "aborted", "error"}:
        return None
    cls = error_class(str(record.get("error_class", "")))
    if cls is KjumpError and record.get("error"):
        cls = _BY_DBUS_NAME.get(str(record["error"]).rsplit(".", 1)[-1], KjumpError)
    return cls(
        str(record.get("message") or f"{record.get('mode', 'transition')} {record.get('result')}")
    )


class ManagerClient:
    """org.kjump.Manager1 through plain GDBus calls (no introspection round trip)."""

    def __init__(self, address: str | None) -> None:
        from gi.repository import Gio, GLib

        self.Gio, self.GLib = Gio, GLib
        try:
            if address:
                self.con = Gio.DBusConnection.new_for_address_sync(
                    address,
                    Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                    | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
                    None,
                    None,
                )
            else:
                self.con = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
        except GLib.Error as e:
            raise DaemonNotRunningError(
                "kjumpd is not reachable",
                why=f"cannot connect to the bus {address or '(system)'}: {e.message}",
                fix="start the system bus (systemctl start dbus)",
            ) from None

    def _error(self, e: Any) -> KjumpError:
        Gio = self.Gio
        if Gio.DBusError.is_remote_error(e):
            name = Gio.DBusError.get_remote_error(e)
            message = e.message
            prefix = f"GDBus.Error:{name}: "
            if message.startswith(prefix):
                message = message[len(prefix) :]
            return error_from_dbus(name, message)
        return DaemonNotRunningError(
            "kjumpd did not answer", why=e.message, fix="check it: systemctl status kjumpd"
        )

    def call(
        self,
        method: str,
        args: tuple[Any, ...] = (),
        in_sig: str = "",
        out_sig: str = "()",
        timeout_ms: int = CALL_TIMEOUT_MS,
        interface: str = INTERFACE,
    ) -> tuple[Any, ...]:
        GLib = self.GLib
        params = GLib.Variant(f"({in_sig})", args) if in_sig else None
        try:
            reply = self.con.call_sync(
                BUS_NAME,
                OBJECT_PATH,
                interface,
                method,
                params,
                GLib.VariantType(out_sig),
                self.Gio.DBusCallFlags.ALLOW_INTERACTIVE_AUTHORIZATION,
                timeout_ms,
                None,
            )
        except GLib.Error as e:
            raise self._error(e) from None
        return tuple(reply.unpack())

    def properties(self) -> dict[str, Any]:
        (props,) = self.call("GetAll", (INTERFACE,), "s", "(a{sv})", interface=PROPS)
        return dict(props)

    def subscribe(
        self,
        member: str | None,
        callback: Callable[[str, tuple[Any, ...]], None],
        interface: str = INTERFACE,
        arg0: str | None = None,
        sender: str = BUS_NAME,
        path: str | None = OBJECT_PATH,
    ) -> int:
        def on_signal(
            con: Any, sender_: str, path_: str, iface: str, name: str, params: Any
        ) -> None:
            callback(name, tuple(params.unpack()))

        return self.con.signal_subscribe(
            sender, interface, member, path, arg0, self.Gio.DBusSignalFlags.NONE, on_signal
        )


# --------------------------------------------------------------------------- progress
class ProgressView:
    """A progress bar on a terminal, one line per phase otherwise (both on stderr)."""

    def __init__(self, stream: Any = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.phase = ""
        self._drawn = False

    def bar(self, phase: str, percent: float) -> str:
        pct = max(0.0, min(100.0, percent))
        done = int(self.width * pct / 100)
        return f"[{'#' * done}{'.' * (self.width - done)}] {pct:5.1f}% {phase}"

    def update(self, phase: str, percent: float) -> None:
        if self.tty:
            self.stream.write("\r" + self.bar(phase, percent).ljust(self.width + 40))
            self._drawn = True
        elif phase != self.phase:
            self.stream.write(f"kjumpctl: {phase} ({percent:.0f}%)\n")
        self.stream.flush()
        self.phase = phase

    def note(self, text: str) -> None:
        self.end()
        self.stream.write(f"kjumpctl: {text}\n")
        self.stream.flush()

    def end(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


# --------------------------------------------------------------------------- formatting
def plain_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def _when(ts: Any) -> str:
    try:
        return utc_text(float(ts))
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def describe_result(rec: dict[str, Any]) -> list[str]:
    if not rec:
        return ["last:      (none since kjumpd started)"]
    lines = [
        f"last:      {rec.get('mode', '?')}: {rec.get('result', '?')} "
        f"(finished {_when(rec.get('finished'))}, {float(rec.get('elapsed', 0.0)):.1f} s)"
    ]
    if rec.get("message"):
        lines.append(f"  error:   {rec['message']}")
    durations = rec.get("durations")
    if isinstance(durations, dict) and durations:
        lines.append(
            "  phases:  " + ", ".join(f"{k} {float(v):.2f} s" for k, v in durations.items())
        )
    for key, label, fmt in (
        ("image_size", "image", "{:,} bytes"),
        ("ratio", "ratio", "{:.2f}"),
        ("throughput", "speed", "{:.1f} MB/s"),
    ):
        if key in rec:
            try:
                lines.append(f"  {label + ':':<8} " + fmt.format(rec[key]))
            except (ValueError, TypeError):
                lines.append(f"  {label + ':':<8} {rec[key]}")
    return lines


def describe_status(props: dict[str, Any]) -> list[str]:
    lines = [f"state:     {props.get('State', '?')}"]
    if props.get("State") != "idle":
        lines.append(f"mode:      {props.get('Mode', '')}")
        lines.append(
            f"phase:     {props.get('Phase', '')} ({float(props.get('Progress', 0.0)):.0f}%)"
        )
    lines.append(f"image:     {props.get('ImageState', '?')}")
    if props.get("SaveKernel"):
        lines.append(f"save kernel: {props['SaveKernel']}")
    lines.extend(describe_result(props.get("LastResult") or {}))
    return lines


def recheck(address: str | None = None, timeout: float = 60.0) -> bool:
    """Have a running kjumpd run its checks now (Check()), so what logind offers follows a
    change just made (kjumpctl install, setup) instead of at its next periodic check. A
    daemon that is not running is not started (NO_AUTO_START). True when it answered."""
    from kjumpd.cli import busclient

    addr = address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or busclient.SYSTEM_BUS
    try:
        con = busclient.Connection(addr)
    except (busclient.BusError, busclient.RemoteError, OSError):
        return False
    try:
        con.call(
            BUS_NAME, OBJECT_PATH, INTERFACE, "Check", flags=busclient.NO_AUTO_START,
            timeout=timeout,
        )  # fmt: skip
        return True
    except (busclient.BusError, busclient.RemoteError, OSError, TimeoutError):
        return False
    finally:
        con.close()


# --------------------------------------------------------------------------- commands
class TransitionClient:
    """org.kjump.Manager1 for the transition commands, through kjumpd.cli.busclient (a plain
    socket: no gi import and no GDBus set-up on the way to the request)."""

    def __init__(self, address: str | None) -> None:
        from kjumpd.cli import busclient

        self.bc = busclient
        addr = address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or busclient.SYSTEM_BUS
        try:
            self.con = busclient.Connection(addr)
        except (busclient.BusError, OSError) as e:
            raise DaemonNotRunningError(
                "kjumpd is not reachable",
                why=f"cannot connect to the bus {address or '(system)'}: {e}",
                fix="start the system bus (systemctl start dbus)",
            ) from None
        except busclient.RemoteError as e:
            raise error_from_dbus(e.name, e.text) from None

    def _errors(self, fn: Callable[[], Any]) -> Any:
        bc = self.bc
        try:
            return fn()
        except bc.RemoteError as e:
            raise error_from_dbus(e.name, e.text) from None
        except TimeoutError:
            raise DaemonNotRunningError(
                "kjumpd did not answer",
                why="no reply in time",
                fix="check it: systemctl status kjumpd",
            ) from None
        except (bc.BusError, OSError) as e:
            raise DaemonNotRunningError(
                "kjumpd did not answer", why=str(e), fix="check it: systemctl status kjumpd"
            ) from None

    def subscribe(self) -> None:
        own = f"sender='{BUS_NAME}',path='{OBJECT_PATH}'"
        self._errors(
            lambda: self.con.add_matches(
                [
                    f"type='signal',{own},interface='{PROPS}',member='PropertiesChanged',"
                    f"arg0='{INTERFACE}'",
                    f"type='signal',{own},interface='{INTERFACE}',member='Progress'",
                    f"type='signal',{own},interface='{INTERFACE}',member='PrepareForSleep'",
                    "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',"
                    f"interface='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{BUS_NAME}'",
                ]
            )
        )

    def call(
        self,
        method: str,
        args: tuple[Any, ...] = (),
        in_sig: str = "",
        timeout_ms: int = CALL_TIMEOUT_MS,
    ) -> tuple[Any, ...]:
        return tuple(
            self._errors(
                lambda: self.con.call(
                    BUS_NAME,
                    OBJECT_PATH,
                    INTERFACE,
                    method,
                    in_sig,
                    args,
                    self.bc.ALLOW_INTERACTIVE_AUTHORIZATION,
                    timeout_ms / 1000,
                )
            )
        )

    def next_signal(self) -> Any:
        return self._errors(lambda: self.con.next(None))


def run_transition(
    args: argparse.Namespace, method: str, call_args: tuple[Any, ...] = (), in_sig: str = ""
) -> int:
    client = TransitionClient(args.bus)
    view = ProgressView()
    wait = not getattr(args, "no_wait", False)
    if wait:
        client.subscribe()
    client.call(method, call_args, in_sig, timeout_ms=START_TIMEOUT_MS)
    if not wait:
        print("kjumpctl: started; follow it with 'kjumpctl status'", file=sys.stderr)
        return 0
    rec: dict[str, Any] | None = None
    try:
        while rec is None:
            m = client.next_signal()
            body = m.body
            if (
                m.member == "PropertiesChanged"
                and m.interface == PROPS
                and m.path == OBJECT_PATH
                and len(body) == 3
                and body[0] == INTERFACE
            ):
                changed = body[1]
                if changed.get("State") == "idle":
                    rec = dict(changed.get("LastResult") or {})
            elif m.member == "Progress" and m.interface == INTERFACE and len(body) == 2:
                view.update(str(body[0]), float(body[1]))
            elif m.member == "PrepareForSleep" and m.interface == INTERFACE and body:
                view.note("the system is going to sleep" if body[0] else "back")
            elif (
                m.member == "NameOwnerChanged"
                and len(body) == 3
                and body[0] == BUS_NAME
                and not body[2]
            ):
                view.end()
                raise KjumpError(
                    "kjumpd exited during the transition", fix="see its log: journalctl -u kjumpd"
                )
    except KeyboardInterrupt:
        view.end()
        client.call("Cancel")
        print(
            "kjumpctl: interrupted: kjumpd is cancelling the transition and rolling back",
            file=sys.stderr,
        )
        return 130
    view.end()
    if getattr(args, "json", False):
        print(json.dumps(plain_json(rec), indent=2, sort_keys=True))
    err = result_error(rec)
    if err is not None:
        if getattr(args, "json", False):
            return _exit_code(err)
        raise err
    if not getattr(args, "json", False):
        for line in describe_result(rec):
            print(line)
    return 0


def _exit_code(err: KjumpError) -> int:
    from kjumpd.cli import exit_code_for

    return exit_code_for(err)


def cmd_hibernate(args: argparse.Namespace) -> int:
    return run_transition(args, "Hibernate", (args.mode or "",), "s")


def cmd_suspend_to_both(args: argparse.Namespace) -> int:
    return run_transition(args, "SuspendToBoth")


def cmd_checkpoint(args: argparse.Namespace) -> int:
    return run_transition(args, "Checkpoint")


def cmd_status(args: argparse.Namespace) -> int:
    props = ManagerClient(args.bus).properties()
    if args.json:
        print(json.dumps(plain_json(props), indent=2, sort_keys=True))
    else:
        for line in describe_status(props):
            print(line)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    (cancelled,) = ManagerClient(args.bus).call("Cancel", out_sig="(b)")
    print(
        "kjumpctl: cancelling the running transition"
        if cancelled
        else "kjumpctl: nothing to cancel (kjumpd is idle)",
        file=sys.stderr,
    )
    return 0


def register(sub: Any) -> None:
    from kjumpd.modes import MODES as modes

    def transition(name: str, help_: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument(
            "--no-wait", action="store_true", help="return once kjumpd accepted the request"
        )
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.set_defaults(func=func)
        return p

    p = transition(
        "hibernate", "hibernate through kjumpd (live progress; waits for the result)", cmd_hibernate
    )
    p.add_argument(
        "--mode",
        choices=modes,
        default=None,
        help="what to do once the image is saved (default: the configured mode): "
        "platform = ACPI S4, shutdown, reboot, suspend = S3 (suspend to both), "
        "test = save then continue (image invalidated), checkpoint = save, "
        "keep the image and continue",
    )
    transition("suspend-to-both", "save an image, then suspend to RAM", cmd_suspend_to_both)
    transition("checkpoint", "save an image of the running system and keep running", cmd_checkpoint)
    p = sub.add_parser("status", help="kjumpd's state, the image state and the last result")
    p.add_argument("--json", action="store_true", help="print the D-Bus properties as JSON")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("cancel", help="cancel the running transition (it rolls back)")
    p.set_defaults(func=cmd_cancel)
