"""Object stores: the contract suite against each store, plus store-specific tests."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import megafs
from megafs.errors import (
    NoSpace,
    ObjectNotFound,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
)
from megafs.stores import LocalStore, MemoryStore, ObjectStore, open_store
from megafs.testing import FaultyStore, check_store


def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return trio.run(fn, *args)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


# -- the contract suite ---------------------------------------------------------


def test_memory_store_contract() -> None:
    async def make() -> ObjectStore:
        return MemoryStore()

    run(check_store, make)


def test_local_store_contract(tmp_path: Path) -> None:
    counter = itertools.count()

    async def make() -> ObjectStore:
        return LocalStore(tmp_path / f"store{next(counter)}")

    run(check_store, make)
    assert next(counter) > 10  # one fresh store per check
    assert temp_files(tmp_path) == []


def test_faulty_store_contract_without_faults() -> None:
    async def make() -> ObjectStore:
        return FaultyStore(MemoryStore())

    run(check_store, make)


def test_check_store_catches_a_broken_store() -> None:
    async def make() -> ObjectStore:
        store = FaultyStore(MemoryStore())
        store.truncate_gets.add("t/mib")
        return store

    with pytest.raises(AssertionError) as info:
        run(check_store, make)
    assert any("_check_roundtrip" in note for note in info.value.__notes__)


# -- LocalStore -----------------------------------------------------------------

INVALID_KEYS = [
    "",
    "/a",
    "a/",
    "a//b",
    ".",
    "..",
    "a/../b",
    "a/./b",
    "a b",
    "a\\b",
    "\u00e4",
    "a\nb",
    ".tmp-abc",
    "a/.tmp-abc",
    ".lock",
]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_local_store_rejects_invalid_keys(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path)

    async def main() -> None:
        with pytest.raises(ValueError):
            await store.put(key, b"x")
        with pytest.raises(ValueError):
            await store.get(key)
        with pytest.raises(ValueError):
            await store.head(key)
        with pytest.raises(ValueError):
            await store.delete(key)

    run(main)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["A.b_c-1", "megafs.header", "c/ab/abcd", ".hidden", "x/..y"])
def test_local_store_accepts_valid_keys(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "s")

    async def main() -> None:
        await store.put(key, b"data")
        assert await store.get(key) == b"data"
        assert [info.key for info in await store.list()] == [key]

    run(main)
    assert (tmp_path / "s" / key).read_bytes() == b"data"


def test_local_store_layout_and_url(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    assert store.url == f"file://{tmp_path}/root"

    async def main() -> None:
        await store.put("c/ab/abcd", b"chunk")

    run(main)
    assert (tmp_path / "root" / "c" / "ab" / "abcd").read_bytes() == b"chunk"


def test_local_store_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    async def main() -> None:
        etag = await store.put("k/obj", b"one")
        await store.put("k/obj", b"two", if_match=etag)
        with pytest.raises(PreconditionFailed):
            await store.put("k/obj", b"three", if_match=etag)
        with pytest.raises(PreconditionFailed):
            await store.put("k/obj", b"four", if_none_match=True)
        await store.put("k/new", b"five", if_none_match=True)
        await store.delete("k/new")

    run(main)
    assert temp_files(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["obj"]


def test_local_store_ignores_stray_temp_and_foreign_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    async def main() -> None:
        await store.put("c/old", b"old")
        # An interrupted put of "c/new" left its temp file behind.
        (tmp_path / "c" / ".tmp-xyz").write_bytes(b"half-written")
        (tmp_path / ".tmp-abc").write_bytes(b"")
        (tmp_path / "c" / "bad name").write_bytes(b"not ours")
        (tmp_path / "c" / "link").symlink_to(tmp_path / "c" / "old")
        os.mkfifo(tmp_path / "c" / "fifo")
        assert [info.key for info in await store.list()] == ["c/old"]
        assert [info.key for info in await store.list("c/")] == ["c/old"]
        with pytest.raises(ObjectNotFound):
            await store.get("c/new")
        with pytest.raises(ObjectNotFound):
            await store.head("c/new")
        for key in ("c/link", "c/fifo"):
            with pytest.raises(ObjectNotFound):
                await store.get(key)
            with pytest.raises(ObjectNotFound):
                await store.head(key)
        await store.put("c/new", b"new")
        assert await store.get("c/new") == b"new"

    run(main)


def test_local_store_missing_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "does" / "not" / "exist")

    async def main() -> None:
        assert await store.list() == []
        with pytest.raises(ObjectNotFound):
            await store.get("a")
        await store.delete("a")
        await store.put("a", b"x")
        assert await store.get("a") == b"x"

    run(main)


def test_local_store_prefix_that_cannot_be_a_key(tmp_path: Path) -> None:
    (tmp_path / "outside").write_bytes(b"secret")
    store = LocalStore(tmp_path / "root")

    async def main() -> None:
        await store.put("a/b", b"x")
        assert await store.list("../") == []
        assert await store.list("a/../") == []
        assert await store.list("/a") == []

    run(main)


def test_local_store_file_directory_clash(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    async def main() -> None:
        await store.put("a/b", b"x")
        with pytest.raises(ObjectNotFound):
            await store.get("a")
        with pytest.raises(ObjectNotFound):
            await store.head("a")
        await store.delete("a")  # a directory is not an object: nothing to delete
        with pytest.raises(StoreError) as info:
            await store.put("a", b"y")
        assert not isinstance(info.value, (ObjectNotFound, StoreUnavailable))
        with pytest.raises(StoreError):
            await store.put("a/b/c", b"z")
        assert await store.get("a/b") == b"x"

    run(main)
    assert temp_files(tmp_path) == []


def test_local_store_os_error_mapping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async def main() -> None:
        await store.put("k/obj", b"old")
        monkeypatch.setattr(os, "replace", full)
        with pytest.raises(StoreError) as info:
            await store.put("k/obj", b"new")
        monkeypatch.undo()
        assert type(info.value) is NoSpace  # ENOSPC: the writer sees ENOSPC, not EIO
        message = str(info.value)
        assert "'k/obj'" in message and "ENOSPC" in message and "\n" not in message
        assert await store.get("k/obj") == b"old"

    run(main)
    assert temp_files(tmp_path) == []


def test_local_store_etag_format(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    async def main() -> str:
        return await store.put("obj", b"12345")

    etag = run(main)
    st = (tmp_path / "obj").stat()
    assert etag == f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"


def test_local_store_two_instances_share_the_lock(tmp_path: Path) -> None:
    stores = [LocalStore(tmp_path) for _ in range(4)]
    winners: list[int] = []

    async def attempt(i: int) -> None:
        try:
            await stores[i % 4].put("race", str(i).encode(), if_none_match=True)
        except PreconditionFailed:
            return
        winners.append(i)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(attempt, i)

    run(main)
    assert len(winners) == 1
    assert (tmp_path / "race").read_bytes() == str(winners[0]).encode()


_RACE_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import trio

    from megafs.errors import PreconditionFailed
    from megafs.stores import LocalStore


    async def main() -> None:
        store = LocalStore(Path(sys.argv[1]))
        start = Path(sys.argv[3])
        while not start.exists():
            await trio.sleep(0.001)
        try:
            await store.put("race", sys.argv[2].encode(), if_none_match=True)
        except PreconditionFailed:
            print("lost")
        else:
            print("won")


    trio.run(main)
    """
)


def test_local_store_create_only_across_processes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    start = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE_SCRIPT, str(root), f"proc {i}", str(start)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(megafs.__file__).parents[1])},
        )
        for i in range(4)
    ]
    start.touch()
    results = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert sorted(results) == ["lost", "lost", "lost", "won"]
    winner = results.index("won")
    assert (root / "race").read_bytes() == f"proc {winner}".encode()


# -- MemoryStore ----------------------------------------------------------------


def test_memory_store_basics() -> None:
    store = MemoryStore()
    assert store.url == "memory:"

    async def main() -> None:
        buf = bytearray(b"abc")
        etag = await store.put("k", bytes(buf))
        buf[0] = 0
        assert await store.get("k") == b"abc"
        assert etag == (await store.head("k")).etag
        assert await store.put("k", b"abc") == etag  # content hash
        with pytest.raises(ValueError):
            await store.put("../k", b"x")
        with pytest.raises(ValueError):
            await store.get("k", -1)
        with pytest.raises(ValueError):
            await store.get("k", 5, 2)
        await store.aclose()
        assert await store.get("k") == b"abc"  # contents survive aclose

    run(main)


# -- FaultyStore ----------------------------------------------------------------


def test_faulty_store_knobs() -> None:
    inner = MemoryStore()
    store = FaultyStore(inner)

    async def main() -> None:
        await store.put("k", b"0123456789")
        store.fail_next("get", StoreUnavailable("try later"), count=2)
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                await store.get("k")
        assert await store.get("k", 2, 5) == b"234"
        assert store.calls["get"] == 3 and store.calls["put"] == 1
        assert store.gets == [("k", 0, None), ("k", 0, None), ("k", 2, 5)]

        store.corrupt_gets.add("k")
        damaged = await store.get("k")
        assert len(damaged) == 10 and damaged != b"0123456789"
        assert sum(a != b for a, b in zip(damaged, b"0123456789", strict=True)) == 1
        store.corrupt_gets.clear()
        store.truncate_gets.add("k")
        assert await store.get("k") == b"01234"
        store.truncate_gets.clear()
        assert await inner.get("k") == b"0123456789"  # the inner store is untouched

        store.fail_next("put", PreconditionFailed("lost"))
        with pytest.raises(PreconditionFailed):
            await store.put("k", b"new")
        assert await store.get("k") == b"0123456789"
        assert store.pending_faults("put") == 0

        store.delay = 0.05
        before = trio.current_time()
        await store.head("k")
        assert trio.current_time() - before >= 0.05

        with pytest.raises(ValueError):
            store.fail_next("frobnicate", StoreError("x"))

    run(main)
    assert store.url == "faulty:memory:"


# -- open_store -----------------------------------------------------------------


def test_open_store_paths_and_urls(tmp_path: Path) -> None:
    plain = open_store(str(tmp_path))
    assert isinstance(plain, LocalStore) and plain.root == tmp_path
    relative = open_store("some/dir")
    assert isinstance(relative, LocalStore) and relative.root == Path.cwd() / "some/dir"
    url = open_store(f"file://{tmp_path}/with%20space")
    assert isinstance(url, LocalStore) and url.root == tmp_path / "with space"
    local = open_store("file://localhost/srv/x")
    assert isinstance(local, LocalStore) and local.root == Path("/srv/x")
    assert isinstance(open_store("memory:"), MemoryStore)
    assert open_store("memory:") is not open_store("memory:")


@pytest.mark.parametrize(
    "url",
    [
        "mega://folder",
    ],
)
def test_open_store_not_supported_yet(url: str) -> None:
    with pytest.raises(StoreError, match="not supported") as info:
        open_store(url)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    ["", "ftp://host/x", "http://host/x", "memory:extra", "file://otherhost/x", "file:rel"],
)
def test_open_store_rejects_bad_urls(url: str) -> None:
    with pytest.raises(StoreError):
        open_store(url)


def test_open_store_unknown_scheme_message() -> None:
    with pytest.raises(StoreError, match="unknown store URL"):
        open_store("gopher://host/x")
