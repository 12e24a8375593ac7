"""How staged operations reach the store: barrier groups, the quiet period, the
status request that waits for the queue, and puts computed in the store's thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import PASSPHRASE, TEST_KDF, count_thread_hops, make_volume

from megafs import stack
from megafs.config import parse_options
from megafs.format.chunks import chunk_key
from megafs.mount import WAIT_ANSWER_MAX, _upload_now
from megafs.stores import MemoryStore, webdav
from megafs.stores.base import Computed, Deferred, ObjectStore, put_computed, run_after
from megafs.stores.local import LocalStore
from megafs.stores.staging import UPLOAD_CONCURRENCY, StagingStore, upload_concurrency
from megafs.stores.tracked import TrackedStore
from megafs.stores.webdav import WebDavStore
from megafs.testing import FaultyStore
from megafs.testing.slow import SlowStore
from megafs.vfs.fs import Ctx, Vfs
from megafs.volume.check import Report, check_volume
from megafs.volume.drive import ROOT_INO, Volume


def _barrier(key: str) -> bool:
    return not key.startswith("c/")


class _Recording(FaultyStore):
    """Notes, for each put, which keys were in flight and which were done when it
    began. The puts of the keys in ``slow`` take that many seconds more."""

    def __init__(self, delay: float, slow: dict[str, float] | None = None) -> None:
        super().__init__(MemoryStore())
        self.delay = delay
        self.slow = slow if slow is not None else {}
        self.flying: set[str] = set()
        self.finished: list[str] = []
        self.at_start: dict[str, tuple[set[str], set[str]]] = {}

    async def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        self.at_start[key] = (set(self.flying), set(self.finished))
        self.flying.add(key)
        try:
            await trio.sleep(self.slow.get(key, 0))
            return await super().put(key, data, if_none_match=if_none_match, if_match=if_match)
        finally:
            self.flying.discard(key)
            self.finished.append(key)


async def _upload_all(s: StagingStore) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.run_uploader)
        with trio.fail_after(20):
            await s.wait_idle()
        nursery.cancel_scope.cancel()


def test_barriers_of_a_group_go_side_by_side_after_everything_before(tmp_path: Path) -> None:
    async def main() -> None:
        remote = _Recording(delay=0.05)
        s = StagingStore(remote, tmp_path, is_barrier=_barrier, concurrency=8)
        chunks = [f"c/{i}" for i in range(4)]
        for key in chunks:
            await s.put(key, b"chunk")
        group = ["d/a", "d/b", "d/c"]
        with s.group():
            async with trio.open_nursery() as n:  # (tasks started inside inherit it)
                for key in group:
                    n.start_soon(s.put, key, b"meta")
        await s.put("d/after", b"meta")
        await s.put("c/late", b"chunk")
        await _upload_all(s)

        for key in group:
            done = remote.at_start[key][1]
            assert set(chunks) <= done  # everything staged before the group is there
        assert any(remote.at_start[k][0] & set(group) for k in group)  # side by side
        assert set(group) <= remote.at_start["d/after"][1]  # a barrier outside waits
        # A chunk staged after barriers that wait does not wait for them.
        assert not set(group) <= remote.at_start["c/late"][1]
        assert "c/late" in remote.finished

    trio.run(main)


def test_a_key_twice_in_one_group_is_put_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        remote = _Recording(delay=0.05)
        s = StagingStore(remote, tmp_path, is_barrier=_barrier)
        with s.group():
            await s.put("d/x", b"v1")
            await s.put("d/y", b"y")
            await s.put("d/x", b"v2")
        await _upload_all(s)
        assert [k for k in remote.finished if k == "d/x"] == ["d/x", "d/x"]
        assert await remote.inner.get("d/x") == b"v2"

    trio.run(main)


def test_a_barrier_that_names_its_chunks_waits_only_for_those(tmp_path: Path) -> None:
    """needing(): a barrier waits for the chunks it uses and for the barriers of
    earlier groups, not for an unrelated chunk staged before it."""

    async def main() -> None:
        remote = _Recording(delay=0.01, slow={"c/big": 1.0, "d/early": 0.3})
        s = StagingStore(remote, tmp_path, is_barrier=_barrier, concurrency=8)
        with s.group():
            await s.put("d/early", b"an earlier commit's directory")
        await s.put("c/big", b"unrelated, slow")
        await s.put("c/mine", b"chunk")
        with s.group():
            with s.needing(["c/mine", "c/gone-already"]):
                await s.put("d/mine", b"meta")
            with s.needing(["c/big"]):
                await s.put("d/uses-big", b"meta")
            await s.put("d/unknown", b"meta")  # (no needing(): waits for all before)
        await _upload_all(s)

        flying, done = remote.at_start["d/mine"]
        assert {"c/mine", "d/early"} <= done  # its chunk, and the earlier group
        assert "c/big" in flying  # not the unrelated chunk
        for key in ("d/uses-big", "d/unknown"):
            assert {"c/big", "c/mine", "d/early"} <= remote.at_start[key][1]

    trio.run(main)


def test_a_barrier_whose_chunks_are_up_goes_ahead_of_the_queued_chunks(
    tmp_path: Path,
) -> None:
    """A directory object whose needs are met starts at the next free upload slot,
    not when the walk of the queue reaches it behind every chunk staged before it."""

    async def main() -> None:
        others = [f"c/other{i}" for i in range(12)]
        remote = _Recording(delay=0.0, slow=dict.fromkeys(others, 0.05))
        s = StagingStore(remote, tmp_path, is_barrier=_barrier, concurrency=2)
        await s.put("c/mine", b"chunk")
        for key in others:
            await s.put(key, b"unrelated chunk")
        with s.group():
            with s.needing(["c/mine"]):
                await s.put("d/mine", b"meta")
        await _upload_all(s)

        flying, done = remote.at_start["d/mine"]
        assert "c/mine" in done
        assert len((flying | done) & set(others)) <= 3  # (was: all 12 started first)

    trio.run(main)


async def _commit_put(s: StagingStore, key: str, data: bytes, needs: list[str]) -> None:
    """Stage ``key`` as a commit does: a group of its own, naming what it needs."""
    with s.group(), s.needing(needs):
        await s.put(key, data)


@pytest.mark.parametrize(
    "case", ["superseded", "new", "needed", "unsynced", "strict", "unremovable"]
)
def test_a_directory_that_a_later_commit_rewrote_is_uploaded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A commit's directory object that a newer commit's put replaces before the
    uploader gets to it is not uploaded (the store goes straight to the newer
    version), unless that could leave the store pointing at something it lacks: a
    key not on the store yet, an object that a pending one needs, a newer version
    not yet durable, a barrier between them that waits for everything before it;
    or its staged file cannot be removed (a crash would replay it later)."""

    async def main() -> None:
        remote = _Recording(delay=0.0)
        s = StagingStore(remote, tmp_path, is_barrier=_barrier)
        if case != "new":
            await _commit_put(s, "d/k", b"v0", [])
            await _upload_all(s)
        await _commit_put(s, "d/k", b"v1", [])
        if case == "unremovable":
            v1 = s._entries["d/k"].path
            unlink = Path.unlink
            failed: list[Path] = []

            def refuse_once(path: Path, missing_ok: bool = False) -> None:
                if path == v1 and not failed:
                    failed.append(path)
                    raise OSError(5, "Input/output error")
                unlink(path, missing_ok=missing_ok)

            monkeypatch.setattr(Path, "unlink", refuse_once)
        if case == "needed":
            await _commit_put(s, "d/parent", b"links k", ["d/k"])
        if case == "strict":
            await s.put("d/other", b"waits for all before it")
        if case != "unsynced":
            await s.sync()
        await _commit_put(s, "d/k", b"v2", [])
        if case != "unsynced":
            await s.sync()
        await _upload_all(s)

        assert await remote.inner.get("d/k") == b"v2"
        uploads = remote.finished.count("d/k") - (case != "new")
        assert uploads == (1 if case == "superseded" else 2)
        assert s.superseded == (case == "superseded")
        if case == "unremovable":
            assert failed  # (it was superseded, and kept)
        assert s.pending_count == 0 and s.pending_bytes == 0
        assert [p.name for p in tmp_path.iterdir() if p.suffix == ".op"] == []

    trio.run(main)


def test_a_directory_rewritten_before_upload_goes_up_once_and_the_volume_checks(
    tmp_path: Path,
) -> None:
    """Through the filesystem: a directory on the store, changed by two commits
    before the uploader runs, is uploaded once; the volume checks clean."""
    ctx = Ctx(0, 0)

    async def main() -> None:
        store = _Recording(delay=0.0)
        vfs, staging = await _vfs_over_staging(store, tmp_path)
        top = (await vfs.mkdir(ROOT_INO, b"top", 0o755, ctx)).ino
        await vfs.commit()
        await _upload_all(staging)
        subs = []
        for n in range(2):
            subs.append((await vfs.mkdir(top, b"sub%d" % n, 0o755, ctx)).ino)
            fh, _ = await vfs.create(subs[-1], b"f", 0o644, os.O_WRONLY, ctx)
            await vfs.write(fh, 0, b"data %d" % n)
            await vfs.release(fh)
            await vfs.commit()
        report = await _closed_and_checked(vfs, staging, store)
        volume = vfs.volume
        # The first rewrites of top and of the root (top's link count changed) were
        # replaced; the new directories, which they link, were not.
        assert staging.superseded == 2
        assert store.finished.count(volume.dir_key(top)) == 2  # made, then once more
        assert store.finished.count(volume.dir_key(ROOT_INO)) == 3  # (and by create)
        assert all(store.finished.count(volume.dir_key(i)) == 1 for i in subs)
        assert report.directories == 4

    trio.run(main)


def test_after_steps_share_worker_threads_and_all_run() -> None:
    """run_after: puts that end together run their steps in one thread hop; each
    caller returns once its own step has run."""

    async def main() -> None:
        ran: list[int] = []
        threads: set[int] = set()

        def step(i: int) -> None:
            threads.add(threading.get_ident())
            ran.append(i)

        async def one(i: int) -> None:
            await run_after(lambda: step(i))
            assert i in ran

        hops = 0
        real = trio.to_thread.run_sync

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal hops
            hops += 1
            return await real(*args, **kwargs)

        trio.to_thread.run_sync = counted  # type: ignore[assignment]
        try:
            async with trio.open_nursery() as n:
                for i in range(50):
                    n.start_soon(one, i)
        finally:
            trio.to_thread.run_sync = real
        assert sorted(ran) == list(range(50))
        assert threading.get_ident() not in threads
        assert hops < 10

    trio.run(main)


def test_an_after_step_whose_runner_is_cancelled_runs_with_the_next() -> None:
    async def main() -> None:
        ran: list[str] = []
        with trio.CancelScope() as scope:
            scope.cancel()  # (the thread hop is refused: nothing runs)
            await run_after(lambda: ran.append("first"))
        assert ran == []
        await run_after(lambda: ran.append("second"))
        assert ran == ["first", "second"]

    trio.run(main)


def test_operations_found_at_mount_go_one_barrier_at_a_time(tmp_path: Path) -> None:
    """Groups are not on disk: after a restart, every barrier waits for all before it."""

    async def main() -> None:
        s = StagingStore(MemoryStore(), tmp_path, is_barrier=_barrier)
        with s.group():
            for key in ("d/a", "d/b"):
                await s.put(key, b"meta")
        await s.sync()
        remote = _Recording(delay=0.02)
        again = StagingStore(remote, tmp_path, is_barrier=_barrier)
        await _upload_all(again)
        assert remote.at_start["d/b"][1] == {"d/a"} or remote.at_start["d/a"][1] == {"d/b"}

    trio.run(main)


def test_uploads_wait_while_the_filesystem_is_busy(tmp_path: Path) -> None:
    """busy() (a change the filesystem stages at its next commit) restarts the quiet
    period like a staged operation does."""

    async def main() -> None:
        remote = FaultyStore(MemoryStore())
        s = StagingStore(remote, tmp_path, is_barrier=_barrier, upload_quiet=0.5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run_uploader)
            await s.put("c/0", b"x")
            for _ in range(4):
                await trio.sleep(0.3)
                s.busy()
            assert remote.puts == []
            with trio.fail_after(5):
                while s.pending_count:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert remote.puts == ["c/0"]

    trio.run(main)


def test_the_wait_request_is_answered_when_the_queue_is_empty_or_after_a_while(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        remote = FaultyStore(MemoryStore())
        remote.delay = 0.1
        s = StagingStore(remote, tmp_path, is_barrier=_barrier, upload_quiet=60.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run_uploader)
            await s.put("c/0", b"x")
            start = trio.current_time()
            await _upload_now(s)  # uploads start at once (no quiet period)
            assert s.pending_count == 0
            assert trio.current_time() - start < WAIT_ANSWER_MAX

            remote.delay = 30.0  # a stalled store: answered anyway, with the backlog
            await s.put("c/1", b"y")
            start = trio.current_time()
            await _upload_now(s)
            assert s.pending_count == 1
            assert trio.current_time() - start >= WAIT_ANSWER_MAX
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.parametrize("deferred", [False, True])
def test_put_computed_through_the_store_wrappers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deferred: bool
) -> None:
    """The computation runs in a worker thread and its result (bytes, or a Deferred
    filled where the store wants it) is put, by every store and wrapper; then
    ``after`` runs, once the store holds the object, in the same worker thread call
    where the store can (one hop); None puts nothing and runs nothing after."""
    threads: list[int] = []
    afters: list[tuple[int, bool]] = []
    hops = count_thread_hops(monkeypatch)

    def compute(key: str) -> Computed:
        threads.append(threading.get_ident())
        data = key.encode() * 3
        if not deferred:
            return key, data

        def fill(dst: memoryview) -> None:
            threads.append(threading.get_ident())
            dst[:] = data

        return key, Deferred(len(data), fill)

    def nothing() -> None:
        threads.append(threading.get_ident())

    async def main() -> None:
        local = LocalStore(tmp_path)
        memory = MemoryStore()
        stores: list[tuple[ObjectStore, ObjectStore, bool]] = [
            (local, local, True),
            (TrackedStore(local), local, True),
            (SlowStore(local, latency=0.01, bandwidth=1e6), local, False),  # (like a remote)
            (TrackedStore(SlowStore(memory, latency=0.01)), memory, False),
        ]
        for n, (store, inner, one_thread) in enumerate(stores):
            key = f"c/k{n}"
            held = (tmp_path / "c" / f"k{n}").exists if inner is local else lambda: True

            def after(held: Callable[[], bool] = held) -> None:
                afters.append((threading.get_ident(), held()))

            hops.clear()
            etag = await put_computed(store, lambda k=key: compute(k), after)  # type: ignore[misc]
            assert len(hops) == (1 if one_thread else 2), hops
            assert etag is not None
            assert await inner.get(key) == key.encode() * 3
            assert (await inner.head(key)).etag == etag
            assert afters[-1][1]  # the object was stored when it ran
            assert afters[-1][0] != threading.main_thread().ident
            assert await put_computed(store, nothing, after) is None
            assert len(afters) == n + 1
        assert threading.main_thread().ident not in threads
        assert len(await local.list("c/")) == 3

    trio.run(main)


async def _vfs_over_staging(
    store: ObjectStore, tmp_path: Path, commit_interval: float = 1.0
) -> tuple[Vfs, StagingStore]:
    """A new volume on ``store``, opened with a staging area (no uploader running)."""
    await Volume.create(store, PASSPHRASE.encode(), kdf_params=TEST_KDF)
    volume = await Volume.open(store, PASSPHRASE.encode(), state_root=tmp_path)
    staging = StagingStore(store, tmp_path / "staging", is_barrier=_barrier)
    volume.store = staging
    vfs = Vfs(volume, writeback=staging, commit_interval=commit_interval)
    await vfs.start()
    return vfs, staging


async def _closed_and_checked(vfs: Vfs, staging: StagingStore, store: ObjectStore) -> Report:
    """Upload everything, close ``vfs``, and check the volume on ``store`` (clean)."""
    await _upload_all(staging)
    await vfs.close()
    report = await check_volume(await Volume.open(store, PASSPHRASE.encode()), deep=True)
    assert report.ok, report.problems
    return report


def test_a_commit_stages_its_directories_in_groups(tmp_path: Path) -> None:
    """A commit's directories form one group, each staged after the new directories
    it links and waiting for them; deletions are a group of their own, after;
    uploaded, the volume checks clean."""
    ctx = Ctx(0, 0)

    async def main() -> None:
        store = MemoryStore()
        vfs, staging = await _vfs_over_staging(store, tmp_path)
        volume = vfs.volume
        a = (await vfs.mkdir(ROOT_INO, b"a", 0o755, ctx)).ino
        b = (await vfs.mkdir(a, b"b", 0o755, ctx)).ino
        c = (await vfs.mkdir(ROOT_INO, b"c", 0o755, ctx)).ino
        await vfs.commit()
        entry = {e.key: e for e in staging._order.values()}
        root_entry, ea, eb, ec = (entry[volume.dir_key(i)] for i in (ROOT_INO, a, b, c))
        assert len(entry) == 4 and len({e.group for e in entry.values()}) == 1 and ea.group
        assert eb.needs == [] and ec.needs == []
        assert ea.needs == [eb.seq] and sorted(root_entry.needs or ()) == sorted([ea.seq, ec.seq])

        await vfs.rmdir(ROOT_INO, b"c")
        await vfs.mkdir(ROOT_INO, b"d", 0o755, ctx)
        await vfs.commit()
        later = [e for e in staging._order.values() if e.seq > root_entry.seq]
        (gone,) = [e for e in later if e.delete]
        assert gone.group and gone.seq == max(e.seq for e in later)
        assert all(e.group not in (0, gone.group) for e in later if not e.delete)

        report = await _closed_and_checked(vfs, staging, store)
        assert report.directories == 4  # the root, a, a/b, d

    trio.run(main)


def test_a_directory_waits_for_the_inode_object_of_a_new_hard_link(tmp_path: Path) -> None:
    ctx = Ctx(0, 0)

    async def main() -> None:
        store = MemoryStore()
        vfs, staging = await _vfs_over_staging(store, tmp_path)
        volume = vfs.volume
        d = (await vfs.mkdir(ROOT_INO, b"d", 0o755, ctx)).ino
        await vfs.commit()
        await _upload_all(staging)
        fh, attr = await vfs.create(d, b"f", 0o644, os.O_WRONLY, ctx)
        await vfs.release(fh)
        await vfs.link(attr.ino, ROOT_INO, b"g")
        await vfs.commit()
        entry = {e.key: e for e in staging._order.values()}
        inode = entry[volume.inode_key(attr.ino)]
        for ino in (ROOT_INO, d):
            assert entry[volume.dir_key(ino)].needs == [inode.seq]
        await _closed_and_checked(vfs, staging, store)

    trio.run(main)


def test_a_directory_object_goes_up_once_its_own_files_chunks_are_there(
    tmp_path: Path,
) -> None:
    """A commit's directory object waits for the chunks of its own files, not for a
    slow chunk of another directory's file; uploaded, the volume checks clean."""
    ctx = Ctx(0, 0)

    async def main() -> None:
        remote = _Recording(delay=0.0, slow={})
        vfs, staging = await _vfs_over_staging(remote, tmp_path)
        volume = vfs.volume
        files = {}
        for name in (b"fast", b"slow"):
            d = (await vfs.mkdir(ROOT_INO, name, 0o755, ctx)).ino
            fh, attr = await vfs.create(d, b"f", 0o644, os.O_WRONLY, ctx)
            await vfs.write(fh, 0, os.urandom(64 << 10))  # (a chunk, not inline)
            await vfs.release(fh)
            files[name] = (volume.dir_key(d), attr.ino)
        await vfs.sync()
        chunk = {
            name: chunk_key(ref.cid)
            for name, (_, ino) in files.items()
            for ref in vfs.nodes[ino].record.chunks.values()
        }
        remote.slow[chunk[b"slow"]] = 1.0
        await _upload_all(staging)

        fast_dir, slow_dir = files[b"fast"][0], files[b"slow"][0]
        flying, done = remote.at_start[fast_dir]
        assert chunk[b"fast"] in done and chunk[b"slow"] in flying
        assert chunk[b"slow"] in remote.at_start[slow_dir][1]
        # The root links both: it waits for both directory objects.
        assert {fast_dir, slow_dir} <= remote.at_start[volume.dir_key(ROOT_INO)][1]
        await _closed_and_checked(vfs, staging, remote.inner)

    trio.run(main)


def test_a_waiting_status_request_has_the_committer_commit_at_once(tmp_path: Path) -> None:
    """What the vfs holds in memory is staged when someone waits for the store, not
    a commit interval later."""
    ctx = Ctx(0, 0)

    async def main() -> None:
        vfs, staging = await _vfs_over_staging(MemoryStore(), tmp_path, commit_interval=3600.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(vfs.run_committer)
            nursery.start_soon(staging.run_uploader)
            fh, _ = await vfs.create(ROOT_INO, b"f", 0o644, os.O_WRONLY, ctx)
            await vfs.write(fh, 0, b"x" * 10_000)
            await vfs.release(fh)
            await trio.sleep(0.2)
            assert vfs.dirty_file_count() == 1
            with trio.fail_after(10):
                while vfs.dirty_file_count() or staging.pending_count:
                    await _upload_now(staging, vfs)
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        await vfs.close()

    trio.run(main)


class _Narrow(LocalStore):
    """A store that takes only a few uploads at once."""

    max_uploads = 3


def test_uploads_in_flight_follow_what_the_store_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert upload_concurrency(MemoryStore()) == UPLOAD_CONCURRENCY
    assert upload_concurrency(_Narrow(tmp_path / "n")) == 3
    # A WebDAV store keeps connections free for reads while a backlog uploads.
    assert WebDavStore.max_uploads < webdav.CONNECTIONS

    # The mount's stack asks the store it opens, not the wrappers around it.
    store_dir = make_volume(tmp_path / "store")
    monkeypatch.setattr(stack, "open_store", lambda url: _Narrow(store_dir))
    opts = parse_options([f"cache_dir={tmp_path / 'cache'},store_latency=0.01"])

    async def main() -> None:
        opened = await stack.open_stack(str(store_dir), PASSPHRASE.encode(), opts)
        try:
            assert opened.staging is not None and opened.staging.concurrency == 3
            # ... and the staging area holds to it.
            remote = _Recording(delay=0.02)
            most = 0

            async def put(key: str, data: bytes | bytearray, **kw: object) -> str:
                nonlocal most
                most = max(most, len(remote.flying) + 1)
                return await _Recording.put(remote, key, data)

            remote.put = put  # type: ignore[method-assign]
            s = StagingStore(remote, tmp_path / "staging", is_barrier=_barrier, concurrency=3)
            for i in range(12):
                await s.put(f"c/{i}", b"chunk")
            await _upload_all(s)
            assert most == 3 and len(remote.finished) == 12
        finally:
            if opened.lease is not None:
                await opened.lease.release()
            if opened.lock is not None:
                os.close(opened.lock)
            await opened.store.aclose()

    trio.run(main)
