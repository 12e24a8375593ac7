"""The pyfuse3 adapter: converts types and errors.

pyfuse3 ends the whole filesystem on the first exception that is not a
``FUSEError``, so every handler goes through :func:`_guard`: domain errors become
their errno (:func:`megafs.errors.errno_for`), anything unexpected becomes EIO with
a logged traceback, and the mount lives on. ``forget`` never raises. A handler
that suspends first wakes another worker to read requests (:func:`_run_inline`,
:mod:`megafs.fuse_loop`).
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import time
import types
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import Any, Final, ParamSpec, TypeVar

import pyfuse3

from megafs import fuse_loop
from megafs.errors import FsError, MegafsError, errno_for
from megafs.mega.fs import MegaVfs
from megafs.vfs.fs import Ctx, Vfs
from megafs.vfs.node import Attr

log = logging.getLogger(__name__)

ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 60.0

P = ParamSpec("P")
T = TypeVar("T")


# Arguments a request trace shows only the size of (file content, xattr values).
_CONTENT_ARGS = frozenset({"buf", "value"})
_HIDDEN_ARGS = frozenset({"self", "ctx", "attr", "fields", "token"})


def _describe_call(name: str, params: list[str], args: tuple[object, ...]) -> str:
    """``lookup(parent_inode=1, name=b'x')`` for a debug trace: file names appear (debug
    level only, never at info), file content and xattr values only as their size."""
    parts = []
    for pname, value in zip(params, args, strict=False):
        if pname in _HIDDEN_ARGS:
            continue
        if pname in _CONTENT_ARGS and isinstance(value, bytes | bytearray | memoryview):
            parts.append(f"{pname}=<{len(value)} bytes>")
        else:
            parts.append(f"{pname}={value!r}")
    return f"{name}({', '.join(parts)})"


def _guard(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    name = fn.__name__
    params = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        if log.isEnabledFor(logging.DEBUG):  # -o debug: one line per request
            return await _traced(fn, params, *args, **kwargs)
        try:
            return await _run_inline(fn(*args, **kwargs))
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise _fuse_error(name, exc) from None

    return wrapper


@types.coroutine
def _run_inline(coro: Coroutine[Any, Any, T]) -> Generator[Any, Any, T]:
    """Await ``coro``; the first time it suspends (waits for a store, a thread, a
    lock), first wake another FUSE worker to read requests meanwhile: the worker
    running a handler is the device's reader otherwise (:mod:`megafs.fuse_loop`).
    Sends and throws pass through unchanged, as ``await`` would."""
    try:
        step = coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    fuse_loop.handler_suspends()
    while True:
        try:
            sent = yield step
        except BaseException as exc:  # a cancellation or close, thrown in by trio
            try:
                step = coro.throw(exc)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        else:
            try:
                step = coro.send(sent)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]


def _fuse_error(name: str, exc: Exception) -> pyfuse3.FUSEError:
    """The FUSEError for an exception from handler ``name``; logs what is not an
    ordinary refusal (one line, or a traceback for the unexpected)."""
    if isinstance(exc, FsError):
        return pyfuse3.FUSEError(exc.errno)
    if isinstance(exc, MegafsError | OSError):
        log.error("%s: %s", name, exc)
        return pyfuse3.FUSEError(errno_for(exc))
    log.error("unexpected error in %s", name, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


async def _traced(
    fn: Callable[..., Coroutine[Any, Any, T]], params: list[str], *args: Any, **kwargs: Any
) -> T:
    call = _describe_call(fn.__name__, params, args)
    start = time.monotonic()
    try:
        result = await _run_inline(fn(*args, **kwargs))
    except Exception as exc:
        err = exc if isinstance(exc, pyfuse3.FUSEError) else _fuse_error(fn.__name__, exc)
        ms = (time.monotonic() - start) * 1000
        log.debug("%s -> %s (%.2f ms)", call, errno.errorcode.get(err.errno, err.errno), ms)
        raise err from None
    log.debug("%s -> ok (%.2f ms)", call, (time.monotonic() - start) * 1000)
    return result


#: readdir's ``.`` and ``..`` (see Operations.readdir).
DOT_ENTRIES: Final = 2


def _entry(a: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.generation = 0
    e.entry_timeout = ENTRY_TIMEOUT
    e.attr_timeout = ATTR_TIMEOUT
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = 65536
    e.st_blocks = a.blocks
    e.st_atime_ns = a.atime_ns
    e.st_mtime_ns = a.mtime_ns
    e.st_ctime_ns = a.ctime_ns
    return e


def _flags(flags: int) -> int:
    """Open flags as the vfs should see them. With the writeback cache the kernel
    computes O_APPEND offsets itself and may write cached pages back through any
    open handle, so the vfs must not move those writes to the end of the file."""
    return flags & ~os.O_APPEND if Operations.enable_writeback_cache else flags


def _ctx(ctx: Any) -> Ctx:
    return Ctx(ctx.uid, ctx.gid, ctx.umask)


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over a :class:`~megafs.vfs.fs.Vfs` (a megafs volume) or a
    :class:`~megafs.mega.fs.MegaVfs` (a MEGA account): the same surface."""

    enable_writeback_cache = True

    def __init__(self, vfs: Vfs | MegaVfs) -> None:
        super().__init__()
        self.vfs = vfs
        # With the writeback cache the kernel trusts its own file sizes over ours: right
        # for the only writer, wrong for a read-only mount whose files another machine
        # changes (a file grown elsewhere would read short).
        self.enable_writeback_cache = not vfs.read_only

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return _entry(await self.vfs.lookup(parent_inode, name))

    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:  # type: ignore[override]
        for ino, n in inode_list:
            try:
                self.vfs.forget(ino, n)
            except Exception:
                log.exception("forget failed")

    @_guard
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return _entry(await self.vfs.getattr(inode))

    @_guard
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return _entry(
            await self.vfs.setattr(
                inode,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                size=attr.st_size if fields.update_size else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
            )
        )

    @_guard
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.vfs.readlink(inode)

    @_guard
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.vfs.mknod(parent_inode, name, mode, rdev, _ctx(ctx)))

    @_guard
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.vfs.mkdir(parent_inode, name, mode, _ctx(ctx)))

    @_guard
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.vfs.symlink(parent_inode, name, target, _ctx(ctx)))

    @_guard
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.vfs.link(inode, new_parent_inode, new_name))

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.vfs.unlink(parent_inode, name)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.vfs.rmdir(parent_inode, name)

    @_guard
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        await self.vfs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_guard
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attr = await self.vfs.create(parent_inode, name, mode, _flags(flags), _ctx(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), _entry(attr)

    @_guard
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        fh = await self.vfs.open(inode, _flags(flags), _ctx(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.vfs.read(fh, off, size)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.vfs.write(fh, off, buf)

    @_guard
    async def flush(self, fh: int) -> None:
        if not self.vfs.flush_on_close:
            # A volume's close() has nothing to do (the next commit stages the file):
            # ENOSYS makes the kernel stop sending FLUSH, one round trip less per
            # close(). The kernel still writes the file's dirty pages back first
            # and reports their errors from close().
            raise pyfuse3.FUSEError(errno.ENOSYS)
        await self.vfs.flush(fh)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.vfs.fsync(fh, datasync)

    @_guard
    async def release(self, fh: int) -> None:
        await self.vfs.release(fh)

    @_guard
    async def opendir(self, inode: int, ctx: Any) -> int:
        return await self.vfs.opendir(inode)

    @_guard
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        """``.`` and ``..`` first (offsets 1 and 2: ``ls -a`` shows them, as on a
        local disk), then the vfs's entries, whose cookies (from 1) move up by
        DOT_ENTRIES. The kernel counts no lookup for the two dot entries, so neither
        does :meth:`Vfs.remember`."""
        h = self.vfs.handles.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        if start_id < DOT_ENTRIES:
            here = await self.vfs.getattr(h.ino)
            up = await self.vfs.lookup(h.ino, b"..")
            self.vfs.forget(up.ino, 1)  # (the kernel will not: it links no dentry)
            dots = ((b".", here, 1), (b"..", up, 2))
            for name, attr, offset in dots[start_id:]:
                if not pyfuse3.readdir_reply(token, name, _entry(attr), offset):
                    return
        after = max(0, start_id - DOT_ENTRIES)
        for name, attr, cookie in await self.vfs.readdir(h.ino, after):
            if not pyfuse3.readdir_reply(token, name, _entry(attr), cookie + DOT_ENTRIES):
                break
            self.vfs.remember(attr.ino)

    @_guard
    async def releasedir(self, fh: int) -> None:
        await self.vfs.releasedir(fh)

    @_guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.vfs.fsyncdir()

    @_guard
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = self.vfs.statfs()
        d = pyfuse3.StatvfsData()
        d.f_bsize = s.block_size
        d.f_frsize = s.block_size
        d.f_blocks = s.blocks
        d.f_bfree = s.blocks_free
        d.f_bavail = s.blocks_free
        d.f_files = s.files
        d.f_ffree = s.files_free
        d.f_favail = s.files_free
        d.f_namemax = s.name_max
        return d

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await self.vfs.getxattr(inode, name)

    @_guard
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self.vfs.setxattr(inode, name, value)

    @_guard
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return await self.vfs.listxattr(inode)

    @_guard
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.vfs.removexattr(inode, name)
