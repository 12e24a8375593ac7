"""The committed format-v1 sample volume must always open and read back exactly."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest
import trio
from conftest import Mount, fuse_available

from megafs.format.chunks import CHUNK_SIZE
from megafs.stores import LocalStore
from megafs.vfs.fs import Vfs
from megafs.volume.drive import Volume

GOLDEN = Path(__file__).parent / "golden" / "v1"
PASSPHRASE = b"megafs golden v1"
T = 1_600_000_000_123_456_789
MEDIUM_SHA = hashlib.sha256(bytes(i % 251 for i in range(100_000))).hexdigest()


def _copy(tmp_path: Path) -> Path:
    dest = tmp_path / "golden-v1"
    shutil.copytree(GOLDEN, dest)
    return dest


def test_golden_v1_reads_back_in_process(tmp_path: Path) -> None:
    async def main() -> None:
        vol = await Volume.open(LocalStore(_copy(tmp_path)), PASSPHRASE, read_only=True)
        vfs = Vfs(vol, read_only=True)
        await vfs.start()

        async def read(parent: int, name: bytes) -> tuple[int, bytes]:
            ino = (await vfs.lookup(parent, name)).ino
            fh = await vfs.open(ino, os.O_RDONLY)
            data = await vfs.read(fh, 0, 1 << 30)
            await vfs.release(fh)
            return ino, data

        names = sorted(n for n, _, _ in await vfs.readdir(1, 0))
        assert names == sorted(
            [b"Dokumente \xc3\xbc", b"medium.bin", b"sparse.bin", b"hardlink.txt", b"link", b"fifo"]
        )
        docs = await vfs.lookup(1, "Dokumente ü".encode())
        assert stat.S_ISDIR(docs.mode) and docs.mode & 0o7777 == 0o750
        assert (docs.uid, docs.gid, docs.mtime_ns) == (1000, 1000, T)
        ino_a, small = await read(docs.ino, b"small.txt")
        assert small == b"golden small file\n"
        ino_h, hard = await read(1, b"hardlink.txt")
        assert (ino_h, hard) == (ino_a, small)
        assert (await vfs.getattr(ino_a)).nlink == 2
        ino_m, medium = await read(1, b"medium.bin")
        assert hashlib.sha256(medium).hexdigest() == MEDIUM_SHA
        assert await vfs.getxattr(ino_m, b"user.comment") == b"golden xattr"
        attr = await vfs.getattr(ino_m)
        assert (attr.mode, attr.mtime_ns, attr.atime_ns) == (0o100644, T, T)
        _, sparse = await read(1, b"sparse.bin")
        assert len(sparse) == 2 * CHUNK_SIZE + 5 + 14
        assert sparse[-14:] == b"after the hole" and sparse.count(0) == len(sparse) - 14
        link = await vfs.lookup(1, b"link")
        assert await vfs.readlink(link.ino) == "Dokumente ü/small.txt".encode()
        assert stat.S_ISFIFO((await vfs.lookup(1, b"fifo")).mode)
        await vfs.close()

    trio.run(main)


@pytest.mark.skipif(not fuse_available, reason="/dev/fuse is not usable here")
def test_golden_v1_mounts_read_only(tmp_path: Path) -> None:
    m = Mount(
        _copy(tmp_path),
        tmp_path / "mnt",
        tmp_path / "cache",
        tmp_path / "log",
        ["ro"],
        passphrase=PASSPHRASE.decode(),
    )
    m.start()
    try:
        assert (m.path / "hardlink.txt").read_bytes() == b"golden small file\n"
        assert os.readlink(m.path / "link") == "Dokumente ü/small.txt"
        with pytest.raises(OSError) as info:
            (m.path / "new").write_bytes(b"x")
        assert info.value.errno == 30  # EROFS
    finally:
        m.stop()
    m.assert_clean_log()
