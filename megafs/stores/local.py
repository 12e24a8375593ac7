"""A store in a local directory: key ``a/b/c`` is the file ``ROOT/a/b/c``.

Keys are validated by :func:`validate_key`: ``/``-separated segments of
``[A-Za-z0-9._-]+``, none of them ``.``, ``..``, ``.lock`` or starting with ``.tmp-``
(those names are the store's own). An invalid key raises :class:`ValueError`.

Writes are atomic and durable. The bytes go to a temporary file ``.tmp-*`` in the
target's directory, which is flushed and fsynced; ``os.replace`` (or ``os.link`` for a
create-only put) publishes it, and the directory is fsynced. Missing parent
directories are created, and the parent of each new directory is fsynced. A crash
leaves at most a stray ``.tmp-*`` file, which :meth:`LocalStore.list` and
:meth:`LocalStore.get` never see. Emptied directories are not removed.

Every commit step (replace, link, compare-and-replace, unlink) runs under an exclusive
``flock`` on ``ROOT/.lock``, so conditional puts are atomic among tasks, threads and
processes sharing the directory. A create-only put also relies on ``link(2)`` failing
with ``EEXIST``, so it holds even against writers that skip the lock (the fallback for
filesystems without hard links needs the lock).

ETag: ``f"{st_mtime_ns:x}-{st_size:x}-{st_ino:x}"``. Each put stamps its file with an
mtime strictly greater than the previous put's in this process, so a replaced object
gets a new ETag even if the filesystem reuses the inode number at once (down to the
filesystem's timestamp granularity).

Errors: a missing object raises :class:`~megafs.errors.ObjectNotFound`; any other
``OSError`` (ENOSPC, EIO, EACCES, ...) raises :class:`~megafs.errors.StoreError` with a
one-line message naming the key. Local failures are not transient, so
``StoreUnavailable`` is never raised. All blocking I/O runs in worker threads
(``trio.to_thread.run_sync``), which are not abandoned on cancellation, so a started
write always finishes or rolls back.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import final

import trio

from megafs.errors import NoSpace, ObjectNotFound, PreconditionFailed, StoreError
from megafs.stores.base import Computed, ObjectInfo, materialized

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_TMP_PREFIX = ".tmp-"
_LOCK_NAME = ".lock"

# errno values that mean "there is no object under this key".
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP})
# errno values from link(2) meaning the filesystem has no hard links.
_NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_FILE_MODE = 0o600
_DIR_MODE = 0o700


def _valid_segment(segment: str) -> bool:
    return (
        _SEGMENT.fullmatch(segment) is not None
        and segment not in (".", "..", _LOCK_NAME)
        and not segment.startswith(_TMP_PREFIX)
    )


def validate_key(key: str) -> None:
    """Raise :class:`ValueError` unless ``key`` is a valid object key (see module doc)."""
    if not key or not all(_valid_segment(s) for s in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")


def check_range(start: int, end: int | None) -> None:
    """Raise :class:`ValueError` for a negative ``start`` or an ``end`` before it."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range [{start}, {end})")


def _etag(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"


def _error(exc: OSError, op: str, key: str) -> StoreError:
    code = errno.errorcode.get(exc.errno or 0, "EUNKNOWN")
    kind = NoSpace if exc.errno in (errno.ENOSPC, errno.EDQUOT) else StoreError
    return kind(f"local store: cannot {op} {key!r}: {exc.strerror or exc} [{code}]")


def _missing(key: str) -> ObjectNotFound:
    return ObjectNotFound(f"local store: no object {key!r}")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _list_tree(root: str, prefix: str) -> list[ObjectInfo]:
    """The objects under ``root`` whose keys start with ``prefix``, sorted."""
    directory, key_prefix = root, ""
    if "/" in prefix:
        dir_part = prefix.rsplit("/", 1)[0]
        segments = dir_part.split("/")
        if not all(_valid_segment(s) for s in segments):
            return []  # no valid key can start with this prefix
        directory = os.path.join(root, *segments)
        key_prefix = dir_part + "/"
    found: list[ObjectInfo] = []
    try:
        _walk(directory, key_prefix, prefix, found)
    except OSError as exc:
        raise _error(exc, "list prefix", prefix) from exc
    found.sort(key=lambda info: info.key)
    return found


def _walk(directory: str, key_prefix: str, prefix: str, out: list[ObjectInfo]) -> None:
    try:
        entries = os.scandir(directory)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return
        raise
    with entries:
        for entry in entries:
            if not _valid_segment(entry.name):
                continue
            key = key_prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                sub = key + "/"
                if sub.startswith(prefix) or prefix.startswith(sub):
                    _walk(entry.path, sub, prefix, out)
            elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we looked
                out.append(ObjectInfo(key, st.st_size, _etag(st)))


@final
class _MtimeClock:
    """Hands out strictly increasing nanosecond timestamps, never behind the clock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> int:
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return self._last


_CLOCK = _MtimeClock()


@final
class LocalStore:
    """An :class:`~megafs.stores.base.ObjectStore` in the directory ``root``.

    ``root`` need not exist; the first put creates it. See the module docstring for
    the on-disk layout, atomicity and error mapping.
    """

    def __init__(self, root: Path) -> None:
        self._root = Path(root).absolute()
        self._root_str = os.fspath(self._root)

    @property
    def root(self) -> Path:
        """The directory holding the objects."""
        return self._root

    @property
    def url(self) -> str:
        return "file://" + self._root_str

    def _path(self, key: str) -> str:
        return os.path.join(self._root_str, *key.split("/"))

    # -- reads ---------------------------------------------------------------

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the object, clipped to its size."""
        validate_key(key)
        check_range(start, end)
        return await trio.to_thread.run_sync(self._get_sync, key, start, end)

    def _get_sync(self, key: str, start: int, end: int | None) -> bytes:
        try:
            fd = os.open(self._path(key), _READ_FLAGS)
        except OSError as exc:
            if exc.errno in _MISSING:
                raise _missing(key) from exc
            raise _error(exc, "get", key) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _missing(key)
            stop = st.st_size if end is None else min(end, st.st_size)
            chunks: list[bytes] = []
            pos = start
            while pos < stop:
                chunk = os.pread(fd, stop - pos, pos)
                if not chunk:
                    break
                chunks.append(chunk)
                pos += len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise _error(exc, "get", key) from exc
        finally:
            os.close(fd)

    async def head(self, key: str) -> ObjectInfo:
        """Size and ETag of the object."""
        validate_key(key)
        return await trio.to_thread.run_sync(self._head_sync, key)

    def _head_sync(self, key: str) -> ObjectInfo:
        try:
            st = os.lstat(self._path(key))
        except OSError as exc:
            if exc.errno in _MISSING:
                raise _missing(key) from exc
            raise _error(exc, "head", key) from exc
        if not stat.S_ISREG(st.st_mode):
            raise _missing(key)
        return ObjectInfo(key, st.st_size, _etag(st))

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key.

        Temporary files, the lock file, symlinks and files whose names are not valid
        key segments are skipped.
        """
        return await trio.to_thread.run_sync(_list_tree, self._root_str, prefix)

    # -- writes --------------------------------------------------------------

    async def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Atomically replace (or create) the object; return its new ETag."""
        validate_key(key)
        if if_none_match and if_match is not None:
            raise ValueError("put: if_none_match and if_match are exclusive")
        return await trio.to_thread.run_sync(self._put_sync, key, data, if_none_match, if_match)

    async def put_computed(
        self,
        compute: Callable[[], Computed | None],
        after: Callable[[], None] | None = None,
    ) -> str | None:
        """``put`` of what ``compute`` returns, then ``after``, all in one worker
        thread (see :func:`megafs.stores.base.put_computed`): the staging area's
        uploads read the staged file, write the object and move the staged file into
        the cache with one thread hop, not three."""

        def work() -> str | None:
            result = materialized(compute())
            if result is None:
                return None
            key, data = result
            validate_key(key)
            etag = self._put_sync(key, data, False, None)
            if after is not None:
                after()
            return etag

        return await trio.to_thread.run_sync(work)

    def _put_sync(
        self, key: str, data: bytes | bytearray, if_none_match: bool, if_match: str | None
    ) -> str:
        path = self._path(key)
        directory = os.path.dirname(path)
        try:
            self._ensure_dir(directory)
            tmp, etag = self._write_temp(directory, data)
        except OSError as exc:
            raise _error(exc, "put", key) from exc
        try:
            with self._locked():
                if if_none_match:
                    self._commit_create(tmp, path, key)
                elif if_match is not None:
                    self._check_etag(path, key, if_match)
                    os.replace(tmp, path)
                else:
                    os.replace(tmp, path)
            _fsync_dir(directory)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise _error(exc, "put", key) from exc
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return etag

    def _ensure_dir(self, directory: str) -> None:
        """Create ``directory`` and its missing parents, fsyncing each new one's parent."""
        if os.path.isdir(directory):
            return
        parent = os.path.dirname(directory)
        if parent != directory:
            self._ensure_dir(parent)
        try:
            os.mkdir(directory, _DIR_MODE)
        except FileExistsError:
            return  # created concurrently (or a file is in the way: the put fails later)
        _fsync_dir(parent)

    def _write_temp(self, directory: str, data: bytes | bytearray) -> tuple[str, str]:
        """Write ``data`` durably to a new temp file in ``directory``: (path, ETag)."""
        tmp = os.path.join(directory, _TMP_PREFIX + secrets.token_hex(8))
        fd = os.open(tmp, _TMP_FLAGS, _FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            stamp = _CLOCK.next()
            os.utime(fd, ns=(stamp, stamp))
            os.fsync(fd)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        return tmp, _etag(st)

    def _commit_create(self, tmp: str, path: str, key: str) -> None:
        """Publish ``tmp`` as ``path`` unless ``path`` exists (caller holds the lock)."""
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise PreconditionFailed(f"local store: {key!r} already exists") from None
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            # No hard links here: the lock alone makes check-then-replace atomic.
            if os.path.lexists(path):
                raise PreconditionFailed(f"local store: {key!r} already exists") from None
            os.replace(tmp, path)
        else:
            _unlink_quietly(tmp)  # the object is published; a leftover tmp is harmless

    def _check_etag(self, path: str, key: str, if_match: str) -> None:
        try:
            st = os.lstat(path)
        except OSError as exc:
            if exc.errno in _MISSING:
                raise PreconditionFailed(f"local store: {key!r} does not exist") from None
            raise
        if not stat.S_ISREG(st.st_mode) or _etag(st) != if_match:
            raise PreconditionFailed(f"local store: {key!r} has changed (ETag mismatch)")

    async def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""
        validate_key(key)
        await trio.to_thread.run_sync(self._delete_sync, key)

    def _delete_sync(self, key: str) -> None:
        path = self._path(key)
        try:
            with self._locked():
                os.unlink(path)
            _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            if exc.errno in _MISSING:
                return  # also: the root (hence the lock file) does not exist yet
            raise _error(exc, "delete", key) from exc

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive flock on ``ROOT/.lock`` (a new open file per call, so it
        excludes other threads of this process as well as other processes)."""
        fd = os.open(
            os.path.join(self._root_str, _LOCK_NAME),
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
            _FILE_MODE,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    async def aclose(self) -> None:
        """Nothing to release: every operation opens and closes its own files."""
