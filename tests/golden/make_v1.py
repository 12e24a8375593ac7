"""Write the committed format-v1 sample volume (run once; never regenerate it).

    .venv/bin/python tests/golden/make_v1.py tests/golden/v1

The golden test checks that every later megafs still opens it and reads exactly the
contents described in tests/test_golden.py.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import trio

from megafs.format.chunks import CHUNK_SIZE
from megafs.stores import LocalStore
from megafs.vfs.fs import Ctx, Vfs
from megafs.volume.drive import Volume

PASSPHRASE = b"megafs golden v1"
T = 1_600_000_000_123_456_789


def medium() -> bytes:
    return bytes(i % 251 for i in range(100_000))


async def main(dest: Path) -> None:
    store = LocalStore(dest)
    await Volume.create(store, PASSPHRASE, uid=1000, gid=1000, now_ns=T)
    vol = await Volume.open(store, PASSPHRASE)
    vfs = Vfs(vol)
    await vfs.start()
    ctx = Ctx(1000, 1000, 0o022)
    docs = (await vfs.mkdir(1, "Dokumente ü".encode(), 0o750, ctx)).ino
    fh, a = await vfs.create(docs, b"small.txt", 0o640, os.O_WRONLY, ctx)
    await vfs.write(fh, 0, b"golden small file\n")
    await vfs.release(fh)
    fh, b = await vfs.create(1, b"medium.bin", 0o644, os.O_WRONLY, ctx)
    await vfs.write(fh, 0, medium())
    await vfs.release(fh)
    fh, c = await vfs.create(1, b"sparse.bin", 0o600, os.O_WRONLY, ctx)
    await vfs.write(fh, 2 * CHUNK_SIZE + 5, b"after the hole")
    await vfs.release(fh)
    await vfs.link(a.ino, 1, b"hardlink.txt")
    await vfs.symlink(1, b"link", "Dokumente ü/small.txt".encode(), ctx)
    await vfs.mknod(1, b"fifo", stat.S_IFIFO | 0o644, 0, ctx)
    await vfs.setxattr(b.ino, b"user.comment", b"golden xattr")
    for ino in (a.ino, b.ino, c.ino, docs):
        await vfs.setattr(ino, atime_ns=T, mtime_ns=T)
    await vfs.close()


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]))
