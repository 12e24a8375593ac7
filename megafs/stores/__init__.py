"""Object stores: the :class:`ObjectStore` seam, its implementations, and
:func:`open_store`, which picks one from a URL.

Store URLs:

=====================================  ==============================================
``/some/path``, ``rel/path``           :class:`LocalStore` in that directory
``file:///some/path``                  :class:`LocalStore` (percent-decoded path)
``memory:``                            a new, empty :class:`MemoryStore`
``s3://BUCKET[/PREFIX]``               :class:`~megafs.stores.s3.S3Store` (endpoint, region and
                                       credentials from the environment, the AWS way)
``webdav+http(s)://``, ``mega://``     not supported yet (raise ``StoreError``)
=====================================  ==============================================

A string starting with ``scheme:`` (a letter, then at least one more of
``[A-Za-z0-9+.-]``) is a URL, never a path: write ``./odd:name`` for such a path.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from megafs.errors import StoreError
from megafs.stores.base import ObjectInfo as ObjectInfo
from megafs.stores.base import ObjectStore as ObjectStore
from megafs.stores.local import LocalStore as LocalStore
from megafs.stores.memory import MemoryStore as MemoryStore

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")
_NOT_YET = frozenset({"s3", "webdav+http", "webdav+https", "mega"})


def open_store(url: str) -> ObjectStore:
    """The store ``url`` names (see the module docstring).

    Raises :class:`~megafs.errors.StoreError` for an unknown or not yet supported
    scheme or a malformed URL. Error messages never repeat the URL beyond its scheme,
    since remote URLs may carry credentials. Nothing is opened or contacted here.
    """
    if not url:
        raise StoreError("empty store URL")
    match = _SCHEME.match(url)
    if match is None:
        return LocalStore(Path(url))
    scheme = match.group(1).lower()
    if scheme == "file":
        return LocalStore(_file_url_path(url))
    if scheme == "memory":
        if url[match.end() :]:
            raise StoreError("memory store URL takes nothing after 'memory:'")
        return MemoryStore()
    if scheme == "s3":
        from megafs.stores.s3 import S3Store  # configured from the environment

        return S3Store.from_url(url)
    if scheme in ("webdav+http", "webdav+https"):
        from megafs.stores.webdav import WebDavStore  # credentials from the environment

        return WebDavStore.from_url(url)
    if scheme in _NOT_YET:
        raise StoreError(f"{scheme}:// store not supported yet")
    raise StoreError(
        f"unknown store URL scheme {scheme!r}: expected a path, file:///path or memory:"
    )


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise StoreError(f"file URL host must be empty or localhost, not {parts.netloc!r}")
    if parts.query or parts.fragment:
        raise StoreError("file URL must not have a query or fragment (escape '?' and '#')")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise StoreError("file URL needs an absolute path: file:///path")
    return Path(path)
