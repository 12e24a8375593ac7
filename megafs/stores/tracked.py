"""A store wrapper that remembers the store's last error, for ``megafs status``,
and traces every request at debug level (``-o debug``).

Errors are failures of the store (:class:`~megafs.errors.StoreError`, including
retries that ran out), not its ordinary answers: ``ObjectNotFound`` and
``PreconditionFailed`` are not errors here. Keys are opaque (no plaintext names), so
the trace may name them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, TypeVar, final

from megafs.errors import ObjectNotFound, PreconditionFailed, StoreError
from megafs.stats import ErrorLog
from megafs.stores.base import Computed, ObjectInfo, ObjectStore, data_size, put_computed

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@final
class TrackedStore:
    """Forwards everything to ``inner``; see the module docstring."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner: Final = inner
        self.errors = ErrorLog()

    @property
    def url(self) -> str:
        return self.inner.url

    async def _call(self, what: str | Callable[[], str], op: Awaitable[_T]) -> _T:
        """Await ``op``, noting how it went; ``what`` names it in the trace (a
        callable: known only once ``op`` ran)."""
        start = time.monotonic()
        try:
            result = await op
        except (ObjectNotFound, PreconditionFailed) as exc:
            self.errors.ok()  # the store answered
            if log.isEnabledFor(logging.DEBUG):
                log.debug("store %s: %s (%.3f s)", _name(what), type(exc).__name__, _since(start))
            raise
        except StoreError as exc:
            self.errors.error(f"{type(exc).__name__}: {exc}")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("store %s failed (%.3f s): %s", _name(what), _since(start), exc)
            raise
        self.errors.ok()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("store %s: ok%s (%.3f s)", _name(what), _size(result), _since(start))
        return result

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        what = f"get {key}" if not start and end is None else f"get {key} [{start}:{end}]"
        return await self._call(what, self.inner.get(key, start, end))

    async def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        op = self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)
        return await self._call(f"put {key} ({len(data)} bytes)", op)

    async def put_computed(
        self,
        compute: Callable[[], Computed | None],
        after: Callable[[], None] | None = None,
    ) -> str | None:
        put: list[tuple[str, int]] = []

        def noted() -> Computed | None:
            result = compute()
            if result is not None:
                put.append((result[0], data_size(result[1])))
            return result

        def what() -> str:
            return f"put {put[0][0]} ({put[0][1]} bytes)" if put else "put (nothing computed)"

        return await self._call(what, put_computed(self.inner, noted, after))

    async def delete(self, key: str) -> None:
        await self._call(f"delete {key}", self.inner.delete(key))

    async def head(self, key: str) -> ObjectInfo:
        return await self._call(f"head {key}", self.inner.head(key))

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        return await self._call(f"list {prefix or '(all)'}", self.inner.list(prefix))

    async def aclose(self) -> None:
        await self.inner.aclose()


def _name(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def _since(start: float) -> float:
    return time.monotonic() - start


def _size(result: object) -> str:
    if isinstance(result, bytes):
        return f", {len(result)} bytes"
    if isinstance(result, list):
        return f", {len(result)} objects"
    return ""


class _Fronted(Protocol):
    store: ObjectStore


class _Staging(Protocol):
    remote: ObjectStore


def track_store(volume: _Fronted, staging: _Staging | None) -> TrackedStore:
    """Put a :class:`TrackedStore` right above a volume's remote store: under the
    staging area when there is one (its uploads then go through it too), else under
    the volume. Call it before the staging area's uploader starts."""
    if staging is not None:
        staging.remote = tracked = TrackedStore(staging.remote)
    else:
        volume.store = tracked = TrackedStore(volume.store)
    return tracked
