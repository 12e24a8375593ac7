"""A store in a dict, for tests and throwaway volumes.

ETag: the hex SHA-256 of the content, so (like S3's MD5 ETags) rewriting identical
bytes keeps the ETag. Keys and ranges are validated exactly as
:class:`~megafs.stores.local.LocalStore` does, so code tested against this store does
not use keys a real store refuses.

Every operation yields to trio once (before acting), then acts without yielding, so
each one is atomic and concurrent tasks interleave between operations.
"""

from __future__ import annotations

import hashlib
from typing import final

import trio

from megafs.errors import ObjectNotFound, PreconditionFailed
from megafs.stores.base import ObjectInfo
from megafs.stores.local import check_range, validate_key


def _missing(key: str) -> ObjectNotFound:
    return ObjectNotFound(f"memory store: no object {key!r}")


@final
class MemoryStore:
    """An :class:`~megafs.stores.base.ObjectStore` backed by a dict.

    :meth:`aclose` keeps the contents, so the same instance can be handed to a new
    mount to simulate reopening a volume.
    """

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, str]] = {}

    @property
    def url(self) -> str:
        return "memory:"

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the object, clipped to its size."""
        validate_key(key)
        check_range(start, end)
        await trio.lowlevel.checkpoint()
        try:
            data, _ = self._objects[key]
        except KeyError:
            raise _missing(key) from None
        return data[start:end]

    async def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Replace (or create) the object; return its new ETag."""
        validate_key(key)
        if if_none_match and if_match is not None:
            raise ValueError("put: if_none_match and if_match are exclusive")
        data = bytes(data)  # a private copy, whatever buffer the caller passed
        etag = hashlib.sha256(data).hexdigest()
        await trio.lowlevel.checkpoint()
        current = self._objects.get(key)
        if if_none_match and current is not None:
            raise PreconditionFailed(f"memory store: {key!r} already exists")
        if if_match is not None:
            if current is None:
                raise PreconditionFailed(f"memory store: {key!r} does not exist")
            if current[1] != if_match:
                raise PreconditionFailed(f"memory store: {key!r} has changed (ETag mismatch)")
        self._objects[key] = (data, etag)
        return etag

    async def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""
        validate_key(key)
        await trio.lowlevel.checkpoint()
        self._objects.pop(key, None)

    async def head(self, key: str) -> ObjectInfo:
        """Size and ETag of the object."""
        validate_key(key)
        await trio.lowlevel.checkpoint()
        try:
            data, etag = self._objects[key]
        except KeyError:
            raise _missing(key) from None
        return ObjectInfo(key, len(data), etag)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""
        await trio.lowlevel.checkpoint()
        return [
            ObjectInfo(key, len(data), etag)
            for key, (data, etag) in sorted(self._objects.items())
            if key.startswith(prefix)
        ]

    async def aclose(self) -> None:
        """Nothing to release; the contents stay (see the class docstring)."""
        await trio.lowlevel.checkpoint()
