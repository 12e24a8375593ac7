"""``megafs status`` (fields, JSON and human), progress bars of umount/fsck/gc on a
terminal (and none without one), and what the daemon logs."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import socket
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import MEGAFS, PASSPHRASE, Mount, cold_read, needs_fuse, new_mount, serving

from megafs.progress import ProgressLine
from megafs.stats import RateMeter
from megafs.testing.megaemu.process import EmulatorProcess

MiB = 1 << 20
STATUS = "user.megafs.status"


def status(m: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(os.getxattr(m.path, STATUS))
    return doc


def cli_status(m: Mount, *args: str) -> str:
    res = subprocess.run(
        [*MEGAFS, "status", str(m.path), *args], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def write_files(root: Path, sizes: dict[str, int]) -> None:
    """Write and fsync each file: staged at once, uploaded in the background."""
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(os.urandom(size))
            os.fsync(f.fileno())


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "MEGAFS_PASSPHRASE": PASSPHRASE, "TERM": "xterm", **extra}


def run_on_terminal(cmd: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``cmd`` with standard error on a pseudo-terminal (80 columns) and standard
    output on a file: (exit status, what the terminal got, standard output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=slave, env=env())
        os.close(slave)
        got = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.1)
                if not ready:
                    continue
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal has gone
                    break
                if not data:
                    break
                got += data
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            os.close(master)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        return code, got.decode(errors="replace"), out.read().decode(errors="replace")


def no_progress_output(text: str) -> bool:
    return "\r" not in text and "\x1b" not in text and "[#" not in text and "[-" not in text


def run_piped(*args: str) -> str:
    """Run ``megafs ARGS`` with no terminal: it must succeed, with nothing on standard
    error and no progress drawn; returns its standard output."""
    res = subprocess.run([*MEGAFS, *args], capture_output=True, text=True, env=env(), timeout=60)
    assert res.returncode == 0 and res.stderr == "", res
    assert no_progress_output(res.stdout), res.stdout
    return res.stdout


# ------------------------------------------------------------------ the pieces


def test_rate_meter() -> None:
    now = [0.0]
    meter = RateMeter(window=10.0, clock=lambda: now[0])
    assert meter.rate() == 0.0
    meter.busy()  # an upload starts at 0 s...
    now[0] = 2.0
    meter.add(4 * MiB)  # ...and ends at 2 s: 2 MiB/s from the first completion on
    assert meter.rate() == 2 * MiB
    now[0] = 4.0
    meter.add(4 * MiB)
    assert meter.rate() == 2 * MiB
    now[0] = 13.0  # the first 4 MiB left the window; the rest over the whole window
    assert meter.rate() == 4 * MiB / 10
    now[0] = 30.0
    assert meter.rate() == 0.0
    meter.busy()  # a new burst is measured over its own length
    now[0] = 31.0
    meter.add(MiB)
    assert meter.rate() == MiB


def test_progress_line_fits_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "50")
    out = io.StringIO()
    line = ProgressLine(out, enabled=True)
    line.update("uploading 312.0 MiB, 14 files, with a long tail of words", 0.5)
    drawn = out.getvalue()
    assert drawn.startswith("\r\x1b[K") and len(drawn) - 4 <= 49, drawn
    assert drawn.endswith(" [##########----------]  50%"), drawn  # the bar is kept whole
    line.update("again", 0.6)  # within the interval: not drawn
    assert out.getvalue() == drawn
    line.done("finished")
    assert out.getvalue() == drawn + "\r\x1b[Kfinished\n"
    quiet = io.StringIO()
    off = ProgressLine(quiet)  # not a terminal
    off.update("uploading", 0.1)
    off.done("finished")
    assert quiet.getvalue() == ""


# ------------------------------------------------------------------ status fields


@needs_fuse
def test_status_during_a_large_upload(tmp_path: Path) -> None:
    """Against a slow store (8 MiB/s): pending files and bytes go down, the upload rate
    is measured, the lease names this host and daemon, directories are counted."""
    m = new_mount(tmp_path, options=["store_bandwidth=8M", "store_latency=0.01"])
    with serving(m):
        assert m.proc is not None
        # Six files of two chunks each (4 MiB + 1 MiB): 30 MiB, about 4 s of uploading.
        files = {f"big/f{i}.bin": 5 * MiB for i in range(6)}
        write_files(m.path, files)
        wait_for(lambda: status(m)["dirty_files"] == 0, "the commit")
        first = status(m)
        # Files, not objects: two chunks per file, plus the directories' objects.
        assert 3 <= first["pending_files"] <= 6, first
        assert first["pending_objects"] > first["pending_files"], first
        assert first["pending_bytes"] >= 20 * MiB, first
        samples = [first]
        while samples[-1]["pending_objects"]:
            time.sleep(0.25)
            samples.append(status(m))
            assert len(samples) < 200, samples[-1]
        pending = [s["pending_bytes"] for s in samples]
        assert pending == sorted(pending, reverse=True), pending  # never goes up
        assert len(set(pending)) >= 4, pending  # and goes down step by step
        assert [s["pending_files"] for s in samples][-1] == 0
        assert len({s["pending_files"] for s in samples}) >= 3, samples
        rates = [s["upload_rate"] for s in samples[1:]]
        assert max(rates) > 2 * MiB, rates
        assert max(rates) < 20 * MiB, rates  # about the link's 8 MiB/s, not wild

        # Read a file twice past the page cache: the block cache is used, and its hit
        # rate follows the counters.
        for _ in range(2):
            assert len(cold_read(m.path / "big/f0.bin")) == 5 * MiB
        st = json.loads(cli_status(m, "--json"))
        assert st["pending_bytes"] == st["pending_files"] == 0
        assert st["uploaded_bytes"] >= 30 * MiB
        assert st["upload_rate"] > 0  # still within the last 10 s
        assert st["upload_rate_window"] == 10.0
        assert st["drive"] == "volume" and st["read_only"] is False
        lookups = st["cache_hits"] + st["cache_misses"]
        assert lookups > 0 and st["cache_hits"] > 0
        assert st["cache_hit_rate"] == round(st["cache_hits"] / lookups, 4)
        assert 0 < st["cache_bytes"] <= st["cache_max_bytes"]
        assert st["dir_objects_cached"] >= 2  # the root and big/
        # The daemon's memory: it streams, so the 30 MiB written need not all be held.
        assert 20 * MiB < st["rss_bytes"] <= st["peak_rss_bytes"] < 300 * MiB, st
        assert st["last_error"] is None and st["last_error_time"] is None
        assert st["store_errors"] == 0
        assert st["lease_state"] == "held"
        lease = st["lease"]
        assert lease["host"] == socket.gethostname()
        assert lease["pid"] == st["pid"] == m.proc.pid
        assert re.fullmatch(r"[0-9a-f]{16}", lease["mount_id"])
        assert lease["since"] <= time.time() < lease["expires"]
        # The fields the existing scripts read are still there.
        for old in ("pending_objects", "dirty_files", "cache_bytes", "errors", "pid"):
            assert old in st

        # The human form: every field, one per line, values aligned.
        lines = cli_status(m).splitlines()
        labels = [ln.split(":", 1)[0] for ln in lines]
        for label in (
            "uploads pending",
            "upload rate",
            "cache",
            "directories cached",
            "memory",
            "last store error",
            "lease",
        ):
            assert label in labels, lines
        text = "\n".join(lines)
        assert "0 files, 0 B" in text
        rate = f"hit rate {st['cache_hit_rate'] * 100:.1f}% ({st['cache_hits']} hits"
        assert re.search(r"cache: +[\d.]+ [KM]iB of [\d.]+ [MG]iB; " + re.escape(rate), text)
        assert f"held by {socket.gethostname()} (megafs pid {m.proc.pid}" in text
        assert "last store error:   none" in text
        assert re.search(r"\nmemory: +[\d.]+ MiB resident \(peak [\d.]+ MiB\)\n", text), text
        assert re.search(r"\ndirectories cached: +\d+ \(\d+ inodes in memory\)\n", text), text
        assert st["inodes"] >= 3  # the root, big/ and its file
        columns = {re.match(r"[^:]+:\s+", ln).end() for ln in lines}  # type: ignore[union-attr]
        assert len(columns) == 1, lines


@needs_fuse
def test_last_store_error_and_when(tmp_path: Path) -> None:
    """An injected store failure (chunk uploads impossible: a file where the chunk
    directory belongs) shows as the last error with its time, is logged once (not once
    per retry), and is kept after the store recovers, marked as recovered."""
    m = new_mount(tmp_path)
    assert isinstance(m.store, Path)
    blocker = m.store / "c"
    with serving(m):
        blocker.write_bytes(b"in the way")
        try:
            before = time.time()
            write_files(m.path, {"secret-plan-7.bin": 300 * 1024})
            wait_for(lambda: status(m)["store_errors"] >= 3, "failing uploads")
            st = status(m)
            error = st["last_error"]
            assert re.search(r"put 'c/[0-9a-f]{2}/[0-9a-f]+'.*Not a directory", error), error
            assert before <= st["last_error_time"] <= time.time()
            assert st["last_error_recovered"] is False
            assert st["pending_files"] == 1 and st["pending_bytes"] > 0
            human = cli_status(m)
            stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+ s ago\)"
            assert re.search(r"last store error: +" + stamp + ": StoreError: .*put 'c/", human)
            assert re.search(r"\[\d+ errors this mount\]", human), human
        finally:
            blocker.unlink()  # the store works again
        subprocess.run([*MEGAFS, "status", str(m.path), "--wait-idle"], check=True, timeout=60)
        after = status(m)
        assert after["pending_bytes"] == after["pending_files"] == 0
        assert after["last_error"] is not None  # kept, with its time
        assert after["last_error_time"] >= st["last_error_time"]
        assert after["last_error_recovered"] is True
        assert "answered since" in cli_status(m)
    log = m.log_text()
    warnings = [ln for ln in log.splitlines() if " WARNING " in ln and "store error" in ln]
    assert len(warnings) == 1, log  # one line for the event, retries at debug level
    assert "uploads succeed again" in log
    assert "secret-plan-7" not in log  # no plaintext names in the log


@needs_fuse
def test_debug_option_traces_requests(tmp_path: Path) -> None:
    """``-o debug``: one line per FUSE request and per store request; file content
    never, file names only there."""
    m = new_mount(tmp_path, options=["debug"])
    with serving(m):
        (m.path / "traced.txt").write_bytes(b"PLAINTEXT-CONTENT-42")
        subprocess.run([*MEGAFS, "status", str(m.path), "--wait-idle"], check=True, timeout=60)
    log = m.log_text()
    assert re.search(r"DEBUG megafs.fuse_ops: create\(parent_inode=1, name=b'traced.txt'", log)
    assert re.search(r"write\(fh=\d+, off=0, buf=<20 bytes>\) -> ok", log), log
    assert re.search(r"DEBUG megafs.stores.tracked: store put d/\w+ \(\d+ bytes\): ok", log)
    assert "PLAINTEXT-CONTENT-42" not in log
    info = [ln for ln in log.splitlines() if " DEBUG " not in ln]
    assert not [ln for ln in info if "traced.txt" in ln], info


@needs_fuse
def test_status_of_a_mega_mount(emulator: EmulatorProcess, tmp_path: Path) -> None:
    """The same document for a MEGA account: files are its uploads, every folder is in
    memory, no lease; an upload MEGA refuses is the last error, with its time."""
    m = Mount(
        "mega://alice@example.com",
        tmp_path / "mnt",
        tmp_path / "cache",
        tmp_path / "megafs.log",
        passphrase="alice-Passw0rd",
        env={"MEGAFS_MEGA_API_URL": emulator.url},
    )
    with serving(m):
        (m.path / "folder" / "sub").mkdir(parents=True)
        write_files(m.path, {"folder/a.bin": 3 * MiB})
        wait_for(lambda: status(m)["pending_files"] == 0, "the upload")
        st = json.loads(cli_status(m, "--json"))
        assert st["drive"] == "mega"
        assert st["uploaded_bytes"] >= 3 * MiB and st["upload_rate"] > 0
        assert st["pending_bytes"] == st["pending_objects"] == 0
        assert st["dir_objects_cached"] >= 3  # the drive's root, folder, folder/sub
        assert 0 < st["rss_bytes"] <= st["peak_rss_bytes"], st
        assert st["lease"] is None and st["lease_state"] == "n/a"
        assert st["last_error"] is None and st["last_error_time"] is None
        human = cli_status(m)
        assert re.search(r"\nlease: +n/a \(MEGA accounts have no lease\)\n", human), human
        assert re.search(r"\nfolders in memory: +\d+\n", human), human

        # Over quota until cleared: a one-shot fault races the upload's retry (10 s
        # later, or sooner on a loaded machine) against the status reads below.
        emulator.fault("cs:u", "command_error", code=-17, count=-1)
        before = time.time()
        write_files(m.path, {"folder/b.bin": 100 * 1024})
        wait_for(lambda: status(m)["last_error"] is not None, "the refused upload")
        st = status(m)
        assert "quota" in st["last_error"], st
        assert before <= st["last_error_time"] <= time.time()
        assert st["pending_files"] == 1 and st["store_errors"] >= 1
        assert "over quota" in cli_status(m)
        emulator.clear_faults()
        # At unmount the file is uploaded after all (the next retry is accepted).


# ------------------------------------------------------------------ progress


def _backlog(m: Mount) -> None:
    """About 3 s of uploads at the mount's 4 MiB/s."""
    write_files(m.path, {f"u/f{i}.bin": 4 * MiB for i in range(3)})
    wait_for(lambda: status(m)["pending_bytes"] >= 8 * MiB, "staged uploads")


@needs_fuse
@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "piped"])
def test_umount_progress(tmp_path: Path, terminal: bool) -> None:
    """``megafs umount`` waits for the uploads: with a bar on a terminal, silently
    otherwise."""
    m = new_mount(tmp_path, options=["store_bandwidth=4M"])
    with serving(m):
        assert m.proc is not None
        _backlog(m)
        start = time.monotonic()
        cmd = [*MEGAFS, "umount", str(m.path)]
        if terminal:
            code, err, out = run_on_terminal(cmd)
        else:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            code, err, out = res.returncode, res.stderr, res.stdout
        assert code == 0, err
        assert time.monotonic() - start > 1.0  # it did wait for the uploads
        assert m.proc.wait(timeout=30) == 0
    assert "everything committed" in m.log_text()
    assert out == ""  # progress goes to standard error only
    if not terminal:
        assert err == ""
        return
    assert "\r\x1b[K" in err  # redrawn in place
    assert re.search(r"uploading \d+\.\d MiB, [23] files, [\d.]+ [KM]iB/s \[#*-*\] +\d+%", err)
    assert "all changes are on the store" in err


@needs_fuse
def test_fsck_and_gc_progress(tmp_path: Path) -> None:
    """Bars on a terminal (over the 20 chunk objects the store holds, 5 of them
    garbage), none without one; the summaries go to standard output either way."""
    m = new_mount(tmp_path)
    with serving(m):
        write_files(m.path, {f"d{i}/f{j}.bin": 64 * 1024 for i in range(4) for j in range(5)})
        subprocess.run([*MEGAFS, "status", str(m.path), "--wait-idle"], check=True, timeout=60)
        for j in range(5):
            (m.path / f"d3/f{j}.bin").unlink()  # their chunks stay behind: garbage
    store = str(m.store)

    code, term, out = run_on_terminal([*MEGAFS, "fsck", store])
    assert code == 0, term
    assert "\r\x1b[K" in term
    assert re.search(r"checking: \d+ dirs, \d+ files, \d+/20 chunks, .* \[#*-*\] +\d+%", term)
    assert "15 files, 15 chunks" in out and "0 problem(s)" in out
    assert "checking:" not in out

    assert "0 problem(s)" in run_piped("fsck", store)
    assert "kept 5 unreferenced chunks younger" in run_piped("gc", store, "--dry-run")

    code, term, out = run_on_terminal([*MEGAFS, "gc", store, "--grace", "0"])
    assert code == 0, term
    assert re.search(r"scanning: \d+ dirs, \d+ files, \d+/20 chunks", term), term
    assert re.search(r"deleting unreferenced chunks: 5/5 \[#{20}\] 100%", term), term
    assert "deleted 5 unreferenced chunks" in out and "\r" not in out


@needs_fuse
def test_uploads_wait_for_a_pause_and_wait_idle_starts_them(tmp_path: Path) -> None:
    """``-o upload_delay=``: nothing is uploaded while writes have not paused that long;
    ``megafs status --wait-idle`` starts the uploads at once and returns when done."""
    m = new_mount(tmp_path, options=["upload_delay=600"])
    with serving(m):
        (m.path / "later.bin").write_bytes(os.urandom(300_000))
        os.sync()  # (not an fsync of the file: staged by the next commit)
        deadline = time.monotonic() + 20
        while status(m)["dirty_files"] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)
        st = status(m)
        assert st["pending_objects"] >= 2, st  # its chunk and the root directory
        assert st["uploaded_bytes"] == 0, st
        t0 = time.monotonic()
        subprocess.run([*MEGAFS, "status", str(m.path), "--wait-idle"], check=True, timeout=60)
        assert time.monotonic() - t0 < 30  # not the 600 s upload_delay
        st = status(m)
        assert st["pending_objects"] == 0 and st["uploaded_bytes"] > 300_000, st
