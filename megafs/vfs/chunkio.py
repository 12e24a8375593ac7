"""Chunk reads and writes for the vfs, through the chunk cache.

:class:`ChunkIO` sits between file content (:mod:`megafs.vfs.content`) and the
drive. Reads are served block by block from the :class:`~megafs.vfs.chunkcache.
ChunkCache`; missing runs of blocks are fetched with one ranged request each.
Concurrent readers of the same missing block share one fetch: the first claims the
block in ``_inflight`` (synchronously, before its first ``await``) and the others
wait for its event, then look again.

Read-ahead: :meth:`prefetch` fetches a range in the background into the cache, so a
streaming reader finds its next blocks there. The vfs decides what to prefetch.
Requests go into a FIFO queue (at most ``PREFETCH_QUEUE_MAX`` waiting) that up to
``prefetch_tasks`` workers empty, so pieces are fetched in the order asked and
are not dropped while the workers are busy: a dropped piece is one the reader
later fetches itself, a round trip per FUSE read, which on a remote store with
latency is most of a stream's time. The queue and the worker count change only in
synchronous sections.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from megafs.errors import MegafsError
from megafs.format.chunks import ChunkContent
from megafs.format.records import ChunkRef
from megafs.vfs.chunkcache import ChunkCache

log = logging.getLogger(__name__)

#: Read-ahead requests waiting at most (pieces of 1 MiB up to a chunk: the vfs's
#: read-ahead window of one stream is at most 32 MiB).
PREFETCH_QUEUE_MAX = 64
#: Read-ahead of blocks that are in the disk cache goes in pieces of this many blocks.
DISK_PIECE_BLOCKS = 16


class ContentDrive(Protocol):
    """What ChunkIO needs of a drive."""

    @property
    def block_size(self) -> int: ...

    async def write_chunk(self, plaintext: ChunkContent) -> ChunkRef: ...

    async def fetch_sealed(self, ref: ChunkRef, first: int, stop: int) -> bytes: ...

    def open_blocks(self, ref: ChunkRef, first: int, sealed: bytes) -> list[bytes]: ...


_key = ChunkCache.key


class ChunkIO:
    """See the module docstring."""

    def __init__(self, drive: ContentDrive, cache: ChunkCache, *, prefetch_tasks: int = 8):
        self.drive = drive
        self.cache = cache
        self.bs = drive.block_size
        self._inflight: dict[bytes, trio.Event] = {}
        self._prefetch_tasks = prefetch_tasks
        self._prefetch_queue: deque[tuple[ChunkRef, int, int]] = deque()
        self._prefetch_workers = 0
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Background fetches (read-ahead) run in ``nursery``."""
        self._nursery = nursery

    async def write_chunk(self, plaintext: ChunkContent) -> ChunkRef:
        # Not cached here: until it is uploaded, reads find it in the staging area,
        # which then hands its file to the cache (ChunkCache.claim).
        return await self.drive.write_chunk(plaintext)

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Run ``fn(*args)`` in the background; False if there is no nursery yet."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    async def read_chunk(self, ref: ChunkRef, p_start: int, p_end: int) -> bytes:
        """Plaintext ``[p_start, p_end)`` of a chunk."""
        p_end = min(p_end, ref.length)
        if p_start >= p_end:
            return b""
        first, stop = p_start // self.bs, -(-p_end // self.bs)
        blocks = await self._blocks(ref, first, stop)
        data = blocks[0] if len(blocks) == 1 else b"".join(blocks)
        off = p_start - first * self.bs
        return data[off : off + (p_end - p_start)]

    async def _blocks(self, ref: ChunkRef, first: int, stop: int) -> list[bytes]:
        got: dict[int, bytes] = {}
        while True:
            missing: list[int] = []
            waits: list[trio.Event] = []
            todo = [j for j in range(first, stop) if j not in got]
            if not todo:
                return [got[j] for j in range(first, stop)]
            got.update(await self.cache.get_many(ref, todo[0], todo[-1] + 1))
            # (get_many may have waited for a thread: another task's fetch of a block
            # may have finished meanwhile, so memory is looked at again. From here
            # to _fetch's claim of the missing blocks there is no await.)
            for j in range(first, stop):
                if j in got:
                    continue
                if (mem := self.cache.peek_memory(ref, j)) is not None:
                    got[j] = mem
                elif (ev := self._inflight.get(_key(ref, j))) is not None:
                    waits.append(ev)
                else:
                    missing.append(j)
            if missing:
                # Fetch the first run of consecutive missing blocks.
                run_end = missing[0] + 1
                while run_end in missing:
                    run_end += 1
                got.update(await self._fetch(ref, missing[0], run_end))
                continue
            if waits:
                for ev in waits:
                    await ev.wait()
                continue
            return [got[j] for j in range(first, stop)]

    async def _fetch(self, ref: ChunkRef, first: int, stop: int) -> dict[int, bytes]:
        keys = [_key(ref, j) for j in range(first, stop)]
        events = {k: trio.Event() for k in keys if k not in self._inflight}
        self._inflight.update(events)
        try:
            sealed = await self.drive.fetch_sealed(ref, first, stop)
            # Opened (authenticated), in the memory cache and written to the disk
            # cache before the waiters wake.
            blocks = await self.cache.fill(ref, first, sealed)
        finally:
            for k, ev in events.items():
                del self._inflight[k]
                ev.set()
        return dict(enumerate(blocks, first))

    def prefetch(self, ref: ChunkRef, p_start: int, p_end: int) -> None:
        """Fetch ``[p_start, p_end)`` of a chunk into the cache in the background,
        in order (best effort: nothing if PREFETCH_QUEUE_MAX wait already)."""
        p_end = min(p_end, ref.length)
        if self._nursery is None or p_start >= p_end:
            return
        first, stop = p_start // self.bs, -(-p_end // self.bs)
        if all(self.cache.in_memory(ref, j) for j in (first, stop - 1)):
            return  # (blocks only on disk are worth it: they are read in a thread)
        step = stop - first
        if step > DISK_PIECE_BLOCKS and self.cache.on_disk(ref, first, stop):
            # From the local disk cache: pieces read side by side by the workers
            # (a remote store is asked once for the whole range instead).
            step = DISK_PIECE_BLOCKS
        for piece in range(first, stop, step):
            if len(self._prefetch_queue) >= PREFETCH_QUEUE_MAX:
                return
            self._prefetch_queue.append((ref, piece, min(piece + step, stop)))
            if self._prefetch_workers < self._prefetch_tasks:
                self._prefetch_workers += 1
                self._nursery.start_soon(self._prefetch_worker)

    async def _prefetch_worker(self) -> None:
        try:
            while self._prefetch_queue:
                ref, first, stop = self._prefetch_queue.popleft()
                try:
                    await self._blocks(ref, first, stop)
                except MegafsError as exc:
                    # The reader will hit (and report) the same error when it gets there.
                    log.debug("read-ahead failed: %s", exc)
        finally:
            self._prefetch_workers -= 1
