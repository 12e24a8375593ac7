"""Crash consistency through a real mount: the daemon is killed with SIGKILL in the
middle of a workload, remounted on the same store and cache directory, and then

* every file whose fsync returned reads back byte for byte,
* the staged uploads resume and finish (the staging directory ends empty),
* the store on its own passes ``check_volume(deep=True)`` (nothing references a
  missing or damaged object).

The store lags (``store_latency``, ``store_bandwidth``) so that uploads are still
queued when the kill comes. A writer process runs the workload and reports each
fsync that returned on its stdout; the test kills once enough have been reported.

Run as a script, this file is that writer: ``test_crash.py KIND DIR COUNT``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import trio
from conftest import MEGAFS, PASSPHRASE, Mount, needs_fuse, new_mount

from megafs.control import mounted_at
from megafs.format import chunks as fchunks
from megafs.stores import LocalStore
from megafs.volume.check import check_volume
from megafs.volume.drive import ROOT_INO, Volume

pytestmark = needs_fuse

# -- the workloads (run in the writer process) ----------------------------------------

MiB = 1 << 20


def content(name: str, size: int) -> bytes:
    """The deterministic content of file ``name``."""
    return random.Random(name).randbytes(size)


def stream_sizes(i: int) -> int:
    """Mixed sizes: inline, one partial chunk, several chunks."""
    return (100 + i, 200_000 + i, 5 * MiB + i)[i % 3]


def plan(kind: str, count: int) -> Iterator[tuple[str, int, bool]]:
    """(relative path, size, fsync?) for each file the writer writes, in order."""
    for i in range(count):
        if kind == "stream":
            yield f"s{i:04d}", stream_sizes(i), i % 2 == 0
        elif kind == "creates":
            yield f"many/f{i:05d}", 64 + i % 50, i % 100 == 99
        elif kind == "large":
            yield f"big{i}", 12 * MiB + i, True
        else:
            raise ValueError(kind)


def writer(kind: str, root: Path, count: int) -> None:
    """Write the plan's files; print ``synced PATH`` as soon as its fsync returned.
    Stops at the first error (the mount died)."""
    # Relative paths from inside the mount: once the mount is gone (even lazily
    # unmounted), every call fails instead of writing to the directory beneath.
    os.chdir(root)
    try:
        os.makedirs("many", exist_ok=True)
        for rel, size, sync in plan(kind, count):
            data = content(rel, size)
            fd = os.open(rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view[: 1 * MiB]) :]
                if sync:
                    os.fsync(fd)
                    print("synced", rel, flush=True)
            finally:
                os.close(fd)
        print("done", flush=True)
    except OSError as exc:
        print("error", exc.errno, flush=True)


# -- helpers --------------------------------------------------------------------------


def staging_dir(m: Mount) -> Path:
    dirs = list(m.cache.glob("*/staging"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def staged(m: Mount) -> list[str]:
    return sorted(p.name for p in staging_dir(m).glob("*.op"))


def kill9(m: Mount) -> None:
    """SIGKILL the daemon and clear away its dead mount."""
    assert m.proc is not None
    os.kill(m.proc.pid, signal.SIGKILL)
    m.proc.wait(timeout=30)
    m.proc = None
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False, timeout=30)
    assert not mounted_at(m.path)


def wait_idle(m: Mount, timeout: float = 60.0) -> None:
    subprocess.run(
        [*MEGAFS, "status", "--wait-idle", str(m.path)],
        check=True,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
    )


def assert_volume_ok(store: Path) -> None:
    """The store on its own is consistent: every object is there and authentic."""

    async def go() -> list[str]:
        volume = await Volume.open(LocalStore(store), PASSPHRASE.encode())
        report = await check_volume(volume, deep=True)
        await volume.aclose()
        return report.problems

    problems = trio.run(go)
    assert not problems, "\n".join(problems)


def read_from_store(store: Path, name: str) -> bytes:
    """File ``name`` in the root directory, read straight from the store."""

    async def go() -> bytes:
        volume = await Volume.open(LocalStore(store), PASSPHRASE.encode())
        rec = (await volume.load_dir(ROOT_INO)).entries[name.encode()]
        if rec.inline is not None:
            return rec.inline
        out = bytearray(rec.size)
        for i, ref in rec.chunks.items():
            blocks = await volume.read_blocks(ref, 0, fchunks.block_count(ref.length))
            data = b"".join(blocks)
            out[i * fchunks.CHUNK_SIZE : i * fchunks.CHUNK_SIZE + len(data)] = data
        await volume.aclose()
        return bytes(out)

    return trio.run(go)


def log_since(m: Mount, offset: int) -> str:
    return m.log_text()[offset:]


def assert_no_errors(text: str) -> None:
    bad = [ln for ln in text.splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert not bad, "errors in the megafs log:\n" + text


class Writer:
    """The writer process and what it reported."""

    def __init__(self, kind: str, root: Path, count: int) -> None:
        self.kind, self.count = kind, count
        self.proc = subprocess.Popen(
            [sys.executable, __file__, kind, str(root), str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.synced: list[str] = []
        self.finished = False

    def wait_synced(self, n: int, timeout: float = 60.0) -> None:
        """Block until ``n`` fsyncs have returned."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while len(self.synced) < n:
            assert time.monotonic() < deadline, f"only {len(self.synced)} fsyncs returned"
            line = self.proc.stdout.readline()
            assert line.startswith("synced "), f"writer: {line!r}"
            self.synced.append(line.split()[1])

    def finish(self) -> None:
        """Collect the rest of its report (after the kill)."""
        out, _ = self.proc.communicate(timeout=60)
        for line in out.splitlines():
            if line.startswith("synced "):
                self.synced.append(line.split()[1])
            elif line == "done":
                self.finished = True
        assert not self.finished, "the kill came too late: the writer had finished"


def check_files(root: Path, w: Writer) -> None:
    """Fsynced files are intact; any other file of the plan holds no garbage (each
    4 KiB page is either the right bytes or zeros) and no file is too long."""
    sizes = {rel: size for rel, size, _ in plan(w.kind, w.count)}
    for rel in w.synced:
        data = (root / rel).read_bytes()
        assert data == content(rel, sizes[rel]), f"{rel}: fsynced, but not intact"
    found = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert found <= set(sizes), f"unexpected files: {sorted(found - set(sizes))[:5]}"
    for rel in sorted(found - set(w.synced)):
        size = sizes[rel]
        data = (root / rel).read_bytes()
        want = content(rel, size)
        assert len(data) <= size, rel
        for off in range(0, len(data), 4096):
            page = data[off : off + 4096]
            assert page in (want[off : off + len(page)], bytes(len(page))), f"{rel} @ {off}"


def recover_and_check(m: Mount, w: Writer | None = None) -> None:
    """Remount after the kill; check the files; let uploads finish; unmount; check
    the store alone and that nothing is left in staging."""
    offset = len(m.log_text())
    m.start()
    if w is not None:
        check_files(m.path, w)
    wait_idle(m)
    m.stop()
    assert_no_errors(log_since(m, offset))
    assert staged(m) == [], "staged uploads were not finished"
    assert_volume_ok(m.store)


# -- the tests ------------------------------------------------------------------------


def test_kill_during_write_stream(tmp_path: Path) -> None:
    m = new_mount(tmp_path, options=["store_latency=0.05"])
    m.start()
    try:
        w = Writer("stream", m.path, 10_000)
        w.wait_synced(6)
        assert staged(m), "nothing staged at kill time: the test proves nothing"
        kill9(m)
        w.finish()
        recover_and_check(m, w)
        # And the files survive a clean remount too.
        m.start()
        check_files(m.path, w)
    finally:
        m.stop()


def test_kill_right_after_fsync(tmp_path: Path) -> None:
    m = new_mount(tmp_path, options=["store_latency=0.2"])
    m.start()
    try:
        data = content("after-fsync", 3 * MiB + 17)
        small = content("small", 300)
        (m.path / "small").write_bytes(small)
        fd = os.open(m.path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
            pending = staged(m)
            kill9(m)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # the mount is gone
        assert pending, "uploads had finished before the kill: the test proves nothing"
        recover_and_check(m)
        m.start()
        assert (m.path / "f").read_bytes() == data
    finally:
        m.stop()
    assert read_from_store(m.store, "f") == data


def test_kill_during_many_creates_in_one_directory(tmp_path: Path) -> None:
    m = new_mount(tmp_path, options=["store_latency=0.05", "commit_interval=0.2"])
    m.start()
    try:
        w = Writer("creates", m.path, 100_000)
        w.wait_synced(8)
        pending = staged(m)
        kill9(m)
        w.finish()
        assert pending, "nothing staged at kill time: the test proves nothing"
        recover_and_check(m, w)
        m.start()
        check_files(m.path, w)
        names = set(os.listdir(m.path / "many"))
        assert {rel.split("/")[1] for rel in w.synced} <= names
    finally:
        m.stop()


def test_kill_during_large_uploads(tmp_path: Path) -> None:
    m = new_mount(tmp_path, options=["store_latency=0.05", "store_bandwidth=16M"])
    m.start()
    try:
        w = Writer("large", m.path, 100)
        w.wait_synced(2)
        pending = staged(m)
        kill9(m)
        w.finish()
        assert len(pending) > 2, "uploads had caught up: the test proves nothing"
        m.options = ["store_latency=0.05"]
        recover_and_check(m, w)
    finally:
        m.stop()


if __name__ == "__main__":
    writer(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
