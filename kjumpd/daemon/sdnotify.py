"""sd_notify(3) without a systemd dependency: datagrams to $NOTIFY_SOCKET.

The protocol is newline-separated ``KEY=VALUE`` assignments in one datagram sent to the
AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
kjumpd sends READY=1, STATUS=..., WATCHDOG=1 (every half of ``$WATCHDOG_USEC``, when
``$WATCHDOG_PID`` is unset or names this process) and STOPPING=1. Without NOTIFY_SOCKET
(no systemd, e.g. the VM tier's plain init) every call is a no-op. Sends never block: a
message the receiver has no room for is dropped (logged at debug level).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | bytes:
    """$NOTIFY_SOCKET → an address for socket.sendto ("@x" is the abstract "\\0x")."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def format_message(fields: Mapping[str, str | int]) -> bytes:
    """KEY=VALUE lines; values must not contain a newline."""
    lines = []
    for k, v in fields.items():
        s = str(v).replace("\n", " ")
        lines.append(f"{k}={s}")
    return ("\n".join(lines) + "\n").encode()


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout), or None when not asked for."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid and wpid.isdigit() and int(wpid) != pid:
        return None
    try:
        n = int(usec)
    except ValueError:
        return None
    return n / 2e6 if n > 0 else None


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = env.get("NOTIFY_SOCKET") or None
        self.watchdog = watchdog_interval(env, os.getpid())
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        if not self.address:
            return False
        try:
            if self._sock is None:
                # never block the main loop on a receiver that does not read
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(format_message(fields), socket_address(self.address))
            return True
        except BlockingIOError:
            log.debug("sd_notify to %s dropped: the receiver's queue is full", self.address)
            return False
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", self.address, e.strerror or e)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def ping(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str = "") -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
