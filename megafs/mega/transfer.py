"""File content transfers with MEGA's own encryption (mega-protocol.md §5, §6.1-§6.3).

Downloads: :func:`get_download_url` asks ``g`` for a temporary storage-server URL;
:func:`read_range` fetches ciphertext bytes from it; :class:`RemoteFile` reads whole
MEGA chunks (the §5.3 boundaries), decrypts them (AES-128-CTR), remembers each
chunk's CBC-MAC and, once every chunk of the file has been seen, checks the condensed
MAC against the node key -- a mismatch is a :class:`~megafs.mega.errors.MegaKeyError`
(an IntegrityError, EIO) and sticks to that file object.

Uploads: :func:`upload` runs ``u`` -> encrypted chunk POSTs (bounded concurrency) ->
``p`` and returns the new node. A -4/-8/-5 answer or HTTP 403/404 from the upload
server restarts the whole upload with a fresh ``u`` (and a fresh key unless the caller
fixed one), a bounded number of times.

Storage-server URLs are capabilities; they are never logged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final, final

import httpx
import trio

from megafs.mega import crypto
from megafs.mega.api import RETRY_STATUSES, Backoff, MegaApi, RetryPolicy
from megafs.mega.errors import (
    MegaError,
    MegaKeyError,
    MegaNetworkError,
    MegaNotFound,
    MegaTransferQuota,
    UrlExpired,
    mega_error,
)

log = logging.getLogger(__name__)

UPLOAD_TOKEN_SIZE: Final = 36
# Upload-server answers that mean "this upload cannot go on here: start again with u".
_RESTART_CODES: Final = frozenset({-4, -5, -8, -9})
_RETRY_PIECE_CODES: Final = frozenset({-3, -6, -18, -19})
_MAX_INTEGRITY_RESENDS: Final = 4
_ERROR_BODY: Final = re.compile(rb"^\s*(-\d{1,3})\s*$")

UrlProvider = Callable[[str | None], Awaitable[str]]
"""``await urls(stale)``: a download URL to use. ``stale`` is None on first use, or the
URL that just answered 403/404 (the provider then fetches a fresh one, once, even if
several readers report the same stale URL)."""


# -- downloads ---------------------------------------------------------------------------


async def get_download_url(api: MegaApi, handle: str) -> tuple[str, int]:
    """A temporary storage URL and the size of node ``handle`` (``g`` with g:1, ssl:0)."""
    reply = await api.call({"a": "g", "g": 1, "ssl": 0, "n": handle})
    if not isinstance(reply, dict):
        raise MegaError(detail="malformed download response", command="g")
    embedded = reply.get("e")
    if type(embedded) is int and embedded < 0:
        raise mega_error(embedded, command="g")
    url = reply.get("g")
    if not isinstance(url, str) or not url:
        raise MegaNotFound(detail="file not accessible (no download URL)", command="g")
    try:
        size = int(reply["s"])
    except (KeyError, TypeError, ValueError):
        raise MegaError(detail="download response without a size", command="g") from None
    return url, size


@final
class NodeUrls:
    """A :data:`UrlProvider` for one node: caches its URL, refreshes it via ``g``."""

    def __init__(self, api: MegaApi, handle: str) -> None:
        self._api = api
        self._handle = handle
        self._url: str | None = None
        self._lock = trio.Lock()
        self.size: int | None = None

    async def __call__(self, stale: str | None = None) -> str:
        async with self._lock:
            if self._url is None or (stale is not None and stale == self._url):
                self._url, self.size = await get_download_url(self._api, self._handle)
            return self._url


async def read_range(
    http: httpx.AsyncClient,
    url: str,
    start: int,
    end: int,
    *,
    retry: RetryPolicy | None = None,
) -> bytes:
    """Ciphertext bytes ``start..end`` (inclusive) from a storage URL.

    403/404 raise :class:`UrlExpired` (refresh with ``g``); 509 raises
    :class:`MegaTransferQuota`; 429/5xx, connection errors, timeouts and short bodies
    are retried under ``retry`` and end in :class:`MegaNetworkError`.
    """
    if end < start:
        return b""
    expected = end - start + 1
    backoff = Backoff(retry or RetryPolicy())
    while True:
        err: MegaError
        try:
            resp = await http.post(f"{url}/{start}-{end}", content=b"")
        except httpx.TransportError as exc:
            err = MegaNetworkError(detail=type(exc).__name__, command="download")
        else:
            status = resp.status_code
            if status in (200, 206):
                if len(resp.content) == expected:
                    return resp.content
                err = MegaNetworkError(
                    detail=f"short read ({len(resp.content)} of {expected} bytes)",
                    command="download",
                )
            elif status in (403, 404):
                raise UrlExpired(detail=f"HTTP {status}", command="download")
            elif status == 509:
                raise MegaTransferQuota(_time_left(resp), command="download")
            elif status in RETRY_STATUSES or status >= 500:
                err = MegaNetworkError(detail=f"HTTP {status}", command="download")
            else:
                raise MegaError(detail=f"unexpected HTTP status {status}", command="download")
        delay = backoff.next_delay()
        if delay is None:
            raise backoff.exhausted(err)
        log.warning("MEGA download of bytes %d-%d: %s; retrying in %.2f s", start, end, err, delay)
        await trio.sleep(delay)


def _time_left(resp: httpx.Response) -> int | None:
    try:
        return int(resp.headers["X-MEGA-Time-Left"])
    except (KeyError, ValueError):
        return None


@final
class RemoteFile:
    """Reads and authenticates one MEGA file, chunk by chunk.

    ``key`` is the node's unpacked :class:`~megafs.mega.crypto.FileKey`; ``urls``
    provides (and refreshes) the download URL. Chunk MACs of every chunk read are
    kept; when the last missing one arrives the whole-file MAC is checked.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        handle: str,
        size: int,
        key: crypto.FileKey,
        urls: UrlProvider,
        *,
        retry: RetryPolicy | None = None,
        max_url_refreshes: int = 3,
    ) -> None:
        self.handle = handle
        self.size = size
        self._http = http
        self._key = key
        self._urls = urls
        self._retry = retry
        self._max_refreshes = max_url_refreshes
        self._bounds = crypto.chunk_bounds(size)
        self._macs: dict[int, bytes] = {}
        self._verified = False
        self._failed: MegaKeyError | None = None

    @property
    def chunk_count(self) -> int:
        """How many MEGA chunks the file has (0 for an empty file)."""
        return len(self._bounds)

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """``(start, length)`` of chunk ``index``."""
        return self._bounds[index]

    async def _fetch(self, start: int, end: int) -> bytes:
        url = await self._urls(None)
        refreshes = 0
        while True:
            try:
                return await read_range(self._http, url, start, end, retry=self._retry)
            except UrlExpired:
                if refreshes >= self._max_refreshes:
                    raise
                refreshes += 1
                log.info("download URL of node %s expired; asking for a new one", self.handle)
                url = await self._urls(url)

    async def read_chunk(self, index: int) -> bytes:
        """The plaintext of chunk ``index``; raises MegaKeyError on a MAC mismatch."""
        if self._failed is not None:
            raise self._failed
        if not 0 <= index < len(self._bounds):
            raise IndexError(f"chunk {index} out of range (file has {len(self._bounds)})")
        start, length = self._bounds[index]
        cipher = await self._fetch(start, start + length - 1)
        # Decrypt + MAC inline: ~1 ms per MiB with the C AES, not worth a thread hop.
        plain = crypto.ctr_crypt(self._key.aes_key, self._key.nonce, start, cipher)
        mac = crypto.chunk_mac(self._key.aes_key, self._key.nonce, plain)
        previous = self._macs.get(index)
        if previous is not None and previous != mac:
            self._fail(f"chunk {index} changed between reads")
        self._macs[index] = mac
        if len(self._macs) == len(self._bounds):
            self.verified()
        return plain

    def verified(self) -> bool:
        """True once every chunk was read and the file MAC matched.

        False while chunks are missing (and always for an empty file); raises
        MegaKeyError (and logs "MAC mismatch for node <handle>") on a mismatch.
        """
        if self._failed is not None:
            raise self._failed
        if self._verified:
            return True
        if not self._bounds or len(self._macs) < len(self._bounds):
            return False
        meta = crypto.condensed_mac(
            self._key.aes_key, (self._macs[i] for i in range(len(self._bounds)))
        )
        if meta != self._key.meta_mac:
            self._fail("content does not match the file's MAC")
        self._verified = True
        return True

    def _fail(self, why: str) -> None:
        log.warning("MAC mismatch for node %s: %s", self.handle, why)
        self._failed = MegaKeyError(
            detail=f"MAC mismatch for node {self.handle}: {why}", command="download"
        )
        self._macs.clear()
        raise self._failed

    async def read(self, offset: int, length: int) -> bytes:
        """Plaintext bytes ``[offset, offset+length)``, fetched as whole chunks."""
        end = min(self.size, offset + length)
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if offset >= end:
            return b""
        parts = []
        for index in range(crypto.chunk_index(offset), crypto.chunk_index(end - 1) + 1):
            start, _ = self._bounds[index]
            plain = await self.read_chunk(index)
            parts.append(plain[max(0, offset - start) : end - start])
        return b"".join(parts)

    async def read_unverified(self, offset: int, length: int) -> bytes:
        """Plaintext bytes ``[offset, offset+length)`` with a minimal (16-aligned) fetch.

        Not authenticated: MEGA only has a whole-file MAC (§5.4).
        """
        end = min(self.size, offset + length)
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if self._failed is not None:
            raise self._failed
        if offset >= end:
            return b""
        aligned = offset - offset % 16
        cipher = await self._fetch(aligned, end - 1)
        plain = crypto.ctr_crypt(self._key.aes_key, self._key.nonce, aligned, cipher)
        return plain[offset - aligned :]


# -- uploads -----------------------------------------------------------------------------


class _Restart(Exception):
    """The upload server gave up on this upload: start again with a new ``u``."""

    def __init__(self, error: MegaError) -> None:
        super().__init__(str(error))
        self.error = error


ReadFn = Callable[[int, int], Awaitable[bytes]]


async def upload(
    api: MegaApi,
    http: httpx.AsyncClient,
    *,
    size: int,
    read: ReadFn,
    parent: str,
    attrs: dict[str, Any],
    master_key: bytes,
    file_key: crypto.FileKey | None = None,
    concurrency: int = 4,
    retry: RetryPolicy | None = None,
    max_restarts: int = 3,
    on_sent: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Upload ``size`` bytes from ``read(offset, length)`` as a new file under ``parent``.

    ``attrs`` (e.g. ``{"n": name, "c": fingerprint}``) are encrypted with the file key.
    ``on_sent(n)`` is called as each piece of ``n`` bytes has been accepted.
    Returns the node object from ``p``. Raises MegaOverQuota when ``u`` answers -17,
    the upload server's last error when restarts run out, and whatever ``read``
    raises.
    """
    if size < 0:
        raise ValueError("negative size")
    policy = retry or api.retry
    attempt = 0
    while True:
        key = file_key or crypto.FileKey.random()
        try:
            token, macs = await _upload_content(
                api, http, size, read, key, concurrency, policy, on_sent
            )
            break
        except _Restart as restart:
            attempt += 1
            if attempt > max_restarts:
                raise restart.error from None
            log.warning(
                "MEGA upload: %s; restarting the upload (%d/%d)",
                restart.error,
                attempt,
                max_restarts,
            )
    final_key = crypto.FileKey(
        aes_key=key.aes_key,
        nonce=key.nonce,
        meta_mac=crypto.condensed_mac(key.aes_key, macs),
    )
    node = {
        "h": crypto.b64encode(token),
        "t": 0,
        "a": crypto.encrypt_attributes(attrs, key.aes_key),
        "k": crypto.encrypt_key(master_key, final_key.pack()),
    }
    reply = await api.call({"a": "p", "t": parent, "n": [node], "i": api.client_tag}, retry=policy)
    try:
        created = reply["f"][0]
    except (KeyError, IndexError, TypeError):
        raise MegaError(detail="malformed response to put nodes", command="p") from None
    if not isinstance(created, dict):
        raise MegaError(detail="malformed response to put nodes", command="p")
    return created


async def _upload_content(
    api: MegaApi,
    http: httpx.AsyncClient,
    size: int,
    read: ReadFn,
    key: crypto.FileKey,
    concurrency: int,
    policy: RetryPolicy,
    on_sent: Callable[[int], None] | None = None,
) -> tuple[bytes, list[bytes]]:
    """One upload attempt: ``u`` then every chunk; returns (token, chunk MACs)."""
    target = await api.call({"a": "u", "s": size, "ssl": 0, "v": 2}, retry=policy)
    url = target.get("p") if isinstance(target, dict) else None
    if not isinstance(url, str) or not url:
        raise MegaError(detail="upload response without a URL", command="u")

    if size == 0:
        token = await _post_piece(http, url, 0, b"", policy)
        if len(token) != UPLOAD_TOKEN_SIZE:
            raise _Restart(
                MegaError(detail="empty upload got no completion token", command="upload")
            )
        return token, []

    bounds = crypto.chunk_bounds(size)
    macs: list[bytes | None] = [None] * len(bounds)
    tokens: set[bytes] = set()  # a piece re-sent after completion gets the token again
    failure: list[Exception] = []

    async def one_chunk(index: int) -> None:
        start, length = bounds[index]
        plain = await read(start, length)
        if len(plain) != length:
            raise ValueError(f"read({start}, {length}) returned {len(plain)} bytes")
        # Encrypt + MAC inline: ~1 ms per MiB with the C AES, not worth a thread hop.
        macs[index] = crypto.chunk_mac(key.aes_key, key.nonce, plain)
        cipher = crypto.ctr_crypt(key.aes_key, key.nonce, start, plain)
        del plain
        body = await _post_piece(http, url, start, cipher, policy)
        if body:
            tokens.add(body)
        if on_sent is not None:
            on_sent(length)

    async with trio.open_nursery() as nursery:

        async def worker(receive: trio.MemoryReceiveChannel[int]) -> None:
            async with receive:
                async for index in receive:
                    try:
                        await one_chunk(index)
                    except Exception as exc:
                        if not failure:
                            failure.append(exc)
                        nursery.cancel_scope.cancel()
                        return

        send, receive = trio.open_memory_channel[int](0)
        async with receive:
            for _ in range(max(1, min(concurrency, len(bounds)))):
                nursery.start_soon(worker, receive.clone())
        async with send:
            for index in range(len(bounds)):
                await send.send(index)
    if failure:
        raise failure[0]
    if len(tokens) != 1:
        raise _Restart(
            MegaError(detail=f"upload ended with {len(tokens)} completion tokens", command="upload")
        )
    return tokens.pop(), [m for m in macs if m is not None]


async def _post_piece(
    http: httpx.AsyncClient, url: str, start: int, data: bytes, policy: RetryPolicy
) -> bytes:
    """POST one encrypted piece; returns the body (empty, or the completion token)."""
    backoff = Backoff(policy)
    resends = 0
    target = f"{url}/{start}?c={crypto.upload_crc(data)}"
    while True:
        err: MegaError
        try:
            resp = await http.post(
                target, content=data, headers={"Content-Type": "application/octet-stream"}
            )
        except httpx.TransportError as exc:
            err = MegaNetworkError(detail=type(exc).__name__, command="upload")
        else:
            status = resp.status_code
            if status == 200:
                match = _ERROR_BODY.match(resp.content)
                if match is None:
                    if len(resp.content) in (0, UPLOAD_TOKEN_SIZE):
                        return resp.content
                    raise _Restart(
                        MegaError(
                            detail=f"unexpected {len(resp.content)}-byte upload response",
                            command="upload",
                        )
                    )
                code = int(match.group(1))
                err = mega_error(code, command="upload")
                if code in _RESTART_CODES:
                    raise _Restart(err)
                if code == -14:
                    # The server's CRC check failed: send the same piece again.
                    resends += 1
                    if resends > _MAX_INTEGRITY_RESENDS:
                        raise err
                elif code not in _RETRY_PIECE_CODES:
                    raise err
            elif status in (403, 404):
                raise _Restart(UrlExpired(detail=f"HTTP {status}", command="upload"))
            elif status in RETRY_STATUSES or status >= 500:
                err = MegaNetworkError(detail=f"HTTP {status}", command="upload")
            else:
                raise MegaError(detail=f"unexpected HTTP status {status}", command="upload")
        delay = backoff.next_delay()
        if delay is None:
            raise backoff.exhausted(err)
        log.warning("MEGA upload of the piece at %d: %s; retrying in %.2f s", start, err, delay)
        await trio.sleep(delay)
