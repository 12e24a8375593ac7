"""Real tools through a real mount: tar, git, rsync, cp -a, SQLite, editor-style saves.

Each test gets a fresh volume (the ``mount`` fixture); the daemon log must stay clean.
"""

from __future__ import annotations

import os
import random
import sqlite3
import stat
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path

from conftest import Mount

STDLIB = Path(os.__file__).parent
# Left out of the tarball: third-party packages, bytecode, and the 40 MiB static
# libpython in config-*/ (it only makes the test slower).
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def run(
    cmd: Sequence[str | os.PathLike[str]],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``cmd``; fail with its output unless it exits 0. Returns stdout."""
    p = subprocess.run(
        [os.fspath(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
    )
    assert p.returncode == 0, f"{cmd} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


def assert_same_tree(a: Path, b: Path) -> None:
    p = subprocess.run(
        ["diff", "-r", "--no-dereference", str(a), str(b)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
    )
    assert p.returncode == 0 and not p.stdout, f"trees differ:\n{p.stdout[:5000]}{p.stderr}"


def tree_meta(root: Path) -> dict[str, tuple[int, int, str | None]]:
    """relative path -> (st_mode, st_mtime_ns, symlink target)."""
    out: dict[str, tuple[int, int, str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, target)
    return out


# -- tar ------------------------------------------------------------------------------


def _stdlib_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = Path(info.name).parts
    if any(p in SKIP_DIRS or p.startswith("config-") for p in parts):
        return None
    return info


def test_tar_extract_source_tree(mount: Mount, tmp_path: Path) -> None:
    archive = tmp_path / "src.tar"
    rng = random.Random(1)
    big = tmp_path / "big.bin"  # crosses 4 MiB chunk boundaries
    big.write_bytes(rng.randbytes(9 * 1024 * 1024 + 12345))
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tf:
        tf.add(STDLIB, arcname="python", filter=_stdlib_filter)
        tf.add(big, arcname="python/zz-big.bin")
        # Links too: a symlink and a hard link member.
        link = tarfile.TarInfo("python/zz-symlink")
        link.type, link.linkname = tarfile.SYMTYPE, "os.py"
        tf.addfile(link)
        hard = tf.gettarinfo(STDLIB / "os.py", arcname="python/zz-hardlink")
        hard.type, hard.linkname, hard.size = tarfile.LNKTYPE, "python/os.py", 0
        tf.addfile(hard)
    with tarfile.open(archive) as tf:
        nfiles = sum(1 for m in tf.getmembers() if m.isfile())
    assert nfiles >= 2000, f"only {nfiles} files: not a real-sized tree"

    local = tmp_path / "local"
    local.mkdir()
    run(["tar", "xf", archive, "-C", local])
    run(["tar", "xf", archive, "-C", mount.path])
    assert_same_tree(local / "python", mount.path / "python")
    # tar's own check of every member's contents, mode, owner and mtime.
    run(["tar", "--compare", "-f", archive, "-C", mount.path])
    assert (mount.path / "python" / "zz-hardlink").stat().st_nlink == 2

    mount.restart()
    assert_same_tree(local / "python", mount.path / "python")
    run(["tar", "--compare", "-f", archive, "-C", mount.path])


# -- git ------------------------------------------------------------------------------


def _git_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Test Author",
        "GIT_AUTHOR_EMAIL": "author@example.invalid",
        "GIT_COMMITTER_NAME": "Test Committer",
        "GIT_COMMITTER_EMAIL": "committer@example.invalid",
        "LC_ALL": "C",
    }


def test_git_workflow(mount: Mount, tmp_path: Path) -> None:
    env = _git_env(tmp_path)
    repo = mount.path / "repo"
    repo.mkdir()
    git = [
        "git",
        "-c",
        "user.name=Test",
        "-c",
        "user.email=test@example.invalid",
        "-c",
        "init.defaultBranch=main",
    ]
    run([*git, "init", "-q"], cwd=repo, env=env)
    # A real tree: two stdlib packages plus a file that changes in a second commit.
    for pkg in ("json", "email"):
        run(["cp", "-r", STDLIB / pkg, repo / pkg])
        run(["find", repo / pkg, "-name", "__pycache__", "-prune", "-exec", "rm", "-rf", "{}", "+"])
    (repo / "notes.txt").write_text("first\n")
    run([*git, "add", "-A"], cwd=repo, env=env)
    run([*git, "commit", "-q", "-m", "initial import"], cwd=repo, env=env)
    (repo / "notes.txt").write_text("second\n")
    run([*git, "commit", "-q", "-a", "-m", "update notes"], cwd=repo, env=env)

    def check() -> None:
        assert run([*git, "status", "--porcelain"], cwd=repo, env=env) == ""
        log = run([*git, "log", "--format=%s"], cwd=repo, env=env).splitlines()
        assert log == ["update notes", "initial import"]
        run([*git, "fsck", "--full", "--strict", "--no-dangling"], cwd=repo, env=env)
        assert run([*git, "show", "HEAD~1:notes.txt"], cwd=repo, env=env) == "first\n"
        # The reflog is appended to (O_APPEND) once per commit.
        reflog = run([*git, "reflog", "--format=%gs"], cwd=repo, env=env).splitlines()
        assert reflog == ["commit: update notes", "commit (initial): initial import"]

    check()
    mount.restart()  # what reached the store, before gc rewrites anything
    check()
    # Repacking renames packs into place, mmaps them and deletes loose objects.
    run([*git, "gc", "-q", "--aggressive", "--prune=now"], cwd=repo, env=env)
    check()
    mount.restart()
    check()


# -- rsync ----------------------------------------------------------------------------

PAST_NS = 1_000_000_000 * 1_000_000_000 + 123_456_789  # 2001-09-09, sub-second part


def _make_tree(root: Path) -> None:
    rng = random.Random(7)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    files = {
        "a.txt": b"hello\n",
        "empty": b"",
        "sub/inline.bin": rng.randbytes(3000),
        "sub/medium.bin": rng.randbytes(300_000),
        "sub/deeper/big.bin": rng.randbytes(5 * 1024 * 1024 + 7),
        "script.sh": b"#!/bin/sh\necho hi\n",
    }
    for i, (rel, data) in enumerate(sorted(files.items())):
        p = root / rel
        p.write_bytes(data)
        p.chmod([0o644, 0o600, 0o755, 0o640, 0o444, 0o700][i % 6])
    (root / "link-rel").symlink_to("sub/inline.bin")
    (root / "sub" / "link-up").symlink_to("../a.txt")
    (root / "dangling").symlink_to("/nonexistent/target/path")
    (root / "sub" / "deeper").chmod(0o750)
    # mtimes in the past, deepest first so parents keep theirs.
    for k, (dirpath, dirnames, filenames) in enumerate(
        sorted(os.walk(root), key=lambda w: -len(w[0]))
    ):
        for j, name in enumerate(filenames + dirnames):
            t = PAST_NS + (k * 100 + j) * 1_000_003_000
            os.utime(Path(dirpath, name), ns=(t, t), follow_symlinks=False)


def _assert_meta_equal(a: Path, b: Path) -> None:
    ma, mb = tree_meta(a), tree_meta(b)
    assert sorted(ma) == sorted(mb)
    for rel in ma:
        mode_a, mtime_a, target_a = ma[rel]
        mode_b, mtime_b, target_b = mb[rel]
        assert mode_a == mode_b, f"{rel}: mode {mode_a:o} != {mode_b:o}"
        assert target_a == target_b, rel
        assert mtime_a == mtime_b, f"{rel}: mtime {mtime_a} != {mtime_b}"


def test_rsync_roundtrip(mount: Mount, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _make_tree(src)
    dst = mount.path / "dst"
    out = tmp_path / "out"
    run(["rsync", "-a", "--checksum", f"{src}/", f"{dst}/"])
    run(["rsync", "-a", "--checksum", f"{dst}/", f"{out}/"])
    assert_same_tree(src, dst)
    assert_same_tree(src, out)
    _assert_meta_equal(src, dst)
    _assert_meta_equal(src, out)
    # Nothing left to transfer, in either direction.
    assert run(["rsync", "-a", "--checksum", "-i", f"{src}/", f"{dst}/"]) == ""
    assert run(["rsync", "-a", "--checksum", "-i", f"{dst}/", f"{out}/"]) == ""
    mount.restart()
    _assert_meta_equal(src, dst)
    assert run(["rsync", "-a", "--checksum", "-i", f"{src}/", f"{dst}/"]) == ""


# -- cp -a ----------------------------------------------------------------------------


def _make_cp_tree(root: Path) -> dict[str, int]:
    """A tree with odd modes, hard links, symlinks, other owners and past mtimes.
    Returns the expected permission bits per path."""
    (root / "d" / "e").mkdir(parents=True)
    (root / "sticky").mkdir()
    modes = {
        "f600": 0o600,
        "f755": 0o755,
        "d/f444": 0o444,
        "d/e/f640": 0o640,
        "h1": 0o644,
        "sticky/tmpfile": 0o666,
    }
    for rel, mode in modes.items():
        (root / rel).write_bytes(f"content of {rel}\n".encode() * 50)
        (root / rel).chmod(mode)
    (root / "big").write_bytes(random.Random(3).randbytes(4 * 1024 * 1024 + 100))
    with open(root / "sparse", "wb") as f:  # holes: chunks of zeros are not stored
        f.seek(10 * 1024 * 1024 - 4)
        f.write(b"tail")
    os.link(root / "h1", root / "d" / "h2")  # hard link across directories
    (root / "d" / "sl").symlink_to("../f600")
    (root / "abs-link").symlink_to("/etc/hostname")
    os.chown(root / "d" / "e" / "f640", 1234, 5678)
    os.setxattr(root / "f600", "user.origin", b"cp-a test \x00\xff binary")
    os.setxattr(root / "d", "user.dir-note", b"a directory's xattr")
    os.setxattr(root / "h1", "user.shared", b"seen through both names")
    (root / "sticky").chmod(0o1777)
    (root / "d" / "e").chmod(0o711)
    modes.update({"sticky": 0o1777, "d/e": 0o711, "d/h2": 0o644, "big": 0o644, "sparse": 0o644})
    for k, (dirpath, dirnames, filenames) in enumerate(
        sorted(os.walk(root), key=lambda w: -len(w[0]))
    ):
        for j, name in enumerate(filenames + dirnames):
            t = PAST_NS - (k * 100 + j) * 7_654_321_987
            os.utime(Path(dirpath, name), ns=(t, t), follow_symlinks=False)
    return modes


def _cp_snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """path -> (mode, mtime_ns, uid, gid, nlink, link target, content, xattrs)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            xattrs = {
                k: os.getxattr(p, k, follow_symlinks=False)
                for k in os.listxattr(p, follow_symlinks=False)
            }
            snap[str(p.relative_to(root))] = (
                st.st_mode,
                st.st_mtime_ns,
                st.st_uid,
                st.st_gid,
                st.st_nlink if not stat.S_ISDIR(st.st_mode) else 0,
                target,
                data,
                xattrs,
            )
    return snap


def test_cp_a_preserves_everything(mount: Mount, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    modes = _make_cp_tree(src)
    expected = _cp_snapshot(src)
    dst = mount.path / "copy"
    run(["cp", "-a", src, dst])

    def check() -> None:
        got = _cp_snapshot(dst)
        assert sorted(got) == sorted(expected)
        for rel, want in expected.items():
            assert got[rel][:6] == want[:6], f"{rel}: {got[rel][:6]} != {want[:6]}"
            assert got[rel][6:] == want[6:], f"{rel}: content or xattrs differ"
        for rel, mode in modes.items():
            assert stat.S_IMODE((dst / rel).lstat().st_mode) == mode, rel
        h1, h2 = (dst / "h1").stat(), (dst / "d" / "h2").stat()
        assert h1.st_ino == h2.st_ino
        assert h1.st_nlink == h2.st_nlink == 2
        assert os.readlink(dst / "d" / "sl") == "../f600"
        assert (dst / "d" / "sl").read_bytes() == (src / "f600").read_bytes()
        assert (dst / "d" / "e" / "f640").stat().st_uid == 1234
        assert os.getxattr(dst / "d" / "h2", "user.shared") == b"seen through both names"
        # The copied top directory keeps its mtime too.
        assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns

    check()
    mount.restart()
    check()
    # Hard links stay linked after the remount: a write through one shows in the other.
    with open(dst / "h1", "ab") as f:
        f.write(b"appended\n")
    assert (dst / "d" / "h2").read_bytes().endswith(b"appended\n")


# -- SQLite ---------------------------------------------------------------------------

# Per database. Every transaction is fsynced through the mount (synchronous=FULL, the
# default): 3 fsyncs of ~4 ms each per transaction in rollback-journal mode (15-20 ms
# a transaction on this 2-core VM). 900 keep both tests within ~30 s of the suite's
# 15-minute budget, and still take the WAL database through many checkpoints.
SQLITE_TXNS = 900


def _row(i: int) -> tuple[int, str]:
    return i, f"row-{i:05d}-" + "x" * (i % 97)


def _sqlite_fill(db_path: Path, *, wal: bool) -> None:
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        if wal:
            assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
            # Checkpoint often: exercises the checkpoint path many times.
            db.execute("PRAGMA wal_autocheckpoint=100")
        else:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, v TEXT NOT NULL)")
        db.execute("CREATE INDEX t_v ON t (v)")
        for i in range(SQLITE_TXNS):
            db.execute("BEGIN")
            db.execute("INSERT INTO t (n, v) VALUES (?, ?)", _row(i))
            db.execute("COMMIT")
    finally:
        db.close()


def _sqlite_check(db_path: Path) -> None:
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("SELECT count(*) FROM t").fetchone() == (SQLITE_TXNS,)
        rows = db.execute("SELECT n, v FROM t ORDER BY id").fetchall()
        assert rows == [_row(i) for i in range(SQLITE_TXNS)]
        # The index agrees with the table.
        assert db.execute("SELECT n FROM t WHERE v = ?", (_row(777)[1],)).fetchall() == [(777,)]
    finally:
        db.close()


def test_sqlite_rollback_journal(mount: Mount) -> None:
    db = mount.path / "data" / "rollback.db"
    db.parent.mkdir()
    _sqlite_fill(db, wal=False)
    _sqlite_check(db)
    assert sorted(os.listdir(db.parent)) == ["rollback.db"]  # journal deleted each time
    mount.restart()
    _sqlite_check(db)


def test_sqlite_wal(mount: Mount) -> None:
    db = mount.path / "data" / "wal.db"
    db.parent.mkdir()
    _sqlite_fill(db, wal=True)
    _sqlite_check(db)
    mount.restart()
    _sqlite_check(db)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


# -- editor-style save ----------------------------------------------------------------


def test_editor_atomic_save(mount: Mount) -> None:
    d = mount.path / "docs"
    d.mkdir()
    target = d / "notes.txt"
    target.write_text("version -1\n")

    def version(k: int) -> bytes:
        return f"version {k}\n".encode() * (1 + k * 37)  # crosses the inline size

    old_fd = os.open(target, os.O_RDONLY)
    old = b"version -1\n"
    for k in range(50):
        tmp = d / f".notes.txt.swp-{k}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, version(k))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        assert target.read_bytes() == version(k)
        # A reader holding the replaced file still sees the old contents.
        assert os.pread(old_fd, len(old) + 10, 0) == old
        os.close(old_fd)
        old_fd, old = os.open(target, os.O_RDONLY), version(k)
    os.close(old_fd)
    assert os.listdir(d) == ["notes.txt"]
    assert target.read_bytes() == version(49)
    mount.restart()
    assert os.listdir(d) == ["notes.txt"]
    assert target.read_bytes() == version(49)
