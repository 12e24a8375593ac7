"""File commands (megafs ls/cat/get/put/rm/mkdir/mv) end to end on a local-directory
store, as a user runs them: the ``megafs`` command in a subprocess."""

from __future__ import annotations

import filecmp
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MEGAFS, PASSPHRASE, make_volume

from megafs.config import UsageError
from megafs.filecmds import Target, parse_target

MiB = 1 << 20


@pytest.mark.parametrize(
    ("arg", "store", "path"),
    [
        ("/srv/vol", "/srv/vol", "/"),
        ("/srv/vol:", "/srv/vol", "/"),
        ("/srv/vol:/", "/srv/vol", "/"),
        ("/srv/vol:/a/b.txt", "/srv/vol", "/a/b.txt"),
        ("vol:/a:b/c", "vol", "/a:b/c"),  # a colon inside the path is a name character
        ("file:///srv/vol", "file:///srv/vol", "/"),
        ("file:///srv/vol:/x", "file:///srv/vol", "/x"),
        ("s3://bucket/prefix", "s3://bucket/prefix", "/"),
        ("s3://bucket/prefix:/photos/", "s3://bucket/prefix", "/photos"),
        ("webdav+http://host:8080/dav", "webdav+http://host:8080/dav", "/"),
        ("webdav+http://host:8080/dav:/a", "webdav+http://host:8080/dav", "/a"),
        ("webdav+https://[::1]:8443/d:/a/b", "webdav+https://[::1]:8443/d", "/a/b"),
        ("mega://me@example.com:/Docs", "mega://me@example.com", "/Docs"),
    ],
)
def test_store_and_path_syntax(arg: str, store: str, path: str) -> None:
    assert parse_target(arg) == Target(store, path)


def test_a_path_without_a_store_is_refused() -> None:
    with pytest.raises(UsageError):
        parse_target(":/a")


def megafs(
    *args: str | Path, cwd: Path, check: bool = True, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "MEGAFS_PASSPHRASE": PASSPHRASE, "XDG_CACHE_HOME": str(cwd / "xdg")}
    res = subprocess.run(
        [*MEGAFS, *map(str, args)], cwd=cwd, env=env, capture_output=True, timeout=300, input=stdin
    )
    if check:
        assert res.returncode == 0, res.stderr.decode()
        assert res.stderr == b"", res.stderr.decode()  # no progress lines off a terminal
    return res


def failure(*args: str | Path, cwd: Path) -> tuple[int, str]:
    res = megafs(*args, cwd=cwd, check=False)
    lines = res.stderr.decode().splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stderr.decode()
    assert lines[0].startswith("megafs: ")
    return res.returncode, lines[0]


def test_file_commands_end_to_end(tmp_path: Path) -> None:
    make_volume(tmp_path / "vol")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "hello.txt").write_bytes(b"hello\n")
    (src / "sub" / "big").write_bytes(random.Random(3).randbytes(5 * MiB + 3))
    os.symlink("hello.txt", src / "link")
    os.utime(src / "hello.txt", ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))

    megafs("put", "-r", "src", "vol:/", cwd=tmp_path)  # into the root, as cp -r
    megafs("put", "src/hello.txt", "vol:/copy.txt", cwd=tmp_path)  # a file, exact name
    assert megafs("ls", "vol", cwd=tmp_path).stdout == b"copy.txt\nsrc\n"
    assert megafs("ls", "vol:/src", cwd=tmp_path).stdout == b"hello.txt\nlink\nsub\n"
    long = megafs("ls", "-l", "vol:/src", cwd=tmp_path).stdout.decode().splitlines()
    assert long[0].startswith("-rw-r--r--") and long[0].endswith(" hello.txt")
    assert " 6 2023-11-1" in long[0]  # size and date
    assert long[1].startswith("lrwxrwxrwx") and long[1].endswith(" link -> hello.txt")
    assert long[2].startswith("drwx")
    rec = megafs("ls", "-R", "vol", cwd=tmp_path).stdout.decode()
    assert rec == "/:\ncopy.txt\nsrc\n\n/src:\nhello.txt\nlink\nsub\n\n/src/sub:\nbig\n"
    assert megafs("ls", "vol:/src/hello.txt", cwd=tmp_path).stdout == b"hello.txt\n"

    assert megafs("cat", "vol:/src/hello.txt", "vol:/copy.txt", cwd=tmp_path).stdout == (
        b"hello\nhello\n"
    )
    megafs("mkdir", "-p", "vol:/a/b/c", cwd=tmp_path)
    megafs("mkdir", "-p", "vol:/a/b/c", cwd=tmp_path)  # no error if it exists
    megafs("mkdir", "vol:/d1", "vol:/d2", cwd=tmp_path)
    megafs("mv", "vol:/copy.txt", "vol:/a/b", cwd=tmp_path)  # into a directory
    megafs("mv", "vol:/d1", "vol:/renamed", cwd=tmp_path)  # a rename
    assert megafs("ls", "vol:/a/b", cwd=tmp_path).stdout == b"c\ncopy.txt\n"
    assert megafs("ls", "vol", cwd=tmp_path).stdout == b"a\nd2\nrenamed\nsrc\n"

    megafs("get", "-r", "vol:/src", "back", cwd=tmp_path)
    assert filecmp.cmp(src / "sub" / "big", tmp_path / "back" / "sub" / "big", shallow=False)
    assert os.readlink(tmp_path / "back" / "link") == "hello.txt"
    assert os.stat(tmp_path / "back" / "hello.txt").st_mtime_ns == 1_700_000_000 * 10**9
    (tmp_path / "dir").mkdir()
    megafs("get", "vol:/a/b/copy.txt", "dir", cwd=tmp_path)  # into a directory
    assert (tmp_path / "dir" / "copy.txt").read_bytes() == b"hello\n"

    megafs("rm", "vol:/a/b/copy.txt", "vol:/src/link", cwd=tmp_path)
    megafs("rm", "-r", "vol:/a", "vol:/src", cwd=tmp_path)
    assert megafs("ls", "vol", cwd=tmp_path).stdout == b"d2\nrenamed\n"


def test_errors_are_one_line(tmp_path: Path) -> None:
    make_volume(tmp_path / "vol")
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "plain").mkdir()
    megafs("mkdir", "vol:/d", cwd=tmp_path)
    megafs("put", "f", "vol:/d/f", cwd=tmp_path)
    cases = [
        (("cat", "vol:/nope"), "megafs: vol:/nope: No such file or directory"),
        (("ls", "vol:/d/f/x"), "megafs: vol:/d/f/x: Not a directory"),
        (("mkdir", "vol:/d"), "megafs: vol:/d: File exists"),
        (("mkdir", "vol:/x/y"), "megafs: vol:/x/y: No such file or directory"),
        (("rm", "vol:/d"), "megafs: vol:/d is a directory (use -r)"),
        (("get", "vol:/d", "out"), "megafs: vol:/d is a directory (use -r)"),
        (("put", "missing", "vol:/"), "megafs: missing: No such file or directory"),
        (("put", ".", "vol:/"), "megafs: . is a directory (use -r)"),
        (("mv", "vol:/nope", "vol:/d"), "megafs: vol:/nope -> vol:/d/nope: No such file"),
        (("mv", "vol:/d", "other:/d"), "megafs: all paths must be on the same store"),
        (("ls", "missing-store"), "megafs: store missing-store does not exist"),
        (("ls", "f"), "megafs: store f does not exist"),  # a file is no store
        (("ls", "plain"), "megafs: file://"),  # an empty directory holds no volume
        (("cat", "vol:/d"), "megafs: vol:/d: Is a directory"),
    ]
    for args, message in cases:
        _code, line = failure(*args, cwd=tmp_path)
        assert line.startswith(message), (args, line)
    env_less = {k: v for k, v in os.environ.items() if k != "MEGAFS_PASSPHRASE"}
    res = subprocess.run(
        [*MEGAFS, "ls", "vol"], cwd=tmp_path, env=env_less, capture_output=True, stdin=-3
    )
    assert res.returncode == 2 and res.stderr.decode().startswith("megafs: no passphrase")
    res = subprocess.run(
        [*MEGAFS, "ls", "vol"],
        cwd=tmp_path,
        env={**env_less, "MEGAFS_PASSPHRASE": "wrong"},
        capture_output=True,
    )
    assert res.returncode == 3 and len(res.stderr.decode().splitlines()) == 1


def _chunks(store: Path) -> dict[str, int]:
    """Chunk objects on a local store: name -> inode (a rewrite makes a new inode)."""
    return {p.name: p.stat().st_ino for p in (store / "c").rglob("*") if p.is_file()}


def test_interrupted_put_resumes_without_resending_chunks(tmp_path: Path) -> None:
    """Kill ``put`` half way (kill -9), run ``put --continue``: the content arrives
    whole, the files already there are skipped, and no chunk object that had reached
    the store is written again."""
    store = make_volume(tmp_path / "vol")
    src = tmp_path / "src"
    src.mkdir()
    (src / "done").write_bytes(b"small and finished")
    big = random.Random(7).randbytes(48 * MiB)
    (src / "big").write_bytes(big)
    env = {**os.environ, "MEGAFS_PASSPHRASE": PASSPHRASE, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.Popen(
        [*MEGAFS, "put", "-r", "src", "vol:/"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(_chunks(store)) < 3:
        assert proc.poll() is None, "put ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _chunks(store)
    assert 3 <= len(before) < 12  # 48 MiB is 12 chunks: it was cut short
    res = megafs("put", "-r", "--continue", "src", "vol:/", cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr.decode()
    # The killed put's lease (same host, dead pid) is taken over at once, and said so.
    assert res.stderr.decode().startswith("took over the volume's lease from")
    after = _chunks(store)
    assert {name: after.get(name) for name in before} == before  # none written again
    # 12 chunks of content, plus the partial last chunks the killed run's commits
    # stored (orphans now, for megafs gc).
    assert len(after) >= 12
    got = megafs("cat", "vol:/src/big", cwd=tmp_path).stdout
    assert got == big
    # A third run finds everything unchanged: nothing is written at all.
    megafs("put", "-r", "--continue", "src", "vol:/", cwd=tmp_path)
    assert _chunks(store) == after
