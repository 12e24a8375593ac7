"""A MEGA account as a filesystem, independent of FUSE (the adapter is
:mod:`megafs.fuse_ops`, the same one the megafs volume uses).

What the user sees: the Cloud Drive (or, with ``-o mega_root=rubbish|inbox``, the
Rubbish Bin or Inbox) as a directory tree; folders and files with their sizes and
mtimes (from the fingerprint attribute ``c``, else the creation time). Reads fetch
whole MEGA chunks (128 KiB growing to 1 MiB) by HTTP range, decrypt them, keep them
sealed in the block cache, and verify the file's meta-MAC once every chunk of it
has been seen (a mismatch is EIO). Writes go to a sealed local staging file
(:mod:`megafs.mega.staged`); closing the file queues it for upload as a new node
and returns at once (``fsync`` makes the staged copy durable locally, or, with
``-o fsync=remote``, waits for the upload). The new node then takes the old one's
place (same inode) and the old node is deleted. A file MEGA would refuse for quota
(as far as the last ``uq`` knows) is EDQUOT at close. Upload failures leave the
staging file in place and are retried in the background (and by the next mount).

Things MEGA cannot store are refused or ignored the way other cloud filesystems do:
symlinks, device nodes, hard links and extended attributes (EPERM / EOPNOTSUPP);
chmod/chown are accepted and not kept (every file shows 0644, every folder 0755,
owned by the mounting user).

Concurrency rules (one trio thread):

* The tree (:class:`megafs.mega.tree.Tree`) and the inode tables are changed only in
  synchronous stretches: every method reads what it needs, awaits the server, then
  re-reads before applying the result.
* ``Inode.lock`` serialises the content of one file: creating its staging copy,
  writes, truncation, its upload, and renames/unlinks of it. An upload holds the
  lock for its whole length, so no write can slip between the bytes read for the
  upload and the swap of handles that follows it, and a rename or unlink waits for
  an upload in flight (which read the file's name and folder when it started).
* Uploads run in ``UPLOAD_WORKERS`` worker tasks fed by ``_queue`` (an inode is
  queued at most once at a time: ``_queued``).
* Remote changes (``sc`` packets) are applied by :meth:`MegaVfs.run_events` alone.
  Packets carrying this mount's own ``i`` tag are skipped: every command the vfs
  sends is applied to the tree locally from its reply.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio

from megafs.errors import FsError
from megafs.mega import crypto, transfer
from megafs.mega.api import MegaApi
from megafs.mega.errors import MegaError, MegaOverQuota, errno_for
from megafs.mega.names import NAME_MAX, from_posix_bytes, posix_bytes
from megafs.mega.reader import ChunkReader, ReadState, cache_key
from megafs.mega.staged import Staged, Target, load_pending
from megafs.mega.tree import FOLDER, INBOX, ROOT, RUBBISH, MegaNode, Tree
from megafs.stats import ErrorLog, RateMeter
from megafs.vfs.blockcache import BlockCache
from megafs.vfs.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, STATE_XATTR, Ctx, StatFs
from megafs.vfs.node import Attr

log = logging.getLogger(__name__)

ROOT_INO: Final = 1
LINK_XATTR: Final = b"user.megafs.link"
URL_TTL: Final = 300.0
QUOTA_TTL: Final = 30.0
READAHEAD_CHUNKS: Final = 8
RETRY_INTERVAL: Final = 10.0
UPLOAD_WORKERS: Final = 4  # files uploaded at once (each with its own chunk concurrency)
ROOT_KINDS: Final = {"drive": ROOT, "rubbish": RUBBISH, "inbox": INBOX}


@dataclass
class Handle:
    ino: int
    flags: int
    read: ReadState = field(default_factory=ReadState)


@dataclass(eq=False)
class Inode:
    """One inode: a MEGA node (``handle``) or a file created here and not uploaded
    yet (``handle`` None; then ``parent``/``name`` say where it goes)."""

    ino: int
    handle: str | None
    parent: str | None = None
    name: str | None = None
    staged: Staged | None = None
    dirty: bool = False
    mtime_ns: int | None = None  # set by utimens or writes, until uploaded
    opens: int = 0
    unlinked: bool = False
    upload_error: BaseException | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)


def _ino(node: Inode) -> int:
    return node.ino


def _writable_flags(flags: int) -> bool:
    return flags & os.O_ACCMODE != os.O_RDONLY


class MegaVfs:
    """See the module docstring."""

    #: close() of a writer queues the file's upload (:meth:`flush`).
    flush_on_close: Final = True

    def __init__(
        self,
        api: MegaApi,
        tree: Tree,
        *,
        cache: BlockCache,
        staging_dir: Path,
        sn: str,
        root: str = "drive",
        read_only: bool = False,
        permanent_delete: bool = False,
        fsync_remote: bool = False,
    ) -> None:
        self.api = api
        self.fsync_remote = fsync_remote
        self.tree = tree
        self.cache = cache
        self.staging_dir = staging_dir
        self.sn = sn
        self.read_only = read_only or root != "drive"
        self.permanent_delete = permanent_delete
        self.root_handle = tree.root(ROOT_KINDS[root])
        self.inodes: dict[int, Inode] = {ROOT_INO: Inode(ROOT_INO, self.root_handle)}
        self.by_handle: dict[str, int] = {self.root_handle: ROOT_INO}
        # Files created here, not uploaded yet: parent handle -> posix name -> ino.
        self.pending: dict[str, dict[bytes, int]] = {}
        self.handles: dict[int, Handle] = {}
        self._next_ino = ROOT_INO + 1
        self._next_fh = 1
        self.reader = ChunkReader(api, cache)
        self._quota: tuple[float, int, int] | None = None
        self._uid, self._gid = os.getuid(), os.getgid()
        self.errors = 0
        self.uploads_pending = 0
        self.uploaded_bytes = 0
        self.upload_rate = RateMeter()
        # The last failed upload and when (kept until a newer failure replaces it).
        self.upload_errors = ErrorLog()
        self._queue_send, self._queue = trio.open_memory_channel[Inode](math.inf)
        self._queued: set[int] = set()
        # Drops what a kernel caches after a remote change (the mount sets it; a
        # program through the SDK has no kernel cache): (ino, None) or (parent, name).
        self.invalidate: Callable[[list[tuple[int, bytes | None]]], Awaitable[None]] | None = None

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Background work for the mount's lifetime: remote changes, read-ahead,
        retries of failed uploads (and of uploads a previous mount left)."""
        async with trio.open_nursery() as n:
            self.reader.nursery = n
            self._resume_pending()
            for _ in range(UPLOAD_WORKERS):
                n.start_soon(self._upload_worker)
            n.start_soon(self.run_events)
            n.start_soon(self._retry_loop)
            n.start_soon(self._quota_loop)
            task_status.started()

    def _resume_pending(self) -> None:
        for staged, target in load_pending(self.staging_dir, self.tree.master_key):
            ino = self._new_ino()
            node = Inode(ino, None, target.parent, target.name, staged, dirty=True)
            node.mtime_ns = target.mtime * 1_000_000_000
            node.upload_error = MegaError(detail="left by a previous mount")
            self.inodes[ino] = node
            if target.replaces is not None and target.replaces in self.tree.nodes:
                node.handle = target.replaces
                self.by_handle[target.replaces] = ino
            elif target.parent in self.tree.nodes:
                raw = self._posix(target.name)
                self.pending.setdefault(target.parent, {})[raw] = ino
            else:
                node.parent = self.root_handle
                node.name = f"{target.name} (recovered {staged.ident[:8]})"
                self.pending.setdefault(self.root_handle, {})[self._posix(node.name)] = ino
            self.uploads_pending += 1
            self._enqueue(node)
            log.info("resuming an upload left by a previous mount (%s)", staged.ident)

    async def close(self) -> None:
        """Upload what is still dirty (at unmount)."""
        for node in list(self.inodes.values()):
            if node.dirty and not node.unlinked:
                try:
                    await self._upload(node)
                except Exception as exc:
                    log.warning("upload at unmount failed (%s); the next mount retries it", exc)

    @property
    def last_error(self) -> str | None:
        return self.upload_errors.last

    def dirty_file_count(self) -> int:
        return sum(1 for n in self.inodes.values() if n.dirty and not n.unlinked)

    def folder_count(self) -> int:
        """Folders in the node tree (all of it is in memory from the mount on)."""
        return sum(1 for m in self.tree.nodes.values() if m.is_folder)

    def pending_bytes(self) -> int:
        return sum(
            n.staged.size
            for n in self.inodes.values()
            if n.dirty and not n.unlinked and n.staged is not None
        )

    def upload_blocked(self) -> str | None:
        """Why waiting for the uploads is pointless, if it is: every dirty file's last
        upload failed with an error only the user can fix (quota, access, a blocked
        account) and none is being uploaded now. ``megafs umount`` then stops waiting."""
        dirty = [n for n in self.inodes.values() if n.dirty and not n.unlinked]
        if not dirty:
            return None
        for n in dirty:
            err = n.upload_error
            if n.lock.locked() or not isinstance(err, MegaError):
                return None
            if errno_for(err) not in (errno.EDQUOT, errno.EACCES, errno.EPERM):
                return None
        return str(dirty[0].upload_error)

    # ------------------------------------------------------------ inodes

    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _ino_for(self, handle: str) -> int:
        ino = self.by_handle.get(handle)
        if ino is None:
            ino = self._new_ino()
            self.by_handle[handle] = ino
            self.inodes[ino] = Inode(ino, handle)
        return ino

    def _inode(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def _mega(self, node: Inode) -> MegaNode | None:
        return self.tree.nodes.get(node.handle) if node.handle is not None else None

    def _folder(self, ino: int) -> str:
        node = self._inode(ino)
        m = self._mega(node)
        if m is None or node.staged is not None:
            raise FsError(errno.ENOTDIR if node.handle is None else errno.ENOENT)
        if not m.is_folder:
            raise FsError(errno.ENOTDIR)
        return m.handle

    @staticmethod
    def _posix(name: str) -> bytes:
        raw = posix_bytes(name)
        return raw if raw is not None else name.encode("utf-8", "replace")[:NAME_MAX]

    def _entries(self, folder: str) -> dict[bytes, int]:
        out = {raw: self._ino_for(h) for raw, h in self.tree.listing(folder).items()}
        for raw, ino in self.pending.get(folder, {}).items():
            out[raw] = ino
        return out

    def _child(self, folder: str, name: bytes) -> Inode | None:
        ino = self.pending.get(folder, {}).get(name)
        if ino is not None:
            return self.inodes[ino]
        h = self.tree.listing(folder).get(name)
        return self.inodes[self._ino_for(h)] if h is not None else None

    def attr(self, node: Inode) -> Attr:
        m = self._mega(node)
        if m is not None and m.is_folder:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
            mtime = m.mtime * 1_000_000_000
        else:
            mode, nlink = stat.S_IFREG | 0o644, 1
            size = node.staged.size if node.staged is not None else (m.size if m else 0)
            mtime = (m.mtime if m else int(time.time())) * 1_000_000_000
        if node.mtime_ns is not None:
            mtime = node.mtime_ns
        return Attr(
            ino=node.ino,
            mode=mode,
            nlink=nlink,
            uid=self._uid,
            gid=self._gid,
            rdev=0,
            size=size,
            blocks=(size + 511) // 512,
            atime_ns=mtime,
            mtime_ns=mtime,
            ctime_ns=mtime,
        )

    # ------------------------------------------------------------ namespace

    async def lookup(self, parent: int, name: bytes) -> Attr:
        folder = self._folder(parent)
        if name == b".":
            return self.attr(self._inode(parent))
        if name == b"..":
            up = self.tree.nodes[folder].parent
            return self.attr(self._inode(self._ino_for(up) if up else ROOT_INO))
        child = self._child(folder, name)
        if child is None:
            raise FsError(errno.ENOENT)
        return self.attr(child)

    def forget(self, ino: int, n: int) -> None:
        """Inode numbers stay assigned for the mount's lifetime (stable inodes)."""

    def remember(self, ino: int) -> None:
        """See :meth:`forget`."""

    async def getattr(self, ino: int) -> Attr:
        return self.attr(self._inode(ino))

    async def opendir(self, ino: int) -> int:
        self._folder(ino)
        return self._new_handle(Handle(ino, os.O_RDONLY))

    async def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, Attr, int]]:
        """Entries in inode order; the cookie is the inode number, so a listing
        continues correctly while the folder changes."""
        folder = self._folder(ino)
        items = sorted((i, raw) for raw, i in self._entries(folder).items())
        out = [(raw, self.attr(self.inodes[i]), i) for i, raw in items if i > start]
        return iter(out)

    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    async def fsyncdir(self) -> None:
        """Directory changes are on the server when the call that made them returns."""

    def _check_new_name(self, name: bytes) -> str:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        mega_name = from_posix_bytes(name)
        if mega_name is None or b"/" in name or not name:
            raise FsError(errno.EINVAL)
        return mega_name

    def _writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS)

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx | None = None) -> Attr:
        self._writable()
        folder = self._folder(parent)
        mega_name = self._check_new_name(name)
        if self._child(folder, name) is not None:
            raise FsError(errno.EEXIST)
        key = secrets.token_bytes(16)
        reply = await self.api.call(
            {
                "a": "p",
                "t": folder,
                "i": self.api.client_tag,
                "n": [
                    {
                        "h": "xxxxxxxx",
                        "t": FOLDER,
                        "a": crypto.encrypt_attributes({"n": mega_name}, key),
                        "k": crypto.encrypt_key(self.tree.master_key, key),
                    }
                ],
            }
        )
        node = self._add_reply(reply)
        return self.attr(self.inodes[self._ino_for(node.handle)])

    def _add_reply(self, reply: Any) -> MegaNode:
        nodes = reply.get("f") if isinstance(reply, dict) else None
        if not isinstance(nodes, list) or not nodes or not isinstance(nodes[0], dict):
            raise MegaError(detail="unexpected reply to p")
        node = self.tree.add(nodes[0])
        if node is None:
            raise MegaError(detail="unexpected node in reply to p")
        return node

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Attr:
        raise FsError(errno.EPERM)

    async def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        raise FsError(errno.EPERM)

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        raise FsError(errno.EPERM)

    async def readlink(self, ino: int) -> bytes:
        raise FsError(errno.EINVAL)

    async def _delete_remote(self, handle: str) -> None:
        """Delete a node: to the Rubbish Bin (default), or for good."""
        m = self.tree.nodes.get(handle)
        rubbish = self.tree.roots.get(RUBBISH)
        if self.permanent_delete or rubbish is None or m is None or m.parent == rubbish:
            await self.api.call({"a": "d", "n": handle, "i": self.api.client_tag})
            for gone in self.tree.remove(handle):
                self._drop_handle(gone.handle)
            return
        cmds: list[dict[str, Any]] = [
            {"a": "m", "n": handle, "t": rubbish, "i": self.api.client_tag}
        ]
        blob = None
        if self.tree.usable(m) and m.attrs is not None and m.key is not None and m.parent:
            blob = crypto.encrypt_attributes({**m.attrs, "rr": m.parent}, m.attr_key)
            cmds.append({"a": "a", "n": handle, "at": blob, "i": self.api.client_tag})
        results = await self.api.batch(cmds)
        if isinstance(results[0], BaseException):
            raise results[0]
        self.tree.move(handle, rubbish)
        if blob is not None and not isinstance(results[1], BaseException):
            self.tree.set_attrs(handle, blob)

    def _drop_handle(self, handle: str) -> None:
        ino = self.by_handle.pop(handle, None)
        if ino is not None and ino in self.inodes:
            node = self.inodes[ino]
            if node.opens or node.dirty:
                node.unlinked = True
            else:
                del self.inodes[ino]

    async def unlink(self, parent: int, name: bytes) -> None:
        self._writable()
        folder = self._folder(parent)
        child = self._child(folder, name)
        if child is None:
            raise FsError(errno.ENOENT)
        m = self._mega(child)
        if m is not None and m.is_folder:
            raise FsError(errno.EISDIR)
        async with child.lock:  # an upload in flight finishes first (module docstring)
            if self._child(folder, name) is not child:
                raise FsError(errno.ENOENT)
            m = self._mega(child)
            if child.handle is None or (child.dirty and m is None):
                self.pending.get(folder, {}).pop(name, None)
                self._forget_local(child)
                return
            assert child.handle is not None
            await self._delete_remote(child.handle)
            if child.staged is not None and not child.opens:
                child.staged.discard()
                child.staged, child.dirty = None, False
            child.unlinked = True

    def _forget_local(self, node: Inode) -> None:
        node.unlinked = True
        if not node.opens:
            if node.staged is not None:
                node.staged.discard()
                node.staged = None
            node.dirty = False
            self.inodes.pop(node.ino, None)

    async def rmdir(self, parent: int, name: bytes) -> None:
        self._writable()
        folder = self._folder(parent)
        child = self._child(folder, name)
        if child is None:
            raise FsError(errno.ENOENT)
        m = self._mega(child)
        if m is None or not m.is_folder:
            raise FsError(errno.ENOTDIR)
        if self._entries(m.handle):
            raise FsError(errno.ENOTEMPTY)
        await self._delete_remote(m.handle)

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._writable()
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL)
        src_folder = self._folder(old_parent)
        dst_folder = self._folder(new_parent)
        self._check_new_name(new_name)  # bad names fail before any wait
        while True:
            src = self._child(src_folder, old_name)
            if src is None:
                raise FsError(errno.ENOENT)
            dst = self._child(dst_folder, new_name)
            # Uploads in flight of either file finish first (module docstring); locks
            # in inode order, so two renames cannot wait for each other.
            nodes = sorted({n.ino: n for n in (src, dst) if n is not None}.values(), key=_ino)
            async with contextlib.AsyncExitStack() as stack:
                for n in nodes:
                    await stack.enter_async_context(n.lock)
                if self._child(src_folder, old_name) is not src:
                    continue  # changed while we waited: look again
                if self._child(dst_folder, new_name) is not dst:
                    continue
                await self._rename_locked(src, src_folder, old_name, dst_folder, new_name, flags)
                return

    async def _rename_locked(
        self,
        src: Inode,
        src_folder: str,
        old_name: bytes,
        dst_folder: str,
        new_name: bytes,
        flags: int,
    ) -> None:
        mega_name = self._check_new_name(new_name)
        dst = self._child(dst_folder, new_name)
        if dst is src:
            return
        src_m = self._mega(src)
        src_is_dir = src_m is not None and src_m.is_folder
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            dst_m = self._mega(dst)
            dst_is_dir = dst_m is not None and dst_m.is_folder
            if dst_is_dir and not src_is_dir:
                raise FsError(errno.EISDIR)
            if src_is_dir and not dst_is_dir:
                raise FsError(errno.ENOTDIR)
            if dst_is_dir and dst_m is not None and self._entries(dst_m.handle):
                raise FsError(errno.ENOTEMPTY)
        if src_is_dir and src_m is not None:
            if dst_folder == src_m.handle or src_m.handle in self.tree.path_parents(dst_folder):
                raise FsError(errno.EINVAL)
        if src.handle is None or src_m is None:
            # Not uploaded yet: only where it will go changes.
            self.pending.get(src_folder, {}).pop(old_name, None)
            src.parent, src.name = dst_folder, mega_name
            if dst is not None:
                await self._replace_target(dst_folder, new_name, dst)
            self.pending.setdefault(dst_folder, {})[new_name] = src.ino
            return
        cmds: list[dict[str, Any]] = []
        blob = None
        self.tree.usable(src_m)
        if src_m.name != mega_name:
            if src_m.attrs is None or src_m.key is None:
                raise FsError(errno.EIO)
            blob = crypto.encrypt_attributes({**src_m.attrs, "n": mega_name}, src_m.attr_key)
            cmds.append({"a": "a", "n": src_m.handle, "at": blob, "i": self.api.client_tag})
        if src_folder != dst_folder:
            cmds.append({"a": "m", "n": src_m.handle, "t": dst_folder, "i": self.api.client_tag})
        results = await self.api.batch(cmds) if cmds else []
        for r in results:
            if isinstance(r, BaseException):
                raise r
        if blob is not None:
            self.tree.set_attrs(src_m.handle, blob)
        if src_folder != dst_folder:
            self.tree.move(src_m.handle, dst_folder)
        if src.name is not None:
            src.name = mega_name
        if dst is not None:
            # After the move: a failure here leaves two names, never none.
            await self._replace_target(dst_folder, new_name, dst)

    async def _replace_target(self, folder: str, name: bytes, dst: Inode) -> None:
        if dst.handle is None or self._mega(dst) is None:
            self.pending.get(folder, {}).pop(name, None)
            self._forget_local(dst)
            return
        await self._delete_remote(dst.handle)
        dst.unlinked = True

    # ------------------------------------------------------------ files

    def _new_handle(self, h: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        return fh

    def _handle(self, fh: int) -> tuple[Handle, Inode]:
        try:
            h = self.handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None
        return h, self._inode(h.ino)

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: Ctx | None = None
    ) -> tuple[int, Attr]:
        self._writable()
        folder = self._folder(parent)
        mega_name = self._check_new_name(name)
        existing = self._child(folder, name)
        if existing is not None:
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST)
            fh = await self.open(existing.ino, flags | os.O_TRUNC)
            return fh, self.attr(existing)
        node = Inode(self._new_ino(), None, folder, mega_name)
        node.staged = Staged.new(self.staging_dir)
        node.dirty = True
        node.mtime_ns = time.time_ns()
        self.inodes[node.ino] = node
        self.pending.setdefault(folder, {})[name] = node.ino
        node.opens += 1
        return self._new_handle(Handle(node.ino, flags)), self.attr(node)

    async def open(self, ino: int, flags: int, ctx: Ctx | None = None) -> int:
        node = self._inode(ino)
        m = self._mega(node)
        if m is not None and m.is_folder:
            raise FsError(errno.EISDIR)
        if _writable_flags(flags) or flags & os.O_TRUNC:
            self._writable()
        if flags & os.O_TRUNC:
            async with node.lock:
                await self._truncate(node, 0)
        node.opens += 1
        return self._new_handle(Handle(ino, flags))

    async def _stage(self, node: Inode, keep: int) -> Staged:
        """The node's staging copy, made from its current content (the first
        ``keep`` bytes of it) if there is none yet. Caller holds ``node.lock``."""
        if node.staged is not None:
            return node.staged
        staged = Staged.new(self.staging_dir)
        m = self._mega(node)
        try:
            if m is not None and keep > 0:
                for index, (start, length) in enumerate(crypto.chunk_bounds(m.size)):
                    if start >= keep:
                        break
                    data = await self.reader.chunk(m, index)
                    staged.write(start, data[: min(length, keep - start)])
        except BaseException:
            staged.discard()
            raise
        node.staged = staged
        return staged

    async def _truncate(self, node: Inode, size: int) -> None:
        staged = await self._stage(node, size)
        staged.truncate(size)
        node.dirty = True
        node.mtime_ns = time.time_ns()

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h, node = self._handle(fh)
        if node.staged is not None:
            return node.staged.read(off, size)
        m = self._mega(node)
        if m is None:
            raise FsError(errno.ESTALE if node.unlinked else errno.EIO)
        return await self.reader.read(m, h.read, off, size)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        _h, node = self._handle(fh)
        self._writable()
        async with node.lock:
            m = self._mega(node)
            staged = await self._stage(node, m.size if m is not None else 0)
            staged.write(off, data)
            node.dirty = True
            node.mtime_ns = time.time_ns()
        return len(data)

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
        node = self._inode(ino)
        m = self._mega(node)
        if size is not None:
            self._writable()
            if m is not None and m.is_folder:
                raise FsError(errno.EISDIR)
            async with node.lock:
                await self._truncate(node, size)
            if node.opens == 0 and node.dirty:
                # truncate(2) on a path: no close will follow to queue it.
                await self._stage_target(node, durable=False)
                self._enqueue(node)
        if mtime_ns is not None:
            self._writable()
            # After an upload in flight (it read the mtime when it started, and drops
            # it when done): then the time goes onto the node it made.
            async with node.lock:
                node.mtime_ns = mtime_ns
                m = self._mega(node)  # an upload may have replaced the node
                if not node.dirty and m is not None and not m.is_folder:
                    await self._set_mtime(m, mtime_ns // 1_000_000_000)
        return self.attr(node)

    async def _set_mtime(self, m: MegaNode, mtime: int) -> None:
        """Keep the fingerprint's content part, change its mtime (``touch``)."""
        if not self.tree.usable(m) or m.attrs is None or m.key is None:
            return
        c = m.attrs.get("c")
        crc = None
        if isinstance(c, str):
            try:
                raw = crypto.b64decode(c)
                crc = raw[:16] if len(raw) > 16 else None
            except (ValueError, crypto.MegaCryptoError):
                crc = None
        if crc is None:
            return  # no fingerprint to update; the mtime shows until remount
        blob = crypto.encrypt_attributes(
            {**m.attrs, "c": crypto.encode_fingerprint(crc, mtime)}, m.attr_key
        )
        await self.api.call({"a": "a", "n": m.handle, "at": blob, "i": self.api.client_tag})
        self.tree.set_attrs(m.handle, blob)

    async def flush(self, fh: int) -> None:
        h, node = self._handle(fh)
        # Only a handle that could write uploads: closing a reader of a file whose upload
        # failed must not fail (or wait for) the upload again; _retry_loop owns retries.
        if node.dirty and not node.unlinked and _writable_flags(h.flags):
            await self._stage_target(node, durable=False)
            self._check_quota(node)
            self._enqueue(node)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """Durable on local disk (the staged copy and where it goes); with
        ``-o fsync=remote``, on MEGA."""
        _h, node = self._handle(fh)
        if not node.dirty or node.unlinked:
            return
        if self.fsync_remote:
            await self._upload_for_caller(node)
        else:
            await self._stage_target(node, durable=True)
            self._enqueue(node)

    async def sync(self, *, remote: bool = False) -> None:
        """Every change so far durable on local disk: each dirty file's staged copy
        and where it goes, fsync'ed (what :meth:`fsync` does for one file). With
        ``remote``, uploaded now instead; a failure is the ``FsError`` ``fsync``
        with ``-o fsync=remote`` would give, and the file stays staged."""
        for node in list(self.inodes.values()):
            if not node.dirty or node.unlinked:
                continue
            if remote:
                await self._upload_for_caller(node)
            else:
                await self._stage_target(node, durable=True)

    def _target(self, node: Inode) -> Target | None:
        """Where the node's staged content goes (without the fingerprint)."""
        old = self._mega(node)
        if old is not None and self.tree.usable(old):
            parent, name, attrs = old.parent, old.name, dict(old.attrs or {})
        else:
            parent, name, attrs = node.parent, node.name, {}
        if parent is None or name is None:
            return None
        mtime = (node.mtime_ns or time.time_ns()) // 1_000_000_000
        attrs.pop("rr", None)
        attrs["n"] = name
        return Target(parent, name, old.handle if old else None, mtime, attrs)

    async def _stage_target(self, node: Inode, *, durable: bool) -> None:
        """Journal where the staged file goes, so a crash cannot orphan it (with
        ``durable``, data and journal are fsync'ed: what ``fsync`` promises)."""
        async with node.lock:
            staged, target = node.staged, self._target(node)
            if not node.dirty or staged is None or target is None:
                return
            save = partial(staged.save_target, target, self.tree.master_key, durable=durable)
            if durable:
                await trio.to_thread.run_sync(save)
            else:
                save()

    def _check_quota(self, node: Inode) -> None:
        """EDQUOT now if the account (as of the last ``uq``) cannot take this file and
        everything queued before it; the file stays staged and is retried."""
        if self._quota is None or node.staged is None:
            return
        _, total, used = self._quota
        queued = sum(
            n.staged.size
            for n in self.inodes.values()
            if n is not node and n.dirty and not n.unlinked and n.staged is not None
        )
        if total and used + queued + node.staged.size > total:
            err = MegaOverQuota(detail="the file does not fit in the account's storage quota")
            node.upload_error = err
            self.errors += 1
            self.upload_errors.error(str(err))
            log.warning("upload refused before sending: %s; the file stays staged", err)
            raise FsError(errno.EDQUOT, str(err))

    def _enqueue(self, node: Inode) -> None:
        if node.ino not in self._queued and node.upload_error is None:
            self._queued.add(node.ino)
            self._queue_send.send_nowait(node)

    async def _upload_worker(self) -> None:
        while True:
            node = await self._queue.receive()
            self._queued.discard(node.ino)
            try:
                await self._upload(node)
            except (MegaError, FsError, OSError) as exc:
                self.errors += 1
                self.upload_errors.error(str(exc))
                log.warning("upload failed (%s); the file stays staged and is retried", exc)

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        node = self.inodes.get(h.ino)
        if node is None:
            return
        node.opens -= 1
        if node.opens == 0:
            if node.unlinked:
                self._forget_local(node)
            elif not node.dirty and node.staged is not None:
                async with node.lock:
                    if not node.dirty and node.staged is not None and not node.opens:
                        node.staged.discard()
                        node.staged = None
                        node.mtime_ns = None

    async def _upload_for_caller(self, node: Inode) -> None:
        try:
            await self._upload(node)
        except MegaError as exc:
            self.errors += 1
            self.upload_errors.error(str(exc))
            code = errno_for(exc)
            log.warning("upload failed (%s); the file stays staged and is retried", exc)
            raise FsError(code, str(exc)) from None

    async def _upload(self, node: Inode) -> None:
        async with node.lock:
            if not node.dirty or node.staged is None or node.unlinked:
                return
            staged = node.staged
            old = self._mega(node)
            target = self._target(node)
            if target is None:
                raise FsError(errno.EIO)
            parent, attrs = target.parent, target.attrs
            attrs["c"] = crypto.encode_fingerprint(
                crypto.fingerprint_crc(staged.read, staged.size), target.mtime
            )
            staged.save_target(target, self.tree.master_key)
            put_cache: list[tuple[int, bytes]] = []

            async def read(off: int, n: int) -> bytes:
                data = staged.read(off, n)
                put_cache.append((off, data))
                return data

            try:
                self.upload_rate.busy()
                reply = await transfer.upload(
                    self.api,
                    self.api.http,
                    size=staged.size,
                    read=read,
                    parent=parent,
                    attrs=attrs,
                    master_key=self.tree.master_key,
                    on_sent=self.upload_rate.add,
                )
            except BaseException as exc:
                node.upload_error = exc
                raise
            new = self.tree.add(reply)
            if new is None:
                raise MegaError(detail="unexpected reply to p")
            self._place(node, new)
            for off, data in put_cache:
                index = crypto.chunk_index(off) if data else 0
                if data and crypto.chunk_start(index) == off:
                    bounds = crypto.chunk_bounds(new.size)
                    if index < len(bounds) and bounds[index][1] == len(data):
                        self.cache.put(cache_key(new.handle, index), data)
            node.dirty = False
            node.upload_error = None
            self.uploaded_bytes += staged.size
            self.upload_errors.ok()
            if node.opens == 0:
                staged.discard()
                node.staged = None
                node.mtime_ns = None
            else:
                staged.discard_meta()
            self.reader.verified(new.handle)
            if old is not None:
                try:
                    await self.api.call({"a": "d", "n": old.handle, "i": self.api.client_tag})
                except MegaError as exc:
                    log.warning(
                        "old version %s of a replaced file not deleted: %s", old.handle, exc
                    )
                self.tree.remove(old.handle)

    def _place(self, node: Inode, new: MegaNode) -> None:
        """The uploaded node takes the inode's place."""
        if node.handle is not None and self.by_handle.get(node.handle) == node.ino:
            del self.by_handle[node.handle]
        if node.handle is None and node.parent is not None:
            entries = self.pending.get(node.parent, {})
            for raw, ino in list(entries.items()):
                if ino == node.ino:
                    del entries[raw]
        node.handle = new.handle
        node.parent = node.name = None
        self.by_handle[new.handle] = node.ino
        if self.uploads_pending and node.upload_error is not None:
            self.uploads_pending -= 1

    async def _retry_loop(self) -> None:
        while True:
            await trio.sleep(RETRY_INTERVAL)
            for node in list(self.inodes.values()):
                if node.dirty and node.upload_error is not None and not node.opens:
                    before = str(node.upload_error)
                    try:
                        await self._upload(node)
                        log.info("staged upload finished after a retry")
                    except Exception as exc:
                        self.upload_errors.error(str(exc))
                        # One line per new failure, not one every RETRY_INTERVAL.
                        level = logging.DEBUG if str(exc) == before else logging.WARNING
                        log.log(level, "staged upload still failing: %s", exc)

    # ------------------------------------------------------------ events

    async def run_events(self) -> None:
        """Keep the tree current from the ``sc`` channel (see module docstring)."""
        while True:
            try:
                packets, sn = await self.api.poll_events(self.sn)
            except MegaError as exc:
                log.warning("MEGA event channel: %s; retrying", exc)
                await trio.sleep(5)
                continue
            self.sn = sn
            for p in packets:
                if not isinstance(p, dict) or p.get("i") == self.api.client_tag:
                    continue
                await self._apply_packet(p)

    async def _apply_packet(self, packet: dict[str, Any]) -> None:
        before: dict[str, dict[bytes, str]] = {}
        for h in self._packet_folders(packet):
            if h in self.tree.nodes:
                before[h] = dict(self.tree.listing(h))
        touched = self.tree.apply(packet)
        inval: list[tuple[int, bytes | None]] = []
        for h in touched | set(before):
            if h not in self.tree.nodes:
                self._drop_handle(h)
                continue
            ino = self.by_handle.get(h)
            if ino is None:
                continue
            self.reader.forget_url(h)
            inval.append((ino, None))
            if h in before:
                now = self.tree.listing(h)
                for raw, child in before[h].items():
                    if now.get(raw) != child:
                        inval.append((ino, raw))
        if self.invalidate is not None:
            await self.invalidate(inval)

    def _packet_folders(self, packet: dict[str, Any]) -> set[str]:
        out: set[str] = set()
        h = packet.get("n")
        if isinstance(h, str) and h in self.tree.nodes:
            p = self.tree.nodes[h].parent
            if p:
                out.add(p)
        t = packet.get("t")
        objs = t.get("f") if isinstance(t, dict) else None
        for obj in objs if isinstance(objs, list) else []:
            if isinstance(obj, dict):
                old = self.tree.nodes.get(str(obj.get("h")))
                if old is not None and old.parent:
                    out.add(old.parent)
                if isinstance(obj.get("p"), str):
                    out.add(obj["p"])
        return out

    # ------------------------------------------------------------ misc

    async def refresh_quota(self) -> None:
        """Ask for the account's storage quota (``uq``), for :meth:`statfs`."""
        try:
            q = await self.api.call({"a": "uq", "strg": 1, "xfer": 1})
            self._quota = (time.monotonic(), int(q.get("mstrg", 0)), int(q.get("cstrg", 0)))
        except (MegaError, AttributeError, ValueError, TypeError) as exc:
            log.warning("MEGA quota not available: %s", exc)

    async def _quota_loop(self) -> None:
        while True:
            await trio.sleep(QUOTA_TTL)
            await self.refresh_quota()

    def statfs(self) -> StatFs:
        """Sizes from the last ``uq`` (refreshed in the background)."""
        _, total, used = self._quota or (0.0, 1 << 40, 0)
        bs = 4096
        return StatFs(
            block_size=bs,
            blocks=total // bs,
            blocks_free=max(0, total - used) // bs,
            files=len(self.tree.nodes),
            files_free=1 << 30,
            name_max=NAME_MAX,
        )

    def file_state(self, ino: int) -> str:
        """``clean`` (on MEGA), ``uploading`` (queued or being uploaded) or ``dirty``
        (open for writing, or its upload failed and waits for a retry)."""
        node = self._inode(ino)
        if not node.dirty or node.unlinked:
            return "clean"
        if node.ino in self._queued or node.lock.locked():
            return "uploading"
        return "dirty"

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if name == STATE_XATTR:
            return self.file_state(ino).encode()
        node = self._inode(ino)
        m = self._mega(node)
        if name == LINK_XATTR and m is not None and not m.is_folder and not node.dirty:
            if not self.tree.usable(m):
                raise FsError(errno.EIO)
            return (await public_link(self.api, m)).encode()
        raise FsError(errno.ENODATA)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        raise FsError(errno.EOPNOTSUPP)

    async def listxattr(self, ino: int) -> list[bytes]:
        self._inode(ino)
        return []

    async def removexattr(self, ino: int, name: bytes) -> None:
        raise FsError(errno.ENODATA)


async def public_link(api: MegaApi, m: MegaNode) -> str:
    """The file's public link (``l`` makes one, or returns the existing one)."""
    if m.is_folder:
        raise FsError(errno.EISDIR)
    ph = await api.call({"a": "l", "n": m.handle, "i": api.client_tag})
    if not isinstance(ph, str):
        raise MegaError(detail="unexpected reply to l", command="l")
    return crypto.file_link(ph, m.file_key)
