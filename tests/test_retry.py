"""The shared retry policy's logging: an outage is a few warnings, not one per attempt."""

from __future__ import annotations

import logging

import pytest
import trio

from megafs.errors import StoreUnavailable
from megafs.stores import retry

FAST = retry.RetryPolicy(initial=0.001, max_delay=0.002, jitter=0.0)


async def _flaky(failures: int) -> str:
    left = failures

    async def op() -> str:
        nonlocal left
        if left:
            left -= 1
            raise StoreUnavailable("store unreachable")
        return "ok"

    return await retry.retrying(op, what="PUT c/x", policy=FAST)


def test_concurrent_retries_log_one_warning_and_count_the_rest(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retry, "_RETRY_LOG", retry._RetryLog())
    clock = [1000.0]
    monkeypatch.setattr(retry, "_now", lambda: clock[0])
    results: list[str] = []

    async def main() -> None:
        async def one() -> None:
            results.append(await _flaky(3))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)

    with caplog.at_level(logging.DEBUG, logger="megafs.stores.retry"):
        trio.run(main)
        assert results == ["ok"] * 20
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
        assert len(warnings) == 1 and len(debug) == 59
        assert "PUT c/x: store unreachable; retrying" in warnings[0].getMessage()

        caplog.clear()
        clock[0] += retry.WARN_EVERY
        trio.run(_flaky, 1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "(59 more retries in the last 10 s)" in warnings[0].getMessage()


def test_permanent_errors_are_not_retried_or_logged(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def op() -> None:
        nonlocal calls
        calls += 1
        raise PermissionError("denied")

    with caplog.at_level(logging.DEBUG, logger="megafs.stores.retry"):
        with pytest.raises(PermissionError):
            trio.run(lambda: retry.retrying(op, what="GET k", policy=FAST))
    assert calls == 1 and not caplog.records
