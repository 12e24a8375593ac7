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
