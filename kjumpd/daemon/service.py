"""The D-Bus object: org.kjump.Manager1 at /org/kjump/Manager1 (names are a contract).

Interface ``org.kjump.Manager1``

Methods
  Hibernate(s mode)            start a hibernation; "" means the configured default mode.
                               Returns when the transition has started; follow the Progress
                               signal and the State / LastResult properties for the outcome.
  SuspendToBoth()              Hibernate("suspend"): save the image, then suspend to RAM.
  Checkpoint()                 Hibernate("checkpoint"): save the image and keep running.
  CanHibernate() -> (s, as)    answer yes | no | challenge | na, and one reason per missing
                               precondition, each saying how to fix it ("challenge": polkit
                               would allow it after authentication; "na": the preflight itself
                               refused with UnsupportedError; missing kernel support is a
                               "no" with its reason and fix, like every other
                               precondition). Preconditions first, then the caller's
                               authorization.
  Check() -> (b, a(sbbss))     the full preflight report: ok, then (name, ok, fatal, detail, fix)
                               items (a failed item that is not fatal is a warning).
  Cancel() -> b                ask the running transition to stop and roll back; false when idle.

Properties (PropertiesChanged is emitted for every change)
  State s        idle | running | cancelling
  Mode s         the mode of the running (or last) transition
  Phase s        the phase the running transition reports ("" when idle)
  Progress d     percent reported with that phase
  ImageState s   the state of the image header on the target (EMPTY, SAVED, ... or "unknown: why")
  SaveKernel s   the save kernel between hibernations ([save_kernel] warm): "parked (...)",
                 "warming up", or "loaded at each hibernation (why)"
  LastResult a{sv}  the outcome of the last transition: mode, result (resumed | continued |
                 woke-from-ram on success; failed | cancelled), error (D-Bus error name),
                 error_class, message, started, finished (unix time), elapsed (seconds,
                 CLOCK_BOOTTIME: includes the time in the save kernel and powered off), what the
                 transaction reports (durations per phase a{sd}, stats, image_state, ...) and
                 image_size (bytes), ratio (memory / image), throughput (MB/s of the save).

Signals
  PrepareForSleep(b)           true before the system sleeps, false after it resumed or the
                               transition was rolled back (as org.freedesktop.login1).
  Progress(s phase, d percent)
  Resumed(a{sv} stats)         after a resume from a saved image, with LastResult's record.

Errors are named D-Bus errors ``org.kjump.Error.<Name>`` (KjumpError.dbus_name) whose message is
the one-line "what: why (fix: ...)" of the error; e.g. org.kjump.Error.Busy for a request while
a transition runs, org.kjump.Error.NotAuthorized, org.kjump.Error.InvalidArgs for a bad mode.

Anyone on the bus may call: every method argument (the mode) is checked by :func:`bus_string`
for type, length and content before it is logged, compared or echoed, and a refusal
(org.kjump.Error.InvalidArgs) quotes at most ECHO_LIMIT characters of it. The interface takes
no dicts or arrays. The signature of every call and the names in Properties.Get/GetAll/Set are
checked by GDBus against INTROSPECTION before kjumpd sees them (its own replies quote an
unknown property name whole; kjumpd neither receives nor logs it).

Authorization (kjumpd.daemon.authz): Hibernate/SuspendToBoth need org.kjump.hibernate, Checkpoint
(and Hibernate("checkpoint")) org.kjump.checkpoint, Cancel of another user's transition
org.kjump.manage; reading properties, Check and CanHibernate need nothing. Callers are checked
before the Busy test, so a caller who may not act learns nothing about the state.

The transition runs in a worker thread (the main loop keeps answering); everything it reports
is marshalled back to the GLib main loop with GLib.idle_add, where signals are emitted.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gi.repository import GLib
from pydbus.generic import signal
from pydbus.registration import ObjectRegistration, ObjectWrapper

from kjumpd.daemon import authz
from kjumpd.errors import (
    ECHO_LIMIT,
    BusyError,
    CancelledError,
    ConfigError,
    KjumpError,
    UnsupportedError,
    shown,
)
from kjumpd.modes import MODES

log = logging.getLogger(__name__)
translog = logging.getLogger("kjumpd.transition")

BUS_NAME = "org.kjump.Manager1"
OBJECT_PATH = "/org/kjump/Manager1"
INTERFACE = "org.kjump.Manager1"
ERROR_PREFIX = "org.kjump.Error."


INTROSPECTION = f"""
<node>
  <interface name="{INTERFACE}">
    <method name="Hibernate"><arg direction="in" type="s" name="mode"/></method>
    <method name="SuspendToBoth"/>
    <method name="Checkpoint"/>
    <method name="CanHibernate">
      <arg direction="out" type="s" name="answer"/>
      <arg direction="out" type="as" name="reasons"/>
    </method>
    <method name="Check">
      <arg direction="out" type="b" name="ok"/>
      <arg direction="out" type="a(sbbss)" name="items"/>
    </method>
    <method name="Cancel"><arg direction="out" type="b" name="cancelled"/></method>
    <property name="State" type="s" access="read"/>
    <property name="Mode" type="s" access="read"/>
    <property name="Phase" type="s" access="read"/>
    <property name="Progress" type="d" access="read"/>
    <property name="ImageState" type="s" access="read"/>
    <property name="SaveKernel" type="s" access="read"/>
    <property name="LastResult" type="a{{sv}}" access="read"/>
    <signal name="PrepareForSleep"><arg type="b" name="start"/></signal>
    <signal name="Progress"><arg type="s" name="phase"/><arg type="d" name="percent"/></signal>
    <signal name="Resumed"><arg type="a{{sv}}" name="stats"/></signal>
  </interface>
</node>
"""


# --------------------------------------------------------------------------- contracts
class HibernationLike(Protocol):
    """kjumpd.daemon.transaction.Hibernation as the service uses it."""

    def check(self) -> Any: ...  # PreflightReport: .ok, .items
    def run(self, mode: str, cancel: threading.Event) -> Any: ...  # Outcome


# --------------------------------------------------------------------------- arguments
#: the longest D-Bus name (interface, member) the specification allows
MAX_NAME = 255


def bus_string(name: str, value: Any, *, allowed: Sequence[str], limit: int = MAX_NAME) -> str:
    """An argument from the bus, checked before anything else sees it: a string of at most
    ``limit`` printable characters that is one of ``allowed``; ConfigError (InvalidArgs)
    naming the argument and quoting at most ECHO_LIMIT characters of it otherwise."""
    if not isinstance(value, str):
        raise ConfigError(
            f"argument {name} must be a string",
            why=f"got {type(value).__name__}",
            fix="pass a string",
            argument=name,
        )
    choices = ", ".join(a for a in allowed if a) or "(none)"
    if len(value) > limit:
        raise ConfigError(
            f"argument {name} is too long",
            why=f"{len(value)} characters, at most {limit}: {shown(value)}",
            fix=f"use one of {choices}",
            argument=name,
        )
    if not value.isprintable():
        raise ConfigError(
            f"argument {name} has control characters",
            why=f"got {shown(value)}",
            fix=f"use one of {choices}",
            argument=name,
        )
    if value not in allowed:
        raise ConfigError(
            f"unknown {name} {shown(value)}",
            fix=f"use one of {choices}",
            argument=name,
            **{name: shown(value)},
        )
    return value


# --------------------------------------------------------------------------- errors
_ERROR_TYPES: dict[str, type[Exception]] = {}


def dbus_error_name(err: KjumpError) -> str:
    return ERROR_PREFIX + err.dbus_name


def as_dbus_error(err: KjumpError) -> Exception:
    """An exception pydbus turns into the named D-Bus error org.kjump.Error.<Name>.

    pydbus replies with the exception's class name as the error name when it contains a dot,
    so each D-Bus error name gets a class of that exact name.
    """
    name = dbus_error_name(err)
    cls = _ERROR_TYPES.get(name)
    if cls is None:
        cls = _ERROR_TYPES[name] = type(name, (Exception,), {})
    return cls(err.message)


def dbus_method(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure leaves as a named D-Bus error with a one-line message; never a traceback."""

    @functools.wraps(fn)
    def wrapper(self: Manager, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except KjumpError as e:
            log.warning("%s: %s", fn.__name__, e.message)
            raise as_dbus_error(e) from None
        except Exception as e:  # a bug: log it for us, a clean error for the caller
            log.exception("internal error in %s", fn.__name__)
            raise as_dbus_error(
                KjumpError(
                    f"internal error in {fn.__name__}",
                    why=str(e) or type(e).__name__,
                    fix="report a bug with the kjumpd log (journalctl -u kjumpd)",
                )
            ) from None

    return wrapper


# --------------------------------------------------------------------------- records
def plain(value: Any) -> Any:
    """Dataclasses, enums and containers reduced to str/int/float/bool/list/dict."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name if not isinstance(value.value, str) else value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _dbus_str(s: str) -> str:
    """D-Bus strings cannot hold NUL (GLib would cut the string there): escape it."""
    return s.replace("\0", "\\x00")


def to_variant(value: Any) -> GLib.Variant:
    """A GLib.Variant for a plain value (see :func:`plain`); dicts become a{sv}."""
    value = plain(value)
    if isinstance(value, bool):
        return GLib.Variant("b", value)
    if isinstance(value, int):
        return GLib.Variant("t", value) if value >= 2**63 else GLib.Variant("x", value)
    if isinstance(value, float):
        return GLib.Variant("d", value)
    if isinstance(value, str):
        return GLib.Variant("s", _dbus_str(value))
    if isinstance(value, dict):
        if value and all(isinstance(v, float) for v in value.values()):  # durations
            return GLib.Variant("a{sd}", {_dbus_str(k): float(v) for k, v in value.items()})
        return GLib.Variant(
            "a{sv}", {_dbus_str(k): to_variant(v) for k, v in value.items() if v is not None}
        )
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return GLib.Variant("as", [_dbus_str(v) for v in value])
        return GLib.Variant("av", [to_variant(v) for v in value if v is not None])
    return GLib.Variant("s", "")


def to_vardict(record: dict[str, Any]) -> dict[str, GLib.Variant]:
    return {k: to_variant(v) for k, v in plain(record).items() if v is not None}


def outcome_record(outcome: Any) -> dict[str, Any]:
    """The transaction's Outcome as a flat-ish dict (LastResult / Resumed), with the
    figures users ask for derived from its stats: image_size (bytes stored), ratio
    (memory saved / bytes stored) and throughput (MB of memory per second of the save, timed
    by the save kernel: stats.save_seconds, from the image header's WRITING and SAVED times;
    A's monotonic clock stops during the jump, so durations["jump"] cannot time it)."""
    rec = plain(outcome)
    if not isinstance(rec, dict):
        rec = {"result": str(rec)}
    rec.update(derived_figures(rec))
    return rec


def derived_figures(rec: dict[str, Any]) -> dict[str, Any]:
    stats = rec.get("stats") if isinstance(rec.get("stats"), dict) else {}
    out: dict[str, Any] = {}
    raw, stored = stats.get("raw_bytes"), stats.get("stored_bytes")
    if isinstance(stored, int) and stored > 0:
        out["image_size"] = stored
        if isinstance(raw, int) and raw > 0:
            out["ratio"] = raw / stored
    took = stats.get("save_seconds")
    if isinstance(raw, int) and raw > 0 and isinstance(took, (int, float)) and took > 0:
        out["throughput"] = raw / 1e6 / float(took)
    return out


FAILED_RESULTS = {"failed", "cancelled", "aborted", "error", "rolled-back"}


def is_success(record: dict[str, Any]) -> bool:
    return str(record.get("result", "")).lower() not in FAILED_RESULTS


def is_resume(record: dict[str, Any]) -> bool:
    """The system slept (or was powered off) and came back from the saved image."""
    if record.get("resumed") is True:
        return True
    result = str(record.get("result", "")).lower()
    return result in {"resumed", "restored"}


def preflight_reasons(report: Any) -> list[str]:
    """One line per failed precondition, each with its fix."""
    out = []
    for item in getattr(report, "items", []):
        if not item.ok and getattr(item, "fatal", True):
            line = f"{item.name}: {item.detail}" if item.detail else str(item.name)
            if item.fix:
                line += f" (fix: {item.fix})"
            out.append(line)
    return out


def allows_interaction(ctx: Any) -> bool:
    """The D-Bus message carries ALLOW_INTERACTIVE_AUTHORIZATION (kjumpctl sets it)."""
    from gi.repository import Gio

    try:
        flags = ctx._mi.get_message().get_flags()  # pydbus's MethodCallContext
    except AttributeError:
        return False
    return bool(flags & Gio.DBusMessageFlags.ALLOW_INTERACTIVE_AUTHORIZATION)


@dataclass
class Run:
    mode: str
    uid: int | None
    cancel: threading.Event
    started: float
    sleeping: bool = False  # PrepareForSleep(true) sent, (false) not yet


# --------------------------------------------------------------------------- events
class Events:
    """What the transaction calls, from its worker thread (the contract with transaction.py)."""

    def __init__(self, manager: Manager) -> None:
        self._m = manager

    def phase(self, name: str, percent: float) -> None:
        self._m.in_main_loop(self._m.on_phase, str(name), float(percent))

    def prepare_for_sleep(self, active: bool) -> None:
        self._m.prepare_for_sleep(bool(active))

    def log(self, msg: str) -> None:
        translog.info("%s", msg)

    def save_kernel(self, state: str) -> None:
        self._m.in_main_loop(self._m.on_save_kernel, str(state))


# --------------------------------------------------------------------------- the object
class Manager:
    dbus = INTROSPECTION

    PrepareForSleep = signal()
    Progress = signal()
    Resumed = signal()
    PropertiesChanged = signal()

    def __init__(
        self,
        make_hibernation: Callable[[Events], HibernationLike],
        authorizer: authz.Authorizer | None,
        *,
        image_state: Callable[[], str] = lambda: "unknown",
        modes: Sequence[str] = MODES,
        default_mode: str = "platform",
        flush: Callable[[], None] = lambda: None,
        checked: Callable[[Any], None] = lambda report: None,
        signal_wait: float = 5.0,
    ) -> None:
        self.events = Events(self)
        self._hib = make_hibernation(self.events)
        self._authz = authorizer
        self._image_state_fn = image_state
        self._modes = tuple(modes)
        if default_mode not in self._modes:
            raise ConfigError(
                f"default mode {default_mode!r} is not a mode",
                fix=f"use one of {', '.join(self._modes)}",
                key="mode",
            )
        self._default_mode = default_mode
        self._flush = flush
        self._checked = checked
        self._signal_wait = signal_wait
        self._lock = threading.Lock()
        self._run: Run | None = None
        self._worker: threading.Thread | None = None
        self._main_thread = threading.current_thread()
        self._state = "idle"
        self._mode = ""
        self._phase = ""
        self._progress = 0.0
        self._image_state = self._read_image_state()
        self._last: dict[str, Any] = {}
        state = getattr(self._hib, "save_kernel_state", None)
        self._save_kernel = str(state()) if state is not None else "loaded at each hibernation"

    # -- properties ---------------------------------------------------------------------
    # "Progress" is both a property and a signal of the interface; in Python the signal owns
    # the attribute, so properties are served by get_property() through ManagerWrapper.
    def get_property(self, name: str) -> Any:
        if name == "LastResult":
            return to_vardict(self._last)
        return {
            "State": self._state,
            "Mode": self._mode,
            "Phase": self._phase,
            "Progress": self._progress,
            "ImageState": self._image_state,
            "SaveKernel": self._save_kernel,
        }[name]

    @property
    def busy(self) -> bool:
        return self._run is not None

    # -- methods ------------------------------------------------------------------------
    @dbus_method
    def Hibernate(self, mode: str, dbus_context: Any = None) -> None:
        mode = bus_string("mode", mode, allowed=("", *self._modes), limit=ECHO_LIMIT)
        mode = mode or self._default_mode
        action = authz.ACTION_CHECKPOINT if mode == "checkpoint" else authz.ACTION_HIBERNATE
        self._start(mode, action, dbus_context)

    @dbus_method
    def SuspendToBoth(self, dbus_context: Any = None) -> None:
        self._start("suspend", authz.ACTION_HIBERNATE, dbus_context)

    @dbus_method
    def Checkpoint(self, dbus_context: Any = None) -> None:
        self._start("checkpoint", authz.ACTION_CHECKPOINT, dbus_context)

    @dbus_method
    def CanHibernate(self, dbus_context: Any = None) -> tuple[str, list[str]]:
        try:
            report = self._hib.check()
        except UnsupportedError as e:
            return "na", [e.message]
        reasons = preflight_reasons(report)
        if reasons or not getattr(report, "ok", False):
            return "no", reasons or ["preflight failed (fix: run 'kjumpctl check')"]
        if dbus_context is not None and self._authz is not None:
            caller = self._authz.caller(dbus_context.sender)
            d = self._authz.decide(caller, authz.ACTION_HIBERNATE, interactive=False)
            if not d.allowed:
                fix = d.details.get("fix", "")
                return (
                    "challenge" if d.challenge else "no",
                    [d.reason + (f" (fix: {fix})" if fix else "")],
                )
        return "yes", []

    @dbus_method
    def Check(self) -> tuple[bool, list[tuple[str, bool, bool, str, str]]]:
        report = self._hib.check()
        if not self.busy:
            self._checked(report)  # what logind offers follows this report at once
        items = [
            (
                str(i.name),
                bool(i.ok),
                bool(getattr(i, "fatal", True)),
                str(i.detail or ""),
                str(i.fix or ""),
            )
            for i in getattr(report, "items", [])
        ]
        return bool(report.ok), items

    @dbus_method
    def Cancel(self, dbus_context: Any = None) -> bool:
        run = self._run
        if run is None:
            return False
        if dbus_context is not None and self._authz is not None:
            caller = self._authz.caller(dbus_context.sender)
            if caller.uid != run.uid:
                self._authz.require(dbus_context.sender, authz.ACTION_MANAGE)
        log.info("cancel requested for %s", run.mode)
        run.cancel.set()
        self._state = "cancelling"
        self.PropertiesChanged(INTERFACE, {"State": self._state}, [])
        return True

    # -- running a transition -----------------------------------------------------------
    def _busy_error(self, run: Run) -> BusyError:
        return BusyError(
            "another transition is in progress",
            why=f"{run.mode} is in phase {self._phase or 'starting'}",
            fix="wait for it to finish or run 'kjumpctl cancel'",
            mode=run.mode,
        )

    def _start(self, mode: str, action: str, ctx: Any) -> None:
        bus_string("mode", mode, allowed=self._modes, limit=ECHO_LIMIT)
        uid = None  # authorize first: callers who may not act learn nothing about the state
        if ctx is not None and self._authz is not None:
            uid = self._authz.require(ctx.sender, action, allows_interaction(ctx)).uid
        with self._lock:
            if self._run is not None:
                raise self._busy_error(self._run)
            run = self._run = Run(mode, uid, threading.Event(), time.time())
        log.info("%s requested by uid %s", mode, uid)
        self._state, self._mode, self._phase, self._progress = "running", mode, "starting", 0.0
        self.PropertiesChanged(
            INTERFACE, {"State": "running", "Mode": mode, "Phase": "starting", "Progress": 0.0}, []
        )
        self._worker = threading.Thread(
            target=self._work, args=(run,), name=f"kjump-{mode}", daemon=True
        )
        self._worker.start()

    def _work(self, run: Run) -> None:
        # CLOCK_BOOTTIME goes on while the main kernel is away (in the save kernel, powered
        # off): elapsed is what the user waited; CLOCK_MONOTONIC stops during the jump
        t0 = time.clock_gettime(time.CLOCK_BOOTTIME)
        try:
            outcome = self._hib.run(run.mode, run.cancel)
            record = outcome_record(outcome)
            record.setdefault("result", "ok")
        except KjumpError as e:
            # the transaction attaches what it rolled back (durations, undo errors) as .outcome
            record = outcome_record(getattr(e, "outcome", None) or {})
            record.update(
                result="cancelled" if isinstance(e, CancelledError) else "failed",
                error=dbus_error_name(e),
                error_class=type(e).__name__,
                message=e.message,
            )
        except Exception as e:  # a bug in a step: the caller still gets a clean record
            translog.exception("%s failed with an internal error", run.mode)
            record = {
                "result": "failed",
                "error": ERROR_PREFIX + "Failed",
                "error_class": "KjumpError",
                "message": f"internal error: {e or type(e).__name__} "
                "(fix: report a bug with the kjumpd log)",
            }
        t_end = time.monotonic()
        if run.sleeping:  # never leave listeners believing the system is about to sleep
            self.prepare_for_sleep(False)
        record.update(
            mode=run.mode,
            started=run.started,
            finished=time.time(),
            elapsed=time.clock_gettime(time.CLOCK_BOOTTIME) - t0,
        )
        self.in_main_loop(self._finish, run, record, t_end)

    def _finish(self, run: Run, record: dict[str, Any], queued: float | None = None) -> None:
        t_start = time.monotonic()
        with self._lock:
            if self._run is run:
                self._run = None
        self._last = record
        if is_resume(record) and record.get("image_state") == "CONSUMED":
            # the transaction has just written CONSUMED (it has no reason text to show):
            # answering the waiting client does not wait for another read of the header
            self._image_state = "CONSUMED"
        else:
            self._image_state = self._read_image_state()
        self._state, self._phase = "idle", ""
        if is_success(record):
            self._progress = 100.0
        last = to_vardict(record)  # built once for both signals
        self.PropertiesChanged(
            INTERFACE,
            {
                "State": "idle",
                "Phase": "",
                "Progress": self._progress,
                "ImageState": self._image_state,
                "LastResult": last,
            },
            [],
        )
        if is_resume(record):
            self.Resumed(last)
        now = time.monotonic()
        log.info(
            "%s finished: %s%s (answered %.2f s after the transition ended, %.2f s of it sending)",
            run.mode,
            record.get("result"),
            f" ({record['message']})" if record.get("message") else "",
            now - (queued if queued is not None else t_start),
            now - t_start,
        )
        # what the transition left to tidy up (unloading the save kernel...) runs now that
        # the waiting clients have their answer
        start = getattr(self._hib, "start_housekeeping", None)
        if start is not None:
            start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """For shutdown: wait for the worker (the transaction rolls back on cancel)."""
        w = self._worker
        if w is None:
            return True
        w.join(timeout)
        return not w.is_alive()

    def start_warm_up(self) -> bool:
        """Boot and park the save kernel in the background, when configured
        (kjumpd.daemon.warm)."""
        start = getattr(self._hib, "start_warm_up", None)
        return False if start is None else bool(start())

    def wait_housekeeping(self, timeout: float | None = None) -> bool:
        """For shutdown: wait for what the last transition left to tidy up after it
        answered (the transaction's housekeeping: unloading the save kernel...), and for
        a warm-up of the save kernel (none starts from here on)."""
        wait = getattr(self._hib, "wait_housekeeping", None)
        stop = getattr(self._hib, "stop_warm_up", None)
        done = True if wait is None else bool(wait(timeout))
        return (True if stop is None else bool(stop(timeout))) and done

    def cancel_all(self) -> bool:
        run = self._run
        if run is None:
            return False
        run.cancel.set()
        return True

    # -- from the worker ----------------------------------------------------------------
    def in_main_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        def call() -> bool:
            try:
                fn(*args)
            except Exception:  # a bug: keep the main loop (and the service) alive
                log.exception("internal error in %s", getattr(fn, "__name__", fn))
            return False

        GLib.idle_add(call)

    def on_save_kernel(self, state: str) -> None:
        if state != self._save_kernel:
            self._save_kernel = state
            self.PropertiesChanged(INTERFACE, {"SaveKernel": state}, [])

    def on_phase(self, name: str, percent: float) -> None:
        self._phase, self._progress = name, percent
        self.Progress(name, percent)
        self.PropertiesChanged(INTERFACE, {"Phase": name, "Progress": percent}, [])

    def prepare_for_sleep(self, active: bool) -> None:
        """Emit PrepareForSleep(active) and return once it has left for the bus."""
        run = self._run
        if run is not None:
            run.sleeping = active

        def emit() -> None:
            self.PrepareForSleep(active)
            try:
                self._flush()
            except GLib.Error as e:
                log.warning("cannot flush the bus connection: %s", e.message)

        if threading.current_thread() is self._main_thread:
            emit()
        else:
            done = threading.Event()

            def emit_and_signal() -> None:
                try:
                    emit()
                finally:
                    done.set()

            self.in_main_loop(emit_and_signal)
            if not done.wait(self._signal_wait):
                log.warning(
                    "PrepareForSleep(%s) not confirmed sent within %.0f s",
                    active,
                    self._signal_wait,
                )

    def _read_image_state(self) -> str:
        try:
            return str(self._image_state_fn())
        except KjumpError as e:
            return f"unknown: {e.message}"
        except OSError as e:
            return f"unknown: {e.strerror or e}"
        except Exception as e:  # a bug in a reader must not stop the service
            log.exception("cannot read the image state")
            return f"unknown: internal error: {e or type(e).__name__}"


# --------------------------------------------------------------------------- publishing
class ManagerWrapper(ObjectWrapper):
    """pydbus's wrapper, with properties read through Manager.get_property()."""

    __slots__ = ()

    def Get(self, interface_name: str, property_name: str) -> GLib.Variant:
        sig = self.readable_properties[interface_name + "." + property_name]
        return GLib.Variant(sig, self.object.get_property(property_name))

    def GetAll(self, interface_name: str) -> dict[str, GLib.Variant]:
        out = {}
        for name, sig in self.readable_properties.items():
            ns, local = name.rsplit(".", 1)
            if ns == interface_name:
                out[local] = GLib.Variant(sig, self.object.get_property(local))
        return out


def register(bus: Any, manager: Manager) -> ObjectRegistration:
    """Export the manager at OBJECT_PATH on a pydbus bus (the name is requested separately)."""
    from gi.repository import Gio

    node = Gio.DBusNodeInfo.new_for_xml(INTROSPECTION)
    wrapper = ManagerWrapper(manager, node.interfaces)
    return ObjectRegistration(bus, OBJECT_PATH, node.interfaces, wrapper, own_wrapper=True)
