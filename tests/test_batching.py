"""Metadata writes are batched: many changes to one directory cost one write of its
object per commit, not one per change (in-process, counting store requests)."""

from __future__ import annotations

import os
import time

import trio
from conftest import PASSPHRASE, TEST_KDF

from megafs.stores import MemoryStore
from megafs.testing import FaultyStore
from megafs.vfs.fs import Ctx, Vfs
from megafs.volume.drive import Volume

CTX = Ctx(0, 0, 0o022)


async def _create_many(vfs: Vfs, parent: int, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fh, _ = await vfs.create(parent, b"f%05d" % i, 0o644, os.O_WRONLY, CTX)
        await vfs.write(fh, 0, b"x" * 4096)
        await vfs.release(fh)
    return time.perf_counter() - t0


def test_5000_creates_write_the_directory_object_a_few_times() -> None:
    async def main() -> None:
        inner = MemoryStore()
        await Volume.create(inner, PASSPHRASE.encode(), kdf_params=TEST_KDF)
        store = FaultyStore(inner)
        vol = await Volume.open(store, PASSPHRASE.encode())
        vfs = Vfs(vol, commit_interval=0.2)
        await vfs.start()
        d = (await vfs.mkdir(1, b"many", 0o755, CTX)).ino
        key = vol.dir_key(d)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vfs.run_committer)
            await _create_many(vfs, d, 5000)
            nursery.cancel_scope.cancel()
        await vfs.close()
        puts = [k for k in store.puts if k == key]
        # One write per commit interval at most, never one per file.
        assert 1 <= len(puts) < 100, len(puts)
        assert store.calls["put"] < 200  # small files are inline: no chunk objects

    trio.run(main)


def test_create_cost_grows_linearly() -> None:
    async def timed(n: int) -> float:
        inner = MemoryStore()
        await Volume.create(inner, PASSPHRASE.encode(), kdf_params=TEST_KDF)
        vfs = Vfs(await Volume.open(inner, PASSPHRASE.encode()))
        await vfs.start()
        d = (await vfs.mkdir(1, b"d", 0o755, CTX)).ino
        t = await _create_many(vfs, d, n)
        await vfs.close()
        return t

    async def main() -> None:
        small = min([await timed(1000) for _ in range(2)])
        large = min([await timed(8000) for _ in range(2)])
        # 8x the files: linear is ~8x; quadratic would be ~64x. Allow noise.
        assert large < small * 20, (small, large)

    trio.run(main)


def test_a_file_dropped_while_a_commit_stores_it() -> None:
    """A file unlinked, closed and forgotten while a commit is storing its content
    (the store is slow): the commit finishes without its buffers (they went with
    the file), raises nothing, and the volume stays usable."""

    async def main() -> None:
        inner = MemoryStore()
        await Volume.create(inner, PASSPHRASE.encode(), kdf_params=TEST_KDF)
        store = FaultyStore(inner)
        vfs = Vfs(await Volume.open(store, PASSPHRASE.encode()))
        await vfs.start()
        files = []
        for name in (b"a", b"b", b"c"):  # (several: a commit stores them side by side)
            fh, attr = await vfs.create(1, name, 0o644, os.O_WRONLY, CTX)
            await vfs.write(fh, 0, name * 100_000)  # not inline: a chunk each
            files.append((name, fh, attr.ino))
        store.delay = 0.3
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vfs.sync)
            await trio.sleep(0.1)  # the commit waits on the store
            for name, fh, ino in files[:2]:
                await vfs.unlink(1, name)
                await vfs.release(fh)
                vfs.forget(ino, 1)
                assert ino not in vfs.nodes  # dropped, buffers and all
        store.delay = 0
        await vfs.release(files[2][1])
        await vfs.close()
        vfs2 = Vfs(await Volume.open(inner, PASSPHRASE.encode()))
        await vfs2.start()
        names = [name for name, _, _ in await vfs2.readdir(1, 0)]
        assert names == [b"c"]
        fh = await vfs2.open((await vfs2.lookup(1, b"c")).ino, os.O_RDONLY)
        assert await vfs2.read(fh, 0, 1 << 20) == b"c" * 100_000

    trio.run(main)
