"""Large staged files are written around the page cache (megafs.stores.direct_io),
byte for byte what a buffered write makes, and the ordinary way where O_DIRECT is
refused."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from megafs.stores import MemoryStore, direct_io
from megafs.stores.base import Deferred
from megafs.stores.staging import StagingStore

pytestmark = pytest.mark.skipif(not direct_io.available(), reason="no O_DIRECT here")


def _opens(monkeypatch: pytest.MonkeyPatch, refuse: bool = False) -> list[int]:
    """Record the flags of every os.open; with ``refuse``, fail the ones asking for
    O_DIRECT with EINVAL (a filesystem without it)."""
    flags_seen: list[int] = []
    real_open = os.open

    def fake_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        flags_seen.append(flags)
        if refuse and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    return flags_seen


@pytest.mark.parametrize(
    "sizes",
    [
        [1 << 20],  # aligned: no tail
        [77, (4 << 20) + 64 * 28, 32],  # a staged sealed chunk: header, data, checksum
        [(9 << 20) + 5],  # larger than the pooled buffers
        [4096, 1, 4095, 3],
    ],
)
def test_the_file_is_what_the_pieces_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sizes: list[int]
) -> None:
    pieces: list[bytes | bytearray | memoryview] = []
    for j, n in enumerate(sizes):
        raw = os.urandom(n)
        pieces.append(raw if j % 3 == 0 else bytearray(raw) if j % 3 == 1 else memoryview(raw))
    flags = _opens(monkeypatch)
    for _ in range(2):  # the second time from a reused buffer
        path = tmp_path / "f"
        assert direct_io.write_new_file(path, pieces)
        assert path.read_bytes() == b"".join(bytes(p) for p in pieces)
        assert path.stat().st_mode & 0o777 == 0o600
    assert flags and all(f & os.O_DIRECT for f in flags)


def test_a_refused_open_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _opens(monkeypatch, refuse=True)
    assert not direct_io.write_new_file(tmp_path / "f", [os.urandom(1 << 20)])
    assert not (tmp_path / "f").exists()


def test_a_refused_first_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite

    def fake_pwrite(fd: int, data: Any, offset: int) -> int:
        if offset == 0:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fake_pwrite)
    assert not direct_io.write_new_file(tmp_path / "f", [os.urandom(1 << 20)])
    assert not (tmp_path / "f").exists()


def _stage_and_recover(tmp_path: Path, data: bytes, copies: int = 1) -> list[bytes]:
    """Stage ``copies`` puts of ``data`` (each a little different), open the staging
    area again as after a crash, upload what it found: what the remote store got."""

    def copy(j: int) -> bytes:
        return bytes([j]) + data[1:]

    async def main() -> list[bytes]:
        s = StagingStore(MemoryStore(), tmp_path, is_barrier=lambda k: False)
        for j in range(copies):
            await s.put(f"c/big{j}", copy(j))
        await s.sync()
        assert await s.get("c/big0", 12345, 12345 + 100) == data[12345 : 12345 + 100]
        remote = MemoryStore()
        s2 = StagingStore(remote, tmp_path, is_barrier=lambda k: False)
        assert s2.pending_count == copies
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s2.run_uploader)
            await s2.wait_idle()
            nursery.cancel_scope.cancel()
        return [await remote.get(f"c/big{j}") for j in range(copies)]

    got = trio.run(main)
    assert got == [copy(j) for j in range(copies)]
    return got


def test_staging_writes_a_large_file_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom((4 << 20) + 1000)
    flags = _opens(monkeypatch)
    _stage_and_recover(tmp_path, data)
    assert any(f & os.O_DIRECT for f in flags)


def test_staging_falls_back_where_o_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom((2 << 20) + 7)
    flags = _opens(monkeypatch, refuse=True)
    _stage_and_recover(tmp_path, data, copies=3)
    # Refused once, then not asked for again by that staging area.
    assert sum(1 for f in flags if f & os.O_DIRECT) == 1


def test_a_fill_is_not_asked_for_where_o_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _opens(monkeypatch, refuse=True)
    filled: list[int] = []
    assert not direct_io.write_new_file_with(tmp_path / "f", 1 << 20, lambda b: filled.append(1))
    assert not filled and not (tmp_path / "f").exists()


def _deferred(data: bytes, fills: list[int]) -> Deferred:
    def fill(dst: memoryview) -> None:
        fills.append(len(dst))
        dst[:] = data

    return Deferred(len(data), fill)


@pytest.mark.parametrize(
    "size, refuse",
    [
        ((4 << 20) + 64 * 28, False),  # a sealed chunk: filled into the direct buffer
        ((4 << 20) + 64 * 28, True),  # O_DIRECT refused: filled into a buffer, written
        (5000, False),  # small: written through the page cache
    ],
)
def test_staging_fills_a_deferred_put_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, refuse: bool
) -> None:
    """put_computed of a Deferred fills it once, in the worker thread, and stages
    exactly its bytes: readable at once, found and uploaded after a restart."""
    data = os.urandom(size)
    fills: list[int] = []
    flags = _opens(monkeypatch, refuse=refuse)

    async def main() -> bytes:
        s = StagingStore(MemoryStore(), tmp_path, is_barrier=lambda k: False)
        assert await s.put_computed(lambda: ("c/d", _deferred(data, fills))) is not None
        assert fills == [size]
        assert await s.get("c/d") == data
        await s.sync()
        remote = MemoryStore()
        again = StagingStore(remote, tmp_path, is_barrier=lambda k: False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(again.run_uploader)
            await again.wait_idle()
            nursery.cancel_scope.cancel()
        return await remote.get("c/d")

    assert trio.run(main) == data
    direct = [f for f in flags if f & os.O_DIRECT]
    assert len(direct) == (1 if size >= direct_io.DIRECT_MIN else 0)


def test_a_deferred_put_that_finds_the_disk_full_is_filled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the middle of the direct write: the partial file is removed, room is
    made, and the ordinary path stages the object (filled anew: the first buffer is
    gone)."""
    data = os.urandom((4 << 20) + 1000)
    fills: list[int] = []
    real_pwrite = os.pwrite
    failed: list[int] = []

    def full_once(fd: int, buf: Any, offset: int) -> int:
        if not failed:
            failed.append(offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, buf, offset)

    monkeypatch.setattr(os, "pwrite", full_once)

    async def main() -> None:
        s = StagingStore(MemoryStore(), tmp_path, is_barrier=lambda k: False, on_full=lambda: True)
        await s.put_computed(lambda: ("c/d", _deferred(data, fills)))
        assert len(fills) == 2 and failed
        assert await s.get("c/d") == data
        assert not list(tmp_path.glob(".tmp-*"))

    trio.run(main)
