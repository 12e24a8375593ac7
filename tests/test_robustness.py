"""Robustness through a real mount: concurrent namespace stress, O_DIRECT, shared
writable mmap mixed with truncate, and an internal error confined to one file.
Contents are checked against a model."""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import stress_worker
from conftest import Mount, cold_read, new_mount

# -- concurrent namespace stress ------------------------------------------------------

WORKERS = 6
STRESS_SECONDS = 5.0


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """path -> what it is: ("file", content, nlink, inode), ("symlink", target),
    ("dir",) or ("other", mode)."""
    snap: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                snap[rel] = ("file", path.read_bytes(), st.st_nlink, st.st_ino)
            elif stat.S_ISLNK(st.st_mode):
                snap[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                snap[rel] = ("dir",)
            else:
                snap[rel] = ("other", st.st_mode)
    return snap


def _stress(shared: Path, seconds: float, first_seed: int) -> None:
    """Run the workers on ``shared`` for ``seconds``; fail on any unexpected error."""
    procs = [
        subprocess.Popen(
            [sys.executable, stress_worker.__file__, str(shared), str(seed), str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(first_seed, first_seed + WORKERS)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"worker failed:\n{err}"
        results.append(json.loads(out))
    bad = [b for r in results for b in r["bad"]]
    assert not bad, "unexpected errors:\n" + "\n".join(bad)
    assert sum(r["ops"] for r in results) > 100 * seconds  # they really did race


def _check_stressed(mount: Mount, shared: Path) -> dict[str, tuple[object, ...]]:
    """The mount still answers and the tree is consistent; returns its snapshot."""
    assert os.listdir(mount.path) == ["shared"]
    found = subprocess.run(["find", str(shared)], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    contents = set(stress_worker.valid_contents())
    snap = snapshot(shared)
    names: dict[object, list[str]] = {}
    for rel, what in snap.items():
        assert not rel.split("/")[-1].startswith("tmp-"), f"leftover temp file {rel}"
        if what[0] == "file":
            assert what[1] in contents, f"{rel}: {len(what[1])} bytes of no valid content"
            names.setdefault(what[3], []).append(rel)
    # Every name of a file is in the tree (nothing else links to them): nlink agrees.
    for ino, rels in names.items():
        assert all(snap[rel][2] == len(rels) for rel in rels), (ino, rels)
    mount.assert_clean_log()
    return snap


def test_concurrent_namespace_stress(mount: Mount) -> None:
    shared = mount.path / "shared"
    shared.mkdir()
    _stress(shared, STRESS_SECONDS / 2, 0)
    snap = _check_stressed(mount, shared)
    mount.restart()
    assert snapshot(shared) == snap
    # Again on the remounted tree: now directories and hard-linked inodes are loaded
    # from the store while the workers race on them.
    mount.restart()
    _stress(shared, STRESS_SECONDS / 2, WORKERS)
    snap = _check_stressed(mount, shared)
    mount.restart()
    assert snapshot(shared) == snap
    mount.assert_clean_log()


# -- O_DIRECT -------------------------------------------------------------------------

BLK = 4096


def daemon_read(path: Path) -> bytes:
    """The file as the daemon has it: written back and committed (fsync), then read
    past the kernel's page cache (dropped with fadvise)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return cold_read(path)


def _aligned(data: bytes) -> mmap.mmap:
    """Page-aligned memory holding ``data`` (O_DIRECT needs aligned buffers)."""
    buf = mmap.mmap(-1, max(len(data), BLK))
    buf[: len(data)] = data
    return buf


def _direct_pread(fd: int, size: int, off: int) -> bytes:
    buf = mmap.mmap(-1, size)
    try:
        n = os.preadv(fd, [buf], off)
        return buf[:n]
    finally:
        buf.close()


def test_o_direct_with_buffered_io(mount: Mount) -> None:
    path = mount.path / "direct.bin"
    rng = random.Random(11)
    model = bytearray()

    def model_write(off: int, data: bytes) -> None:
        if len(model) < off:
            model.extend(bytes(off - len(model)))
        model[off : off + len(data)] = data

    dfd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    bfd = os.open(path, os.O_RDWR)
    try:
        # Aligned O_DIRECT writes, some past the end (holes), some across the 4 MiB
        # chunk boundary.
        for off_blocks, nblocks in [(0, 4), (2, 3), (20, 1), (1023, 2), (1020, 8), (5, 1)]:
            data = rng.randbytes(nblocks * BLK)
            buf = _aligned(data)
            assert os.pwritev(dfd, [buf], off_blocks * BLK) == len(data)
            buf.close()
            model_write(off_blocks * BLK, data)
            assert _direct_pread(dfd, len(model) + BLK, 0) == bytes(model)
            assert os.pread(bfd, len(model) + 10, 0) == bytes(model)
        # Buffered writes at odd offsets, then read directly and buffered.
        for off in [1, 4095, 4 * 1024 * 1024 - 3, 9000]:
            data = rng.randbytes(rng.randrange(1, 10000))
            assert os.pwrite(bfd, data, off) == len(data)
            model_write(off, data)
            assert _direct_pread(dfd, 64 * BLK, 0) == bytes(model[: 64 * BLK])
            assert os.pread(bfd, len(model) + 10, 0) == bytes(model)
        # Direct write over data just written buffered, read back buffered.
        data = rng.randbytes(2 * BLK)
        buf = _aligned(data)
        assert os.pwritev(dfd, [buf], 2 * BLK) == len(data)
        buf.close()
        model_write(2 * BLK, data)
        assert os.pread(bfd, len(model) + 10, 0) == bytes(model)
        size = os.fstat(dfd).st_size
        assert size == len(model)
        assert _direct_pread(dfd, size + BLK - size % BLK, 0) == bytes(model)
        assert daemon_read(path) == bytes(model)
    finally:
        os.close(dfd)
        os.close(bfd)
    assert path.read_bytes() == bytes(model)
    mount.restart()
    assert path.read_bytes() == bytes(model)
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert _direct_pread(dfd, len(model) + BLK, 0) == bytes(model)
    finally:
        os.close(dfd)


# -- shared writable mmap and truncate -------------------------------------------------


def test_shared_mmap_with_truncate(mount: Mount) -> None:
    path = mount.path / "mapped.bin"
    rng = random.Random(5)
    model = bytearray(rng.randbytes(3 * BLK + 100))
    path.write_bytes(model)

    def check(label: str) -> None:
        assert os.stat(path).st_size == len(model), label
        with open(path, "rb") as f:
            assert f.read() == bytes(model), label
        assert daemon_read(path) == bytes(model), label

    fd = os.open(path, os.O_RDWR)
    other = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, len(model), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        m[10:20] = b"0123456789"
        model[10:20] = b"0123456789"
        m[BLK * 3 : BLK * 3 + 50] = b"z" * 50
        model[BLK * 3 : BLK * 3 + 50] = b"z" * 50
        m.flush()
        check("after msync")
        assert os.pread(other, 20, 10)[:10] == b"0123456789"
        m.close()

        # Grow through the other descriptor: the new range reads as zeros.
        os.ftruncate(other, 5 * 1024 * 1024)
        model.extend(bytes(5 * 1024 * 1024 - len(model)))
        check("after growing")
        m = mmap.mmap(fd, len(model), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        assert m[:] == bytes(model)
        for off in (0, BLK * 7 + 3, 4 * 1024 * 1024 - 5, len(model) - 8):
            data = rng.randbytes(8)
            m[off : off + 8] = data
            model[off : off + 8] = data
        m.flush()
        check("after writing the grown map")
        m.close()

        # Shrink to a non-page-aligned size, then grow again: the cut part is zeros.
        os.ftruncate(other, BLK + 123)
        del model[BLK + 123 :]
        check("after shrinking")
        os.ftruncate(other, 2 * BLK)
        model.extend(bytes(2 * BLK - len(model)))
        check("after regrowing")
        m = mmap.mmap(fd, len(model), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        assert m[:] == bytes(model)
        m[BLK + 100 : BLK + 200] = b"w" * 100
        model[BLK + 100 : BLK + 200] = b"w" * 100
        m.flush()
        m.close()
        check("after writing past the old cut")
    finally:
        os.close(fd)
        os.close(other)
    # Close and reopen.
    check("after close")
    fd = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        assert m[:] == bytes(model)
        m[0:4] = b"LAST"
        model[0:4] = b"LAST"
        m.close()  # unmapped without msync: written back on close/munmap
    finally:
        os.close(fd)
    check("after unmapping without msync")

    # A live map (larger than the file will be) across shrinking and regrowing:
    # dirty pages past the cut must not come back, pages before it must stay.
    fd = os.open(path, os.O_RDWR)
    other = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, len(model), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        m[100:110] = b"A" * 10
        model[100:110] = b"A" * 10
        m[BLK + 150 : BLK + 160] = b"B" * 10  # dirty, then cut away
        os.ftruncate(other, BLK + 7)
        del model[BLK + 7 :]
        check("after shrinking under a live map")
        assert m[BLK + 7 : 2 * BLK] == bytes(BLK - 7)
        os.ftruncate(other, 2 * BLK)
        model.extend(bytes(2 * BLK - len(model)))
        check("after regrowing under a live map")
        m[BLK + 500 : BLK + 505] = b"CCCCC"
        model[BLK + 500 : BLK + 505] = b"CCCCC"
        m.flush()
        m.close()
        check("after writing the live map")
    finally:
        os.close(fd)
        os.close(other)
    mount.restart()
    check("after remount")


# -- an internal error stays confined ---------------------------------------------------


def _chunks(store: Path) -> set[Path]:
    return {p for p in (store / "c").rglob("*") if p.is_file()} if (store / "c").exists() else set()


def test_missing_chunk_gives_eio_for_that_file_only(tmp_path: Path) -> None:
    m = new_mount(tmp_path, "broken")
    m.start()
    try:
        rng = random.Random(9)
        other = rng.randbytes(5 * 1024 * 1024)
        (m.path / "other.bin").write_bytes(other)
        (m.path / "small.txt").write_bytes(b"small and inline\n")
        m.restart()
        before = _chunks(m.store)
        victim = rng.randbytes(6 * 1024 * 1024)
        (m.path / "victim.bin").write_bytes(victim)
        m.restart()
        victim_chunks = _chunks(m.store) - before
        assert len(victim_chunks) == 2
        m.stop()
        # Delete the first chunk (the 4 MiB one; the second holds the last 2 MiB).
        gone = max(victim_chunks, key=lambda p: p.stat().st_size)
        gone.unlink()
        key = "/".join(gone.relative_to(m.store).parts)
        for cached in m.cache.glob("*/chunks"):  # (written chunks are cached too)
            shutil.rmtree(cached)
        m.start()

        with pytest.raises(OSError) as exc_info:
            (m.path / "victim.bin").read_bytes()
        assert exc_info.value.errno == errno.EIO
        # Only that file is affected, and only where the chunk is missing.
        with open(m.path / "victim.bin", "rb") as f:
            f.seek(4 * 1024 * 1024)
            assert f.read() == victim[4 * 1024 * 1024 :]
        assert (m.path / "other.bin").read_bytes() == other
        assert (m.path / "small.txt").read_bytes() == b"small and inline\n"
        assert sorted(os.listdir(m.path)) == ["other.bin", "small.txt", "victim.bin"]
        assert (m.path / "victim.bin").stat().st_size == len(victim)
        # The mount lives on and still takes writes.
        (m.path / "new.txt").write_bytes(b"still writable")
        assert (m.path / "new.txt").read_bytes() == b"still writable"
        with pytest.raises(OSError) as exc_info:
            (m.path / "victim.bin").read_bytes()
        assert exc_info.value.errno == errno.EIO
        m.stop()
        log = m.log_text()
        errors = [ln for ln in log.splitlines() if " ERROR " in ln]
        assert errors, f"no ERROR logged:\n{log}"
        # Every error is about the missing object and names it; nothing crashed, and
        # the unmount still committed everything.
        assert all(key in ln for ln in errors), f"the log does not name {key}:\n{log}"
        assert "Traceback" not in log, log
        assert "everything committed" in log.splitlines()[-1], log
    finally:
        m.stop()
