"""The inode table shrinks: directories nobody uses whose entries the kernel has
forgotten are unloaded (their entries' nodes dropped) and loaded again from their
directory objects when next used, with the same inode numbers and nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_random_changes_with_sweeps_in_between_match_a_model(seed: int) -> None:
    """Namespace changes and sweeps interleaved (the kernel forgetting everything
    each time): the tree always matches a plain model, and the volume checks clean."""
    import random

    rng = random.Random(seed)

    async def walk(vfs: Vfs, ino: int, path: str, out: dict[str, bytes | None]) -> None:
        fh = await vfs.opendir(ino)
        try:
            listing = [(name, attr) for name, attr, _ in await vfs.readdir(ino, 0)]
        finally:
            await vfs.releasedir(fh)
        for name, attr in listing:
            p = f"{path}/{name.decode()}"
            if attr.mode & 0o040000:
                out[p] = None
                await walk(vfs, attr.ino, p, out)
            else:
                out[p] = await _read(vfs, ino, name)

    async def resolve(vfs: Vfs, path: str) -> int:
        ino = ROOT_INO
        for part in filter(None, path.split("/")):
            attr = await vfs.lookup(ino, part.encode())
            vfs.forget(attr.ino, 1)
            ino = attr.ino
        return ino

    async def main() -> None:
        vol, vfs = await _new_vfs()
        model: dict[str, bytes | None] = {}  # path -> content (None: a directory)
        dropped = 0

        def dirs() -> list[str]:
            return [""] + [p for p, c in model.items() if c is None]

        for step in range(400):
            ops = ["mkdir", "file", "file", "unlink", "rename", "rmdir", "sweep"]
            op = "link" if rng.random() < 0.02 else rng.choice(ops)
            if op == "mkdir" or op == "file":
                parent = rng.choice(dirs())
                path = f"{parent}/{'d' if op == 'mkdir' else 'f'}{step}"
                pino = await resolve(vfs, parent)
                if op == "mkdir":
                    attr = await vfs.mkdir(pino, path.rsplit("/", 1)[1].encode(), 0o755, CTX)
                    vfs.forget(attr.ino, 1)
                    model[path] = None
                else:
                    data = os.urandom(rng.choice([10, 5000, 70_000]))
                    ino = await vfs_write_file(vfs, pino, path.rsplit("/", 1)[1].encode(), data)
                    vfs.forget(ino, 1)
                    model[path] = data
            elif op in ("unlink", "rmdir"):
                if op == "unlink":
                    gone = [p for p, c in model.items() if c is not None]
                else:  # (empty directories)
                    gone = [p for p in dirs()[1:] if not any(q.startswith(p + "/") for q in model)]
                if gone:
                    path = rng.choice(gone)
                    parent, name = path.rsplit("/", 1)
                    remove = vfs.unlink if op == "unlink" else vfs.rmdir
                    await remove(await resolve(vfs, parent), name.encode())
                    del model[path]
            elif op == "link":
                files = [p for p, c in model.items() if c is not None]
                if files:
                    src = rng.choice(files)
                    dst_dir = rng.choice(dirs())
                    attr = await vfs.lookup(
                        await resolve(vfs, src.rsplit("/", 1)[0]), src.rsplit("/", 1)[1].encode()
                    )
                    linked = await vfs.link(attr.ino, await resolve(vfs, dst_dir), b"l%d" % step)
                    vfs.forget(attr.ino, 1)
                    vfs.forget(linked.ino, 1)
                    model[f"{dst_dir}/l{step}"] = model[src]
            elif op == "rename" and model:
                src = rng.choice(list(model))
                targets = [d for d in dirs() if d != src and not d.startswith(src + "/")]
                dst_dir = rng.choice(targets)
                dst = f"{dst_dir}/r{step}"
                sp, sn = src.rsplit("/", 1)
                await vfs.rename(
                    await resolve(vfs, sp),
                    sn.encode(),
                    await resolve(vfs, dst_dir),
                    dst[len(dst_dir) + 1 :].encode(),
                )
                for p in [p for p in model if p == src or p.startswith(src + "/")]:
                    model[dst + p[len(src) :]] = model.pop(p)
            else:
                if rng.random() < 0.7:
                    await vfs.sync()
                _forget_all(vfs)
                vfs.evict_cold()
                dropped += vfs.evict_cold()
        assert dropped > 50  # (the sweeps did unload directories along the way: 122-294)
        await vfs.sync()
        _forget_all(vfs)
        vfs.evict_cold()
        vfs.evict_cold()
        seen: dict[str, bytes | None] = {}
        await walk(vfs, ROOT_INO, "", seen)
        assert seen == model
        assert not (await check_volume(vol)).problems
        # And a fresh open of the volume sees the same tree.
        vfs2 = Vfs(await Volume.open(vol.store, PASSPHRASE.encode()))
        await vfs2.start()
        again: dict[str, bytes | None] = {}
        await walk(vfs2, ROOT_INO, "", again)
        assert again == model

    trio.run(main)
