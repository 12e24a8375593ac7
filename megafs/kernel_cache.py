"""Dropping what the kernel caches for a FUSE mount (entries, attributes, pages), for
changes the kernel did not make itself: another MEGA client's, another machine's.

The drive and vfs layers know nothing of FUSE; they call an ``invalidate`` callback, and
the mount code hands them :func:`invalidate` (this module is its only FUSE dependency).
"""

from __future__ import annotations

import pyfuse3
import trio


async def invalidate(items: list[tuple[int, bytes | None]]) -> None:
    """``(ino, None)`` drops the inode's attributes and pages; ``(parent, name)`` drops
    the entry. Runs in a thread: these calls block until the kernel is done, which may
    need a request this very process serves."""
    if not items:
        return

    def run() -> None:
        for ino, name in items:
            try:
                if name is None:
                    pyfuse3.invalidate_inode(ino)
                else:
                    pyfuse3.invalidate_entry(ino, name)
            except OSError:
                pass  # not known to the kernel: nothing to drop

    await trio.to_thread.run_sync(run)
