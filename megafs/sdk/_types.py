"""Plain data the SDK returns: file status and directory entries."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Final, final

from megafs.vfs.fs import StatFs
from megafs.vfs.node import Attr

#: A path inside a drive: ``"dir/file"``, ``"/dir/file"`` (the same), bytes, or a
#: :class:`pathlib.PurePosixPath`. ``""`` and ``"/"`` are the drive's root.
PathArg = str | bytes | os.PathLike[str]

NS: Final = 1_000_000_000


@final
@dataclass(frozen=True)
class StatResult:
    """The status of one file, with the fields of :func:`os.stat_result`."""

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
    def _of(cls, a: Attr) -> StatResult:
        return cls(
            a.mode,
            a.ino,
            a.nlink,
            a.uid,
            a.gid,
            a.rdev,
            a.size,
            a.blocks,
            a.atime_ns,
            a.mtime_ns,
            a.ctime_ns,
        )

    @property
    def st_atime(self) -> float:
        return self.st_atime_ns / NS

    @property
    def st_mtime(self) -> float:
        return self.st_mtime_ns / NS

    @property
    def st_ctime(self) -> float:
        return self.st_ctime_ns / NS


@final
@dataclass(frozen=True)
class DirEntry:
    """One entry of a directory listing, with its full status (no further round trip).

    ``stat`` describes the entry itself: a symbolic link's status, not its target's
    (as :func:`os.lstat`); so do :meth:`is_dir` and :meth:`is_file`."""

    name: str
    path: str  # from the drive's root, starting with "/"
    stat: StatResult

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.stat.st_mode)

    def is_file(self) -> bool:
        return stat.S_ISREG(self.stat.st_mode)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.stat.st_mode)


@final
@dataclass(frozen=True)
class StatVfsResult:
    """The drive's size and limits, with the fields of :func:`os.statvfs_result` (as a
    mount's ``statvfs`` shows them: a volume on a local store reports that disk's
    space, on a remote store nominal sizes; a MEGA account, its storage quota)."""

    f_bsize: int
    f_frsize: int
    f_blocks: int
    f_bfree: int
    f_bavail: int
    f_files: int
    f_ffree: int
    f_favail: int
    f_namemax: int

    @classmethod
    def _of(cls, s: StatFs) -> StatVfsResult:
        bs = s.block_size
        return cls(
            bs,
            bs,
            s.blocks,
            s.blocks_free,
            s.blocks_free,
            s.files,
            s.files_free,
            s.files_free,
            s.name_max,
        )
