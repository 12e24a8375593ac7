"""Read-ahead (ChunkIO.prefetch): more requests than fetch slots wait their turn, in
order, instead of being dropped (a dropped piece costs the reader a round trip per
read later), and at most ``prefetch_tasks`` fetches run at once; a streaming reader
fetches whole chunks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
from conftest import PASSPHRASE, make_volume

import megafs.sdk
from megafs.format import chunks as fchunks
from megafs.format.chunks import CHUNK_SIZE
from megafs.format.chunks import SEALED_BLOCK_SIZE as SBS
from megafs.format.records import ChunkRef
from megafs.stores.local import LocalStore
from megafs.vfs.chunkcache import ChunkCache
from megafs.vfs.chunkio import PREFETCH_QUEUE_MAX, ChunkIO

BS = 64 * 1024


class _SlowDrive:
    """Blocks are their index as bytes; every fetch takes 10 ms."""

    block_size = BS

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.fetched: list[tuple[int, int]] = []

    async def write_chunk(self, plaintext: bytes | bytearray) -> ChunkRef:
        raise NotImplementedError

    async def fetch_sealed(self, ref: ChunkRef, first: int, stop: int) -> bytes:
        self.fetched.append((first, stop))  # in the order started
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await trio.sleep(0.01)
            return b"".join(bytes([j % 256]) * SBS for j in range(first, stop))
        finally:
            self.running -= 1

    def open_blocks(self, ref: ChunkRef, first: int, sealed: bytes) -> list[bytes]:
        return [sealed[i : i + BS] for i in range(0, len(sealed), SBS)]


async def _prefetch(tmp_path: Path, ref: ChunkRef, pieces: int, blocks: int) -> ChunkIO:
    """Ask for ``pieces`` consecutive pieces of ``blocks`` blocks at once (4 fetch
    slots) and wait until the read-ahead is done; the ChunkIO's drive is a _SlowDrive."""
    drive = _SlowDrive()
    cache = ChunkCache(tmp_path, b"k" * 32, drive.open_blocks, max_bytes=1 << 30, memory_bytes=0)
    io = ChunkIO(drive, cache, prefetch_tasks=4)
    async with trio.open_nursery() as nursery:
        io.start(nursery)
        for piece in range(pieces):
            io.prefetch(ref, piece * blocks * BS, (piece + 1) * blocks * BS)
    return io


def test_prefetch_requests_queue_instead_of_being_dropped(tmp_path: Path) -> None:
    ref = ChunkRef(b"c" * 32, 4 << 20)

    async def main() -> None:
        io = await _prefetch(tmp_path, ref, 16, 4)  # 16 pieces of 256 KiB
        drive = io.drive
        assert isinstance(drive, _SlowDrive)
        assert drive.fetched == [(4 * p, 4 * p + 4) for p in range(16)]  # all, in order
        assert drive.peak == 4
        # Everything is in the cache now: reading costs no fetch.
        assert await io.read_chunk(ref, 0, 64 * BS) == b"".join(bytes([j]) * BS for j in range(64))
        assert len(drive.fetched) == 16

    trio.run(main)


def test_prefetch_queue_is_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        io = await _prefetch(tmp_path, ChunkRef(b"d" * 32, 64 << 20), PREFETCH_QUEUE_MAX + 10, 1)
        assert isinstance(io.drive, _SlowDrive)
        assert len(io.drive.fetched) == PREFETCH_QUEUE_MAX

    trio.run(main)


def test_a_streaming_reader_fetches_whole_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the read-ahead window spans a chunk it fetches a chunk per request: on a
    remote store every request costs headers, signing and parsing on the event
    loop's thread. A cold sequential read of 10 chunks takes 1 MiB pieces only while
    the window grows."""
    data = random.Random(5).randbytes(10 * CHUNK_SIZE)
    store = tmp_path / "store"
    make_volume(store)
    sizes: list[int] = []
    get = LocalStore.get

    async def counting_get(
        self: LocalStore, key: str, start: int = 0, end: int | None = None
    ) -> bytes:
        got = await get(self, key, start, end)
        if key.startswith("c/"):
            sizes.append(len(got))
        return got

    async def main(cache: str, read: bool) -> None:
        async with megafs.sdk.open_drive(
            str(store), passphrase=PASSPHRASE, cache_dir=tmp_path / cache
        ) as d:
            if not read:
                await d.write_bytes("f", data)
                return
            got = bytearray()
            async with await d.open("f") as f:
                while piece := await f.read(1 << 20):
                    got += piece
            assert got == data

    trio.run(main, "cache-w", False)
    monkeypatch.setattr(LocalStore, "get", counting_get)
    trio.run(main, "cache-r", True)  # an empty cache: every chunk from the store
    assert sum(sizes) == fchunks.sealed_size(CHUNK_SIZE) * 10, sizes  # each block once
    whole = [s for s in sizes if s == fchunks.sealed_size(CHUNK_SIZE)]
    assert len(whole) >= 8 and len(sizes) <= 14, sizes


def test_read_ahead_from_the_disk_cache_goes_in_pieces(tmp_path: Path) -> None:
    """A range the store must send is asked for in one request; one the disk cache
    holds is read in 1 MiB pieces, side by side."""
    ref = ChunkRef(b"e" * 32, 4 << 20)

    async def main() -> None:
        io = await _prefetch(tmp_path, ref, 1, 64)  # the whole chunk: one fetch
        assert isinstance(io.drive, _SlowDrive)
        assert io.drive.fetched == [(0, 64)]
        assert io.cache.on_disk(ref, 0, 64) and not io.cache.on_disk(ref, 0, 65)
        async with trio.open_nursery() as nursery:
            io.start(nursery)
            io.prefetch(ref, 0, 4 << 20)
            assert [(a, b) for _, a, b in io._prefetch_queue] == [
                (0, 16),
                (16, 32),
                (32, 48),
                (48, 64),
            ]
        assert io.drive.fetched == [(0, 64)]  # nothing more from the store

    trio.run(main)
