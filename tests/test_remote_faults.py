"""A real megafs mount on a remote store that misbehaves: S3 (``juicefs gateway``) and
WebDAV (``rclone serve webdav``), each behind the loopback fault-injection proxy
(:mod:`megafs.testing.faultproxy`), with the mount's store URL pointing at the proxy.

* ``test_tree_survives_faults``: a tree (small files, multi-MiB files, one spanning
  several chunks) is written while the proxy answers 500/503/SlowDown bursts, resets
  connections, cuts response bodies short and adds latency; ``megafs umount`` waits for
  the uploads; a remount with an empty cache reads everything back through the same
  faults, byte for byte.
* ``test_store_outage``: both stores go away for 30 s at once (the proxies refuse every
  connection): cached reads and metadata keep working, writes are accepted into the
  staging area, ``megafs status --json`` shows the backlog and the last error; when the
  stores come back the uploads resume by themselves, and a remount reads it all back.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from megafs.format.chunks import CHUNK_SIZE
from megafs.stores.base import ObjectStore
from megafs.stores.webdav import WebDavStore
from megafs.testing.faultproxy import (
    Fault,
    FaultProxy,
    drop_mid_body,
    latency,
    reset,
    slow_down,
    status,
    truncate,
)
from megafs.testing.s3server import S3Server
from megafs.testing.webdavserver import WebDavServer, rclone_webdav
from megafs.volume.drive import Volume
from tests.conftest import MEGAFS, PASSPHRASE, TEST_KDF, Mount, cold_read, fuse_available

pytestmark = pytest.mark.skipif(not fuse_available, reason="/dev/fuse is not usable here")

MiB = 1 << 20
OUTAGE = 30.0  # seconds without a store (the issue asks for 30)
KINDS = ("s3", "webdav")

_names = itertools.count()


# -- the servers and volumes on them ---------------------------------------------------


@pytest.fixture(scope="module")
def dav(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDavServer]:
    if shutil.which("rclone") is None:
        pytest.skip("rclone is not installed")
    with rclone_webdav(root=tmp_path_factory.mktemp("davserver")) as server:
        yield server


@dataclass
class Remote:
    """A fresh volume on one real server, and how to reach it through a proxy."""

    kind: str
    upstream: str  # http://127.0.0.1:PORT of the server itself
    name: str  # the volume's S3 prefix or WebDAV folder
    credentials: dict[str, str]  # environment variables
    bucket: str = ""

    def url(self, proxy: FaultProxy) -> str:
        """The STORE URL of the volume, through ``proxy``."""
        if self.kind == "s3":
            return f"s3://{self.bucket}/{self.name}"
        return f"webdav+{proxy.url}/{self.name}"

    def env(self, proxy: FaultProxy) -> dict[str, str]:
        if self.kind == "s3":
            return {**self.credentials, "MEGAFS_S3_ENDPOINT": proxy.url}
        return dict(self.credentials)


def make_remote(request: pytest.FixtureRequest, kind: str) -> Remote:
    """A new, empty volume on the ``kind`` server (created directly, not through a proxy)."""
    name = f"vol{next(_names)}"
    store: ObjectStore
    if kind == "s3":
        s3: S3Server = request.getfixturevalue("s3")
        store = s3.store(name)
        remote = Remote(kind, s3.endpoint, name, s3.env(), s3.bucket)
    else:
        dav: WebDavServer = request.getfixturevalue("dav")
        (dav.root / name).mkdir()
        base = dav.url.removeprefix("webdav+")
        store = WebDavStore(base + name, auth=httpx.BasicAuth(dav.user, dav.password))
        remote = Remote(kind, base.rstrip("/"), name, dict(dav.env))

    async def create() -> None:
        try:
            await Volume.create(store, PASSPHRASE.encode(), kdf_params=TEST_KDF)
        finally:
            await store.aclose()

    trio.run(create)
    return remote


# -- trees -------------------------------------------------------------------------------


def make_tree(seed: int, top: str = "") -> dict[str, bytes]:
    """Small files in nested directories, an empty one, and multi-MiB files; one spans
    three chunks (the last one partial)."""
    rnd = random.Random(seed)
    tree = {
        f"{top}d{i % 3}/s{i % 2}/small{i:02d}": rnd.randbytes(rnd.randrange(1, 40_000))
        for i in range(24)
    }
    tree[f"{top}empty"] = b""
    tree[f"{top}big/three-mib"] = rnd.randbytes(3 * MiB + 17)
    tree[f"{top}big/chunks"] = rnd.randbytes(2 * CHUNK_SIZE + MiB + 5)
    return tree


def write_tree(root: Path, tree: dict[str, bytes]) -> None:
    for name, data in tree.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def check_tree(root: Path, tree: dict[str, bytes]) -> None:
    """The mount holds exactly ``tree`` (files, and the directories they imply)."""
    files, dirs = set(), set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirs.update(str(rel / d) for d in dirnames)
        files.update(str(rel / f) for f in filenames)
    assert files == set(tree)
    assert dirs == {str(p) for name in tree for p in Path(name).parents if str(p) != "."}
    for name, data in tree.items():
        got = cold_read(root / name)
        assert len(got) == len(data), name
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), name


# -- the mount ---------------------------------------------------------------------------


def new_mount(remote: Remote, proxy: FaultProxy, tmp: Path, label: str) -> Mount:
    return Mount(
        remote.url(proxy),
        tmp / f"{label}-mnt",
        tmp / f"{label}-cache",  # a fresh, empty cache for every mount
        tmp / f"{label}.log",
        env=remote.env(proxy),
    )


@contextlib.contextmanager
def mounted(m: Mount) -> Iterator[Mount]:
    """Run ``m`` for the block, which must end with :func:`umount`; stopped anyway."""
    m.start(timeout=60)
    try:
        yield m
    finally:
        m.stop()  # a no-op after umount()
    bad = [ln for ln in m.log_text().splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert not bad, f"errors in the megafs log ({m.log}):\n" + "\n".join(bad)


def umount(m: Mount, timeout: float = 120) -> None:
    """``megafs umount``: returns once every upload is on the store; the daemon exits 0."""
    assert m.proc is not None
    res = subprocess.run(
        [*MEGAFS, "umount", str(m.path)], capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stderr
    assert m.proc.wait(timeout=30) == 0, m.log_text()
    m.proc = None
    assert "everything committed" in m.log_text().splitlines()[-1], m.log_text()


def megafs_status(m: Mount) -> dict[str, Any]:
    res = subprocess.run(
        [*MEGAFS, "status", "--json", str(m.path)], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def wait_for(what: str, cond: Callable[[], bool], timeout: float) -> None:
    """Poll ``cond`` until it holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


# -- faults while writing and reading a tree ---------------------------------------------


def add_faults(proxy: FaultProxy, kind: str) -> list[Fault]:
    """Every kind of fault: bursts that must fire (a burst counts every request it
    matches, also one that another burst answered), and random ones."""
    throttle = slow_down if kind == "s3" else partial(status, 429)
    bursts = [
        proxy.add(status(500, count=3)),  # the very first requests
        proxy.add(status(503, method="GET", count=3)),
        proxy.add(throttle(method="PUT", count=4)),
        proxy.add(reset(count=2)),
    ]
    proxy.add(latency(0.002))
    proxy.add(status(500, probability=0.03))
    proxy.add(status(503, probability=0.03))
    proxy.add(throttle(probability=0.02))
    proxy.add(reset(probability=0.02))
    # Bodies cut short: GET answers are the ones that carry data.
    proxy.add(drop_mid_body(2000, method="GET", probability=0.08))
    proxy.add(truncate(method="GET", probability=0.08))
    return bursts


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", KINDS)
def test_tree_survives_faults(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> None:
    remote = make_remote(request, kind)
    tree = make_tree(1)
    with FaultProxy.start(remote.upstream, seed=11) as proxy:
        bursts = add_faults(proxy, kind)
        with mounted(new_mount(remote, proxy, tmp_path, "write")) as m:
            write_tree(m.path, tree)
            umount(m)
        assert all(f.count == 0 for f in bursts), bursts

        proxy.clear()
        bursts = add_faults(proxy, kind)
        # Reads of chunk data (sub-block ranges) cut short, for sure.
        bursts.append(proxy.add(drop_mid_body(2000, method="GET", path="/c/", count=2)))
        bursts.append(proxy.add(truncate(method="GET", path="/c/", count=2)))
        with mounted(new_mount(remote, proxy, tmp_path, "read")) as m:
            check_tree(m.path, tree)
            umount(m)
        assert all(f.count == 0 for f in bursts), bursts


# -- the store goes away for 30 s ----------------------------------------------------------


@dataclass
class Live:
    """One mount on one store type, through its own proxy, and what it should hold."""

    kind: str
    remote: Remote
    proxy: FaultProxy
    mount: Mount
    tree: dict[str, bytes]


def idle(m: Mount) -> bool:
    st = megafs_status(m)
    return not st["pending_objects"] and not st["dirty_files"]


@pytest.mark.timeout(300)
def test_store_outage(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Both store types at once, so that one 30 s outage covers both."""
    with contextlib.ExitStack() as stack:
        lives = []
        for i, kind in enumerate(KINDS):
            remote = make_remote(request, kind)
            proxy = stack.enter_context(FaultProxy.start(remote.upstream, seed=i))
            proxy.add(latency(0.002))
            m = stack.enter_context(mounted(new_mount(remote, proxy, tmp_path, f"{kind}-1")))
            stack.callback(proxy.up)  # if the test fails while the store is away
            live = Live(kind, remote, proxy, m, make_tree(10 + i, "old/"))
            write_tree(m.path, live.tree)
            lives.append(live)
        for live in lives:
            wait_for(f"{live.kind}: uploads", partial(idle, live.mount), 60)
            check_tree(live.mount.path, live.tree)  # now in the block cache too

        for live in lives:
            live.proxy.down()
        down = time.monotonic()
        for live in lives:
            root, tree = live.mount.path, live.tree
            start = time.monotonic()
            check_tree(root, tree)  # cached data and metadata, no store needed
            (root / "old/d0/s0/small00").rename(root / "old/renamed")
            tree["old/renamed"] = tree.pop("old/d0/s0/small00")
            (root / "old/d1/s1/small01").unlink()
            del tree["old/d1/s1/small01"]
            new = make_tree(20, "new/")
            write_tree(root, new)  # accepted into the staging area
            tree.update(new)
            check_tree(root, tree)
            assert time.monotonic() - start < 20, "the mount stalled without its store"
        for live in lives:
            seen: list[dict[str, Any]] = []

            def backlog(m: Mount, seen: list[dict[str, Any]]) -> bool:
                seen.append(st := megafs_status(m))
                return bool(st["pending_objects"] and st["pending_bytes"] and st["last_error"])

            wait_for(f"{live.kind}: status shows the backlog and an error",
                     partial(backlog, live.mount, seen), 20)  # fmt: skip
            assert seen[-1]["pending_bytes"] > 2 * CHUNK_SIZE, seen[-1]
        time.sleep(max(0.0, down + OUTAGE - time.monotonic()))
        for live in lives:
            assert live.mount.proc is not None and live.mount.proc.poll() is None
            assert megafs_status(live.mount)["pending_objects"], "uploaded without a store?"
            live.proxy.up()
        for live in lives:
            wait_for(f"{live.kind}: uploads resume", partial(idle, live.mount), 30)
            umount(live.mount)

        for live in lives:
            with mounted(new_mount(live.remote, live.proxy, tmp_path, f"{live.kind}-2")) as m:
                check_tree(m.path, live.tree)
                umount(m)
