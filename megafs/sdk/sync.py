"""The synchronous SDK: the async :class:`~megafs.sdk.Drive` driven from a thread.

::

    import megafs.sdk.sync

    with megafs.sdk.sync.open_drive("/srv/vol", passphrase="...") as drive:
        drive.write_bytes("hello.txt", b"hi")
        with drive.open("hello.txt", "rb") as f:
            print(f.read())

How: :func:`open_drive` starts one thread that runs ``trio.run`` and keeps the drive
open inside :func:`megafs.sdk.open_drive`; every method call hops into that loop with
``trio.from_thread.run`` and waits for the result (exceptions come back as raised).
The async code is the only implementation: each method here is the async one run
in the loop (:func:`_blocking`). Calls may come from any number of threads; they are
served by the one trio loop, under the async drive's concurrency rules.

Closing (``with`` block end, :meth:`SyncDrive.close`, or at interpreter exit for a
drive left open) does what leaving ``async with`` does: closes files, commits,
waits for the uploads, stops the thread.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, final

import trio

from megafs.sdk._drive import Drive
from megafs.sdk._file import IO_PIECE, File
from megafs.sdk._open import open_drive as _open_async
from megafs.sdk._types import PathArg

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S", Drive, File)

__all__ = ["SyncDrive", "SyncFile", "open_drive"]


class _Loop:
    """The thread running trio for one drive (see the module docstring)."""

    def __init__(self, open_cm: Callable[[], Any]) -> None:
        self._open_cm = open_cm
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.drive: Drive | None = None
        self._thread = threading.Thread(target=self._main, name="megafs-sdk", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported by __init__ or stop()
            self._failure = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = trio.Event()
        async with self._open_cm() as drive:
            self.drive = drive
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._token is None:
            raise ValueError("operation on a closed drive")
        try:
            return trio.from_thread.run(fn, trio_token=self._token)
        except trio.RunFinishedError:
            # The loop ended under us: a background task failed (its error is raised
            # by close()), or the drive was closed meanwhile.
            raise ValueError("operation on a closed drive") from self._failure

    def stop(self) -> None:
        """Close the drive and end the thread; re-raises what closing raised."""
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            stop = self._stop
            try:
                trio.from_thread.run_sync(stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join()
        self._token = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure


class _Twin(Protocol):
    """A blocking object over an async one (:class:`SyncDrive`, :class:`SyncFile`)."""

    _loop: _Loop

    def _target(self) -> Any: ...


def _blocking(
    fn: Callable[Concatenate[S, P], Awaitable[T]],
) -> Callable[Concatenate[_Twin, P], T]:
    """The synchronous twin of async method ``fn`` (same arguments and docstring)."""

    def method(self: _Twin, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._loop.run(functools.partial(fn, self._target(), *args, **kwargs))

    method.__name__ = method.__qualname__ = fn.__name__
    method.__doc__ = fn.__doc__
    return method


@final
class SyncFile:
    """A :class:`~megafs.sdk.File` with blocking methods; a context manager."""

    def __init__(self, loop: _Loop, file: File) -> None:
        self._loop = loop
        self._file = file

    def _target(self) -> File:
        return self._file

    @property
    def name(self) -> str:
        return self._file.name

    @property
    def mode(self) -> str | int:
        return self._file.mode

    @property
    def closed(self) -> bool:
        return self._file.closed

    def readable(self) -> bool:
        return self._file.readable()

    def writable(self) -> bool:
        return self._file.writable()

    def seekable(self) -> bool:
        return self._file.seekable()

    read = _blocking(File.read)
    write = _blocking(File.write)
    seek = _blocking(File.seek)
    tell = _blocking(File.tell)
    truncate = _blocking(File.truncate)
    stat = _blocking(File.stat)
    flush = _blocking(File.flush)
    fsync = _blocking(File.fsync)
    close = _blocking(File.aclose)

    def chunks(self, size: int = IO_PIECE) -> Iterator[bytes]:
        """The rest of the file, ``size`` bytes at a time (streaming)."""
        while piece := self.read(size):
            yield piece

    def __enter__(self) -> SyncFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@final
class SyncDrive:
    """A :class:`~megafs.sdk.Drive` with blocking methods (see the module docstring)."""

    def __init__(self, loop: _Loop) -> None:
        self._loop = loop
        atexit.register(self.close)

    def _target(self) -> Drive:
        assert self._loop.drive is not None
        return self._loop.drive

    @property
    def url(self) -> str:
        return self._target().url

    @property
    def read_only(self) -> bool:
        return self._target().read_only

    stat = _blocking(Drive.stat)
    lstat = _blocking(Drive.lstat)
    exists = _blocking(Drive.exists)
    is_dir = _blocking(Drive.is_dir)
    is_file = _blocking(Drive.is_file)
    statvfs = _blocking(Drive.statvfs)
    scandir = _blocking(Drive.scandir)
    listdir = _blocking(Drive.listdir)
    mkdir = _blocking(Drive.mkdir)
    rmdir = _blocking(Drive.rmdir)
    remove = _blocking(Drive.remove)
    unlink = _blocking(Drive.unlink)
    rmtree = _blocking(Drive.rmtree)
    rename = _blocking(Drive.rename)
    symlink = _blocking(Drive.symlink)
    readlink = _blocking(Drive.readlink)
    link = _blocking(Drive.link)
    chmod = _blocking(Drive.chmod)
    chown = _blocking(Drive.chown)
    utime = _blocking(Drive.utime)
    truncate = _blocking(Drive.truncate)
    getxattr = _blocking(Drive.getxattr)
    setxattr = _blocking(Drive.setxattr)
    listxattr = _blocking(Drive.listxattr)
    removexattr = _blocking(Drive.removexattr)
    read_bytes = _blocking(Drive.read_bytes)
    write_bytes = _blocking(Drive.write_bytes)
    upload = _blocking(Drive.upload)
    download = _blocking(Drive.download)
    sync = _blocking(Drive.sync)

    def open(self, path: PathArg, mode: str | int = "rb", *, perms: int = 0o666) -> SyncFile:
        """Open a file (see :meth:`megafs.sdk.Drive.open`); a context manager."""
        drive = self._target()
        return SyncFile(self._loop, self._loop.run(lambda: drive.open(path, mode, perms=perms)))

    def walk(
        self, top: PathArg = "/", *, topdown: bool = True
    ) -> Iterator[tuple[str, list[str], list[str]]]:
        """Like :func:`os.walk` (see :meth:`megafs.sdk.Drive.walk`): the async walk,
        one step per call into the loop."""
        steps = self._target().walk(top, topdown=topdown)
        try:
            while True:
                try:
                    yield self._loop.run(steps.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run(steps.aclose)

    def close(self) -> None:
        """Close the drive (idempotent): what leaving ``async with open_drive`` does."""
        atexit.unregister(self.close)
        self._loop.stop()

    def __enter__(self) -> SyncDrive:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_drive(
    url: str,
    *,
    passphrase: str | bytes | None = None,
    key_file: str | os.PathLike[str] | None = None,
    mega_password: str | None = None,
    read_only: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    commit_interval: float = 1.0,
    fsync_remote: bool = False,
    wait_for_uploads: bool = True,
) -> SyncDrive:
    """Open a drive for blocking use; arguments as :func:`megafs.sdk.open_drive`.
    Use it as ``with open_drive(...) as drive:`` or call :meth:`SyncDrive.close`."""
    opener = functools.partial(
        _open_async,
        url,
        passphrase=passphrase,
        key_file=key_file,
        mega_password=mega_password,
        read_only=read_only,
        cache_dir=cache_dir,
        commit_interval=commit_interval,
        fsync_remote=fsync_remote,
        wait_for_uploads=wait_for_uploads,
    )
    return SyncDrive(_Loop(opener))
