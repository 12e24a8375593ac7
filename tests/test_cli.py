"""The megafs command: init, mount (daemonised), umount, and every bad input giving
one clear line and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import MEGAFS, PASSPHRASE, Mount, make_volume, needs_fuse, new_mount

from megafs import exitcodes
from megafs.control import mounted_at
from megafs.format import HEADER_KEY


def megafs(
    *args: str, passphrase: str | None = PASSPHRASE, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MEGAFS_PASSPHRASE"}
    if passphrase is not None:
        env["MEGAFS_PASSPHRASE"] = passphrase
    return subprocess.run(
        [*MEGAFS, *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin if stdin is not None else "",
        timeout=timeout,
    )


def one_line_error(res: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("megafs: ") and fragment in lines[0], lines[0]


def _mount_args(store: Path, mnt: Path, cache: Path, *extra: str) -> list[str]:
    return ["mount", str(store), str(mnt), "-o", f"cache_dir={cache}", *extra]


# ---------------------------------------------------------------- init


def test_init_creates_volume_and_refuses_twice(tmp_path: Path) -> None:
    store = tmp_path / "vol"
    res = megafs("init", str(store))
    assert res.returncode == 0, res.stderr
    assert "created megafs volume" in res.stdout
    header = json.loads((store / HEADER_KEY).read_text())
    assert header["format"] == 1 and header["kdf"]["name"] == "argon2id"
    one_line_error(megafs("init", str(store)), exitcodes.NOT_A_VOLUME, "already holds")


def test_init_refuses_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("data")
    one_line_error(megafs("init", str(tmp_path)), exitcodes.USAGE, "not empty")
    assert (tmp_path / "x").read_text() == "data"


def test_init_without_passphrase_or_terminal(tmp_path: Path) -> None:
    one_line_error(
        megafs("init", str(tmp_path / "v"), passphrase=None), exitcodes.USAGE, "MEGAFS_PASSPHRASE"
    )


def test_passphrase_file(tmp_path: Path) -> None:
    pf = tmp_path / "pass"
    pf.write_text("from a file\n")
    res = megafs("init", str(tmp_path / "v"), "--passphrase-file", str(pf), passphrase=None)
    assert res.returncode == 0, res.stderr
    empty = tmp_path / "empty"
    empty.write_text("")
    one_line_error(
        megafs("init", str(tmp_path / "w"), "--passphrase-file", str(empty), passphrase=None),
        exitcodes.USAGE,
        "empty",
    )


def test_unsupported_store_scheme(tmp_path: Path) -> None:
    one_line_error(megafs("init", "ftp://example.invalid/x"), exitcodes.STORE_ERROR, "ftp")


# ---------------------------------------------------------------- mount


@needs_fuse
def test_mount_daemonises_and_umount_commits(tmp_path: Path) -> None:
    store = make_volume(tmp_path / "store")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = megafs(*_mount_args(store, mnt, tmp_path / "cache"))
    assert res.returncode == 0, res.stderr
    try:
        assert mounted_at(mnt)  # live as soon as the command returns
        (mnt / "f").write_bytes(b"committed by umount")
        one_line_error(
            megafs(*_mount_args(store, mnt, tmp_path / "c2")),
            exitcodes.MOUNTPOINT_ERROR,
            "already a mountpoint",
        )
    finally:
        res = megafs("umount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert not mounted_at(mnt)
    m = Mount(store, mnt, tmp_path / "cache", tmp_path / "log")
    m.start()
    try:
        assert (mnt / "f").read_bytes() == b"committed by umount"
    finally:
        m.stop()


@needs_fuse
def test_mount_read_only_option(tmp_path: Path) -> None:
    m = new_mount(tmp_path, options=["ro"])
    m.start()
    try:
        with pytest.raises(OSError) as info:
            (m.path / "x").write_text("no")
        assert info.value.errno == 30  # EROFS
    finally:
        m.stop()


def test_umount_of_something_not_mounted(tmp_path: Path) -> None:
    one_line_error(megafs("umount", str(tmp_path)), exitcodes.MOUNTPOINT_ERROR, "not mounted")


@needs_fuse
def test_wrong_passphrase(tmp_path: Path) -> None:
    store = make_volume(tmp_path / "store")
    (tmp_path / "mnt").mkdir()
    one_line_error(
        megafs(*_mount_args(store, tmp_path / "mnt", tmp_path / "c"), passphrase="wrong"),
        exitcodes.WRONG_PASSPHRASE,
        "wrong passphrase",
    )
    assert not mounted_at(tmp_path / "mnt")


@needs_fuse
@pytest.mark.parametrize("case", ["missing", "empty", "junk", "corrupt", "newer"])
def test_bad_stores(tmp_path: Path, case: str) -> None:
    store = tmp_path / "store"
    expect = {
        "missing": (exitcodes.MOUNTPOINT_ERROR, "does not exist"),
        "empty": (exitcodes.NOT_A_VOLUME, "not a megafs volume"),
        "junk": (exitcodes.NOT_A_VOLUME, "not a megafs volume"),
        "corrupt": (exitcodes.NOT_A_VOLUME, "damaged"),
        "newer": (exitcodes.NOT_A_VOLUME, "newer"),
    }[case]
    if case == "empty":
        store.mkdir()
    elif case == "junk":
        store.mkdir()
        (store / "notes.txt").write_text("hello")
    elif case in ("corrupt", "newer"):
        make_volume(store)
        h = store / HEADER_KEY
        if case == "corrupt":
            h.write_bytes(h.read_bytes().replace(b'"lanes": 1', b'"lanes": 7'))
        else:
            doc = json.loads(h.read_text())
            doc.pop("check")
            doc["format"] = 99
            from megafs.format.header import _encode

            h.write_bytes(_encode(doc))
    (tmp_path / "mnt").mkdir()
    before = sorted(p.name for p in store.rglob("*")) if store.exists() else None
    one_line_error(megafs(*_mount_args(store, tmp_path / "mnt", tmp_path / "c")), *expect)
    after = sorted(p.name for p in store.rglob("*")) if store.exists() else None
    assert before == after  # nothing written to a store we refused


@needs_fuse
def test_bad_mountpoints(tmp_path: Path) -> None:
    store = make_volume(tmp_path / "store")
    one_line_error(
        megafs(*_mount_args(store, tmp_path / "nope", tmp_path / "c")),
        exitcodes.MOUNTPOINT_ERROR,
        "does not exist",
    )
    (tmp_path / "file").write_text("x")
    one_line_error(
        megafs(*_mount_args(store, tmp_path / "file", tmp_path / "c")),
        exitcodes.MOUNTPOINT_ERROR,
        "not a directory",
    )


def test_unknown_mount_option(tmp_path: Path) -> None:
    store = make_volume(tmp_path / "store")
    (tmp_path / "mnt").mkdir()
    one_line_error(
        megafs(*_mount_args(store, tmp_path / "mnt", tmp_path / "c", "-o", "bogus=1")),
        exitcodes.USAGE,
        "unknown mount option",
    )


def test_status_and_umount_start_without_the_mount_code() -> None:
    """`megafs status` and `umount` (polled by scripts, run by every settle) import
    neither trio nor the mount, store or volume code: they start in ~0.1 s."""
    probe = (
        "import sys, megafs.cli; "
        "print(sorted(m for m in ('trio', 'megafs.mount', 'megafs.stores', 'megafs.volume', "
        "'megafs.sdk', 'megafs.mega') if m in sys.modules))"
    )
    import sys

    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@needs_fuse
def test_mount_with_relative_paths(tmp_path: Path) -> None:
    # The daemon works from /: a relative store or cache_dir must still name what it
    # names where the command was run.
    make_volume(tmp_path / "store")
    (tmp_path / "mnt").mkdir()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MEGAFS_PASSPHRASE": PASSPHRASE}
        cmd = [*MEGAFS, *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)

    res = run("mount", "store", "mnt", "-o", "cache_dir=cache")
    assert res.returncode == 0, res.stderr
    try:
        (tmp_path / "mnt" / "f").write_bytes(b"relative")
    finally:
        res = run("umount", "mnt")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "cache").is_dir() and not (Path("/") / "cache").exists()
    m = Mount(tmp_path / "store", tmp_path / "mnt", tmp_path / "cache", tmp_path / "log")
    m.start()
    try:
        assert (tmp_path / "mnt" / "f").read_bytes() == b"relative"
    finally:
        m.stop()
