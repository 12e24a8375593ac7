"""The write-back staging store: contract, order, recovery, back-pressure."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from megafs.errors import ObjectNotFound, StoreUnavailable
from megafs.stores import MemoryStore
from megafs.stores.retry import RetryPolicy
from megafs.stores.s3 import S3Store
from megafs.stores.sigv4 import Credentials
from megafs.stores.staging import DEDUP_CHECK_MIN, StagingStore
from megafs.testing import FaultyStore, check_store


def _barrier(key: str) -> bool:
    return not key.startswith("c/")


def test_contract_with_uploader_running(tmp_path: Path) -> None:
    counter = iter(range(10_000))

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def make() -> StagingStore:
                s = StagingStore(MemoryStore(), tmp_path / str(next(counter)), is_barrier=_barrier)
                nursery.start_soon(s.run_uploader)
                return s

            await check_store(make)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_contract_while_uploads_lag(tmp_path: Path) -> None:
    """Read-your-writes holds while the remote store is slow to receive uploads."""
    counter = iter(range(10_000))

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def make() -> StagingStore:
                remote = FaultyStore(MemoryStore())
                remote.delay = 0.01
                s = StagingStore(remote, tmp_path / str(next(counter)), is_barrier=_barrier)
                nursery.start_soon(s.run_uploader)
                return s

            await check_store(make)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_barrier_waits_for_earlier_chunks(tmp_path: Path) -> None:
    async def main() -> None:
        remote = FaultyStore(MemoryStore())
        remote.delay = 0.05
        s = StagingStore(remote, tmp_path, is_barrier=_barrier, concurrency=4)
        for i in range(6):
            await s.put(f"c/{i:02d}", b"chunk %d" % i)
        await s.put("d/dir", b"meta v1")
        await s.put("c/99", b"late chunk")
        await s.put("d/dir", b"meta v2")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run_uploader)
            await s.wait_idle()
            nursery.cancel_scope.cancel()
        order = remote.puts
        assert order.index("d/dir") > max(order.index(f"c/{i:02d}") for i in range(6))
        assert len([k for k in order if k == "d/dir"]) == 2
        assert order.index("c/99") < len(order) - 1  # before the second barrier
        assert await remote.inner.get("d/dir") == b"meta v2"
        assert not list(tmp_path.glob("*.op"))

    trio.run(main)


def test_only_large_chunks_are_looked_up_before_upload(tmp_path: Path) -> None:
    """A chunk the remote store has is not sent again if it is large; a small one is
    sent without a HEAD first (asking would cost as much as sending)."""
    big = b"b" * DEDUP_CHECK_MIN

    async def main() -> None:
        remote = FaultyStore(MemoryStore())
        await remote.inner.put("c/big", big)
        await remote.inner.put("c/small", b"small")
        s = StagingStore(remote, tmp_path, is_barrier=_barrier)
        await s.put("c/big", big)
        await s.put("c/small", b"small")
        await s.put("c/new-big", big + b"!")
        await s.put("d/dir", b"meta")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run_uploader)
            await s.wait_idle()
            nursery.cancel_scope.cancel()
        assert sorted(remote.puts) == ["c/new-big", "c/small", "d/dir"]
        assert remote.calls["head"] == 2  # c/big, c/new-big
        assert await remote.inner.get("c/new-big") == big + b"!"

    trio.run(main)


@pytest.mark.parametrize("damage", ["truncated", "a bit flipped"])
def test_recovery_resumes_and_drops_damaged_tail(tmp_path: Path, damage: str) -> None:
    async def main() -> None:
        remote = MemoryStore()
        s = StagingStore(remote, tmp_path, is_barrier=_barrier)
        await s.put("c/a", b"A")
        await s.put("d/x", b"X1")
        await s.sync()
        await s.put("c/b", b"B")
        await s.put("d/x", b"X2")
        await s.delete("c/zzz")
        files = sorted(tmp_path.glob("*.op"))
        assert len(files) == 5
        # "Power loss": the unsynced entry c/b is damaged; it and all later go.
        blob = bytearray(files[2].read_bytes())
        if damage == "truncated":
            del blob[-3:]
        else:  # same length: only the checksum tells
            blob[len(blob) // 2] ^= 0x10
        files[2].write_bytes(blob)
        s2 = StagingStore(remote, tmp_path, is_barrier=_barrier)
        assert s2.pending_count == 2
        assert await s2.get("d/x") == b"X1"
        with pytest.raises(ObjectNotFound):
            await s2.get("c/b")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s2.run_uploader)
            await s2.wait_idle()
            nursery.cancel_scope.cancel()
        assert await remote.get("c/a") == b"A" and await remote.get("d/x") == b"X1"

    trio.run(main)


def test_failed_uploads_are_retried_and_nothing_lost(tmp_path: Path) -> None:
    async def main() -> None:
        remote = FaultyStore(MemoryStore())
        remote.fail_next("put", StoreUnavailable("503 slow down"), count=3)
        s = StagingStore(remote, tmp_path, is_barrier=_barrier)
        await s.put("c/a", b"A")
        await s.put("d/x", b"X")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run_uploader)
            with trio.fail_after(20):
                await s.wait_idle()
            nursery.cancel_scope.cancel()
        assert await remote.inner.get("d/x") == b"X"
        assert s.last_error is not None and "503" in s.last_error

    trio.run(main)


def test_error_shows_while_the_store_still_retries(tmp_path: Path) -> None:
    """An unreachable store: ``last_error`` says so at once, not when the store's own
    retries give up (minutes later), and the upload keeps waiting for the store."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connections are refused
    remote = S3Store(
        "bucket",
        credentials=Credentials("key", "secret"),
        endpoint=f"http://127.0.0.1:{port}",
        policy=RetryPolicy(initial=0.05, max_delay=0.1, max_total=600),
    )

    async def main() -> None:
        s = StagingStore(remote, tmp_path, is_barrier=_barrier)
        await s.put("d/x", b"X")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run_uploader)
            with trio.fail_after(10):
                while s.last_error is None:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert "ConnectError" in s.last_error and "gave up" not in s.last_error
        assert s.pending_count == 1
        await remote.aclose()

    trio.run(main)


def test_back_pressure(tmp_path: Path) -> None:
    async def main() -> None:
        remote = FaultyStore(MemoryStore())
        remote.delay = 0.05
        s = StagingStore(remote, tmp_path, is_barrier=_barrier, max_pending_bytes=100_000)
        peak = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run_uploader)
            for i in range(40):
                await s.put(f"c/{i:03d}", b"x" * 20_000)
                peak = max(peak, s.pending_bytes)
            await s.wait_idle()
            nursery.cancel_scope.cancel()
        assert peak <= 100_000 + 20_000
        assert remote.calls["put"] == 40

    trio.run(main)


class _CountingStore(FaultyStore):
    """Counts the bytes of the puts in progress at once (each holds its data)."""

    def __init__(self) -> None:
        super().__init__(MemoryStore())
        self.sending = self.peak = 0
        self.alongside: dict[str, int] = {}  # key -> bytes in flight when its put began

    async def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        self.sending += len(data)
        self.peak = max(self.peak, self.sending)
        self.alongside[key] = self.sending - len(data)
        try:
            await trio.sleep(0.01)
            return await super().put(key, data, if_none_match=if_none_match, if_match=if_match)
        finally:
            self.sending -= len(data)


def test_uploads_in_flight_hold_a_bounded_number_of_bytes(tmp_path: Path) -> None:
    """Many large staged objects are uploaded a budget of bytes at a time, not
    ``concurrency`` at once (each upload holds its object in memory); one object
    larger than the budget still goes."""

    async def main() -> None:
        remote = _CountingStore()
        s = StagingStore(
            remote, tmp_path, is_barrier=_barrier, concurrency=32, bytes_in_flight=250_000
        )
        for i in range(30):
            await s.put(f"c/{i:03d}", bytes([i]) * 100_000)
        await s.put("c/huge", b"h" * 400_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run_uploader)
            await s.wait_idle()
            nursery.cancel_scope.cancel()
        assert remote.calls["put"] == 31
        small = max(v + 100_000 for k, v in remote.alongside.items() if k != "c/huge")
        assert 200_000 <= small <= 250_000  # two at a time: within the budget, and in parallel
        assert remote.peak == 400_000 and remote.alongside["c/huge"] == 0  # alone
        assert await remote.inner.get("c/029") == bytes([29]) * 100_000
        assert await remote.inner.get("c/huge") == b"h" * 400_000

    trio.run(main)


def test_a_sync_returns_once_everything_staged_before_it_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each sync fsyncs only what was staged since the last one took its list; a
    sync that starts while another is still fsyncing waits for it, and a failed one
    leaves its entries to the next."""
    real_fsync = os.fsync
    calls: list[int] = []
    fail = [False]

    def slow_fsync(fd: int) -> None:
        calls.append(fd)
        if os.readlink(f"/proc/self/fd/{fd}").endswith("0000000000000001.op"):
            time.sleep(0.5)  # the first sync's file (in its worker thread)
        if fail[0]:
            fail[0] = False
            raise OSError(errno.EIO, "injected")
        real_fsync(fd)

    async def main() -> None:
        s = StagingStore(MemoryStore(), tmp_path, is_barrier=_barrier)
        monkeypatch.setattr("megafs.stores.staging.os.fsync", slow_fsync)
        await s.put("c/1", b"one")
        second_done: list[bool] = []

        async def second() -> None:
            await s.put("c/2", b"two")
            await s.sync()
            second_done.append(all(e.synced for e in s._order.values()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.sync)
            await trio.testing.wait_all_tasks_blocked()  # the first sync is fsyncing
            nursery.start_soon(second)
        assert second_done == [True]
        assert not s._unsynced
        # A failed sync: its entries are fsynced by the next one.
        await s.put("c/3", b"three")
        fail[0] = True
        with pytest.raises(OSError):
            await s.sync()
        assert [e.key for e in s._order.values() if not e.synced] == ["c/3"]
        n = len(calls)
        await s.sync()
        assert len(calls) > n and all(e.synced for e in s._order.values())
        await s.sync()  # nothing new: no fsync at all
        assert len(calls) == n + 2  # (c/3 and the directory)

    trio.run(main)


def test_staged_ranges_and_files_of_the_previous_formats(tmp_path: Path) -> None:
    """A range of a pending object is read without reading the rest; a staging area
    written by earlier versions (``MFS1``: SHA-256 checksums, ``MFS2``: BLAKE3) is
    resumed, and a damaged one of its files is still noticed."""
    import hashlib
    import struct

    import blake3

    def old_file(op: bytes, key: str, data: bytes, v2: bool) -> bytes:
        k = key.encode()
        magic = b"MFS2" if v2 else b"MFS1"
        body = magic + op + struct.pack(">H", len(k)) + k + struct.pack(">Q", len(data)) + data
        return body + (blake3.blake3(body) if v2 else hashlib.sha256(body)).digest()

    big = bytes(range(256)) * 4096  # 1 MiB: read in a worker thread

    async def main() -> None:
        remote = MemoryStore()
        s = StagingStore(remote, tmp_path / "new", is_barrier=_barrier)
        await s.put("c/big", big)
        await s.put("c/small", b"0123456789")
        assert await s.get("c/big", 1000, 1000 + 300_000) == big[1000:301_000]
        assert await s.get("c/big", 5) == big[5:]
        assert await s.get("c/small", 2, 5) == b"234"
        assert await s.get("c/small", 8, 100) == b"89"
        assert await s.get("c/small", 20, 30) == b""

        old = tmp_path / "old"
        old.mkdir()
        (old / f"{1:016x}.op").write_bytes(old_file(b"P", "c/a", b"A" * 100, False))
        (old / f"{2:016x}.op").write_bytes(old_file(b"P", "d/x", b"X", False))
        (old / f"{3:016x}.op").write_bytes(old_file(b"P", "c/b", b"B" * 100, True))
        (old / f"{4:016x}.op").write_bytes(old_file(b"P", "d/z", b"Z", True))
        damaged = bytearray(old_file(b"P", "d/y", b"Y" * 50, True))
        damaged[40] ^= 1
        (old / f"{5:016x}.op").write_bytes(damaged)
        s2 = StagingStore(remote, old, is_barrier=_barrier)
        assert s2.pending_count == 4
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s2.run_uploader)
            await s2.wait_idle()
            nursery.cancel_scope.cancel()
        assert await remote.get("c/a") == b"A" * 100 and await remote.get("d/x") == b"X"
        assert await remote.get("c/b") == b"B" * 100 and await remote.get("d/z") == b"Z"
        with pytest.raises(ObjectNotFound):
            await remote.get("d/y")

    trio.run(main)


def test_uploads_wait_for_writes_to_pause(tmp_path: Path) -> None:
    """A round of uploads starts once nothing has been staged for ``upload_quiet``
    seconds, and runs until the queue is empty; at once when asked (upload_now), when
    someone waits (wait_idle), or when half the cap is waiting."""

    async def main() -> None:
        remote = FaultyStore(MemoryStore())
        s = StagingStore(remote, tmp_path / "a", is_barrier=_barrier, upload_quiet=0.5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run_uploader)
            for i in range(4):  # a burst: each put restarts the quiet period
                await s.put(f"c/{i}", b"x")
                await trio.sleep(0.3)
            assert remote.puts == []
            await trio.sleep(0.4)  # quiet for 0.7 s by now
            assert sorted(remote.puts) == [f"c/{i}" for i in range(4)]

            # Asked to: at once (megafs status --wait-idle, megafs umount).
            s.upload_quiet = 60.0
            await s.put("c/now", b"y")
            await trio.sleep(0.2)
            assert "c/now" not in remote.puts
            s.upload_now()
            with trio.fail_after(5):
                while s.pending_count:
                    await trio.sleep(0.01)
            # Someone waits for the queue (unmount, fsync=remote, conditional writes).
            await s.put("d/dir", b"meta")
            with trio.fail_after(5):
                await s.wait_idle()
            assert remote.puts[-1] == "d/dir"
            nursery.cancel_scope.cancel()

        # Half the cap waiting: no waiting for a pause (a large copy uploads as it runs).
        remote = FaultyStore(MemoryStore())
        s = StagingStore(
            remote, tmp_path / "b", is_barrier=_barrier, upload_quiet=60.0, max_pending_bytes=1000
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run_uploader)
            await s.put("c/small", b"z" * 100)
            await trio.sleep(0.2)
            assert remote.puts == []
            await s.put("c/big", b"z" * 500)
            with trio.fail_after(5):
                while s.pending_count:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_put_computed_stages_in_the_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What put_computed's function returns is staged from the same worker thread
    (durable, readable, uploaded like a put); None stages nothing; a full disk falls
    back to the ordinary path, which tries again and makes room if it must."""
    trio_thread = threading.get_ident()

    async def main() -> None:
        remote = MemoryStore()
        freed: list[bool] = []

        def make_room() -> bool:
            freed.append(True)
            return True

        s = StagingStore(remote, tmp_path, is_barrier=_barrier, on_full=make_room)
        threads: list[int] = []

        def compute(key: str, data: bytes) -> tuple[str, bytes]:
            threads.append(threading.get_ident())
            return key, data

        assert await s.put_computed(lambda: compute("c/one", b"first")) is not None
        assert threads[-1] != trio_thread
        assert await s.put_computed(lambda: None) is None
        assert s.pending_count == 1 and len(list(tmp_path.glob("*.op"))) == 1

        real = StagingStore._write_file
        calls = 0

        def full_twice(self: StagingStore, seq: int, op: bytes, key: str, data: bytes) -> None:
            nonlocal calls
            calls += 1
            if calls <= 2:  # put_computed's write and the ordinary path's first
                raise OSError(errno.ENOSPC, "No space left on device")
            real(self, seq, op, key, data)

        monkeypatch.setattr(StagingStore, "_write_file", full_twice)
        await s.put_computed(lambda: compute("c/two", b"second"))
        monkeypatch.setattr(StagingStore, "_write_file", real)
        assert freed == [True] and calls == 3
        assert await s.get("c/one") == b"first" and await s.get("c/two") == b"second"
        await s.sync()

        again = StagingStore(remote, tmp_path, is_barrier=_barrier)  # (recovery)
        assert again.pending_count == 2
        async with trio.open_nursery() as nursery:
            nursery.start_soon(again.run_uploader)
            await again.wait_idle()
            nursery.cancel_scope.cancel()
        assert await remote.get("c/one") == b"first" and await remote.get("c/two") == b"second"
        assert not list(tmp_path.glob("*.op"))

    trio.run(main)


def test_a_sync_waits_for_the_files_of_earlier_numbers(tmp_path: Path) -> None:
    """An operation numbered before a staged one but still being written (a chunk
    sealed in a worker thread) is made durable by a sync that starts meanwhile: what a
    sync returns for is a prefix of the sequence, which recovery always keeps."""
    release = threading.Event()

    async def main() -> None:
        s = StagingStore(MemoryStore(), tmp_path, is_barrier=_barrier)

        def slow_chunk() -> tuple[str, bytes]:
            release.wait(10)
            return "c/slow", b"sealed chunk"

        synced = trio.Event()

        async def sync_after_metadata() -> None:
            await s.put("d/meta", b"metadata staged after the chunk's number")
            await s.sync()
            synced.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.put_computed, slow_chunk)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(sync_after_metadata)
            with trio.move_on_after(0.3):
                await synced.wait()
            assert not synced.is_set()  # the chunk's file is not written yet
            release.set()
            await synced.wait()
        # Both are synced, and numbered in the order they were asked for.
        entries = sorted(s._order.values(), key=lambda e: e.seq)
        assert [e.key for e in entries] == ["c/slow", "d/meta"]
        assert all(e.synced for e in entries)

    trio.run(main)
