"""The local block cache of MEGA mounts: clean content blocks on disk, sealed, capped.

(Volumes use :mod:`megafs.vfs.chunkcache`: the store's sealed sub-blocks, a file
per chunk.)

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

All methods are synchronous: each touches one small file (tens of KiB), which is
cheaper inline than a thread hop. The index (``_index``, LRU order) is only changed
in these methods, so no ``await`` ever splits an update.
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
        path = self._path(name)
        try:
            sealed = path.read_bytes()
            data = open_sealed(self._aead, sealed, self._ad(name), f"cache file {path}")
        except (OSError, IntegrityError) as exc:
            log.warning("block cache: dropping unreadable %s (%s); refetching", path, exc)
            self._drop(name)
            self.misses += 1
            return None
        self._index.move_to_end(name)
        self._remember(key, data)
        self.hits += 1
        return data

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
        blob = seal(self._aead, data, self._ad(name))
        path = self._path(name)
        tmp = path.with_name(".tmp-" + name)
        try:
            path.parent.mkdir(exist_ok=True, mode=0o700)
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except OSError as exc:
            # A full or failing cache disk costs speed, never correctness.
            tmp.unlink(missing_ok=True)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.make_room():
                log.warning("block cache: cannot write %s: %s", path, exc)
            return
        self._index[name] = len(blob)
        self.bytes += len(blob)
        self._evict()

    def make_room(self) -> bool:
        """The disk is full: halve the cap (for the rest of the mount) and evict down
        to it. False if there was nothing to evict."""
        if not self._index:
            return False
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
