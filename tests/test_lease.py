"""The single-writer lease: one read-write mount per volume, read-only mounts always."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import trio
from conftest import MEGAFS, PASSPHRASE, Mount, needs_fuse, new_mount

from megafs.format.header import derive_keys
from megafs.stores import LocalStore, MemoryStore, ObjectInfo, ObjectStore
from megafs.volume.lease import LEASE_KEY, Lease, LeaseHeld


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_one_writer_expiry_takeover_and_release() -> None:
    async def main() -> None:
        store = MemoryStore()
        keys = derive_keys(b"k" * 32, b"v" * 16)
        clock = Clock()
        first = Lease(store, keys, ttl=60, clock=clock)
        await first.acquire()
        blob = await store.get(LEASE_KEY)
        assert socket.gethostname().encode() not in blob  # sealed: the store learns nothing
        second = Lease(store, keys, ttl=60, clock=clock)
        with pytest.raises(LeaseHeld) as exc:
            await second.acquire()
        assert socket.gethostname() in str(exc.value) and str(os.getpid()) in str(exc.value)
        # The holder stopped renewing: after its expiry the lease can be taken over...
        clock.now += 61
        await second.acquire()
        # ...and the old holder's next renewal finds out and stops writing.
        lost: list[bool] = []
        with trio.move_on_after(5):
            first.ttl = 0.04
            await first.run(lambda: lost.append(True))
        assert lost == [True] and first.lost
        await first.release()  # not ours any more: left alone
        assert await second.read() is not None
        await second.release()
        assert await second.read() is None

    trio.run(main)


def test_renewal_keeps_it_and_a_damaged_lease_is_replaced() -> None:
    async def main() -> None:
        store = MemoryStore()
        keys = derive_keys(b"k" * 32, b"v" * 16)
        lease = Lease(store, keys, ttl=0.2)
        await lease.acquire()
        with trio.move_on_after(0.5):
            await lease.run(lambda: pytest.fail("renewal lost"))
        current = await lease.read()
        assert current is not None and current[0].mount_id == lease.mount_id
        await store.put(LEASE_KEY, b"garbage that does not open")
        other = Lease(store, keys)
        await other.acquire()
        current = await other.read()
        assert current is not None and current[0].mount_id == other.mount_id

    trio.run(main)


class _Racy:
    """The lease as a store without atomic replace may show it: a conditional put lands
    but its answer is lost (the store's retry of the put then meets the ETag it made,
    412), or a get returns the lease half written (``half_reads`` times)."""

    def __init__(self, inner: ObjectStore, *, lose_answers: bool = False) -> None:
        self.inner = inner
        self.lose_answers = lose_answers
        self.lost_answers = 0
        self.half_reads = 0

    @property
    def url(self) -> str:
        return self.inner.url

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        data = await self.inner.get(key, start, end)
        if self.half_reads:
            self.half_reads -= 1
            return data[: len(data) // 2]
        return data

    async def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        etag = await self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)
        if if_match is None or not self.lose_answers:
            return etag
        self.lost_answers += 1
        return await self.inner.put(key, data, if_match=if_match)  # raises PreconditionFailed

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def head(self, key: str) -> ObjectInfo:
        return await self.inner.head(key)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        return await self.inner.list(prefix)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_renewal_whose_answer_was_lost_keeps_the_lease() -> None:
    async def main() -> None:
        store = _Racy(MemoryStore(), lose_answers=True)
        lease = Lease(store, derive_keys(b"k" * 32, b"v" * 16), ttl=0.2)
        await lease.acquire()
        with trio.move_on_after(0.5):
            await lease.run(lambda: pytest.fail("lease given up after a lost answer"))
        assert store.lost_answers >= 3 and not lease.lost
        current = await lease.read()
        assert current is not None and current[0].mount_id == lease.mount_id
        assert lease.etag == current[1]
        await lease.release()
        assert await lease.read() is None

    trio.run(main)


def test_lease_read_half_written_is_not_taken_over() -> None:
    async def main() -> None:
        store = _Racy(MemoryStore())
        keys = derive_keys(b"k" * 32, b"v" * 16)
        holder = Lease(store, keys)
        await holder.acquire()
        store.half_reads = 1  # the second mount reads it while the holder renews it
        with pytest.raises(LeaseHeld):
            await Lease(store, keys).acquire()
        current = await holder.read()
        assert current is not None and current[0].mount_id == holder.mount_id

    trio.run(main)


def _second(m: Mount, tmp_path: Path, name: str, options: list[str] | None = None) -> Mount:
    return Mount(
        m.store,
        tmp_path / f"{name}-mnt",
        tmp_path / f"{name}-cache",
        tmp_path / f"{name}.log",
        options or [],
    )


@needs_fuse
def test_second_writer_refused_readers_allowed(tmp_path: Path) -> None:
    m = new_mount(tmp_path)
    m.start()
    try:
        (m.path / "f").write_bytes(b"hello")
        os.sync()
        subprocess.run([*MEGAFS, "status", str(m.path), "--wait-idle"], check=True, timeout=60)
        other = _second(m, tmp_path, "other")
        other.path.mkdir()
        out = subprocess.run(
            [*MEGAFS, "mount", str(m.store), str(other.path), "-o", f"cache_dir={other.cache}"],
            capture_output=True,
            text=True,
            env={**os.environ, "MEGAFS_PASSPHRASE": PASSPHRASE},
            timeout=60,
        )
        assert out.returncode == 1
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "mounted read-write by" in lines[0], out.stderr
        assert f"pid {m.proc.pid if m.proc else '?'}" in lines[0]
        reader = _second(m, tmp_path, "reader", ["ro"])
        reader.start()
        try:
            assert (reader.path / "f").read_bytes() == b"hello"
        finally:
            reader.stop()
    finally:
        m.stop()
    # Unmounted: the lease is released and another machine's mount may write.
    keys = [info.key for info in trio.run(LocalStore(Path(m.store)).list)]
    assert LEASE_KEY not in keys and keys, keys
    other = _second(m, tmp_path, "after")
    other.start()
    try:
        (other.path / "g").write_bytes(b"second writer")
    finally:
        other.stop()
    m.assert_clean_log()


@needs_fuse
def test_lease_of_a_killed_daemon_is_taken_over_at_once(tmp_path: Path) -> None:
    m = new_mount(tmp_path)
    m.start()
    assert m.proc is not None
    (m.path / "f").write_bytes(b"x")
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    m.proc = None
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False)
    other = _second(m, tmp_path, "other")  # another cache dir: only the lease stands in the way
    other.start()
    try:
        (other.path / "g").write_bytes(b"y")
    finally:
        other.stop()
    assert "took over the volume's lease" in other.log_text()
