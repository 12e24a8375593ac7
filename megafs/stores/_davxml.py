"""WebDAV multistatus answers (RFC 4918 §13), parsed with a safe XML parser.

Pure: bytes in, :class:`DavEntry` values out; no I/O.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

import defusedxml.ElementTree as SafeET

_DAV: Final = "{DAV:}"

#: The properties the store asks PROPFIND for.
PROPFIND_BODY: Final = (
    b'<?xml version="1.0" encoding="utf-8"?>'
    b'<d:propfind xmlns:d="DAV:"><d:prop>'
    b"<d:resourcetype/><d:getcontentlength/><d:getetag/>"
    b"</d:prop></d:propfind>"
)


class BadMultistatus(ValueError):
    """The answer is not well-formed XML."""


@dataclass(frozen=True)
class DavEntry:
    """One ``<response>``: its decoded path (no trailing ``/``) and properties."""

    path: str
    is_collection: bool
    size: int
    etag: str


def parse_multistatus(body: bytes, base: str) -> list[DavEntry]:
    """The resources a 207 answer to a PROPFIND on ``base`` (an encoded path) lists,
    ``base`` itself included. Properties come from the ``200`` propstats only."""
    try:
        root = SafeET.fromstring(body)
    except Exception as exc:
        raise BadMultistatus(type(exc).__name__) from None
    out: list[DavEntry] = []
    for r in root.iter(_DAV + "response"):
        href_el = r.find(_DAV + "href")
        if href_el is None or not href_el.text:
            continue
        href = urlsplit(href_el.text.strip()).path  # absolute URL or absolute path
        if not href.startswith("/"):
            href = posixpath.join(base, href)
        is_coll = False
        size = 0
        etag = ""
        for ps in r.iter(_DAV + "propstat"):
            status = ps.findtext(_DAV + "status") or ""
            if " 200 " not in status + " ":
                continue
            prop = ps.find(_DAV + "prop")
            if prop is None:
                continue
            rt = prop.find(_DAV + "resourcetype")
            if rt is not None and rt.find(_DAV + "collection") is not None:
                is_coll = True
            cl = prop.findtext(_DAV + "getcontentlength")
            if cl and cl.strip().isdigit():
                size = int(cl.strip())
            et = prop.findtext(_DAV + "getetag")
            if et:
                etag = et.strip()
        out.append(DavEntry(unquote(href).rstrip("/"), is_coll, size, etag))
    return out
