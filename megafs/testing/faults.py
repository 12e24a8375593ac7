"""A store wrapper that injects failures, latency and damage, for tests.

:class:`FaultyStore` forwards every operation to an inner store. Before forwarding it
counts the call in :attr:`FaultyStore.calls` (injected failures count too, so a test
can see how often a caller retried), sleeps :attr:`FaultyStore.delay` seconds, and
raises the next exception queued for that operation by
:meth:`FaultyStore.fail_next`, if any, without reaching the inner store.
"""

from __future__ import annotations

import collections
from typing import Final, final

import trio

from megafs.stores.base import ObjectInfo, ObjectStore

OPERATIONS: Final = frozenset({"get", "put", "delete", "head", "list", "aclose"})


@final
class FaultyStore:
    """An :class:`~megafs.stores.base.ObjectStore` wrapping ``inner`` with fault knobs.

    Knobs and logs (plain attributes; set or inspect them freely):

    * :attr:`delay` -- seconds slept before every operation. A change applies to
      operations already waiting too (measured from their start): setting it back to
      0 releases a stalled caller at once.
    * :attr:`corrupt_gets` -- keys whose ``get`` returns the bytes with the middle byte
      XOR-ed with ``0x01`` (an empty result stays empty).
    * :attr:`truncate_gets` -- keys whose ``get`` returns only the first half of the
      bytes (rounded down). Applied before corruption when a key is in both sets.
    * :attr:`calls` -- how many times each operation was called, e.g. ``calls["get"]``.
    * :attr:`gets` -- ``(key, start, end)`` of every ``get`` call, in order.
    """

    def __init__(self, inner: ObjectStore) -> None:
        self.inner: Final = inner
        self._delay = 0.0
        self._delay_changed = trio.Event()
        self.corrupt_gets: set[str] = set()
        self.truncate_gets: set[str] = set()
        self.calls: collections.Counter[str] = collections.Counter()
        self.gets: list[tuple[str, int, int | None]] = []
        self.puts: list[str] = []
        self._faults: dict[str, collections.deque[Exception]] = {
            op: collections.deque() for op in OPERATIONS
        }

    def fail_next(self, op: str, exc: Exception, count: int = 1) -> None:
        """Make the next ``count`` calls of ``op`` raise ``exc``.

        ``op`` is one of :data:`OPERATIONS`. Faults queue behind faults already armed
        for the same operation.
        """
        if op not in OPERATIONS:
            raise ValueError(
                f"unknown store operation {op!r}; expected one of {sorted(OPERATIONS)}"
            )
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        self._faults[op].extend([exc] * count)

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._delay = seconds
        self._delay_changed.set()
        self._delay_changed = trio.Event()

    def pending_faults(self, op: str) -> int:
        """How many armed faults ``op`` has not consumed yet."""
        return len(self._faults[op])

    async def _enter(self, op: str) -> None:
        self.calls[op] += 1
        start = trio.current_time()
        await trio.lowlevel.checkpoint()
        while trio.current_time() < start + self._delay:
            changed = self._delay_changed
            with trio.move_on_at(start + self._delay):
                await changed.wait()
        faults = self._faults[op]
        if faults:
            raise faults.popleft()

    @property
    def url(self) -> str:
        return f"faulty:{self.inner.url}"

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        self.gets.append((key, start, end))
        await self._enter("get")
        data = await self.inner.get(key, start, end)
        if key in self.truncate_gets:
            data = data[: len(data) // 2]
        if key in self.corrupt_gets and data:
            damaged = bytearray(data)
            damaged[len(damaged) // 2] ^= 0x01
            data = bytes(damaged)
        return data

    async def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        self.puts.append(key)
        await self._enter("put")
        return await self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)

    async def delete(self, key: str) -> None:
        await self._enter("delete")
        await self.inner.delete(key)

    async def head(self, key: str) -> ObjectInfo:
        await self._enter("head")
        return await self.inner.head(key)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        await self._enter("list")
        return await self.inner.list(prefix)

    async def aclose(self) -> None:
        await self._enter("aclose")
        await self.inner.aclose()
