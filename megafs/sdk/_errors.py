"""The SDK's exceptions: the megafs tree, shaped the way Python users expect.

A refusal of a path operation is an :class:`~megafs.errors.FsError` inside megafs.
At the SDK's boundary it becomes a :class:`PathError`, which is *both* an ``FsError``
(so ``except megafs.errors.MegafsError`` catches it) and an ``OSError`` with
``errno``, ``strerror`` and ``filename`` (so ``except FileNotFoundError`` does)::

    MegafsError
    └── FsError
        └── PathError (also OSError)            any other errno: ENOTEMPTY, EROFS, ...
            ├── NotFound (FileNotFoundError)    ENOENT
            ├── AlreadyExists (FileExistsError) EEXIST
            ├── IsADirectory (IsADirectoryError) EISDIR
            ├── NotADirectory (NotADirectoryError) ENOTDIR
            └── PermissionDenied (PermissionError) EACCES, EPERM

Other megafs errors pass through unchanged: ``WrongPassphrase``, ``NotAVolume``,
``LeaseHeld``, ``IntegrityError`` (a stored object failed authentication),
``StoreError`` (the store failed; ``NoSpace`` when a local disk is full).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from typing import Final

from megafs.errors import FsError

# FsError.errno is an int, OSError's "int | None": always an int here (mypy cannot
# tell, hence the ignores on the classes that join the two).


class PathError(FsError, OSError):  # type: ignore[misc]
    """A path operation was refused; ``errno`` says why, ``filename`` names the path
    (``filename2`` the second path of a rename or link)."""

    def __init__(
        self,
        err: int,
        strerror: str = "",
        filename: str | None = None,
        filename2: str | None = None,
    ) -> None:
        OSError.__init__(self, err, strerror or os.strerror(err), filename, None, filename2)


class NotFound(PathError, FileNotFoundError):  # type: ignore[misc]
    """No such file or directory (ENOENT)."""


class AlreadyExists(PathError, FileExistsError):  # type: ignore[misc]
    """The path exists already (EEXIST)."""


class IsADirectory(PathError, IsADirectoryError):  # type: ignore[misc]
    """A directory where a file was expected (EISDIR)."""


class NotADirectory(PathError, NotADirectoryError):  # type: ignore[misc]
    """A file where a directory was expected (ENOTDIR)."""


class PermissionDenied(PathError, PermissionError):  # type: ignore[misc]
    """Not permitted (EACCES, EPERM)."""


_CLASSES: Final[dict[int, type[PathError]]] = {
    errno.ENOENT: NotFound,
    errno.EEXIST: AlreadyExists,
    errno.EISDIR: IsADirectory,
    errno.ENOTDIR: NotADirectory,
    errno.EACCES: PermissionDenied,
    errno.EPERM: PermissionDenied,
}


def path_error(err: int, path: str | None, path2: str | None = None, detail: str = "") -> PathError:
    """The exception for errno ``err`` on ``path``."""
    text = os.strerror(err)
    if detail and detail != errno.errorcode.get(err):
        text = f"{text} ({detail})"
    return _CLASSES.get(err, PathError)(err, text, path, path2)


@contextlib.contextmanager
def mapped(path: str | None, path2: str | None = None) -> Iterator[None]:
    """Turn an ``FsError`` raised inside into the :class:`PathError` for ``path``."""
    try:
        yield
    except PathError:
        raise
    except FsError as exc:
        raise path_error(exc.errno, path, path2, str(exc)) from None
