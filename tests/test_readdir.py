"""readdir pages through a directory by cookie: every entry exactly once while the
directory changes between pages, and at a cost linear in its size (the kernel asks for
a large directory in many small pages)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import trio
from conftest import PASSPHRASE, TEST_KDF, needs_fuse, new_mount

from megafs.stores import MemoryStore
from megafs.vfs.fs import Ctx, Vfs
from megafs.volume.drive import Volume

CTX = Ctx(0, 0, 0o022)
PAGE = 25  # about what one 4 KiB READDIRPLUS reply holds


async def _vfs_with_dir(n: int) -> tuple[Vfs, int]:
    inner = MemoryStore()
    await Volume.create(inner, PASSPHRASE.encode(), kdf_params=TEST_KDF)
    vfs = Vfs(await Volume.open(inner, PASSPHRASE.encode()))
    await vfs.start()
    d = (await vfs.mkdir(1, b"d", 0o755, CTX)).ino
    for i in range(n):
        fh, _ = await vfs.create(d, b"f%05d" % i, 0o644, os.O_WRONLY, CTX)
        await vfs.release(fh)
    return vfs, d


async def _pages(vfs: Vfs, d: int, between: object = None) -> list[bytes]:
    """All names, PAGE at a time, resuming from the last cookie like the kernel."""
    names: list[bytes] = []
    cookie = 0
    while True:
        page = []
        for name, _attr, c in await vfs.readdir(d, cookie):
            page.append(name)
            cookie = c
            if len(page) == PAGE:
                break
        if not page:
            return names
        names += page
        if callable(between):
            await between(len(names))


def test_paging_sees_each_entry_once_while_the_directory_changes() -> None:
    async def main() -> None:
        vfs, d = await _vfs_with_dir(200)

        async def change(seen: int) -> None:
            if seen == 50:
                await vfs.unlink(d, b"f00010")  # already listed
                await vfs.unlink(d, b"f00150")  # not yet listed: must not appear
                fh, _ = await vfs.create(d, b"new", 0o644, os.O_WRONLY, CTX)
                await vfs.release(fh)  # newer cookie: listed at the end
                await vfs.rename(d, b"f00100", d, b"f00100-renamed", 0)

        names = await _pages(vfs, d, change)
        assert len(names) == len(set(names))
        assert b"f00150" not in names and b"f00100" not in names
        assert names[-2:] == [b"new", b"f00100-renamed"]
        assert b"f00010" in names
        assert len(names) == 200 - 2 + 2
        # A fresh listing: the current state, in cookie order.
        assert sorted(await _pages(vfs, d)) == sorted(
            [b"f%05d" % i for i in range(200) if i not in (10, 100, 150)]
            + [b"new", b"f00100-renamed"]
        )
        await vfs.close()

    trio.run(main)


def test_paging_cost_grows_linearly() -> None:
    async def timed(n: int) -> float:
        vfs, d = await _vfs_with_dir(n)
        t0 = time.perf_counter()
        assert len(await _pages(vfs, d)) == n
        t = time.perf_counter() - t0
        await vfs.close()
        return t

    async def main() -> None:
        small = min([await timed(1000) for _ in range(3)])
        large = min([await timed(8000) for _ in range(3)])
        # 8x the entries: linear is ~8x; quadratic (each page scanning the whole
        # directory) would be ~64x. Allow noise.
        assert large < small * 24, (small, large)

    trio.run(main)


@needs_fuse
def test_a_listing_through_the_mount_has_dot_and_dot_dot_once(tmp_path: Path) -> None:
    m = new_mount(tmp_path)
    m.start()
    try:
        d = m.path / "big"
        d.mkdir()
        (d / "sub").mkdir()
        for i in range(3000):  # (many READDIRPLUS pages)
            (d / f"f{i:05d}").touch()

        def listing(p: Path) -> list[str]:
            out = subprocess.run(["ls", "-f", str(p)], capture_output=True, text=True, check=True)
            return out.stdout.split()

        names = listing(d)
        assert names[:2] == [".", ".."]
        assert sorted(names[2:]) == sorted(["sub", *(f"f{i:05d}" for i in range(3000))])
        assert listing(d / "sub") == [".", ".."]
        assert listing(m.path)[:2] == [".", ".."]
        # ".." is the parent: the same inode as stat says.
        assert os.stat(d / "sub" / "..").st_ino == os.stat(d).st_ino
        out = subprocess.run(["ls", "-lai", str(d / "sub")], capture_output=True, text=True)
        inos = {line.split()[-1]: int(line.split()[0]) for line in out.stdout.splitlines()[1:]}
        assert inos == {".": os.stat(d / "sub").st_ino, "..": os.stat(d).st_ino}
    finally:
        m.stop()
