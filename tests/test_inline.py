"""Small files are stored inline in their directory's object, not as chunk objects:
up to 4 KiB always, up to 16 KiB while the directory's inline bytes stay within a
budget (in-process, looking at what reaches the store)."""

from __future__ import annotations

import os

import pytest
import trio
from conftest import PASSPHRASE, TEST_KDF

from megafs.stores import MemoryStore
from megafs.vfs import content
from megafs.vfs.content import DIR_INLINE_BUDGET, INLINE_DIR_MAX, INLINE_MAX
from megafs.vfs.fs import Ctx, Vfs
from megafs.volume.drive import ROOT_INO, Volume

CTX = Ctx(0, 0, 0o022)


def _content(name: bytes, size: int) -> bytes:
    return (name * (size // len(name) + 1))[:size]


async def _write(vfs: Vfs, parent: int, name: bytes, size: int) -> None:
    fh, _ = await vfs.create(parent, name, 0o644, os.O_WRONLY, CTX)
    await vfs.write(fh, 0, _content(name, size))
    await vfs.release(fh)
    await vfs.sync()


async def _read(vfs: Vfs, parent: int, name: bytes) -> bytes:
    fh = await vfs.open((await vfs.lookup(parent, name)).ino, os.O_RDONLY)
    try:
        return await vfs.read(fh, 0, 1 << 20)
    finally:
        await vfs.release(fh)


async def _new_volume() -> tuple[MemoryStore, Volume, Vfs]:
    store = MemoryStore()
    await Volume.create(store, PASSPHRASE.encode(), kdf_params=TEST_KDF)
    vol = await Volume.open(store, PASSPHRASE.encode())
    vfs = Vfs(vol)
    await vfs.start()
    return store, vol, vfs


async def _inline(vol: Volume, ino: int) -> dict[bytes, int]:
    """name -> inline bytes of the entries of directory ``ino`` as stored."""
    entries = (await vol.load_dir(ino)).entries
    return {n: len(r.inline) for n, r in entries.items() if r.inline is not None}


def test_files_up_to_16_kib_go_inline_within_the_directory_budget() -> None:
    fill = DIR_INLINE_BUDGET // INLINE_DIR_MAX + 4  # the budget and a few more

    async def main() -> None:
        store, vol, vfs = await _new_volume()
        d = (await vfs.mkdir(ROOT_INO, b"d", 0o755, CTX)).ino
        await _write(vfs, d, b"edge", INLINE_DIR_MAX)
        await _write(vfs, d, b"over", INLINE_DIR_MAX + 1)
        assert set(await _inline(vol, d)) == {b"edge"}
        assert len(await store.list("c/")) == 1  # "over" is a chunk
        for i in range(fill):
            await _write(vfs, d, b"f%03d" % i, INLINE_DIR_MAX)
        inline = await _inline(vol, d)
        total = sum(inline.values())
        assert DIR_INLINE_BUDGET - INLINE_DIR_MAX < total <= DIR_INLINE_BUDGET
        assert len(inline) < fill + 1  # the last ones are chunks
        await _write(vfs, d, b"small", INLINE_MAX)  # still inline: the 4 KiB rule
        await _write(vfs, d, b"mid", INLINE_MAX + 1)  # a chunk: no budget left
        inline = await _inline(vol, d)
        assert b"small" in inline and b"mid" not in inline
        # A hard-linked file's record is its own object: no budget applies.
        other = (await vfs.mkdir(ROOT_INO, b"e", 0o755, CTX)).ino
        await _write(vfs, other, b"linked", INLINE_DIR_MAX)
        ino = (await vfs.lookup(other, b"linked")).ino
        await vfs.link(ino, d, b"linked")
        fh = await vfs.open(ino, os.O_WRONLY)
        await vfs.write(fh, 0, b"L" * INLINE_DIR_MAX)  # rewritten once hard-linked
        await vfs.release(fh)
        await vfs.sync()
        assert (await vol.load_inode(ino)).inline == b"L" * INLINE_DIR_MAX
        for name, size in [(b"edge", INLINE_DIR_MAX), (b"over", INLINE_DIR_MAX + 1)]:
            assert await _read(vfs, d, name) == _content(name, size)
        for i in range(fill):
            assert await _read(vfs, d, b"f%03d" % i) == _content(b"f%03d" % i, INLINE_DIR_MAX)
        await vfs.close()

        # A new mount reads the budget from the directory object.
        vol2 = await Volume.open(store, PASSPHRASE.encode())
        vfs2 = Vfs(vol2)
        await vfs2.start()
        d2 = (await vfs2.lookup(ROOT_INO, b"d")).ino
        await _write(vfs2, d2, b"late", INLINE_DIR_MAX)
        assert b"late" not in await _inline(vol2, d2)
        assert await _read(vfs2, d2, b"late") == _content(b"late", INLINE_DIR_MAX)
        # Deleting inline files makes room again (counted when the object is sealed).
        for i in range(8):
            await vfs2.unlink(d2, b"f%03d" % i)
        await vfs2.sync()
        await _write(vfs2, d2, b"again", INLINE_DIR_MAX)
        assert b"again" in await _inline(vol2, d2)
        await vfs2.close()

    trio.run(main)


def test_the_16_kib_tier_stops_when_the_mount_holds_its_inline_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inline bytes stay in memory with their directories: once the loaded
    directories hold MOUNT_INLINE_BUDGET, files over 4 KiB become chunks, in any
    directory; removing a directory gives its share back."""
    monkeypatch.setattr(content, "MOUNT_INLINE_BUDGET", 4 * INLINE_DIR_MAX)

    async def main() -> None:
        _, vol, vfs = await _new_volume()
        a, b, c = [(await vfs.mkdir(ROOT_INO, n, 0o755, CTX)).ino for n in (b"a", b"b", b"c")]
        for d in (a, b):
            for name in (b"x", b"y"):
                await _write(vfs, d, name, INLINE_DIR_MAX)
        await _write(vfs, c, b"late", INLINE_DIR_MAX)
        await _write(vfs, c, b"small", INLINE_MAX)
        assert await _inline(vol, c) == {b"small": INLINE_MAX}  # "late" is a chunk
        for name in (b"x", b"y"):  # rm -rf a, all before the next commit
            await vfs.unlink(a, name)
        await vfs.rmdir(ROOT_INO, b"a")
        await _write(vfs, c, b"again", INLINE_DIR_MAX)
        assert b"again" in await _inline(vol, c)
        assert await _read(vfs, c, b"late") == _content(b"late", INLINE_DIR_MAX)
        await vfs.close()

    trio.run(main)
