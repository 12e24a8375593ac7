"""Copying trees between the local filesystem and a drive (``upload``/``download``).

Both directions stream: a file moves ``PIECE`` bytes at a time (the local side in a
worker thread, through :func:`trio.open_file`), so memory use does not grow with file
size; the drive's own back-pressure bounds what waits for the store. Directories are
made before their contents and get their permission bits and times after them.
Regular files, directories and symbolic links are copied, with their permission bits,
times and ``user.*`` extended attributes (where the other side keeps them: a MEGA
account and some local filesystems do not, and are not asked twice); other kinds
(FIFOs, devices, sockets) are listed in :attr:`Stats.not_copied`.

Resuming (``skip_unchanged``): a file whose destination has the same size and
modification time (to the second) is skipped. Times are set only once a file's
content is complete, so a file cut short by an interruption is sent again; and on a
megafs volume its chunks that reached the store already are not uploaded again (the
staging area checks for an identical chunk object first).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from megafs.sdk._types import StatResult

if TYPE_CHECKING:
    from megafs.sdk._drive import Drive

PIECE: Final = 1 << 20


@dataclass
class Stats:
    """What a transfer did."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: int = 0  # unchanged files left as they were (``skip_unchanged``)
    not_copied: list[str] = field(default_factory=list)  # special files, by path


class _Meter:
    def __init__(self, total: int, progress: Callable[[int, int], None] | None) -> None:
        self.total = total
        self.done = 0
        self.progress = progress
        self.tick(0)

    def tick(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


def _same(size_a: int, mtime_ns_a: int, size_b: int, mtime_ns_b: int) -> bool:
    return size_a == size_b and mtime_ns_a // 1_000_000_000 == mtime_ns_b // 1_000_000_000


def _join(base: str, rel: str) -> str:
    return base if not rel else f"{base.rstrip('/')}/{rel}"


# ------------------------------------------------------------------ upload


def _scan_local(top: Path) -> list[tuple[str, os.stat_result]]:
    """``(relative path, lstat)`` of ``top`` and everything below it, parents first."""
    out = [("", os.lstat(top))]
    if stat.S_ISDIR(out[0][1].st_mode):
        for dirpath, dirnames, filenames in os.walk(top):
            rel = os.path.relpath(dirpath, top)
            rel = "" if rel == "." else rel
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(dirpath, name)
                out.append((os.path.join(rel, name) if rel else name, os.lstat(path)))
            dirnames.sort()
    return out


async def upload(
    drive: Drive,
    local: Path,
    remote: str,
    progress: Callable[[int, int], None] | None,
    skip_unchanged: bool,
) -> Stats:
    items = await trio.to_thread.run_sync(_scan_local, local)
    meter = _Meter(sum(st.st_size for _, st in items if stat.S_ISREG(st.st_mode)), progress)
    stats = Stats()
    xattrs = _Xattrs()
    dirs: list[tuple[str, os.stat_result]] = []
    dir_sources: list[Path] = []
    for rel, st in items:
        src = local / rel if rel else local
        dst = _join(remote, rel)
        if stat.S_ISDIR(st.st_mode):
            await drive.mkdir(dst, exist_ok=True)
            dirs.append((dst, st))
            dir_sources.append(src)
            stats.directories += 1
        elif stat.S_ISLNK(st.st_mode):
            target = await trio.to_thread.run_sync(os.readlink, src)
            await _replace_remote(drive, dst)
            await drive.symlink(target, dst)
            stats.symlinks += 1
        elif stat.S_ISREG(st.st_mode):
            if skip_unchanged and await _remote_unchanged(drive, dst, st):
                stats.skipped += 1
                meter.tick(st.st_size)
                continue
            stats.bytes += await _upload_file(drive, src, dst, meter)
            await _set_remote(drive, src, dst, st, xattrs)
            stats.files += 1
        else:
            stats.not_copied.append(str(src))
    for (dst, st), src in zip(reversed(dirs), reversed(dir_sources), strict=True):
        await _set_remote(drive, src, dst, st, xattrs)  # after their contents changed them
    return stats


class _Xattrs:
    """Whether the receiving side keeps extended attributes (asked once)."""

    def __init__(self) -> None:
        self.supported = True


def _user_xattrs(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("user.") and not n.startswith("user.megafs.")]


async def _set_remote(
    drive: Drive, src: Path, dst: str, st: os.stat_result, xattrs: _Xattrs
) -> None:
    await drive.chmod(dst, st.st_mode & 0o7777)
    if xattrs.supported:
        names = await trio.to_thread.run_sync(_local_xattr_names, src)
        for name in _user_xattrs(names):
            value = await trio.to_thread.run_sync(partial(os.getxattr, src, name))
            try:
                await drive.setxattr(dst, name, value)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                xattrs.supported = False
                break
    await drive.utime(dst, (st.st_atime_ns, st.st_mtime_ns))


def _local_xattr_names(path: Path) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            return []
        raise


async def _remote_unchanged(drive: Drive, dst: str, st: os.stat_result) -> bool:
    try:
        r = await drive.lstat(dst)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(r.st_mode) and _same(r.st_size, r.st_mtime_ns, st.st_size, st.st_mtime_ns)


async def _replace_remote(drive: Drive, dst: str) -> None:
    """Make room for a symbolic link: remove a non-directory at ``dst``."""
    try:
        r = await drive.lstat(dst)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(r.st_mode):
        await drive.remove(dst)


async def _upload_file(drive: Drive, src: Path, dst: str, meter: _Meter) -> int:
    sent = 0
    async with await trio.open_file(src, "rb") as lf, await drive.open(dst, "wb") as rf:
        while data := await lf.read(PIECE):
            await rf.write(data)
            sent += len(data)
            meter.tick(len(data))
    return sent


# ------------------------------------------------------------------ download


async def _scan_remote(drive: Drive, top: str) -> list[tuple[str, StatResult]]:
    out = [("", await drive.lstat(top))]
    if stat.S_ISDIR(out[0][1].st_mode):

        async def walk(rel: str) -> None:
            entries = sorted(await drive.scandir(_join(top, rel)), key=lambda e: e.name)
            for e in entries:
                child = f"{rel}/{e.name}" if rel else e.name
                out.append((child, e.stat))
                if e.is_dir():
                    await walk(child)

        await walk("")
    return out


async def download(
    drive: Drive,
    remote: str,
    local: Path,
    progress: Callable[[int, int], None] | None,
    skip_unchanged: bool,
) -> Stats:
    items = await _scan_remote(drive, remote)
    meter = _Meter(sum(st.st_size for _, st in items if stat.S_ISREG(st.st_mode)), progress)
    stats = Stats()
    xattrs = _Xattrs()
    dirs: list[tuple[Path, StatResult]] = []
    dir_sources: list[str] = []
    for rel, st in items:
        src = _join(remote, rel)
        dst = local / rel if rel else local
        if stat.S_ISDIR(st.st_mode):
            await trio.to_thread.run_sync(partial(dst.mkdir, exist_ok=True))
            dirs.append((dst, st))
            dir_sources.append(src)
            stats.directories += 1
        elif stat.S_ISLNK(st.st_mode):
            target = await drive.readlink(src)
            await trio.to_thread.run_sync(_symlink_local, target, dst)
            stats.symlinks += 1
        elif stat.S_ISREG(st.st_mode):
            if skip_unchanged and await trio.to_thread.run_sync(_local_unchanged, dst, st):
                stats.skipped += 1
                meter.tick(st.st_size)
                continue
            stats.bytes += await _download_file(drive, src, dst, meter)
            await _set_local(drive, src, dst, st, xattrs)
            stats.files += 1
        else:
            stats.not_copied.append(src)
    for (dst, st), src in zip(reversed(dirs), reversed(dir_sources), strict=True):
        await _set_local(drive, src, dst, st, xattrs)
    return stats


def _local_unchanged(dst: Path, st: StatResult) -> bool:
    try:
        mine = os.lstat(dst)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(mine.st_mode) and _same(
        mine.st_size, mine.st_mtime_ns, st.st_size, st.st_mtime_ns
    )


def _symlink_local(target: str, dst: Path) -> None:
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        dst.unlink()
    os.symlink(target, dst)


async def _set_local(drive: Drive, src: str, dst: Path, st: StatResult, xattrs: _Xattrs) -> None:
    await trio.to_thread.run_sync(os.chmod, dst, st.st_mode & 0o7777)
    if xattrs.supported:
        for name in _user_xattrs(await drive.listxattr(src)):
            value = await drive.getxattr(src, name)
            try:
                await trio.to_thread.run_sync(partial(os.setxattr, dst, name, value))
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                xattrs.supported = False
                break
    await trio.to_thread.run_sync(partial(os.utime, dst, ns=(st.st_atime_ns, st.st_mtime_ns)))


async def _download_file(drive: Drive, src: str, dst: Path, meter: _Meter) -> int:
    got = 0
    async with await drive.open(src, "rb") as rf, await trio.open_file(dst, "wb") as lf:
        while data := await rf.read(PIECE):
            await lf.write(data)
            got += len(data)
            meter.tick(len(data))
    return got
