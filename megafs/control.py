"""What the command line needs to talk to a running mount, and nothing heavier:
``megafs status`` and ``megafs umount`` import only this (and the standard library),
so they start in a few tens of milliseconds (importing the mount code, trio and the
stores took ~0.5 s, which every ``status --wait-idle`` paid)."""

from __future__ import annotations

import os
from pathlib import Path

from megafs import exitcodes
from megafs.errors import MegafsError

PID_XATTR = b"user.megafs.pid"
STATUS_XATTR = b"user.megafs.status"
# The status document too, and a request to upload what waits at once instead of when
# writes pause (StagingStore.upload_now): read by `megafs status --wait-idle` and
# `megafs umount` while they wait.
WAIT_XATTR = b"user.megafs.status.wait"


class OpenError(MegafsError):
    """The volume cannot be opened here: the store does not exist, or its local state
    is in use by another process."""

    exit_code = exitcodes.MOUNTPOINT_ERROR


class MountError(OpenError):
    """The mountpoint cannot be used."""

    exit_code = exitcodes.MOUNTPOINT_ERROR


def mounted_at(path: Path, resolved: bool = False) -> bool:
    """Whether something is mounted exactly at ``path`` (from /proc/self/mountinfo).

    ``resolved``: ``path`` is already absolute and free of symlinks, so it is not
    looked at. The daemon must say so for its own mountpoint once its request loop
    has ended: resolving the path stats the mount's root, a request nobody would
    answer (the daemon hung there on SIGTERM)."""
    target = str(path) if resolved else os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    return True
    except OSError:
        return os.path.ismount(target)
    return False


def _unescape(s: str) -> str:
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        s = s.replace(code, ch)
    return s
