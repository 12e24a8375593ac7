"""The one megafs exception tree, and the one table that maps it to errno.

::

    MegafsError
    ├── StoreError                  an object store failed
    │   ├── ObjectNotFound          the key does not exist
    │   ├── PreconditionFailed      a conditional put lost (If-None-Match / If-Match)
    │   ├── NoSpace                 a local disk (store, staging area) is full -> ENOSPC
    │   └── StoreUnavailable        unreachable, timed out, throttled: may succeed later
    ├── VolumeError                 a volume cannot be opened
    │   ├── NotAVolume              no header / not a megafs header
    │   ├── CorruptHeader           the header is damaged
    │   ├── UnsupportedFormat       the header names a format version we do not know
    │   └── WrongPassphrase         the passphrase does not unwrap the master key
    ├── IntegrityError              an object failed authentication, was swapped,
    │                               truncated, or replayed (older version) -> EIO
    └── FsError                     a POSIX-level refusal carrying its errno
                                    (ENOENT, EEXIST, ENOTEMPTY, ENAMETOOLONG, ...)

Lower layers raise these; only :func:`errno_for` (used by the FUSE adapter) turns
them into errno values. Foreign exceptions (OSError from a store, ``InvalidTag`` from
the AEAD) are translated where they happen.
"""

from __future__ import annotations

import errno as _errno


class MegafsError(Exception):
    """Base of every error megafs raises on purpose."""


class StoreError(MegafsError):
    """An object store operation failed."""


class ObjectNotFound(StoreError):
    """The object does not exist."""


class PreconditionFailed(StoreError):
    """A conditional write was refused because the precondition did not hold."""


class NoSpace(StoreError):
    """A local disk (a local store or the staging area) is full."""


class StoreUnavailable(StoreError):
    """The store could not be reached or refused for now (transient)."""


class VolumeError(MegafsError):
    """A volume cannot be opened or created."""


class NotAVolume(VolumeError):
    """The store holds no megafs volume header."""


class CorruptHeader(VolumeError):
    """The volume header is damaged."""


class UnsupportedFormat(VolumeError):
    """The volume uses a format version this megafs does not understand."""


class WrongPassphrase(VolumeError):
    """The passphrase does not unlock the volume."""


class IntegrityError(MegafsError):
    """A stored object failed authentication, or is older than one already seen."""


class FsError(MegafsError):
    """A filesystem-level refusal with a POSIX errno (ENOENT, EEXIST, ...)."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(err, str(err)))
        self.errno = err


def errno_for(exc: BaseException) -> int:
    """The errno a filesystem caller should see for ``exc`` (EIO when unknown)."""
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, NoSpace):
        return _errno.ENOSPC
    if isinstance(exc, ObjectNotFound):
        # A referenced object that vanished is damage, not "no such file".
        return _errno.EIO
    if isinstance(exc, IntegrityError):
        return _errno.EIO
    if isinstance(exc, StoreUnavailable):
        return _errno.EIO
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    return _errno.EIO
