"""The MEGA API channel: ``POST /cs`` JSON command batches and the ``sc`` event poll.

One :class:`MegaApi` per account connection. It owns the request ``id`` counter, the
session id once logged in (``api.sid``), and the per-process client tag
(``api.client_tag``, the ``i`` argument callers put on ``p``/``m``/``d``/``a`` so
they can recognise their own action packets).

Retry rules (mega-protocol.md §2.5/§2.6):

* A request-level failure -- a bare ``-3``/``-4`` (or ``{"err": -3}``) body, HTTP
  500/502/503/504/429/509, a dropped connection, a timeout or a truncated body -- means
  nothing ran; the *same* request (same ``id``) is sent again after a jittered
  exponential backoff (:class:`RetryPolicy`). When the policy's time budget is spent,
  the last error is raised: :class:`~megafs.mega.errors.MegaTryAgain` /
  :class:`~megafs.mega.errors.MegaRateLimited` or a
  :class:`~megafs.mega.errors.MegaNetworkError`, each with a one-line message.
* A command-level ``-3``/``-4`` inside a batch: only the commands that got it are sent
  again (a fresh request with a new ``id``; the others already ran).
* HTTP 402 with ``X-Hashcash: 1:<easiness>:<ts>:<token>``: the proof of work is
  solved in a worker thread (cancellable) and the same request is re-sent with
  ``X-Hashcash: 1:<token>:<cash>``.

Logging: retries are WARNINGs naming the command(s) and the error code, never the
session id, keys or arguments; any text that could hold a URL goes through
:func:`redact`. httpx's own request log lines are filtered the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import string
import threading
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from types import TracebackType
from typing import Any, Final, final

import httpx
import trio

from megafs.mega import crypto
from megafs.mega.errors import (
    MegaError,
    MegaNetworkError,
    MegaRateLimited,
    MegaSessionExpired,
    MegaTryAgain,
    mega_error,
)
from megafs.stores import http as _http
from megafs.stores.retry import Backoff as Backoff
from megafs.stores.retry import RetryPolicy as RetryPolicy

log = logging.getLogger(__name__)

DEFAULT_API_URL: Final = "https://g.api.mega.co.nz"
API_URL_ENV: Final = "MEGAFS_MEGA_API_URL"

# HTTP statuses that mean "busy / broken for a moment, nothing was done: resend".
RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504, 509})

_SID_RE: Final = re.compile(r"(sid=)[^&\s\"'#]+")
_TAG_ALPHABET: Final = string.ascii_letters + string.digits
_ID_ALPHABET: Final = string.ascii_lowercase
_ID_WIDTH: Final = 10
_MAX_HASHCASH_ROUNDS: Final = 5


def redact(text: str) -> str:
    """``text`` with every ``sid=...`` query value replaced by ``sid=<redacted>``."""
    return _SID_RE.sub(r"\1<redacted>", text)


class _RedactSidFilter(logging.Filter):
    """Scrubs session ids out of httpx's "HTTP Request: POST <url>" log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(str(a)) if "sid=" in str(a) else a for a in record.args)
        return True


def _install_log_filter() -> None:
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactSidFilter) for f in logger.filters):
            logger.addFilter(_RedactSidFilter())


def _command_names(cmds: Sequence[dict[str, Any]]) -> str:
    names = [str(c.get("a", "?")) for c in cmds]
    if len(names) > 4:
        return ",".join(names[:4]) + f",... ({len(names)} commands)"
    return ",".join(names)


def _as_error(value: Any, command: str | None) -> MegaError | None:
    """The error a command result stands for, or None if it is a real result."""
    if type(value) is int and value < 0:
        return mega_error(value, command=command)
    if isinstance(value, dict) and type(value.get("err")) is int and value["err"] < 0:
        return mega_error(value["err"], command=command)
    return None


def _is_retryable(err: MegaError) -> bool:
    return isinstance(err, MegaTryAgain | MegaRateLimited | MegaNetworkError)


def parse_hashcash_challenge(header: str) -> tuple[int, str]:
    """``"1:<easiness>:<ts>:<token>"`` -> ``(easiness, token)``; MegaError if malformed."""
    parts = header.strip().split(":")
    if len(parts) != 4 or parts[0] != "1":
        raise MegaError(detail=f"unsupported hashcash challenge version {parts[0]!r}")
    try:
        easiness = int(parts[1])
    except ValueError:
        raise MegaError(detail="malformed hashcash challenge") from None
    if not 0 <= easiness <= 255 or not parts[3]:
        raise MegaError(detail="malformed hashcash challenge")
    return easiness, parts[3]


@final
class MegaApi:
    """A connection to MEGA's API server (``cs`` commands and ``sc`` events).

    ``base_url`` defaults to ``$MEGAFS_MEGA_API_URL`` or ``https://g.api.mega.co.nz``.
    Pass ``client`` to share an :class:`httpx.AsyncClient` (it is then not closed by
    :meth:`aclose`). Safe to use from several trio tasks at once.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        client: httpx.AsyncClient | None = None,
        timeout: float = 60.0,
        wait_timeout: float = 300.0,
        hashcash_workers: int = 1,
    ) -> None:
        self.base_url = (base_url or os.environ.get(API_URL_ENV) or DEFAULT_API_URL).rstrip("/")
        self.retry = retry or RetryPolicy()
        self.sid: str | None = None
        self.hashcash_workers = hashcash_workers
        self._wait_timeout = wait_timeout
        self._own_client = client is None
        self._client = client or _http.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 20.0)),
            headers={"User-Agent": "megafs"},
        )
        self._seq = secrets.randbelow(len(_ID_ALPHABET) ** _ID_WIDTH)
        self._client_tag = "".join(secrets.choice(_TAG_ALPHABET) for _ in range(10))
        #: Set by a long-lived user (a mount): logs in again when the server says the
        #: session expired (ESID). It must set :attr:`sid`; it runs with ``sid`` None.
        self.renew_session: Callable[[], Awaitable[None]] | None = None
        self._renew_lock = trio.Lock()
        self._renewing: trio.lowlevel.Task | None = None  # the task logging in again
        _install_log_filter()

    @property
    def client_tag(self) -> str:
        """This process's 10-character ``i`` tag for ``p``/``m``/``d``/``a``/``l``."""
        return self._client_tag

    @property
    def http(self) -> httpx.AsyncClient:
        """The underlying HTTP client (callers may reuse it for storage servers)."""
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> MegaApi:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def renew(self, expired_sid: str | None) -> bool:
        """The server answered ESID to a request made with ``expired_sid``: get a new session
        through :attr:`renew_session`. True if there is a new sid to retry with.

        Many tasks may see the same ESID at once: the lock makes the first one log in and
        the others find ``sid`` already changed. Requests made while renewing run with
        ``sid`` None, so an ESID during the login itself is not renewed again."""
        if self.renew_session is None or expired_sid is None:
            return False
        async with self._renew_lock:
            if self.sid != expired_sid:
                return self.sid is not None
            log.warning("MEGA session expired or was ended elsewhere; logging in again")
            self.sid = None
            self._renewing = trio.lowlevel.current_task()
            try:
                await self.renew_session()
            except BaseException:
                self.sid = None
                raise
            finally:
                self._renewing = None
            return self.sid is not None

    async def _after_renewal(self) -> None:
        """Requests of other tasks wait while one task logs in again: sent meanwhile they
        would carry no session id. (The renewing task's own requests - the login - go on.)"""
        task = self._renewing
        if task is not None and task is not trio.lowlevel.current_task():
            async with self._renew_lock:
                pass

    # -- commands ------------------------------------------------------------------------

    async def call(self, cmd: dict[str, Any], *, retry: RetryPolicy | None = None) -> Any:
        """Run one command and return its result; raise its MegaError on failure."""
        result = (await self.batch([cmd], retry=retry))[0]
        if isinstance(result, MegaError):
            raise result
        return result

    async def batch(
        self, cmds: Sequence[dict[str, Any]], *, retry: RetryPolicy | None = None
    ) -> list[Any]:
        """Run commands in one request; results by position, failures as MegaError.

        A request-level error is raised (nothing ran). Commands answered ``-3``/``-4``
        are sent again until the retry policy runs out; then their entry is the error.
        """
        if not cmds:
            return []
        backoff = Backoff(retry or self.retry)
        results: list[Any] = [None] * len(cmds)
        pending = list(range(len(cmds)))
        renewed = False
        while True:
            sent = [cmds[i] for i in pending]
            await self._after_renewal()
            sid = self.sid
            try:
                reply = await self._cs(sent, backoff)
            except MegaSessionExpired:
                if renewed or not await self.renew(sid):
                    raise
                renewed = True
                continue
            again: list[int] = []
            last: MegaError | None = None
            for i, value in zip(pending, reply, strict=True):
                err = _as_error(value, str(cmds[i].get("a", "?")))
                if err is not None and _is_retryable(err):
                    again.append(i)
                    last = err
                results[i] = err if err is not None else value
            if not again or last is None:
                return results
            delay = backoff.next_delay()
            if delay is None:
                for i in again:
                    backoff.exhausted(results[i])
                return results
            log.warning(
                "MEGA %s: %s; retrying in %.2f s (attempt %d)",
                _command_names([cmds[i] for i in again]),
                f"{last.code} {type(last).__name__}",
                delay,
                backoff.attempts,
            )
            await trio.sleep(delay)
            pending = again

    async def _cs(self, cmds: list[dict[str, Any]], backoff: Backoff) -> list[Any]:
        """POST one command array (retrying request-level failures with the same id)."""
        params = {"id": self._next_id()}
        reply = await self._post("cs", json.dumps(cmds).encode(), params, backoff, cmds)
        if not isinstance(reply, list) or len(reply) != len(cmds):
            raise MegaError(
                detail=f"malformed response to {len(cmds)} command(s)",
                command=_command_names(cmds),
            )
        return reply

    def _next_id(self) -> str:
        n = self._seq
        self._seq = (self._seq + 1) % len(_ID_ALPHABET) ** _ID_WIDTH
        chars = []
        for _ in range(_ID_WIDTH):
            n, r = divmod(n, len(_ID_ALPHABET))
            chars.append(_ID_ALPHABET[r])
        return "".join(reversed(chars))

    # -- transport -----------------------------------------------------------------------

    async def _post(
        self,
        path: str,
        body: bytes,
        params: dict[str, str],
        backoff: Backoff,
        cmds: Sequence[dict[str, Any]],
    ) -> Any:
        """POST to ``{base}/{path}`` until a non-error JSON answer arrives.

        Bare error numbers that are not transient are raised as MegaError.
        """
        what = _command_names(cmds) if cmds else path
        url = f"{self.base_url}/{path}"
        headers = {"Content-Type": "application/json"}
        hashcash_rounds = 0
        while True:
            query = dict(params)
            if self.sid is not None:
                query["sid"] = self.sid
            err: MegaError
            try:
                resp = await self._client.post(url, params=query, content=body, headers=headers)
            except httpx.TransportError as exc:
                err = MegaNetworkError(detail=_describe_exc(exc), command=what)
            else:
                headers.pop("X-Hashcash", None)
                challenge = resp.headers.get("X-Hashcash")
                if resp.status_code == 402 and challenge:
                    hashcash_rounds += 1
                    if hashcash_rounds > _MAX_HASHCASH_ROUNDS:
                        raise MegaError(
                            detail="server keeps asking for proof of work", command=what
                        )
                    headers["X-Hashcash"] = await self._solve_hashcash(challenge, what)
                    continue
                if resp.status_code in RETRY_STATUSES:
                    err = MegaNetworkError(detail=f"HTTP {resp.status_code}", command=what)
                elif resp.status_code != 200:
                    raise MegaError(
                        detail=f"unexpected HTTP status {resp.status_code}", command=what
                    )
                else:
                    try:
                        reply = json.loads(resp.content)
                    except ValueError:
                        err = MegaNetworkError(
                            detail="malformed or truncated response", command=what
                        )
                    else:
                        request_err = _as_error(reply, what)
                        if request_err is None:
                            return reply
                        if not _is_retryable(request_err):
                            raise request_err
                        err = request_err
            delay = backoff.next_delay()
            if delay is None:
                raise backoff.exhausted(err)
            log.warning(
                "MEGA %s: %s; retrying in %.2f s (attempt %d)",
                what,
                redact(str(err)),
                delay,
                backoff.attempts,
            )
            await trio.sleep(delay)

    async def _solve_hashcash(self, challenge: str, what: str) -> str:
        easiness, token = parse_hashcash_challenge(challenge)
        log.warning("MEGA %s: server asks for proof of work (easiness %d); solving", what, easiness)
        cancelled = threading.Event()
        try:
            cash = await trio.to_thread.run_sync(
                partial(
                    crypto.solve_hashcash,
                    token,
                    easiness,
                    workers=self.hashcash_workers,
                    cancelled=cancelled.is_set,
                ),
                abandon_on_cancel=True,
            )
        finally:
            # Stops an abandoned worker thread if we were cancelled mid-search.
            cancelled.set()
        return f"1:{token}:{cash}"

    # -- action packets --------------------------------------------------------------------

    async def poll_events(
        self, sn: str, *, retry: RetryPolicy | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        """Wait for the action packets after ``sn``: returns ``(packets, next_sn)``.

        Follows ``{"w": url}`` answers by long-polling the wait URL and asking again
        with the same ``sn``. ESID (-15) renews the session (:meth:`renew`) once, else
        raises MegaSessionExpired.
        """
        policy = retry or self.retry
        backoff = Backoff(policy)
        renewed = False
        while True:
            await self._after_renewal()
            sid = self.sid
            try:
                reply = await self._post("sc", b"", {"sn": sn}, backoff, [])
            except MegaSessionExpired:
                if renewed or not await self.renew(sid):
                    raise
                renewed = True
                continue
            if isinstance(reply, dict) and isinstance(reply.get("a"), list):
                packets = [p for p in reply["a"] if isinstance(p, dict)]
                return packets, str(reply.get("sn", sn))
            if isinstance(reply, dict) and isinstance(reply.get("w"), str):
                await self._wait(reply["w"])
                backoff = Backoff(policy)
                continue
            raise MegaError(detail="malformed event response", command="sc")

    async def _wait(self, url: str) -> None:
        """Long-poll a ``w`` URL; any answer (or a timeout) means "ask again"."""
        try:
            resp = await self._client.post(url, content=b"", timeout=self._wait_timeout)
        except httpx.TimeoutException:
            return
        except httpx.TransportError as exc:
            # The next sc request surfaces a real outage; just don't spin.
            log.warning("MEGA sc wait: %s; polling again", _describe_exc(exc))
            await trio.sleep(self.retry.initial)
            return
        if resp.status_code != 200:
            await trio.sleep(self.retry.initial)  # a stale wait URL: don't spin


def _describe_exc(exc: BaseException) -> str:
    """A one-line, URL-free description of a transport exception."""
    text = redact(str(exc)).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
