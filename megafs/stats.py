"""Small counters behind ``megafs status``: an upload-rate meter and an error log.

Pure bookkeeping (no I/O, no trio), shared by the volume mount and MEGA mounts.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Final, final

RATE_WINDOW: Final = 10.0


@final
class RateMeter:
    """Bytes per second over the last ``window`` seconds.

    :meth:`add` counts bytes as they complete. :meth:`busy` marks that a transfer
    started: a burst that began less than ``window`` seconds ago is averaged over its
    own length, so the rate is right from the first completed transfer instead of
    climbing for ``window`` seconds."""

    def __init__(
        self, window: float = RATE_WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self._clock = clock
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._sum = 0
        self._busy_since: float | None = None
        self._last_activity = float("-inf")

    def busy(self) -> None:
        now = self._clock()
        if now - self._last_activity > self.window:
            self._busy_since = now  # a new burst after an idle window
        self._last_activity = now

    def add(self, nbytes: int) -> None:
        now = self._clock()
        if self._busy_since is None or now - self._last_activity > self.window:
            self._busy_since = now
        self._last_activity = now
        self._events.append((now, nbytes))
        self._sum += nbytes
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._sum -= self._events.popleft()[1]

    def rate(self) -> float:
        now = self._clock()
        self._trim(now)
        if not self._events or self._busy_since is None:
            return 0.0
        span = min(self.window, now - self._busy_since)
        return self._sum / max(span, 0.1)


@final
class ErrorLog:
    """The last error of something (a store, the uploads) and when it happened.

    ``last`` / ``time`` (Unix time) are kept until a newer error replaces them, never
    cleared by later successes; ``count`` counts every error of the mount, and
    ``recovered`` says whether something succeeded after the last error."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.last: str | None = None
        self.time: float | None = None
        self.count = 0
        self.ok_time: float | None = None

    def error(self, message: str) -> None:
        self.last = message
        self.time = self._clock()
        self.count += 1

    def ok(self) -> None:
        if self.last is not None:  # only needed to tell whether the error is over
            self.ok_time = self._clock()

    @property
    def recovered(self) -> bool:
        return self.time is not None and self.ok_time is not None and self.ok_time >= self.time


def hit_rate(hits: int, misses: int) -> float | None:
    """The share of lookups that were hits (None before the first lookup)."""
    total = hits + misses
    return round(hits / total, 4) if total else None
