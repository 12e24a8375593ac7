"""The volume drive: megafs's own encrypted format (v1) on top of an object store.

This is the only place where :mod:`megafs.format` meets I/O. It knows nothing of
inodes tables, handles or FUSE; the vfs asks it to load and store directory and
inode objects and to read and write chunks.

Concurrency: every method may be called from many trio tasks at once.
``_seen`` (the rollback table) is only touched in synchronous sections. Sealing of
metadata (:meth:`seal_dir`, :meth:`seal_inode`) is synchronous on purpose: the vfs
takes its snapshot and assigns the next version with no ``await`` in between, so
two commits can never write the same version.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final

import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from megafs.errors import (
    IntegrityError,
    NoSpace,
    NotAVolume,
    ObjectNotFound,
    PreconditionFailed,
    StoreError,
    VolumeError,
)
from megafs.format import chunks as fchunks
from megafs.format import header as fheader
from megafs.format import records as frec
from megafs.format.seal import KIND_CACHE, KIND_DIR, KIND_INODE, context, open_sealed, seal
from megafs.stores.base import Computed, ComputedPut, Deferred, ObjectStore

log = logging.getLogger(__name__)

ROOT_INO: Final = 1
#: Seconds before a metadata object that failed to open is fetched again (_get_meta).
REREAD_PAUSE: Final = 0.2
#: Sealed runs at most this long are opened on the event loop's thread (a read waits
#: for them; the thread hop would cost as much).
INLINE_CRYPTO_MAX: Final = 256 * 1024
#: Chunks at most this long are hashed and sealed on the event loop's thread. Smaller
#: than for reads: writes are staged in batches (a commit flushes files side by side),
#: where the event loop's thread is better kept free to answer the kernel.
INLINE_SEAL_MAX: Final = 32 * 1024


@dataclass
class SealedObject:
    """A metadata object ready for upload; ``version`` is recorded once stored;
    ``refs``: the keys of the chunks its records use."""

    key: str
    data: bytes
    version: int
    refs: tuple[str, ...] = ()


def _chunk_keys(records: Iterable[frec.Record]) -> tuple[str, ...]:
    """The keys of the chunks ``records`` use (a chunk shared by two files twice)."""
    return tuple(fchunks.chunk_key(c.cid) for r in records for c in r.chunks.values())


def _write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a temporary file, fsynced, renamed over it
    (a crash leaves the old file or the new one)."""
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


@final
class Volume:
    """An unlocked volume on a store."""

    def __init__(
        self,
        store: ObjectStore,
        keys: fheader.VolumeKeys,
        *,
        state_dir: Path | None = None,
        read_only: bool = False,
    ) -> None:
        self.store = store
        self.keys = keys
        self.read_only = read_only
        self.volume_id = keys.volume_id
        self._content = AESGCM(keys.content)
        self._meta = AESGCM(keys.metadata)
        self._cache_aead = AESGCM(keys.cache)
        self._state_dir = state_dir
        # Rollback table: object key -> highest version seen or written.
        self._seen: dict[str, int] = {}
        self._state_dirty = False
        self._state_lock = trio.Lock()  # see save_state
        # Chunk ids stored through this volume already (not stored again).
        self._known_chunks: set[bytes] = set()
        self._load_state()

    # ------------------------------------------------------------------ setup

    @classmethod
    async def create(
        cls,
        store: ObjectStore,
        passphrase: bytes,
        *,
        kdf_params: dict[str, int] | None = None,
        root_mode: int = 0o40755,
        uid: int | None = None,
        gid: int | None = None,
        now_ns: int | None = None,
    ) -> bytes:
        """Create a volume on an empty store; returns the volume id."""
        blob, master, vid = await trio.to_thread.run_sync(
            lambda: fheader.new_header(passphrase, kdf_params=kdf_params)
        )
        keys = fheader.derive_keys(master, vid)
        vol = cls(store, keys)
        t = now_ns if now_ns is not None else time.time_ns()
        root = frec.Record(
            ino=ROOT_INO,
            mode=root_mode,
            uid=os.getuid() if uid is None else uid,
            gid=os.getgid() if gid is None else gid,
            nlink=2,
            atime_ns=t,
            mtime_ns=t,
            ctime_ns=t,
        )
        # Root directory first, header last: a half-created volume has no header
        # and is "not a volume", never a volume with a missing root.
        obj = vol.seal_dir(ROOT_INO, root, {})
        await store.put(obj.key, obj.data)
        try:
            await store.put(fheader.HEADER_KEY, blob, if_none_match=True)
        except PreconditionFailed:
            raise VolumeError(f"{store.url} already holds a megafs volume") from None
        return vid

    @classmethod
    async def open(
        cls,
        store: ObjectStore,
        passphrase: bytes,
        *,
        state_root: Path | None = None,
        read_only: bool = False,
    ) -> Volume:
        """Unlock the volume on ``store``. ``state_root`` holds per-volume local state
        (the rollback table) in a subdirectory named after the volume id."""
        try:
            blob = await store.get(fheader.HEADER_KEY)
        except ObjectNotFound:
            raise NotAVolume(f"{store.url} is not a megafs volume (no header)") from None
        master, vid = await trio.to_thread.run_sync(lambda: fheader.unlock_header(blob, passphrase))
        keys = fheader.derive_keys(master, vid)
        state_dir = state_root / vid.hex() if state_root is not None else None
        return cls(store, keys, state_dir=state_dir, read_only=read_only)

    # ------------------------------------------------------------ local state

    def _state_path(self) -> Path | None:
        return self._state_dir / "versions" if self._state_dir is not None else None

    def _load_state(self) -> None:
        path = self._state_path()
        if path is None or not path.exists():
            return
        ad = context(KIND_CACHE, self.volume_id, "versions")
        try:
            data = open_sealed(self._cache_aead, path.read_bytes(), ad, str(path))
            self._seen = {str(k): int(v) for k, v in json.loads(data).items()}
        except (IntegrityError, ValueError, OSError) as exc:
            # Losing the table weakens rollback detection but loses no data.
            log.warning("rollback table %s unreadable (%s); starting afresh", path, exc)

    async def save_state(self) -> None:
        """Persist the rollback table (sealed) if it changed; the file is written and
        fsynced in a worker thread, so a slow local disk does not hold up the event
        loop (every commit saves it). A failing local disk raises :class:`NoSpace`
        (full) or :class:`StoreError`; the table stays marked changed, so the next
        commit saves it again.

        Concurrency: ``_state_lock`` serialises savers, and each takes its snapshot
        of the table under it, so the file on disk is never older than one written
        before it. Versions seen during the write mark the table changed again."""
        path = self._state_path()
        if path is None or not self._state_dirty:
            return
        async with self._state_lock:
            if not self._state_dirty:
                return  # (saved by the caller we waited for)
            ad = context(KIND_CACHE, self.volume_id, "versions")
            blob = seal(self._cache_aead, json.dumps(self._seen).encode(), ad)
            self._state_dirty = False
            try:
                await trio.to_thread.run_sync(_write_durably, path, blob)
            except BaseException as exc:
                self._state_dirty = True  # (whatever stopped it: saved again next time)
                if not isinstance(exc, OSError):
                    raise
                kind = NoSpace if exc.errno in (errno.ENOSPC, errno.EDQUOT) else StoreError
                raise kind(f"rollback table {path}: {exc.strerror or exc}") from exc

    def _check_version(self, key: str, version: int) -> None:
        seen = self._seen.get(key, 0)
        if version < seen:
            raise IntegrityError(
                f"object {key}: version {version} is older than version {seen} already "
                "seen (rollback or replay)"
            )
        if version > seen:
            self._seen[key] = version
            self._state_dirty = True

    # --------------------------------------------------------------- metadata

    def dir_key(self, ino: int) -> str:
        return frec.object_key(self.keys.object_id, "d", ino)

    def inode_key(self, ino: int) -> str:
        return frec.object_key(self.keys.object_id, "i", ino)

    async def _get_meta(self, key: str, kind: int) -> bytes:
        """Fetch and open a metadata object. One that fails to open or is missing is
        fetched once more, after ``REREAD_PAUSE``, before that counts: a store without
        atomic replace (e.g. rclone's WebDAV server) may show a reader an object in the
        middle of being replaced (a prefix, or nothing for an instant). Damage fails
        twice."""
        ad = context(kind, self.volume_id, key)
        try:
            return open_sealed(self._meta, await self.store.get(key), ad, f"object {key}")
        except IntegrityError as exc:
            log.info("%s; reading it again", exc)
        except ObjectNotFound:
            log.info("object %s is missing; looking again", key)
        await trio.sleep(REREAD_PAUSE)
        return open_sealed(self._meta, await self.store.get(key), ad, f"object {key}")

    async def dir_etag(self, ino: int) -> str | None:
        """The ETag of a directory's object on the store (None if it is gone): one HEAD,
        how a read-only mount notices another machine's changes."""
        try:
            return (await self.store.head(self.dir_key(ino))).etag
        except ObjectNotFound:
            return None

    async def load_dir(self, ino: int) -> frec.DirContents:
        """Fetch, open and check one directory object."""
        key = self.dir_key(ino)
        try:
            plain = await self._get_meta(key, KIND_DIR)
        except ObjectNotFound:
            raise IntegrityError(f"directory object {key} is missing") from None
        contents = frec.decode_dir(plain, f"directory object {key}")
        if contents.ino != ino:
            raise IntegrityError(f"directory object {key}: belongs to another directory")
        self._check_version(key, contents.version)
        if contents.bad_names:
            log.error("directory object %s: skipped %d invalid entries", key, contents.bad_names)
        return contents

    async def load_inode(self, ino: int) -> frec.Record:
        """Fetch, open and check one inode object (a hard-linked file)."""
        key = self.inode_key(ino)
        try:
            plain = await self._get_meta(key, KIND_INODE)
        except ObjectNotFound:
            raise IntegrityError(f"inode object {key} is missing") from None
        version, rec = frec.decode_inode(plain, f"inode object {key}")
        if rec.ino != ino:
            raise IntegrityError(f"inode object {key}: belongs to another inode")
        self._check_version(key, version)
        return rec

    def seal_dir(
        self, ino: int, self_record: frec.Record | None, entries: dict[bytes, frec.Record]
    ) -> SealedObject:
        """Encode and seal the next version of a directory object (synchronous)."""
        key = self.dir_key(ino)
        version = self._seen.get(key, 0) + 1
        plain = frec.encode_dir(version, ino, self_record, entries)
        return SealedObject(
            key,
            seal(self._meta, plain, context(KIND_DIR, self.volume_id, key)),
            version,
            _chunk_keys(entries.values()),
        )

    def seal_inode(self, rec: frec.Record) -> SealedObject:
        """Encode and seal the next version of an inode object (synchronous)."""
        key = self.inode_key(rec.ino)
        version = self._seen.get(key, 0) + 1
        plain = frec.encode_inode(version, rec)
        return SealedObject(
            key,
            seal(self._meta, plain, context(KIND_INODE, self.volume_id, key)),
            version,
            _chunk_keys((rec,)),
        )

    async def put_object(self, obj: SealedObject) -> None:
        """Upload a sealed metadata object and record its version."""
        await self.store.put(obj.key, obj.data)
        if obj.version > self._seen.get(obj.key, 0):
            self._seen[obj.key] = obj.version
            self._state_dirty = True

    async def delete_object(self, key: str) -> None:
        await self.store.delete(key)

    # ---------------------------------------------------------------- content

    block_size: Final = fchunks.BLOCK_SIZE

    async def write_chunk(self, plaintext: fchunks.ChunkContent) -> frec.ChunkRef:
        """Store a chunk (once per mount: identical chunks are deduplicated by id)
        and return its reference. ``plaintext`` may come in pieces (hashed and
        sealed as they are, not joined). Small chunks are hashed and sealed inline (a few tens of
        microseconds, less than a thread hop); larger ones in a thread."""
        if isinstance(plaintext, list):
            size = sum(len(p) for p in plaintext)
        else:
            size = len(plaintext)

        def prepare() -> tuple[bytes, bytearray | None]:
            cid = fchunks.chunk_id(self.keys.chunk_id, plaintext)
            if cid in self._known_chunks:
                return cid, None
            return cid, fchunks.seal_chunk(self._content, self.volume_id, cid, plaintext)

        if size <= INLINE_SEAL_MAX:
            cid, sealed = prepare()
        elif isinstance(self.store, ComputedPut):
            # Hashed, sealed and staged in one worker thread (one hop, not two),
            # sealed straight into the staged file's write buffer.
            ids: list[bytes] = []

            def prepare_put() -> Computed | None:
                cid = fchunks.chunk_id(self.keys.chunk_id, plaintext)
                ids.append(cid)
                if cid in self._known_chunks:
                    return None
                seal = functools.partial(
                    fchunks.seal_chunk_into, self._content, self.volume_id, cid, plaintext
                )
                return fchunks.chunk_key(cid), Deferred(fchunks.sealed_size(size), seal)

            if await self.store.put_computed(prepare_put) is not None:
                self._known_chunks.add(ids[0])
            return frec.ChunkRef(ids[0], size)
        else:
            cid, sealed = await trio.to_thread.run_sync(prepare)
        if sealed is not None and cid not in self._known_chunks:
            # Content-addressed and immutable: storing it again (another mount may
            # have) rewrites identical plaintext, never changes what a reader sees.
            await self.store.put(fchunks.chunk_key(cid), sealed)
            self._known_chunks.add(cid)
        return frec.ChunkRef(cid, size)

    async def read_blocks(self, ref: frec.ChunkRef, first: int, stop: int) -> list[bytes]:
        """Plaintext of sub-blocks ``[first, stop)`` of a chunk, fetched with one
        ranged GET and each authenticated on its own."""
        sealed = await self.fetch_sealed(ref, first, stop)
        if len(sealed) <= INLINE_CRYPTO_MAX:
            return self.open_blocks(ref, first, sealed)
        return await trio.to_thread.run_sync(self.open_blocks, ref, first, sealed)

    async def fetch_sealed(self, ref: frec.ChunkRef, first: int, stop: int) -> bytes:
        """The sealed bytes of sub-blocks ``[first, stop)`` of a chunk (one ranged
        GET), checked for length only: :meth:`open_blocks` authenticates them."""
        key = fchunks.chunk_key(ref.cid)
        c_start = first * fchunks.SEALED_BLOCK_SIZE
        total = fchunks.sealed_size(ref.length)
        c_end = min(stop * fchunks.SEALED_BLOCK_SIZE, total)
        # Reading the last block asks for one byte more: an object that was
        # extended past its recorded length is noticed, not silently cut.
        try:
            sealed = await self.store.get(key, c_start, c_end + (c_end == total))
        except ObjectNotFound:
            raise IntegrityError(f"chunk {key} is missing") from None
        if len(sealed) > c_end - c_start:
            raise IntegrityError(f"chunk {key}: longer than its recorded length")
        if len(sealed) != c_end - c_start:
            raise IntegrityError(
                f"chunk {key}: truncated (got {len(sealed)} of {c_end - c_start} bytes)"
            )
        return sealed

    def open_blocks(self, ref: frec.ChunkRef, first: int, sealed: bytes) -> list[bytes]:
        """Authenticate and open sealed sub-blocks ``first...`` of a chunk: their
        plaintext, one ``bytes`` per block (IntegrityError if any fails). Safe to
        call from worker threads."""
        return fchunks.open_blocks(
            self._content, self.volume_id, ref.cid, ref.length, first, sealed
        )

    async def aclose(self) -> None:
        await self.save_state()
        await self.store.aclose()
