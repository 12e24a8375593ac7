"""An open file of a drive: the SDK's file object.

A :class:`File` holds one open handle of the filesystem core (the same handle a
FUSE ``open`` gets) and a position. Reads and writes go to the core in pieces of at
most ``IO_PIECE`` bytes, as the kernel's requests would: nothing buffers a whole
file, and written data is subject to the core's back-pressure.

Concurrency: one trio task at a time per file object, like a Python file; the
position and the ``closed`` flag are changed only by the task using it. Several
:class:`File` objects (in one or many tasks) may be open on the same path; the
core serialises their content changes (``node.content_lock``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Final, final

import trio

from megafs.sdk._errors import mapped, path_error
from megafs.sdk._types import StatResult

if TYPE_CHECKING:
    from megafs.mega.fs import MegaVfs
    from megafs.vfs.fs import Vfs

IO_PIECE: Final = 1 << 20


@final
class File:
    """A file opened by :meth:`megafs.sdk.Drive.open` (binary only).

    Use it as ``async with await drive.open(path, "rb") as f:``. ``close`` hands the
    content to the drive and returns without waiting for the network (ARCHITECTURE
    §6); :meth:`fsync` makes it durable on local disk; ``Drive.sync(remote=True)``
    waits for the store."""

    def __init__(
        self,
        fs: Vfs | MegaVfs,
        fh: int,
        ino: int,
        path: str,
        mode: str | int,
        flags: int,
        on_close: Callable[[File], None],
    ) -> None:
        self._fs = fs
        self._fh = fh
        self._ino = ino
        self.name: Final = path
        self.mode: Final = mode
        self._flags = flags
        self._pos = 0
        self._on_close = on_close
        self.closed = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<megafs.sdk.File {self.name!r} mode={self.mode!r} {state}>"

    # --------------------------------------------------------------- state

    def readable(self) -> bool:
        return self._flags & os.O_ACCMODE != os.O_WRONLY

    def writable(self) -> bool:
        return self._flags & os.O_ACCMODE != os.O_RDONLY

    def seekable(self) -> bool:
        return True

    def _check(self, need: Callable[[], bool] | None = None, what: str = "") -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if need is not None and not need():
            raise path_error(errno.EBADF, self.name, detail=f"file not open for {what}")

    async def _size(self) -> int:
        return (await self._fs.getattr(self._ino)).size

    # --------------------------------------------------------------- I/O

    async def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes from the position (all the rest if ``size`` < 0);
        ``b""`` at the end of the file."""
        self._check(self.readable, "reading")
        if size < 0:
            size = max(0, await self._size() - self._pos)
        parts: list[bytes] = []
        with mapped(self.name):
            while size > 0:
                # A checkpoint per piece: reads of cached data need not yield
                # (a file's content lock is taken without one), and the committer,
                # uploads and read-ahead must run meanwhile.
                await trio.lowlevel.checkpoint()
                piece = await self._fs.read(self._fh, self._pos, min(size, IO_PIECE))
                if not piece:
                    break
                parts.append(piece)
                self._pos += len(piece)
                size -= len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of ``data`` at the position (at the end in append mode);
        returns ``len(data)``."""
        self._check(self.writable, "writing")
        view = memoryview(data).cast("B")
        with mapped(self.name):
            if self._flags & os.O_APPEND:
                self._pos = await self._size()
            done = 0
            while done < len(view):
                await trio.lowlevel.checkpoint()  # as in read()
                piece = bytes(view[done : done + IO_PIECE])
                n = await self._fs.write(self._fh, self._pos, piece)
                self._pos += n
                done += n
        return done

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position (``os.SEEK_SET``, ``SEEK_CUR``, ``SEEK_END``); returns it."""
        self._check()
        if whence == os.SEEK_SET:
            base = 0
        elif whence == os.SEEK_CUR:
            base = self._pos
        elif whence == os.SEEK_END:
            with mapped(self.name):
                base = await self._size()
        else:
            raise ValueError(f"invalid whence ({whence})")
        if base + offset < 0:
            raise path_error(errno.EINVAL, self.name, detail="negative seek position")
        self._pos = base + offset
        return self._pos

    async def tell(self) -> int:
        """The current position."""
        self._check()
        return self._pos

    async def truncate(self, size: int | None = None) -> int:
        """Cut or extend (with zeros) the file to ``size`` bytes (default: the
        position); the position does not move. Returns the new size."""
        self._check()
        if not self.writable():  # EINVAL, as ftruncate(2) says
            raise path_error(errno.EINVAL, self.name, detail="file not open for writing")
        size = self._pos if size is None else size
        if size < 0:
            raise path_error(errno.EINVAL, self.name, detail="negative size")
        with mapped(self.name):
            await self._fs.setattr(self._ino, size=size)
        return size

    async def chunks(self, size: int = IO_PIECE) -> AsyncIterator[bytes]:
        """The rest of the file, ``size`` bytes at a time (streaming)."""
        while piece := await self.read(size):
            yield piece

    async def stat(self) -> StatResult:
        """The file's status (as :func:`os.fstat`)."""
        self._check()
        with mapped(self.name):
            return StatResult._of(await self._fs.getattr(self._ino))

    async def flush(self) -> None:
        """Hand what was written to the drive (as ``close`` does, without closing)."""
        self._check()
        with mapped(self.name):
            await self._fs.flush(self._fh)

    async def fsync(self) -> None:
        """Return once the content and its metadata are durable on local disk (on the
        store, for a drive opened with ``fsync_remote=True``)."""
        self._check()
        with mapped(self.name):
            await self._fs.fsync(self._fh, False)

    async def aclose(self) -> None:
        """Close the file (idempotent). Never waits for the network."""
        if self.closed:
            return
        self.closed = True
        self._on_close(self)
        with mapped(self.name):
            try:
                await self._fs.flush(self._fh)
            finally:
                await self._fs.release(self._fh)

    async def __aenter__(self) -> File:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def open_flags(mode: str | int) -> int:
    """``open()`` flags for a Python file mode (binary modes only; ``b`` optional), or
    ``os.open`` flags as they are (``O_RDONLY``/``O_WRONLY``/``O_RDWR`` with any of
    ``O_CREAT``, ``O_EXCL``, ``O_TRUNC``, ``O_APPEND``)."""
    if isinstance(mode, int):
        known = os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND
        if mode & ~known or mode & os.O_ACCMODE == os.O_ACCMODE:
            raise ValueError(f"unsupported open flags: {mode:#o}")
        return mode
    chars = set(mode)
    if "t" in chars:
        raise ValueError(f"text mode is not supported ({mode!r}): open in binary mode")
    if len(chars) != len(mode) or not chars <= set("rwxab+"):
        raise ValueError(f"invalid mode: {mode!r}")
    kinds = chars & set("rwxa")
    if len(kinds) != 1:
        raise ValueError(f"mode must have exactly one of r, w, x, a: {mode!r}")
    flags = {
        "r": os.O_RDONLY,
        "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
        "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    }[kinds.pop()]
    if "+" in chars:
        flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags
