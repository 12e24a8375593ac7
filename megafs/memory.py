"""Keeping a megafs process's memory in line with what it actually holds.

Data moves through megafs in pieces of about a mebibyte (file pieces, chunks being
sealed or opened), allocated in trio's worker threads as often as in the main thread.
glibc's allocator serves such a piece from the heap of the thread's arena once it has
seen a piece that size freed (its mmap threshold grows with the largest freed block,
up to 32 MiB), and freed heap memory in a dozen arenas is rarely given back: a 1 GiB
transfer that never holds more than a few pieces at once grew a process to 270 MiB.
:func:`return_large_buffers` fixes the threshold instead, so every large piece is its
own mapping and goes back to the system as soon as it is freed (measured: the same
transfer peaks near 110 MiB and takes as long; a little more of it is system time).

The setting is per process: the SDK makes it when a drive is opened. It changes
nothing but where large blocks come from. Other C libraries: nothing to do.

The mount daemon makes a milder setting instead, :func:`limit_arenas`: its write path
allocates a chunk buffer per 4 MiB written, and a fresh mapping for each costs a page
fault per 4 KiB (measured: a 1 GiB write ~35 % slower). Two arenas instead of up to
eight per core keep it from holding freed memory in a dozen heaps (1 GiB written and
read back: peak RSS 176 -> 132-143 MB, no slower); the GIL serialises the threads that would
contend for an arena anyway.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Final

M_MMAP_THRESHOLD: Final = -3  # glibc's mallopt parameters
M_ARENA_MAX: Final = -8
MMAP_THRESHOLD: Final = 256 << 10

_set = False


def return_large_buffers() -> bool:
    """Serve allocations of ``MMAP_THRESHOLD`` bytes or more with their own mapping,
    given back when freed (glibc only; idempotent). True if the setting is in force."""
    global _set
    if _set:
        return True
    _set = _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return _set


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(param, value))


def limit_arenas(count: int = 2) -> bool:
    """Use at most ``count`` malloc arenas (glibc only). Call before threads start.
    True if the setting is in force."""
    return _mallopt(M_ARENA_MAX, count)
