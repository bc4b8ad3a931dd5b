"""A small D-Bus client on a plain Unix socket, for kjumpctl's transition commands.

``kjumpctl hibernate`` is on the path of every hibernation: importing gi (GLib, GObject and
Gio typelibs) and setting up a GDBus connection is a noticeable wait of its own before the
request even reaches kjumpd. This module speaks the D-Bus wire protocol itself:
connect (``unix:path=`` or ``unix:abstract=`` addresses), SASL EXTERNAL authentication with
the caller's uid, Hello, method calls with string arguments, AddMatch, and reading signals.

Wire format (D-Bus specification, version 1 messages, little-endian as we send them; replies
in either byte order are read): a 12-byte fixed header (endianness ``l``/``B``, type 1 call /
2 return / 3 error / 4 signal, flags, version 1, body length, serial), an array of
(code, variant) header fields (1 path, 2 interface, 3 member, 4 error name, 5 reply serial,
6 destination, 7 sender, 8 signature) padded to 8, then the body. Every value is aligned to
its size (strings and arrays to 4, structs, dict entries, 64-bit values to 8) from the start
of the message. Types read: y b n q i u x t d h s o g v a ( {; written: the same but h.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from typing import Any, NamedTuple

from kjumpd.errors import KjumpError

CALL, RETURN, ERROR, SIGNAL = 1, 2, 3, 4
NO_REPLY_EXPECTED, NO_AUTO_START, ALLOW_INTERACTIVE_AUTHORIZATION = 0x1, 0x2, 0x4
SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"
DBUS_NAME, DBUS_PATH, DBUS_IFACE = (
    "org.freedesktop.DBus",
    "/org/freedesktop/DBus",
    "org.freedesktop.DBus",
)

_ALIGN = {
    "y": 1,
    "b": 4,
    "n": 2,
    "q": 2,
    "i": 4,
    "u": 4,
    "x": 8,
    "t": 8,
    "d": 8,
    "h": 4,
    "s": 4,
    "o": 4,
    "g": 1,
    "v": 1,
    "a": 4,
    "(": 8,
    "{": 8,
}
_FIXED = {
    "y": "B",
    "b": "I",
    "n": "h",
    "q": "H",
    "i": "i",
    "u": "I",
    "x": "q",
    "t": "Q",
    "d": "d",
    "h": "I",
}


class BusError(KjumpError):
    """A transport or protocol failure (no connection, authentication refused, bad data);
    kjumpctl turns it into a DaemonNotRunningError with a remedy."""


class RemoteError(KjumpError):
    """An error reply: ``name`` (e.g. org.kjump.Error.Busy) and its message; kjumpctl maps
    it back to kjumpd's own error class (kjumpd.cli.daemon_cmds.error_from_dbus)."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}", error_name=name)
        self.name, self.text = name, text


class Message(NamedTuple):
    """One D-Bus message as read: its type, serial, header fields by code, and body."""

    type: int
    serial: int
    fields: dict[int, Any]
    body: tuple[Any, ...] = ()

    @property
    def path(self) -> str:
        return str(self.fields.get(1, ""))

    @property
    def interface(self) -> str:
        return str(self.fields.get(2, ""))

    @property
    def member(self) -> str:
        return str(self.fields.get(3, ""))

    @property
    def error_name(self) -> str:
        return str(self.fields.get(4, ""))

    @property
    def reply_serial(self) -> int:
        return int(self.fields.get(5, 0))


def split_types(sig: str) -> list[str]:
    """A signature cut into its complete types: "sa{sv}as" -> ["s", "a{sv}", "as"]."""
    out, i = [], 0
    while i < len(sig):
        j = _type_end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


def _type_end(sig: str, i: int) -> int:
    c = sig[i] if i < len(sig) else ""
    if c == "a":
        return _type_end(sig, i + 1)
    if c in "({":
        close = ")" if c == "(" else "}"
        j = i + 1
        while j < len(sig) and sig[j] != close:
            j = _type_end(sig, j)
        if j >= len(sig):
            raise BusError(f"bad D-Bus signature {sig!r}")
        return j + 1
    if c and (c in _FIXED or c in "sogv"):
        return i + 1
    raise BusError(f"bad D-Bus signature {sig!r}")


# --------------------------------------------------------------------------- writing
class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def pad(self, n: int) -> None:
        self.buf += b"\0" * (-len(self.buf) % n)

    def value(self, t: str, v: Any) -> None:
        c = t[0]
        self.pad(_ALIGN[c])
        if c in _FIXED:
            self.buf += struct.pack("<" + _FIXED[c], int(v) if c != "d" else float(v))
        elif c in "so":
            data = str(v).encode()
            self.buf += struct.pack("<I", len(data)) + data + b"\0"
        elif c == "g":
            data = str(v).encode()
            self.buf += bytes([len(data)]) + data + b"\0"
        elif c == "v":
            vt, vv = v
            self.value("g", vt)
            self.value(vt, vv)
        elif c == "a":
            self.buf += b"\0\0\0\0"
            at = len(self.buf)
            inner = t[1:]
            self.pad(_ALIGN[inner[0]])
            start = len(self.buf)
            items = v.items() if inner[0] == "{" else v
            for item in items:
                self.value(inner, item)
            struct.pack_into("<I", self.buf, at - 4, len(self.buf) - start)
        elif c in "({":
            for it, iv in zip(split_types(t[1:-1]), v):
                self.value(it, iv)
        else:
            raise BusError(f"cannot write D-Bus type {t!r}")


# --------------------------------------------------------------------------- reading
class _Reader:
    def __init__(self, data: bytes, pos: int, little: bool) -> None:
        self.data, self.pos, self.order = data, pos, "<" if little else ">"

    def align(self, n: int) -> None:
        self.pos += -self.pos % n

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BusError("truncated D-Bus message")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def value(self, t: str) -> Any:
        c = t[0]
        self.align(_ALIGN[c])
        if c in _FIXED:
            (v,) = struct.unpack(self.order + _FIXED[c], self._take(struct.calcsize(_FIXED[c])))
            return bool(v) if c == "b" else v
        if c in "so":
            (n,) = struct.unpack(self.order + "I", self._take(4))
            s = self._take(n + 1)[:-1]
            return s.decode(errors="replace")
        if c == "g":
            n = self._take(1)[0]
            return self._take(n + 1)[:-1].decode(errors="replace")
        if c == "v":
            return self.value(self.value("g"))
        if c == "a":
            (n,) = struct.unpack(self.order + "I", self._take(4))
            inner = t[1:]
            self.align(_ALIGN[inner[0]])
            end = self.pos + n
            if end > len(self.data):
                raise BusError("truncated D-Bus array")
            items = []
            while self.pos < end:
                items.append(self.value(inner))
            if inner[0] == "{":
                return dict(items)
            return items
        if c in "({":
            return tuple(self.value(it) for it in split_types(t[1:-1]))
        raise BusError(f"cannot read D-Bus type {t!r}")


def encode(
    type_: int,
    serial: int,
    fields: list[tuple[int, str, Any]],
    sig: str = "",
    args: tuple[Any, ...] = (),
    flags: int = 0,
) -> bytes:
    """One message: ``fields`` as (code, type, value); the body from ``sig`` and ``args``."""
    body = _Writer()
    for t, v in zip(split_types(sig), args):
        body.value(t, v)
    if sig:
        fields = [*fields, (8, "g", sig)]
    head = _Writer()
    head.buf += struct.pack("<cBBBII", b"l", type_, flags, 1, len(body.buf), serial)
    head.value("a(yv)", [(code, (t, v)) for code, t, v in fields])
    head.pad(8)
    return bytes(head.buf + body.buf)


def decode(data: bytes) -> Message:
    little = data[:1] == b"l"
    if data[:1] not in (b"l", b"B"):
        raise BusError("not a D-Bus message")
    r = _Reader(data, 12, little)
    type_ = data[1]
    (serial,) = struct.unpack(r.order + "I", data[8:12])
    fields = dict(r.value("a(yv)"))
    r.align(8)
    sig = str(fields.get(8, ""))
    body = tuple(r.value(t) for t in split_types(sig))
    return Message(type_, serial, fields, body)


def message_length(head: bytes) -> int:
    """Total length of a message from its first 16 bytes."""
    order = "<" if head[:1] == b"l" else ">"
    body_len, _serial, fields_len = struct.unpack(order + "III", head[4:16])
    return 16 + fields_len + (-(16 + fields_len) % 8) + body_len


def _unescape(value: str) -> str:
    out, i = bytearray(), 0
    raw = value.encode()
    while i < len(raw):
        if raw[i : i + 1] == b"%" and i + 2 < len(raw):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode()


def socket_addresses(address: str) -> list[str]:
    """The Unix socket addresses an address string names, in order ("\\0name" for an
    abstract one); other transports are skipped."""
    out = []
    for part in address.split(";"):
        transport, _, params = part.partition(":")
        if transport != "unix":
            continue
        kv = dict(p.split("=", 1) for p in params.split(",") if "=" in p)
        if "path" in kv:
            out.append(_unescape(kv["path"]))
        elif "abstract" in kv:
            out.append("\0" + _unescape(kv["abstract"]))
    return out


class Connection:
    """A connection to a message bus (blocking; one thread)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        self.serial = 0
        self.unique_name = ""
        self.pending: list[Message] = []
        self._buf = b""
        errors = []
        for addr in socket_addresses(self.address):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(addr)
            except OSError as e:
                s.close()
                errors.append(f"{addr.lstrip(chr(0))}: {e.strerror or e}")
                continue
            self.sock = s
            break
        if self.sock is None:
            raise BusError("; ".join(errors) or f"no unix socket in the address {self.address!r}")
        self._auth()
        (self.unique_name,) = self.call(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "Hello")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _auth(self) -> None:
        assert self.sock is not None
        uid = str(os.geteuid()).encode().hex()
        self.sock.sendall(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
        line = self._line()
        if not line.startswith(b"OK "):
            raise BusError(f"the bus refused authentication: {line.decode(errors='replace')}")
        self.sock.sendall(b"BEGIN\r\n")

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            self._recv(30.0)
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def _recv(self, timeout: float | None) -> None:
        assert self.sock is not None
        if timeout is not None:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not ready:
                raise TimeoutError("no answer from the bus")
        data = self.sock.recv(65536)
        if not data:
            raise BusError("the bus closed the connection")
        self._buf += data

    def _read(self, timeout: float | None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if len(self._buf) >= 16:
                n = message_length(self._buf[:16])
                if len(self._buf) >= n:
                    data, self._buf = self._buf[:n], self._buf[n:]
                    return decode(data)
            self._recv(None if deadline is None else deadline - time.monotonic())

    def send(
        self,
        dest: str,
        path: str,
        iface: str,
        member: str,
        sig: str = "",
        args: tuple[Any, ...] = (),
        flags: int = 0,
    ) -> int:
        assert self.sock is not None
        self.serial += 1
        fields = [(1, "o", path), (2, "s", iface), (3, "s", member), (6, "s", dest)]
        self.sock.sendall(encode(CALL, self.serial, fields, sig, args, flags))
        return self.serial

    def call(
        self,
        dest: str,
        path: str,
        iface: str,
        member: str,
        sig: str = "",
        args: tuple[Any, ...] = (),
        flags: int = 0,
        timeout: float | None = 60.0,
    ) -> tuple[Any, ...]:
        """A method call; returns the reply's body, raises RemoteError for an error reply
        and TimeoutError when none came in ``timeout`` seconds. Messages that arrive
        meanwhile are kept for next()."""
        serial = self.send(dest, path, iface, member, sig, args, flags)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            m = self._read(None if deadline is None else deadline - time.monotonic())
            if m.type in (RETURN, ERROR) and m.reply_serial == serial:
                if m.type == ERROR:
                    raise RemoteError(m.error_name, str(m.body[0]) if m.body else "")
                return m.body
            if m.type == SIGNAL:
                self.pending.append(m)

    def add_matches(self, rules: list[str], timeout: float = 60.0) -> None:
        """AddMatch for each rule, sent at once (one round trip), each reply checked."""
        waiting = {
            self.send(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "AddMatch", "s", (r,)) for r in rules
        }
        deadline = time.monotonic() + timeout
        while waiting:
            m = self._read(deadline - time.monotonic())
            if m.type in (RETURN, ERROR) and m.reply_serial in waiting:
                if m.type == ERROR:
                    raise RemoteError(m.error_name, str(m.body[0]) if m.body else "")
                waiting.discard(m.reply_serial)
            elif m.type == SIGNAL:
                self.pending.append(m)

    def next(self, timeout: float | None = None) -> Message:
        """The next signal (those that came during calls first)."""
        if self.pending:
            return self.pending.pop(0)
        while True:
            m = self._read(timeout)
            if m.type == SIGNAL:
                return m
