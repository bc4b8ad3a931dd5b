"""The kernel command line, read as the kernel reads it.

Words are separated by blanks; a double quote starts or ends a part in which blanks do not
separate (``foo="a b"`` is one parameter, value ``a b``: the quotes go, as the kernel's
``next_arg`` drops them). A parameter's value is what follows its first ``=``. When a
parameter is given more than once the last one counts: the kernel calls its handler for each
occurrence in order, so the last call leaves its value. Boolean values read as the kernel's
``kstrtobool`` reads them (``1 y t on`` / ``0 n f off``, by their first letters).
"""

from __future__ import annotations

from collections.abc import Iterable

#: the kernel's isspace() for the command line (ASCII blanks; not Python's wider notion)
BLANKS = frozenset(" \t\n\v\f\r")


def words(text: str) -> list[str]:
    """The parameters as written (quotes kept), for rewriting a command line."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch in BLANKS and not quoted:
            if cur:
                out.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


def split(word: str) -> tuple[str, str | None]:
    """(name, value without its quotes, or None for a bare word)."""
    name, eq, value = word.partition("=")
    name = name.replace('"', "")
    if not eq:
        return name, None
    if value.startswith('"'):
        value = value[1:]
        if value.endswith('"'):
            value = value[:-1]
    return name, value


def params(text: str) -> dict[str, str]:
    """name -> value, the last occurrence winning; a bare word maps to ""."""
    out: dict[str, str] = {}
    for word in words(text):
        name, value = split(word)
        out[name] = "" if value is None else value
    return out


def value(text: str, name: str) -> str | None:
    """The value of the last ``name=``, or None when there is none."""
    found = None
    for word in words(text):
        k, v = split(word)
        if k == name and v is not None:
            found = v
    return found


def to_bool(v: str) -> bool | None:
    """kstrtobool: True, False, or None for a value the kernel would refuse."""
    if not v:
        return None
    c = v[0].lower()
    if c in "yt1":
        return True
    if c in "nf0":
        return False
    if c == "o" and len(v) > 1:
        return {"n": True, "f": False}.get(v[1].lower())
    return None


def flag(text: str, name: str) -> bool | None:
    """The boolean parameter ``name`` (its last value), None when absent or not a boolean."""
    v = value(text, name)
    return None if v is None else to_bool(v)


def without(text: str, names: Iterable[str]) -> str:
    """The command line without the parameters ``names`` (bare or with a value)."""
    drop = set(names)
    return " ".join(w for w in words(text) if split(w)[0] not in drop)
