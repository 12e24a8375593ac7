"""The local block cache: clean content blocks on disk, sealed, with a size cap.

Keys are opaque bytes chosen by the drive (e.g. chunk id + block number); values are
plaintext blocks. On disk each block is one file named by a keyed hash of its key
and sealed with the volume's cache key (AES-256-GCM, the file name in the associated
data), so a stolen cache reveals nothing the store would not. A file that fails to
open (damaged, swapped, truncated) is deleted and reported as a miss: the caller
refetches from the store, and a damaged cache never serves wrong bytes.

The cap holds on every insert: least recently used blocks are evicted first. Only
clean data lives here (dirty data is in the staging area), so anything may be
evicted, including blocks of open files. The cache gives way on a full disk: when
its own write fails for lack of space, or when the staging area on the same disk
asks (:meth:`BlockCache.make_room`), it halves its cap for the rest of the mount.
A small in-memory LRU of plaintext blocks sits in front (``memory_bytes``), for
blocks read again right away.

All methods but :meth:`BlockCache.put_many` are synchronous: each touches one
small file (tens of KiB), which is cheaper inline than a thread hop. ``put_many``
(a fetched run of blocks, up to a chunk) seals and writes its files in a worker
thread: a sequential read fills the cache at hundreds of MiB/s, and that work on
the event loop's thread was most of a streaming read's cost. The index (``_index``,
LRU order) is only changed on the event loop's thread, in synchronous sections, so
no ``await`` ever splits an update; the worker thread touches only files whose
names are not in the index yet (a name enters the index after its file is whole).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import final

import trio
from cachetools import LRUCache
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from megafs.errors import IntegrityError
from megafs.format.seal import KIND_CACHE, OVERHEAD, context, open_sealed, seal

log = logging.getLogger(__name__)


@final
class BlockCache:
    """See the module docstring."""

    def __init__(
        self,
        directory: Path | None,
        cache_key: bytes,
        volume_id: bytes,
        *,
        max_bytes: int,
        memory_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._name_key = hmac.new(cache_key, b"megafs/v1/cache-names", hashlib.sha256).digest()
        self._aead = AESGCM(cache_key)
        self._volume_id = volume_id
        self._memory: LRUCache[bytes, bytes] = LRUCache(maxsize=memory_bytes, getsizeof=len)
        self._index: OrderedDict[str, int] = OrderedDict()  # file name -> size on disk
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._cuts = 0  # how many times make_room cut the cap
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._load_index()

    def _load_index(self) -> None:
        assert self.directory is not None
        found: list[tuple[float, str, int]] = []
        for sub in self.directory.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.startswith(".tmp"):
                    f.unlink(missing_ok=True)
                    continue
                st = f.stat()
                found.append((st.st_mtime, f.name, st.st_size))
        for _, name, size in sorted(found):
            self._index[name] = size
            self.bytes += size
        self._evict()

    def _name(self, key: bytes) -> str:
        return hmac.new(self._name_key, key, hashlib.sha256).hexdigest()[:40]

    def _path(self, name: str) -> Path:
        assert self.directory is not None
        return self.directory / name[:2] / name

    def has(self, key: bytes) -> bool:
        """Whether ``key`` is cached (no read, no statistics, no LRU update)."""
        return key in self._memory or (
            self.directory is not None and self._name(key) in self._index
        )

    def in_memory(self, key: bytes) -> bool:
        """Whether ``key`` is in the memory cache (no statistics, no LRU update)."""
        return key in self._memory

    def peek_memory(self, key: bytes) -> bytes | None:
        """The block if it is in the memory cache (no statistics)."""
        return self._memory.get(key)

    async def get_many(self, keys: list[bytes]) -> dict[bytes, bytes]:
        """The cached blocks among ``keys``. Those only on disk are read and opened
        in a worker thread when there are several (after a drop of the page cache,
        each is a disk read: not something to wait for on the event loop's thread)."""
        out: dict[bytes, bytes] = {}
        on_disk: list[tuple[bytes, str]] = []
        for key in keys:
            data = self._memory.get(key)
            if data is not None:
                self.hits += 1
                out[key] = data
            elif self.directory is not None and (name := self._name(key)) in self._index:
                on_disk.append((key, name))
            else:
                self.misses += 1
        if len(on_disk) < 2:
            for key, _ in on_disk:
                data = self.get(key)
                if data is not None:
                    out[key] = data
            return out
        read = await trio.to_thread.run_sync(
            lambda: [(key, name, self._read_file(name)) for key, name in on_disk]
        )
        for key, name, result in read:
            if isinstance(result, bytes):
                self._hit(key, name, result)
                out[key] = result
            else:
                self._unreadable(name, result)
        return out

    def _read_file(self, name: str) -> bytes | Exception:
        """The opened content of the file for ``name``, or the error. Touches no
        shared state (runs in worker threads)."""
        path = self._path(name)
        try:
            return open_sealed(self._aead, path.read_bytes(), self._ad(name), f"cache file {path}")
        except (OSError, IntegrityError) as exc:
            return exc

    def _hit(self, key: bytes, name: str, data: bytes) -> None:
        if name in self._index:
            self._index.move_to_end(name)
        self._remember(key, data)
        self.hits += 1

    def _unreadable(self, name: str, exc: Exception) -> None:
        log.warning("block cache: dropping unreadable %s (%s); refetching", self._path(name), exc)
        self._drop(name)
        self.misses += 1

    def get(self, key: bytes) -> bytes | None:
        data = self._memory.get(key)
        if data is not None:
            self.hits += 1
            return data
        if self.directory is None:
            self.misses += 1
            return None
        name = self._name(key)
        if name not in self._index:
            self.misses += 1
            return None
        result = self._read_file(name)
        if not isinstance(result, bytes):
            self._unreadable(name, result)
            return None
        self._hit(key, name, result)
        return result

    def _remember(self, key: bytes, data: bytes) -> None:
        if len(data) <= self._memory.maxsize:
            self._memory[key] = data

    def put(self, key: bytes, data: bytes, *, disk: bool = True) -> None:
        """Insert a clean block (``disk=False``: memory only)."""
        self._remember(key, data)
        if self.directory is None or not disk or len(data) + OVERHEAD > self.max_bytes:
            return
        name = self._name(key)
        if name in self._index:
            self._index.move_to_end(name)
            return
        self._written(name, self._write_file(name, data))

    def remember_many(self, items: list[tuple[bytes, bytes]]) -> None:
        """Insert clean blocks in the memory cache only."""
        for key, data in items:
            self._remember(key, data)

    async def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        """Insert clean blocks: in memory at once, on disk from a worker thread."""
        self.remember_many(items)
        if self.directory is None:
            return
        todo = [
            (self._name(key), data) for key, data in items if len(data) + OVERHEAD <= self.max_bytes
        ]
        todo = [(name, data) for name, data in todo if name not in self._index]
        if not todo:
            return
        if len(todo) == 1:
            self._written(todo[0][0], self._write_file(*todo[0]))
            return
        cuts = self._cuts
        results = await trio.to_thread.run_sync(
            lambda: [(name, self._write_file(name, data)) for name, data in todo]
        )
        full = False
        for name, result in results:
            if isinstance(result, OSError) and result.errno in (errno.ENOSPC, errno.EDQUOT):
                full = True  # (one make_room per batch, not one per failed block)
                continue
            self._written(name, result)
        # Batches written at the same time all fail when the disk fills: only the
        # first to come back cuts the cap (cutting it once per batch would leave
        # next to nothing).
        if full and cuts == self._cuts and not self.make_room():
            log.warning("block cache: cannot write to %s: the disk is full", self.directory)

    def _write_file(self, name: str, data: bytes) -> int | OSError:
        """Seal ``data`` into the file for ``name``: its size, or the error. Touches
        no shared state (runs in worker threads)."""
        blob = seal(self._aead, data, self._ad(name))
        path = self._path(name)
        tmp = path.with_name(".tmp-" + name)
        try:
            path.parent.mkdir(exist_ok=True, mode=0o700)
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            exc.filename = str(path)
            return exc
        return len(blob)

    def _written(self, name: str, result: int | OSError) -> None:
        """Record a file written by :meth:`_write_file` in the index."""
        if isinstance(result, OSError):
            # A full or failing cache disk costs speed, never correctness.
            if result.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.make_room():
                log.warning("block cache: cannot write %s: %s", result.filename, result.strerror)
            return
        if name in self._index:  # written twice meanwhile: same content, one entry
            self._index.move_to_end(name)
            return
        self._index[name] = result
        self.bytes += result
        self._evict()

    def make_room(self) -> bool:
        """The disk is full: halve the cap (for the rest of the mount) and evict down
        to it. False if there was nothing to evict."""
        if not self._index:
            return False
        self._cuts += 1
        self.max_bytes = self.bytes // 2
        self._evict()
        log.warning(
            "block cache: the disk is full; cache cut to %.1f MiB", self.max_bytes / (1 << 20)
        )
        return True

    def discard(self, key: bytes) -> None:
        """Forget ``key`` (memory and disk), e.g. because its content failed a check."""
        self._memory.pop(key, None)
        self._drop(self._name(key))

    def _ad(self, name: str) -> bytes:
        return context(KIND_CACHE, self._volume_id, "block/" + name)

    def _drop(self, name: str) -> None:
        size = self._index.pop(name, None)
        if size is not None:
            self.bytes -= size
        try:
            self._path(name).unlink()
        except OSError:
            pass

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._index:
            name = next(iter(self._index))
            self._drop(name)

    def clear(self) -> None:
        self._memory.clear()
        for name in list(self._index):
            self._drop(name)
