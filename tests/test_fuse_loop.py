"""How the daemon's FUSE workers take turns (megafs.fuse_loop): the task that replied
reads the next request, a handler that waits hands the device to another worker, a
file's content lock is free to take; and the mount still ends cleanly on an unmount
and on a signal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import Mount, mounted_at, needs_fuse, new_mount, serving

from megafs import fuse_loop, fuse_ops
from megafs.vfs.node import ContentLock

STATUS = "user.megafs.status"


def status(m: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(os.getxattr(m.path, STATUS))
    return doc


# -- a file's content lock ---------------------------------------------------------------


def test_a_free_content_lock_is_taken_without_a_checkpoint() -> None:
    async def main() -> None:
        lock = ContentLock()
        with trio.testing.assert_no_checkpoints():
            async with lock:
                assert lock.locked()
        assert not lock.locked()

    trio.run(main)


def test_a_released_content_lock_passes_straight_to_its_first_waiter() -> None:
    async def main() -> None:
        lock = ContentLock()
        order: list[str] = []

        async def user(name: str) -> None:
            async with lock:
                order.append(name)

        async with trio.open_nursery() as n:
            await lock.__aenter__()
            n.start_soon(user, "waiter")
            await trio.testing.wait_all_tasks_blocked()
            lock.release()
            assert lock.locked()  # owned by the waiter, which has not run yet
            n.start_soon(user, "latecomer")  # finds it taken: no barging in
        assert order == ["waiter", "latecomer"]
        assert not lock.locked()

    trio.run(main)


def test_content_lock_waiters_run_one_at_a_time_in_order() -> None:
    async def main() -> None:
        lock = ContentLock()
        order: list[int] = []
        inside = 0

        async def user(i: int) -> None:
            nonlocal inside
            async with lock:
                inside += 1
                assert inside == 1
                order.append(i)
                await trio.sleep(0.001)
                inside -= 1

        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(user, i)
                await trio.testing.wait_all_tasks_blocked()
        assert order == list(range(20))
        assert not lock.locked()

    trio.run(main)


def test_a_waiter_cancelled_while_parked_never_owns_the_content_lock() -> None:
    async def main() -> None:
        lock = ContentLock()
        got: list[str] = []

        async def waiter(name: str, scope_out: list[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                scope_out.append(scope)
                async with lock:
                    got.append(name)

        await lock.__aenter__()
        scopes: list[trio.CancelScope] = []
        async with trio.open_nursery() as n:
            n.start_soon(waiter, "cancelled", scopes)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(waiter, "second", [])
            await trio.testing.wait_all_tasks_blocked()
            scopes[0].cancel()
            await trio.testing.wait_all_tasks_blocked()
            lock.release()
        assert got == ["second"]
        assert not lock.locked()

    trio.run(main)


# -- handlers run inline until they wait ------------------------------------------------------


def test_a_handler_hands_the_device_over_only_when_it_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    woken: list[int] = []
    monkeypatch.setattr(fuse_loop, "handler_suspends", lambda: woken.append(1))

    async def quick(x: int) -> int:
        return x + 1

    async def slow(x: int) -> int:
        await trio.sleep(0.01)
        await trio.sleep(0.01)
        return x * 2

    async def failing() -> None:
        await trio.sleep(0)
        raise ValueError("boom")

    async def main() -> None:
        assert await fuse_ops._run_inline(quick(1)) == 2
        assert woken == []
        assert await fuse_ops._run_inline(slow(4)) == 8
        assert woken == [1]  # once per handler, however often it waits
        with pytest.raises(ValueError, match="boom"):
            await fuse_ops._run_inline(failing())
        with trio.move_on_after(0.05) as scope:  # a cancellation reaches the handler
            await fuse_ops._run_inline(trio.sleep_forever())
        assert scope.cancelled_caught

    trio.run(main)


# -- the reader polls an empty device briefly before it sleeps ---------------------------------


def test_a_request_that_comes_while_the_reader_spins_is_taken_without_a_checkpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fuse_loop, "SPIN", 5.0)  # (returns as soon as the request is there)
    r, w = os.pipe()
    try:

        async def main() -> None:
            loop = fuse_loop._Loop(r)
            writer = threading.Timer(0.02, os.write, (w, b"request"))
            writer.start()
            t0 = time.perf_counter()
            with trio.testing.assert_no_checkpoints():
                assert await loop.wait_readable()
            assert time.perf_counter() - t0 < 2.0
            writer.join()
            assert loop.taken == 1 and loop.streak == 1

        trio.run(main)
    finally:
        os.close(r)
        os.close(w)


def test_an_empty_device_is_waited_for_in_trio_after_the_spin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fuse_loop, "SPIN", 0.001)
    r, w = os.pipe()
    try:

        async def main() -> None:
            loop = fuse_loop._Loop(r)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(loop.wait_readable)
                await trio.testing.wait_all_tasks_blocked()  # asleep in trio's I/O wait
                assert loop.reading
                os.write(w, b"request")
            assert not loop.reading and loop.taken == 1
            # After STREAK requests in a row the reader goes through trio at once,
            # without spinning (the committer and timers get their turn).
            loop.streak = fuse_loop.STREAK
            monkeypatch.setattr(fuse_loop, "SPIN", 60.0)
            with trio.testing.assert_checkpoints():
                assert await loop.wait_readable()
            assert loop.streak == 0

        trio.run(main)
    finally:
        os.close(r)
        os.close(w)


# -- through a real mount --------------------------------------------------------------------


@needs_fuse
def test_requests_are_read_through_megafs_loop(tmp_path: Path) -> None:
    m = new_mount(tmp_path)
    with serving(m):
        before = status(m)["fuse_requests"]
        assert isinstance(before, int) and before > 0
        for i in range(50):
            (m.path / f"f{i}").write_bytes(b"x" * i)
        assert sorted(os.listdir(m.path)) == sorted(f"f{i}" for i in range(50))
        # create, write and release for each file, at least.
        assert status(m)["fuse_requests"] >= before + 150


@needs_fuse
def test_requests_are_served_while_other_handlers_wait_on_the_store(tmp_path: Path) -> None:
    """Six reads wait for a store that takes 2 s per request: creating, listing and
    reading cached files goes on meanwhile (each waiting handler handed the device
    to another worker)."""
    m = new_mount(tmp_path)
    files = {f"big{i}": os.urandom(100_000 + i) for i in range(6)}
    with serving(m):
        for name, data in files.items():
            (m.path / name).write_bytes(data)
        (m.path / "cached").write_bytes(b"cached bytes")
    shutil.rmtree(m.cache)  # nothing cached: reads go to the store
    m.options = ["store_latency=2"]
    with serving(m):
        assert sorted(os.listdir(m.path)) == sorted([*files, "cached"])
        for name in files:
            os.stat(m.path / name)
        assert (m.path / "cached").read_bytes() == b"cached bytes"  # now cached
        for _ in range(100):  # pyfuse3 adds a worker per request up to 64: all there now
            status(m)
        got: dict[str, bytes] = {}

        def read(name: str) -> None:
            got[name] = (m.path / name).read_bytes()

        readers = [threading.Thread(target=read, args=(name,)) for name in files]
        for t in readers:
            t.start()
        time.sleep(0.3)  # every reader is in a handler waiting for the store now
        for i in range(40):
            (m.path / f"new{i}").write_bytes(b"n" * i)
            assert (m.path / "cached").read_bytes() == b"cached bytes"
        assert len(os.listdir(m.path)) == len(files) + 41
        still_waiting = sum(t.is_alive() for t in readers)
        for t in readers:
            t.join(timeout=120)
        assert still_waiting == len(readers), "the reads did not wait: the test proves nothing"
        assert got == files


@needs_fuse
def test_a_signal_ends_the_mount_cleanly(tmp_path: Path) -> None:
    """SIGTERM ends a mount whose workers are parked (dozens after a burst of
    requests): the daemon unmounts, commits and exits 0; the next mount has it all."""
    m = new_mount(tmp_path)
    m.start()
    try:
        for i in range(200):
            (m.path / f"f{i}").write_bytes(b"s" * i)
        proc = m.proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        m.proc = None
        assert not mounted_at(m.path)
    finally:
        m.stop()
    m.assert_clean_log()
    with serving(m):
        for i in range(200):
            assert (m.path / f"f{i}").read_bytes() == b"s" * i
