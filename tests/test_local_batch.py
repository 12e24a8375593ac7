"""The local store's group commit: puts that wait for a worker thread together are
written, fsynced and published as one batch, each with its own result."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import count_thread_hops

from megafs.errors import PreconditionFailed, StoreError
from megafs.stores import local
from megafs.stores.base import Computed
from megafs.stores.local import LocalStore


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def test_puts_waiting_together_share_a_thread_and_each_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops = count_thread_hops(monkeypatch)
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def counted_fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counted_fsync)
    store = LocalStore(tmp_path / "store")
    etags: dict[str, str] = {}

    async def one(i: int) -> None:
        key = f"c/{i % 4:02x}/k{i}"
        etags[key] = await store.put(key, b"x" * i)

    async def main() -> None:
        async with trio.open_nursery() as n:
            for i in range(64):
                n.start_soon(one, i)
        assert len(hops) <= 64 // local.PUT_BATCH_MAX + local.PUT_BATCHES + 1
        # Each put's file, and each directory once per batch (the store's four
        # fan-out directories, "c" and the root): not two fsyncs per put.
        assert len(fsyncs) <= 64 + 6 * len(hops)
        for key, etag in etags.items():
            info = await store.head(key)
            assert info.etag == etag and info.size == int(key.rsplit("k", 1)[1])

    trio.run(main)
    assert len(set(etags.values())) == 64
    assert _temp_files(tmp_path) == []


def test_each_put_of_a_batch_succeeds_or_fails_on_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch (the first put holds the only batch slot until the others wait):
    a create-only put of an existing key, a computation that fails, one that puts
    nothing, and plain puts; each caller gets its own outcome, no temp file stays."""
    monkeypatch.setattr(local, "PUT_BATCHES", 1)
    store = LocalStore(tmp_path)
    release = threading.Event()
    afters: list[str] = []
    outcomes: dict[str, object] = {}

    def held() -> Computed:
        release.wait(10)
        return "a/held", b"first"

    def broken() -> Computed:
        raise StoreError("staged object damaged on local disk: x")

    async def record(name: str, fn: Callable[[], Any]) -> None:
        try:
            outcomes[name] = await fn()
        except Exception as exc:
            outcomes[name] = exc

    async def main() -> None:
        await store.put("a/exists", b"old")
        async with trio.open_nursery() as n:
            n.start_soon(record, "held", lambda: store.put_computed(held))
            await trio.sleep(0.05)  # (its batch is running, in a thread)
            n.start_soon(record, "exists", lambda: store.put("a/exists", b"x", if_none_match=True))
            n.start_soon(record, "broken", lambda: store.put_computed(broken))
            n.start_soon(record, "nothing", lambda: store.put_computed(lambda: None))
            for i in range(3):
                n.start_soon(
                    record,
                    f"ok{i}",
                    lambda i=i: store.put_computed(
                        lambda: (f"b/ok{i}", b"new"), lambda: afters.append(f"ok{i}")
                    ),
                )
            n.start_soon(record, "stale", lambda: store.put("a/exists", b"y", if_match="0-0-0"))
            await trio.sleep(0.05)
            assert len(store._batches.waiting) == 7  # type: ignore[union-attr]
            release.set()
        assert isinstance(outcomes["exists"], PreconditionFailed)
        assert isinstance(outcomes["stale"], PreconditionFailed)
        assert isinstance(outcomes["broken"], StoreError)
        assert "damaged" in str(outcomes["broken"])
        assert outcomes["nothing"] is None
        assert sorted(afters) == ["ok0", "ok1", "ok2"]
        for i in range(3):
            assert outcomes[f"ok{i}"] == (await store.head(f"b/ok{i}")).etag
        assert await store.get("a/exists") == b"old"
        assert await store.get("a/held") == b"first"

    trio.run(main)
    assert _temp_files(tmp_path) == []


def test_a_cancelled_put_lands_only_if_its_batch_had_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put still waiting for a batch is withdrawn when its caller is cancelled (it
    must not land later, over a newer put of the same key); one in a running batch
    lands, and its caller goes on only once it has."""
    monkeypatch.setattr(local, "PUT_BATCHES", 1)
    store = LocalStore(tmp_path)
    release = threading.Event()
    scopes: dict[str, trio.CancelScope] = {}
    landed: dict[str, bool] = {}

    async def put(name: str, compute: Callable[[], Computed]) -> None:
        with trio.CancelScope() as scopes[name]:
            await store.put_computed(compute)
        landed[name] = (tmp_path / "k" / name).exists()

    def held(name: str) -> Callable[[], Computed]:
        def compute() -> Computed:
            release.wait(10)
            return f"k/{name}", name.encode()

        return compute

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(put, "running", held("running"))
            await trio.sleep(0.05)  # (its batch holds the only slot, in a thread)
            n.start_soon(put, "waiting", lambda: ("k/waiting", b"never"))
            await trio.sleep(0.05)
            scopes["waiting"].cancel()
            scopes["running"].cancel()
            await trio.sleep(0.05)
            assert "running" not in landed  # (cancelled, but waits for its batch)
            assert landed == {"waiting": False}
            release.set()
        assert landed == {"waiting": False, "running": True}
        assert scopes["waiting"].cancelled_caught
        assert await store.get("k/running") == b"running"
        # The withdrawn put never runs, not even with the next batch.
        await store.put("k/next", b"next")
        assert not (tmp_path / "k" / "waiting").exists()

    trio.run(main)
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize("syncfs_works", [True, False])
def test_a_large_batch_syncs_the_filesystem_or_else_each_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs_works: bool
) -> None:
    """More than SYNCFS_MIN puts in a batch: two syncfs calls instead of an fsync per
    file and directory; if syncfs fails, the fsyncs."""
    monkeypatch.setattr(local, "PUT_BATCHES", 1)
    calls: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    real_syncfs = local.syncfs

    def syncfs(directory: str) -> bool:
        calls.append("syncfs")
        return syncfs_works and real_syncfs(directory)

    monkeypatch.setattr(os, "fsync", fsync)
    store = LocalStore(tmp_path)
    release = threading.Event()
    n = local.SYNCFS_MIN + 4

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.put_computed, lambda: (release.wait(10), ("a/first", b"1"))[1])
            await trio.sleep(0.05)
            monkeypatch.setattr(local, "syncfs", syncfs)
            calls.clear()
            for i in range(n):
                nursery.start_soon(store.put, f"b/{i}", b"x" * i)
            await trio.sleep(0.05)
            release.set()
        for i in range(n):
            assert await store.get(f"b/{i}") == b"x" * i

    trio.run(main)
    # The first batch, one put: its file, its directory and the root fsynced.
    assert calls[:3] == ["fsync"] * 3
    if syncfs_works:
        assert calls[3:] == ["syncfs"] * 2
    else:  # (a failed syncfs is not tried again for the names)
        assert calls[3:] == ["syncfs"] + ["fsync"] * (n + 2)  # each file, "b", the root
