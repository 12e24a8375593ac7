"""Volume maintenance commands: passwd, fsck, gc, export-key and --key-file.

One FUSE session fills a template volume (module fixture); each test works on a copy of
its store directory, mostly through the CLI as a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import MEGAFS, PASSPHRASE, TEST_KDF, Mount, make_volume, new_mount, serving

from megafs import exitcodes
from megafs.errors import VolumeError, WrongPassphrase
from megafs.format import HEADER_KEY
from megafs.format.header import unlock_header
from megafs.stores import LocalStore, MemoryStore
from megafs.volume import maintenance
from megafs.volume.drive import ROOT_INO, Volume

BIG = os.urandom(5 * 1024 * 1024 + 12345)  # two chunks
MEDIUM = os.urandom(200 * 1024)  # one chunk, several sub-blocks
FILES = {
    "docs/a.txt": BIG,
    "docs/small.txt": b"inline content\n",
    "docs/sub/deep.bin": MEDIUM,
    "top.txt": b"top\n",
}


def megafs(
    *args: str, passphrase: str | None = PASSPHRASE, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MEGAFS_PASSPHRASE", "MEGAFS_NEW_PASSPHRASE")
    }
    if passphrase is not None:
        e["MEGAFS_PASSPHRASE"] = passphrase
    e.update(env or {})
    return subprocess.run(
        [*MEGAFS, *args], capture_output=True, text=True, env=e, input="", timeout=120
    )


def one_line_error(res: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("megafs: ") and fragment in lines[0], lines[0]


def objects(store: Path, prefix: str = "") -> set[str]:
    return {
        str(p.relative_to(store))
        for p in store.rglob("*")
        if p.is_file() and not p.name.startswith(".") and str(p.relative_to(store)) != "lease"
        if str(p.relative_to(store)).startswith(prefix)
    }


def key_of(store: Path, path: str, kind: str = "dir") -> str:
    """The store key of a directory's object, or of a file's first chunk."""

    async def run() -> str:
        vol = await maintenance.unlock(LocalStore(store), PASSPHRASE.encode())
        ino = ROOT_INO
        parts = path.strip("/").split("/")
        for name in parts[:-1]:
            ino = (await vol.load_dir(ino)).entries[name.encode()].ino
        rec = (await vol.load_dir(ino)).entries[parts[-1].encode()]
        if kind == "dir":
            return vol.dir_key(rec.ino)
        from megafs.format.chunks import chunk_key

        return chunk_key(rec.chunks[0].cid)

    return trio.run(run)


def read_back(store: Path, tmp: Path, passphrase: str = PASSPHRASE) -> None:
    m = Mount(store, tmp / "rb-mnt", tmp / "rb-cache", tmp / "rb.log", passphrase=passphrase)
    with serving(m):
        for rel, data in FILES.items():
            assert (m.path / rel).read_bytes() == data, rel
        assert os.readlink(m.path / "link") == "top.txt"
        assert (m.path / "hard").read_bytes() == FILES["top.txt"]


def uploaded(m: Mount) -> None:
    res = subprocess.run(
        [*MEGAFS, "status", str(m.path), "--wait-idle"], capture_output=True, timeout=60
    )
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("template")
    with serving(new_mount(tmp)) as m:
        for rel, data in FILES.items():
            (m.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (m.path / rel).write_bytes(data)
        os.symlink("top.txt", m.path / "link")
        os.link(m.path / "top.txt", m.path / "hard")
        # Overwritten content leaves unreferenced chunks behind: garbage for gc.
        # (Each waits until the store holds it, or the write-back would skip it.)
        (m.path / "old.bin").write_bytes(os.urandom(300 * 1024))
        uploaded(m)
        (m.path / "old.bin").unlink()
        (m.path / "docs/sub/tmp.bin").write_bytes(os.urandom(100 * 1024))
        uploaded(m)
        (m.path / "docs/sub/tmp.bin").write_bytes(MEDIUM)  # same as deep.bin: deduplicated
    return m.store if isinstance(m.store, Path) else Path(m.store)


@pytest.fixture
def volume(template: Path, tmp_path: Path) -> Iterator[Path]:
    store = tmp_path / "store"
    shutil.copytree(template, store)
    (store / "lease").unlink(missing_ok=True)
    yield store


# ---------------------------------------------------------------- passwd


def test_passwd(volume: Path, tmp_path: Path) -> None:
    before = {k: (volume / k).read_bytes() for k in objects(volume) if k != HEADER_KEY}
    res = megafs("passwd", str(volume), env={"MEGAFS_NEW_PASSPHRASE": "new secret"})
    assert res.returncode == 0, res.stderr
    one_line_error(megafs("fsck", str(volume), "--quick"), exitcodes.WRONG_PASSPHRASE, "wrong")
    assert megafs("fsck", str(volume), passphrase="new secret").returncode == 0
    after = {k: (volume / k).read_bytes() for k in objects(volume) if k != HEADER_KEY}
    assert after == before  # only the header changed
    # The new one from a file; the old one from a file too.
    (tmp_path / "old").write_text("new secret\n")
    (tmp_path / "new").write_text("third\n")
    res = megafs(
        "passwd",
        str(volume),
        "--passphrase-file",
        str(tmp_path / "old"),
        "--new-passphrase-file",
        str(tmp_path / "new"),
        passphrase=None,
    )
    assert res.returncode == 0, res.stderr
    read_back(volume, tmp_path, passphrase="third")


def test_passwd_bad_input(volume: Path) -> None:
    one_line_error(
        megafs("passwd", str(volume), passphrase="wrong", env={"MEGAFS_NEW_PASSPHRASE": "x"}),
        exitcodes.WRONG_PASSPHRASE,
        "wrong passphrase",
    )
    one_line_error(megafs("passwd", str(volume)), exitcodes.USAGE, "MEGAFS_NEW_PASSPHRASE")


def test_passwd_conditional_put() -> None:
    """A header changed between read and write (a concurrent passwd) is not overwritten."""

    class Racing:
        def __init__(self, inner: MemoryStore) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        async def put(self, key: str, data: bytes, **kw: Any) -> str:
            if key == HEADER_KEY:
                current = await self.inner.get(key)
                await self.inner.put(key, current + b" ")  # someone else's passwd
            return await self.inner.put(key, data, **kw)

    async def run() -> None:
        store = MemoryStore()
        await Volume.create(store, b"old", kdf_params=TEST_KDF)
        racer: Any = Racing(store)
        with pytest.raises(VolumeError, match="changed"):
            await maintenance.change_passphrase(racer, b"old", b"new")
        with pytest.raises(WrongPassphrase):
            await maintenance.unlock(store, b"new")
        await maintenance.change_passphrase(store, b"old", b"new")
        await maintenance.unlock(store, b"new")
        with pytest.raises(WrongPassphrase):
            await maintenance.unlock(store, b"old")

    trio.run(run)


# ---------------------------------------------------------------- fsck


SUMMARY = re.compile(r"(\d+) directories, (\d+) files, (\d+) chunks \((\d+) bytes")


def test_fsck_healthy(volume: Path) -> None:
    for extra in ([], ["--quick"]):
        res = megafs("fsck", str(volume), *extra)
        assert res.returncode == 0, (res.stdout, res.stderr)
        assert res.stderr == ""  # no progress line without a terminal
        m = SUMMARY.search(res.stdout)
        assert m, res.stdout
        dirs, files, chunks, nbytes = map(int, m.groups())
        assert (dirs, files) == (3, 5)  # /, docs, sub; a, small, deep, tmp, top(+hard)
        assert chunks == 3  # a.txt: 2, deep.bin = tmp.bin: 1
        assert nbytes > len(BIG) + len(MEDIUM)
        assert "0 problem(s)" in res.stdout


def test_fsck_missing_chunk(volume: Path) -> None:
    (volume / key_of(volume, "docs/sub/deep.bin", "chunk")).unlink()
    for extra in ([], ["--quick"]):
        res = megafs("fsck", str(volume), *extra)
        one_line_error(res, exitcodes.ERROR, "2 problem(s) found")
        # Reported under every path that uses the chunk (deduplicated content).
        assert re.search(r"^/docs/sub/deep.bin: chunk 0 \(c/\S+\) is missing$", res.stdout, re.M)
        assert re.search(r"^/docs/sub/tmp.bin: chunk 0 \(c/\S+\) is missing$", res.stdout, re.M)
        assert "1 problem" not in res.stdout


def test_fsck_tampered_chunk_needs_full_check(volume: Path) -> None:
    p = volume / key_of(volume, "docs/a.txt", "chunk")
    data = bytearray(p.read_bytes())
    data[100_000] ^= 1  # inside sub-block 1
    p.write_bytes(bytes(data))
    assert megafs("fsck", str(volume), "--quick").returncode == 0  # size is right
    res = megafs("fsck", str(volume))
    one_line_error(res, exitcodes.ERROR, "1 problem(s)")
    assert re.search(r"^/docs/a.txt: chunk 0 .*damaged.*block 1", res.stdout, re.M), res.stdout


def test_fsck_tampered_directory(volume: Path) -> None:
    p = volume / key_of(volume, "docs/sub")
    data = bytearray(p.read_bytes())
    data[40] ^= 0x80
    p.write_bytes(bytes(data))
    res = megafs("fsck", str(volume))
    one_line_error(res, exitcodes.ERROR, "problem(s) found")
    assert re.search(
        r"^/docs/sub: directory unreadable: .*authentication failed", res.stdout, re.M
    ), res.stdout


# ---------------------------------------------------------------- gc


def test_gc_removes_orphans_only(volume: Path, tmp_path: Path) -> None:
    chunks = objects(volume, "c/")
    assert len(chunks) == 5  # 3 referenced + old.bin + the overwritten tmp.bin

    # Everything is younger than the default grace period: nothing goes.
    res = megafs("gc", str(volume))
    assert res.returncode == 0, res.stderr
    assert "deleted 0" in res.stdout and "kept 2 unreferenced chunks younger" in res.stdout

    everything = objects(volume)
    res = megafs("gc", str(volume), "--dry-run", "--grace", "0")
    assert res.returncode == 0, res.stderr
    assert len(re.findall(r"^would delete c/", res.stdout, re.M)) == 2
    assert re.search(r"would delete 2 unreferenced chunks, \d+ bytes", res.stdout)
    assert objects(volume) == everything

    res = megafs("gc", str(volume), "--grace", "0")
    assert res.returncode == 0, res.stderr
    assert "deleted 2 unreferenced chunks" in res.stdout
    assert objects(volume) == everything - (chunks - objects(volume, "c/"))
    assert len(objects(volume, "c/")) == 3
    assert not (volume / "lease").exists()  # released
    assert megafs("fsck", str(volume)).returncode == 0
    res = megafs("gc", str(volume), "--grace", "0")
    assert "deleted 0" in res.stdout
    read_back(volume, tmp_path)


def test_gc_refused_while_mounted(volume: Path, tmp_path: Path) -> None:
    m = Mount(volume, tmp_path / "mnt", tmp_path / "cache", tmp_path / "log")
    everything = objects(volume)
    with serving(m):
        one_line_error(
            megafs("gc", str(volume), "--grace", "0"), exitcodes.ERROR, "mounted read-write by"
        )
    assert objects(volume) == everything


def test_gc_deletes_nothing_when_a_directory_is_unreadable(volume: Path) -> None:
    p = volume / key_of(volume, "docs/sub")
    p.write_bytes(p.read_bytes()[:-1])
    everything = objects(volume)
    one_line_error(megafs("gc", str(volume), "--grace", "0"), exitcodes.ERROR, "nothing deleted")
    assert objects(volume) == everything
    assert not (volume / "lease").exists()


# ---------------------------------------------------------------- key files


def test_export_key_and_key_file(volume: Path, tmp_path: Path) -> None:
    key = tmp_path / "recovery.key"
    res = megafs("export-key", str(volume), "--key-file", str(key))
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    one_line_error(
        megafs("export-key", str(volume), "--key-file", str(key)), exitcodes.USAGE, "exists"
    )
    out = megafs("export-key", str(volume))  # without --key-file: to standard output
    assert out.returncode == 0, out.stderr
    from_stdout = maintenance.read_key_file(_write(tmp_path / "s", out.stdout))
    from_file = maintenance.read_key_file(key)
    assert (from_stdout.volume_id, from_stdout.key) == (from_file.volume_id, from_file.key)
    # The key file opens the volume without any passphrase...
    res = megafs("fsck", str(volume), "--key-file", str(key), passphrase=None)
    assert res.returncode == 0, res.stderr
    # ...and resets a forgotten one.
    res = megafs(
        "passwd",
        str(volume),
        "--key-file",
        str(key),
        passphrase=None,
        env={"MEGAFS_NEW_PASSPHRASE": "reset"},
    )
    assert res.returncode == 0, res.stderr
    master, _ = unlock_header((volume / HEADER_KEY).read_bytes(), b"reset")
    assert master == maintenance.read_key_file(key).key
    res = megafs("gc", str(volume), "--key-file", str(key), "--dry-run", passphrase=None)
    assert res.returncode == 0, res.stderr

    # Bad key files: one line, the right code, nothing changed.
    other = make_volume(tmp_path / "other")
    one_line_error(
        megafs("fsck", str(other), "--key-file", str(key)),
        exitcodes.WRONG_PASSPHRASE,
        "another volume",
    )
    forged = _write(tmp_path / "forged", _forge(key))
    one_line_error(
        megafs("fsck", str(volume), "--key-file", str(forged)),
        exitcodes.WRONG_PASSPHRASE,
        "does not unlock",
    )
    runkey = _write(tmp_path / "default.key", "c2NyaXB0cy9ydW4gc3R5bGUga2V5IGZpbGUgMzIgYnl0\n")
    one_line_error(
        megafs("fsck", str(volume), "--key-file", str(runkey)),
        exitcodes.USAGE,
        "use --passphrase-file",
    )
    one_line_error(
        megafs("fsck", str(volume), "--key-file", str(key), "--passphrase-file", str(runkey)),
        exitcodes.USAGE,
        "not both",
    )


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _forge(key: Path) -> str:
    """A key file for the same volume with another master key."""
    real = maintenance.read_key_file(key)
    return maintenance.encode_key_file(real.volume_id, os.urandom(32)).decode()


def test_mount_with_key_file(volume: Path, tmp_path: Path) -> None:
    key = tmp_path / "k"
    assert megafs("export-key", str(volume), "--key-file", str(key)).returncode == 0
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    res = megafs(
        "mount",
        str(volume),
        str(mnt),
        "-o",
        f"cache_dir={cache}",
        "--key-file",
        str(key),
        passphrase=None,
    )
    assert res.returncode == 0, res.stderr
    try:
        assert (mnt / "docs/a.txt").read_bytes() == BIG
        (mnt / "new.txt").write_bytes(b"written with a key file")
    finally:
        assert megafs("umount", str(mnt)).returncode == 0
    res = megafs("fsck", str(volume))
    assert res.returncode == 0, res.stdout
    assert "6 files" in res.stdout


def test_gc_in_process_batches_and_lease() -> None:
    """On a store with ``delete_many`` gc uses it; a live lease of another machine's
    mount stops gc before anything goes; keys megafs does not know are kept."""
    from megafs.volume.lease import Lease, LeaseHeld

    class Batching:
        def __init__(self, inner: MemoryStore) -> None:
            self.inner = inner
            self.batches: list[list[str]] = []

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        async def delete_many(self, keys: list[str]) -> None:
            self.batches.append(list(keys))
            for key in keys:
                await self.inner.delete(key)

    async def run() -> None:
        store = MemoryStore()
        await Volume.create(store, b"pw", kdf_params=TEST_KDF)
        orphans = [f"c/{i:02x}/{i:02x}" + "0" * 62 for i in range(3)]
        for key in orphans:
            await store.put(key, b"x" * 100)
        await store.put("stray/thing", b"?")
        vol = await maintenance.unlock(store, b"pw")

        other = Lease(store, vol.keys)
        other.host = "elsewhere"  # a live mount on another machine
        await other.acquire()
        with pytest.raises(LeaseHeld, match="elsewhere"):
            await maintenance.collect_garbage(store, b"pw", grace=0)
        assert all([await store.head(k) for k in orphans])
        await other.release()

        batching: Any = Batching(store)
        dry = await maintenance.collect_garbage(batching, b"pw", dry_run=True)
        assert sorted(o.key for o in dry.garbage) == orphans and dry.garbage_bytes == 300
        assert batching.batches == [] and dry.unknown == ["stray/thing"]
        done = await maintenance.collect_garbage(batching, b"pw")
        assert done.deleted == 3 and batching.batches == [orphans]
        assert [o.key for o in await store.list()] == [
            vol.dir_key(ROOT_INO),
            HEADER_KEY,
            "stray/thing",
        ]
        assert (await maintenance.fsck(store, b"pw")).ok

    trio.run(run)
