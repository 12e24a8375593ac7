"""The SDK (megafs.sdk): path operations, files, errors, the sync wrapper, durability,
the lease against a live mount, and interoperation with a real FUSE mount."""

from __future__ import annotations

import errno
import filecmp
import itertools
import os
import random
import re
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import PASSPHRASE, Mount, make_volume, needs_fuse, new_mount, serving

import megafs.sdk
import megafs.sdk.sync
from megafs.errors import FsError, MegafsError, WrongPassphrase
from megafs.format.chunks import CHUNK_SIZE
from megafs.stack import OpenError
from megafs.volume.lease import LeaseHeld

MiB = 1 << 20


def data(n: int, seed: int = 1) -> bytes:

    return random.Random(seed).randbytes(n)


def run_on(tmp_path: Path, fn: Callable[[megafs.sdk.Drive], Awaitable[Any]], **kw: Any) -> Any:
    """Run ``fn(drive)`` on the volume in ``tmp_path/store`` (made if missing)."""
    store = tmp_path / "store"
    if not store.exists():
        make_volume(store)

    kw.setdefault("cache_dir", tmp_path / "cache")

    async def main() -> Any:
        async with megafs.sdk.open_drive(str(store), passphrase=PASSPHRASE, **kw) as drive:
            return await fn(drive)

    return trio.run(main)


# ------------------------------------------------------------------ files


def test_file_round_trips(tmp_path: Path) -> None:
    big = data(2 * CHUNK_SIZE + 12345)

    async def write(d: megafs.sdk.Drive) -> None:
        async with await d.open("big", "wb") as f:
            for i in range(0, len(big), 3 * MiB):  # pieces that straddle chunks
                assert await f.write(big[i : i + 3 * MiB]) == len(big[i : i + 3 * MiB])
            assert await f.tell() == len(big)
        async with await d.open("small", "w+b") as f:
            await f.write(b"hello world")
            assert await f.seek(6) == 6
            assert await f.read(3) == b"wor"
            assert await f.tell() == 9
            await f.seek(-2, os.SEEK_END)
            assert await f.read() == b"ld"
            assert await f.read() == b""
            assert await f.truncate(5) == 5
            assert await f.tell() == 11  # truncate does not move the position
            await f.seek(0)
            assert await f.read() == b"hello"
        async with await d.open("small", "ab") as f:
            await f.write(b", again")
            assert await f.tell() == 12
        async with await d.open("small", "r+b") as f:
            await f.seek(0)
            await f.write(b"J")
            await f.seek(20)
            await f.write(b"!")  # past the end: a hole of zeros
        with pytest.raises(FileExistsError):
            await d.open("small", "xb")
        async with await d.open("fresh", "xb") as f:
            await f.write(b"x")

    async def check(d: megafs.sdk.Drive) -> None:
        assert await d.read_bytes("big") == big
        assert await d.read_bytes("small") == b"Jello, again" + bytes(8) + b"!"
        async with await d.open("big") as f:
            await f.seek(CHUNK_SIZE - 10)
            assert await f.read(20) == big[CHUNK_SIZE - 10 : CHUNK_SIZE + 10]
            got = b"".join([piece async for piece in f.chunks(MiB)])
            assert got == big[CHUNK_SIZE + 10 :]
            assert (await f.stat()).st_size == len(big)
            assert f.readable() and not f.writable()
            with pytest.raises(OSError) as info:
                await f.write(b"no")
            assert info.value.errno == errno.EBADF
        f = await d.open("fresh", "rb")
        await f.aclose()
        await f.aclose()  # idempotent
        with pytest.raises(ValueError, match="closed file"):
            await f.read()

    run_on(tmp_path, write)
    run_on(tmp_path, check)  # a new opening: everything came back from the store


def test_text_modes_are_refused(tmp_path: Path) -> None:
    async def go(d: megafs.sdk.Drive) -> None:
        for mode in ("rt", "w+t", "rw", "q", "rr"):
            with pytest.raises(ValueError):
                await d.open("f", mode)

    run_on(tmp_path, go)


# ------------------------------------------------------------------ namespace


def test_namespace_and_metadata(tmp_path: Path) -> None:
    async def go(d: megafs.sdk.Drive) -> None:
        await d.mkdir("a/b/c", parents=True)
        await d.mkdir("a/b/c", parents=True, exist_ok=True)
        await d.mkdir("a/b", exist_ok=True)
        await d.write_bytes("a/b/c/f", b"12345")
        await d.chmod("a/b/c/f", 0o640)
        await d.utime("a/b/c/f", (1_000_000_000_123, 2_000_000_000_456))
        st = await d.stat("/a/b/c/f")
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_size == 5
        assert st.st_mtime_ns == 2_000_000_000_456 and st.st_mtime == 2000.000000456
        assert st.st_uid == os.getuid() and st.st_nlink == 1
        await d.chown("a/b/c/f", 1234, -1)
        assert ((await d.stat("a/b/c/f")).st_uid, (await d.stat("a/b/c/f")).st_gid) == (
            1234,
            st.st_gid,
        )
        async with await d.open("a/b/c/f", os.O_RDWR | os.O_CREAT) as f:  # os.open flags
            assert await f.read() == b"12345"  # O_CREAT without O_TRUNC keeps the content
        async with await d.open("a/b/c/f", os.O_RDONLY) as f:
            with pytest.raises(OSError) as info:
                await f.truncate(0)  # as ftruncate(2) on a read-only descriptor
            assert info.value.errno == errno.EINVAL
        st = await d.stat("/a/b/c/f")

        # scandir carries the same full status as stat
        entries = await d.scandir("a/b/c")
        assert [(e.name, e.path) for e in entries] == [("f", "/a/b/c/f")]
        assert entries[0].stat == st and entries[0].is_file() and not entries[0].is_dir()

        await d.symlink("b/c/f", "a/ln")
        assert await d.readlink("a/ln") == "b/c/f"
        assert (await d.lstat("a/ln")).st_mode & stat.S_IFMT(0o170000) == stat.S_IFLNK
        assert (await d.stat("a/ln")).st_ino == st.st_ino  # followed
        assert await d.read_bytes("a/ln") == b"12345"
        await d.symlink("..", "a/b/up")
        assert await d.read_bytes("a/b/up/b/c/f") == b"12345"  # links inside a path
        await d.symlink("/etc/passwd", "abs")
        with pytest.raises(FileNotFoundError, match="outside the drive"):
            await d.read_bytes("abs")
        assert not await d.exists("abs") and await d.exists("a/ln")

        await d.link("a/b/c/f", "hard")
        assert (await d.stat("hard")).st_nlink == 2
        assert (await d.stat("hard")).st_ino == st.st_ino

        await d.setxattr("hard", "user.colour", b"blue")
        assert await d.getxattr("a/b/c/f", "user.colour") == b"blue"
        assert await d.listxattr("hard") == ["user.colour"]
        with pytest.raises(FileExistsError):
            await d.setxattr("hard", "user.colour", b"red", os.XATTR_CREATE)
        with pytest.raises(OSError) as info:
            await d.setxattr("hard", "user.other", b"x", os.XATTR_REPLACE)
        assert info.value.errno == errno.ENODATA
        await d.removexattr("hard", "user.colour")
        assert await d.listxattr("hard") == []

        await d.rename("hard", "a/moved")
        with pytest.raises(FileExistsError):
            await d.rename("a/moved", "a/ln", replace=False)
        await d.rename("a/moved", "a/ln")  # replaces the link
        assert not await d.is_file("hard") and await d.is_file("a/ln")
        await d.truncate("a/ln", 2)
        assert await d.read_bytes("a/b/c/f") == b"12"

        assert [w async for w in d.walk("a")] == [
            ("/a", ["b"], ["ln"]),
            ("/a/b", ["c"], ["up"]),
            ("/a/b/c", [], ["f"]),
        ]
        walk = [w async for w in d.walk("/", topdown=False)]
        assert walk[-1] == ("/", ["a"], ["abs"])

        await d.remove("a/ln")
        with pytest.raises(OSError) as info:
            await d.rmdir("a")
        assert info.value.errno == errno.ENOTEMPTY
        await d.rmtree("a")
        assert await d.listdir() == ["abs"]

    run_on(tmp_path, go)


def test_errors_are_python_errors_and_megafs_errors(tmp_path: Path) -> None:
    async def go(d: megafs.sdk.Drive) -> None:
        await d.mkdir("dir")
        await d.write_bytes("file", b"x")
        cases: list[tuple[Awaitable[Any], type[OSError], int]] = [
            (d.stat("missing/x"), FileNotFoundError, errno.ENOENT),
            (d.open("missing"), FileNotFoundError, errno.ENOENT),
            (d.mkdir("dir"), FileExistsError, errno.EEXIST),
            (d.open("dir", "rb"), IsADirectoryError, errno.EISDIR),
            (d.stat("file/x"), NotADirectoryError, errno.ENOTDIR),
            (d.rmdir("file"), NotADirectoryError, errno.ENOTDIR),
            (d.link("dir", "dir2"), PermissionError, errno.EPERM),
            (d.mkdir("n" * 256), OSError, errno.ENAMETOOLONG),
        ]
        for call, cls, err in cases:
            with pytest.raises(cls) as info:
                await call
            exc = info.value
            assert exc.errno == err
            assert isinstance(exc, megafs.sdk.PathError)
            assert isinstance(exc, FsError) and isinstance(exc, MegafsError)
            assert exc.filename is not None and exc.filename.startswith("/")
        with pytest.raises(FileNotFoundError) as info2:
            await d.rename("nope", "dir/x")
        assert (info2.value.filename, info2.value.filename2) == ("/nope", "/dir/x")
        assert str(info2.value) == "[Errno 2] No such file or directory: '/nope' -> '/dir/x'"

    run_on(tmp_path, go)


def test_opening_errors(tmp_path: Path) -> None:
    make_volume(tmp_path / "store")

    async def open_with(**kw: Any) -> None:
        async with megafs.sdk.open_drive(str(tmp_path / "store"), cache_dir=tmp_path, **kw):
            pass

    with pytest.raises(WrongPassphrase):
        trio.run(lambda: open_with(passphrase="wrong"))
    with pytest.raises(MegafsError, match="passphrase= or key_file="):
        trio.run(lambda: open_with())
    with pytest.raises(MegafsError, match="MEGA account opens with mega_password="):
        trio.run(_open_mega)  # MEGA accounts: tests/mega/test_sdk.py
    with pytest.raises(OpenError, match="does not exist"):
        trio.run(lambda: megafs.sdk.open_drive(str(tmp_path / "nope"), passphrase="x").__aenter__())


async def _open_mega() -> None:
    async with megafs.sdk.open_drive("mega://someone@example.com", passphrase="x"):
        pass


def test_read_only_drive_refuses_changes(tmp_path: Path) -> None:
    run_on(tmp_path, lambda d: d.write_bytes("f", b"data"))

    async def go(d: megafs.sdk.Drive) -> None:
        assert d.read_only
        assert await d.read_bytes("f") == b"data"
        for call in (d.write_bytes("g", b""), d.mkdir("x"), d.remove("f"), d.open("f", "ab")):
            with pytest.raises(OSError) as info:
                await call
            assert info.value.errno == errno.EROFS

    run_on(tmp_path, go, read_only=True)


def test_a_closed_drive_refuses_work(tmp_path: Path) -> None:
    async def go(d: megafs.sdk.Drive) -> megafs.sdk.File:
        f = await d.open("left-open", "wb")
        await f.write(b"closed by the drive")
        return f

    f = run_on(tmp_path, go)
    assert f.closed  # files left open are closed (and committed) with the drive
    assert run_on(tmp_path, lambda d: d.read_bytes("left-open")) == b"closed by the drive"

    async def after(d: megafs.sdk.Drive) -> megafs.sdk.Drive:
        return d

    drive = run_on(tmp_path, after)
    with pytest.raises(ValueError, match="closed drive"):
        trio.run(drive.listdir)


# ------------------------------------------------------------------ durability


def test_sync_is_durable_locally_without_close(tmp_path: Path) -> None:
    """What ``sync()`` returned for survives the process dying at once (no close,
    no upload): the next opening finds it in the staging area and uploads it."""
    store = make_volume(tmp_path / "store")
    script = textwrap.dedent(
        f"""
        import os, trio, megafs.sdk
        async def main():
            async with megafs.sdk.open_drive({str(store)!r}, passphrase={PASSPHRASE!r},
                                             cache_dir={str(tmp_path / "cache")!r},
                                             commit_interval=3600) as d:
                await d.mkdir("kept")
                await d.write_bytes("kept/file", b"x" * 100000)
                await d.sync()
                os._exit(0)  # like kill -9: nothing after sync() runs
        trio.run(main)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    assert run_on(tmp_path, lambda d: d.read_bytes("kept/file")) == b"x" * 100000

    async def from_store_only(d: megafs.sdk.Drive) -> bytes:
        return await d.read_bytes("kept/file")

    # Read-only, with an empty cache: only what reached the store counts.
    got = run_on(tmp_path, from_store_only, read_only=True, cache_dir=tmp_path / "other")
    assert got == b"x" * 100000


def test_close_waits_for_the_store(tmp_path: Path) -> None:
    run_on(tmp_path, lambda d: d.write_bytes("f", data(3 * MiB)))
    assert not list((tmp_path / "cache").glob("*/staging/*.op"))


def test_progress_and_transfers(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.bin").write_bytes(data(CHUNK_SIZE + 7))
    (src / "sub" / "b.txt").write_bytes(b"bee")
    (src / "sub" / "deeper" / "empty").write_bytes(b"")
    os.symlink("sub/b.txt", src / "link")
    os.mkfifo(src / "fifo")
    os.chmod(src / "sub" / "b.txt", 0o600)
    os.utime(src / "sub", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    seen: list[tuple[int, int]] = []

    async def go(d: megafs.sdk.Drive) -> None:
        up = await d.upload(src, "copy", progress=lambda done, total: seen.append((done, total)))
        assert (up.files, up.directories, up.symlinks, up.skipped) == (3, 3, 1, 0)
        assert up.bytes == CHUNK_SIZE + 7 + 3
        assert up.not_copied == [str(src / "fifo")]
        again = await d.upload(src, "copy", skip_unchanged=True)
        assert (again.files, again.skipped, again.bytes) == (0, 3, 0)
        down = await d.download("copy", tmp_path / "back")
        assert (down.files, down.directories, down.symlinks) == (3, 3, 1)

    run_on(tmp_path, go)
    total = CHUNK_SIZE + 7 + 3
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    back = tmp_path / "back"
    for rel in ("a.bin", "sub/b.txt", "sub/deeper/empty"):
        assert filecmp.cmp(src / rel, back / rel, shallow=False)
        s, b = os.stat(src / rel), os.stat(back / rel)
        assert (s.st_mode, s.st_mtime_ns) == (b.st_mode, b.st_mtime_ns)
    assert os.readlink(back / "link") == "sub/b.txt"
    assert os.stat(back / "sub").st_mtime_ns == 1_500_000_000_000_000_000
    assert not (back / "fifo").exists()


# ------------------------------------------------------------------ sync wrapper


def test_sync_wrapper(tmp_path: Path) -> None:
    store = make_volume(tmp_path / "store")
    with megafs.sdk.sync.open_drive(
        str(store), passphrase=PASSPHRASE, cache_dir=tmp_path / "cache"
    ) as d:
        assert d.url == str(store) and not d.read_only
        d.mkdir("dir")
        with d.open("dir/f", "w+b") as f:
            f.write(b"abcdef")
            f.seek(1)
            assert f.read(3) == b"bcd"
            assert f.tell() == 4
            assert f.writable() and f.readable()
        assert f.closed
        assert list(d.open("dir/f").chunks(2)) == [b"ab", b"cd", b"ef"]
        assert [e.name for e in d.scandir("dir")] == ["f"]
        assert list(d.walk()) == [("/", ["dir"], []), ("/dir", [], ["f"])]
        for _ in d.walk():  # leaving a walk early closes it
            break
        with pytest.raises(FileNotFoundError):
            d.stat("nope")

        # many threads at once, one trio loop
        def worker(i: int) -> None:
            d.write_bytes(f"dir/t{i}", bytes([i]) * 1000)
            assert d.read_bytes(f"dir/t{i}") == bytes([i]) * 1000

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(d.listdir("dir")) == 9
        d.sync()
    with pytest.raises(ValueError, match="closed drive"):
        d.listdir()
    d.close()  # idempotent
    with megafs.sdk.sync.open_drive(
        str(store), passphrase=PASSPHRASE, cache_dir=tmp_path / "cache", read_only=True
    ) as d:
        assert d.read_bytes("dir/t7") == bytes([7]) * 1000
    with pytest.raises(WrongPassphrase):
        megafs.sdk.sync.open_drive(str(store), passphrase="wrong", cache_dir=tmp_path)


def test_sync_wrapper_closes_at_exit(tmp_path: Path) -> None:
    store = make_volume(tmp_path / "store")
    script = textwrap.dedent(
        f"""
        import megafs.sdk.sync
        d = megafs.sdk.sync.open_drive({str(store)!r}, passphrase={PASSPHRASE!r},
                                       cache_dir={str(tmp_path / "cache")!r},
                                       commit_interval=3600)
        f = d.open("forgotten", "wb")
        f.write(b"still here")
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    got = run_on(tmp_path, lambda d: d.read_bytes("forgotten"), read_only=True)
    assert got == b"still here"


# ------------------------------------------------------------------ with a real mount


@needs_fuse
def test_lease_refuses_a_writer_while_mounted(tmp_path: Path) -> None:
    with serving(new_mount(tmp_path)) as m:
        (m.path / "through-mount").write_bytes(b"m")

        async def open_rw(cache: Path) -> None:
            async with megafs.sdk.open_drive(str(m.store), passphrase=PASSPHRASE, cache_dir=cache):
                pytest.fail("opened read-write while mounted")

        # Another machine (another cache): the lease, naming the mount's holder.
        with pytest.raises(LeaseHeld) as info:
            trio.run(open_rw, tmp_path / "elsewhere")
        assert m.proc is not None
        msg = str(info.value)
        assert f"megafs pid {m.proc.pid}" in msg and "read_only=True" in msg
        # This machine, the mount's own local state: refused before the lease.
        with pytest.raises(OpenError, match=f"in use by megafs process {m.proc.pid}"):
            trio.run(open_rw, m.cache)
        subprocess.run(
            [sys.executable, "-m", "megafs.cli", "status", str(m.path), "--wait-idle"],
            check=True,
            capture_output=True,
        )
        # Read-only is always allowed, and sees what the mount uploaded.
        assert _read_only(m, tmp_path / "reader", "through-mount") == b"m"


def _read_only(m: Mount, cache: Path, path: str) -> bytes:
    async def main() -> bytes:
        async with megafs.sdk.open_drive(
            str(m.store), passphrase=PASSPHRASE, cache_dir=cache, read_only=True
        ) as d:
            return await d.read_bytes(path)

    return trio.run(main)


def _tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything comparable about a local tree: type, mode, size, mtime, content or
    link target, xattrs (user.*), and hard-link groups."""
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
                continue
            xattrs = {
                n: os.getxattr(p, n) for n in os.listxattr(p) if not n.startswith("user.megafs")
            }
            if stat.S_ISDIR(st.st_mode):  # sizes of directories differ between filesystems
                out[rel] = (st.st_mode, None, st.st_mtime_ns, None, xattrs, rel)
                continue
            link_of = inodes.setdefault(st.st_ino, rel)
            out[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, p.read_bytes(), xattrs, link_of)
    return out


async def _write_tree(d: megafs.sdk.Drive) -> None:
    await d.mkdir("top/sub/empty", parents=True)
    await d.write_bytes("top/big", data(2 * CHUNK_SIZE + 99, seed=5))
    await d.write_bytes("top/sub/small", b"small")
    await d.write_bytes("top/sub/zero", b"")
    await d.chmod("top/sub/small", 0o600)
    await d.symlink("sub/small", "top/link")
    await d.link("top/big", "top/sub/big-again")
    await d.setxattr("top/sub/small", "user.note", b"kept")
    await d.utime("top/sub/small", (1_600_000_000_111_111_111, 1_600_000_000_222_222_222))
    await d.utime("top/sub/empty", (1_600_000_000_000_000_000, 1_600_000_000_000_000_000))


@needs_fuse
def test_tree_written_by_sdk_reads_back_through_a_mount(tmp_path: Path) -> None:
    m = new_mount(tmp_path)
    expected_dir = tmp_path / "expected"

    async def main() -> None:
        async with megafs.sdk.open_drive(
            str(m.store), passphrase=PASSPHRASE, cache_dir=tmp_path / "sdk-cache"
        ) as d:
            await _write_tree(d)
            await d.download("top", expected_dir)  # the SDK's own view, as local files

    trio.run(main)
    with serving(m):
        mounted = _tree(m.path / "top")
    expected = _tree(expected_dir)
    # The SDK's download makes a second copy of a hard link; the mount keeps one inode.
    assert mounted.pop("sub/big-again")[-1] == "big"
    expected.pop("sub/big-again")
    assert mounted == expected
    assert mounted["sub/small"][4] == {"user.note": b"kept"}
    assert mounted["sub/small"][2] == 1_600_000_000_222_222_222
    assert mounted["link"] == ("link", "sub/small")


@needs_fuse
def test_tree_written_through_a_mount_reads_back_through_the_sdk(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "big").write_bytes(data(CHUNK_SIZE + 1, seed=9))
    (src / "d" / "e" / "f").write_bytes(b"eff")
    os.symlink("e/f", src / "d" / "ln")
    os.chmod(src / "d" / "e" / "f", 0o751)
    os.setxattr(src / "d" / "big", "user.k", b"v")
    m = new_mount(tmp_path)
    with serving(m):
        subprocess.run(["cp", "-a", str(src / "d"), str(m.path / "d")], check=True)
    back = tmp_path / "back"

    async def main() -> dict[str, Any]:
        async with megafs.sdk.open_drive(
            str(m.store), passphrase=PASSPHRASE, cache_dir=tmp_path / "sdk", read_only=True
        ) as d:
            await d.download("d", back)
            return {
                "xattr": await d.getxattr("d/big", "user.k"),
                "entries": sorted(e.name for e in await d.scandir("d")),
            }

    seen = trio.run(main)
    assert seen == {"xattr": b"v", "entries": ["big", "e", "ln"]}
    assert _tree(back) == _tree(src / "d")


# ------------------------------------------------------------------ the README


def test_readme_examples_run(tmp_path: Path) -> None:
    """Every ```python example block of the README runs, in order, as a user would
    run it (a volume made by ``megafs init demo-volume``, the passphrase in the
    environment)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"^```python example\n(.*?)^```", readme, re.S | re.M)
    assert len(blocks) >= 2
    make_volume(tmp_path / "demo-volume")
    env = {**os.environ, "MEGAFS_PASSPHRASE": PASSPHRASE, "XDG_CACHE_HOME": str(tmp_path)}
    out = []
    for block in blocks:
        res = subprocess.run(
            [sys.executable, "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=lambda: os.umask(0o022),
        )
        assert res.returncode == 0, f"{block}\n{res.stderr}"
        out.append(res.stdout)
    assert "todo.txt 9 0o100644" in out[0] and "b'milk\\n'" in out[0]
    assert "[Errno 39] Directory not empty: '/notes'" in out[1]
    assert filecmp.cmp(tmp_path / "photos/cat.jpg", tmp_path / "photos-again/cat.jpg", False)
