"""Retrying transient failures: one policy for every remote store (and the MEGA client).

A :class:`RetryPolicy` says how long and how often; a :class:`Backoff` is the state of one
operation under it; :func:`retrying` runs an operation until it succeeds, fails with a
permanent error, or the policy runs out. Transient failures are the ones a store reports
as :class:`~megafs.errors.StoreUnavailable` (timeouts, resets, 5xx, 429, SlowDown...).

A caller that wants to see each failure as it is retried (not only the last one, up to
``max_total`` later), e.g. to show it in ``megafs status``, sets :data:`retry_observer`
for the tasks that call the store: trio tasks inherit it from the task that starts them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Final, TypeVar, final

import trio

from megafs.errors import StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a transient failure is retried.

    Delays start at ``initial`` seconds and grow by ``multiplier`` up to ``max_delay``;
    each is scaled by a random factor in ``[1 - jitter, 1]``. Retrying stops when the
    next sleep would end more than ``max_total`` seconds after the first attempt, or
    after ``max_attempts`` attempts if that is set. The default ``max_delay`` means a
    store that comes back after an outage is used again within 5 s (2.5-5 s with
    the jitter): a few requests per second while it is away, from the handful of
    uploads and reads that retry at once.
    """

    initial: float = 0.25
    max_delay: float = 5.0
    max_total: float = 120.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None


DEFAULT_POLICY: Final = RetryPolicy()

#: Called with every transient failure :func:`retrying` is about to retry, in the task
#: that retries it (see the module docstring). Must not block or raise.
retry_observer: ContextVar[Callable[[BaseException], None] | None] = ContextVar(
    "retry_observer", default=None
)


@final
class Backoff:
    """The retry state of one operation under a :class:`RetryPolicy`."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.attempts = 0
        self._start = trio.current_time()

    @property
    def elapsed(self) -> float:
        """Seconds since this operation's first attempt."""
        return trio.current_time() - self._start

    def next_delay(self) -> float | None:
        """Count a failed attempt; the sleep before the next one, or None to give up."""
        p = self.policy
        self.attempts += 1
        if p.max_attempts is not None and self.attempts >= p.max_attempts:
            return None
        base = min(p.max_delay, p.initial * p.multiplier ** (self.attempts - 1))
        delay = base * random.uniform(1.0 - p.jitter, 1.0)
        if self.elapsed + delay > p.max_total:
            return None
        return delay

    def exhausted(self, err: E) -> E:
        """Annotate ``err`` (the last failure) with how long we tried; returns it."""
        first = str(err.args[0]) if err.args else type(err).__name__
        err.args = (f"{first}; gave up after {self.attempts} attempts in {self.elapsed:.1f} s",)
        return err


WARN_EVERY: Final = 10.0
_now = time.monotonic  # patched by tests


@final
class _RetryLog:
    """Keeps a store outage to a few log lines: every upload, read and lease renewal
    retries on its own, so during a 30 s outage dozens of operations fail at once.
    The first retry after a quiet period is a warning; further retries within
    ``WARN_EVERY`` seconds go to debug and are counted in the next warning.
    No ``await`` inside; two event loops in two threads (the SDK's sync wrapper) may
    race on the counters, which can only misplace a count in a log line, so no lock."""

    def __init__(self) -> None:
        self._last_warning = -WARN_EVERY
        self._quiet = 0

    def retrying(self, what: str, exc: BaseException, delay: float, attempt: int) -> None:
        now = _now()
        if now - self._last_warning < WARN_EVERY:
            self._quiet += 1
            log.debug("%s: %s; retrying in %.2f s (attempt %d)", what, exc, delay, attempt)
            return
        more = (
            f" ({self._quiet} more retries in the last {WARN_EVERY:.0f} s)" if self._quiet else ""
        )
        self._last_warning, self._quiet = now, 0
        log.warning("%s: %s; retrying in %.2f s (attempt %d)%s", what, exc, delay, attempt, more)


_RETRY_LOG: Final = _RetryLog()


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    policy: RetryPolicy = DEFAULT_POLICY,
    transient: Callable[[BaseException], bool] = lambda exc: isinstance(exc, StoreUnavailable),
) -> T:
    """``await op()`` until it succeeds; transient failures are retried under ``policy``
    (logged through :data:`_RETRY_LOG`: a warning naming ``what`` at most every
    ``WARN_EVERY`` seconds, the rest at debug level), anything else is raised at once. When the
    policy runs out, the last failure is raised, saying how long it was tried."""
    backoff = Backoff(policy)
    while True:
        try:
            return await op()
        except Exception as exc:
            if not transient(exc):
                raise
            delay = backoff.next_delay()
            if delay is None:
                raise backoff.exhausted(exc) from None
            if (observe := retry_observer.get()) is not None:
                observe(exc)
            _RETRY_LOG.retrying(what, exc, delay, backoff.attempts)
            await trio.sleep(delay)
