"""Process exit codes of the megafs commands (one table, never inline numbers)."""

from typing import Final

from megafs.errors import MegafsError, NotAVolume, StoreError, VolumeError, WrongPassphrase

OK: Final = 0
ERROR: Final = 1  # any failure with a one-line message
USAGE: Final = 2  # bad command line (argparse uses 2 as well)
WRONG_PASSPHRASE: Final = 3
NOT_A_VOLUME: Final = 4
STORE_ERROR: Final = 5
MOUNTPOINT_ERROR: Final = 6
INTERRUPTED: Final = 130


def for_error(exc: MegafsError) -> int:
    """The exit code for a failure."""
    if isinstance(exc, WrongPassphrase):
        return WRONG_PASSPHRASE
    if isinstance(exc, NotAVolume | VolumeError):
        return NOT_A_VOLUME
    if isinstance(exc, StoreError):
        return STORE_ERROR
    # MountError and UsageError carry their own code.
    return int(getattr(exc, "exit_code", ERROR))
