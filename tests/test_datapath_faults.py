"""Faults on the data path: a damaged block cache, a full local disk, a stalled
store, ``fsync=remote``, and uploads left pending by an unmount."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from conftest import PASSPHRASE, TEST_KDF, cold_read, needs_fuse, new_mount
from test_crash import assert_volume_ok, read_from_store, staged, wait_idle

from megafs.control import mounted_at
from megafs.errors import errno_for
from megafs.stores import MemoryStore
from megafs.stores.staging import StagingStore
from megafs.testing import FaultyStore
from megafs.vfs.chunkcache import ChunkCache
from megafs.vfs.fs import Ctx, Vfs
from megafs.volume.check import check_volume
from megafs.volume.drive import ROOT_INO, Volume

MiB = 1 << 20


def _data(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- a damaged block cache ------------------------------------------------------------


@needs_fuse
def test_damaged_cache_files_are_dropped_and_refetched(tmp_path: Path) -> None:
    m = new_mount(tmp_path)
    data = _data("cached", 18 * MiB + 12345)  # 5 chunks: a cache file each
    m.start()
    try:
        (m.path / "f").write_bytes(data)
        m.restart()
        assert cold_read(m.path / "f") == data
        m.stop()
        files = sorted(p for p in m.cache.glob("*/chunks/*/*") if p.is_file())
        assert len(files) == 5, "reading did not fill the chunk cache"
        # Swap two files, truncate one, flip a byte in a header and in a block.
        a, b = files[0].read_bytes(), files[1].read_bytes()
        files[0].write_bytes(b)
        files[1].write_bytes(a)
        raw = files[2].read_bytes()
        files[2].write_bytes(raw[: len(raw) // 2])
        for p, at in ((files[3], 5), (files[4], 64 + 100_000)):
            flipped = bytearray(p.read_bytes())
            flipped[at] ^= 0x40
            p.write_bytes(bytes(flipped))
        m.start()
        assert cold_read(m.path / "f") == data
        m.restart()  # the refetched blocks were cached again, intact
        assert cold_read(m.path / "f") == data
    finally:
        m.stop()
    log = m.log_text()
    dropped = [ln for ln in log.splitlines() if " WARNING " in ln and "block cache" in ln]
    # (the flipped header byte only marks a block absent that is there: refetched)
    assert len(dropped) >= 4, log
    m.assert_clean_log()


# -- a full local disk ----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "small-disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@needs_fuse
def test_full_cache_disk_gives_enospc_and_loses_nothing(tmp_path: Path, small_disk: Path) -> None:
    # Uploads are slow, so staged data piles up on the small disk.
    m = new_mount(tmp_path, options=["store_latency=0.05", "store_bandwidth=4M"])
    m.cache = small_disk
    files = {"a": _data("a", 3 * MiB + 1), "b": _data("b", 100_000), "c": _data("c", 300)}

    def check(label: str) -> None:
        for name, want in files.items():
            assert cold_read(m.path / name) == want, f"{name} {label}"

    m.start()
    try:
        for name, want in files.items():
            with open(m.path / name, "wb") as f:
                f.write(want)
                os.fsync(f.fileno())
        # A file larger than the whole disk.
        failed: OSError | None = None
        fd = os.open(m.path / "big", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for i in range(48):  # (all different: identical chunks are stored once)
                os.write(fd, _data(f"big{i}", MiB))
            os.fsync(fd)
        except OSError as exc:
            failed = exc
        finally:
            try:
                os.close(fd)
            except OSError as exc:
                failed = failed or exc
        assert failed is not None, "48 MiB fitted on a 24 MiB disk"
        assert failed.errno == errno.ENOSPC, f"expected ENOSPC, got {failed!r}"
        os.unlink(m.path / "big")  # what a writer does with a failed file
        check("after ENOSPC")
        m.stop()  # waits for the uploads
        m.start()  # same (small) cache dir
        check("after remount")
        wait_idle(m)
        m.stop()
        assert staged(m) == []
        m.cache = tmp_path / "roomy-cache"
        m.start()
        check("with a fresh cache dir")
        assert not (m.path / "big").exists()
    finally:
        m.stop()
    assert_volume_ok(m.store)


def _free(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


@needs_fuse
def test_block_cache_gives_way_to_writes_on_a_full_disk(tmp_path: Path, small_disk: Path) -> None:
    """Cached copies are clean and disposable: reading a file larger than the disk
    must not leave it full, and staged writes evict cached blocks when it is."""
    m = new_mount(tmp_path)
    old = b"".join(_data(f"old{i}", MiB) for i in range(32))
    m.start()
    try:
        (m.path / "old").write_bytes(old)
        m.stop()
        m.cache = small_disk  # (the default cache cap, 64 MiB, exceeds this disk)
        m.start()
        assert cold_read(m.path / "old") == old
        assert _free(small_disk) > 4 * MiB, "the block cache filled the disk"
        # Slow uploads: staged data has to take the place of cached blocks.
        m.stop()
        m.options = ["store_latency=0.05", "store_bandwidth=8M"]
        m.start()
        new = b"".join(_data(f"new{i}", MiB) for i in range(_free(small_disk) // MiB + 4))
        failed: OSError | None = None
        try:
            with open(m.path / "new", "wb") as f:
                f.write(new)
                os.fsync(f.fileno())
        except OSError as exc:
            failed = exc
            os.unlink(m.path / "new")  # (or the unmount waits for it forever)
        assert failed is None, f"{failed!r} with clean cached blocks on the disk"
        m.stop()
        m.options = []
        m.start()
        assert cold_read(m.path / "new") == new
        assert cold_read(m.path / "old") == old
    finally:
        m.stop()
    assert_volume_ok(m.store)


def _fill(disk: Path) -> Path:
    """Fill ``disk`` up to the last byte; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (MiB, 4096):
            try:
                while True:
                    os.write(fd, bytes(size))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_full_disk_under_the_rollback_table_fails_commits_not_the_daemon(
    small_disk: Path,
) -> None:
    """The rollback table lives in the cache directory too: a commit that cannot
    save it fails with ENOSPC, the committer lives on, and once there is room the
    change is committed."""
    ctx = Ctx(0, 0)

    async def main() -> None:
        store = MemoryStore()
        await Volume.create(store, PASSPHRASE.encode(), kdf_params=TEST_KDF)
        volume = await Volume.open(store, PASSPHRASE.encode(), state_root=small_disk)
        vfs = Vfs(volume, commit_interval=0.05)
        await vfs.start()
        async with trio.open_nursery() as nursery:
            await nursery.start(vfs.run_committer)
            await vfs.mkdir(ROOT_INO, b"first", 0o755, ctx)
            await vfs.commit()
            filler = _fill(small_disk)
            d = (await vfs.mkdir(ROOT_INO, b"second", 0o755, ctx)).ino
            fh, _ = await vfs.create(d, b"f", 0o644, os.O_RDWR, ctx)
            await vfs.write(fh, 0, b"hello")
            with pytest.raises(Exception) as info:
                await vfs.fsync(fh)
            assert errno_for(info.value) == errno.ENOSPC, repr(info.value)
            await trio.sleep(0.3)  # the committer keeps failing, and keeps running
            assert vfs.errors > 0
            filler.unlink()
            with trio.fail_after(5):
                while vfs.dirty_file_count() or volume._state_dirty:
                    await trio.sleep(0.05)
            await vfs.fsync(fh)
            await vfs.release(fh)
            nursery.cancel_scope.cancel()
        await vfs.close()
        fresh = await Volume.open(store, PASSPHRASE.encode())
        report = await check_volume(fresh, deep=True)
        assert report.ok, report.problems
        assert report.directories == 3 and report.files == 1

    trio.run(main)


# -- power loss right after a commit ------------------------------------------------------


def test_power_loss_after_a_commit_leaves_a_volume_that_opens(tmp_path: Path) -> None:
    """The rollback table (fsynced by each commit) must never record a version that
    a power loss can still take away: after a commit, drop every staged file not
    yet fsynced (what a power loss may do), and the next mount must load it all."""
    ctx = Ctx(0, 0)

    async def mount(store: MemoryStore) -> tuple[Vfs, StagingStore]:
        volume = await Volume.open(store, PASSPHRASE.encode(), state_root=tmp_path)
        staging = StagingStore(
            store, tmp_path / volume.volume_id.hex() / "staging", is_barrier=_is_barrier
        )
        volume.store = staging
        vfs = Vfs(volume, writeback=staging)
        await vfs.start()
        return vfs, staging

    async def main() -> None:
        store = MemoryStore()
        await Volume.create(store, PASSPHRASE.encode(), kdf_params=TEST_KDF)
        vfs, staging = await mount(store)  # (no uploader: everything stays staged)
        d = (await vfs.mkdir(ROOT_INO, b"d", 0o755, ctx)).ino
        await vfs.sync()
        await vfs.mkdir(d, b"e", 0o755, ctx)
        await vfs.mknod(d, b"f", 0o100644, 0, ctx)
        await vfs.commit()
        for e in list(staging._order.values()):
            if not e.synced:
                e.path.unlink()  # the power goes out
        vfs, staging = await mount(store)
        sub = await vfs.lookup(ROOT_INO, b"d")
        assert [e[0] for e in await vfs.readdir(sub.ino, 0)] in ([], [b"e", b"f"])

    trio.run(main)


# -- a chunk changed in place, again and again (a database) ----------------------------


def test_a_chunk_changed_in_place_is_not_read_back_for_the_next_change() -> None:
    """Changing part of a stored chunk reads it back once; the chunk stored after the
    change stays in the memory cache, so the next change (the next transaction)
    finds it there instead of fetching the object it just stored."""
    ctx = Ctx(0, 0)

    async def main() -> None:
        faulty = FaultyStore(MemoryStore())
        await Volume.create(faulty, PASSPHRASE.encode(), kdf_params=TEST_KDF)
        vfs = Vfs(await Volume.open(faulty, PASSPHRASE.encode()))
        await vfs.start()
        fh, _ = await vfs.create(ROOT_INO, b"db", 0o644, os.O_RDWR, ctx)
        data = bytearray(_data("db", 300_000))
        await vfs.write(fh, 0, bytes(data))
        await vfs.fsync(fh)
        gets = []
        for k in range(5):
            page, off = b"page %d " % k * 500, 10_000 + k * 50_000
            await vfs.write(fh, off, page)
            data[off : off + len(page)] = page
            await vfs.fsync(fh)
            gets.append(faulty.calls["get"])
        assert gets[0] >= 1 and gets == gets[:1] * 5, gets  # the first change only
        assert await vfs.read(fh, 0, len(data) + 1) == data
        await vfs.release(fh)
        await vfs.close()
        fresh = Vfs(await Volume.open(faulty, PASSPHRASE.encode()))
        await fresh.start()
        f2 = await fresh.open((await fresh.lookup(ROOT_INO, b"db")).ino, os.O_RDONLY)
        assert await fresh.read(f2, 0, len(data) + 1) == data

    trio.run(main)


# -- a stalled store ------------------------------------------------------------------


def _is_barrier(key: str) -> bool:
    return not key.startswith("c/")


def test_stalled_store_does_not_block_cached_reads_or_staged_writes(tmp_path: Path) -> None:
    ctx = Ctx(0, 0)
    data = _data("stalled", 5 * MiB + 77)

    async def main() -> None:
        faulty = FaultyStore(MemoryStore())
        await Volume.create(faulty, PASSPHRASE.encode(), kdf_params=TEST_KDF)
        volume = await Volume.open(faulty, PASSPHRASE.encode(), state_root=tmp_path)
        local = tmp_path / volume.volume_id.hex()
        cache = ChunkCache(
            local / "chunks", volume.keys.cache, volume.open_blocks, max_bytes=1 << 30
        )
        staging = StagingStore(faulty, local / "staging", is_barrier=_is_barrier, adopter=cache)
        volume.store = staging
        vfs = Vfs(volume, commit_interval=0.2, block_cache=cache, writeback=staging)
        await vfs.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(staging.run_uploader)
            await nursery.start(vfs.run_committer)
            sub = (await vfs.mkdir(ROOT_INO, b"sub", 0o755, ctx)).ino
            fh, attr = await vfs.create(sub, b"f", 0o644, os.O_RDWR, ctx)
            await vfs.write(fh, 0, data)
            await vfs.fsync(fh)
            await vfs.release(fh)
            await staging.wait_idle()
            # (never read: uploaded chunks stay in the chunk cache, ChunkCache.claim)

            faulty.delay = 3600  # the store stops answering
            with trio.fail_after(2):
                assert (await vfs.lookup(ROOT_INO, b"sub")).ino == sub
                assert (await vfs.lookup(sub, b"f")).size == len(data)
                assert (await vfs.getattr(attr.ino)).size == len(data)
                assert [e[0] for e in await vfs.readdir(ROOT_INO, 0)] == [b"sub"]
                assert [e[0] for e in await vfs.readdir(sub, 0)] == [b"f"]
                fh = await vfs.open(attr.ino, os.O_RDONLY)
                assert await vfs.read(fh, 0, len(data) + 1) == data
                assert await vfs.read(fh, 3 * MiB + 5, 1000) == data[3 * MiB + 5 : 3 * MiB + 1005]
                await vfs.release(fh)
            new = {b"tiny": _data("tiny", 200), b"small": _data("small", 64 << 10)}
            for name, want in new.items():
                with trio.fail_after(2):
                    fh, _ = await vfs.create(sub, name, 0o644, os.O_RDWR, ctx)
                    await vfs.write(fh, 0, want)
                    await vfs.fsync(fh)  # staged and synced locally
                    await vfs.release(fh)
            assert staging.pending_count > 0

            faulty.delay = 0  # the store is back
            with trio.fail_after(20):
                await staging.wait_idle()
            nursery.cancel_scope.cancel()
        await vfs.close()

        # The store alone has everything.
        fresh = await Volume.open(faulty.inner, PASSPHRASE.encode())
        report = await check_volume(fresh, deep=True)
        assert report.ok, report.problems
        assert report.files == 3

    trio.run(main)


# -- fsync=remote ---------------------------------------------------------------------


@needs_fuse
def test_fsync_remote_means_on_the_store(tmp_path: Path) -> None:
    m = new_mount(tmp_path, options=["fsync=remote", "store_latency=0.05"])
    files = {"big": _data("big", 5 * MiB + 3), "small": _data("small", 500)}
    m.start()
    try:
        for name, want in files.items():
            fd = os.open(m.path / name, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.write(fd, want)
                os.fsync(fd)
                assert staged(m) == [], "fsync returned with uploads pending"
                copy = tmp_path / f"copy-{name}"
                shutil.copytree(m.store, copy)
            finally:
                os.close(fd)
            assert_volume_ok(copy)
            assert read_from_store(copy, name) == want
        # A rename made durable by fsync on the directory.
        os.rename(m.path / "small", m.path / "renamed")
        dfd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        assert staged(m) == [], "fsync on the directory returned with uploads pending"
        shutil.copytree(m.store, tmp_path / "copy-dir")
        assert read_from_store(tmp_path / "copy-dir", "renamed") == files["small"]
    finally:
        m.stop()
    m.assert_clean_log()


# -- uploads left pending by an unmount ---------------------------------------------------


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@needs_fuse
def test_uploads_pending_at_unmount_resume_on_the_next_mount(tmp_path: Path) -> None:
    m = new_mount(tmp_path, options=["store_latency=0.3", "store_bandwidth=4M"])
    files = {"big": _data("big", 9 * MiB), "small": _data("small", 1000)}
    m.start()
    try:
        for name, want in files.items():
            (m.path / name).write_bytes(want)
        proc = m.proc
        assert proc is not None
        subprocess.run(["fusermount3", "-u", str(m.path)], check=True)
        assert not mounted_at(m.path)
        # The daemon outlives the mount to drain the queue; stop it half way.
        _wait_for(lambda: "pending objects" in m.log_text(), "the final drain")
        assert staged(m), "nothing pending at unmount: the test proves nothing"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        m.proc = None
        assert staged(m), "the drain was not interrupted: the test proves nothing"
        assert "the next mount resumes them" in m.log_text()

        m.options = []
        m.start()
        wait_idle(m)
        assert staged(m) == []
        for name, want in files.items():
            assert cold_read(m.path / name) == want
    finally:
        m.stop()
    assert_volume_ok(m.store)
    for name, want in files.items():
        assert read_from_store(m.store, name) == want
    m.assert_clean_log()


@needs_fuse
def test_remount_while_the_old_daemon_still_uploads(tmp_path: Path) -> None:
    """``fusermount3 -u`` returns at once while the daemon goes on uploading. A mount
    right away must not replay the same staging area beside it: it is refused with
    a clear message, the old daemon finishes, and then a mount works."""
    # (upload_delay: nothing is uploaded before the unmount, however slowly a loaded
    # machine gets there, so the final drain always has the whole backlog)
    m = new_mount(tmp_path, options=["store_latency=0.2", "store_bandwidth=8M", "upload_delay=30"])
    files = {"big": _data("big", 9 * MiB), "small": _data("small", 1000)}
    m.start()
    try:
        for name, want in files.items():
            (m.path / name).write_bytes(want)
        old = m.proc
        assert old is not None
        subprocess.run(["fusermount3", "-u", str(m.path)], check=True)
        _wait_for(lambda: "pending objects" in m.log_text(), "the final drain")
        m.proc = None
        with pytest.raises(RuntimeError, match=f"in use by megafs process {old.pid}"):
            m.start()
        assert not mounted_at(m.path)
        assert old.wait(timeout=60) == 0  # it finished its uploads
        assert staged(m) == []
        m.options = []
        m.start()
        (m.path / "later").write_bytes(b"written by the next mount")
        files["later"] = b"written by the next mount"
        m.restart()
        for name, want in files.items():
            assert cold_read(m.path / name) == want
    finally:
        m.stop()
    assert_volume_ok(m.store)
    for name, want in files.items():
        assert read_from_store(m.store, name) == want
    bad = [ln for ln in m.log_text().splitlines() if "Traceback" in ln]
    assert not bad, m.log_text()
