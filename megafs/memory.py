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

The mount daemon makes the opposite setting, :func:`keep_chunk_buffers`: its write
path allocates a chunk buffer per 4 MiB written, then the sealed chunk, and a fresh
mapping for each costs a page fault per 4 KiB (measured: a 1 GiB write ~35 % slower).
glibc's dynamic threshold alone does not avoid that: it trims the heap's top once
twice the largest freed block is free there, which a few chunk buffers freed together
exceed, and the next buffer faults its pages in again. So the daemon fixes the mmap
threshold above a chunk and lets 64 MiB stay free at the heap's top (measured: 1 GiB
of unique data written 3.5 -> 3.0 s, page faults 150 -> 20 per MiB, system time
halved; peak RSS of that write 110-116 -> 117-120 MB, of the whole benchmark suite
150 MB). Two arenas instead of up to eight per core keep it from holding freed
memory in a dozen heaps (1 GiB written and read back: peak RSS 176 -> 132-143 MB, no
slower); the GIL serialises the threads that would contend for an arena anyway.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Final

M_TRIM_THRESHOLD: Final = -1  # glibc's mallopt parameters
M_MMAP_THRESHOLD: Final = -3
M_ARENA_MAX: Final = -8
MMAP_THRESHOLD: Final = 256 << 10
#: The daemon's settings (keep_chunk_buffers): above a 4 MiB chunk and its seal's
#: overhead; what may stay free at the top of a heap.
DAEMON_MMAP_THRESHOLD: Final = 8 << 20
DAEMON_TRIM_THRESHOLD: Final = 64 << 20

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


def keep_chunk_buffers(arenas: int = 2) -> bool:
    """The mount daemon's allocator settings (glibc only; see the module docstring):
    chunk-sized blocks come from the heap and are reused, at most ``arenas`` arenas.
    Call before threads start. True if all three settings are in force."""
    results = [
        _mallopt(M_ARENA_MAX, arenas),
        _mallopt(M_MMAP_THRESHOLD, DAEMON_MMAP_THRESHOLD),
        _mallopt(M_TRIM_THRESHOLD, DAEMON_TRIM_THRESHOLD),
    ]
    return all(results)


def status_fields() -> dict[str, int | None]:
    """The status document's memory fields: this process's resident size now and its
    peak (bytes; /proc's VmRSS and VmHWM), each None where the system does not tell."""
    found: dict[bytes, int] = {}
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                name, _, value = line.partition(b":")
                if name in (b"VmRSS", b"VmHWM"):
                    found[name] = int(value.split()[0]) * 1024  # (kB)
    except (OSError, ValueError, IndexError):
        pass
    return {"rss_bytes": found.get(b"VmRSS"), "peak_rss_bytes": found.get(b"VmHWM")}
