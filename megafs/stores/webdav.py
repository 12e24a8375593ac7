"""A WebDAV (RFC 4918) object store over httpx on trio.

URL: ``webdav+http://HOST[:PORT]/PATH`` or ``webdav+https://...``. Credentials come from
``MEGAFS_WEBDAV_USER`` / ``MEGAFS_WEBDAV_PASSWORD`` or ``~/.netrc`` (httpx's NetRCAuth);
basic and digest auth are both answered (digest via httpx.DigestAuth when the server asks
for it). Keys map to paths below the base collection; ``/`` in a key is a collection.

Conditional puts: on a server with LOCK (class 2) they run under an exclusive LOCK.
Without it, RFC 4918/7232 servers honour ``If-None-Match: *`` and ``If-Match``: we probe
once per store whether the server does (a conditional PUT that must fail); if it does
not either, conditional puts fall back to HEAD-then-PUT, which is only best effort: two
concurrent writers may both succeed. This is logged once. LOCK comes first because a
server may check those headers but not atomically with the write: Apache's mod_dav
checks ``If-None-Match`` and then writes, so two concurrent create-only PUTs can both
succeed (seen once in the store contract check: 2 winners of 10, on a loaded machine),
and two mounts could then both think they made the volume's lease.

Replacing objects: some servers write a PUT body in place (rclone before 1.63, servers
on golang.org/x/net/webdav's Dir), so a PUT cut off mid-body would leave a prefix and
lose the old object. Probed once per store (:meth:`WebDavStore._put_is_atomic`); on such
servers objects are uploaded under a scratch name (``.megafs-*``, never listed) and
moved onto their key. Readers racing a replacement on those servers may still see no
object for an instant (MOVE deletes, then renames) -- a reader of a volume checks what
it reads and retries or fails with EIO, never returns wrong bytes.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import posixpath
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, TypeVar
from urllib.parse import quote, unquote, urlsplit

import httpx
import trio

from megafs.errors import ObjectNotFound, PreconditionFailed, StoreError, StoreUnavailable
from megafs.stores import http as _http
from megafs.stores._davxml import PROPFIND_BODY, BadMultistatus, DavEntry, parse_multistatus
from megafs.stores.base import ObjectInfo
from megafs.stores.retry import DEFAULT_POLICY, RetryPolicy, retrying

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_STATUS: Final = frozenset({408, 423, 425, 429, 500, 502, 503, 504, 507})
#: Names the store makes for itself next to the objects (probes, uploads on their way to
#: a key): never listed.
_SCRATCH: Final = ".megafs-"
#: How long the probe of a server's PUT looks for a prefix left by a cut-off PUT.
PUT_PROBE_WINDOW: Final = 0.5
#: Seconds our LOCKs last (conditional puts under a lock): a lock we lost track of
#: (the answer to our LOCK never came) blocks writes to that object for this long.
LOCK_TIMEOUT: Final = 15


def _auth_from_env() -> httpx.Auth | None:
    user = os.environ.get("MEGAFS_WEBDAV_USER")
    if user is not None:
        return _BasicOrDigest(user, os.environ.get("MEGAFS_WEBDAV_PASSWORD", ""))
    netrc = os.path.expanduser("~/.netrc")
    if os.path.exists(netrc):
        return httpx.NetRCAuth(netrc)
    return None


def _strip_weak(etag: str) -> str:
    return etag[2:] if etag.startswith("W/") else etag


class _BasicOrDigest(httpx.Auth):
    """Sends Basic pre-emptively; switches to Digest if the server challenges with it.

    Concurrency: ``_digest`` is set once (idempotently) by whichever task sees the first
    digest challenge; httpx.DigestAuth keeps its own nonce state.
    """

    def __init__(self, user: str, password: str) -> None:
        self._basic = httpx.BasicAuth(user, password)
        self._digest_auth = httpx.DigestAuth(user, password)
        self._digest = False

    def __repr__(self) -> str:  # never show credentials
        return "<webdav auth>"

    def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        if self._digest:
            yield from self._digest_auth.auth_flow(request)
            return
        response = yield next(self._basic.auth_flow(request))
        challenge = response.headers.get("www-authenticate", "")
        if response.status_code == 401 and challenge.lower().startswith("digest"):
            self._digest = True
            flow = self._digest_auth.auth_flow(request)
            next(flow)  # the unauthenticated probe: we already have its answer
            try:
                retry = flow.send(response)
            except StopIteration:
                return
            yield retry


#: Connections to the server. The staging area keeps at most MAX_UPLOADS uploads in
#: flight here, so reads (a file opened while a backlog uploads) do not queue behind
#: them for a connection.
CONNECTIONS: Final = 40
MAX_UPLOADS: Final = 32


class WebDavStore:
    """An :class:`~megafs.stores.base.ObjectStore` on a WebDAV collection."""

    #: Read by :func:`megafs.stores.staging.upload_concurrency`.
    max_uploads: Final = MAX_UPLOADS

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None = None,
        timeout: float = 60.0,
        policy: RetryPolicy = DEFAULT_POLICY,
        verify: bool | str = True,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise StoreError("WebDAV URL must be webdav+http://HOST/PATH or webdav+https://...")
        if "@" in parts.netloc:
            raise StoreError("put WebDAV credentials in MEGAFS_WEBDAV_USER/PASSWORD, not the URL")
        path = parts.path.rstrip("/") + "/"
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._base_path = path  # percent-encoded, ends with '/'
        self._url = f"webdav+{parts.scheme}://{parts.netloc}{path}"
        self._policy = policy
        limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
        self._client = _http.AsyncClient(
            auth=auth,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            limits=limits,
            verify=verify,  # True: the system trust store via certifi/ssl defaults
            follow_redirects=False,
        )
        # Collections known to exist (encoded paths). Concurrency: only ever grows; two
        # tasks may MKCOL the same collection at once, which is harmless (405 = exists).
        self._collections: set[str] = set()
        self._base_checked = False
        self._conditional: str | None = None  # "headers", "lock" or "none"; see put()
        self._atomic_put: bool | None = None  # see _put_is_atomic()
        self._probe_lock = trio.Lock()
        # Locks of ours whose UNLOCK failed (encoded path -> lock token): released when a
        # request on that path meets 423 Locked. Concurrency: entries are added and
        # popped in synchronous sections only.
        self._stale_locks: dict[str, str] = {}

    @classmethod
    def from_url(cls, url: str) -> WebDavStore:
        if not url.lower().startswith("webdav+"):
            raise StoreError("not a webdav+http(s):// URL")
        return cls(url[len("webdav+") :], auth=_auth_from_env())

    @property
    def url(self) -> str:
        return self._url

    # -- plumbing -------------------------------------------------------------

    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or "//" in key or key.endswith("/"):
            raise StoreError(f"invalid key {key!r}")
        segs = key.split("/")
        if any(s in (".", "..") for s in segs):
            raise StoreError(f"invalid key {key!r}")
        return self._base_path + "/".join(quote(s, safe="") for s in segs)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        forbidden_ok: bool = False,
    ) -> httpx.Response:
        """One request; transport failures and 5xx raise StoreUnavailable, 401 and 403
        (unless ``forbidden_ok``: the caller looks at a 403 itself) "credentials
        refused"."""
        try:
            resp = await self._client.request(
                method, self._origin + path, headers=headers, content=content
            )
        except httpx.TimeoutException as exc:
            raise StoreUnavailable(f"WebDAV {method} timed out: {type(exc).__name__}") from None
        except (httpx.TransportError, OSError) as exc:
            raise StoreUnavailable(f"WebDAV {method} failed: {type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:
            raise StoreError(f"WebDAV {method} failed: {type(exc).__name__}: {exc}") from None
        code = resp.status_code
        if code == 401 or (code == 403 and not forbidden_ok):
            raise StoreError(f"WebDAV credentials refused ({code}) by {self._url}")
        if code == 423 and (token := self._stale_locks.pop(path, None)) is not None:
            # Our own lock, left behind when its UNLOCK failed: release it; the caller
            # retries (423 is transient).
            await self._unlock(path, token)
        if code in _TRANSIENT_STATUS or code >= 500:
            raise StoreUnavailable(f"WebDAV {method} answered {code}")
        return resp

    async def _retry(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        return await retrying(op, what=f"{self._url} {what}", policy=self._policy)

    async def _check_base(self) -> None:
        if self._base_checked:
            return
        resp = await self._request(
            "PROPFIND", self._base_path, headers={"Depth": "0"}, content=PROPFIND_BODY
        )
        if resp.status_code == 404:
            raise StoreError(f"no such WebDAV folder: {self._url}")
        if resp.status_code != 207:
            raise StoreError(f"WebDAV folder {self._url}: PROPFIND answered {resp.status_code}")
        self._collections.add(self._base_path)
        self._base_checked = True

    async def _mkcol_chain(self, path: str) -> None:
        """Create every missing collection above ``path`` (an encoded object path)."""
        parent = path.rsplit("/", 1)[0] + "/"
        chain: list[str] = []
        while parent not in self._collections and len(parent) > len(self._base_path):
            chain.append(parent)
            parent = parent[:-1].rsplit("/", 1)[0] + "/"
        for coll in reversed(chain):
            resp = await self._request("MKCOL", coll, forbidden_ok=True)
            code = resp.status_code
            if code == 403 and await self._is_collection(coll):
                # Apache answers 403 (not 405) to the loser of two MKCOLs racing for
                # the same collection: it exists, made by another task or writer.
                code = 405
            # 201 created; 405 already exists (another task or writer made it).
            if code not in (200, 201, 204, 405):
                if code == 409:
                    raise StoreUnavailable(f"WebDAV MKCOL {coll} conflict (parent vanished?)")
                if code == 403:
                    raise StoreError(f"WebDAV MKCOL {unquote(coll)} forbidden (403) by {self._url}")
                raise StoreError(f"WebDAV MKCOL answered {code}")
            self._collections.add(coll)

    async def _is_collection(self, coll: str) -> bool:
        resp = await self._request(
            "PROPFIND", coll, headers={"Depth": "0"}, content=PROPFIND_BODY, forbidden_ok=True
        )
        if resp.status_code != 207:
            return False
        try:
            return any(e.is_collection for e in parse_multistatus(resp.content, coll))
        except BadMultistatus:
            return False

    # -- ObjectStore ----------------------------------------------------------

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        path = self._path(key)
        if start < 0 or (end is not None and end < start):
            raise StoreError(f"bad range [{start}, {end})")
        if end is not None and end == start:
            await self.head(key)  # still report a missing object
            return b""

        async def op() -> bytes:
            await self._check_base()
            headers = {}
            ranged = start > 0 or end is not None
            if ranged:
                last = "" if end is None else str(end - 1)
                headers["Range"] = f"bytes={start}-{last}"
            resp = await self._request("GET", path, headers=headers)
            code = resp.status_code
            if code == 404:
                raise ObjectNotFound(key)
            if code == 416:
                return b""
            body = resp.content
            length = resp.headers.get("content-length")
            if length is not None and len(body) < int(length):
                raise StoreUnavailable(f"WebDAV GET {key}: truncated body")
            if code == 200 and not ranged:
                await self._check_unchanged(key, resp)
                return body
            if code == 200:
                return body[start:end]
            if code == 206:
                cr = resp.headers.get("content-range", "")
                want: int | None = None
                if cr.startswith("bytes ") and "/" in cr:
                    span, _, total = cr[6:].partition("/")
                    first, _, lastb = span.partition("-")
                    if int(first) != start:
                        raise StoreError(f"WebDAV GET {key}: server sent range {cr}")
                    size = int(total) if total != "*" else None
                    stop = end if end is not None else size
                    if size is not None and stop is not None:
                        stop = min(stop, size)
                    if stop is not None:
                        want = stop - start
                    if len(body) != int(lastb) - int(first) + 1:
                        raise StoreUnavailable(f"WebDAV GET {key}: truncated range")
                if want is not None and len(body) < want:
                    raise StoreUnavailable(f"WebDAV GET {key}: truncated range")
                return body if want is None else body[:want]
            raise StoreError(f"WebDAV GET answered {code}")

        return await self._retry(op, f"GET {key}")

    async def _check_unchanged(self, key: str, resp: httpx.Response) -> None:
        """Raise StoreUnavailable (to be retried) if the object ``resp`` answered a
        whole-object GET for has been replaced since (a HEAD gives another ETag). Apache
        stats a file before it opens it: a GET racing a replacement can send the new
        bytes cut at the old size, under the old ETag. Whole-object reads are the ones
        of objects that get replaced; ranged reads are not checked."""
        etag = resp.headers.get("etag")
        if etag is None:
            return
        try:
            now = await self._head_once(key)
        except ObjectNotFound:
            now = None
        if now is None or _strip_weak(now.etag) != _strip_weak(etag):
            raise StoreUnavailable(f"WebDAV GET {key}: the object changed while it was read")

    async def _probe_conditional(self) -> str:
        """How conditional puts are done: "lock" (the server has class 2 LOCK), "headers"
        (it has not, and refuses ``If-None-Match: *`` on an existing resource with 412),
        or "none" (best effort check-then-put). Probed once per store."""
        async with self._probe_lock:
            if self._conditional is not None:
                return self._conditional
            opts = await self._request("OPTIONS", self._base_path)
            classes = {c.strip() for c in opts.headers.get("dav", "").split(",")}
            if "2" in classes:  # (class 2: LOCK)
                self._conditional = "lock"
                log.info("%s has LOCK: conditional puts use it", self._url)
                return "lock"
            probe = self._base_path + _SCRATCH + "ifmatch-probe"
            resp = await self._request("PUT", probe, content=b"probe")
            if resp.status_code not in (200, 201, 204):
                raise StoreError(f"WebDAV PUT answered {resp.status_code}")
            resp = await self._request(
                "PUT", probe, content=b"probe2", headers={"If-None-Match": "*"}
            )
            honoured = resp.status_code == 412
            await self._request("DELETE", probe)
            if honoured:
                self._conditional = "headers"
            else:
                self._conditional = "none"
                log.warning(
                    "%s ignores If-None-Match and has no LOCK; conditional puts fall back to "
                    "check-then-put (not atomic against concurrent writers)",
                    self._url,
                )
            return self._conditional

    async def _put_is_atomic(self) -> bool:
        """Whether the server keeps the old object whole while a PUT replaces it, and when
        a PUT is cut off mid-body. Apache, nginx and Nextcloud do (they write a temporary
        file and rename it). Servers that write in place (rclone before 1.63, servers on
        golang.org/x/net/webdav's Dir) show readers a prefix of a PUT under way and leave
        the prefix behind when the PUT is cut off (the old object is lost): there, puts
        go to a scratch name and are moved onto the key (:meth:`_put_via_scratch`). Probed once per
        store: a PUT cut off after half its body, then the object is looked at for up to
        ``PUT_PROBE_WINDOW`` seconds."""
        async with self._probe_lock:
            if self._atomic_put is not None:
                return self._atomic_put
            probe = self._base_path + _SCRATCH + "put-probe"
            old = b"o" * 4096
            resp = await self._request("PUT", probe, content=old)
            if resp.status_code not in (200, 201, 204):
                raise StoreError(f"WebDAV PUT answered {resp.status_code}")
            await self._cut_put(probe, len(old))
            atomic = True
            deadline = trio.current_time() + PUT_PROBE_WINDOW
            while atomic and trio.current_time() < deadline:
                await trio.sleep(0.02)
                resp = await self._request("GET", probe)
                atomic = resp.status_code == 200 and resp.content == old
            await self._request("DELETE", probe)
            self._atomic_put = atomic
            if not atomic:
                log.info(
                    "%s writes PUT bodies in place: objects are uploaded under a scratch "
                    "name and moved onto their key",
                    self._url,
                )
            return atomic

    async def _cut_put(self, path: str, length: int) -> None:
        """A PUT announcing ``length`` bytes that sends half of them, then drops the
        connection."""

        class Cut(Exception):
            pass

        async def half() -> AsyncIterator[bytes]:
            yield b"n" * (length // 2)
            await trio.sleep(0.05)  # the server reads the first half
            raise Cut

        with contextlib.suppress(Cut, httpx.HTTPError):
            await self._client.request(
                "PUT", self._origin + path, content=half(), headers={"Content-Length": str(length)}
            )

    def _scratch(self, path: str) -> str:
        """A fresh scratch name next to ``path`` (an encoded object path)."""
        return f"{path.rsplit('/', 1)[0]}/{_SCRATCH}{secrets.token_hex(8)}"

    async def _put_via_scratch(self, path: str, data: bytes, token: str | None = None) -> None:
        """PUT ``data`` under a scratch name next to ``path``, then MOVE it onto ``path``
        (``token``: our lock on ``path``). The server removes the old object and renames
        the new one within that one request, so a cut-off upload never damages the
        object, and readers see the old or the new one (or, for an instant in between,
        none). The scratch object goes in any case (unless the store is unreachable
        then: invisible to :meth:`list`, it stays as litter)."""
        scratch = self._scratch(path)
        moved = False
        try:
            resp = await self._request("PUT", scratch, content=data)
            if resp.status_code == 409:
                self._collections = {self._base_path}  # see _put_once
                raise StoreUnavailable(f"WebDAV PUT {unquote(path)}: parent collection missing")
            if resp.status_code not in (200, 201, 204):
                raise StoreError(f"WebDAV PUT answered {resp.status_code}")
            headers = {"Destination": self._origin + path, "Overwrite": "T"}
            if token is not None:
                headers["If"] = f"<{self._origin}{path}> ({token})"
            resp = await self._request("MOVE", scratch, headers=headers)
            if resp.status_code == 412:
                raise StoreUnavailable(f"WebDAV MOVE onto {unquote(path)}: our lock expired")
            if resp.status_code not in (200, 201, 204):
                raise StoreError(f"WebDAV MOVE answered {resp.status_code}")
            moved = True
        finally:
            if not moved:
                with trio.CancelScope(shield=True), contextlib.suppress(StoreError):
                    await self._request("DELETE", scratch)

    async def _put_once(self, key: str, path: str, data: bytes, headers: dict[str, str]) -> str:
        # Puts the server checks itself (If-Match/If-None-Match headers) go to the key.
        if not headers and not await self._put_is_atomic():
            await self._mkcol_chain(path)
            await self._put_via_scratch(path, data)
            return (await self._head_once(key)).etag
        await self._mkcol_chain(path)
        resp = await self._request("PUT", path, headers=headers, content=data)
        if resp.status_code == 409:
            # A parent collection is missing (someone removed it): forget and rebuild.
            # Concurrency: resetting the cache only makes other tasks MKCOL again (405).
            self._collections = {self._base_path}
            await self._mkcol_chain(path)
            resp = await self._request("PUT", path, headers=headers, content=data)
        if resp.status_code == 412:
            raise PreconditionFailed(key)
        if resp.status_code == 404 and "If-Match" in headers:
            raise PreconditionFailed(key)
        if resp.status_code not in (200, 201, 204):
            raise StoreError(f"WebDAV PUT answered {resp.status_code}")
        etag: str | None = resp.headers.get("etag")
        if etag and not etag.startswith("W/"):
            return etag
        return (await self._head_once(key)).etag

    async def _put_locked(
        self, key: str, path: str, data: bytes, if_none_match: bool, if_match: str | None
    ) -> str:
        """Conditional put under an exclusive write LOCK (RFC 4918 §9.10).

        LOCK on an unmapped URL creates an empty, locked resource and answers 201: that is
        our atomic create-only test. While we hold the lock, other writers get 423 Locked
        (retried as transient), so check-then-put is safe. A put that fails after a LOCK
        that created the resource deletes it again, so a retry finds the key free. If we
        die holding the lock, it expires after ``LOCK_TIMEOUT``; one that dies between
        LOCK and PUT leaves an empty object under the key (a later reader sees an
        empty, invalid object; the volume's lease replaces one).
        """
        atomic = await self._put_is_atomic()
        await self._mkcol_chain(path)
        body = (
            b'<?xml version="1.0" encoding="utf-8"?>'
            b'<d:lockinfo xmlns:d="DAV:"><d:lockscope><d:exclusive/></d:lockscope>'
            b"<d:locktype><d:write/></d:locktype><d:owner>megafs</d:owner></d:lockinfo>"
        )
        resp = await self._request(
            "LOCK",
            path,
            headers={
                "Timeout": f"Second-{LOCK_TIMEOUT}",
                "Depth": "0",
                "Content-Type": "application/xml",
            },
            content=body,
        )
        if resp.status_code == 409:
            self._collections = {self._base_path}
            raise StoreUnavailable(f"WebDAV LOCK {key}: parent collection missing")
        if resp.status_code not in (200, 201):
            raise StoreError(f"WebDAV LOCK answered {resp.status_code}")
        created = resp.status_code == 201
        token = resp.headers.get("lock-token", "").strip()
        if not token:
            raise StoreError("WebDAV LOCK gave no Lock-Token")
        if not token.startswith("<"):
            token = f"<{token}>"
        if_header = {"If": f"({token})"}
        written = False
        try:
            # 201 means our LOCK created an empty resource. Some servers (RFC 2518
            # lock-null resources, e.g. Apache) answer 200 and the URL stays unmapped
            # (HEAD 404) until our PUT: that also means "did not exist".
            cur: ObjectInfo | None = None
            if not created:
                try:
                    cur = await self._head_once(key)
                except ObjectNotFound:
                    cur = None
            if if_none_match and cur is not None:
                raise PreconditionFailed(key)
            if if_match is not None and (
                cur is None or _strip_weak(cur.etag) != _strip_weak(if_match)
            ):
                raise PreconditionFailed(key)
            if atomic:
                resp = await self._request("PUT", path, headers=if_header, content=data)
                if resp.status_code == 412:
                    # Our lock is gone (it expired before the PUT came): start again.
                    raise StoreUnavailable(f"WebDAV PUT {key}: our lock expired")
                if resp.status_code not in (200, 201, 204):
                    raise StoreError(f"WebDAV PUT answered {resp.status_code}")
            else:
                await self._put_via_scratch(path, data, token)
            written = True
        finally:
            with trio.CancelScope(shield=True):
                if created and not written:
                    # Leave no empty resource behind: a retry of this create-only put
                    # would take it for another writer's object.
                    with contextlib.suppress(StoreError):
                        await self._request("DELETE", path, headers=if_header)
                await self._unlock(path, token)
        return (await self._head_once(key)).etag

    async def _unlock(self, path: str, token: str) -> None:
        """Release our lock on ``path``; if that fails it is remembered and released
        when a later request meets it (it expires after ``LOCK_TIMEOUT`` anyway)."""
        try:
            resp = await self._request("UNLOCK", path, headers={"Lock-Token": token})
        except StoreError as exc:
            if isinstance(exc, StoreUnavailable):
                self._stale_locks[path] = token
            log.warning("%s: UNLOCK %s failed: %s", self._url, path, exc)
            return
        if resp.status_code >= 300 and resp.status_code not in (404, 409, 412):
            # 404/409/412: the lock (or the resource) is gone already.
            log.warning("%s: UNLOCK %s answered %d", self._url, path, resp.status_code)

    async def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        path = self._path(key)
        data = bytes(data)  # (httpx sends bytes; a no-op for bytes)

        async def op() -> str:
            await self._check_base()
            headers: dict[str, str] = {}
            if if_none_match or if_match is not None:
                mode = await self._probe_conditional()
                if mode == "headers" and if_match is not None and if_match.startswith("W/"):
                    # If-Match compares strongly: a weak ETag (Apache gives one for a file
                    # changed in the last second) never matches. Compare it ourselves
                    # (best effort: in "headers" mode the server has no LOCK).
                    mode = "none"
                if mode == "lock":
                    return await self._put_locked(key, path, data, if_none_match, if_match)
                if mode == "headers":
                    if if_none_match:
                        headers["If-None-Match"] = "*"
                    if if_match is not None:
                        headers["If-Match"] = if_match
                else:
                    try:
                        cur: ObjectInfo | None = await self._head_once(key)
                    except ObjectNotFound:
                        cur = None
                    if if_none_match and cur is not None:
                        raise PreconditionFailed(key)
                    if if_match is not None and (
                        cur is None or _strip_weak(cur.etag) != _strip_weak(if_match)
                    ):
                        raise PreconditionFailed(key)
            return await self._put_once(key, path, data, headers)

        return await self._retry(op, f"PUT {key}")

    async def delete(self, key: str) -> None:
        path = self._path(key)

        async def op() -> None:
            await self._check_base()
            resp = await self._request("DELETE", path)
            if resp.status_code not in (200, 202, 204, 404):
                raise StoreError(f"WebDAV DELETE answered {resp.status_code}")

        await self._retry(op, f"DELETE {key}")

    async def _head_once(self, key: str) -> ObjectInfo:
        resp = await self._request("HEAD", self._path(key))
        if resp.status_code == 404:
            raise ObjectNotFound(key)
        if resp.status_code != 200:
            raise StoreError(f"WebDAV HEAD answered {resp.status_code}")
        size = int(resp.headers.get("content-length", "0"))
        etag = resp.headers.get("etag") or f'"{size}-{resp.headers.get("last-modified", "")}"'
        return ObjectInfo(key=key, size=size, etag=etag)

    async def head(self, key: str) -> ObjectInfo:
        self._path(key)

        async def op() -> ObjectInfo:
            await self._check_base()
            return await self._head_once(key)

        return await self._retry(op, f"HEAD {key}")

    async def _propfind(self, coll: str) -> list[DavEntry]:
        """The children of ``coll`` (an encoded collection path)."""
        resp = await self._request(
            "PROPFIND",
            coll,
            headers={"Depth": "1", "Content-Type": "application/xml"},
            content=PROPFIND_BODY,
        )
        if resp.status_code == 404:
            return []
        if resp.status_code != 207:
            raise StoreError(f"WebDAV PROPFIND answered {resp.status_code}")
        try:
            entries = parse_multistatus(resp.content, coll)
        except BadMultistatus as exc:
            raise StoreUnavailable(f"WebDAV PROPFIND: bad XML: {exc}") from None
        me = unquote(coll).rstrip("/")
        return [e for e in entries if e.path != me]

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        return await self._walk(prefix, scratch=False)

    async def list_scratch(self) -> builtins.list[ObjectInfo]:
        """The scratch objects (``.megafs-*``) that uploads cut off before their MOVE
        left behind (:meth:`_put_via_scratch`), for ``megafs gc`` to delete while it
        holds the volume's lease (no upload can be using one then)."""
        return await self._walk("", scratch=True)

    async def _walk(self, prefix: str, *, scratch: bool) -> builtins.list[ObjectInfo]:
        """The objects under ``prefix``: the volume's (``scratch`` False) or only the
        scratch objects (True)."""
        base_dec = unquote(self._base_path)

        async def op() -> list[ObjectInfo]:
            await self._check_base()
            found: builtins.list[ObjectInfo] = []
            # Start at the deepest collection the prefix names fully.
            start_dir = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
            todo = [self._base_path + quote(start_dir, safe="/")]
            while todo:
                coll = todo.pop()
                for entry in await self._propfind(coll):
                    if not entry.path.startswith(base_dec):
                        continue
                    rel = entry.path[len(base_dec) :]
                    if entry.is_collection:
                        relc = rel + "/"
                        if relc.startswith(prefix) or prefix.startswith(relc):
                            todo.append(self._base_path + quote(relc, safe="/"))
                        continue
                    is_scratch = posixpath.basename(rel).startswith(_SCRATCH)
                    if rel.startswith(prefix) and is_scratch == scratch:
                        found.append(ObjectInfo(key=rel, size=entry.size, etag=entry.etag))
            found.sort(key=lambda i: i.key)
            return found

        return await self._retry(op, f"PROPFIND {prefix!r}")

    async def aclose(self) -> None:
        await self._client.aclose()
