"""The chunk cache: the store's sealed sub-blocks on disk, a sparse file per chunk."""

from __future__ import annotations

import os
from pathlib import Path

import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from megafs.errors import StoreError
from megafs.format import chunks as fchunks
from megafs.format.records import ChunkRef
from megafs.stores import MemoryStore
from megafs.stores.staging import StagingStore
from megafs.testing import FaultyStore
from megafs.vfs.chunkcache import HEADER, ChunkCache

AEAD = AESGCM(bytes(range(32)))
VID = bytes(16)
ID_KEY = bytes(32)
SBS = fchunks.SEALED_BLOCK_SIZE
BS = fchunks.BLOCK_SIZE


def _open(ref: ChunkRef, first: int, sealed: bytes) -> list[bytes]:
    return fchunks.open_blocks(AEAD, VID, ref.cid, ref.length, first, sealed)


def _cache(d: Path, max_bytes: int = 1 << 30) -> ChunkCache:
    return ChunkCache(d, b"k" * 32, _open, max_bytes=max_bytes, memory_bytes=0)


def _chunk(seed: int, length: int) -> tuple[ChunkRef, bytes, bytes]:
    plain = os.urandom(length) if seed < 0 else bytes([seed]) * length
    cid = fchunks.chunk_id(ID_KEY, plain)
    return ChunkRef(cid, length), plain, fchunks.seal_chunk(AEAD, VID, cid, plain)


def test_fills_survive_reopen_and_damage_is_dropped(tmp_path: Path) -> None:
    ref, plain, sealed = _chunk(-1, 10 * BS + 123)

    async def main() -> None:
        c = _cache(tmp_path)
        # Two runs fetched: blocks 2-3 and 7-10 (the last one short).
        assert b"".join(await c.fill(ref, 2, sealed[2 * SBS : 4 * SBS])) == plain[2 * BS : 4 * BS]
        assert b"".join(await c.fill(ref, 7, sealed[7 * SBS :])) == plain[7 * BS :]
        files = [f for f in tmp_path.rglob("*") if f.is_file()]
        assert len(files) == 1
        assert files[0].read_bytes()[:HEADER][:12] == bytes([0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0])
        assert plain[:100] not in files[0].read_bytes()

        c2 = _cache(tmp_path)
        got = await c2.get_many(ref, 0, 11)
        assert sorted(got) == [2, 3, 7, 8, 9, 10]
        assert b"".join(got[j] for j in (7, 8, 9, 10)) == plain[7 * BS :]
        assert (c2.hits, c2.misses) == (6, 5)
        # A flipped byte in block 8: the whole file goes, and nothing wrong is served.
        raw = bytearray(files[0].read_bytes())
        raw[HEADER + 8 * SBS + 50] ^= 1
        files[0].write_bytes(bytes(raw))
        c3 = _cache(tmp_path)
        assert await c3.get_many(ref, 7, 11) == {}
        assert not files[0].exists() and c3.bytes == 0

    trio.run(main)


def test_cap_evicts_whole_chunks_least_recently_used(tmp_path: Path) -> None:
    chunks = [_chunk(i, 4 * BS) for i in range(4)]

    async def main() -> None:
        c = _cache(tmp_path, max_bytes=3 * 4 * SBS)
        for ref, _, sealed in chunks[:3]:
            await c.fill(ref, 0, sealed)
        assert len(await c.get_many(chunks[0][0], 0, 4)) == 4  # chunk 0 used again
        await c.fill(chunks[3][0], 0, chunks[3][2])
        assert c.bytes <= c.max_bytes
        assert len(await c.get_many(chunks[1][0], 0, 4)) == 0  # the least recently used
        for k in (0, 2, 3):
            assert len(await c.get_many(chunks[k][0], 0, 4)) == 4
        on_disk = sum(f.stat().st_blocks * 512 for f in tmp_path.rglob("*") if f.is_file())
        assert on_disk <= c.max_bytes + 4 * 4096

    trio.run(main)


def test_a_failed_upload_gives_the_claimed_cache_file_back(tmp_path: Path) -> None:
    """While a staged chunk's upload fails, the cached blocks it was to replace are
    still served; the retry that succeeds moves the staged file in (in the put's
    worker thread) and leaves nothing claimed."""
    ref, plain, sealed = _chunk(-2, 3 * BS + 7)
    key = fchunks.chunk_key(ref.cid)

    async def main() -> None:
        cache = _cache(tmp_path / "chunks")
        await cache.fill(ref, 0, sealed[:SBS])  # block 0 cached (from an earlier read)
        remote = FaultyStore(MemoryStore())
        remote.fail_next("put", StoreError("store down"))
        staging = StagingStore(
            remote, tmp_path / "staging", is_barrier=lambda k: False, adopter=cache
        )
        await staging.put(key, sealed)
        inode = next((tmp_path / "staging").glob("*.op")).stat().st_ino
        async with trio.open_nursery() as nursery:
            nursery.start_soon(staging.run_uploader)
            staging.upload_now()
            while staging.last_error is None:
                await trio.sleep(0.001)
            assert not cache._adopting  # given back at once
            assert list(await cache.get_many(ref, 0, 4)) == [0]  # the old block, kept
            await staging.wait_idle()
            nursery.cancel_scope.cancel()
        assert not cache._adopting
        assert list((tmp_path / "staging").glob("*.op")) == []
        files = [f for f in (tmp_path / "chunks").rglob("*") if f.is_file()]
        assert [f.stat().st_ino for f in files] == [inode]
        got = await cache.get_many(ref, 0, 4)
        assert b"".join(got[j] for j in range(4)) == plain

    trio.run(main)


def test_uploaded_staged_chunks_are_adopted_without_a_copy(tmp_path: Path) -> None:
    """A staged chunk, once uploaded, is renamed into the cache (no second copy);
    the cache reads it at the staging layout's offset, also after a reopen."""
    ref, plain, sealed = _chunk(-1, 3 * BS + 7)
    key = fchunks.chunk_key(ref.cid)

    async def main() -> None:
        cache = _cache(tmp_path / "chunks")
        remote = MemoryStore()
        staging = StagingStore(
            remote, tmp_path / "staging", is_barrier=lambda k: False, adopter=cache
        )
        await staging.put(key, sealed)
        await staging.put("d/x", b"not a chunk")
        staged = sorted((tmp_path / "staging").glob("*.op"))
        inode = staged[0].stat().st_ino
        async with trio.open_nursery() as nursery:
            nursery.start_soon(staging.run_uploader)
            await staging.wait_idle()
            nursery.cancel_scope.cancel()
        assert await remote.get(key) == sealed
        assert list((tmp_path / "staging").glob("*.op")) == []
        files = [f for f in (tmp_path / "chunks").rglob("*") if f.is_file()]
        assert [f.stat().st_ino for f in files] == [inode]  # the same file, renamed
        got = await cache.get_many(ref, 0, 4)
        assert b"".join(got[j] for j in range(4)) == plain
        again = _cache(tmp_path / "chunks")
        got = await again.get_many(ref, 1, 4)
        assert b"".join(got[j] for j in range(1, 4)) == plain[BS:]
        assert again.bytes == 4 * SBS

    trio.run(main)
