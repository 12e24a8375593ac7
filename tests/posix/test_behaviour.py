"""POSIX behaviour, run on the in-process vfs, through real FUSE mounts, and (most
cases) through the SDK.

Every test takes ``fs`` (see :mod:`drivers`) and runs once per variant: on a fresh
in-process vfs, and in a fresh directory of a FUSE mount shared by the module (its
daemon log must stay clean). The tests at the end need a second user and the
kernel's permission checks (``default_permissions`` and ``allow_other`` are enforced
by the kernel, not by megafs), so they only run through mounts of their own.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, new_mount, serving
from drivers import (
    FS_PARAMS,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    Driver,
    fs,
    s3_suite_mount,
    suite_mount,
    webdav_suite_mount,
)

from megafs.format.chunks import BLOCK_SIZE, CHUNK_SIZE

__all__ = [
    "fs",
    "s3_suite_mount",
    "suite_mount",
    "webdav_suite_mount",
]  # fixtures, imported from drivers

MiB = 1 << 20
GiB = 1 << 30
NOBODY = 65534


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` pseudo-random bytes (no period, so misplaced bytes show); a shorter
    pattern is a prefix of a longer one with the same seed."""
    return random.Random(seed).randbytes(-(-n // 4) * 4)[:n]


def touch(fs: Driver, path: str, mode: int = 0o644) -> None:
    fs.close(fs.open(path, os.O_WRONLY | os.O_CREAT, mode))


def commit(fs: Driver) -> None:
    """Make the filesystem commit its metadata now (fsync commits everything)."""
    fd = fs.open(".commit", os.O_WRONLY | os.O_CREAT, 0o600)
    fs.fsync(fd)
    fs.close(fd)
    fs.unlink(".commit")


def errno_of(fn: Any, *args: Any) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno is not None
    return info.value.errno


def snapshot(fs: Driver, top: str = "") -> dict[str, dict[str, Any]]:
    """Everything observable about the tree under ``top``: attributes, contents,
    link targets and xattrs of every entry, by path."""
    out: dict[str, dict[str, Any]] = {}

    def walk(path: str) -> None:
        st = fs.lstat(path)
        e: dict[str, Any] = {
            "mode": st.st_mode,
            "ino": st.st_ino,
            "nlink": st.st_nlink,
            "uid": st.st_uid,
            "gid": st.st_gid,
            "rdev": st.st_rdev,
            "size": st.st_size,
            "atime": st.st_atime_ns,
            "mtime": st.st_mtime_ns,
            "ctime": st.st_ctime_ns,
        }
        if stat.S_ISREG(st.st_mode):
            e["sha256"] = hashlib.sha256(fs.read_file(path)).hexdigest()
        if stat.S_ISLNK(st.st_mode):
            e["target"] = fs.readlink(path)
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            e["xattrs"] = {n: fs.getxattr(path, n) for n in sorted(fs.listxattr(path))}
        out[path or "/"] = e
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(fs.listdir(path)):
                walk(f"{path}/{name}" if path else name)

    walk(top)
    return out


def assert_same_tree(after: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]]) -> None:
    """Compare two snapshots, naming every path and field that differs."""
    diffs = [f"{p}: missing now" for p in before if p not in after]
    diffs += [f"{p}: new" for p in after if p not in before]
    for p in sorted(set(before) & set(after)):
        for k in sorted(set(before[p]) | set(after[p])):
            if before[p].get(k) != after[p].get(k):
                diffs.append(f"{p}: {k} was {before[p].get(k)!r}, now {after[p].get(k)!r}")
    assert not diffs, "\n".join(diffs)


# The SDK (megafs.sdk, a third front end on the same Vfs) runs every case above that
# takes ``fs``, except these: what the SDK does not offer (FIFOs and device nodes,
# RENAME_EXCHANGE, reading what a crash would leave) and what only the kernel does
# (chown clearing set-user-ID).
NOT_THROUGH_SDK = {
    "test_chown_clears_setuid_and_setgid",
    "test_rename_exchange_file_and_dir",
    "test_mkfifo",
    "test_mknod_device_keeps_rdev",
    "test_readdir_lists_exactly_the_entries",
    "test_fsynced_content_survives_crash_during_rewrite",
    "test_everything_survives_remount",
    "test_changes_after_remount_survive_remount",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fs" in metafunc.fixturenames:
        sdk = [] if metafunc.function.__name__ in NOT_THROUGH_SDK else ["sdk"]
        metafunc.parametrize("fs", [*FS_PARAMS, *sdk], indirect=True)


# ------------------------------------------------------------------ file content


def test_create_write_read(fs: Driver) -> None:
    fd = fs.open("f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    assert fs.pwrite(fd, b"hello world", 0) == 11
    assert fs.pread(fd, 100, 0) == b"hello world"
    assert fs.fstat(fd).st_size == 11
    fs.close(fd)
    assert fs.read_file("f") == b"hello world"
    st = fs.lstat("f")
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size == 11


def test_create_excl_existing_is_eexist(fs: Driver) -> None:
    fs.write_file("f", b"x")
    assert errno_of(fs.open, "f", os.O_RDWR | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    fd = fs.open("f", os.O_RDWR | os.O_CREAT)  # without O_EXCL: opens it
    assert fs.pread(fd, 10, 0) == b"x"
    fs.close(fd)
    assert errno_of(fs.open, "missing", os.O_RDONLY) == errno.ENOENT


def test_pwrite_pread_at_offsets(fs: Driver) -> None:
    fd = fs.open("f", os.O_RDWR | os.O_CREAT, 0o644)
    fs.pwrite(fd, b"a" * 100, 0)
    fs.pwrite(fd, b"BCD", 10)
    fs.pwrite(fd, b"tail", 200)  # leaves a hole [100, 200)
    assert fs.fstat(fd).st_size == 204
    data = fs.pread(fd, 1000, 0)
    assert data == b"a" * 10 + b"BCD" + b"a" * 87 + bytes(100) + b"tail"
    assert fs.pread(fd, 5, 9) == b"aBCDa"
    assert fs.pread(fd, 10, 204) == b""
    assert fs.pread(fd, 10, 1 << 40) == b""
    fs.close(fd)


@pytest.mark.parametrize("where", ["chunk", "block"])
def test_pwrite_pread_across_boundaries(fs: Driver, where: str) -> None:
    """Writes and reads straddling the 4 MiB chunk and the 64 KiB sub-block
    boundaries, checked before and after a remount (which empties every cache)."""
    edge = CHUNK_SIZE if where == "chunk" else 3 * BLOCK_SIZE
    base = pattern(edge + 3 * BLOCK_SIZE, seed=1)
    fs.write_file("f", base)
    patch = pattern(5000, seed=2)
    fd = fs.open("f", os.O_RDWR)
    fs.pwrite(fd, patch, edge - 2500)
    expect = bytearray(base)
    expect[edge - 2500 : edge + 2500] = patch
    fs.close(fd)

    def check() -> None:
        fd = fs.open("f", os.O_RDONLY)
        for off, n in [
            (edge - 1, 2),
            (edge - 2500, 5000),
            (edge - 3000, 6000),
            (edge, 1),
            (edge - BLOCK_SIZE - 7, 2 * BLOCK_SIZE + 14),
            (BLOCK_SIZE - 1, BLOCK_SIZE + 2),
            (0, len(expect)),
            (len(expect) - 10, 100),
        ]:
            assert fs.pread(fd, n, off) == bytes(expect[off : off + n]), (off, n)
        fs.close(fd)

    check()
    fs.remount()
    check()
    assert fs.read_file("f") == bytes(expect)


def test_large_write_read_back(fs: Driver) -> None:
    data = pattern(2 * CHUNK_SIZE + 12345, seed=3)
    fs.write_file("big", data)
    assert fs.lstat("big").st_size == len(data)
    assert fs.read_file("big") == data


def test_o_append(fs: Driver) -> None:
    fs.write_file("f", b"start:")
    fd = fs.open("f", os.O_WRONLY | os.O_APPEND)
    fs.write(fd, b"one,")
    fs.write(fd, b"two,")
    fs.close(fd)
    assert fs.read_file("f") == b"start:one,two,"


def test_o_append_after_another_handle_extends(fs: Driver) -> None:
    fs.write_file("f", b"0123")
    app = fs.open("f", os.O_WRONLY | os.O_APPEND)
    other = fs.open("f", os.O_RDWR)
    fs.write(app, b"A")
    fs.pwrite(other, b"xyz", 10)  # extends with a hole
    fs.write(app, b"B")
    fs.fsync(app)
    fs.close(other)
    fs.close(app)
    assert fs.read_file("f") == b"0123A" + bytes(5) + b"xyzB"


def test_o_trunc(fs: Driver) -> None:
    fs.write_file("f", pattern(CHUNK_SIZE + 10))
    fd = fs.open("f", os.O_RDWR | os.O_TRUNC)
    assert fs.fstat(fd).st_size == 0
    assert fs.pread(fd, 100, 0) == b""
    fs.pwrite(fd, b"new", 0)
    fs.close(fd)
    assert fs.read_file("f") == b"new"


def test_o_trunc_updates_times_even_when_empty(fs: Driver) -> None:
    touch(fs, "f")
    fs.utime("f", ns=(1, 1))
    fs.close(fs.open("f", os.O_WRONLY | os.O_TRUNC))
    st = fs.lstat("f")
    assert st.st_mtime_ns > 1 and st.st_ctime_ns > 1


@pytest.mark.parametrize("size", [100, 5 * MiB])
def test_truncate_down_then_up_reads_zeros(fs: Driver, size: int) -> None:
    data = pattern(size, seed=4)
    fs.write_file("f", data)
    cut = size // 2 + 17
    fs.truncate("f", cut)
    assert fs.lstat("f").st_size == cut
    assert fs.read_file("f") == data[:cut]
    fs.truncate("f", size)  # extend again: the cut bytes must not come back
    assert fs.read_file("f") == data[:cut] + bytes(size - cut)
    fs.remount()
    assert fs.read_file("f") == data[:cut] + bytes(size - cut)


def test_ftruncate_and_write_past_end(fs: Driver) -> None:
    fd = fs.open("f", os.O_RDWR | os.O_CREAT, 0o644)
    fs.pwrite(fd, pattern(CHUNK_SIZE + 100, seed=5), 0)
    fs.ftruncate(fd, 10)
    fs.ftruncate(fd, CHUNK_SIZE + 50)
    assert fs.fstat(fd).st_size == CHUNK_SIZE + 50
    fs.pwrite(fd, b"Z", CHUNK_SIZE + 200)
    expect = pattern(10, seed=5) + bytes(CHUNK_SIZE + 190) + b"Z"
    fs.fsync(fd)
    fs.drop_cache(fd)
    assert fs.pread(fd, 2 * CHUNK_SIZE, 0) == expect
    fs.close(fd)
    fs.remount()
    assert fs.read_file("f") == expect


def test_truncate_up_from_empty_is_zeros(fs: Driver) -> None:
    touch(fs, "f")
    fs.truncate("f", 3 * BLOCK_SIZE + 1)
    assert fs.read_file("f") == bytes(3 * BLOCK_SIZE + 1)


def test_sparse_file_beyond_4gib(fs: Driver) -> None:
    off = 10 * GiB
    fd = fs.open("sparse", os.O_RDWR | os.O_CREAT, 0o644)
    fs.pwrite(fd, b"start", 0)
    fs.pwrite(fd, b"end", off)
    fs.close(fd)

    def check() -> None:
        st = fs.lstat("sparse")
        assert st.st_size == off + 3
        assert st.st_blocks * 512 < 16 * MiB
        fd = fs.open("sparse", os.O_RDONLY)
        assert fs.pread(fd, 10, 0) == b"start" + bytes(5)
        assert fs.pread(fd, 4096, 5 * GiB) == bytes(4096)
        assert fs.pread(fd, 4096, 4 * GiB - 2048) == bytes(4096)
        assert fs.pread(fd, 100, off - 50) == bytes(50) + b"end"
        fs.close(fd)

    check()
    fs.remount()
    check()


# ------------------------------------------------------------------- attributes


def test_chmod(fs: Driver) -> None:
    touch(fs, "f")
    fs.mkdir("d")
    fs.chmod("f", 0o4751)
    fs.chmod("d", 0o1777)
    assert stat.S_IMODE(fs.lstat("f").st_mode) == 0o4751
    assert stat.S_ISREG(fs.lstat("f").st_mode)
    assert stat.S_IMODE(fs.lstat("d").st_mode) == 0o1777
    assert stat.S_ISDIR(fs.lstat("d").st_mode)


def test_chown(fs: Driver) -> None:
    touch(fs, "f")
    fs.chown("f", 1234, 5678)
    st = fs.lstat("f")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    fs.chown("f", -1, 42)
    st = fs.lstat("f")
    assert (st.st_uid, st.st_gid) == (1234, 42)


def test_chown_clears_setuid_and_setgid(fs: Driver) -> None:
    touch(fs, "f")
    fs.chmod("f", 0o6755)
    fs.chown("f", 1000, 1000)
    assert stat.S_IMODE(fs.lstat("f").st_mode) == 0o0755
    fs.chmod("f", 0o2745)  # set-group-ID without group execute: mandatory locking bit
    fs.chown("f", 0, 0)
    assert stat.S_IMODE(fs.lstat("f").st_mode) == 0o2745
    fs.mkdir("d")
    fs.chmod("d", 0o2755)
    fs.chown("d", 7, 7)
    assert stat.S_IMODE(fs.lstat("d").st_mode) == 0o2755


def test_setgid_directory_is_inherited(fs: Driver) -> None:
    fs.mkdir("d")
    fs.chown("d", 0, 4242)
    fs.chmod("d", 0o2775)
    touch(fs, "d/f")
    fs.mkdir("d/sub")
    assert fs.lstat("d/f").st_gid == 4242
    assert fs.lstat("d/sub").st_gid == 4242
    assert fs.lstat("d/sub").st_mode & stat.S_ISGID
    assert not fs.lstat("d/f").st_mode & stat.S_ISGID


def test_ctime_changes_on_chmod(fs: Driver) -> None:
    touch(fs, "f")
    fs.utime("f", ns=(1, 2))
    before = fs.lstat("f").st_ctime_ns
    fs.chmod("f", 0o600)
    assert fs.lstat("f").st_ctime_ns >= before
    assert fs.lstat("f").st_mtime_ns == 2


def test_utimens_nanoseconds(fs: Driver) -> None:
    touch(fs, "f")
    fs.mkdir("d")
    a, m = 1_234_567_890_123_456_789, 1_700_000_000_987_654_321
    fs.utime("f", ns=(a, m))
    fs.utime("d", ns=(m, a))
    st = fs.lstat("f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (a, m)
    st = fs.lstat("d")
    assert (st.st_atime_ns, st.st_mtime_ns) == (m, a)
    before = time.time_ns()
    fs.utime("f", None)  # "touch": both to now
    st = fs.lstat("f")
    assert before - 10**9 < st.st_mtime_ns <= time.time_ns() + 10**9
    assert before - 10**9 < st.st_atime_ns <= time.time_ns() + 10**9


def test_write_updates_mtime(fs: Driver) -> None:
    fs.write_file("f", b"x")
    fs.utime("f", ns=(10, 10))
    fd = fs.open("f", os.O_WRONLY)
    fs.pwrite(fd, b"y", 0)
    fs.close(fd)
    assert fs.lstat("f").st_mtime_ns > 10


# -------------------------------------------------------------------- namespace


def test_dir_times_change_with_entries(fs: Driver) -> None:
    fs.mkdir("a")
    fs.mkdir("b")
    touch(fs, "a/f")

    def reset() -> None:
        for d in ("a", "b"):
            fs.utime(d, ns=(1, 1))

    def changed(d: str) -> bool:
        st = fs.lstat(d)
        return st.st_mtime_ns > 1 and st.st_ctime_ns > 1

    reset()
    touch(fs, "a/g")
    assert changed("a") and not changed("b")
    reset()
    fs.rename("a/g", "b/g")
    assert changed("a") and changed("b")
    reset()
    fs.unlink("b/g")
    assert changed("b") and not changed("a")
    reset()
    fs.mkdir("a/sub")
    assert changed("a")
    reset()
    fs.rmdir("a/sub")
    assert changed("a")
    reset()
    fs.link("a/f", "b/f2")
    assert changed("b") and not changed("a")


def test_mkdir_rmdir(fs: Driver) -> None:
    fs.mkdir("d", 0o750)
    st = fs.lstat("d")
    assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 2
    assert errno_of(fs.mkdir, "d") == errno.EEXIST
    fs.rmdir("d")
    assert not fs.exists("d")


def test_rmdir_errors(fs: Driver) -> None:
    fs.mkdir("d")
    touch(fs, "d/f")
    touch(fs, "file")
    assert errno_of(fs.rmdir, "d") == errno.ENOTEMPTY
    assert errno_of(fs.rmdir, "file") == errno.ENOTDIR
    assert errno_of(fs.rmdir, "missing") == errno.ENOENT
    assert errno_of(fs.mkdir, "file/sub") == errno.ENOTDIR
    assert errno_of(fs.mkdir, "missing/sub") == errno.ENOENT
    fs.unlink("d/f")
    fs.rmdir("d")


def test_emptiness_checked_on_directories_not_loaded_yet(fs: Driver) -> None:
    """After a remount directories are loaded lazily: rmdir and rename must still
    see what a directory holds."""
    fs.mkdir("full")
    touch(fs, "full/f")
    fs.mkdir("full2")
    fs.mkdir("full2/sub")
    fs.mkdir("src")
    fs.remount()
    assert errno_of(fs.rmdir, "full") == errno.ENOTEMPTY
    assert errno_of(fs.rename, "src", "full2") == errno.ENOTEMPTY
    assert errno_of(fs.rmdir, "full2") == errno.ENOTEMPTY
    assert fs.listdir("full") == ["f"] and fs.listdir("full2") == ["sub"]


def test_dir_nlink_counts_subdirs(fs: Driver) -> None:
    fs.mkdir("a")
    fs.mkdir("b")
    root = fs.lstat("").st_nlink
    fs.mkdir("a/x")
    fs.mkdir("a/y")
    touch(fs, "a/f")
    assert fs.lstat("a").st_nlink == 4
    fs.rename("a/x", "b/x")
    assert fs.lstat("a").st_nlink == 3
    assert fs.lstat("b").st_nlink == 3
    fs.rmdir("a/y")
    assert fs.lstat("a").st_nlink == 2
    assert fs.lstat("").st_nlink == root


def test_unlink(fs: Driver) -> None:
    touch(fs, "f")
    fs.mkdir("d")
    fs.unlink("f")
    assert not fs.exists("f")
    assert errno_of(fs.unlink, "f") == errno.ENOENT
    assert errno_of(fs.unlink, "d") == errno.EISDIR
    assert fs.exists("d")


def test_rename_file_over_file(fs: Driver) -> None:
    fs.write_file("a", b"A")
    fs.write_file("b", b"B")
    ino = fs.lstat("a").st_ino
    fs.rename("a", "b")
    assert not fs.exists("a")
    assert fs.read_file("b") == b"A"
    assert fs.lstat("b").st_ino == ino
    assert sorted(fs.listdir("")) == ["b"]


def test_rename_file_over_dir_is_eisdir(fs: Driver) -> None:
    touch(fs, "f")
    fs.mkdir("d")
    assert errno_of(fs.rename, "f", "d") == errno.EISDIR
    assert errno_of(fs.rename, "d", "f") == errno.ENOTDIR
    assert fs.exists("f") and fs.exists("d")


def test_rename_dir_over_empty_dir(fs: Driver) -> None:
    fs.mkdir("src")
    touch(fs, "src/inside")
    fs.mkdir("dst")
    root_nlink = fs.lstat("").st_nlink
    fs.rename("src", "dst")
    assert not fs.exists("src")
    assert fs.listdir("dst") == ["inside"]
    assert fs.lstat("").st_nlink == root_nlink - 1
    fs.remount()
    assert fs.listdir("dst") == ["inside"]
    assert sorted(fs.listdir("")) == ["dst"]


def test_rename_dir_over_nonempty_dir_is_enotempty(fs: Driver) -> None:
    fs.mkdir("src")
    fs.mkdir("dst")
    touch(fs, "dst/x")
    assert errno_of(fs.rename, "src", "dst") == errno.ENOTEMPTY
    assert fs.exists("src") and fs.exists("dst/x")


def test_rename_dir_into_own_subdir_is_einval(fs: Driver) -> None:
    fs.mkdir("a")
    fs.mkdir("a/b")
    assert errno_of(fs.rename, "a", "a/b/c") == errno.EINVAL
    assert errno_of(fs.rename, "a", "a/c") == errno.EINVAL
    assert fs.exists("a/b")


def test_rename_across_dirs(fs: Driver) -> None:
    fs.mkdir("a")
    fs.mkdir("b")
    fs.write_file("a/f", b"data")
    fs.mkdir("a/sub")
    touch(fs, "a/sub/g")
    fs.rename("a/f", "b/f2")
    fs.rename("a/sub", "b/sub")
    assert fs.listdir("a") == []
    assert sorted(fs.listdir("b")) == ["f2", "sub"]
    assert fs.read_file("b/f2") == b"data"
    assert fs.listdir("b/sub") == ["g"]


def test_rename_noreplace(fs: Driver) -> None:
    fs.write_file("a", b"A")
    fs.write_file("b", b"B")
    assert errno_of(fs.rename, "a", "b", RENAME_NOREPLACE) == errno.EEXIST
    assert fs.read_file("b") == b"B"
    fs.rename("a", "c", RENAME_NOREPLACE)
    assert sorted(fs.listdir("")) == ["b", "c"]


def test_rename_exchange_file_and_dir(fs: Driver) -> None:
    fs.mkdir("p")
    fs.mkdir("q")
    fs.write_file("p/f", b"file")
    fs.mkdir("q/d")
    touch(fs, "q/d/inner")
    fino, dino = fs.lstat("p/f").st_ino, fs.lstat("q/d").st_ino
    fs.rename("p/f", "q/d", RENAME_EXCHANGE)
    assert stat.S_ISDIR(fs.lstat("p/f").st_mode) and fs.lstat("p/f").st_ino == dino
    assert fs.read_file("q/d") == b"file" and fs.lstat("q/d").st_ino == fino
    assert fs.listdir("p/f") == ["inner"]
    assert (fs.lstat("p").st_nlink, fs.lstat("q").st_nlink) == (3, 2)
    assert errno_of(fs.rename, "p/f", "missing", RENAME_EXCHANGE) == errno.ENOENT


def test_rename_to_same_name_and_hardlink_alias(fs: Driver) -> None:
    fs.write_file("a", b"A")
    fs.link("a", "b")
    fs.rename("a", "a")
    fs.rename("a", "b")  # same inode: nothing happens
    assert sorted(fs.listdir("")) == ["a", "b"]
    assert fs.lstat("a").st_nlink == 2


# ------------------------------------------------------------------------ links


def test_hard_links_share_inode_and_count(fs: Driver) -> None:
    fs.mkdir("d")
    fs.write_file("a", b"one")
    fs.link("a", "b")
    fs.link("a", "d/c")
    ino = fs.lstat("a").st_ino
    assert {fs.lstat(p).st_ino for p in ("a", "b", "d/c")} == {ino}
    assert fs.lstat("b").st_nlink == 3
    fd = fs.open("d/c", os.O_WRONLY)
    fs.pwrite(fd, b"TWO", 0)
    fs.close(fd)
    assert fs.read_file("a") == b"TWO"
    fs.unlink("a")
    assert fs.lstat("b").st_nlink == 2
    fs.rename("b", "d/e")
    assert fs.lstat("d/e").st_nlink == 2
    fs.rename("d/e", "d/c")  # the same inode: nothing changes
    assert fs.lstat("d/c").st_nlink == 2
    fs.write_file("other", b"x")
    fs.rename("other", "d/e")  # replaces one name of the linked file
    assert fs.lstat("d/c").st_nlink == 1
    assert fs.read_file("d/c") == b"TWO"


def test_hard_links_survive_remount(fs: Driver) -> None:
    fs.mkdir("d")
    fs.write_file("a", pattern(CHUNK_SIZE + 5, seed=6))
    fs.link("a", "d/b")
    ino = fs.lstat("a").st_ino
    fs.remount()
    assert fs.lstat("a").st_ino == fs.lstat("d/b").st_ino == ino
    assert fs.lstat("a").st_nlink == 2
    fd = fs.open("d/b", os.O_WRONLY)
    fs.pwrite(fd, b"patched", CHUNK_SIZE - 3)
    fs.close(fd)
    expect = bytearray(pattern(CHUNK_SIZE + 5, seed=6))
    expect[CHUNK_SIZE - 3 : CHUNK_SIZE + 4] = b"patched"
    assert fs.read_file("a") == bytes(expect)
    fs.unlink("a")
    fs.remount()
    assert fs.lstat("d/b").st_nlink == 1
    assert fs.read_file("d/b") == bytes(expect)
    assert fs.listdir("") == ["d"]


def test_hard_link_errors(fs: Driver) -> None:
    fs.mkdir("d")
    touch(fs, "f")
    assert errno_of(fs.link, "d", "d2") == errno.EPERM
    assert errno_of(fs.link, "f", "d") == errno.EEXIST
    assert errno_of(fs.link, "missing", "x") == errno.ENOENT


def test_symlink_readlink(fs: Driver) -> None:
    fs.write_file("target", b"t")
    fs.symlink("target", "rel")
    fs.symlink("/nowhere/at/all", "dangling")
    assert fs.readlink("rel") == "target"
    assert fs.readlink("dangling") == "/nowhere/at/all"
    st = fs.lstat("rel")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("target")
    assert errno_of(fs.readlink, "target") == errno.EINVAL
    assert errno_of(fs.symlink, "x", "rel") == errno.EEXIST
    longest = ("p" * 254 + "/") * 16 + "q" * 15  # 4095 bytes: PATH_MAX - 1
    assert errno_of(fs.symlink, longest + "q", "too-long") == errno.ENAMETOOLONG
    fs.symlink(longest, "longest")
    assert fs.readlink("longest") == longest
    assert fs.lstat("longest").st_size == 4095


def test_mkfifo(fs: Driver) -> None:
    fs.mkfifo("fifo", 0o640)
    st = fs.lstat("fifo")
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640 & ~_umask()


def test_mknod_device_keeps_rdev(fs: Driver) -> None:
    rdev = os.makedev(1, 7)
    fs.mknod("dev", stat.S_IFCHR | 0o600, rdev)
    st = fs.lstat("dev")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_create_mode_honours_umask(fs: Driver) -> None:
    fs.close(fs.open("f", os.O_WRONLY | os.O_CREAT, 0o777))
    fs.mkdir("d", 0o777)
    assert stat.S_IMODE(fs.lstat("f").st_mode) == 0o777 & ~_umask()
    assert stat.S_IMODE(fs.lstat("d").st_mode) == 0o777 & ~_umask()


# ---------------------------------------------------------------------- readdir


def test_readdir_lists_exactly_the_entries(fs: Driver) -> None:
    assert fs.listdir("") == []
    fs.mkdir("d")
    raw = os.fsdecode(b"not-utf8-\xff\xfe")
    names = {"a", "b.txt", "dir", "link", "fifo", "ünïcode", "with space", raw}
    for n in ("a", "b.txt", "ünïcode", "with space", raw):
        touch(fs, f"d/{n}")
    fs.mkdir("d/dir")
    fs.symlink("a", "d/link")
    fs.mkfifo("d/fifo")
    touch(fs, "d/gone")
    fs.unlink("d/gone")
    listed = fs.listdir("d")
    assert len(listed) == len(names) and set(listed) == names
    assert fs.listdir("d/dir") == []


def test_readdir_stable_while_changing(fs: Driver) -> None:
    """Entries that exist throughout an iteration are seen exactly once, even while
    others are deleted and created; nothing is seen twice."""
    fs.mkdir("d")
    pad = "x" * 100  # long names: the kernel needs many readdir round trips
    stable = [f"s{i:03d}{pad}" for i in range(200)]
    victims = [f"v{i:03d}{pad}" for i in range(100)]
    for i in range(100):
        touch(fs, f"d/{stable[2 * i]}")
        touch(fs, f"d/{victims[i]}")
        touch(fs, f"d/{stable[2 * i + 1]}")
    created = []
    seen: Counter[str] = Counter()
    for k, name in enumerate(fs.scandir("d")):
        seen[name] += 1
        if k < len(victims):
            fs.unlink(f"d/{victims[-1 - k]}")
            created.append(f"n{k:03d}{pad}")
            touch(fs, f"d/{created[-1]}")
    assert all(seen[n] == 1 for n in stable), [n[:4] for n in stable if seen[n] != 1]
    assert max(seen.values()) == 1
    assert set(seen) <= set(stable) | set(victims) | set(created)
    assert sorted(fs.listdir("d")) == sorted(stable + created)


# ---------------------------------------------------------------- statfs, xattrs


def test_statvfs(fs: Driver) -> None:
    s = fs.statvfs("")
    assert s.f_namemax == 255
    assert s.f_bsize > 0 and s.f_blocks > 0 and 0 <= s.f_bfree <= s.f_blocks
    assert s.f_files > 0


def test_xattrs(fs: Driver) -> None:
    touch(fs, "f")
    fs.mkdir("d")
    assert fs.listxattr("f") == []
    fs.setxattr("f", "user.one", b"1")
    fs.setxattr("f", "user.two", b"\x00binary\xff" * 100)
    fs.setxattr("d", "user.dir", b"")
    assert fs.getxattr("f", "user.one") == b"1"
    assert fs.getxattr("f", "user.two") == b"\x00binary\xff" * 100
    assert fs.getxattr("d", "user.dir") == b""
    assert sorted(fs.listxattr("f")) == ["user.one", "user.two"]
    assert errno_of(fs.getxattr, "f", "user.missing") == errno.ENODATA
    fs.setxattr("f", "user.one", b"replaced")
    assert fs.getxattr("f", "user.one") == b"replaced"
    fs.removexattr("f", "user.one")
    assert errno_of(fs.getxattr, "f", "user.one") == errno.ENODATA
    assert errno_of(fs.removexattr, "f", "user.one") == errno.ENODATA
    assert fs.listxattr("f") == ["user.two"]


def test_unsupported_xattr_namespaces(fs: Driver) -> None:
    """security.* and system.* are not stored: EOPNOTSUPP for reads too, which is
    also what lets ls stop asking for SELinux labels and ACLs file by file."""
    touch(fs, "f")
    for name in ("security.selinux", "security.capability", "system.posix_acl_access"):
        assert errno_of(fs.getxattr, "f", name) == errno.EOPNOTSUPP
    assert errno_of(fs.setxattr, "f", "security.selinux", b"x") == errno.EOPNOTSUPP
    fs.setxattr("f", "user.ok", b"1")
    assert fs.getxattr("f", "user.ok") == b"1"


def test_xattr_create_replace_flags(fs: Driver) -> None:
    touch(fs, "f")
    assert errno_of(fs.setxattr, "f", "user.x", b"1", XATTR_REPLACE) == errno.ENODATA
    fs.setxattr("f", "user.x", b"1", XATTR_CREATE)
    assert errno_of(fs.setxattr, "f", "user.x", b"2", XATTR_CREATE) == errno.EEXIST
    fs.setxattr("f", "user.x", b"3", XATTR_REPLACE)
    assert fs.getxattr("f", "user.x") == b"3"


def test_xattr_limits(fs: Driver) -> None:
    touch(fs, "f")
    fs.setxattr("f", "user.big", b"v" * 65536)
    assert fs.getxattr("f", "user.big") == b"v" * 65536
    assert errno_of(fs.setxattr, "f", "user.bigger", b"v" * 65537) == errno.E2BIG
    fs.setxattr("f", "user." + "n" * 250, b"long name")
    assert errno_of(fs.setxattr, "f", "user." + "n" * 251, b"x") == errno.ERANGE
    assert sorted(fs.listxattr("f")) == sorted(["user.big", "user." + "n" * 250])


def test_xattrs_survive_remount(fs: Driver) -> None:
    fs.write_file("f", b"content")
    fs.mkdir("d")
    fs.setxattr("f", "user.k", b"v" * 1000)
    fs.setxattr("d", "user.dk", b"dv")
    fs.setxattr("", "user.root", b"rv")
    fs.setxattr("f", "user.gone", b"removed before the remount")
    commit(fs)
    fs.removexattr("f", "user.gone")
    fs.remount()
    assert fs.getxattr("f", "user.k") == b"v" * 1000
    assert fs.getxattr("d", "user.dk") == b"dv"
    assert fs.getxattr("", "user.root") == b"rv"
    assert fs.listxattr("f") == ["user.k"]


# ------------------------------------------------------------------------ names


def test_name_of_255_bytes_works(fs: Driver) -> None:
    n255 = "é" * 127 + "x"  # 255 bytes in UTF-8
    assert len(os.fsencode(n255)) == 255
    fs.write_file(n255, b"long")
    fs.mkdir("d" * 255)
    fs.rename(n255, f"{'d' * 255}/{'r' * 255}")
    assert fs.read_file(f"{'d' * 255}/{'r' * 255}") == b"long"
    assert fs.listdir("d" * 255) == ["r" * 255]


def test_name_of_256_bytes_is_enametoolong(fs: Driver) -> None:
    n256 = "n" * 256
    touch(fs, "f")
    assert errno_of(fs.open, n256, os.O_WRONLY | os.O_CREAT) == errno.ENAMETOOLONG
    assert errno_of(fs.mkdir, n256) == errno.ENAMETOOLONG
    assert errno_of(fs.rename, "f", n256) == errno.ENAMETOOLONG
    assert errno_of(fs.lstat, n256) == errno.ENAMETOOLONG
    assert errno_of(fs.symlink, "f", n256) == errno.ENAMETOOLONG
    assert errno_of(fs.link, "f", n256) == errno.ENAMETOOLONG
    assert fs.listdir("") == ["f"]


# ---------------------------------------------------------------------- handles


def test_open_unlinked_file_lives_until_closed(fs: Driver) -> None:
    fs.write_file("f", b"hello")
    fd = fs.open("f", os.O_RDWR)
    fs.unlink("f")
    assert not fs.exists("f")
    assert fs.listdir("") == []
    assert fs.pread(fd, 100, 0) == b"hello"
    fs.pwrite(fd, b" world", 5)
    tail = pattern(CHUNK_SIZE, seed=7)
    fs.pwrite(fd, tail, CHUNK_SIZE - 100)  # completes (and stores) a whole chunk
    fs.fsync(fd)
    fs.drop_cache(fd)
    assert fs.fstat(fd).st_nlink == 0
    assert fs.fstat(fd).st_size == 2 * CHUNK_SIZE - 100
    assert fs.pread(fd, 11, 0) == b"hello world"
    assert fs.pread(fd, CHUNK_SIZE, CHUNK_SIZE - 100) == tail
    fs.close(fd)
    assert not fs.exists("f")
    touch(fs, "f")  # the name is free and new
    assert fs.read_file("f") == b""
    fs.remount()
    assert fs.listdir("") == ["f"]
    assert fs.read_file("f") == b""


def test_open_unlinked_hard_linked_file(fs: Driver) -> None:
    fs.write_file("a", b"abc")
    fs.link("a", "b")
    fd = fs.open("a", os.O_RDWR)
    fs.unlink("a")
    fs.unlink("b")
    fs.pwrite(fd, b"XYZ", 3)
    fs.fsync(fd)
    fs.drop_cache(fd)
    assert fs.pread(fd, 10, 0) == b"abcXYZ"
    fs.close(fd)
    assert fs.listdir("") == []


def test_open_file_replaced_by_rename_lives_until_closed(fs: Driver) -> None:
    fs.write_file("old", b"old content")
    fs.write_file("new", b"new")
    fd = fs.open("old", os.O_RDWR)
    fs.rename("new", "old")
    assert fs.read_file("old") == b"new"
    fs.pwrite(fd, b"!", 11)
    fs.fsync(fd)
    fs.drop_cache(fd)
    assert fs.pread(fd, 100, 0) == b"old content!"
    assert fs.fstat(fd).st_nlink == 0
    fs.close(fd)
    assert fs.read_file("old") == b"new"
    assert fs.listdir("") == ["old"]


def test_two_handles_see_each_others_writes(fs: Driver) -> None:
    fs.write_file("f", b"")
    a = fs.open("f", os.O_RDWR)
    b = fs.open("f", os.O_RDWR)
    fs.pwrite(a, b"from a", 0)
    assert fs.pread(b, 100, 0) == b"from a"
    fs.pwrite(b, b"B", 5)
    fs.pwrite(b, b"!", CHUNK_SIZE)
    assert fs.pread(a, 6, 0) == b"from B"
    assert fs.fstat(a).st_size == CHUNK_SIZE + 1
    fs.ftruncate(a, 4)
    assert fs.pread(b, 100, 0) == b"from"
    fs.close(a)
    fs.close(b)
    assert fs.read_file("f") == b"from"


def test_concurrent_operations_from_many_threads(fs: Driver) -> None:
    """Threads creating, writing (out of order, across chunks), renaming and listing
    at once leave exactly what each of them did, also after a remount."""
    fs.mkdir("work")
    fs.mkdir("done")
    region = CHUNK_SIZE // 3 + 12345  # regions of the shared file straddle chunks
    nthreads, nfiles = 6, 4
    fs.write_file("shared", b"")
    errors: list[BaseException] = []

    def data_for(t: int, j: int) -> bytes:
        return pattern([100, 70_000, 300_000, 5000][j], seed=100 * t + j)

    def worker(t: int) -> None:
        try:
            sfd = fs.open("shared", os.O_RDWR)
            mine = pattern(region, seed=1000 + t)
            for j in range(nfiles):
                data = data_for(t, j)
                fd = fs.open(f"work/t{t}-{j}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                half = len(data) // 2
                fs.pwrite(fd, data[half:], half)
                fs.pwrite(fd, data[:half], 0)
                fs.close(fd)
                fs.rename(f"work/t{t}-{j}", f"done/t{t}-{j}")
                piece = slice(j * region // nfiles, (j + 1) * region // nfiles)
                fs.pwrite(sfd, mine[piece], t * region + piece.start)
                fs.listdir("done")
            fs.close(sfd)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors

    def check() -> None:
        assert fs.listdir("work") == []
        assert sorted(fs.listdir("done")) == sorted(
            f"t{t}-{j}" for t in range(nthreads) for j in range(nfiles)
        )
        for t in range(nthreads):
            for j in range(nfiles):
                assert fs.read_file(f"done/t{t}-{j}") == data_for(t, j), (t, j)
        expect = b"".join(pattern(region, seed=1000 + t) for t in range(nthreads))
        assert fs.read_file("shared") == expect

    check()
    fs.remount()
    check()


# ------------------------------------------------------------------- durability


@pytest.mark.parametrize(
    ("size", "linked", "grow"),
    [(5, False, 0), (5, True, 0), (5, False, CHUNK_SIZE + 10), (5 * MiB, False, 0)],
    ids=["small", "small-hard-linked", "small-growing", "chunked"],
)
def test_fsynced_content_survives_crash_during_rewrite(
    fs: Driver, size: int, linked: bool, grow: int
) -> None:
    """After fsync the content is durable: while it is being rewritten (not yet
    synced) and other changes get committed, a crash leaves the old or the new
    bytes, never anything else."""
    old = pattern(size, seed=11)
    fd = fs.open("f", os.O_RDWR | os.O_CREAT, 0o644)
    fs.pwrite(fd, old, 0)
    if linked:
        fs.link("f", "f2")
    fs.fsync(fd)
    new = bytearray(old)
    new[0:3] = b"NEW"
    fs.pwrite(fd, b"NEW", 0)
    if grow:
        tail = pattern(grow, seed=12)
        fs.pwrite(fd, tail, size)
        new += tail
    commit(fs)  # commits everything that is dirty, the directory holding f too
    assert fs.read_after_crash("f") in (old, bytes(new))
    fs.close(fd)
    assert fs.read_file("f") == bytes(new)


# ---------------------------------------------------------------------- remount


def test_inode_numbers_stable_across_remount(fs: Driver) -> None:
    fs.mkdir("d")
    fs.mkdir("d/e")
    touch(fs, "d/f")
    fs.symlink("f", "d/l")
    fs.write_file("h", b"h")
    fs.link("h", "d/e/h2")
    paths = ["", "d", "d/e", "d/f", "d/l", "h", "d/e/h2"]
    before = {p: fs.lstat(p).st_ino for p in paths}
    assert len(set(before.values())) == len(paths) - 1  # h and d/e/h2 share one
    fs.remount()
    assert {p: fs.lstat(p).st_ino for p in paths} == before


def _populate(fs: Driver) -> None:
    fs.mkdir("docs")
    fs.mkdir("docs/deep")
    fs.mkdir("docs/deep/er", 0o700)
    fs.write_file("empty", b"")
    fs.write_file("small", b"small file")
    fs.write_file("docs/medium", pattern(100_000, seed=8))
    fs.write_file("docs/deep/big", pattern(CHUNK_SIZE + 777, seed=9))
    fs.write_file("sparse", b"")
    fd = fs.open("sparse", os.O_WRONLY)
    fs.pwrite(fd, b"far", 3 * CHUNK_SIZE + 5)
    fs.close(fd)
    fs.symlink("docs/medium", "link")
    fs.mkfifo("docs/fifo", 0o600)
    fs.write_file("shared", b"hard-linked")
    fs.link("shared", "docs/deep/shared2")
    fs.link("shared", "docs/shared3")
    fs.unlink("shared")
    fs.chmod("small", 0o4750)
    fs.chmod("docs", 0o1777)
    fs.chown("docs/medium", 1234, 5678)
    fs.setxattr("small", "user.colour", b"blue")
    fs.setxattr("docs/deep", "user.dir", b"attr")
    fs.setxattr("docs/shared3", "user.linked", b"yes")
    fs.rename("docs/deep/er", "er")
    fs.write_file("x", b"x")
    fs.mkdir("docs/y")
    fs.rename("x", "docs/y", RENAME_EXCHANGE)  # a file and a directory swap parents
    fs.write_file("moved", b"moved across")
    fs.rename("moved", "docs/deep/moved")
    fs.mkdir("empty-dir")
    fs.mkdir("docs/replaced")
    fs.rename("empty-dir", "docs/replaced")
    fs.mknod("docs/dev", stat.S_IFCHR | 0o600, os.makedev(1, 7))
    fs.write_file(os.fsdecode(b"bytes-\xff\xfe"), b"non-UTF-8 name")
    fs.mkdir("d" * 255)
    fs.write_file(f"{'d' * 255}/{'é' * 127}x", b"longest names")
    fs.utime("docs/deep/big", ns=(111_222_333_444_555_666, 777_888_999_000_111_222))
    fs.utime("docs/deep", ns=(5, 6))
    fs.write_file("l1", b"first linked")
    fs.link("l1", "docs/l1b")
    fs.write_file("l2", b"second linked")
    fs.link("l2", "docs/l2b")
    commit(fs)  # so that only the exchange below changes the linked inodes
    fs.rename("l1", "l2", RENAME_EXCHANGE)


def test_everything_survives_remount(fs: Driver) -> None:
    _populate(fs)
    before = snapshot(fs)
    assert before["docs/shared3"]["nlink"] == 2
    fs.remount()
    assert_same_tree(snapshot(fs), before)


def test_changes_after_remount_survive_remount(fs: Driver) -> None:
    _populate(fs)
    fs.remount()
    fs.write_file("docs/deep/shared2", b"rewritten")
    fs.rename("docs/deep", "deep2")
    fs.unlink("docs/medium")
    fs.truncate("deep2/big", 10)
    fs.setxattr("deep2", "user.more", b"m")
    before = snapshot(fs)
    assert before["docs/shared3"]["sha256"] == hashlib.sha256(b"rewritten").hexdigest()
    fs.remount()
    assert_same_tree(snapshot(fs), before)


# ------------------------------------------------- other users (through the kernel)
#
# These need a second user and the kernel's permission checks (default_permissions,
# allow_other), which the in-process vfs does not do: they only run on a mount.


@pytest.fixture
def allow_other_mount(tmp_path: Path) -> Iterator[Mount]:
    """A mount with ``allow_other``, so users other than root may use it."""
    with serving(new_mount(tmp_path, "shared", options=["allow_other"])) as m:
        yield m


def as_nobody(cwd: Path, code: str) -> Any:
    """Run ``code`` as nobody in ``cwd`` (entered as root first: pytest's tmp dirs
    are closed to others); it assigns ``result``, which comes back through JSON.
    ``attempt(fn, *args)`` gives ``"ok"`` or the errno name."""
    script = (
        textwrap.dedent(f"""
        import errno, json, os
        os.setgroups([])
        os.setgid({NOBODY})
        os.setuid({NOBODY})

        def attempt(fn, *args):
            try:
                fn(*args)
            except OSError as exc:
                return errno.errorcode[exc.errno]
            return "ok"

    """)
        + textwrap.dedent(code)
        + "\nprint(json.dumps(result))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr.decode()
    return json.loads(res.stdout)


def test_mount_without_allow_other_refuses_others(mount: Mount) -> None:
    (mount.path / "f").write_bytes(b"x")
    os.chmod(mount.path / "f", 0o644)
    result = as_nobody(
        mount.path,
        """
        result = [attempt(os.listdir, "."), attempt(os.stat, "f")]
    """,
    )
    assert result == ["EACCES", "EACCES"]


def test_allow_other_lets_others_in(allow_other_mount: Mount) -> None:
    root = allow_other_mount.path
    (root / "pub").write_bytes(b"public")
    os.chmod(root / "pub", 0o644)
    os.mkdir(root / "open")
    os.chmod(root / "open", 0o777)
    result = as_nobody(
        root,
        """
        with open("pub", "rb") as f:
            data = f.read().decode()
        with open("open/mine", "wb") as f:
            f.write(b"by nobody")
        st = os.stat("open/mine")
        result = [sorted(os.listdir(".")), data, st.st_uid, st.st_gid]
    """,
    )
    assert result == [["open", "pub"], "public", NOBODY, NOBODY]
    assert (root / "open" / "mine").read_bytes() == b"by nobody"


def test_others_get_eacces_without_permission(allow_other_mount: Mount) -> None:
    root = allow_other_mount.path
    (root / "secret").write_bytes(b"s")
    os.chmod(root / "secret", 0o600)
    os.mkdir(root / "closed")
    os.chmod(root / "closed", 0o755)
    (root / "closed" / "f").write_bytes(b"f")
    result = as_nobody(
        root,
        """
        result = [
            attempt(open, "secret", "rb"),
            attempt(open, "closed/new", "wb"),
            attempt(os.unlink, "closed/f"),
            attempt(os.mkdir, "closed/sub"),
            attempt(os.chmod, "secret", 0o666),
            attempt(os.rename, "closed/f", "moved"),
        ]
    """,
    )
    assert result == ["EACCES", "EACCES", "EACCES", "EACCES", "EPERM", "EACCES"]
    assert (root / "secret").read_bytes() == b"s"
    assert sorted(os.listdir(root / "closed")) == ["f"]


def test_setuid_cleared_when_non_owner_writes(allow_other_mount: Mount) -> None:
    root = allow_other_mount.path
    f = root / "prog"
    f.write_bytes(b"#!/bin/sh\n")
    os.chmod(f, 0o6777)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o6777
    result = as_nobody(
        root,
        """
        fd = os.open("prog", os.O_WRONLY)
        os.pwrite(fd, b"# changed\\n", 10)
        os.close(fd)
        result = os.stat("prog").st_mode
    """,
    )
    assert stat.S_IMODE(result) == 0o0777
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o0777
    assert f.read_bytes() == b"#!/bin/sh\n# changed\n"
    allow_other_mount.restart()
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o0777


def test_setuid_cleared_when_non_owner_truncates(allow_other_mount: Mount) -> None:
    """Also through open(O_TRUNC): with atomic_o_trunc the kernel leaves that
    truncation, and so the clearing, to the filesystem."""
    root = allow_other_mount.path
    for name in ("prog", "prog2"):
        (root / name).write_bytes(b"#!/bin/sh\n")
        os.chmod(root / name, 0o6777)
    result = as_nobody(
        root,
        """
        os.close(os.open("prog", os.O_WRONLY | os.O_TRUNC))
        os.truncate("prog2", 1)
        result = [os.stat("prog").st_mode, os.stat("prog2").st_mode]
    """,
    )
    assert [stat.S_IMODE(m) for m in result] == [0o0777, 0o0777]
    assert (os.stat(root / "prog").st_size, os.stat(root / "prog2").st_size) == (0, 1)
    allow_other_mount.restart()
    assert stat.S_IMODE(os.stat(root / "prog").st_mode) == 0o0777
    assert stat.S_IMODE(os.stat(root / "prog2").st_mode) == 0o0777


def test_root_truncating_keeps_setuid(allow_other_mount: Mount) -> None:
    f = allow_other_mount.path / "prog"
    f.write_bytes(b"#!/bin/sh\n")
    os.chmod(f, 0o6777)
    os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o6777
