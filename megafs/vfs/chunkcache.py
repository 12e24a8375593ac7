"""The local chunk cache: the store's sealed sub-blocks on disk, one file per chunk.

A cached chunk is one file holding the chunk object's sealed sub-blocks exactly as
the store holds them (each sealed with the volume's content key, the chunk id and
block index in its associated data), at their offsets in the object after a header
of :data:`HEADER` presence bytes (1 = that sub-block is here). Blocks that were never
fetched are holes. So:

- nothing plaintext is at rest, and filling the cache costs no cryptography: what
  the store sent is written as it came (one ``pwrite`` per fetched run);
- a cached read is opened and authenticated like a read from the store: a damaged,
  truncated or swapped file fails the check, is deleted with a warning and the
  blocks are refetched; a damaged cache never serves wrong bytes;
- a chunk read in order is one file read in order (the kernel's read-ahead on the
  cache's disk works), not 64 small files;
- a chunk written here costs no second copy: once uploaded, its staged file (see
  :mod:`megafs.stores.staging`: a header, the sealed object, a checksum) is renamed
  into the cache as it is (:meth:`ChunkCache.claim`), a whole chunk whose data
  starts after the staging header instead of :data:`HEADER`.

File names are a keyed hash of the chunk id. The cap (``max_bytes``) holds on every
insert: whole chunk files are evicted, least recently used first. Only clean data
lives here (dirty data is in the staging area), so anything may be evicted,
including chunks of open files. The cache gives way on a full disk: when its own
write fails for lack of space, or when the staging area on the same disk asks
(:meth:`ChunkCache.make_room`), it halves its cap for the rest of the mount. A
small in-memory LRU of plaintext blocks sits in front (``memory_bytes``), for
blocks read again right away and for a streaming reader's read-ahead.

Concurrency: the index (``_index``: file name -> presence mask, in LRU order),
``bytes`` and the statistics change only on the event loop's thread, in synchronous
sections (no ``await`` splits an update). File reads and writes run in worker
threads and touch no shared state. A file being written for the first time enters
the index only when its write is done, so it cannot be evicted half-written; a
file evicted while another write to it is in flight leaves an index entry for a
file that is gone, which the next read finds missing and forgets (a miss). A staged
file is adopted only when no write to that chunk's file is in flight (``_writing``,
counted on the event loop's thread): such a write would land at the sparse layout's
offsets inside the adopted file. From the claim until the uploader reports the
rename (done in the upload's worker thread), no write starts on it (``_adopting``)
and the index holds nothing for it.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar, final

import trio
from cachetools import LRUCache

from megafs.errors import IntegrityError
from megafs.format import chunks as fchunks
from megafs.format.records import ChunkRef
from megafs.stores.staging import put_layout

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SBS: Final = fchunks.SEALED_BLOCK_SIZE
#: Presence bytes at the start of a cache file: one per sub-block of a chunk.
HEADER: Final = fchunks.CHUNK_SIZE // fchunks.BLOCK_SIZE
#: Runs at most this long are read or written on the event loop's thread (a page
#: cache copy costs less than a thread hop); longer ones in a worker thread.
INLINE_MAX: Final = 2 * SBS

#: (ref, first block, sealed bytes of blocks first...) -> their plaintext, one
#: ``bytes`` per block; raises IntegrityError. Must be safe to call from threads.
Opener = Callable[[ChunkRef, int, bytes], list[bytes]]


def _bits(first: int, n: int) -> int:
    return ((1 << n) - 1) << first


def _size(mask: int) -> int:
    return mask.bit_count() * SBS


def _sealed_end(ref: ChunkRef, stop: int) -> int:
    return min(stop * SBS, fchunks.sealed_size(ref.length))


def _staged_layout(head: bytes) -> tuple[int, int] | None:
    """(data offset, presence mask) of a cache file that is an adopted staged file
    (:func:`megafs.stores.staging.put_layout`), or None if it is not one."""
    layout = put_layout(head)
    if layout is None:
        return None
    offset, dlen = layout
    n = -(-dlen // SBS)
    return (offset, _bits(0, n)) if 0 < n <= HEADER else None


def _in_subdir(call: Callable[..., _T], *args: Any) -> _T:
    """``call(*args)`` whose last path argument is in a cache subdirectory, making
    that subdirectory first if it has gone (they are all made at open)."""
    try:
        return call(*args)
    except FileNotFoundError:
        target = next(a for a in reversed(args) if isinstance(a, Path))
        target.parent.mkdir(exist_ok=True, mode=0o700)
        return call(*args)


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted block numbers as [start, stop) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for j in blocks:
        if out and out[-1][1] == j:
            out[-1] = (out[-1][0], j + 1)
        else:
            out.append((j, j + 1))
    return out


@final
class Adoption:
    """A staged chunk file the cache takes once it is uploaded (:meth:`ChunkCache.claim`)."""

    def __init__(
        self,
        cache: ChunkCache,
        name: str,
        target: Path,
        offset: int,
        blocks: int,
        old: int | None,
        old_offset: int | None,
    ) -> None:
        self._cache = cache
        self.name = name
        self._target = target
        self.offset = offset
        self.blocks = blocks
        self.old = old  # the presence mask and offset of the file it replaces, if any
        self.old_offset = old_offset

    def move(self, path: Path) -> bool:
        """Rename the staged file ``path`` into the cache (the staging area is on
        the same filesystem). Any thread: touches no shared state."""
        try:
            _in_subdir(os.replace, path, self._target)
        except OSError:
            return False
        return True

    def done(self, moved: bool) -> None:
        """Record the outcome of :meth:`move` (False: not called, or it failed), on
        the event loop's thread; exactly once."""
        self._cache._adopted(self, moved)


class _Unreadable(Exception):
    """A cache file that cannot be used (damaged, truncated, swapped or gone)."""

    def __init__(self, why: str, *, gone: bool = False) -> None:
        super().__init__(why)
        self.gone = gone


@final
class ChunkCache:
    """See the module docstring."""

    def __init__(
        self,
        directory: Path | None,
        cache_key: bytes,
        opener: Opener,
        *,
        max_bytes: int,
        memory_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._open = opener
        self._name_key = hmac.new(
            cache_key, b"megafs/v1/chunk-cache-names", hashlib.sha256
        ).digest()
        self._memory: LRUCache[bytes, bytes] = LRUCache(maxsize=memory_bytes, getsizeof=len)
        self._index: OrderedDict[str, int] = OrderedDict()
        self._offset: dict[str, int] = {}  # where the data starts, if not at HEADER
        self._writing: dict[str, int] = {}  # file name -> writes in flight to it
        self._adopting: set[str] = set()  # file names being renamed in by adopt
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._cuts = 0  # how many times make_room cut the cap
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The 256 subdirectories up front: a mkdir per insert cost more than the
            # insert (one is made again if it goes missing while mounted).
            for i in range(256):
                (directory / f"{i:02x}").mkdir(exist_ok=True, mode=0o700)
            self._load_index()

    # ---------------------------------------------------------------- the index

    def _load_index(self) -> None:
        assert self.directory is not None
        found: list[tuple[float, str, int]] = []
        for sub in self.directory.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                try:
                    with open(f, "rb") as fh:
                        head = fh.read(512)  # (an adopted staged file: its header is longer)
                        mtime = os.fstat(fh.fileno()).st_mtime
                except OSError:
                    continue
                adopted = _staged_layout(head)
                if adopted is not None:
                    offset, mask = adopted
                    self._offset[f.name] = offset
                else:
                    mask = sum(1 << j for j, b in enumerate(head[:HEADER]) if b)
                if len(head) < HEADER or not mask:
                    f.unlink(missing_ok=True)
                    self._offset.pop(f.name, None)
                    continue
                found.append((mtime, f.name, mask))
        for _, name, mask in sorted(found):
            self._index[name] = mask
            self.bytes += _size(mask)
        self._evict()

    def _name(self, cid: bytes) -> str:
        return hmac.new(self._name_key, cid, hashlib.sha256).hexdigest()[:40]

    def _path(self, name: str) -> Path:
        assert self.directory is not None
        return self.directory / name[:2] / name

    def _present(self, name: str, mask: int) -> None:
        """Record blocks ``mask`` of file ``name`` as on disk (and the file as used)."""
        old = self._index.get(name)
        if old is None:
            self._index[name] = mask
            self.bytes += _size(mask)
        else:
            self._index[name] = old | mask
            self._index.move_to_end(name)
            self.bytes += _size(mask & ~old)
        self._evict()

    def _drop(self, name: str) -> None:
        self._offset.pop(name, None)
        mask = self._index.pop(name, None)
        if mask is not None:
            self.bytes -= _size(mask)
        try:
            self._path(name).unlink()
        except OSError:
            pass

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._index:
            self._drop(next(iter(self._index)))

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

    # ---------------------------------------------------------------- lookups

    @staticmethod
    def key(ref: ChunkRef, j: int) -> bytes:
        """The memory cache's key of block ``j`` of ``ref``."""
        return ref.cid + j.to_bytes(4, "big")

    def peek_memory(self, ref: ChunkRef, j: int) -> bytes | None:
        """Block ``j`` if it is in the memory cache (no statistics)."""
        return self._memory.get(self.key(ref, j))

    def on_disk(self, ref: ChunkRef, first: int, stop: int) -> bool:
        """Whether blocks ``[first, stop)`` of ``ref`` are all in the disk cache."""
        if self.directory is None:
            return False
        want = ((1 << (stop - first)) - 1) << first
        return self._index.get(self._name(ref.cid), 0) & want == want

    def in_memory(self, ref: ChunkRef, j: int) -> bool:
        return self.key(ref, j) in self._memory

    def remember_plaintext(self, ref: ChunkRef, plaintext: bytes | bytearray) -> None:
        """Keep the plaintext of a whole chunk just stored in the memory tier (its
        blocks, copied: the caller's buffer may change afterwards)."""
        bs = fchunks.BLOCK_SIZE
        view = memoryview(plaintext)[: ref.length]
        self._remember(ref, 0, [bytes(view[k : k + bs]) for k in range(0, len(view), bs)])

    def _remember(self, ref: ChunkRef, first: int, blocks: list[bytes]) -> None:
        for j, data in enumerate(blocks, first):
            if len(data) <= self._memory.maxsize:
                self._memory[self.key(ref, j)] = data

    async def get_many(self, ref: ChunkRef, first: int, stop: int) -> dict[int, bytes]:
        """The cached blocks among ``[first, stop)`` of ``ref``, opened."""
        out: dict[int, bytes] = {}
        want: list[int] = []
        for j in range(first, stop):
            data = self._memory.get(self.key(ref, j))
            if data is not None:
                out[j] = data
            else:
                want.append(j)
        self.hits += len(out)
        if not want or self.directory is None:
            self.misses += len(want)
            return out
        name = self._name(ref.cid)
        mask = self._index.get(name, 0)
        on_disk = [j for j in want if mask >> j & 1]
        self.misses += len(want) - len(on_disk)
        if not on_disk:
            return out
        runs = _runs(on_disk)
        path = self._path(name)
        result: list[tuple[int, list[bytes]]] | _Unreadable
        offset = self._offset.get(name, HEADER)
        if len(runs) == 1 and _sealed_end(ref, runs[0][1]) - runs[0][0] * SBS <= INLINE_MAX:
            result = self._read(path, ref, runs, offset)
        else:
            result = await trio.to_thread.run_sync(self._read, path, ref, runs, offset)
        if isinstance(result, _Unreadable):
            if not result.gone:
                log.warning("block cache: dropping unreadable %s (%s); refetching", path, result)
            self._drop(name)
            self.misses += len(on_disk)
            return out
        if name in self._index:
            self._index.move_to_end(name)
        for a, blocks in result:
            self._remember(ref, a, blocks)
            out.update(enumerate(blocks, a))
        self.hits += len(on_disk)
        return out

    def _read(
        self, path: Path, ref: ChunkRef, runs: list[tuple[int, int]], offset: int
    ) -> list[tuple[int, list[bytes]]] | _Unreadable:
        """Read and open runs of blocks of one cache file (any thread)."""
        out = []
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return _Unreadable("gone", gone=True)
        except OSError as exc:
            return _Unreadable(exc.strerror or str(exc))
        try:
            for a, b in runs:
                start, end = a * SBS, _sealed_end(ref, b)
                sealed = os.pread(fd, end - start, offset + start)
                if len(sealed) != end - start:
                    return _Unreadable(f"truncated ({len(sealed)} of {end - start} bytes)")
                out.append((a, self._open(ref, a, sealed)))
        except IntegrityError as exc:
            return _Unreadable(str(exc))
        except OSError as exc:
            return _Unreadable(exc.strerror or str(exc))
        finally:
            os.close(fd)
        return out

    # ---------------------------------------------------------------- inserts

    async def fill(self, ref: ChunkRef, first: int, sealed: bytes) -> list[bytes]:
        """Blocks ``first...`` of ``ref`` as fetched from the store (sealed): open
        them (IntegrityError if they do not authenticate: nothing is cached then),
        keep them in memory and on disk; return their plaintext, one per block."""
        name = self._wants(ref, first, sealed)
        cuts = self._cuts

        def work() -> tuple[list[bytes], OSError | None]:
            blocks = self._open(ref, first, sealed)
            return blocks, (self._write(name, first, sealed) if name else None)

        if name:
            self._writing[name] = self._writing.get(name, 0) + 1
        try:
            if len(sealed) <= INLINE_MAX:
                blocks, error = work()
            else:
                blocks, error = await trio.to_thread.run_sync(work)
        finally:
            if name and (left := self._writing.pop(name) - 1):
                self._writing[name] = left
        self._remember(ref, first, blocks)
        if name:
            self._written(name, first, sealed, error, cuts)
        return blocks

    def claim(self, key: str, offset: int, size: int) -> Adoption | None:
        """Reserve the staged file of chunk object ``key`` (its sealed bytes are
        ``size`` bytes at ``offset``), about to be uploaded, for renaming into the
        cache (no copy): the uploader calls :meth:`Adoption.move` in its worker
        thread once the store has the object, then :meth:`Adoption.done`. None (the
        caller deletes the file) if it is not a chunk, does not fit the cap, or a
        write to its cache file is in flight (it would land in the adopted file's
        layout)."""
        cid = fchunks.chunk_id_of(key)
        n = -(-size // SBS)
        if cid is None or self.directory is None or n > HEADER or SBS * n > self.max_bytes:
            return None
        name = self._name(cid)
        if name in self._writing or name in self._adopting:
            return None
        # Until done(), the name holds nothing (a read misses) and no fill may start
        # on it (_wants).
        old = self._index.pop(name, None)
        if old is not None:
            self.bytes -= _size(old)
        self._adopting.add(name)
        return Adoption(self, name, self._path(name), offset, n, old, self._offset.pop(name, None))

    def _adopted(self, claim: Adoption, moved: bool) -> None:
        self._adopting.discard(claim.name)
        if moved:
            self._offset[claim.name] = claim.offset
            self._present(claim.name, _bits(0, claim.blocks))
        elif claim.old is not None:  # the file it was to replace is still there
            self._present(claim.name, claim.old)
            if claim.old_offset is not None:
                self._offset[claim.name] = claim.old_offset

    def _wants(self, ref: ChunkRef, first: int, sealed: bytes) -> str:
        """The file name to write blocks ``first...`` of ``ref`` to, or "" if they
        are not to be written (no disk, larger than the cap, already there)."""
        if self.directory is None:
            return ""
        n = -(-len(sealed) // SBS)
        name = self._name(ref.cid)
        if SBS * n > self.max_bytes or self._index.get(name, 0) & _bits(first, n) == _bits(
            first, n
        ):
            return ""
        if name in self._offset or name in self._adopting:
            return ""  # an adopted staged file: the whole chunk is (or will be) there
        return name

    def _written(
        self, name: str, first: int, sealed: bytes, error: OSError | None, cuts: int
    ) -> None:
        """Record the outcome of a :meth:`_write` started when ``_cuts`` was ``cuts``."""
        if error is None:
            self._present(name, _bits(first, -(-len(sealed) // SBS)))
        elif error.errno in (errno.ENOSPC, errno.EDQUOT):
            # Writes in flight at the same time all fail when the disk fills: only
            # the first to come back cuts the cap (one cut each would leave nothing).
            if name not in self._index:
                self._path(name).unlink(missing_ok=True)
            if cuts == self._cuts and not self.make_room():
                log.warning("block cache: cannot write to %s: the disk is full", self.directory)
        else:
            # A failing cache disk costs speed, never correctness.
            log.warning("block cache: cannot write %s: %s", error.filename, error.strerror)

    def _write(self, name: str, first: int, sealed: bytes) -> OSError | None:
        """Write sealed blocks ``first...`` into the file ``name`` and mark them
        present, data first (any thread; touches no shared state)."""
        path = self._path(name)
        try:
            fd = _in_subdir(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(sealed)
                pos = 0
                while pos < len(view):
                    pos += os.pwrite(fd, view[pos:], HEADER + first * SBS + pos)
                os.pwrite(fd, b"\1" * -(-len(sealed) // SBS), first)
            finally:
                os.close(fd)
        except OSError as exc:
            exc.filename = str(path)
            return exc
        return None
