"""The vfs: inode table, handles, POSIX semantics and the metadata commit.

Nothing here knows FUSE; errors are :class:`~megafs.errors.FsError` (with an errno)
or other :class:`~megafs.errors.MegafsError` subclasses, mapped by the adapter.

Concurrency rules (trio, one thread):

* Namespace operations first ``await`` everything they need loaded (directories via
  :meth:`Vfs._dir`), then check and change the tree in one synchronous section with
  no ``await`` in it. If something they loaded was replaced meanwhile, they load
  again. So the tree is never seen half-changed.
* File content is changed only with ``node.content_lock`` held (see
  :mod:`megafs.vfs.content`).
* :meth:`Vfs.commit` runs under ``_commit_lock``. It seals a snapshot of every dirty
  directory and inode object in one synchronous section (clearing the dirty sets
  there), then uploads: inode objects and never-stored directories first, then the
  rest, then deletes objects that nothing references any more (each step is one
  staging group: its objects reach the store side by side, after everything staged
  before it; new directories are unreachable until the second step). Chunks are always
  stored before a record that references them is sealed (records only ever hold
  uploaded chunk references), so the store never references a missing object.
  Last it makes the staging area durable, then saves the rollback table (never
  the other way round: the table must not record versions a power loss can undo).
* :meth:`Vfs.evict_cold` unloads cold directories in one synchronous section, never
  while a commit runs, and only directories that no operation has loaded
  (:meth:`Vfs._dir`) since the previous sweep. An operation that awaits between
  loading a directory and using it checks ``entries`` again after the await (and
  loads again if it is gone), as it already must for directories replaced meanwhile.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio

from megafs.errors import FsError, IntegrityError, MegafsError
from megafs.format.chunks import CHUNK_SIZE, chunk_id_of, chunk_key
from megafs.format.records import NAME_MAX, Record
from megafs.vfs import content
from megafs.vfs.chunkcache import ChunkCache
from megafs.vfs.chunkio import ChunkIO
from megafs.vfs.node import Attr, Node
from megafs.volume.drive import ROOT_INO, SealedObject, Volume

log = logging.getLogger(__name__)

XATTR_NAME_MAX: Final = 255
XATTR_SIZE_MAX: Final = 65536
DIRTY_BYTES_MAX: Final = 64 * 1024 * 1024
MEMORY_CACHE_BYTES: Final = 32 * 1024 * 1024
FLUSH_CONCURRENCY: Final = 8  # files staged side by side by a commit
READAHEAD_MIN: Final = 1 << 20
STATE_XATTR: Final = b"user.megafs.state"  # per-file upload state (never listed)
REFRESH_FETCHES: Final = 16  # directory HEADs at once while checking for remote changes
READAHEAD_MAX: Final = 32 << 20
#: Loaded directories that nobody used for EVICT_INTERVAL to twice that many commit
#: intervals (30-60 s by default: one whole interval between two sweeps) are unloaded
#: once the inode table holds ``Vfs.evict_min_nodes`` nodes
#: (``-o inode_cache=``; see Vfs.evict_cold).
EVICT_MIN_NODES: Final = 10_000
EVICT_INTERVAL: Final = 30
RENAME_NOREPLACE: Final = 1
RENAME_EXCHANGE: Final = 2


@dataclass(frozen=True)
class Ctx:
    """Who is asking: the caller's ids and umask."""

    uid: int
    gid: int
    umask: int = 0o022


@dataclass
class Handle:
    ino: int
    flags: int
    # Read-ahead: where a sequential reader goes next, how far ahead to fetch, and
    # how far has been requested already.
    next_off: int = -1
    ra_window: int = 0
    ra_end: int = 0


@dataclass
class StatFs:
    block_size: int
    blocks: int
    blocks_free: int
    files: int
    files_free: int
    name_max: int


def _now() -> int:
    return time.time_ns()


def _drop_setid(mode: int) -> int:
    """``mode`` without set-user-ID, and without set-group-ID if group-executable
    (without group execute that bit means mandatory locking, and stays)."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL)
    if name in (b".", b".."):
        raise FsError(errno.EEXIST)


class WriteBack(Protocol):
    """The staging area's durability hooks (see megafs.stores.staging)."""

    async def sync(self) -> None:
        """Make everything written so far durable on local disk."""

    async def wait_idle(self) -> None:
        """Wait until everything written so far is on the remote store."""

    def is_pending(self, key: str) -> bool:
        """Whether an object is staged and not yet on the remote store."""

    def busy(self) -> None:
        """Note that the filesystem just changed (uploads wait for changes to pause)."""

    def group(self) -> AbstractContextManager[None]:
        """A context whose staged objects may reach the remote store in any order
        (each after everything staged before the context)."""

    def needing(self, keys: Collection[str]) -> AbstractContextManager[None]:
        """Inside a group: the object staged in this context uses nothing staged
        before it but ``keys`` (chunks, new objects of its group), so it need not
        wait for the other chunks staged before it."""


class Vfs:
    """A mounted volume's filesystem, independent of FUSE."""

    #: Whether close() must reach :meth:`flush` (it need not: see there).
    flush_on_close: Final = False

    def __init__(
        self,
        volume: Volume,
        *,
        read_only: bool = False,
        commit_interval: float = 1.0,
        space: Callable[[], tuple[int, int]] | None = None,
        block_cache: ChunkCache | None = None,
        writeback: WriteBack | None = None,
        fsync_remote: bool = False,
        dir_cache_time: float = 0.0,
    ) -> None:
        self.volume = volume
        if block_cache is None:
            block_cache = ChunkCache(
                None,
                volume.keys.cache,
                volume.open_blocks,
                max_bytes=0,
                memory_bytes=MEMORY_CACHE_BYTES,
            )
        self.io = ChunkIO(volume, block_cache)
        self.writeback = writeback
        self.fsync_remote = fsync_remote
        self.read_only = read_only or volume.read_only
        self.commit_interval = commit_interval
        self._space = space
        self.nodes: dict[int, Node] = {}
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._dirty_dirs: set[int] = set()
        self._dirty_inodes: set[int] = set()
        self._dirty_content: set[int] = set()
        self._deletions: list[str] = []
        self._dirty_total = 0  # bytes in unstaged buffers (see _account)
        self._inline_total = 0  # sum of the loaded directories' inline_bytes
        self._commit_lock = trio.Lock()
        self.errors = 0
        # Read-only mounts: how often loaded directories are checked for changes made
        # elsewhere (0: never; a read-write mount is the volume's only writer).
        self.dir_cache_time = dir_cache_time if self.read_only else 0.0
        self._dir_etags: dict[int, str | None] = {}  # dir ino -> ETag its entries came from
        # Directories loaded or used since the last sweep (evict_cold), and when the next
        # sweep is due (trio clock).
        self._touched: set[int] = set()
        self._next_evict = 0.0
        self.evict_min_nodes = EVICT_MIN_NODES
        #: Drops the kernel's caches of changed entries/inodes (set by the mount code).
        self._commit_soon = trio.Event()  # set: the committer commits at once
        self._commit_done = trio.Event()  # set when the next commit cycle to start ends
        self.invalidate: Callable[[list[tuple[int, bytes | None]]], Awaitable[None]] | None = None

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load the root directory (the only object fetched at mount)."""
        if self.dir_cache_time:
            self._dir_etags[ROOT_INO] = await self.volume.dir_etag(ROOT_INO)
        contents = await self.volume.load_dir(ROOT_INO)
        if contents.self_record is None:
            raise MegafsError("root directory object has no attributes")
        root = Node(record=contents.self_record)
        self.nodes[ROOT_INO] = root
        await self._fill_dir(root, contents.entries)

    async def run_committer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Every ``commit_interval`` seconds, make all changes durable (the journal
        commit, like ext4's), until cancelled. Also starts read-ahead."""
        async with trio.open_nursery() as nursery:
            self.io.start(nursery)
            task_status.started()
            while True:
                with trio.move_on_after(self.commit_interval):
                    await self._commit_soon.wait()
                # (no await from here to the sync: commit_now() waits for this cycle's
                # event only if it asked before the cycle started)
                self._commit_soon = trio.Event()
                cycle, self._commit_done = self._commit_done, trio.Event()
                try:
                    await self.sync()
                except MegafsError as exc:
                    self.errors += 1
                    log.error("background commit failed (will retry): %s", exc)
                cycle.set()
                if trio.current_time() >= self._next_evict:
                    self._next_evict = trio.current_time() + EVICT_INTERVAL * self.commit_interval
                    if len(self.nodes) >= self.evict_min_nodes:
                        try:
                            self.evict_cold()
                        except Exception:  # (a bug here must not end the committer)
                            log.exception("unloading cold directories failed")
                    else:
                        self._touched.clear()

    async def commit_now(self) -> None:
        """Have the committer (:meth:`run_committer`) commit now, not at its next
        tick, and return when a commit that started after the call has ended (the
        caller waits for everything to reach the store)."""
        done = self._commit_done
        self._commit_soon.set()
        await done.wait()

    async def sync(self) -> None:
        """Store all dirty file content, commit all dirty metadata, and make it
        durable locally (in the staging area, when there is one)."""
        await self._flush_all()
        await self.commit()
        if self.writeback is not None:
            await self.writeback.sync()

    async def _flush_all(self) -> None:
        """Stage every dirty file's content, FLUSH_CONCURRENCY files at a time.

        A flush is mostly thread hops (hash and seal, the staged file's write), so
        flushing files side by side keeps both cores busy while the event loop's
        thread goes on answering the kernel; one file's flushes stay serial under
        its ``content_lock``. Every file is tried; the first error is raised after."""
        inos = list(self._dirty_content)
        todo = iter(inos)
        errors: list[MegafsError] = []

        async def worker() -> None:
            for ino in todo:  # (shared: each file goes to one worker)
                node = self.nodes.get(ino)  # (looked up now: it may have gone since)
                if node is None:
                    self._dirty_content.discard(ino)
                    continue
                try:
                    await self._flush_node(node)
                except MegafsError as exc:
                    errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(min(FLUSH_CONCURRENCY, len(inos))):
                nursery.start_soon(worker)
        if errors:
            raise errors[0]

    async def close(self) -> None:
        """Final flush and commit (unmount)."""
        if not self.read_only:
            await self.sync()
        await self.volume.save_state()

    def dirty_file_count(self) -> int:
        """Files with changes not yet in the staging area / on the store."""
        return len(self._dirty_content)

    def pending_file_count(self, pending_keys: set[str]) -> int:
        """Files whose changes are not all on the store yet: content not yet staged
        (:meth:`dirty_file_count`), or a staged chunk or inode object of theirs in
        ``pending_keys`` (the keys the staging area has not uploaded yet). A file
        whose only pending object is its directory's is not counted."""
        files = set(self._dirty_content)
        if not pending_keys:
            return len(files)
        cids = {c for c in map(chunk_id_of, pending_keys) if c is not None}
        if not cids and not any(k.startswith("i/") for k in pending_keys):
            return len(files)  # only directory objects and the like
        for ino, node in self.nodes.items():
            if ino in files or not node.is_reg:
                continue
            if any(ref.cid in cids for ref in node.record.chunks.values()) or (
                node.hardlinked and self.volume.inode_key(ino) in pending_keys
            ):
                files.add(ino)
        return len(files)

    def dir_objects_cached(self) -> int:
        """Directory objects loaded (fetched once, then served from memory)."""
        return sum(1 for n in self.nodes.values() if n.is_dir and n.entries is not None)

    # --------------------------------------------------------------- helpers

    def _node(self, ino: int) -> Node:
        try:
            node = self.nodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT, f"inode {ino} unknown") from None
        if node.broken is not None:
            raise IntegrityError(node.broken)
        return node

    def _writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS)

    def _dirty_record(self, node: Node) -> None:
        """Note that ``node``'s record changed and must be committed."""
        if self.writeback is not None:
            self.writeback.busy()
        if node.ino == ROOT_INO:
            self._dirty_dirs.add(ROOT_INO)
        elif node.hardlinked:
            if node.record.nlink > 0:
                self._dirty_inodes.add(node.ino)
        elif node.parent is not None:
            self._dirty_dirs.add(node.parent)

    async def _dir(self, ino: int) -> Node:
        """The directory node ``ino`` with its entries loaded."""
        while True:
            node = self._node(ino)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if node.entries is not None:
                self._touched.add(ino)
                return node
            if node.loading is not None:
                await node.loading.wait()
                continue
            node.loading = trio.Event()
            try:
                if self.dir_cache_time:  # the ETag first: a change in between is seen later
                    self._dir_etags[ino] = await self.volume.dir_etag(ino)
                contents = await self.volume.load_dir(ino)
                await self._fill_dir(node, contents.entries)
            finally:
                node.loading.set()
                node.loading = None

    async def _fill_dir(self, node: Node, entries: dict[bytes, Record]) -> None:
        need = [r.ino for r in entries.values() if r.ref and r.ino not in self.nodes]
        linked: dict[int, Record] = {}
        failed: dict[int, str] = {}
        if need:

            async def fetch(i: int) -> None:
                try:
                    linked[i] = await self.volume.load_inode(i)
                except MegafsError as exc:
                    # Only this file is lost to the error, not its whole directory.
                    log.error("%s", exc)
                    failed[i] = str(exc)

            async with trio.open_nursery() as n:
                for i in set(need):
                    n.start_soon(fetch, i)
        # Synchronous from here: the directory appears whole.
        node.entries = {}
        self._set_inline_bytes(node, _inline_bytes(entries))
        for name, rec in entries.items():
            child = self.nodes.get(rec.ino)
            if child is None:
                if rec.ino in failed:
                    child = Node(
                        record=Record(ino=rec.ino, mode=stat.S_IFREG),
                        hardlinked=True,
                        broken=failed[rec.ino],
                    )
                elif rec.ref:
                    child = Node(record=linked[rec.ino], hardlinked=True)
                else:
                    child = Node(record=rec, parent=node.ino)
                self.nodes[rec.ino] = child
            node.add_entry(name, rec.ino)

    # ------------------------------------------------------------- remote changes

    async def run_refresher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read-only mounts: every ``dir_cache_time`` seconds, :meth:`refresh`."""
        task_status.started()
        if not self.dir_cache_time:
            return
        while True:
            await trio.sleep(self.dir_cache_time)
            try:
                await self.refresh()
            except MegafsError as exc:
                log.warning("checking the store for changes failed (will retry): %s", exc)

    async def refresh(self) -> int:
        """Check every loaded directory's object (one HEAD each, at most REFRESH_FETCHES
        at once) and reload those whose ETag changed: entries added, removed, renamed,
        files with new content or attributes. The kernel's caches of what changed are
        dropped. Returns how many directories changed."""
        loaded = [i for i, n in self.nodes.items() if n.is_dir and n.entries is not None]
        limit = trio.Semaphore(REFRESH_FETCHES)
        changed: list[tuple[int, bytes | None]] = []
        count = 0

        async def check(ino: int) -> None:
            nonlocal count
            async with limit:
                node = self.nodes.get(ino)
                if node is None or node.entries is None or node.loading is not None:
                    return
                etag = await self.volume.dir_etag(ino)
                if etag is None or etag == self._dir_etags.get(ino):
                    return  # unchanged (a deleted directory goes with its parent's change)
                if node.entries is None or node.loading is not None:
                    return  # unloaded (evict_cold) or being loaded meanwhile
                node.loading = trio.Event()
                try:
                    contents = await self.volume.load_dir(ino)
                    changed.extend(await self._reload_dir(node, contents.entries))
                    self._dir_etags[ino] = etag
                    count += 1
                finally:
                    node.loading.set()
                    node.loading = None

        async with trio.open_nursery() as n:
            for ino in loaded:
                n.start_soon(check, ino)
        if changed:
            log.info("%d director%s changed on the store", count, "y" if count == 1 else "ies")
            if self.invalidate is not None:
                await self.invalidate(changed)
        return count

    async def _reload_dir(
        self, node: Node, entries: dict[bytes, Record]
    ) -> list[tuple[int, bytes | None]]:
        """Make a loaded directory match ``entries`` (read-only mounts; ``node.loading``
        is held). Returns what the kernel must forget."""
        linked: dict[int, Record] = {}
        refs = {r.ino for r in entries.values() if r.ref}
        if refs:

            async def fetch(i: int) -> None:
                try:
                    linked[i] = await self.volume.load_inode(i)
                except MegafsError as exc:
                    log.error("%s", exc)

            async with trio.open_nursery() as n:
                for i in refs:
                    n.start_soon(fetch, i)
        # Synchronous from here: the directory changes whole.
        assert node.entries is not None
        self._set_inline_bytes(node, _inline_bytes(entries))  # (read-only: not used)
        out: list[tuple[int, bytes | None]] = []
        old = dict(node.entries)
        for name, ino in old.items():
            rec = entries.get(name)
            if rec is None or rec.ino != ino:
                node.remove_entry(name)
                out.append((node.ino, name))
                child = self.nodes.get(ino)
                if child is not None and child.lookups <= 0 and child.opens <= 0:
                    self.nodes.pop(ino, None)
        for name, rec in entries.items():
            new = linked.get(rec.ino) if rec.ref else rec
            child = self.nodes.get(rec.ino)
            if child is None:
                if new is None:
                    continue  # its inode object failed to load: logged above
                child = Node(record=new, hardlinked=rec.ref, parent=None if rec.ref else node.ino)
                self.nodes[rec.ino] = child
            elif new is not None and child.record != new:
                child.record = new
                out.append((rec.ino, None))
            if old.get(name) != rec.ino:
                node.add_entry(name, rec.ino)
        out.append((node.ino, None))  # its listing (the kernel may cache readdir pages)
        return out

    def _new_ino(self) -> int:
        while True:
            ino = secrets.randbits(63)
            if ino > ROOT_INO and ino not in self.nodes:
                return ino

    def _new_node(self, parent: Node, mode: int, ctx: Ctx, **kw: Any) -> Node:
        t = _now()
        gid = ctx.gid
        if parent.record.mode & stat.S_ISGID:
            gid = parent.record.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        rec = Record(
            ino=self._new_ino(),
            mode=mode,
            uid=ctx.uid,
            gid=gid,
            nlink=1,
            atime_ns=t,
            mtime_ns=t,
            ctime_ns=t,
            **kw,
        )
        node = Node(record=rec, parent=parent.ino)
        self.nodes[rec.ino] = node
        return node

    def _touch_dir(self, d: Node) -> None:
        t = _now()
        d.record.mtime_ns = d.record.ctime_ns = t
        self._dirty_dirs.add(d.ino)
        self._dirty_record(d)

    def _lookup_entry(self, d: Node, name: bytes) -> Node | None:
        assert d.entries is not None
        ino = d.entries.get(name)
        return None if ino is None else self.nodes[ino]

    def evict_cold(self) -> int:
        """Unload every loaded directory that no operation has used since the last
        call and whose entries nobody holds: the kernel has forgotten them (FORGET),
        none is open, none has changes not yet committed, none is a loaded directory
        itself (the deepest go first, so a cold subtree goes whole) or a hard link. The
        directory's node stays; its entries' nodes go, and are made again from its
        directory object (cached on disk) when it is next used. Returns how many
        nodes went. Synchronous, one pass over the inode table; never while a
        commit runs (a failed commit puts its directories back to be committed
        again, which an unloaded directory could not be)."""
        touched, self._touched = self._touched, set()
        if self._commit_lock.locked():
            return 0
        busy = {h.ino for h in self.handles.values()}
        dirty = self._dirty_dirs | self._dirty_inodes | self._dirty_content
        depth: dict[int, int] = {}

        def depth_of(n: Node) -> int:
            chain: list[int] = []
            cur: Node | None = n
            base = 0
            while cur is not None:
                known = depth.get(cur.ino)
                if known is not None:
                    base = known
                    break
                chain.append(cur.ino)
                cur = self.nodes.get(cur.parent) if cur.parent is not None else None
            for ino in reversed(chain):
                base += 1
                depth[ino] = base
            return base

        def keeps(c: Node | None) -> bool:
            return c is None or not (
                c.lookups <= 0
                and c.opens <= 0
                and c.entries is None
                and c.loading is None
                and not c.hardlinked
                and c.stored
                and c.ino not in busy
                and c.ino not in dirty
                and not c.dirty
                and not c.flushing
                and c.saved is None
                and c.flush_error is None
                and not c.content_lock.locked()
            )

        loaded = [n for n in self.nodes.values() if n.entries is not None and n.ino != ROOT_INO]
        loaded.sort(key=depth_of, reverse=True)
        dropped = 0
        for d in loaded:
            entries = d.entries
            if (
                entries is None
                or d.ino in touched
                or d.ino in busy
                or d.ino in dirty
                or not d.stored
                or d.loading is not None
                or d.record.nlink == 0  # removed (its object too), maybe still open
                or d.broken is not None
            ):
                continue
            children = [self.nodes.get(i) for i in entries.values()]
            if any(keeps(c) for c in children):
                continue
            for c in children:
                assert c is not None
                del self.nodes[c.ino]
                self._dir_etags.pop(c.ino, None)
            # (next_cookie stays: the cookies given out when it is loaded again are new)
            d.entries = d.cookies = d._cookie_order = None
            self._set_inline_bytes(d, 0)
            dropped += len(children)
        if dropped:
            log.debug(
                "unloaded cold directories: %d nodes dropped, %d left", dropped, len(self.nodes)
            )
        return dropped

    def _maybe_drop(self, node: Node) -> None:
        if (
            node.record.nlink == 0
            and node.lookups <= 0
            and node.opens <= 0
            and node.ino != ROOT_INO
        ):
            self.nodes.pop(node.ino, None)
            self._dirty_content.discard(node.ino)
            self._dirty_inodes.discard(node.ino)
            node.dirty.clear()
            self._account(node)

    def _unlink_node(self, d: Node, name: bytes, node: Node) -> None:
        """Remove entry ``name`` (pointing at ``node``) from ``d``. Synchronous."""
        d.remove_entry(name)
        self._dirty_dirs.add(d.ino)
        t = _now()
        node.record.ctime_ns = t
        if node.is_dir:
            node.record.nlink = 0
            self._set_inline_bytes(node, 0)  # (removed, so empty)
            d.record.nlink -= 1
            self._dirty_record(d)
            self._dirty_dirs.discard(node.ino)
            if node.stored:
                self._deletions.append(self.volume.dir_key(node.ino))
            node.parent = None
        else:
            node.record.nlink -= 1
            if node.hardlinked:
                if node.record.nlink == 0:
                    self._dirty_inodes.discard(node.ino)
                    if node.stored:
                        self._deletions.append(self.volume.inode_key(node.ino))
                else:
                    self._dirty_inodes.add(node.ino)
            else:
                node.parent = None
        self._maybe_drop(node)

    # -------------------------------------------------------------- lookups

    async def lookup(self, parent: int, name: bytes) -> Attr:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        d = await self._dir(parent)
        if name == b".":
            node = d
        elif name == b"..":
            node = self._node(d.parent if d.parent is not None else ROOT_INO)
        else:
            found = self._lookup_entry(d, name)
            if found is None:
                raise FsError(errno.ENOENT)
            if found.broken is not None:
                raise IntegrityError(found.broken)
            node = found
        node.lookups += 1
        return node.attr()

    def forget(self, ino: int, n: int) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            node.lookups -= n
            self._maybe_drop(node)

    def remember(self, ino: int) -> None:
        """Count one more kernel reference (readdirplus replied an entry)."""
        self.nodes[ino].lookups += 1

    async def getattr(self, ino: int) -> Attr:
        return self._node(ino).attr()

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Attr:
        self._writable()
        node = self._node(ino)
        r = node.record
        if size is not None:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not node.is_reg:
                raise FsError(errno.EINVAL)
            async with node.content_lock:
                await content.truncate(self.io, node, size)
                await content.flush(self.io, node, self._inline_max(node))
                self._inlined(node)
            self._dirty_content.discard(ino)
            self._account(node)
            r.mtime_ns = _now()
        if mode is not None:
            r.mode = (r.mode & ~0o7777) | (mode & 0o7777)
        if uid is not None:
            r.uid = uid
        if gid is not None:
            r.gid = gid
        if atime_ns is not None:
            r.atime_ns = atime_ns
        if mtime_ns is not None:
            r.mtime_ns = mtime_ns
        r.ctime_ns = ctime_ns if ctime_ns is not None else _now()
        self._dirty_record(node)
        return node.attr()

    async def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if not stat.S_ISLNK(node.record.mode):
            raise FsError(errno.EINVAL)
        return node.record.target

    # ------------------------------------------------------ namespace changes

    async def _prepare_new(self, parent: int, name: bytes) -> Node:
        self._writable()
        _check_name(name)
        d = await self._dir(parent)
        if d.record.nlink == 0:
            raise FsError(errno.ENOENT)
        if self._lookup_entry(d, name) is not None:
            raise FsError(errno.EEXIST)
        return d

    def _link_new(self, d: Node, name: bytes, node: Node) -> Attr:
        d.add_entry(name, node.ino)
        self._touch_dir(d)
        node.lookups += 1
        return node.attr()

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Attr:
        d = await self._prepare_new(parent, name)
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL)
        node = self._new_node(
            d, mode & ~ctx.umask, ctx, rdev=rdev, inline=b"" if kind == stat.S_IFREG else None
        )
        return self._link_new(d, name, node)

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        d = await self._prepare_new(parent, name)
        node = self._new_node(d, stat.S_IFDIR | (mode & ~ctx.umask & 0o7777), ctx)
        node.record.nlink = 2
        node.entries = {}
        node.stored = False
        self._dirty_dirs.add(node.ino)
        d.record.nlink += 1
        return self._link_new(d, name, node)

    async def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        d = await self._prepare_new(parent, name)
        if len(target) > 4095:
            raise FsError(errno.ENAMETOOLONG)
        node = self._new_node(d, stat.S_IFLNK | 0o777, ctx, target=target, size=len(target))
        return self._link_new(d, name, node)

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: Ctx
    ) -> tuple[int, Attr]:
        d = await self._prepare_new(parent, name)
        node = self._new_node(d, stat.S_IFREG | (mode & ~ctx.umask & 0o7777), ctx, inline=b"")
        attr = self._link_new(d, name, node)
        return self._open_handle(node, flags), attr

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        d = await self._prepare_new(new_parent, new_name)
        node = self._node(ino)
        if node.is_dir:
            raise FsError(errno.EPERM)
        if node.record.nlink == 0:
            raise FsError(errno.ENOENT)
        if not node.hardlinked:
            # From now on the record lives in its own inode object; the entries
            # are references to it.
            if node.parent is not None:
                self._dirty_dirs.add(node.parent)
            node.hardlinked = True
            node.parent = None
            node.stored = False
        node.record.nlink += 1
        node.record.ctime_ns = _now()
        self._dirty_inodes.add(ino)
        return self._link_new(d, new_name, node)

    async def unlink(self, parent: int, name: bytes) -> None:
        self._writable()
        d = await self._dir(parent)
        node = self._lookup_entry(d, name)
        if node is None:
            raise FsError(errno.ENAMETOOLONG if len(name) > NAME_MAX else errno.ENOENT)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        self._unlink_node(d, name, node)
        self._touch_dir(d)

    async def rmdir(self, parent: int, name: bytes) -> None:
        self._writable()
        while True:
            d = await self._dir(parent)
            node = self._lookup_entry(d, name)
            if node is None:
                raise FsError(errno.ENOENT)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            await self._dir(node.ino)
            if d.entries is None or self._lookup_entry(d, name) is not node or node.entries is None:
                continue  # changed while loading: look again
            if node.entries:
                raise FsError(errno.ENOTEMPTY)
            self._unlink_node(d, name, node)
            self._touch_dir(d)
            return

    def _is_ancestor(self, a: Node, b: Node) -> bool:
        """Whether directory ``a`` is ``b`` or one of its ancestors."""
        cur: Node | None = b
        while cur is not None:
            if cur is a:
                return True
            cur = self.nodes.get(cur.parent) if cur.parent is not None else None
        return False

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        self._writable()
        _check_name(new_name)
        while True:
            od = await self._dir(old_parent)
            nd = await self._dir(new_parent)
            if od.entries is None or nd.entries is None:
                continue  # replaced or unloaded (evict_cold) while the other loaded
            src = self._lookup_entry(od, old_name)
            if src is None:
                raise FsError(errno.ENOENT)
            dst = self._lookup_entry(nd, new_name)
            if dst is not None and dst.is_dir and dst.entries is None:
                await self._dir(dst.ino)
                continue
            break
        # Synchronous from here on.
        if src is dst:
            return
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FsError(errno.ENOENT)
            if (src.is_dir and self._is_ancestor(src, nd)) or (
                dst.is_dir and self._is_ancestor(dst, od)
            ):
                raise FsError(errno.EINVAL)
            assert od.entries is not None and nd.entries is not None
            od.entries[old_name] = dst.ino
            nd.entries[new_name] = src.ino
            for node, d in ((src, nd), (dst, od)):
                if not node.hardlinked:
                    node.parent = d.ino
                node.record.ctime_ns = _now()
                self._dirty_record(node)  # an inode object's ctime changed too
            if src.is_dir != dst.is_dir:
                delta = 1 if src.is_dir else -1
                od.record.nlink -= delta
                nd.record.nlink += delta
            self._touch_dir(od)
            self._touch_dir(nd)
            return
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FsError(errno.EISDIR)
            if dst.is_dir and dst.entries:
                raise FsError(errno.ENOTEMPTY)
        if src.is_dir and self._is_ancestor(src, nd):
            raise FsError(errno.EINVAL)
        if dst is not None:
            self._unlink_node(nd, new_name, dst)
        od.remove_entry(old_name)
        nd.add_entry(new_name, src.ino)
        if not src.hardlinked:
            src.parent = nd.ino
        if src.is_dir and od is not nd:
            od.record.nlink -= 1
            nd.record.nlink += 1
        src.record.ctime_ns = _now()
        self._dirty_record(src)
        self._touch_dir(od)
        self._touch_dir(nd)

    # ---------------------------------------------------------------- reading dirs

    async def opendir(self, ino: int) -> int:
        await self._dir(ino)
        return self._new_handle(Handle(ino, os.O_RDONLY | os.O_DIRECTORY))

    async def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, Attr, int]]:
        """Entries after cookie ``start``: (name, attributes, cookie)."""
        d = await self._dir(ino)
        entries = d.entries
        assert entries is not None
        order = d.cookie_order()
        first = bisect.bisect_right(order, start, key=lambda item: item[0])

        def gen() -> Iterator[tuple[bytes, Attr, int]]:
            # Consumed right away (no await in between): entries and order are current.
            for k in range(first, len(order)):
                cookie, name = order[k]
                i = entries.get(name)
                if i is not None and i in self.nodes:
                    yield name, self.nodes[i].attr(), cookie

        return gen()

    # ---------------------------------------------------------------- files

    def _new_handle(self, h: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        return fh

    def _open_handle(self, node: Node, flags: int) -> int:
        node.opens += 1
        return self._new_handle(Handle(node.ino, flags))

    def _handle(self, fh: int) -> tuple[Handle, Node]:
        try:
            h = self.handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None
        return h, self.nodes[h.ino]

    async def open(self, ino: int, flags: int, ctx: Ctx | None = None) -> int:
        """Open a file. With O_TRUNC it is truncated (times updated even if it was
        empty), and a caller ``ctx`` other than root also clears set-user-ID and
        set-group-ID, as any unprivileged truncation does."""
        node = self._node(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._writable()
        if flags & os.O_TRUNC and node.is_reg:
            mode = node.record.mode
            if ctx is not None and ctx.uid != 0:
                mode = _drop_setid(mode)
            await self.setattr(ino, size=0, mode=mode if mode != node.record.mode else None)
        return self._open_handle(node, flags)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h, node = self._handle(fh)
        async with node.content_lock:
            data = await content.read(self.io, node, off, size)
        self._read_ahead(h, node, off, len(data))
        return data

    def _read_ahead(self, h: Handle, node: Node, off: int, n: int) -> None:
        """Sequential reads double the window (up to READAHEAD_MAX) and fetch that
        far ahead in the background; any other read resets it. Once the window
        spans a chunk, it grows a whole chunk at a time, fetched with one request
        (a quarter of the requests of 1 MiB pieces: on a remote store each costs
        headers, signing and parsing on the event loop's thread)."""
        if off == h.next_off and n:
            h.ra_window = min(max(2 * h.ra_window, READAHEAD_MIN), READAHEAD_MAX)
        else:
            h.ra_window = h.ra_end = 0
        h.next_off = off + n
        if not h.ra_window:
            return
        start = max(h.next_off, h.ra_end)
        end = h.next_off + h.ra_window
        piece = READAHEAD_MIN
        if h.ra_window >= CHUNK_SIZE:
            end = -(-end // CHUNK_SIZE) * CHUNK_SIZE
            piece = CHUNK_SIZE
        end = min(end, node.record.size)
        if start < end:
            content.prefetch(self.io, node, start, end, piece)
            h.ra_end = end

    async def write(self, fh: int, off: int, data: bytes) -> int:
        self._writable()
        h, node = self._handle(fh)
        async with node.content_lock:
            if h.flags & os.O_APPEND:
                off = node.record.size
            await content.write(self.io, node, off, data)
            t = _now()
            node.record.mtime_ns = node.record.ctime_ns = t
            node.last_write = trio.current_time()
            if node.dirty:
                self._dirty_content.add(node.ino)
            self._account(node)
            self._dirty_record(node)
        await self._limit_dirty()
        return len(data)

    def _dirty_nodes(self) -> Iterator[Node]:
        for ino in self._dirty_content:
            n = self.nodes.get(ino)
            if n is not None:
                yield n

    async def _flush_node(self, node: Node) -> None:
        async with node.content_lock:
            # An unlinked file that is still open keeps its content too (its
            # buffers are its only copy); it is dropped with the node.
            if node.dirty or node.saved is not None:
                await content.flush(self.io, node, self._inline_max(node))
                self._inlined(node)
                self._dirty_record(node)
            self._dirty_content.discard(node.ino)
            self._account(node)

    async def flush(self, fh: int) -> None:
        """close() waits for nothing: the content is staged by the next commit
        (within ``commit_interval``), or by fsync. Only back-pressure, which every
        write applies already: a mount does not even send close() here
        (:attr:`flush_on_close`)."""
        self._handle(fh)
        await self._limit_dirty()

    def _inline_max(self, node: Node) -> int:
        """The largest content of ``node`` to store inline in its record: up to
        INLINE_DIR_MAX while its directory's inline bytes stay within
        DIR_INLINE_BUDGET (a hard-linked file's record is its own object) and the
        loaded directories' within MOUNT_INLINE_BUDGET (inline bytes stay in
        memory), else INLINE_MAX. The counts are read before a flush and raised
        after it (:meth:`_inlined`), with awaits between: files flushed side by side
        may pass a budget by one INLINE_DIR_MAX each (they bound, not exactly)."""
        size = node.record.size
        if self._inline_total + size > content.MOUNT_INLINE_BUDGET:
            return content.INLINE_MAX
        if node.parent is None:
            return content.INLINE_DIR_MAX
        d = self.nodes.get(node.parent)
        if d is None or d.inline_bytes + size > content.DIR_INLINE_BUDGET:
            return content.INLINE_MAX
        return content.INLINE_DIR_MAX

    def _inlined(self, node: Node) -> None:
        """Count ``node``'s content, just flushed, if inline, in its directory's
        ``inline_bytes`` (made exact again when the directory is next sealed)."""
        inline = node.record.inline
        if inline and node.parent is not None and (d := self.nodes.get(node.parent)) is not None:
            self._set_inline_bytes(d, d.inline_bytes + len(inline))

    def _set_inline_bytes(self, d: Node, n: int) -> None:
        self._inline_total += n - d.inline_bytes
        d.inline_bytes = n

    def _account(self, node: Node) -> None:
        """Update the running total of unstaged buffer bytes for ``node``."""
        now = sum(len(b) for b in node.dirty.values())
        self._dirty_total += now - node.counted
        node.counted = now

    async def _limit_dirty(self) -> None:
        """Back-pressure: past DIRTY_BYTES_MAX of unstaged buffers, the caller
        stages files until under it again. (Background chunk stores shrink buffers
        without telling: the total is recounted exactly before acting on it.)"""
        if self._dirty_total <= DIRTY_BYTES_MAX:
            return
        for n in list(self._dirty_nodes()):
            self._account(n)
        while self._dirty_total > DIRTY_BYTES_MAX:
            node = max(self._dirty_nodes(), key=lambda n: n.counted, default=None)
            if node is None:
                return
            await self._flush_node(node)

    async def fsync(self, fh: int, datasync: bool = False) -> None:
        """Durable on local disk when this returns (on the store with fsync_remote)."""
        _, node = self._handle(fh)
        if not self.read_only:
            await self._flush_node(node)
            await self._commit_durably()

    async def fsyncdir(self) -> None:
        """Like :meth:`fsync`, for the namespace: every change to directories is
        durable on local disk when this returns (on the store with fsync_remote)."""
        if not self.read_only:
            await self._commit_durably()

    async def _commit_durably(self) -> None:
        await self.commit()
        if self.writeback is not None:
            await self.writeback.sync()
            if self.fsync_remote:
                await self.writeback.wait_idle()

    async def release(self, fh: int) -> None:
        h, node = self._handle(fh)
        del self.handles[fh]
        if h.flags & os.O_DIRECTORY:
            return
        node.opens -= 1
        self._maybe_drop(node)

    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    # ---------------------------------------------------------------- xattrs

    def file_state(self, ino: int) -> str:
        """``dirty`` (changes only in memory or not yet committed), ``uploading``
        (committed to the local staging area, not all on the store yet) or ``clean``
        (everything it needs is on the store): what ``user.megafs.state`` answers."""
        node = self._node(ino)
        parent = node.parent
        if (
            node.dirty
            or node.saved is not None
            or node.flushing
            or ino in self._dirty_content
            or ino in self._dirty_inodes
            or (parent is not None and parent in self._dirty_dirs)
            or ino in self._dirty_dirs
        ):
            return "dirty"
        wb = self.writeback
        if wb is not None:
            keys = [chunk_key(ref.cid) for ref in node.record.chunks.values()]
            if parent is not None:
                keys.append(self.volume.dir_key(parent))
            if node.hardlinked:
                keys.append(self.volume.inode_key(ino))
            if node.is_dir:
                keys.append(self.volume.dir_key(ino))
            if any(wb.is_pending(k) for k in keys):
                return "uploading"
        return "clean"

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if name == STATE_XATTR:
            return self.file_state(ino).encode()
        if name.startswith((b"system.", b"security.")):
            raise FsError(errno.EOPNOTSUPP)  # not stored, as setxattr says
        try:
            return self._node(ino).record.xattrs[name]
        except KeyError:
            raise FsError(errno.ENODATA) from None

    async def listxattr(self, ino: int) -> list[bytes]:
        return sorted(self._node(ino).record.xattrs)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._writable()
        if name.startswith(b"system.") or name.startswith(b"security."):
            raise FsError(errno.EOPNOTSUPP)
        if len(name) > XATTR_NAME_MAX or not name:
            raise FsError(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        node = self._node(ino)
        node.record.xattrs[name] = value
        node.record.ctime_ns = _now()
        self._dirty_record(node)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self._writable()
        node = self._node(ino)
        if node.record.xattrs.pop(name, None) is None:
            raise FsError(errno.ENODATA)
        node.record.ctime_ns = _now()
        self._dirty_record(node)

    # ---------------------------------------------------------------- statfs

    def statfs(self) -> StatFs:
        total, free = self._space() if self._space else (1 << 50, 1 << 50)
        bs = 4096
        return StatFs(bs, total // bs, free // bs, 1 << 32, (1 << 32) - len(self.nodes), NAME_MAX)

    # ---------------------------------------------------------------- commit

    def _stored_record(self, node: Node) -> Record:
        if node.hardlinked:
            return Record(ino=node.ino, ref=True)
        return node.committed()

    def _snapshot(self) -> tuple[list[tuple[SealedObject, Node]], list[tuple[SealedObject, Node]]]:
        """Seal every dirty object (synchronous) and clear the dirty sets."""
        first: list[tuple[SealedObject, Node]] = []
        later: list[tuple[SealedObject, Node]] = []
        for ino in self._dirty_inodes:
            node = self.nodes.get(ino)
            if node is None or node.record.nlink == 0:
                continue
            first.append((self.volume.seal_inode(node.committed()), node))
        for ino in self._dirty_dirs:
            node = self.nodes.get(ino)
            if node is None or node.entries is None or (ino != ROOT_INO and node.record.nlink == 0):
                continue
            entries = {name: self._stored_record(self.nodes[i]) for name, i in node.entries.items()}
            self._set_inline_bytes(node, _inline_bytes(entries))
            self_rec = node.record if ino == ROOT_INO else None
            obj = self.volume.seal_dir(ino, self_rec, entries)
            (later if node.stored else first).append((obj, node))
        self._dirty_inodes.clear()
        self._dirty_dirs.clear()
        return first, later

    async def commit(self) -> None:
        """Store every dirty directory and inode object (see the module docstring)."""
        async with self._commit_lock:
            first, later = self._snapshot()
            deletions, self._deletions = self._deletions, []
            try:
                # One group for the staging area, staged in stages (_stages): an
                # object names what it needs (`refs`: its chunks, and the new objects
                # of this commit it links, staged in an earlier stage) and may go up
                # once those are there. Deletions are a group of their own, after.
                with self._group():
                    for stage in _stages(first + later):
                        await self._put_all(stage)
                with self._group():
                    async with trio.open_nursery() as n:
                        for key in deletions:
                            n.start_soon(self.volume.delete_object, key)
            except BaseException:
                # Put everything back; the next commit retries it (rewriting an
                # object that did make it is harmless).
                for obj, node in first + later:
                    dirty = self._dirty_inodes if obj.key.startswith("i/") else self._dirty_dirs
                    dirty.add(node.ino)
                self._deletions = deletions + self._deletions
                raise
            if self.writeback is not None:
                # The rollback table (saved durably) must not get ahead of the
                # staging area: a version it records but a power loss took away
                # would read as a rollback at the next mount.
                await self.writeback.sync()
            await self.volume.save_state()

    def _group(self) -> AbstractContextManager[None]:
        return nullcontext() if self.writeback is None else self.writeback.group()

    async def _put_all(self, batch: list[tuple[SealedObject, Node]]) -> None:
        async def put(obj: SealedObject, node: Node) -> None:
            # (the staging area then waits only for the chunks the object uses)
            with nullcontext() if self.writeback is None else self.writeback.needing(obj.refs):
                await self.volume.put_object(obj)
            node.stored = True

        async with trio.open_nursery() as n:
            for obj, node in batch:
                n.start_soon(put, obj, node)


def _stages(batch: list[tuple[SealedObject, Node]]) -> Iterator[list[tuple[SealedObject, Node]]]:
    """A commit's objects in the order the staging area needs them: each object
    after the objects of ``batch`` it links, which are added to its ``refs``. Only
    new ones can be linked and need that: a new directory (its object may not be on
    the store yet) or a hard-linked file's new inode object. The links follow the
    tree, so there is no cycle; an object left over (if there were) comes last."""
    new = {node.ino: obj.key for obj, node in batch if not node.stored or node.hardlinked}
    items = {obj.key: (obj, node) for obj, node in batch}
    waiting: dict[str, int] = {}
    dependents: dict[str, list[str]] = {}
    for obj, node in batch:
        linked = []
        if node.entries is not None:  # (a directory; an inode object links nothing)
            linked = [new[i] for i in node.entries.values() if i in new and new[i] != obj.key]
        if linked:
            obj.refs += tuple(linked)
        waiting[obj.key] = len(linked)
        for key in linked:
            dependents.setdefault(key, []).append(obj.key)
    stage = [item for item in batch if not waiting[item[0].key]]
    while stage:
        yield stage
        ready = []
        for obj, _ in stage:
            for key in dependents.get(obj.key, ()):
                waiting[key] -= 1
                if not waiting[key]:
                    ready.append(items[key])
        stage = ready
    left = [item for item in batch if waiting[item[0].key] > 0]
    if left:
        yield left


def _inline_bytes(entries: dict[bytes, Record]) -> int:
    """The inline content bytes of a directory's entries."""
    return sum(len(r.inline) for r in entries.values() if r.inline)
