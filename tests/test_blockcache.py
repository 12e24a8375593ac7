"""The sealed on-disk block cache."""

from __future__ import annotations

import os
from pathlib import Path

from megafs.vfs.blockcache import BlockCache

KEY = bytes(range(32))
VID = bytes(16)


def _cache(d: Path, max_bytes: int = 1 << 20) -> BlockCache:
    return BlockCache(d, KEY, VID, max_bytes=max_bytes, memory_bytes=0)


def test_roundtrip_survives_reopen_and_is_sealed(tmp_path: Path) -> None:
    c = _cache(tmp_path)
    secret = b"plaintext that must not be at rest " * 100
    c.put(b"k1", secret)
    assert c.get(b"k1") == secret
    c2 = _cache(tmp_path)
    assert c2.get(b"k1") == secret
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert b"plaintext" not in f.read_bytes()
            assert b"k1" not in f.name.encode()


def test_cap_holds_on_every_insert_lru(tmp_path: Path) -> None:
    c = _cache(tmp_path, max_bytes=10 * 70_000)
    for i in range(30):
        c.put(b"k%d" % i, os.urandom(65536))
        assert c.bytes <= c.max_bytes
        if i >= 1:
            assert c.get(b"k0") is not None  # k0 kept hot by use
    on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert on_disk == c.bytes <= c.max_bytes
    assert c.get(b"k1") is None  # cold ones went first


def test_damaged_file_is_dropped_not_served(tmp_path: Path) -> None:
    c = _cache(tmp_path)
    c.put(b"k", b"good data" * 1000)
    (f,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    raw = bytearray(f.read_bytes())
    raw[40] ^= 1
    f.write_bytes(bytes(raw))
    c2 = _cache(tmp_path)
    assert c2.get(b"k") is None
    assert not f.exists()


def test_swapped_files_are_refused(tmp_path: Path) -> None:
    c = _cache(tmp_path)
    c.put(b"a", b"A" * 100)
    c.put(b"b", b"B" * 100)
    fa, fb = sorted((p for p in tmp_path.rglob("*") if p.is_file()), key=lambda p: p.name)
    da, db = fa.read_bytes(), fb.read_bytes()
    fa.write_bytes(db)
    fb.write_bytes(da)
    c2 = _cache(tmp_path)
    assert c2.get(b"a") is None and c2.get(b"b") is None
