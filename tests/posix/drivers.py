"""One synchronous driver interface for the POSIX suite, two implementations.

* :class:`OsDriver` makes real syscalls on a FUSE-mounted megafs directory.
* :class:`VfsDriver` calls :class:`~megafs.vfs.fs.Vfs` in process (no kernel): a trio
  loop runs in a background thread and every method hops into it with
  ``trio.from_thread.run``. It does what the kernel does before calling the
  filesystem (path walk by ``lookup``, O_CREAT/O_EXCL via lookup + create, close as
  flush + release, FORGET of every lookup it made) and turns ``FsError`` into
  ``OSError`` so the same test code runs against both.

Paths are relative to the filesystem root ("a/b"; "" is the root itself).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from conftest import PASSPHRASE, TEST_KDF, Mount, make_volume, new_mount, serving

from megafs.control import STATUS_XATTR, mounted_at
from megafs.errors import FsError
from megafs.sdk._drive import setxattr_flagged
from megafs.stores import LocalStore, MemoryStore, ObjectStore, open_store
from megafs.vfs.fs import ROOT_INO, Ctx, Vfs
from megafs.vfs.node import Attr
from megafs.volume.drive import Volume

T = TypeVar("T")

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
XATTR_CREATE = getattr(os, "XATTR_CREATE", 1)
XATTR_REPLACE = getattr(os, "XATTR_REPLACE", 2)
# Entries per readdir round trip of the in-process driver (the kernel asks for one
# page of entries at a time), so directory iteration interleaves with changes.
READDIR_BATCH = 16


@dataclass(frozen=True)
class Stat:
    st_mode: int
    st_ino: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_size: int
    st_blocks: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int

    @classmethod
    def of(cls, s: os.stat_result | Attr) -> Stat:
        if isinstance(s, Attr):
            return cls(
                s.mode,
                s.ino,
                s.nlink,
                s.uid,
                s.gid,
                s.rdev,
                s.size,
                s.blocks,
                s.atime_ns,
                s.mtime_ns,
                s.ctime_ns,
            )
        return cls(
            s.st_mode,
            s.st_ino,
            s.st_nlink,
            s.st_uid,
            s.st_gid,
            s.st_rdev,
            s.st_size,
            s.st_blocks,
            s.st_atime_ns,
            s.st_mtime_ns,
            s.st_ctime_ns,
        )


@dataclass(frozen=True)
class StatVfs:
    f_bsize: int
    f_blocks: int
    f_bfree: int
    f_files: int
    f_ffree: int
    f_namemax: int


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Driver:
    """The operations the suite uses; every failure is an ``OSError`` with errno."""

    kind: str

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        raise NotImplementedError

    def close(self, fd: int) -> None:
        raise NotImplementedError

    def pread(self, fd: int, size: int, off: int) -> bytes:
        raise NotImplementedError

    def pwrite(self, fd: int, data: bytes, off: int) -> int:
        raise NotImplementedError

    def write(self, fd: int, data: bytes) -> int:
        """Write at the descriptor's position (the end, with O_APPEND)."""
        raise NotImplementedError

    def fsync(self, fd: int) -> None:
        raise NotImplementedError

    def drop_cache(self, fd: int) -> None:
        """Forget cached clean pages so the next read asks the filesystem."""

    def ftruncate(self, fd: int, size: int) -> None:
        raise NotImplementedError

    def fstat(self, fd: int) -> Stat:
        raise NotImplementedError

    def lstat(self, path: str) -> Stat:
        raise NotImplementedError

    def truncate(self, path: str, size: int) -> None:
        raise NotImplementedError

    def chmod(self, path: str, mode: int) -> None:
        raise NotImplementedError

    def chown(self, path: str, uid: int, gid: int) -> None:
        raise NotImplementedError

    def utime(self, path: str, ns: tuple[int, int] | None) -> None:
        """Set atime and mtime in nanoseconds; ``None``: both to now."""
        raise NotImplementedError

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        raise NotImplementedError

    def rmdir(self, path: str) -> None:
        raise NotImplementedError

    def unlink(self, path: str) -> None:
        raise NotImplementedError

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        raise NotImplementedError

    def link(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def symlink(self, target: str, path: str) -> None:
        raise NotImplementedError

    def readlink(self, path: str) -> str:
        raise NotImplementedError

    def mkfifo(self, path: str, mode: int = 0o644) -> None:
        raise NotImplementedError

    def mknod(self, path: str, mode: int, rdev: int = 0) -> None:
        raise NotImplementedError

    def scandir(self, path: str) -> Iterator[str]:
        """Names in the directory, fetched lazily (no "." or "..")."""
        raise NotImplementedError

    def statvfs(self, path: str) -> StatVfs:
        raise NotImplementedError

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        raise NotImplementedError

    def getxattr(self, path: str, name: str) -> bytes:
        raise NotImplementedError

    def listxattr(self, path: str) -> list[str]:
        raise NotImplementedError

    def removexattr(self, path: str, name: str) -> None:
        raise NotImplementedError

    def remount(self) -> None:
        """Unmount (everything committed) and mount the same volume again."""
        raise NotImplementedError

    def read_after_crash(self, path: str) -> bytes:
        """The content ``path`` would have if the machine crashed now: read from
        the store by a second, read-only mount while this one stays as it is."""
        raise NotImplementedError

    def close_driver(self) -> None:
        """Tear down; fails if the filesystem reported background errors."""

    # -- conveniences built on the above

    def listdir(self, path: str) -> list[str]:
        return list(self.scandir(path))

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        fd = self.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            if data:
                self.pwrite(fd, data, 0)
        finally:
            self.close(fd)

    def read_file(self, path: str) -> bytes:
        fd = self.open(path, os.O_RDONLY)
        try:
            self.drop_cache(fd)  # read what the filesystem has, not the page cache
            size = self.fstat(fd).st_size
            parts = []
            off = 0
            while off < size:
                piece = self.pread(fd, min(size - off, 8 << 20), off)
                if not piece:
                    break
                parts.append(piece)
                off += len(piece)
            return b"".join(parts)
        finally:
            self.close(fd)

    def exists(self, path: str) -> bool:
        try:
            self.lstat(path)
        except FileNotFoundError:
            return False
        return True


# --------------------------------------------------------------------- OsDriver

_libc = ctypes.CDLL(None, use_errno=True)


class OsDriver(Driver):
    """Real syscalls under ``root`` (a megafs mount)."""

    kind = "mount"

    def __init__(self, root: Path, mount: Mount | None = None) -> None:
        self.root = root
        self.mount = mount
        self._fds: set[int] = set()

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path) if path else str(self.root)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = os.open(self._p(path), flags, mode)
        self._fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self._fds.discard(fd)
        os.close(fd)

    def close_driver(self) -> None:
        for fd in list(self._fds):  # a failed test may leave some open
            self.close(fd)

    def pread(self, fd: int, size: int, off: int) -> bytes:
        return os.pread(fd, size, off)

    def pwrite(self, fd: int, data: bytes, off: int) -> int:
        return os.pwrite(fd, data, off)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def drop_cache(self, fd: int) -> None:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fstat(self, fd: int) -> Stat:
        return Stat.of(os.fstat(fd))

    def lstat(self, path: str) -> Stat:
        return Stat.of(os.lstat(self._p(path)))

    def truncate(self, path: str, size: int) -> None:
        os.truncate(self._p(path), size)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._p(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.lchown(self._p(path), uid, gid)

    def utime(self, path: str, ns: tuple[int, int] | None) -> None:
        if ns is None:
            os.utime(self._p(path), follow_symlinks=False)
        else:
            os.utime(self._p(path), ns=ns, follow_symlinks=False)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        os.mkdir(self._p(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        if not flags:
            os.rename(self._p(src), self._p(dst))
            return
        rc = _libc.renameat2(
            AT_FDCWD,
            os.fsencode(self._p(src)),
            AT_FDCWD,
            os.fsencode(self._p(dst)),
            ctypes.c_uint(flags),
        )
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), src, None, dst)

    def link(self, src: str, dst: str) -> None:
        os.link(self._p(src), self._p(dst), follow_symlinks=False)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self._p(path))

    def readlink(self, path: str) -> str:
        return os.readlink(self._p(path))

    def mkfifo(self, path: str, mode: int = 0o644) -> None:
        os.mkfifo(self._p(path), mode)

    def mknod(self, path: str, mode: int, rdev: int = 0) -> None:
        os.mknod(self._p(path), mode, rdev)

    def scandir(self, path: str) -> Iterator[str]:
        with os.scandir(self._p(path)) as it:
            for entry in it:
                yield entry.name

    def statvfs(self, path: str) -> StatVfs:
        s = os.statvfs(self._p(path))
        return StatVfs(s.f_bsize, s.f_blocks, s.f_bfree, s.f_files, s.f_ffree, s.f_namemax)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        os.setxattr(self._p(path), name, value, flags, follow_symlinks=False)

    def getxattr(self, path: str, name: str) -> bytes:
        return os.getxattr(self._p(path), name, follow_symlinks=False)

    def listxattr(self, path: str) -> list[str]:
        return os.listxattr(self._p(path), follow_symlinks=False)

    def removexattr(self, path: str, name: str) -> None:
        os.removexattr(self._p(path), name, follow_symlinks=False)

    def remount(self) -> None:
        assert self.mount is not None, "no mount to restart"
        assert not self._fds, "close every file before remounting"
        self.mount.restart()

    def read_after_crash(self, path: str) -> bytes:
        """What a crash now leaves at ``path``: the store once the next mount has
        uploaded what the staging area holds (fsync makes data durable there, not on
        the store), read by a fresh read-only vfs."""
        assert self.mount is not None, "no mount to look under"
        rel = os.path.relpath(self._p(path), self.mount.path)
        m = self.mount
        deadline = time.monotonic() + 60
        while json.loads(os.getxattr(m.path, STATUS_XATTR))["pending_objects"]:
            assert time.monotonic() < deadline, "uploads did not finish within 60 s"
            time.sleep(0.05)
        if isinstance(m.store, Path):
            return trio.run(_read_on_store, LocalStore(m.store), rel)
        saved = {k: os.environ.get(k) for k in m.env}
        os.environ.update(m.env)  # a remote store is configured from the environment
        try:
            return trio.run(_read_on_store, open_store(m.store), rel)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


async def _read_on_store(store: ObjectStore, path: str) -> bytes:
    """Read ``path`` through a fresh read-only vfs on ``store``."""
    try:
        vfs = Vfs(await Volume.open(store, PASSPHRASE.encode(), read_only=True), read_only=True)
        await vfs.start()
        ino = ROOT_INO
        for part in path.split("/"):
            ino = (await vfs.lookup(ino, os.fsencode(part))).ino
        fh = await vfs.open(ino, os.O_RDONLY)
        size = (await vfs.getattr(ino)).size
        return await vfs.read(fh, 0, size)
    finally:
        await store.aclose()


# -------------------------------------------------------------------- VfsDriver


@dataclass
class _File:
    fh: int
    ino: int
    flags: int
    pos: int = 0


def _split(path: str) -> tuple[str, bytes]:
    parent, _, name = path.rpartition("/")
    return parent, os.fsencode(name)


class VfsDriver(Driver):
    """The same operations on an in-process :class:`Vfs` (see the module docstring)."""

    kind = "vfs"

    def __init__(self, state_root: Path) -> None:
        self.store = MemoryStore()
        self.state_root = state_root
        self._created = False
        self._files: dict[int, _File] = {}
        self._fd_numbers = itertools.count(1000)  # next() is atomic: threads may open
        self.ctx = Ctx(os.getuid(), os.getgid(), _umask())
        self._start()

    # -- the trio thread

    def _start(self) -> None:
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, daemon=True, name="vfs-driver")
        self._thread.start()
        self._ready.wait(60)
        if self._failure is not None:
            raise self._failure
        assert self._ready.is_set(), "the vfs did not start"

    def _thread_main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        if not self._created:
            await Volume.create(self.store, PASSPHRASE.encode(), kdf_params=TEST_KDF)
            self._created = True
        volume = await Volume.open(self.store, PASSPHRASE.encode(), state_root=self.state_root)
        self.vfs = Vfs(volume)
        await self.vfs.start()
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._ready.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.vfs.run_committer)
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        await self.vfs.close()
        await volume.aclose()

    def _shutdown(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the vfs did not stop"
        if self._failure is not None:
            raise self._failure
        assert self.vfs.errors == 0, "the vfs reported background commit errors"

    def _run(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return trio.from_thread.run(fn, trio_token=self._token)
        except FsError as exc:
            raise OSError(exc.errno, os.strerror(exc.errno)) from None

    def remount(self) -> None:
        assert not self._files, "close every file before remounting"
        self._shutdown()
        self._start()

    def read_after_crash(self, path: str) -> bytes:
        return self._run(lambda: _read_on_store(self.store, path))

    def close_driver(self) -> None:
        for fd in list(self._files):
            self.close(fd)
        self._shutdown()

    # -- the kernel's part: path walk, lookup counts

    async def _lookup(self, parent: int, name: bytes) -> Attr:
        """One lookup, its reference given back at once (like a later FORGET)."""
        attr = await self.vfs.lookup(parent, name)
        self.vfs.forget(attr.ino, 1)
        return attr

    async def _resolve(self, path: str) -> Attr:
        attr = await self.vfs.getattr(ROOT_INO)
        for part in filter(None, path.split("/")):
            if not stat.S_ISDIR(attr.mode):
                raise FsError(errno.ENOTDIR)
            attr = await self._lookup(attr.ino, os.fsencode(part))
        return attr

    async def _parent(self, path: str) -> tuple[int, bytes]:
        parent, name = _split(path)
        d = await self._resolve(parent)
        if not stat.S_ISDIR(d.mode):
            raise FsError(errno.ENOTDIR)
        return d.ino, name

    def _file(self, fd: int) -> _File:
        try:
            return self._files[fd]
        except KeyError:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None

    # -- files

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        async def op() -> _File:
            pino, name = await self._parent(path)
            try:
                attr = await self._lookup(pino, name)
            except FsError as exc:
                if exc.errno != errno.ENOENT or not flags & os.O_CREAT:
                    raise
                fh, attr = await self.vfs.create(
                    pino, name, mode, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC), self.ctx
                )
                self.vfs.forget(attr.ino, 1)
                return _File(fh, attr.ino, flags)
            if flags & os.O_CREAT and flags & os.O_EXCL:
                raise FsError(errno.EEXIST)
            if stat.S_ISDIR(attr.mode):
                raise FsError(errno.EISDIR)
            fh = await self.vfs.open(attr.ino, flags & ~(os.O_CREAT | os.O_EXCL), self.ctx)
            return _File(fh, attr.ino, flags)

        f = self._run(op)
        fd = next(self._fd_numbers)
        self._files[fd] = f
        return fd

    def close(self, fd: int) -> None:
        f = self._files.pop(fd)

        async def op() -> None:
            try:
                await self.vfs.flush(f.fh)
            finally:
                await self.vfs.release(f.fh)

        self._run(op)

    def pread(self, fd: int, size: int, off: int) -> bytes:
        f = self._file(fd)
        return self._run(lambda: self.vfs.read(f.fh, off, size))

    def pwrite(self, fd: int, data: bytes, off: int) -> int:
        f = self._file(fd)
        if f.flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self._run(lambda: self.vfs.write(f.fh, off, data))

    def write(self, fd: int, data: bytes) -> int:
        f = self._file(fd)
        if f.flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))

        async def op() -> int:
            if f.flags & os.O_APPEND:
                f.pos = (await self.vfs.getattr(f.ino)).size
            n = await self.vfs.write(f.fh, f.pos, data)
            f.pos += n
            return n

        return self._run(op)

    def fsync(self, fd: int) -> None:
        f = self._file(fd)
        self._run(lambda: self.vfs.fsync(f.fh))

    def ftruncate(self, fd: int, size: int) -> None:
        f = self._file(fd)
        if f.flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self._run(lambda: self.vfs.setattr(f.ino, size=size))

    def fstat(self, fd: int) -> Stat:
        f = self._file(fd)
        return Stat.of(self._run(lambda: self.vfs.getattr(f.ino)))

    # -- attributes

    def lstat(self, path: str) -> Stat:
        return Stat.of(self._run(lambda: self._resolve(path)))

    def _setattr(self, path: str, **kw: Any) -> None:
        async def op() -> None:
            attr = await self._resolve(path)
            await self.vfs.setattr(attr.ino, **kw)

        self._run(op)

    def truncate(self, path: str, size: int) -> None:
        self._setattr(path, size=size)

    def chmod(self, path: str, mode: int) -> None:
        self._setattr(path, mode=mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        async def op() -> None:
            attr = await self._resolve(path)
            mode = attr.mode
            # The kernel's chown_common(): a non-directory loses set-user-ID, and
            # set-group-ID if group-executable, even when root changes the owner.
            if not stat.S_ISDIR(mode):
                mode &= ~stat.S_ISUID
                if mode & stat.S_IXGRP:
                    mode &= ~stat.S_ISGID
            await self.vfs.setattr(
                attr.ino,
                uid=None if uid == -1 else uid,
                gid=None if gid == -1 else gid,
                mode=mode if mode != attr.mode else None,
            )

        self._run(op)

    def utime(self, path: str, ns: tuple[int, int] | None) -> None:
        if ns is None:  # UTIME_NOW: the kernel fills in the current time
            now = time.time_ns()
            ns = (now, now)
        self._setattr(path, atime_ns=ns[0], mtime_ns=ns[1])

    # -- namespace

    def _make(self, path: str, make: Callable[[int, bytes], Awaitable[Attr]]) -> None:
        async def op() -> None:
            pino, name = await self._parent(path)
            attr = await make(pino, name)
            self.vfs.forget(attr.ino, 1)

        self._run(op)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self._make(path, lambda p, n: self.vfs.mkdir(p, n, mode, self.ctx))

    def symlink(self, target: str, path: str) -> None:
        self._make(path, lambda p, n: self.vfs.symlink(p, n, os.fsencode(target), self.ctx))

    def mkfifo(self, path: str, mode: int = 0o644) -> None:
        self.mknod(path, stat.S_IFIFO | mode)

    def mknod(self, path: str, mode: int, rdev: int = 0) -> None:
        self._make(path, lambda p, n: self.vfs.mknod(p, n, mode, rdev, self.ctx))

    def link(self, src: str, dst: str) -> None:
        async def op() -> None:
            attr = await self._resolve(src)
            pino, name = await self._parent(dst)
            new = await self.vfs.link(attr.ino, pino, name)
            self.vfs.forget(new.ino, 1)

        self._run(op)

    def rmdir(self, path: str) -> None:
        async def op() -> None:
            pino, name = await self._parent(path)
            await self.vfs.rmdir(pino, name)

        self._run(op)

    def unlink(self, path: str) -> None:
        async def op() -> None:
            pino, name = await self._parent(path)
            await self.vfs.unlink(pino, name)

        self._run(op)

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        async def op() -> None:
            sp, sn = await self._parent(src)
            dp, dn = await self._parent(dst)
            await self.vfs.rename(sp, sn, dp, dn, flags)

        self._run(op)

    def readlink(self, path: str) -> str:
        async def op() -> bytes:
            attr = await self._resolve(path)
            return await self.vfs.readlink(attr.ino)

        return os.fsdecode(self._run(op))

    def scandir(self, path: str) -> Iterator[str]:
        async def opendir() -> int:
            attr = await self._resolve(path)
            return await self.vfs.opendir(attr.ino)

        fh = self._run(opendir)
        ino = self.vfs.handles[fh].ino
        cookie = 0
        try:
            while True:

                async def batch(start: int = cookie) -> list[tuple[bytes, int]]:
                    out = []
                    for name, _attr, c in await self.vfs.readdir(ino, start):
                        out.append((name, c))
                        if len(out) == READDIR_BATCH:
                            break
                    return out

                got = self._run(batch)
                if not got:
                    return
                for name, c in got:
                    cookie = c
                    yield os.fsdecode(name)
        finally:
            self._run(lambda: self.vfs.releasedir(fh))

    def statvfs(self, path: str) -> StatVfs:
        async def op() -> StatVfs:
            await self._resolve(path)
            s = self.vfs.statfs()
            return StatVfs(s.block_size, s.blocks, s.blocks_free, s.files, s.files_free, s.name_max)

        return self._run(op)

    # -- xattrs (flags checked the way pyfuse3 does before calling setxattr)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        async def op() -> None:
            attr = await self._resolve(path)
            key = os.fsencode(name)
            await setxattr_flagged(self.vfs, attr.ino, key, value, flags)

        self._run(op)

    def getxattr(self, path: str, name: str) -> bytes:
        async def op() -> bytes:
            attr = await self._resolve(path)
            return await self.vfs.getxattr(attr.ino, os.fsencode(name))

        return self._run(op)

    def listxattr(self, path: str) -> list[str]:
        async def op() -> list[bytes]:
            attr = await self._resolve(path)
            return await self.vfs.listxattr(attr.ino)

        return [os.fsdecode(n) for n in self._run(op)]

    def removexattr(self, path: str, name: str) -> None:
        async def op() -> None:
            attr = await self._resolve(path)
            await self.vfs.removexattr(attr.ino, os.fsencode(name))

        self._run(op)


# -------------------------------------------------------------------- SdkDriver


class SdkDriver(Driver):
    """The same operations through the SDK (:mod:`megafs.sdk.sync`), in process, on a
    local-directory volume: a third front end on the same Vfs. Descriptors are the
    SDK's file objects; ``pread``/``pwrite`` are a seek and a read or write."""

    kind = "sdk"

    def __init__(self, tmp: Path) -> None:
        import megafs.sdk.sync

        self._open_drive = megafs.sdk.sync.open_drive
        self.store = make_volume(tmp / "sdk-store")
        self.cache = tmp / "sdk-cache"
        self._files: dict[int, megafs.sdk.sync.SyncFile] = {}
        self._fd_numbers = itertools.count(2000)
        self.drive = self._open()

    def _open(self) -> Any:
        return self._open_drive(str(self.store), passphrase=PASSPHRASE, cache_dir=self.cache)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = next(self._fd_numbers)
        self._files[fd] = self.drive.open(path, flags, perms=mode)
        return fd

    def _file(self, fd: int) -> Any:
        try:
            return self._files[fd]
        except KeyError:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None

    def close(self, fd: int) -> None:
        self._files.pop(fd).close()

    def pread(self, fd: int, size: int, off: int) -> bytes:
        f = self._file(fd)
        f.seek(off)
        data: bytes = f.read(size)
        return data

    def pwrite(self, fd: int, data: bytes, off: int) -> int:
        f = self._file(fd)
        f.seek(off)
        n: int = f.write(data)
        return n

    def write(self, fd: int, data: bytes) -> int:
        n: int = self._file(fd).write(data)
        return n

    def fsync(self, fd: int) -> None:
        self._file(fd).fsync()

    def ftruncate(self, fd: int, size: int) -> None:
        self._file(fd).truncate(size)

    def fstat(self, fd: int) -> Stat:
        return Stat.of(self._file(fd).stat())

    def lstat(self, path: str) -> Stat:
        return Stat.of(self.drive.lstat(path))

    def truncate(self, path: str, size: int) -> None:
        self.drive.truncate(path, size)

    def chmod(self, path: str, mode: int) -> None:
        self.drive.chmod(path, mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.drive.chown(path, uid, gid, follow_symlinks=False)

    def utime(self, path: str, ns: tuple[int, int] | None) -> None:
        self.drive.utime(path, ns, follow_symlinks=False)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self.drive.mkdir(path, mode)

    def rmdir(self, path: str) -> None:
        self.drive.rmdir(path)

    def unlink(self, path: str) -> None:
        self.drive.remove(path)

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        if flags & ~RENAME_NOREPLACE:
            raise NotImplementedError("the SDK renames with or without replacing only")
        self.drive.rename(src, dst, replace=not flags)

    def link(self, src: str, dst: str) -> None:
        self.drive.link(src, dst)

    def symlink(self, target: str, path: str) -> None:
        self.drive.symlink(target, path)

    def readlink(self, path: str) -> str:
        target: str = self.drive.readlink(path)
        return target

    def scandir(self, path: str) -> Iterator[str]:
        yield from self.drive.listdir(path)

    def statvfs(self, path: str) -> StatVfs:
        s = self.drive.statvfs(path)
        return StatVfs(s.f_bsize, s.f_blocks, s.f_bfree, s.f_files, s.f_ffree, s.f_namemax)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        self.drive.setxattr(path, name, value, flags)

    def getxattr(self, path: str, name: str) -> bytes:
        value: bytes = self.drive.getxattr(path, name)
        return value

    def listxattr(self, path: str) -> list[str]:
        names: list[str] = self.drive.listxattr(path)
        return names

    def removexattr(self, path: str, name: str) -> None:
        self.drive.removexattr(path, name)

    def remount(self) -> None:
        assert not self._files, "close every file before remounting"
        self.drive.close()
        self.drive = self._open()

    def close_driver(self) -> None:
        for fd in list(self._files):
            self.close(fd)
        self.drive.close()


# --------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def suite_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One FUSE mount (conftest's :class:`Mount`) for a whole test module.

    Starting and stopping a daemon costs about 0.7 s, which per test would more
    than double the suite's runtime; each test gets a fresh directory of this mount
    instead (see :func:`fs`), and the daemon log is checked after every test."""
    with serving(new_mount(tmp_path_factory.mktemp("posix"), "suite")) as m:
        yield m


@pytest.fixture(scope="module")
def s3_suite_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """Like :func:`suite_mount`, on a real S3 server (``juicefs gateway`` on 127.0.0.1)."""
    from megafs.testing.s3server import juicefs_gateway

    tmp = tmp_path_factory.mktemp("posix-s3")
    (tmp / "server").mkdir()
    with juicefs_gateway(root=tmp / "server") as server:

        async def create() -> None:
            store = server.store("posix")
            try:
                await Volume.create(store, PASSPHRASE.encode(), kdf_params=TEST_KDF)
            finally:
                await store.aclose()

        trio.run(create)
        m = Mount(
            f"s3://{server.bucket}/posix",
            tmp / "mnt",
            tmp / "cache",
            tmp / "megafs.log",
            env=server.env(),
        )
        with serving(m):
            yield m


@pytest.fixture(scope="module")
def webdav_suite_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """Like :func:`suite_mount`, on a real WebDAV server (``rclone serve webdav`` on
    127.0.0.1)."""
    import httpx

    from megafs.stores.webdav import WebDavStore
    from megafs.testing.webdavserver import rclone_webdav

    tmp = tmp_path_factory.mktemp("posix-webdav")
    (tmp / "server" / "posix").mkdir(parents=True)
    with rclone_webdav(root=tmp / "server") as server:
        url = server.url + "posix"

        async def create() -> None:
            auth = httpx.BasicAuth(server.user, server.password)
            store = WebDavStore(url.removeprefix("webdav+"), auth=auth)
            try:
                await Volume.create(store, PASSPHRASE.encode(), kdf_params=TEST_KDF)
            finally:
                await store.aclose()

        trio.run(create)
        m = Mount(url, tmp / "mnt", tmp / "cache", tmp / "megafs.log", env=server.env)
        with serving(m):
            yield m


SUITE_MOUNTS = {
    "mount": "suite_mount",
    "mount-s3": "s3_suite_mount",
    "mount-webdav": "webdav_suite_mount",
}


#: The front ends every case runs through; test_behaviour's ``pytest_generate_tests``
#: parametrizes ``fs`` with these, plus "sdk" (:class:`SdkDriver`) for most cases.
FS_PARAMS = ["vfs", "mount", "mount-s3", "mount-webdav"]


@pytest.fixture
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Driver]:
    """The suite's filesystem: a fresh in-process vfs on an empty volume, or a fresh
    directory on a real FUSE mount of a local-directory, S3 or WebDAV volume (remount
    restarts that mount's daemon)."""
    drv: Driver
    if request.param in ("vfs", "sdk"):
        drv = VfsDriver(tmp_path / "vfs-state") if request.param == "vfs" else SdkDriver(tmp_path)
        try:
            yield drv
        finally:
            drv.close_driver()
        return
    m: Mount = request.getfixturevalue(SUITE_MOUNTS[request.param])
    if m.proc is None or m.proc.poll() is not None or not mounted_at(m.path):
        m.stop()  # an earlier test killed it: start afresh, its log still counts
        m.start()
    log_start = len(m.log_text())
    root = m.path / request.node.name
    root.mkdir()
    drv = OsDriver(root, m)
    try:
        yield drv
    finally:
        drv.close_driver()
    new = m.log_text()[log_start:]
    bad = [ln for ln in new.splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert not bad, "unexpected errors in the megafs log:\n" + new
