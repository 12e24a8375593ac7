"""The inode table shrinks: directories nobody uses whose entries the kernel has
forgotten are unloaded (their entries' nodes dropped) and loaded again from their
directory objects when next used, with the same inode numbers and nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import trio
from conftest import PASSPHRASE, TEST_KDF, needs_fuse, new_mount, vfs_write_file

from megafs.stores import MemoryStore
from megafs.vfs.fs import Ctx, Vfs
from megafs.volume.check import check_volume
from megafs.volume.drive import ROOT_INO, Volume

CTX = Ctx(0, 0, 0o022)


async def _new_vfs() -> tuple[Volume, Vfs]:
    store = MemoryStore()
    await Volume.create(store, PASSPHRASE.encode(), kdf_params=TEST_KDF)
    vol = await Volume.open(store, PASSPHRASE.encode())
    vfs = Vfs(vol)
    await vfs.start()
    return vol, vfs


async def _read(vfs: Vfs, parent: int, name: bytes) -> bytes:
    attr = await vfs.lookup(parent, name)
    fh = await vfs.open(attr.ino, os.O_RDONLY)
    try:
        return await vfs.read(fh, 0, 1 << 20)
    finally:
        await vfs.release(fh)
        vfs.forget(attr.ino, 1)


def _forget_all(vfs: Vfs) -> None:
    """What the kernel does when it drops its caches: forget every inode it holds."""
    for ino, node in list(vfs.nodes.items()):
        if ino != ROOT_INO and node.lookups:
            vfs.forget(ino, node.lookups)


def test_cold_directories_are_unloaded_and_come_back_whole() -> None:
    async def main() -> None:
        vol, vfs = await _new_vfs()
        top = (await vfs.mkdir(ROOT_INO, b"top", 0o755, CTX)).ino
        sub = (await vfs.mkdir(top, b"sub", 0o755, CTX)).ino
        inos = {}
        for i in range(50):
            name = b"f%d" % i
            inos[name] = await vfs_write_file(vfs, sub, name, name * (1 + 3000 * (i % 3)))
        big = await vfs_write_file(vfs, top, b"big", os.urandom(300_000))
        await vfs.sync()
        before = len(vfs.nodes)

        # Used since the last sweep, or still known to the kernel: kept.
        _forget_all(vfs)
        assert vfs.evict_cold() == 0  # (everything was touched since the start)
        assert vfs.evict_cold() == 52  # sub's 50 files, then top's sub and big
        assert len(vfs.nodes) == before - 52
        assert vfs.nodes[top].entries is None and sub not in vfs.nodes

        # Loaded again on use: the same inode numbers, the same content.
        sub_again = (await vfs.lookup(top, b"sub")).ino
        assert sub_again == sub
        for name, ino in inos.items():
            assert (await vfs.lookup(sub, name)).ino == ino
            vfs.forget(ino, 1)
            assert await _read(vfs, sub, name) == name * (1 + 3000 * (int(name[1:]) % 3))
        assert (await vfs.lookup(top, b"big")).ino == big

        # Changes to a reloaded directory are committed as usual.
        _forget_all(vfs)
        vfs.evict_cold()
        vfs.evict_cold()
        await vfs.lookup(top, b"sub")  # (as the kernel would, to reach it)
        await vfs_write_file(vfs, sub, b"new", b"after the reload")
        await vfs.unlink(sub, b"f1")
        await vfs.rename(sub, b"f2", top, b"moved")
        await vfs.sync()
        assert not (await check_volume(vol)).problems
        _forget_all(vfs)
        vfs.evict_cold()
        vfs.evict_cold()
        assert sub not in vfs.nodes
        await vfs.lookup(top, b"sub")
        assert await _read(vfs, sub, b"new") == b"after the reload"
        assert await _read(vfs, top, b"moved") == b"f2" * 6001
        assert b"f1" not in (vfs.nodes[sub].entries or {})

    trio.run(main)


def test_what_is_in_use_or_not_committed_stays() -> None:
    async def main() -> None:
        _vol, vfs = await _new_vfs()
        dirs = {}
        for name in (b"looked-up", b"open", b"dirty", b"uncommitted", b"listing"):
            dirs[name] = (await vfs.mkdir(ROOT_INO, name, 0o755, CTX)).ino
            await vfs_write_file(vfs, dirs[name], b"f", b"x")
        await vfs.sync()
        _forget_all(vfs)
        await vfs.lookup(dirs[b"looked-up"], b"f")  # the kernel holds it
        fh = await vfs.open((await vfs.lookup(dirs[b"open"], b"f")).ino, os.O_RDWR)
        vfs.forget((await vfs.lookup(dirs[b"open"], b"f")).ino, 2)  # open, not looked up
        wh = await vfs.open((await vfs.lookup(dirs[b"dirty"], b"f")).ino, os.O_RDWR)
        await vfs.write(wh, 0, b"not staged yet")
        await vfs.release(wh)
        vfs.forget((await vfs.lookup(dirs[b"dirty"], b"f")).ino, 2)
        fresh = await vfs_write_file(
            vfs, dirs[b"uncommitted"], b"g", b"y"
        )  # directory not committed
        vfs.forget(fresh, 1)
        dh = await vfs.opendir(dirs[b"listing"])
        vfs.evict_cold()  # (the sweep that forgets what was touched before)
        vfs.evict_cold()
        assert {n: vfs.nodes[i].entries is not None for n, i in dirs.items()} == {
            b"looked-up": True,
            b"open": True,
            b"dirty": True,
            b"uncommitted": True,
            b"listing": True,
        }
        await vfs.release(fh)
        await vfs.releasedir(dh)
        vfs.forget((await vfs.lookup(dirs[b"looked-up"], b"f")).ino, 2)
        await vfs.sync()
        vfs.evict_cold()
        vfs.evict_cold()
        assert all(vfs.nodes[i].entries is None for i in dirs.values())
        assert await _read(vfs, dirs[b"dirty"], b"f") == b"not staged yet"
        assert await _read(vfs, dirs[b"uncommitted"], b"g") == b"y"

    trio.run(main)


@needs_fuse
def test_a_mount_drops_what_the_kernel_forgot(tmp_path: Path) -> None:
    m = new_mount(tmp_path, options=["inode_cache=100", "commit_interval=0.1"])
    m.start()
    try:
        for d in range(4):
            (m.path / f"d{d}").mkdir()
            for i in range(150):
                (m.path / f"d{d}" / f"f{i}").write_bytes(b"%d/%d" % (d, i))
        inos = {p: os.stat(m.path / p).st_ino for p in ("d0/f0", "d3/f149")}
        os.sync()

        def rss_nodes() -> int:
            status = subprocess.run(
                ["getfattr", "--only-values", "-n", "user.megafs.status", str(m.path)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            return int(json.loads(status)["inodes"])

        assert rss_nodes() > 600
        Path("/proc/sys/vm/drop_caches").write_text("2")  # the kernel forgets them
        deadline = time.monotonic() + 20
        while rss_nodes() > 100 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rss_nodes() <= 100
        # All there, with the same inode numbers, and writable.
        for d in range(4):
            for i in range(150):
                assert (m.path / f"d{d}" / f"f{i}").read_bytes() == b"%d/%d" % (d, i)
        assert {p: os.stat(m.path / p).st_ino for p in inos} == inos
        (m.path / "d1" / "new").write_bytes(b"new")
        os.rename(m.path / "d2" / "f0", m.path / "d0" / "moved")
    finally:
        m.stop()
    m.start()
    try:
        assert (m.path / "d1" / "new").read_bytes() == b"new"
        assert (m.path / "d0" / "moved").read_bytes() == b"2/0"
        assert not (m.path / "d2" / "f0").exists()
    finally:
        m.stop()
