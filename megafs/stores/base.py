"""The object store seam.

An object store is a flat, dumb, untrusted key -> bytes map. Keys are ASCII strings
made of ``[a-z0-9._-]`` segments separated by ``/`` (e.g. ``c/ab/ab12...``); stores
may map ``/`` to directories or prefixes, and must give every key back unchanged
from :meth:`ObjectStore.list`.

Contract (checked by :func:`megafs.testing.check_store` against every store):

* ``get(key, start, end)`` returns bytes ``[start, end)`` of the object (``end=None``
  means to its end; a range past the end is clipped, never padded). A missing object
  raises :class:`~megafs.errors.ObjectNotFound`.
* ``put(key, data)`` replaces the object atomically: a reader sees the old or the new
  bytes, never a mix or a prefix. With ``if_none_match=True`` it raises
  :class:`~megafs.errors.PreconditionFailed` if the key exists; with ``if_match=ETAG``
  it raises it unless the current ETag equals ``ETAG``. Returns the new ETag.
  ``data`` may be a ``bytearray`` (a sealed chunk is built in one, and copying 4 MiB
  per chunk on the write path is not free); the caller never changes it afterwards,
  so a store may keep it or send it as it is.
* ``delete(key)`` is idempotent: deleting a missing key is not an error.
* ``head(key)`` returns :class:`ObjectInfo` or raises ``ObjectNotFound``.
* ``list(prefix)`` returns every object whose key starts with ``prefix``, sorted by key.
* Transient failures raise :class:`~megafs.errors.StoreUnavailable`; everything else a
  subclass of :class:`~megafs.errors.StoreError`. No foreign exception escapes.
* Every method is safe to call concurrently from many trio tasks.
* ``aclose()`` releases connections; the store is not used after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeGuard, runtime_checkable

import trio


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object."""

    key: str
    size: int
    etag: str


class ObjectStore(Protocol):
    """A flat key -> bytes store. See the module docstring for the contract."""

    @property
    def url(self) -> str:
        """A printable description of where the store lives (no secrets)."""
        ...

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes: ...

    async def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str: ...

    async def delete(self, key: str) -> None: ...

    async def head(self, key: str) -> ObjectInfo: ...

    async def list(self, prefix: str = "") -> list[ObjectInfo]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Deferred:
    """Object data written straight into a buffer the store provides: ``fill(dst)``
    writes exactly ``size`` bytes into ``dst`` (any thread). What a computation may
    return instead of the bytes themselves, so the staging area can seal a chunk
    straight into its aligned write buffer rather than into a buffer of its own that
    it then copies (see :meth:`megafs.stores.staging.StagingStore.put_computed`)."""

    size: int
    fill: Callable[[memoryview], None]

    def materialize(self) -> bytearray:
        out = bytearray(self.size)
        self.fill(memoryview(out))
        return out


#: What a computation for :func:`put_computed` returns: a key and its object's data.
Computed = tuple[str, bytes | bytearray | Deferred]


def data_size(data: bytes | bytearray | Deferred) -> int:
    return data.size if isinstance(data, Deferred) else len(data)


def materialized(result: Computed | None) -> tuple[str, bytes | bytearray] | None:
    """``result`` with its data as bytes (a :class:`Deferred` filled into a buffer)."""
    if result is None:
        return None
    key, data = result
    return key, data.materialize() if isinstance(data, Deferred) else data


@runtime_checkable
class ComputedPut(Protocol):
    """A store that can compute what it stores in its own worker thread (the
    staging area: :meth:`megafs.stores.staging.StagingStore.put_computed`)."""

    async def put_computed(
        self,
        compute: Callable[[], Computed | None],
        after: Callable[[], None] | None = None,
    ) -> str | None: ...


_COMPUTES: dict[type, bool] = {}


def _computes(store: object) -> TypeGuard[ComputedPut]:
    """``isinstance(store, ComputedPut)``, remembered per type (a protocol check
    inspects the class every time: 6 % of the event loop's time uploading small
    chunks)."""
    kind = type(store)
    known = _COMPUTES.get(kind)
    if known is None:
        known = _COMPUTES[kind] = isinstance(store, ComputedPut)
    return known


async def put_computed(
    store: ObjectStore,
    compute: Callable[[], Computed | None],
    after: Callable[[], None] | None = None,
) -> str | None:
    """Run ``compute`` in a worker thread and put the ``(key, data)`` it returns
    (unconditionally; a :class:`Deferred` is filled into a buffer of its own unless
    the store takes it as it is); its ETag, or None (nothing put) if it returns None.
    Then, if something was put, run ``after`` (it must not raise) in a worker thread.
    All in one worker thread when ``store`` can (:class:`ComputedPut`), else a thread
    for ``compute``, ``put``, and ``after`` with those of other puts that end
    meanwhile (:func:`run_after`)."""
    if _computes(store):
        return await store.put_computed(compute, after)
    result = await trio.to_thread.run_sync(lambda: materialized(compute()))
    if result is None:
        return None
    etag = await store.put(*result)
    if after is not None:
        await run_after(after)
    return etag


@dataclass
class _Afters:
    """The ``after`` steps waiting for a worker thread, and the batch in one."""

    todo: list[tuple[Callable[[], None], trio.Event]]
    running: trio.Event | None = None  # set when the batch in a thread has ended


_AFTERS: trio.lowlevel.RunVar[_Afters] = trio.lowlevel.RunVar("megafs_afters")


def _run_all(steps: list[Callable[[], None]]) -> None:
    for step in steps:
        step()


async def run_after(step: Callable[[], None]) -> None:
    """Run ``step`` (a put's ``after``: a staged file's unlink or rename; it must not
    raise) in a worker thread, with the steps of other puts that end meanwhile: one
    thread hop per batch, not per put (a hop costs more than a rename: perf put 2/3
    of the daemon's time uploading small chunks in the kernel, switching threads).
    Measured on the slow-store ``tar x`` (1,200 uploads, 4 interleaved runs each):
    the time until the store had everything 2.27-2.49 -> 2.15-2.18 s, the daemon's
    CPU meanwhile 2.5-2.7 -> 2.2-2.3 s.

    Concurrency: the caller whose step is not done and finds no batch running takes
    every waiting step into one batch and runs it; the others wait for that batch to
    end and look again. A batch that did not run (its runner was cancelled before
    the thread started) goes back to the front of the queue."""
    try:
        afters = _AFTERS.get()
    except LookupError:
        afters = _Afters([])
        _AFTERS.set(afters)
    done = trio.Event()
    afters.todo.append((step, done))
    while not done.is_set():
        if afters.running is not None:
            await afters.running.wait()
            continue
        batch, afters.todo = afters.todo, []
        running = afters.running = trio.Event()
        ran = False
        try:
            await trio.to_thread.run_sync(_run_all, [s for s, _ in batch])
            ran = True
        finally:
            afters.running = None
            running.set()
            if ran:
                for _, ended in batch:
                    ended.set()
            else:
                afters.todo[:0] = batch
