"""Who may ask kjumpd to do what.

Each D-Bus method that changes the system names a polkit action (contrib/org.kjump.policy):

- ``org.kjump.hibernate``  Hibernate(), SuspendToBoth()
- ``org.kjump.checkpoint`` Checkpoint()
- ``org.kjump.manage``     Cancel() of a transition somebody else started

When polkit (``org.freedesktop.PolicyKit1``) is on the bus (running or activatable) the daemon
asks it (CheckAuthorization for the caller's bus name). Without polkit (the save-kernel-free
minimal systems, the VM tier's guest, the tests) the rule is local: uid 0, or a member of the
group named in the configuration, identified by the credentials the bus daemon reports for the
caller's connection (GetConnectionCredentials: uid and the process's groups), never by anything
the caller says about itself.

:func:`local_decision` is the pure rule; :class:`Authorizer` is the edge that asks the bus.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass, field
from typing import Any

from kjumpd.errors import ConfigError, NotAuthorizedError

log = logging.getLogger(__name__)

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"

ACTION_HIBERNATE = "org.kjump.hibernate"
ACTION_CHECKPOINT = "org.kjump.checkpoint"
ACTION_MANAGE = "org.kjump.manage"
ACTIONS = (ACTION_HIBERNATE, ACTION_CHECKPOINT, ACTION_MANAGE)

#: how long an interactive polkit check may take (an authentication dialog)
POLKIT_TIMEOUT_MS = 120_000


@dataclass(frozen=True)
class Caller:
    """A D-Bus peer as the bus daemon vouches for it."""

    bus_name: str
    uid: int
    gids: tuple[int, ...] = ()
    pid: int | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    challenge: bool = False  # polkit would allow after authentication
    reason: str = ""
    details: dict[str, str] = field(default_factory=dict)


def resolve_group(name: str | None) -> int | None:
    """The gid of the configured group, or None when no group is configured."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ConfigError(
            f"group {name!r} does not exist",
            why="named by authz.group in the configuration",
            fix=f"create it (groupadd {name}) or remove authz.group",
            key="authz.group",
        ) from None


def local_decision(caller: Caller, action: str, allowed_gid: int | None) -> Decision:
    """The rule without polkit: root, or a member of the configured group."""
    if caller.uid == 0:
        return Decision(True, reason="caller is root")
    if allowed_gid is not None and allowed_gid in caller.gids:
        return Decision(True, reason=f"caller is in group {allowed_gid}")
    who = _user_name(caller.uid)
    if allowed_gid is None:
        fix = "run it as root, or set [authz] group in /etc/kjumpd/kjumpd.toml, or install polkit"
    else:
        fix = f"run it as root or add {who} to group {_group_name(allowed_gid)}"
    return Decision(
        False, reason=f"{who} (uid {caller.uid}) may not perform {action}", details={"fix": fix}
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class Authorizer:
    """Asks the bus who a caller is and whether it may perform an action."""

    def __init__(
        self,
        connection: Gio.DBusConnection,  # noqa: F821 - gi is imported where a bus is used
        group: str | None = None,
        use_polkit: bool | None = None,
    ) -> None:
        self._con = connection
        self._gid = resolve_group(group)
        self._use_polkit = use_polkit  # None: whenever polkit is on the bus

    # -- bus calls that keep the main loop turning -----------------------------------------
    def _call(
        self,
        name: str,
        path: str,
        iface: str,
        method: str,
        params: Any,
        reply_type: Any,
        flags: int,
        timeout_ms: int,
        cancellable: Any,
    ) -> Any:
        """Like call_sync, but runs a nested main loop while waiting: an interactive polkit
        check can take minutes (a password dialog) and the watchdog pings, the progress
        signals and other callers must not stall meanwhile. Callers re-check state after."""
        from gi.repository import GLib

        loop = GLib.MainLoop()
        box: dict[str, Any] = {}

        def done(con: Any, res: Any) -> None:
            try:
                box["reply"] = con.call_finish(res)
            except GLib.Error as e:
                box["error"] = e
            loop.quit()

        self._con.call(
            name, path, iface, method, params, reply_type, flags, timeout_ms, cancellable, done
        )
        loop.run()
        if "error" in box:
            raise box["error"]
        return box["reply"]

    # -- identity -----------------------------------------------------------------------
    def caller(self, bus_name: str) -> Caller:
        from gi.repository import GLib

        try:
            (creds,) = self._call(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "GetConnectionCredentials",
                GLib.Variant("(s)", (bus_name,)),
                GLib.VariantType("(a{sv})"),
                0,
                5000,
                None,
            ).unpack()
        except GLib.Error as e:
            raise NotAuthorizedError(
                "cannot identify the caller",
                why=e.message,
                fix="call kjumpd over the system bus",
                sender=bus_name,
            ) from None
        if "UnixUserID" not in creds:
            raise NotAuthorizedError(
                "cannot identify the caller",
                why="the bus daemon reports no uid for it",
                fix="call kjumpd over a local (unix socket) bus",
                sender=bus_name,
            )
        uid = int(creds["UnixUserID"])
        gids = creds.get("UnixGroupIDs")
        if gids is None:  # old bus daemons: fall back to the group database
            try:
                pw = pwd.getpwuid(uid)
                gids = os.getgrouplist(pw.pw_name, pw.pw_gid)
            except KeyError:
                gids = []
        pid = creds.get("ProcessID")
        return Caller(
            bus_name, uid, tuple(int(g) for g in gids), int(pid) if pid is not None else None
        )

    # -- polkit -------------------------------------------------------------------------
    def polkit_available(self) -> bool:
        if self._use_polkit is not None:
            return self._use_polkit
        from gi.repository import GLib

        try:
            (has,) = self._call(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "NameHasOwner",
                GLib.Variant("(s)", (POLKIT_NAME,)),
                GLib.VariantType("(b)"),
                0,
                5000,
                None,
            ).unpack()
            if has:
                return True
            (names,) = self._call(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "ListActivatableNames",
                None,
                GLib.VariantType("(as)"),
                0,
                5000,
                None,
            ).unpack()
            return POLKIT_NAME in names
        except GLib.Error as e:
            log.warning("cannot ask the bus about polkit: %s", e.message)
            return False

    def _polkit(self, caller: Caller, action: str, interactive: bool) -> Decision:
        from gi.repository import GLib

        subject = ("system-bus-name", {"name": GLib.Variant("s", caller.bus_name)})
        try:
            result = self._call(
                POLKIT_NAME,
                POLKIT_PATH,
                POLKIT_IFACE,
                "CheckAuthorization",
                GLib.Variant(
                    "((sa{sv})sa{ss}us)", (subject, action, {}, 1 if interactive else 0, "")
                ),
                GLib.VariantType("((bba{ss}))"),
                0,
                POLKIT_TIMEOUT_MS if interactive else 25_000,
                None,
            ).unpack()
        except GLib.Error as e:
            return Decision(
                False,
                reason=f"polkit could not decide {action}: {e.message}",
                details={"fix": "check that polkitd is running (systemctl status polkit)"},
            )
        allowed, challenge, details = result[0]
        if allowed:
            return Decision(True, reason="polkit", details=dict(details))
        return Decision(
            False,
            challenge=bool(challenge),
            reason=f"polkit refused {action} to {_user_name(caller.uid)} (uid {caller.uid})",
            details={
                "fix": f"ask an administrator to allow {action} (polkit rules)",
                **dict(details),
            },
        )

    # -- the decision -------------------------------------------------------------------
    def decide(self, caller: Caller, action: str, interactive: bool = True) -> Decision:
        if caller.uid == 0:
            return Decision(True, reason="caller is root")
        if self.polkit_available():
            return self._polkit(caller, action, interactive)
        return local_decision(caller, action, self._gid)

    def require(self, bus_name: str, action: str, interactive: bool = True) -> Caller:
        """The caller, if it may perform ``action``; NotAuthorizedError otherwise.
        ``interactive``: the caller allows an authentication dialog (the message carries
        ALLOW_INTERACTIVE_AUTHORIZATION)."""
        caller = self.caller(bus_name)
        d = self.decide(caller, action, interactive=interactive)
        if not d.allowed:
            log.warning("denied %s to uid %d (%s): %s", action, caller.uid, bus_name, d.reason)
            raise NotAuthorizedError(
                "not authorized",
                why=d.reason,
                fix=d.details.get("fix", "run it as root"),
                action=action,
                uid=caller.uid,
            )
        log.info("allowed %s to uid %d (%s)", action, caller.uid, d.reason)
        return caller
