"""A store wrapper that behaves like a distant one: per-request latency and a shared
bandwidth limit. For benchmarks and tests (``-o store_latency=,store_bandwidth=``),
so behaviour against a real cloud store can be measured on one machine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, final

import trio

from megafs.stores.base import (
    Computed,
    ObjectInfo,
    ObjectStore,
    data_size,
    put_computed,
    run_after,
)


@final
class SlowStore:
    """Every request waits ``latency`` seconds; bodies (both directions) share one
    link of ``bandwidth`` bytes per second (0: unlimited), transferred in order."""

    def __init__(self, inner: ObjectStore, *, latency: float, bandwidth: float = 0.0) -> None:
        self.inner: Final = inner
        self.latency = latency
        self.bandwidth = bandwidth
        self._link_free = 0.0

    async def _transfer(self, nbytes: int) -> None:
        await trio.sleep(self.latency)
        if self.bandwidth > 0 and nbytes:
            now = trio.current_time()
            start = max(now, self._link_free)
            self._link_free = start + nbytes / self.bandwidth
            await trio.sleep_until(self._link_free)

    @property
    def url(self) -> str:
        return self.inner.url

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        data = await self.inner.get(key, start, end)
        await self._transfer(len(data))
        return data

    async def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        await self._transfer(len(data))
        return await self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)

    async def put_computed(
        self,
        compute: Callable[[], Computed | None],
        after: Callable[[], None] | None = None,
    ) -> str | None:
        # The inner store's put comes first here (in the inner store's worker
        # thread), the delay after: the caller hears of it as late as of a put. Then
        # ``after``, as for a remote store (whose put is a request, not a thread):
        # the staged file stays until the store "answered".
        sizes: list[int] = []

        def noted() -> Computed | None:
            result = compute()
            if result is not None:
                sizes.append(data_size(result[1]))
            return result

        etag = await put_computed(self.inner, noted)
        if etag is not None:
            await self._transfer(sizes[0])
            if after is not None:
                await run_after(after)
        return etag

    async def delete(self, key: str) -> None:
        await self._transfer(0)
        await self.inner.delete(key)

    async def head(self, key: str) -> ObjectInfo:
        await self._transfer(0)
        return await self.inner.head(key)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        await self._transfer(0)
        return await self.inner.list(prefix)

    async def aclose(self) -> None:
        await self.inner.aclose()
