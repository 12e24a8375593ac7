"""Uploads and downloads with MEGA's content crypto, against the MEGA emulator."""

from __future__ import annotations

import errno
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest
import trio

from megafs.mega import crypto
from megafs.mega.api import MegaApi, RetryPolicy
from megafs.mega.errors import (
    MegaError,
    MegaKeyError,
    MegaNetworkError,
    MegaOverQuota,
    MegaTransferQuota,
    UrlExpired,
    errno_for,
)
from megafs.mega.session import Session, login
from megafs.mega.transfer import (
    NodeUrls,
    RemoteFile,
    get_download_url,
    read_range,
    upload,
)
from megafs.testing.megaemu.process import EmulatorProcess

T = TypeVar("T")

ALICE, ALICE_PW = "alice@example.com", "alice-Passw0rd"  # made by tests/conftest.py
FAST = RetryPolicy(initial=0.01, max_delay=0.05, max_total=10.0)
SHORT = RetryPolicy(initial=0.01, max_delay=0.05, max_total=0.4)
MIB = 1 << 20


class Ctx:
    """A logged-in API plus helpers."""

    def __init__(self, api: MegaApi, session: Session, root: str) -> None:
        self.api = api
        self.session = session
        self.root = root

    async def put(self, data: bytes, name: str = "f.bin", **kw: Any) -> dict[str, Any]:
        async def read(offset: int, length: int) -> bytes:
            return data[offset : offset + length]

        return await upload(
            self.api,
            self.api.http,
            size=len(data),
            read=read,
            parent=self.root,
            attrs={"n": name},
            master_key=self.session.master_key,
            retry=FAST,
            **kw,
        )

    def key_of(self, node: dict[str, Any]) -> crypto.FileKey:
        wrapped = node["k"].split(":", 1)[1]
        return crypto.FileKey.unpack(crypto.decrypt_key(self.session.master_key, wrapped))

    def remote(
        self, node: dict[str, Any], http: httpx.AsyncClient | None = None
    ) -> tuple[RemoteFile, NodeUrls]:
        urls = NodeUrls(self.api, node["h"])
        remote = RemoteFile(
            http or self.api.http, node["h"], node["s"], self.key_of(node), urls, retry=FAST
        )
        return remote, urls


def run(fn: Callable[[Ctx], Awaitable[T]], emulator: EmulatorProcess) -> T:
    async def main() -> T:
        async with MegaApi(emulator.url, retry=FAST) as api:
            session = await login(api, ALICE, ALICE_PW)
            tree = await api.call({"a": "f", "c": 1})
            root = next(n["h"] for n in tree["f"] if n["t"] == 2)
            return await fn(Ctx(api, session, root))

    return trio.run(main)


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


async def read_all(remote: RemoteFile) -> bytes:
    return b"".join([await remote.read_chunk(i) for i in range(remote.chunk_count)])


@pytest.mark.parametrize("size", [0, 1, 131071, 131072, 131073, 1_000_000, 5 * MIB])
def test_upload_download_round_trip(emulator: EmulatorProcess, size: int) -> None:
    data = payload(size, size)

    async def go(ctx: Ctx) -> None:
        node = await ctx.put(data, name=f"file-{size}")
        assert node["t"] == 0 and node["s"] == size and node["p"] == ctx.root
        key = ctx.key_of(node)
        assert crypto.decrypt_attributes(node["a"], key.aes_key) == {"n": f"file-{size}"}
        url, got_size = await get_download_url(ctx.api, node["h"])
        assert got_size == size
        remote, _ = ctx.remote(node)
        assert remote.chunk_count == len(crypto.chunk_bounds(size))
        assert not remote.verified()
        assert await read_all(remote) == data
        # Size 0 is never verified (implementations disagree on its MAC).
        assert remote.verified() is (size > 0)
        assert await remote.read(0, size + 10) == data
        if size:
            # The ciphertext is plain AES-CTR with counter nonce || offset/16.
            cipher = await read_range(ctx.api.http, url, 0, size - 1)
            assert crypto.ctr_crypt(key.aes_key, key.nonce, 0, cipher) == data
            assert cipher != data

    run(go, emulator)


def test_random_offset_reads(emulator: EmulatorProcess) -> None:
    size = 1_000_000
    data = payload(size)
    rng = random.Random(7)

    async def go(ctx: Ctx) -> None:
        node = await ctx.put(data)
        remote, _ = ctx.remote(node)
        for _ in range(40):
            offset = rng.randrange(size + 5)
            length = rng.choice([1, 15, 16, 17, 4096, rng.randrange(300_000)])
            expected = data[offset : offset + length]
            assert await remote.read_unverified(offset, length) == expected
            assert await remote.read(offset, length) == expected
        # Whole-chunk reads along the way saw every chunk eventually, or not: force it.
        await read_all(remote)
        assert remote.verified()

    run(go, emulator)


class FlipTransport(httpx.AsyncBaseTransport):
    """Flips one byte of every download response body at ``position`` (if that long)."""

    def __init__(self, position: int) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.position = position

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if "/dl/" not in request.url.path:
            return response
        body = bytearray(await response.aread())
        await response.aclose()
        if len(body) > self.position:
            body[self.position] ^= 0x01
        return httpx.Response(response.status_code, headers=response.headers, content=bytes(body))

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_tampered_ciphertext_fails_mac(
    emulator: EmulatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    data = payload(400_000)

    async def go(ctx: Ctx) -> None:
        node = await ctx.put(data)
        async with httpx.AsyncClient(transport=FlipTransport(1000)) as evil:
            remote, _ = ctx.remote(node, evil)
            plain0 = await remote.read_chunk(0)
            assert plain0 != data[:131072]  # CTR: a flipped bit comes through unnoticed ...
            await remote.read_chunk(1)
            with pytest.raises(MegaKeyError) as info:  # ... until the file MAC is checked
                await remote.read_chunk(2)
            assert errno_for(info.value) == errno.EIO
            assert f"MAC mismatch for node {node['h']}" in str(info.value)
            with pytest.raises(MegaKeyError):
                remote.verified()
            with pytest.raises(MegaKeyError):  # the verdict sticks to the file
                await remote.read_chunk(0)
        # An honest reader of the same file is fine.
        honest, _ = ctx.remote(node)
        assert await read_all(honest) == data
        assert honest.verified()

    with caplog.at_level(logging.WARNING, logger="megafs.mega"):
        run(go, emulator)
    assert any("MAC mismatch for node" in r.getMessage() for r in caplog.records)
    assert not any("f.bin" in r.getMessage() for r in caplog.records)


def test_changed_chunk_between_reads_fails(emulator: EmulatorProcess) -> None:
    data = payload(300_000)

    async def go(ctx: Ctx) -> None:
        node = await ctx.put(data)
        honest, urls = ctx.remote(node)
        await honest.read_chunk(0)
        async with httpx.AsyncClient(transport=FlipTransport(5)) as evil:
            swapped = RemoteFile(evil, node["h"], node["s"], ctx.key_of(node), urls)
            swapped._macs = honest._macs  # the same cache of chunk MACs
            with pytest.raises(MegaKeyError, match="changed between reads"):
                await swapped.read_chunk(0)

    run(go, emulator)


def test_wrong_key_fails_mac(emulator: EmulatorProcess) -> None:
    data = payload(200_000)

    async def go(ctx: Ctx) -> None:
        node = await ctx.put(data)
        key = ctx.key_of(node)
        bad = crypto.FileKey(aes_key=key.aes_key, nonce=key.nonce, meta_mac=bytes(8))
        remote = RemoteFile(ctx.api.http, node["h"], node["s"], bad, NodeUrls(ctx.api, node["h"]))
        await remote.read_chunk(0)
        with pytest.raises(MegaKeyError):
            await remote.read_chunk(1)

    run(go, emulator)


def test_expired_download_url_is_refreshed(emulator: EmulatorProcess) -> None:
    data = payload(500_000)

    async def go(ctx: Ctx) -> None:
        node = await ctx.put(data)
        remote, urls = ctx.remote(node)
        assert await remote.read_chunk(0) == data[:131072]
        old = await urls(None)
        with pytest.raises(UrlExpired):
            emulator.fault("dl", "expire_urls")
            await read_range(ctx.api.http, old, 0, 15)
        before = emulator.stats()["cs:g"]
        assert await remote.read(131072, 400_000) == data[131072:]
        assert emulator.stats()["cs:g"] == before + 1  # one refresh for several chunks
        assert remote.verified()
        assert await urls(None) != old

    run(go, emulator)


def test_download_http_failures(emulator: EmulatorProcess) -> None:
    data = payload(300_000)

    async def go(ctx: Ctx) -> None:
        node = await ctx.put(data)
        url, _ = await get_download_url(ctx.api, node["h"])
        http = ctx.api.http
        emulator.fault("dl", "http", status=503)
        emulator.fault("dl", "http", status=429)
        emulator.fault("dl", "http", status=500)
        emulator.fault("dl", "drop", phase="before")
        emulator.fault("dl", "truncate")
        cipher = await read_range(http, url, 16, 100_015, retry=FAST)
        assert len(cipher) == 100_000
        assert emulator.control("GET", "faults") == []

        emulator.fault("dl", "http", status=509, headers={"X-MEGA-Time-Left": "42"})
        with pytest.raises(MegaTransferQuota, match="retry in 42 s") as info:
            await read_range(http, url, 0, 15)
        assert info.value.time_left == 42
        assert errno_for(info.value) == errno.EDQUOT

        emulator.fault("dl", "http", status=503, count=-1)
        with pytest.raises(MegaNetworkError, match="gave up after") as gave_up:
            await read_range(http, url, 0, 15, retry=SHORT)
        assert url not in str(gave_up.value)
        emulator.clear_faults()

        with pytest.raises(MegaError):
            await get_download_url(ctx.api, "AAAAAAAA")

    run(go, emulator)


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "request_error", "code": -3, "count": 2},
        {"kind": "request_error", "code": -14, "count": 1},
        {"kind": "http", "status": 500, "count": 1},
        {"kind": "drop", "phase": "before", "count": 1},
        {"kind": "drop", "phase": "after", "count": 2},
    ],
    ids=["eagain", "ekey", "http500", "drop-before", "drop-after"],
)
def test_upload_piece_retries(emulator: EmulatorProcess, fault: dict[str, Any]) -> None:
    data = payload(1_000_000)
    emulator.control("POST", "faults", {"match": "ul", **fault})

    async def go(ctx: Ctx) -> None:
        node = await ctx.put(data, concurrency=2)
        remote, _ = ctx.remote(node)
        assert await read_all(remote) == data and remote.verified()

    run(go, emulator)
    stats = emulator.stats()
    assert stats["cs:u"] == 1
    assert stats["faults"] == fault["count"]


@pytest.mark.parametrize("how", ["code-4", "code-8", "http403"])
def test_upload_restarts(emulator: EmulatorProcess, how: str) -> None:
    data = payload(700_000)

    async def go(ctx: Ctx) -> None:
        served = 0

        async def read(offset: int, length: int) -> bytes:
            nonlocal served
            served += 1
            if served == 2:  # part of the file is up: now the upload server gives up
                if how == "http403":
                    emulator.fault("ul", "expire_urls")
                else:
                    emulator.fault("ul", "request_error", code=int(how[-2:]))
            return data[offset : offset + length]

        node = await upload(
            ctx.api,
            ctx.api.http,
            size=len(data),
            read=read,
            parent=ctx.root,
            attrs={"n": "restarted"},
            master_key=ctx.session.master_key,
            concurrency=1,
            retry=FAST,
        )
        remote, _ = ctx.remote(node)
        assert await read_all(remote) == data and remote.verified()

    run(go, emulator)
    assert emulator.stats()["cs:u"] == 2
    assert len([n for n in emulator.tree(ALICE) if n["t"] == 0]) == 1


def test_upload_gives_up_after_bounded_restarts(emulator: EmulatorProcess) -> None:
    emulator.fault("ul", "request_error", code=-4, count=-1)

    async def go(ctx: Ctx) -> None:
        with pytest.raises(MegaError, match=r"^MEGA: -4 ERATELIMIT") as info:
            await ctx.put(payload(1000), max_restarts=2)
        assert info.value.code == -4

    run(go, emulator)
    assert emulator.stats()["cs:u"] == 3
    assert not [n for n in emulator.tree(ALICE) if n["t"] == 0]


def test_upload_with_fixed_key_and_empty_body(emulator: EmulatorProcess) -> None:
    async def go(ctx: Ctx) -> None:
        key = crypto.FileKey.random()
        node = await ctx.put(b"hello world", file_key=key)
        got = ctx.key_of(node)
        assert (got.aes_key, got.nonce) == (key.aes_key, key.nonce)
        assert got.meta_mac != bytes(8)
        empty = await ctx.put(b"")
        assert empty["s"] == 0
        remote, _ = ctx.remote(empty)
        assert remote.chunk_count == 0 and await remote.read(0, 10) == b""
        assert not remote.verified()

    run(go, emulator)


def test_upload_over_quota(emulator: EmulatorProcess) -> None:
    emulator.set_quota(100_000, ALICE)

    async def go(ctx: Ctx) -> None:
        with pytest.raises(MegaOverQuota) as info:
            await ctx.put(payload(200_000))
        assert info.value.code == -17
        assert errno_for(info.value) == errno.EDQUOT
        await ctx.put(payload(1000))  # still room for a small one

    run(go, emulator)


def test_upload_short_read_is_an_error(emulator: EmulatorProcess) -> None:
    async def go(ctx: Ctx) -> None:
        async def read(offset: int, length: int) -> bytes:
            return b"x" * (length - 1)

        with pytest.raises(ValueError, match="returned"):
            await upload(
                ctx.api,
                ctx.api.http,
                size=300_000,
                read=read,
                parent=ctx.root,
                attrs={"n": "x"},
                master_key=ctx.session.master_key,
            )

    run(go, emulator)
