"""How pyfuse3's worker tasks take turns reading ``/dev/fuse``: one task switch less
per request.

pyfuse3 (3.x) runs a pool of worker tasks; each loops: wait until the device is
readable (the module's ``_wait_fuse_readable``), read one request, run its handler,
reply. Its stock wait hands a ``trio.Lock`` from worker to worker: while one worker
handles a request another already waits on the device, so every request also costs
a second task step (the lock handed over, the next worker registering with epoll)
and the lock's checkpoints. A program that waits for each reply before its next call
(``open``/``write``/``close`` in a loop, ``stat`` of every file of a tree, a
database's write-and-fsync) pays it on every request: py-spy put the lock at ~23%
of the daemon's time while creating 5,000 small files.

:func:`main` runs ``pyfuse3.main`` with this module's wait instead, which keeps the
task that just replied as the device's reader: the other workers stay parked and
one is woken only when a handler really suspends (awaits a store, a thread or a
lock; :func:`handler_suspends`, called by :mod:`megafs.fuse_ops`), so the device is
always read while a handler waits, as before.

Concurrency rules (everything runs on the trio thread):

- At most one task is in ``wait_readable`` on the device: the one that set
  ``_Loop.reading``; it clears it when that wait returns.
- A task returns True (pyfuse3 then reads a request) only when ``poll`` has just
  seen a request, or the connection's end, on the device, with no checkpoint in
  between; pyfuse3 reads before its next ``await``. No other task reads meanwhile,
  so a read never finds the device empty and never blocks the thread.
- Requests already queued are taken without going through trio's I/O loop, at most
  ``STREAK`` in a row; then the reader passes through ``wait_readable`` (a
  checkpoint), so the committer, uploads and timers still run under a flood.
  Within a streak, a reader that finds the device empty polls it for up to
  ``SPIN`` seconds before it sleeps (no checkpoint: the thread is held that long
  at most), because the next request of a program that waits for each reply
  comes a few microseconds later.
- The end: an unmount makes ``poll`` report an error on the device; a signal goes
  through :func:`terminate`. Either sets ``exiting`` and wakes every parked worker,
  which then returns False (pyfuse3 ends that worker); the reader that saw the
  error returns True, reads the end of the session, and pyfuse3 ends it.

When pyfuse3 lacks the hook (another major version) or the device cannot be found,
its own loop runs unchanged; :func:`handler_suspends` and :func:`terminate` work
with either.
"""

from __future__ import annotations

import logging
import os
import select
import time
from typing import Any

import pyfuse3
import trio

log = logging.getLogger(__name__)

#: Requests taken back to back from the device before the reader lets other tasks run.
STREAK = 8
#: How long the reader keeps polling an empty device before it sleeps in trio's I/O
#: wait (seconds). A program that waits for each reply before its next call sends
#: the next request a few microseconds after the reply; going to sleep and being
#: woken through epoll and trio's scheduler costs more than that, in time and CPU
#: (measured: 5,000 files created and synced 1.20-1.53 s -> 0.77-0.95 s, daemon CPU
#: down as much). At most this long per request when the device stays empty.
SPIN = 50e-6

_POLL_END = select.POLLERR | select.POLLHUP | select.POLLNVAL


class _Loop:
    """The state of one FUSE session's readers (see the module's rules)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN)
        self.reading = False
        self.exiting = False
        self.streak = 0
        self.parked = trio.lowlevel.ParkingLot()
        #: Requests handed to pyfuse3 to read (``fuse_requests`` in ``megafs status``).
        self.taken = 0

    def _ready(self) -> bool:
        """Whether the device has something to read now; sees the session's end."""
        events = self.poll.poll(0)
        if not events:
            return False
        if events[0][1] & _POLL_END:
            self.end()
        return True

    def _spin(self) -> bool:
        """Poll the device for up to ``SPIN`` seconds (no checkpoint: nothing else
        runs meanwhile); True as soon as it has something to read."""
        end = time.perf_counter() + SPIN
        while time.perf_counter() < end:
            if self._ready():
                return True
        return False

    def end(self) -> None:
        self.exiting = True
        self.parked.unpark_all()

    async def wait_readable(self) -> bool:
        while True:
            if self.exiting:
                return False
            if self.reading:
                await self.parked.park()
                continue
            if self.streak < STREAK and (self._ready() or self._spin()):
                self.streak += 1
                self.taken += 1
                return True
            self.streak = 0
            self.reading = True
            try:
                await trio.lowlevel.wait_readable(self.fd)
            except trio.ClosedResourceError:  # terminate(): the device is being closed
                self.end()
                return False
            finally:
                self.reading = False
            if self.exiting:
                return False
            if self._ready():
                self.taken += 1
                return True


_loop: _Loop | None = None


def _device_fd() -> int | None:
    """The process's one open ``/dev/fuse`` descriptor (pyfuse3 does not expose it)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


async def main(max_tasks: int = 64) -> None:
    """``pyfuse3.main`` with this module's reader hand-over (after ``pyfuse3.init``)."""
    global _loop
    fd = _device_fd()
    stock: Any = getattr(pyfuse3, "_wait_fuse_readable", None)
    if fd is None or stock is None or not pyfuse3.__version__.startswith("3."):
        log.debug("pyfuse3's own request loop in use")
        await pyfuse3.main(min_tasks=4, max_tasks=max_tasks)
        return
    _loop = _Loop(fd)
    pyfuse3._wait_fuse_readable = _loop.wait_readable  # type: ignore[attr-defined]
    try:
        await pyfuse3.main(min_tasks=4, max_tasks=max_tasks)
    finally:
        pyfuse3._wait_fuse_readable = stock  # type: ignore[attr-defined]
        _loop = None


def handler_suspends() -> None:
    """A request handler is about to wait: wake a parked worker to read the device
    meanwhile (the handler's task is the reader otherwise)."""
    if _loop is not None:
        _loop.parked.unpark()


def requests_taken() -> int | None:
    """Kernel requests read in the running session (None: not counted, pyfuse3's own
    loop runs)."""
    return _loop.taken if _loop is not None else None


def terminate() -> None:
    """End the FUSE main loop (``pyfuse3.terminate``, and wake the parked workers)."""
    if _loop is not None:
        _loop.end()
    pyfuse3.terminate()
