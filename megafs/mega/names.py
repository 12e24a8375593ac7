# ruff: noqa: RUF002
"""MEGA names as POSIX names, reversibly.

A MEGA name is any Unicode string: it may contain ``/`` or NUL, be empty, or be
``.``/``..``; a POSIX name can be none of these. Such characters are shown as
look-alikes (``/`` as ``／`` U+FF0F, NUL as ``␀`` U+2400, a whole name ``.``/``..``
as ``．``/``．．`` U+FF0E, an empty name as a lone ``‛`` U+201B). A look-alike that
really is in a MEGA name is quoted with ``‛``, so the mapping is reversible both
ways: ``to_mega(to_posix(n)) == n`` for every MEGA name, and a POSIX name created
in the mount maps to a MEGA name that shows as the same POSIX name.

Names of the same folder that collide are told apart in :mod:`megafs.mega.tree`.
"""

from __future__ import annotations

from typing import Final

QUOTE: Final = "\u201b"
SLASH: Final = "\uff0f"
NUL: Final = "\u2400"
DOT: Final = "\uff0e"
_QUOTED: Final = frozenset((QUOTE, SLASH, NUL, DOT))
NAME_MAX: Final = 255


def to_posix(name: str) -> str:
    """The POSIX name that shows MEGA name ``name``."""
    if name == "":
        return QUOTE
    if name in (".", ".."):
        return DOT * len(name)
    if name == QUOTE:
        return QUOTE + QUOTE
    out = []
    for i, c in enumerate(name):
        if c == "/":
            out.append(SLASH)
        elif c == "\0":
            out.append(NUL)
        elif c == QUOTE:
            # Quoted only where it would otherwise quote what follows it.
            nxt = name[i + 1] if i + 1 < len(name) else ""
            out.append(QUOTE + QUOTE if nxt and (nxt in _QUOTED or nxt in "/\0") else QUOTE)
        elif c in _QUOTED:
            out.append(QUOTE + c)
        else:
            out.append(c)
    return "".join(out)


def to_mega(name: str) -> str:
    """The MEGA name shown as POSIX name ``name`` (the inverse of :func:`to_posix`)."""
    if name == QUOTE:
        return ""
    if name in (DOT, DOT + DOT):
        return "." * len(name)
    out = []
    i = 0
    while i < len(name):
        c = name[i]
        if c == QUOTE and i + 1 < len(name) and name[i + 1] in _QUOTED:
            out.append(name[i + 1])
            i += 2
            continue
        out.append("/" if c == SLASH else "\0" if c == NUL else c)
        i += 1
    return "".join(out)


def posix_bytes(name: str) -> bytes | None:
    """``to_posix(name)`` as a directory entry, or None if it cannot be one (longer
    than NAME_MAX bytes, or not encodable)."""
    try:
        raw = to_posix(name).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes
        return None
    return raw if len(raw) <= NAME_MAX else None


def from_posix_bytes(raw: bytes) -> str | None:
    """The MEGA name for a directory entry given by the kernel, or None if it is not
    UTF-8 (MEGA names travel in JSON and must be Unicode) or not the way the mount
    shows any MEGA name (a quote mark that quotes nothing, e.g. ``‛‛x``)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    name = to_mega(text)
    return name if to_posix(name) == text else None
