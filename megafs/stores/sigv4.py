"""AWS Signature Version 4 (header-based, ``AWS4-HMAC-SHA256``) for the S3 store.

Pure functions, no I/O. Pinned by AWS's published examples in ``tests/test_s3.py``
(the S3 developer guide's signed GET/PUT/list examples and the generic SigV4 test
suite's ``get-vanilla`` cases).

S3 differs from other services in two ways handled by the caller: the path is
URI-encoded once (not twice), and the payload hash is sent as the
``x-amz-content-sha256`` header (and therefore signed).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


@dataclass(frozen=True)
class Credentials:
    """An access key pair (and an optional session token). ``repr`` hides the secrets."""

    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def uri_encode(value: str, *, keep_slash: bool = False) -> str:
    """RFC 3986 percent-encoding as SigV4 wants it: only ``A-Za-z0-9-_.~`` stay as is
    (and ``/`` when ``keep_slash``)."""
    return quote(value, safe="-_.~/" if keep_slash else "-_.~")


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """The canonical query string: encoded names and values, sorted, ``&``-joined.
    Also the exact query string to send, so what is signed is what is sent."""
    encoded = sorted((uri_encode(k), uri_encode(v)) for k, v in params)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """The derived key for ``date`` (``YYYYMMDD``), region and service."""
    k = _hmac(("AWS4" + secret_key).encode(), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


def _canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    folded: dict[str, str] = {}
    for name, value in headers.items():
        folded[name.strip().lower()] = " ".join(value.strip().split())
    names = sorted(folded)
    return "".join(f"{n}:{folded[n]}\n" for n in names), ";".join(names)


def authorization(
    *,
    method: str,
    canonical_uri: str,
    query: str,
    headers: Mapping[str, str],
    payload_hash: str,
    credentials: Credentials,
    region: str,
    service: str,
    amz_date: str,
) -> str:
    """The ``Authorization`` header value for a request.

    ``canonical_uri`` is the already encoded path, ``query`` the canonical query string
    (see :func:`canonical_query`), ``headers`` every header to sign (must include
    ``host`` and ``x-amz-date``), ``amz_date`` the ``YYYYMMDDTHHMMSSZ`` timestamp.
    The returned value contains the signature: never log it.
    """
    canon_headers, signed = _canonical_headers(headers)
    request = "\n".join([method.upper(), canonical_uri, query, canon_headers, signed, payload_hash])
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(request.encode()).hexdigest()])
    key = signing_key(credentials.secret_key, amz_date[:8], region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return (
        f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
