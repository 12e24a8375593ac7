"""A read-only mount sees what the volume's writer (another machine) changes."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conftest import MEGAFS, Mount, needs_fuse, new_mount


def _idle(m: Mount) -> None:
    subprocess.run([*MEGAFS, "status", str(m.path), "--wait-idle"], check=True, timeout=120)


def _eventually(check: Callable[[], object], want: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := check()) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"the reader did not see the change in time: {got!r}")
        time.sleep(0.1)


@needs_fuse
def test_reader_sees_writer_changes(tmp_path: Path) -> None:
    writer = new_mount(tmp_path, "w")
    reader = Mount(
        writer.store,
        tmp_path / "r-mnt",
        tmp_path / "r-cache",
        tmp_path / "r.log",
        ["ro", "dir_cache_time=0.5"],
    )
    writer.start()
    try:
        (writer.path / "docs").mkdir()
        (writer.path / "docs" / "a.txt").write_bytes(b"version 1")
        (writer.path / "old.txt").write_bytes(b"to be removed")
        _idle(writer)
        reader.start()
        try:
            # The reader caches what it read (entries, attributes, pages)...
            assert sorted(os.listdir(reader.path)) == ["docs", "old.txt"]
            assert (reader.path / "docs" / "a.txt").read_bytes() == b"version 1"
            # ...and sees the writer's changes within dir_cache_time.
            (writer.path / "docs" / "a.txt").write_bytes(b"version 2, longer")
            (writer.path / "docs" / "b.txt").write_bytes(b"new file")
            os.rename(writer.path / "old.txt", writer.path / "docs" / "moved.txt")
            os.mkdir(writer.path / "later")
            _idle(writer)
            _eventually(lambda: sorted(os.listdir(reader.path)), ["docs", "later"])
            _eventually(
                lambda: sorted(os.listdir(reader.path / "docs")), ["a.txt", "b.txt", "moved.txt"]
            )
            _eventually(lambda: (reader.path / "docs" / "a.txt").read_bytes(), b"version 2, longer")
            assert os.stat(reader.path / "docs" / "a.txt").st_size == len(b"version 2, longer")
            assert (reader.path / "docs" / "moved.txt").read_bytes() == b"to be removed"
            assert not (reader.path / "old.txt").exists()
            os.unlink(writer.path / "docs" / "b.txt")
            _idle(writer)
            _eventually(lambda: (reader.path / "docs" / "b.txt").exists(), False)
        finally:
            reader.stop()
    finally:
        writer.stop()
    writer.assert_clean_log()
    reader.assert_clean_log()
