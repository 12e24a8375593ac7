"""Streaming chunks (megafs.vfs.node.Pieces): a chunk written front to back in large
pieces keeps the writer's buffers instead of copying them. Every other change to
such a chunk (a write elsewhere, a small append, a truncation) and every read of it
must see exactly the bytes a plain buffer would hold, before and after it is stored."""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from conftest import PASSPHRASE, make_volume
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import megafs.sdk
from megafs.format import chunks as fchunks
from megafs.format.chunks import CHUNK_SIZE
from megafs.vfs.node import Pieces

MiB = 1 << 20


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def run_on(tmp_path: Path, fn: Callable[[megafs.sdk.Drive], Awaitable[None]]) -> None:
    store = tmp_path / "store"
    if not store.exists():
        make_volume(store)

    async def main() -> None:
        async with megafs.sdk.open_drive(
            str(store), passphrase=PASSPHRASE, cache_dir=tmp_path / "cache"
        ) as drive:
            await fn(drive)

    trio.run(main)


def test_pieces_read_truncate_materialize() -> None:
    a, b, c = rand(MiB, 1), rand(MiB, 2), rand(100_000, 3)
    whole = a + b + c
    p = Pieces()
    for part in (a, memoryview(b), c):
        p.append(part)
    assert len(p) == len(whole)
    for lo, hi in [(0, 10), (MiB - 5, MiB + 5), (10, len(whole)), (2 * MiB, 2 * MiB + 99_999)]:
        assert p.read(lo, hi) == whole[lo:hi]
    assert p.read(len(whole) - 3, len(whole) + 50) == whole[-3:]
    assert p.read(len(whole), len(whole) + 1) == b""
    assert p.materialize() == bytearray(whole)
    p.truncate(MiB + 7)
    assert len(p) == MiB + 7 and p.materialize() == bytearray(whole[: MiB + 7])
    p.truncate(MiB)  # at a piece's boundary
    assert p.parts == [a] and p.read(0, 2 * MiB) == a
    p.truncate(0)
    assert p.parts == [] and len(p) == 0 and p.materialize() == bytearray()


@pytest.mark.parametrize(
    "change",
    ["overwrite-middle", "small-append", "gap-append", "truncate-then-append", "read-back"],
)
def test_a_streaming_chunk_changed_before_it_is_stored(tmp_path: Path, change: str) -> None:
    expect = bytearray(rand(2 * MiB, 10))  # half a chunk, in two 1 MiB pieces

    async def write(d: megafs.sdk.Drive) -> None:
        async with await d.open("f", "w+b") as f:
            await f.write(expect[:MiB])
            await f.write(expect[MiB:])
            if change == "overwrite-middle":
                await f.seek(MiB - 3)
                await f.write(b"XYZXYZ")
                expect[MiB - 3 : MiB + 3] = b"XYZXYZ"
            elif change == "small-append":
                await f.write(b"tail")
                expect.extend(b"tail")
            elif change == "gap-append":
                await f.seek(3 * MiB)
                await f.write(rand(MiB, 11))
                expect.extend(bytes(MiB))
                expect.extend(rand(MiB, 11))
            elif change == "truncate-then-append":
                await f.truncate(MiB + 12345)
                await f.seek(MiB + 12345)
                more = rand(MiB, 12)
                await f.write(more)
                del expect[MiB + 12345 :]
                expect.extend(more)
            else:
                await f.seek(MiB - 10)
                assert await f.read(20) == expect[MiB - 10 : MiB + 10]
                await f.seek(0)
                assert await f.read() == expect
            await f.seek(0)
            assert await f.read() == expect  # from the dirty buffer

    async def check(d: megafs.sdk.Drive) -> None:
        assert await d.read_bytes("f") == expect

    run_on(tmp_path, write)
    run_on(tmp_path, check)  # a new opening: from the store


def test_a_writer_out_of_step_with_the_chunk_size_is_not_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 MiB writes that end each chunk with a piece under PIECE_MIN (the kernel's
    write-back splits a request and shifts the rest) keep the pieces: no chunk is
    turned into a buffer (a 4 MiB copy each), and the bytes are right."""
    shift = 61_440  # what a chunk's last write holds: less than PIECE_MIN
    data = rand(MiB - shift, 30) + rand(3 * CHUNK_SIZE, 31)
    copies: list[int] = []
    materialize = Pieces.materialize

    def counted(self: Pieces) -> bytearray:
        copies.append(len(self))
        return materialize(self)

    monkeypatch.setattr(Pieces, "materialize", counted)

    async def write(d: megafs.sdk.Drive) -> None:
        async with await d.open("f", "wb") as f:
            await f.write(data[: MiB - shift])
            for i in range(MiB - shift, len(data), MiB):
                await f.write(data[i : i + MiB])

    async def check(d: megafs.sdk.Drive) -> None:
        assert await d.read_bytes("f") == data

    run_on(tmp_path, write)
    assert copies == []
    run_on(tmp_path, check)


def test_streamed_zeros_are_stored_as_a_hole(tmp_path: Path) -> None:
    data = bytes(CHUNK_SIZE) + rand(MiB, 20)

    async def write(d: megafs.sdk.Drive) -> None:
        async with await d.open("f", "wb") as f:
            for i in range(0, len(data), MiB):
                await f.write(data[i : i + MiB])

    async def check(d: megafs.sdk.Drive) -> None:
        assert await d.read_bytes("f") == data
        # One chunk object (the second chunk); the first is a hole.
        chunks = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and "/c/" in str(p)]
        assert len(chunks) == 1, chunks

    run_on(tmp_path, write)
    run_on(tmp_path, check)


@pytest.mark.parametrize(
    "cuts", [[], [MiB, 2 * MiB], [1000, 70_000, 65_536 * 3 + 1], [CHUNK_SIZE - 1]]
)
def test_a_chunk_in_pieces_hashes_and_seals_as_one_buffer(cuts: list[int]) -> None:
    plain = rand(CHUNK_SIZE - 12345, 30)
    bounds = [0, *(c for c in cuts if c < len(plain)), len(plain)]
    pieces: list[bytes | memoryview] = [
        memoryview(plain)[a:b] if k % 2 else plain[a:b]
        for k, (a, b) in enumerate(itertools.pairwise(bounds))
    ]
    key, vid = bytes(range(32)), bytes(16)
    aead = AESGCM(bytes(32))
    cid = fchunks.chunk_id(key, pieces)
    assert cid == fchunks.chunk_id(key, plain)
    sealed = fchunks.seal_chunk(aead, vid, cid, pieces)
    assert len(sealed) == fchunks.sealed_size(len(plain))
    assert fchunks.verify_chunk(aead, vid, cid, len(plain), sealed) == plain
    empty = fchunks.seal_chunk(aead, vid, cid, [])
    assert fchunks.verify_chunk(aead, vid, cid, 0, empty) == b""
