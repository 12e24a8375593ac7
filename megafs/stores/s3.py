"""An object store on any S3-compatible server (AWS, MinIO, Ceph RGW, Garage, ...).

URL: ``s3://BUCKET[/PREFIX]``; key ``k`` is the S3 object ``PREFIX/k``.

Configuration, the standard AWS way (see :func:`S3Store.from_url`):

* endpoint: ``MEGAFS_S3_ENDPOINT`` (``megafs --s3-endpoint``), default AWS
  (``https://s3.REGION.amazonaws.com``); region ``AWS_REGION`` (or
  ``AWS_DEFAULT_REGION``), default ``us-east-1``;
* addressing: ``MEGAFS_S3_ADDRESSING=path|virtual``; default virtual-hosted on AWS,
  path-style on a custom endpoint (what self-hosted servers expect);
* credentials: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
  else the profile ``AWS_PROFILE`` (default ``default``) of ``~/.aws/credentials``
  (``AWS_SHARED_CREDENTIALS_FILE``);
* TLS: the system trust store (``ssl.create_default_context``, which also honours
  ``SSL_CERT_FILE``/``SSL_CERT_DIR``).

Requests: httpx on trio, SigV4-signed (:mod:`megafs.stores.sigv4`) with the payload's
SHA-256, so the server rejects a body damaged on the way. Each request has a timeout;
transient failures (timeouts, connection errors, 5xx, 429, ``SlowDown``,
``RequestTimeout``, ``InternalError``, a truncated body) raise
:class:`~megafs.errors.StoreUnavailable` inside one attempt and are retried under
:mod:`megafs.stores.retry`. Permanent errors (bad credentials, missing bucket) raise a
:class:`~megafs.errors.StoreError` with one line naming the bucket, never a secret.

Conditional puts: ``If-None-Match: *`` and ``If-Match: "ETAG"`` are sent when the server
honours them. Support is probed once per store instance, at the first conditional put,
on a scratch key under the prefix (``.megafs-probe-<random>``, deleted afterwards). When
the server ignores a condition, the store logs one warning and falls back to HEAD then
PUT under a per-key lock: atomic among the tasks of this process only (megafs v1 has one
writer per volume, guarded by its lease).

ETags are kept without quotes (``"abc"`` -> ``abc``) and quoted again in ``If-Match``.
"""

from __future__ import annotations

import base64
import builtins
import configparser
import contextlib
import datetime
import hashlib
import logging
import os
import re
import secrets
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar, final
from urllib.parse import urlsplit

import httpx
import trio

from megafs.errors import ObjectNotFound, PreconditionFailed, StoreError, StoreUnavailable
from megafs.stores import http as _http
from megafs.stores import sigv4
from megafs.stores.base import ObjectInfo
from megafs.stores.retry import DEFAULT_POLICY, RetryPolicy, retrying
from megafs.stores.sigv4 import Credentials

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_REGION: Final = "us-east-1"
#: Requests in flight at once, per kind: writes (PUT, POST, DELETE) and reads (GET,
#: HEAD, listings), so uploads never hold up reads. Each kind has its own connection
#: pool of this size and further requests wait here, not in the pool: httpcore's pool
#: does work quadratic in its connections for every request it assigns or finishes
#: (its idle scans), which at 48 connections and a few hundred requests a second was
#: a third of the daemon's CPU. 16 in flight are ~800 small requests a second at 20 ms
#: per round trip, more than one process makes. Conditional PUTs (the lease, the
#: header) do not wait for a slot: a lease renewal must not queue behind a backlog of
#: chunk uploads on a slow link; the write pool has URGENT_EXTRA connections for them.
REQUEST_SLOTS: Final = 16
URGENT_EXTRA: Final = 4
DEFAULT_TIMEOUT: Final = 60.0
MAX_DELETE_BATCH: Final = 1000
# Payloads at least this large are hashed in a worker thread (hashlib drops the GIL).
_THREAD_HASH_MIN: Final = 1 << 20

_SHA256_META: Final = "x-amz-meta-megafs-sha256"

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_KEY = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
_TRANSIENT_CODES: Final = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "ConditionalRequestConflict",
        "XMinioServerNotInitialized",
    }
)
_REGION_CODES: Final = frozenset(
    {"AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException"}
)
_CREDENTIAL_CODES: Final = frozenset(
    {
        "AccessDenied",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
    }
)


# -- configuration -----------------------------------------------------------


def load_credentials(env: Mapping[str, str] | None = None) -> Credentials:
    """AWS credentials from the environment, else from ``~/.aws/credentials``.

    Raises :class:`StoreError` (one line, no secret) when none are found.
    """
    env = os.environ if env is None else env
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return Credentials(key, secret, env.get("AWS_SESSION_TOKEN") or None)
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    path = Path(
        env.get("AWS_SHARED_CREDENTIALS_FILE") or Path(env.get("HOME", "~")) / ".aws/credentials"
    ).expanduser()
    parser = configparser.RawConfigParser()
    try:
        parser.read(path)
    except (configparser.Error, OSError, UnicodeDecodeError) as exc:
        # Only the error's type: a parse error quotes the file's lines (secrets).
        raise StoreError(
            f"s3: cannot read AWS credentials file {path}: {type(exc).__name__}"
        ) from None
    if parser.has_section(profile):
        section = parser[profile]
        key, secret = section.get("aws_access_key_id"), section.get("aws_secret_access_key")
        if key and secret:
            return Credentials(key.strip(), secret.strip(), section.get("aws_session_token"))
    raise StoreError(
        "s3: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
        f"profile {profile!r} in {path}"
    )


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` -> (bucket, prefix); the prefix is empty or ends in ``/``."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise StoreError("not an s3:// URL")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise StoreError("s3 URL must be s3://BUCKET[/PREFIX] (no credentials, query or fragment)")
    bucket = parts.netloc
    if _BUCKET.fullmatch(bucket) is None or ".." in bucket:
        raise StoreError(f"s3 URL: invalid bucket name {bucket!r}")
    prefix = parts.path.strip("/")
    if prefix:
        if _KEY.fullmatch(prefix) is None or any(s in (".", "..") for s in prefix.split("/")):
            raise StoreError("s3 URL: the prefix may only use A-Z a-z 0-9 . _ - and /")
        prefix += "/"
    return bucket, prefix


def _check_key(key: str) -> None:
    if _KEY.fullmatch(key) is None or any(s in (".", "..") for s in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")


def _check_range(start: int, end: int | None) -> None:
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range [{start}, {end})")


def _etag(raw: str | None) -> str:
    value = (raw or "").strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def _amz_date() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


# -- XML (S3 responses) ------------------------------------------------------


def _parse_xml(body: bytes) -> ET.Element | None:
    """Parse an S3 XML body, or None if it is not XML. Documents with a DTD are refused
    outright, so no entity (internal or external) is ever expanded."""
    head = body[:4096].lower()
    if b"<!doctype" in head or b"<!entity" in body.lower():
        return None
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for element in root.iter():
        if isinstance(element.tag, str) and "}" in element.tag:
            element.tag = element.tag.split("}", 1)[1]
    return root


def _text(element: ET.Element, path: str) -> str:
    found = element.find(path)
    return (found.text or "") if found is not None else ""


def _error_code(body: bytes) -> str:
    root = _parse_xml(body) if body else None
    return _text(root, "Code") if root is not None and root.tag == "Error" else ""


class _Refused(StoreError):
    """The server refused a request for a reason other than the ones named above."""


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: httpx.Headers
    body: bytes


# -- the store ---------------------------------------------------------------


@final
class S3Store:
    """An :class:`~megafs.stores.base.ObjectStore` in ``bucket`` under ``prefix``.

    Nothing is contacted until the first operation. ``conditional`` forces native
    conditional puts on (True) or off (False); None probes the server.
    ``list_page_size`` is the ``max-keys`` of each ListObjectsV2 page.
    ``max_connections`` is per kind of request (see :data:`REQUEST_SLOTS`).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        credentials: Credentials,
        endpoint: str | None = None,
        region: str = DEFAULT_REGION,
        path_style: bool | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        policy: RetryPolicy = DEFAULT_POLICY,
        conditional: bool | None = None,
        list_page_size: int = 1000,
        max_connections: int = REQUEST_SLOTS,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.region = region
        self._credentials = credentials
        if endpoint is None:
            endpoint = f"https://s3.{region}.amazonaws.com"
            path_style = False if path_style is None else path_style
        parts = urlsplit(endpoint.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StoreError("s3 endpoint must be an http:// or https:// URL")
        self._scheme = parts.scheme
        self._netloc = parts.netloc.rsplit("@", 1)[-1]
        self._base_path = parts.path.rstrip("/")
        self.path_style = True if path_style is None else path_style
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 15.0))
        pool = max_connections + URGENT_EXTRA
        self._limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        self._policy = policy
        self._list_page_size = list_page_size
        # [reads, writes]: a client (connection pool) each, and the slots for it.
        self._clients: list[httpx.AsyncClient | None] = [None, None]
        self._slots = (trio.Semaphore(max_connections), trio.Semaphore(max_connections))
        # Conditional put support: None until probed (under _probe_lock, once).
        self._native_if_none_match = conditional
        self._native_if_match = conditional
        self._probe_lock = trio.Lock()
        # Fallback conditional puts: one lock per key, dropped when nobody holds it.
        self._key_locks: dict[str, tuple[trio.Lock, int]] = {}

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str] | None = None) -> S3Store:
        """The store ``s3://BUCKET[/PREFIX]`` names, configured from ``env`` (default
        ``os.environ``) as the module docstring says."""
        env = os.environ if env is None else env
        bucket, prefix = parse_s3_url(url)
        addressing = (env.get("MEGAFS_S3_ADDRESSING") or "").lower()
        if addressing not in ("", "path", "virtual"):
            raise StoreError("MEGAFS_S3_ADDRESSING must be 'path' or 'virtual'")
        return cls(
            bucket,
            prefix,
            credentials=load_credentials(env),
            endpoint=env.get("MEGAFS_S3_ENDPOINT") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
            path_style=None if not addressing else addressing == "path",
        )

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    # -- plumbing --------------------------------------------------------------

    def _http(self, kind: int) -> httpx.AsyncClient:
        # Created on first use, inside the trio run that uses it (its pooled connections
        # belong to that run); aclose() drops it. One client per kind (0 reads, 1 writes)
        # is shared by every task: httpx's pool is safe for concurrent requests from
        # many trio tasks.
        client = self._clients[kind]
        if client is None:
            client = self._clients[kind] = _http.AsyncClient(
                timeout=self._timeout,
                limits=self._limits,
                verify=ssl.create_default_context(),
                follow_redirects=False,
                trust_env=False,
            )
        return client

    def _target(self, object_name: str | None) -> tuple[str, str]:
        """(host, encoded path) of the bucket (``object_name`` None) or one object."""
        obj = "" if object_name is None else sigv4.uri_encode(object_name, keep_slash=True)
        if self.path_style:
            path = f"{self._base_path}/{self.bucket}" + (f"/{obj}" if object_name else "/")
            return self._netloc, path
        return f"{self.bucket}.{self._netloc}", f"{self._base_path}/{obj}"

    async def _send(
        self,
        method: str,
        object_name: str | None,
        *,
        query: Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        payload_hash: str = sigv4.EMPTY_SHA256,
        what: str,
        urgent: bool = False,
    ) -> _Reply:
        """One signed request; transport failures become :class:`StoreUnavailable`.
        ``urgent``: a write that does not wait for a slot (see REQUEST_SLOTS)."""
        host, path = self._target(object_name)
        qs = sigv4.canonical_query(query)
        amz_date = _amz_date()
        signed = {
            "host": host,
            "x-amz-date": amz_date,
            "x-amz-content-sha256": payload_hash,
            **(headers or {}),
        }
        if self._credentials.session_token:
            signed["x-amz-security-token"] = self._credentials.session_token
        auth = sigv4.authorization(
            method=method,
            canonical_uri=path,
            query=qs,
            headers=signed,
            payload_hash=payload_hash,
            credentials=self._credentials,
            region=self.region,
            service="s3",
            amz_date=amz_date,
        )
        url = f"{self._scheme}://{host}{path}" + (f"?{qs}" if qs else "")
        # Unsigned: no compression, so Content-Length is the length of the bytes we get
        # and a truncated body is always noticed.
        send_headers = {**signed, "authorization": auth, "accept-encoding": "identity"}
        if method in ("PUT", "POST"):
            send_headers["content-length"] = str(len(body))
        kind = 1 if method in ("PUT", "POST", "DELETE") else 0
        slot = contextlib.nullcontext() if urgent and kind else self._slots[kind]
        try:
            async with slot:
                response = await self._http(kind).request(
                    method, url, headers=send_headers, content=body or None
                )
        except httpx.TimeoutException as exc:
            raise StoreUnavailable(
                f"{self.url}: {what}: timed out ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            raise StoreUnavailable(f"{self.url}: {what}: {type(exc).__name__}: {exc}") from None
        return _Reply(response.status_code, response.headers, response.content)

    def _fail(self, reply: _Reply, what: str) -> StoreError:
        """The error for a non-success reply (transient ones are StoreUnavailable)."""
        code = _error_code(reply.body)
        status = reply.status
        label = f" ({code})" if code else ""
        if code == "NoSuchBucket":
            return StoreError(f"s3://{self.bucket}: the bucket does not exist")
        if code in _CREDENTIAL_CODES or (status == 403 and not code):
            return StoreError(f"s3://{self.bucket}: credentials refused{label or ' (403)'}")
        if code in _REGION_CODES or status in (301, 307):
            return StoreError(
                f"s3://{self.bucket}: the bucket is in another region or behind another "
                f"endpoint{label or f' (HTTP {status})'}: set AWS_REGION / MEGAFS_S3_ENDPOINT"
            )
        if code == "RequestTimeTooSkewed":
            return StoreError(f"s3://{self.bucket}: the clock is too far from the server's")
        if status == 501 or code == "NotImplemented":
            return _Refused(f"{self.url}: {what}: not implemented by the server{label}")
        if status in (408, 429) or status >= 500 or code in _TRANSIENT_CODES:
            return StoreUnavailable(f"{self.url}: {what}: HTTP {status}{label}")
        if status == 404:
            return ObjectNotFound(f"{self.url}: {what}: not found")
        if status == 412:
            return PreconditionFailed(f"{self.url}: {what}: precondition failed")
        return _Refused(f"{self.url}: {what}: HTTP {status}{label}")

    async def _retry(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        return await retrying(op, what=what, policy=self._policy)

    # -- reads -----------------------------------------------------------------

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the object, clipped to its size.

        A body shorter than announced (Content-Length or Content-Range) is retried,
        never returned.
        """
        _check_key(key)
        _check_range(start, end)
        headers: dict[str, str] = {}
        if start or end is not None:
            last = "" if end is None else str(max(end - 1, start))
            headers["range"] = f"bytes={start}-{last}"
        what = f"get {key!r}"

        async def attempt() -> bytes:
            reply = await self._send("GET", self.prefix + key, headers=headers, what=what)
            if reply.status == 416:
                return b""  # the range starts at or past the end
            if reply.status not in (200, 206):
                raise self._fail(reply, what)
            body = reply.body
            length = reply.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != len(body):
                raise StoreUnavailable(f"{self.url}: {what}: truncated body")
            if reply.status == 206:
                first, total = _content_range(reply.headers.get("content-range"))
                if first != start:
                    raise StoreUnavailable(f"{self.url}: {what}: wrong range returned")
                want = (total if end is None else min(end, total)) - start
                if len(body) < want:
                    raise StoreUnavailable(f"{self.url}: {what}: truncated body")
                return body[: max(want, 0)]
            # A whole object: check it against the SHA-256 recorded at upload, when
            # the server keeps user metadata. Some servers (juicefs gateway) can
            # serve a prefix of an object being replaced with a matching length.
            recorded = reply.headers.get(_SHA256_META)
            if recorded and await _sha256(body) != recorded:
                raise StoreUnavailable(f"{self.url}: {what}: body does not match its SHA-256")
            # A 200 to a ranged request: the server sent the whole object.
            return body[start:end]

        return await self._retry(attempt, what)

    async def head(self, key: str) -> ObjectInfo:
        """Size and ETag of the object."""
        _check_key(key)
        what = f"head {key!r}"

        async def attempt() -> ObjectInfo:
            reply = await self._send("HEAD", self.prefix + key, what=what)
            if reply.status != 200:
                raise self._fail(reply, what)
            size = reply.headers.get("content-length", "")
            if not size.isdigit():
                raise StoreUnavailable(f"{self.url}: {what}: no Content-Length")
            return ObjectInfo(key, int(size), _etag(reply.headers.get("etag")))

        return await self._retry(attempt, what)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted (ListObjectsV2, paged)."""
        found: list[ObjectInfo] = []
        token: str | None = None
        while True:
            page, token = await self._list_page(prefix, token)
            found.extend(page)
            if token is None:
                break
        found.sort(key=lambda info: info.key)
        return found

    async def _list_page(
        self, prefix: str, token: str | None
    ) -> tuple[builtins.list[ObjectInfo], str | None]:
        query = [
            ("list-type", "2"),
            ("prefix", self.prefix + prefix),
            ("max-keys", str(self._list_page_size)),
        ]
        if token is not None:
            query.append(("continuation-token", token))
        what = f"list {prefix!r}"

        async def attempt() -> tuple[list[ObjectInfo], str | None]:
            reply = await self._send("GET", None, query=query, what=what)
            if reply.status != 200:
                raise self._fail(reply, what)
            root = _parse_xml(reply.body)
            if root is None or root.tag != "ListBucketResult":
                raise StoreUnavailable(f"{self.url}: {what}: malformed listing")
            page: list[ObjectInfo] = []
            for item in root.findall("Contents"):
                name = _text(item, "Key")
                if not name.startswith(self.prefix):
                    continue
                key = name[len(self.prefix) :]
                if _KEY.fullmatch(key) is None or not key.startswith(prefix):
                    continue  # a foreign object (e.g. a "directory" marker)
                size = _text(item, "Size")
                page.append(
                    ObjectInfo(key, int(size) if size.isdigit() else 0, _etag(_text(item, "ETag")))
                )
            truncated = _text(root, "IsTruncated").lower() == "true"
            next_token = _text(root, "NextContinuationToken") or None
            if truncated and next_token is None:
                raise StoreError(f"{self.url}: {what}: truncated listing without a token")
            return page, next_token if truncated else None

        return await self._retry(attempt, what)

    # -- writes ----------------------------------------------------------------

    async def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Replace (or create) the object atomically; return its new ETag."""
        _check_key(key)
        if if_none_match and if_match is not None:
            raise ValueError("put: if_none_match and if_match are exclusive")
        data = bytes(data)
        digest = await _sha256(data)
        if not if_none_match and if_match is None:
            return await self._put(key, data, digest, {})
        await self._probe()
        if if_none_match and self._native_if_none_match:
            return await self._put(key, data, digest, {"if-none-match": "*"}, urgent=True)
        if if_match is not None and self._native_if_match:
            return await self._put(key, data, digest, {"if-match": f'"{if_match}"'}, urgent=True)
        async with self._key_lock(key):
            # Fallback: check, then write. Atomic only among this store's tasks, which
            # all take this key's lock; no await between the check and the put that
            # another of our tasks could use to slip in a write to the same key.
            try:
                current: str | None = (await self.head(key)).etag
            except ObjectNotFound:
                current = None
            if if_none_match and current is not None:
                raise PreconditionFailed(f"{self.url}: put {key!r}: the object exists")
            if if_match is not None and current != if_match:
                raise PreconditionFailed(f"{self.url}: put {key!r}: the ETag has changed")
            return await self._put(key, data, digest, {}, urgent=True)

    async def _put(
        self, key: str, data: bytes, digest: str, extra: dict[str, str], *, urgent: bool = False
    ) -> str:
        what = f"put {key!r}"
        headers = {
            "content-type": "application/octet-stream",
            _SHA256_META: digest,
            **extra,
        }

        async def attempt() -> str:
            reply = await self._send(
                "PUT",
                self.prefix + key,
                headers=headers,
                body=data,
                payload_hash=digest,
                what=what,
                urgent=urgent,
            )
            if (
                reply.status == 404
                and "if-match" in extra
                and _error_code(reply.body) in ("NoSuchKey", "")
            ):
                raise PreconditionFailed(f"{self.url}: {what}: the object does not exist")
            if reply.status not in (200, 201, 204):
                raise self._fail(reply, what)
            etag = _etag(reply.headers.get("etag"))
            return etag

        etag = await self._retry(attempt, what)
        return etag or (await self.head(key)).etag

    async def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""
        _check_key(key)
        what = f"delete {key!r}"

        async def attempt() -> None:
            reply = await self._send("DELETE", self.prefix + key, what=what)
            if reply.status in (200, 202, 204):
                return
            err = self._fail(reply, what)
            if type(err) is ObjectNotFound:
                return
            raise err

        await self._retry(attempt, what)

    async def delete_many(self, keys: Iterable[str]) -> None:
        """Delete many objects with batched DeleteObjects (1000 keys per request).

        Missing objects are not errors; any other per-key failure raises StoreError."""
        batch = list(dict.fromkeys(keys))
        for key in batch:
            _check_key(key)
        for i in range(0, len(batch), MAX_DELETE_BATCH):
            await self._delete_batch(batch[i : i + MAX_DELETE_BATCH])

    async def _delete_batch(self, keys: builtins.list[str]) -> None:
        root = ET.Element("Delete", xmlns="http://s3.amazonaws.com/doc/2006-03-01/")
        ET.SubElement(root, "Quiet").text = "true"
        for key in keys:
            ET.SubElement(ET.SubElement(root, "Object"), "Key").text = self.prefix + key
        body = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        headers = {
            "content-md5": base64.b64encode(
                hashlib.md5(body, usedforsecurity=False).digest()
            ).decode(),
            "content-type": "application/xml",
        }
        digest = hashlib.sha256(body).hexdigest()
        what = f"delete {len(keys)} objects"

        async def attempt() -> None:
            reply = await self._send(
                "POST",
                None,
                query=[("delete", "")],
                headers=headers,
                body=body,
                payload_hash=digest,
                what=what,
            )
            if reply.status != 200:
                raise self._fail(reply, what)
            result = _parse_xml(reply.body)
            if result is None:
                raise StoreUnavailable(f"{self.url}: {what}: malformed reply")
            for error in result.findall("Error"):
                code = _text(error, "Code")
                if code == "NoSuchKey":
                    continue
                if code in _TRANSIENT_CODES:
                    raise StoreUnavailable(f"{self.url}: {what}: {code}")
                name = _text(error, "Key")
                raise StoreError(f"{self.url}: cannot delete {name!r}: {code or 'error'}")

        await self._retry(attempt, what)

    # -- conditional put support ----------------------------------------------

    async def _probe(self) -> None:
        """Find out once whether the server honours If-None-Match and If-Match on PUT."""
        if self._native_if_none_match is not None and self._native_if_match is not None:
            return
        async with self._probe_lock:
            if self._native_if_none_match is not None and self._native_if_match is not None:
                return
            key = f".megafs-probe-{secrets.token_hex(8)}"
            digest = hashlib.sha256(b"probe").hexdigest()
            etag = await self._put(key, b"probe", digest, {})
            try:
                inm = await self._honours(key, {"if-none-match": "*"})
                wrong = "0" * 32 if etag != "0" * 32 else "1" * 32
                im = await self._honours(key, {"if-match": f'"{wrong}"'})
            finally:
                await self.delete(key)
            self._native_if_none_match, self._native_if_match = inm, im
            if not (inm and im):
                ignored = [n for n, ok in (("If-None-Match", inm), ("If-Match", im)) if not ok]
                log.warning(
                    "%s: the server ignores conditional PUT (%s); falling back to HEAD then "
                    "PUT, atomic only within this process",
                    self.url,
                    ", ".join(ignored),
                )

    async def _honours(self, key: str, headers: dict[str, str]) -> bool:
        """Whether a PUT on existing ``key`` with a failing condition is refused."""
        try:
            await self._put(key, b"probe", hashlib.sha256(b"probe").hexdigest(), headers)
        except PreconditionFailed:
            return True
        except _Refused:
            return False  # e.g. 501 NotImplemented or 400: the condition is not supported
        return False

    def _key_lock(self, key: str) -> _KeyLock:
        return _KeyLock(self._key_locks, key)

    async def aclose(self) -> None:
        """Close the connection pools."""
        for kind, client in enumerate(self._clients):
            if client is not None:
                self._clients[kind] = None
                await client.aclose()


@final
class _KeyLock:
    """Hold the per-key lock in ``table`` (created on demand, removed when unused)."""

    def __init__(self, table: dict[str, tuple[trio.Lock, int]], key: str) -> None:
        self._table = table
        self._key = key

    async def __aenter__(self) -> None:
        lock, users = self._table.get(self._key, (trio.Lock(), 0))
        self._table[self._key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._release_user()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._table[self._key][0].release()
        self._release_user()

    def _release_user(self) -> None:
        lock, users = self._table[self._key]
        if users <= 1:
            del self._table[self._key]
        else:
            self._table[self._key] = (lock, users - 1)


async def _sha256(data: bytes) -> str:
    if len(data) >= _THREAD_HASH_MIN:
        return await trio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
    return hashlib.sha256(data).hexdigest()


def _content_range(value: str | None) -> tuple[int, int]:
    """(first byte, total size) from ``bytes FIRST-LAST/TOTAL``."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+)\s*", value or "")
    if match is None:
        raise StoreUnavailable(f"malformed Content-Range {value!r}")
    return int(match.group(1)), int(match.group(3))
