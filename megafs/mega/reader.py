"""Reading MEGA file content: whole MEGA chunks, cached sealed, MAC-checked.

A read is served from whole MEGA chunks (128 KiB growing to 1 MiB, §5.3 of the
protocol notes): each is fetched with one ranged request, decrypted (AES-128-CTR at
its offset) and kept in the block cache under the node's handle and chunk index.
Concurrent readers of one missing chunk share one fetch (``_inflight``). The chunk
MAC of every chunk seen is recorded; once every chunk of a file has been seen, the
file's condensed MAC is compared with the one in its key (MEGA stores no per-chunk
MACs, so partial reads cannot be authenticated, only whole files). A mismatch drops
the file's chunks from the cache, logs a warning and is EIO, for every later read of
the node too (while the mount lasts).

Sequential readers get read-ahead: the next ``READAHEAD_CHUNKS`` chunks are fetched
in the background (at most ``FETCHES`` fetches at once).

Download URLs (from ``g``) are cached per node for ``URL_TTL`` and refreshed when
the storage server says they expired.

Ownership: the reader's tables are changed only in synchronous code; an entry in
``_inflight`` is removed (and its event set) by the task that added it, whatever
happens to the fetch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Final

import trio

from megafs.errors import IntegrityError
from megafs.mega import crypto, transfer
from megafs.mega.api import MegaApi
from megafs.mega.errors import MegaError, UrlExpired
from megafs.mega.tree import MegaNode
from megafs.vfs.blockcache import BlockCache

log = logging.getLogger(__name__)

URL_TTL: Final = 300.0
READAHEAD_CHUNKS: Final = 8
FETCHES: Final = 4


@dataclass
class ReadState:
    """Per open handle: where a sequential reader goes next."""

    next_off: int = -1
    ra_next: int = 0  # next chunk index read-ahead will ask for


def cache_key(handle: str, index: int) -> bytes:
    return b"mega/" + handle.encode() + b"/" + index.to_bytes(4, "big")


class ChunkReader:
    """See the module docstring."""

    def __init__(self, api: MegaApi, cache: BlockCache) -> None:
        self.api = api
        self.cache = cache
        self.errors = 0
        self._macs: dict[str, dict[int, bytes]] = {}
        self._verified: set[str] = set()
        self._bad: set[str] = set()  # MAC mismatch seen: every read of these is EIO
        self._inflight: dict[tuple[str, int], trio.Event] = {}
        self._urls: dict[str, tuple[str, float]] = {}
        self._fetch_limit = trio.Semaphore(FETCHES)
        self.nursery: trio.Nursery | None = None

    def verified(self, handle: str) -> None:
        """Content of ``handle`` is known good (this mount uploaded it)."""
        self._verified.add(handle)

    def forget_url(self, handle: str) -> None:
        self._urls.pop(handle, None)

    async def read(self, m: MegaNode, st: ReadState, off: int, size: int) -> bytes:
        end = min(off + size, m.size)
        if off >= end:
            return b""
        first = crypto.chunk_index(off)
        last = crypto.chunk_index(end - 1)
        parts = []
        for index in range(first, last + 1):
            start = crypto.chunk_start(index)
            data = await self.chunk(m, index)
            parts.append(data[max(0, off - start) : end - start])
        self._read_ahead(st, m, off, end, last)
        return b"".join(parts)

    def _read_ahead(self, h: ReadState, m: MegaNode, off: int, end: int, last: int) -> None:
        sequential = off == h.next_off
        h.next_off = end
        if not sequential or self.nursery is None:
            h.ra_next = last + 1
            return
        total = len(crypto.chunk_bounds(m.size))
        want = min(total, last + 1 + READAHEAD_CHUNKS)
        index = max(h.ra_next, last + 1)
        while index < want:
            if (m.handle, index) not in self._inflight and not self.cache.has(
                cache_key(m.handle, index)
            ):
                self.nursery.start_soon(self._prefetch, m, index)
            index += 1
        h.ra_next = index

    async def _prefetch(self, m: MegaNode, index: int) -> None:
        try:
            await self.chunk(m, index)
        except Exception as exc:
            log.debug("read-ahead of node %s chunk %d failed: %s", m.handle, index, exc)

    async def chunk(self, m: MegaNode, index: int) -> bytes:
        """One whole MEGA chunk of a file, plaintext: from the block cache or
        fetched; its chunk MAC is recorded for the file's meta-MAC check."""
        key = cache_key(m.handle, index)
        if m.handle in self._bad:
            raise IntegrityError(f"MEGA node {m.handle}: MAC mismatch")
        while True:
            data = self.cache.get(key)
            if data is not None:
                break
            ev = self._inflight.get((m.handle, index))
            if ev is not None:
                await ev.wait()
                continue
            ev = self._inflight[(m.handle, index)] = trio.Event()
            try:
                data = await self._fetch(m, index)
                self.cache.put(key, data)
            finally:
                del self._inflight[(m.handle, index)]
                ev.set()
            break
        self._check_mac(m, index, data)
        return data

    async def _fetch(self, m: MegaNode, index: int) -> bytes:
        start = crypto.chunk_start(index)
        length = crypto.chunk_bounds(m.size)[index][1]
        fk = m.file_key
        async with self._fetch_limit:
            for attempt in range(3):
                url = await self._url(m.handle, fresh=attempt > 0)
                try:
                    raw = await transfer.read_range(self.api.http, url, start, start + length - 1)
                    break
                except UrlExpired:
                    self._urls.pop(m.handle, None)
            else:
                raise MegaError(detail=f"download URL for node {m.handle} keeps expiring")
        if len(raw) != length:
            raise IntegrityError(f"MEGA node {m.handle}: short chunk {index}")
        return crypto.ctr_crypt(fk.aes_key, fk.nonce, start, raw)

    async def _url(self, handle: str, *, fresh: bool = False) -> str:
        cached = self._urls.get(handle)
        if cached is not None and not fresh and cached[1] > time.monotonic():
            return cached[0]
        url, _size = await transfer.get_download_url(self.api, handle)
        self._urls[handle] = (url, time.monotonic() + URL_TTL)
        return url

    def _check_mac(self, m: MegaNode, index: int, data: bytes) -> None:
        if m.handle in self._verified or m.size == 0:
            return
        fk = m.file_key
        macs = self._macs.setdefault(m.handle, {})
        if index not in macs:
            macs[index] = crypto.chunk_mac(fk.aes_key, fk.nonce, data)
        total = len(crypto.chunk_bounds(m.size))
        if len(macs) < total:
            return
        ordered = [macs[i] for i in range(total)]
        del self._macs[m.handle]
        if crypto.condensed_mac(fk.aes_key, ordered) != fk.meta_mac:
            self._bad.add(m.handle)
            for i in range(total):
                self.cache.discard(cache_key(m.handle, i))
            self.errors += 1
            log.warning(
                "MAC mismatch for MEGA node %s: its content is not what was uploaded", m.handle
            )
            raise IntegrityError(f"MEGA node {m.handle}: MAC mismatch")
        self._verified.add(m.handle)
