"""Tampering with every object kind: flipped bytes, swaps, truncation, extension and
replay of older versions are refused (IntegrityError -> EIO), naming the object,
and other files stay readable (in-process, against the volume drive and vfs)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import PASSPHRASE, TEST_KDF, vfs_write_file

from megafs.errors import CorruptHeader, IntegrityError, ObjectNotFound, WrongPassphrase
from megafs.format import HEADER_KEY
from megafs.format.chunks import CHUNK_SIZE, SEALED_BLOCK_SIZE
from megafs.stores import MemoryStore
from megafs.testing import FaultyStore
from megafs.vfs.fs import Ctx, Vfs
from megafs.volume import drive
from megafs.volume.drive import Volume

CTX = Ctx(0, 0, 0o022)
# Two chunks each, several sub-blocks, nothing shared between them.
BIG = {d: os.urandom(CHUNK_SIZE + 200_000) for d in (b"a", b"b")}


async def _open(store: MemoryStore, state: Path | None = None) -> Vfs:
    vol = await Volume.open(store, PASSPHRASE.encode(), state_root=state)
    vfs = Vfs(vol)
    await vfs.start()
    return vfs


async def _read(vfs: Vfs, parent: int, name: bytes) -> bytes:
    ino = (await vfs.lookup(parent, name)).ino
    fh = await vfs.open(ino, os.O_RDONLY)
    try:
        return await vfs.read(fh, 0, 1 << 30)
    finally:
        await vfs.release(fh)


async def _populate() -> tuple[MemoryStore, dict[str, int]]:
    """A volume with dirs a/ and b/, a big and a small file in each, a hard link."""
    store = MemoryStore()
    await Volume.create(store, PASSPHRASE.encode(), kdf_params=TEST_KDF)
    vfs = await _open(store)
    inos: dict[str, int] = {}
    for d in (b"a", b"b"):
        inos[d.decode()] = (await vfs.mkdir(1, d, 0o755, CTX)).ino
        await vfs_write_file(vfs, inos[d.decode()], b"big", BIG[d])
        await vfs_write_file(vfs, inos[d.decode()], b"small", b"small " + d)
    inos["linked"] = await vfs_write_file(vfs, inos["a"], b"linked", b"hard link content")
    await vfs.link(inos["linked"], inos["b"], b"linked2")
    await vfs.close()
    return store, inos


def _keys(store: MemoryStore, prefix: str) -> list[str]:
    return sorted(k for k in store._objects if k.startswith(prefix))


async def _raw(store: MemoryStore, key: str) -> bytes:
    return await store.get(key)


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


# ---------------------------------------------------------------- header


def test_header_flip_and_kdf_swap() -> None:
    async def main() -> None:
        store, _ = await _populate()
        blob = await _raw(store, HEADER_KEY)
        await store.put(HEADER_KEY, blob.replace(b'"lanes": 1', b'"lanes": 2'))
        with pytest.raises(CorruptHeader):
            await Volume.open(store, PASSPHRASE.encode())
        await store.put(HEADER_KEY, blob[:-40])
        with pytest.raises(CorruptHeader):
            await Volume.open(store, PASSPHRASE.encode())
        await store.put(HEADER_KEY, blob)
        with pytest.raises(WrongPassphrase):
            await Volume.open(store, b"not it")

    run(main)


# ------------------------------------------------------------- directories


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x40]) + data[pos + 1 :]


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "swap"])
def test_directory_object_damage(damage: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        store, inos = await _populate()
        vol = await Volume.open(store, PASSPHRASE.encode())
        key_a, key_b = vol.dir_key(inos["a"]), vol.dir_key(inos["b"])
        blob = await _raw(store, key_a)
        bad = {
            "flip": _flip(blob, len(blob) // 2),
            "truncate": blob[:-1],
            "extend": blob + b"\0",
            "swap": await _raw(store, key_b),
        }[damage]
        await store.put(key_a, bad)
        vfs = await _open(store)
        with pytest.raises(IntegrityError, match=key_a):
            await vfs.lookup(inos["a"], b"small")
        # The other directory and the root are unaffected.
        assert await _read(vfs, inos["b"], b"small") == b"small b"
        assert {n for n, _, _ in await vfs.readdir(1, 0)} == {b"a", b"b"}

    run(main)


def test_directory_rollback_refused_across_remount(tmp_path: Path) -> None:
    async def main() -> None:
        store, inos = await _populate()
        state = tmp_path / "state"
        vfs = await _open(store, state)
        old = await _raw(store, vfs.volume.dir_key(inos["a"]))
        await vfs_write_file(vfs, inos["a"], b"newer", b"v2")
        await vfs.close()
        # The client has seen the newer version; the store serves the old one.
        await store.put(vfs.volume.dir_key(inos["a"]), old)
        vfs2 = await _open(store, state)
        with pytest.raises(IntegrityError, match="rollback"):
            await vfs2.lookup(inos["a"], b"small")
        # A client that never saw the newer version cannot tell, by design.
        vfs3 = await _open(store, tmp_path / "other-state")
        assert await _read(vfs3, inos["a"], b"small") == b"small a"

    run(main)


def test_rollback_table_saves_overlapping_commits_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two saves of the rollback table at once (its file is written in a worker
    thread, here the first one slowly): the second waits for the first and writes
    the newer table, so the file ends up with every version seen."""
    real_write = drive._write_durably
    writes: list[bytes] = []

    def slow_first_write(path: Path, data: bytes) -> None:
        writes.append(data)
        if len(writes) == 1:
            time.sleep(0.3)
        real_write(path, data)

    monkeypatch.setattr(drive, "_write_durably", slow_first_write)

    async def main() -> None:
        store = MemoryStore()
        await Volume.create(store, PASSPHRASE.encode(), kdf_params=TEST_KDF)
        volume = await Volume.open(store, PASSPHRASE.encode(), state_root=tmp_path)
        volume._check_version("d/one", 3)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(volume.save_state)
            await trio.testing.wait_all_tasks_blocked()  # the first is in its thread
            volume._check_version("d/two", 7)
            nursery.start_soon(volume.save_state)
        assert not volume._state_dirty and len(writes) == 2
        again = await Volume.open(store, PASSPHRASE.encode(), state_root=tmp_path)
        assert again._seen["d/one"] == 3 and again._seen["d/two"] == 7

    run(main)


def test_root_rollback_refused() -> None:
    async def main() -> None:
        store, _inos = await _populate()
        vol = await Volume.open(store, PASSPHRASE.encode())
        root_key = vol.dir_key(1)
        old = await _raw(store, root_key)
        vfs = await _open(store)
        await vfs.mkdir(1, b"c", 0o755, CTX)
        await vfs.close()
        await store.put(root_key, old)
        with pytest.raises(IntegrityError, match="rollback"):
            await vfs.volume.load_dir(1)

    run(main)


# ------------------------------------------------------------- inode objects


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap-with-dir", "replay"])
def test_inode_object_damage(damage: str) -> None:
    async def main() -> None:
        store, inos = await _populate()
        vfs = await _open(store)
        key = vfs.volume.inode_key(inos["linked"])
        assert key in _keys(store, "i/")
        blob = await _raw(store, key)
        if damage == "replay":
            # A newer version is written and seen, then the old one comes back.
            await vfs.lookup(inos["a"], b"linked")
            await vfs.setattr(inos["linked"], mode=0o600)
            await vfs.commit()
            bad = blob
        else:
            bad = {
                "flip": _flip(blob, 30),
                "truncate": blob[:20],
                "swap-with-dir": await _raw(store, vfs.volume.dir_key(inos["a"])),
            }[damage]
        await store.put(key, bad)
        if damage == "replay":
            with pytest.raises(IntegrityError, match="rollback"):
                await vfs.volume.load_inode(inos["linked"])
            return
        vfs2 = await _open(store)
        # Only the hard-linked file is lost, under both its names.
        with pytest.raises(IntegrityError, match=key):
            await vfs2.lookup(inos["a"], b"linked")
        with pytest.raises(IntegrityError, match=key):
            await vfs2.lookup(inos["b"], b"linked2")
        assert await _read(vfs2, inos["a"], b"small") == b"small a"

    run(main)


# ------------------------------------------------------------------ chunks


@pytest.mark.parametrize(
    "damage", ["flip", "truncate", "drop-last-block", "extend", "swap", "missing"]
)
def test_chunk_damage(damage: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        store, inos = await _populate()
        chunk_keys = _keys(store, "c/")
        assert len(chunk_keys) == 4  # two chunks per big file, contents differ
        vfs = await _open(store)
        ino = (await vfs.lookup(inos["a"], b"big")).ino
        first = vfs.nodes[ino].record.chunks[0]
        from megafs.format.chunks import chunk_key

        key = chunk_key(first.cid)
        blob = await _raw(store, key)
        other = next(k for k in chunk_keys if k != key)
        if damage == "missing":
            await store.delete(key)
        else:
            bad = {
                "flip": _flip(blob, SEALED_BLOCK_SIZE + 100),
                "truncate": blob[:-5],
                "drop-last-block": blob[
                    : len(blob) - (len(blob) % SEALED_BLOCK_SIZE or SEALED_BLOCK_SIZE)
                ],
                "extend": blob + blob[:SEALED_BLOCK_SIZE],
                "swap": await _raw(store, other),
            }[damage]
            await store.put(key, bad)
        vfs2 = await _open(store)
        with caplog.at_level(logging.ERROR):
            with pytest.raises(IntegrityError, match=key.split("/")[-1][:16]):
                await _read(vfs2, inos["a"], b"big")
        # Other files, including the other big one, read fine.
        assert await _read(vfs2, inos["b"], b"big") == BIG[b"b"]
        assert await _read(vfs2, inos["a"], b"small") == b"small a"

    run(main)


def test_metadata_object_missing_for_an_instant_is_read_again() -> None:
    """A store without atomic replace may show a reader no object (or half of one) while
    it is being replaced: a metadata object is fetched once more before that counts;
    one that stays missing is damage (IntegrityError -> EIO)."""

    async def main() -> None:
        store, inos = await _populate()
        faulty = FaultyStore(store)
        vol = await Volume.open(faulty, PASSPHRASE.encode())
        key = vol.dir_key(inos["a"])
        faulty.fail_next("get", ObjectNotFound(key))
        assert {e for e in (await vol.load_dir(inos["a"])).entries} >= {b"big", b"small"}
        faulty.fail_next("get", ObjectNotFound(key), count=2)
        with pytest.raises(IntegrityError, match=f"directory object {key} is missing"):
            await vol.load_dir(inos["a"])

    run(main)
