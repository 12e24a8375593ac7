"""The SDK's drive: path operations over the filesystem core a mount uses.

:class:`Drive` speaks paths; the core (:class:`~megafs.vfs.fs.Vfs` for a megafs
volume, :class:`~megafs.mega.fs.MegaVfs` for a MEGA account) speaks inode numbers,
exactly as it does to the FUSE adapter. The drive does what the kernel does before
calling the core: walks paths with ``lookup`` (following symbolic links, at most
``SYMLINK_HOPS`` of them), gives every lookup reference back at once (``forget``),
turns ``O_CREAT``/``O_EXCL`` into lookup + ``create``, and closes a file with
``flush`` + ``release``. There is no second implementation of anything.

Symbolic links with an absolute target point outside the drive (as they do in a
mount, where they resolve from the system's root): following one fails with ENOENT.

Concurrency: any number of trio tasks may call a drive at once; the core's rules
hold (namespace changes are atomic between awaits). A path walk that races a
rename elsewhere sees the tree before or after it, as with a kernel.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final

from megafs.errors import FsError
from megafs.mega.fs import MegaVfs
from megafs.sdk import _transfer
from megafs.sdk._errors import mapped
from megafs.sdk._file import File, open_flags
from megafs.sdk._types import DirEntry, PathArg, StatResult, StatVfsResult
from megafs.vfs.fs import RENAME_NOREPLACE, Ctx, Vfs
from megafs.vfs.node import Attr

ROOT_INO: Final = 1
SYMLINK_HOPS: Final = 40
XATTR_CREATE: Final = getattr(os, "XATTR_CREATE", 1)
XATTR_REPLACE: Final = getattr(os, "XATTR_REPLACE", 2)


async def setxattr_flagged(
    fs: Vfs | MegaVfs, ino: int, key: bytes, value: bytes, flags: int
) -> None:
    """``setxattr`` with ``os.XATTR_CREATE`` / ``os.XATTR_REPLACE`` checked first, as
    the kernel and pyfuse3 do for a mount (the vfs itself ignores ``flags``)."""
    if flags & (XATTR_CREATE | XATTR_REPLACE):
        try:
            await fs.getxattr(ino, key)
        except FsError as exc:
            if exc.errno != errno.ENODATA or flags & XATTR_REPLACE:
                raise
        else:
            if flags & XATTR_CREATE:
                raise FsError(errno.EEXIST)
    await fs.setxattr(ino, key, value)


#: ``progress(bytes_done, bytes_total)`` during :meth:`Drive.upload` / :meth:`Drive.download`.
Progress = Callable[[int, int], None]


def _components(path: PathArg) -> list[bytes]:
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise ValueError("embedded null byte in path")
    return [p for p in raw.split(b"/") if p and p != b"."]


def _display(path: PathArg) -> str:
    """The path as messages and entries show it: from the root, starting with '/'."""
    return "/" + "/".join(os.fsdecode(p) for p in _components(path))


@dataclass(frozen=True)
class _Found:
    """Where a path leads: its directory and last name (None/b"" for the root), and
    the entry's attributes (None: no such entry, but the directory exists)."""

    parent: int | None
    name: bytes
    attr: Attr | None


@final
class Drive:
    """A megafs volume or a MEGA account, opened by :func:`megafs.sdk.open_drive`.

    Paths are relative to the drive's root (a leading ``/`` changes nothing). Every
    method is a coroutine; errors are :class:`~megafs.sdk.PathError` subclasses
    (``FileNotFoundError``, ...) for refused path operations, and other
    :class:`~megafs.errors.MegafsError` for store or integrity failures."""

    def __init__(
        self,
        fs: Vfs | MegaVfs,
        url: str,
        *,
        sync: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._fs = fs
        self.url: Final = url
        self._sync = sync
        umask = os.umask(0)
        os.umask(umask)
        self._ctx = Ctx(os.getuid(), os.getgid(), umask)
        self._files: set[File] = set()
        self.closed = False

    def __repr__(self) -> str:
        return f"<megafs.sdk.Drive {self.url!r}{' closed' if self.closed else ''}>"

    @property
    def read_only(self) -> bool:
        """Whether changes are refused (opened read-only, or the lease was lost)."""
        return self._fs.read_only

    def _check(self) -> None:
        if self.closed:
            raise ValueError("operation on a closed drive")

    # ------------------------------------------------------------- path walk

    async def _lookup(self, parent: int, name: bytes) -> Attr:
        attr = await self._fs.lookup(parent, name)
        self._fs.forget(attr.ino, 1)  # no reference is kept, as a FORGET would say
        return attr

    async def _find(self, path: PathArg, *, follow: bool) -> _Found:
        """Walk ``path``; a missing last component is not an error (``attr`` None)."""
        self._check()
        parts = deque(_components(path))
        cur = await self._fs.getattr(ROOT_INO)
        found = _Found(None, b"", cur)
        hops = 0
        while parts:
            part = parts.popleft()
            if not stat.S_ISDIR(cur.mode):
                raise FsError(errno.ENOTDIR)
            try:
                attr = await self._lookup(cur.ino, part)
            except FsError as exc:
                if exc.errno == errno.ENOENT and not parts:
                    return _Found(cur.ino, part, None)
                raise
            if stat.S_ISLNK(attr.mode) and (parts or follow):
                hops += 1
                if hops > SYMLINK_HOPS:
                    raise FsError(errno.ELOOP)
                target = await self._fs.readlink(attr.ino)
                if target.startswith(b"/"):
                    raise FsError(errno.ENOENT, "a symbolic link to a path outside the drive")
                parts.extendleft(reversed(_components(target)))
                if not parts:  # "." or "" as a target: the directory itself
                    found = _Found(found.parent, found.name, cur)
                continue
            found = _Found(cur.ino, part, attr)
            cur = attr
        return found

    async def _existing(self, path: PathArg, *, follow: bool = True) -> Attr:
        found = await self._find(path, follow=follow)
        if found.attr is None:
            raise FsError(errno.ENOENT)
        return found.attr

    async def _new_entry(self, path: PathArg) -> tuple[int, bytes]:
        """The directory and name for a new entry at ``path`` (the last component is
        not followed); EEXIST if something is there."""
        found = await self._find(path, follow=False)
        if found.parent is None:
            raise FsError(errno.EEXIST)
        if found.attr is not None:
            raise FsError(errno.EEXIST)
        return found.parent, found.name

    async def _entry(self, path: PathArg) -> tuple[int, bytes, Attr]:
        """The directory, name and attributes of an existing entry (not followed)."""
        found = await self._find(path, follow=False)
        if found.attr is None:
            raise FsError(errno.ENOENT)
        if found.parent is None:
            raise FsError(errno.EBUSY, "the drive's root")
        return found.parent, found.name, found.attr

    # ------------------------------------------------------------- status

    async def stat(self, path: PathArg, *, follow_symlinks: bool = True) -> StatResult:
        """The status of ``path`` (of a symbolic link itself with
        ``follow_symlinks=False``, as :func:`os.lstat`)."""
        with mapped(_display(path)):
            return StatResult._of(await self._existing(path, follow=follow_symlinks))

    async def lstat(self, path: PathArg) -> StatResult:
        """``stat(path, follow_symlinks=False)``."""
        return await self.stat(path, follow_symlinks=False)

    async def exists(self, path: PathArg) -> bool:
        """Whether ``path`` exists (a dangling symbolic link does not)."""
        try:
            await self.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    async def is_dir(self, path: PathArg) -> bool:
        """Whether ``path`` is a directory (or a link to one)."""
        try:
            return stat.S_ISDIR((await self.stat(path)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    async def is_file(self, path: PathArg) -> bool:
        """Whether ``path`` is a regular file (or a link to one)."""
        try:
            return stat.S_ISREG((await self.stat(path)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    async def statvfs(self, path: PathArg = "/") -> StatVfsResult:
        """The drive's size, free space and name length limit (as :func:`os.statvfs`)."""
        with mapped(_display(path)):
            await self._existing(path)
            return StatVfsResult._of(self._fs.statfs())

    # ------------------------------------------------------------- directories

    async def scandir(self, path: PathArg = "/") -> list[DirEntry]:
        """The entries of a directory with their full status, in the drive's order
        (no ``.`` or ``..``): one listing, no round trip per entry."""
        shown = _display(path)
        prefix = shown.rstrip("/") + "/"
        with mapped(shown):
            attr = await self._existing(path)
            if not stat.S_ISDIR(attr.mode):
                raise FsError(errno.ENOTDIR)
            fh = await self._fs.opendir(attr.ino)
            try:
                entries = [
                    DirEntry(os.fsdecode(name), prefix + os.fsdecode(name), StatResult._of(a))
                    for name, a, _cookie in await self._fs.readdir(attr.ino, 0)
                ]
            finally:
                await self._fs.releasedir(fh)
        return entries

    async def listdir(self, path: PathArg = "/") -> list[str]:
        """The names in a directory (no ``.`` or ``..``)."""
        return [e.name for e in await self.scandir(path)]

    async def walk(
        self, top: PathArg = "/", *, topdown: bool = True
    ) -> AsyncGenerator[tuple[str, list[str], list[str]], None]:
        """Like :func:`os.walk`: ``(dirpath, dirnames, filenames)`` for ``top`` and
        every directory below it. Symbolic links to directories are listed in
        ``filenames`` and not followed. Top-down, editing ``dirnames`` in place prunes
        the walk."""
        dirpath = _display(top)
        entries = await self.scandir(top)
        dirs = [e.name for e in entries if e.is_dir()]
        files = [e.name for e in entries if not e.is_dir()]
        if topdown:
            yield dirpath, dirs, files
        for name in dirs:
            async for item in self.walk(f"{dirpath.rstrip('/')}/{name}", topdown=topdown):
                yield item
        if not topdown:
            yield dirpath, dirs, files

    async def mkdir(
        self, path: PathArg, mode: int = 0o777, *, parents: bool = False, exist_ok: bool = False
    ) -> None:
        """Make a directory (``mode`` less the process umask). With ``parents``, make
        missing parents too; with ``exist_ok``, an existing directory is no error
        (as :meth:`pathlib.Path.mkdir`)."""
        if parents:
            parts = _components(path)
            for i in range(1, len(parts)):
                await self.mkdir(b"/".join(parts[:i]), exist_ok=True)
        with mapped(_display(path)):
            found = await self._find(path, follow=True)
            if found.attr is not None:
                if exist_ok and stat.S_ISDIR(found.attr.mode):
                    return
                raise FsError(errno.EEXIST)
            assert found.parent is not None
            try:
                attr = await self._fs.mkdir(found.parent, found.name, mode, self._ctx)
            except FsError as exc:  # made by another task meanwhile?
                if exc.errno == errno.EEXIST and exist_ok and await self.is_dir(path):
                    return
                raise
            self._fs.forget(attr.ino, 1)

    async def rmdir(self, path: PathArg) -> None:
        """Remove an empty directory."""
        with mapped(_display(path)):
            parent, name, attr = await self._entry(path)
            if not stat.S_ISDIR(attr.mode):
                raise FsError(errno.ENOTDIR)
            await self._fs.rmdir(parent, name)

    async def remove(self, path: PathArg) -> None:
        """Remove a file, symbolic link or other non-directory (``unlink``)."""
        with mapped(_display(path)):
            parent, name, _attr = await self._entry(path)
            await self._fs.unlink(parent, name)

    unlink = remove

    async def rmtree(self, path: PathArg) -> None:
        """Remove a directory and everything below it (a non-directory: just it)."""
        st = await self.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            await self.remove(path)
            return
        for entry in await self.scandir(path):
            if entry.is_dir():
                await self.rmtree(entry.path)
            else:
                await self.remove(entry.path)
        await self.rmdir(path)

    async def rename(self, src: PathArg, dst: PathArg, *, replace: bool = True) -> None:
        """Rename ``src`` to ``dst``, replacing what ``dst`` names (a file, or an
        empty directory when ``src`` is one) unless ``replace=False`` (then EEXIST)."""
        with mapped(_display(src), _display(dst)):
            sp, sn, _ = await self._entry(src)
            found = await self._find(dst, follow=False)
            if found.parent is None:
                raise FsError(errno.EBUSY, "the drive's root")
            await self._fs.rename(
                sp, sn, found.parent, found.name, 0 if replace else RENAME_NOREPLACE
            )

    async def symlink(self, target: PathArg, path: PathArg) -> None:
        """Make a symbolic link at ``path`` pointing to ``target`` (stored as given)."""
        with mapped(_display(path)):
            parent, name = await self._new_entry(path)
            attr = await self._fs.symlink(parent, name, os.fsencode(target), self._ctx)
            self._fs.forget(attr.ino, 1)

    async def readlink(self, path: PathArg) -> str:
        """The target of a symbolic link."""
        with mapped(_display(path)):
            attr = await self._existing(path, follow=False)
            return os.fsdecode(await self._fs.readlink(attr.ino))

    async def link(self, src: PathArg, dst: PathArg) -> None:
        """Make ``dst`` a hard link to the file ``src`` (not followed if a link)."""
        with mapped(_display(src), _display(dst)):
            attr = await self._existing(src, follow=False)
            parent, name = await self._new_entry(dst)
            new = await self._fs.link(attr.ino, parent, name)
            self._fs.forget(new.ino, 1)

    # ------------------------------------------------------------- attributes

    async def chmod(self, path: PathArg, mode: int) -> None:
        """Set the permission bits (``0o7777``) of ``path``."""
        with mapped(_display(path)):
            attr = await self._existing(path)
            await self._fs.setattr(attr.ino, mode=mode & 0o7777)

    async def utime(
        self, path: PathArg, ns: tuple[int, int] | None = None, *, follow_symlinks: bool = True
    ) -> None:
        """Set access and modification times in nanoseconds (``None``: now)."""
        if ns is None:
            t = time.time_ns()
            ns = (t, t)
        with mapped(_display(path)):
            attr = await self._existing(path, follow=follow_symlinks)
            await self._fs.setattr(attr.ino, atime_ns=ns[0], mtime_ns=ns[1])

    async def chown(
        self, path: PathArg, uid: int, gid: int, *, follow_symlinks: bool = True
    ) -> None:
        """Set the owner and group (-1 leaves one as it is), as :func:`os.chown`
        without the kernel's permission checks (the drive has none)."""
        with mapped(_display(path)):
            attr = await self._existing(path, follow=follow_symlinks)
            await self._fs.setattr(
                attr.ino, uid=None if uid == -1 else uid, gid=None if gid == -1 else gid
            )

    async def truncate(self, path: PathArg, size: int) -> None:
        """Cut or extend (with zeros) a file to ``size`` bytes."""
        with mapped(_display(path)):
            attr = await self._existing(path)
            await self._fs.setattr(attr.ino, size=size)

    # ------------------------------------------------------------- xattrs

    async def getxattr(self, path: PathArg, name: str) -> bytes:
        """The value of extended attribute ``name`` (ENODATA if unset)."""
        with mapped(_display(path)):
            attr = await self._existing(path, follow=False)
            return await self._fs.getxattr(attr.ino, os.fsencode(name))

    async def setxattr(self, path: PathArg, name: str, value: bytes, flags: int = 0) -> None:
        """Set extended attribute ``name``; ``flags`` as :func:`os.setxattr`
        (``os.XATTR_CREATE``: fail if set, ``os.XATTR_REPLACE``: fail if unset)."""
        with mapped(_display(path)):
            attr = await self._existing(path, follow=False)
            key = os.fsencode(name)
            await setxattr_flagged(self._fs, attr.ino, key, bytes(value), flags)

    async def listxattr(self, path: PathArg) -> list[str]:
        """The names of the extended attributes set on ``path``."""
        with mapped(_display(path)):
            attr = await self._existing(path, follow=False)
            return [os.fsdecode(n) for n in await self._fs.listxattr(attr.ino)]

    async def removexattr(self, path: PathArg, name: str) -> None:
        """Remove extended attribute ``name`` (ENODATA if unset)."""
        with mapped(_display(path)):
            attr = await self._existing(path, follow=False)
            await self._fs.removexattr(attr.ino, os.fsencode(name))

    # ------------------------------------------------------------- files

    async def open(self, path: PathArg, mode: str | int = "rb", *, perms: int = 0o666) -> File:
        """Open a file, as the built-in ``open`` does in binary mode (``"rb"``,
        ``"wb"``, ``"ab"``, ``"xb"``, with ``+`` for both; ``b`` may be left out), or
        with ``os.open`` flags (e.g. ``os.O_RDWR | os.O_CREAT``).
        A new file gets ``perms`` less the process umask. Use it as
        ``async with await drive.open(path, "wb") as f:``."""
        flags = open_flags(mode)
        shown = _display(path)
        with mapped(shown):
            found = await self._find(path, follow=True)
            core_flags = flags & ~(os.O_CREAT | os.O_EXCL | os.O_APPEND)
            if found.attr is None:
                if not flags & os.O_CREAT:
                    raise FsError(errno.ENOENT)
                assert found.parent is not None
                fh, attr = await self._fs.create(
                    found.parent, found.name, perms, core_flags & ~os.O_TRUNC, self._ctx
                )
                self._fs.forget(attr.ino, 1)
            else:
                attr = found.attr
                if flags & os.O_EXCL:
                    raise FsError(errno.EEXIST)
                if stat.S_ISDIR(attr.mode):
                    raise FsError(errno.EISDIR)
                fh = await self._fs.open(attr.ino, core_flags, self._ctx)
        f = File(self._fs, fh, attr.ino, shown, mode, flags, self._files.discard)
        self._files.add(f)
        return f

    async def read_bytes(self, path: PathArg) -> bytes:
        """The whole content of a file."""
        async with await self.open(path, "rb") as f:
            return await f.read()

    async def write_bytes(self, path: PathArg, data: bytes | bytearray | memoryview) -> int:
        """Replace the content of a file (created if missing) with ``data``."""
        async with await self.open(path, "wb") as f:
            return await f.write(data)

    # ------------------------------------------------------------- transfers

    async def upload(
        self,
        local: str | os.PathLike[str],
        remote: PathArg,
        *,
        progress: Progress | None = None,
        skip_unchanged: bool = False,
    ) -> _transfer.Stats:
        """Copy a local file or directory tree to ``remote`` (its exact new path; parents
        must exist), with permission bits, modification times and symbolic links.
        ``progress(done, total)`` is called as bytes go. With ``skip_unchanged``, files
        whose size and modification time (to the second) match are not sent again: a
        transfer that was interrupted continues where it stopped."""
        return await _transfer.upload(self, Path(local), _display(remote), progress, skip_unchanged)

    async def download(
        self,
        remote: PathArg,
        local: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
        skip_unchanged: bool = False,
    ) -> _transfer.Stats:
        """Copy a file or directory tree of the drive to ``local`` (its exact new path),
        with permission bits, modification times and symbolic links (see :meth:`upload`)."""
        return await _transfer.download(
            self, _display(remote), Path(local), progress, skip_unchanged
        )

    # ------------------------------------------------------------- durability

    async def sync(self, *, remote: bool = False) -> None:
        """Return once every change so far is durable on local disk (in the sealed
        staging area: it survives a crash or power loss and is uploaded by this or the
        next opening); with ``remote=True``, once the store holds it all."""
        self._check()
        await self._sync(remote)

    async def _close_files(self) -> None:
        for f in list(self._files):
            await f.aclose()
