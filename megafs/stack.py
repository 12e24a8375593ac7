"""Opening a volume for use: the stack a mount and an SDK session both run on.

:func:`open_stack` does, in order: open the store (slowed down for benchmarks when
asked), unlock the volume (passphrase or key file), lock the volume's local state
(read-write only), take the single-writer lease (read-write only), open the block
cache and the staging area (read-write only), and build and start the
:class:`~megafs.vfs.fs.Vfs` (the root directory is loaded). What runs it afterwards
(the FUSE session in :mod:`megafs.mount`, a program through :mod:`megafs.sdk`) owns
the background tasks: ``staging.run_uploader``, ``lease.run``, ``vfs.run_committer``
and ``vfs.run_refresher``, and the final flush, drain and release.

Local state lives in ``opts.cache_dir / VOLUME_ID``: ``lock`` (held by the one
process that may replay the staging area), ``blocks/`` (the sealed block cache) and
``staging/`` (sealed changes not yet uploaded). A read-only opening takes neither the
lock nor the lease and has no staging area, so it is always allowed.

Nothing here imports pyfuse3: programs use the SDK without FUSE.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from megafs.config import MountOptions
from megafs.control import OpenError
from megafs.stores import LocalStore, ObjectStore, open_store
from megafs.stores.staging import StagingStore, upload_concurrency
from megafs.testing.slow import SlowStore
from megafs.vfs.chunkcache import ChunkCache
from megafs.vfs.fs import Vfs
from megafs.volume.drive import Volume
from megafs.volume.lease import Lease
from megafs.volume.maintenance import Secret, unlock


def space_of(store: object) -> Callable[[], tuple[int, int]] | None:
    """``(total, free)`` bytes of a local store's disk, for statfs; None elsewhere."""
    if isinstance(store, LocalStore):
        root = store.root

        def space() -> tuple[int, int]:
            try:
                s = os.statvfs(root)
            except OSError:
                return (1 << 50, 1 << 50)
            return s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize

        return space
    return None


def lock_local_state(local: Path) -> int:
    """Lock the volume's local state (staging area, block cache) for this process,
    or raise :class:`OpenError` if another process holds it: two processes must never
    replay one staging area. After an unmount the old daemon keeps the lock while it
    uploads what is still staged. Returns the lock's fd; the lock goes with it (or
    with the process, however it ends)."""
    local.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(local / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise OpenError(
            f"this volume's local state in {local} is in use by megafs process {holder} "
            "(mounted elsewhere, or still uploading after an unmount); wait for it to "
            "exit, or stop it: what it has not uploaded, the next mount uploads"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def is_barrier(key: str) -> bool:
    """Content chunks may be uploaded in any order; everything else is ordered."""
    return not key.startswith("c/")


@dataclass
class VolumeStack:
    """An opened volume and everything that was set up for it (see the module
    docstring). ``store`` is the store as opened; ``volume.store`` is the staging
    area in front of it when there is one."""

    store: ObjectStore
    volume: Volume
    vfs: Vfs
    cache: ChunkCache
    staging: StagingStore | None
    lease: Lease | None
    lock: int | None


async def open_stack(store_url: str, secret: Secret, opts: MountOptions) -> VolumeStack:
    """Open the volume at ``store_url`` as ``opts`` say (``read_only``, ``cache_dir``,
    sizes, intervals). Raises :class:`~megafs.volume.lease.LeaseHeld` when another
    read-write user holds the volume. On failure, whatever was taken is given back."""
    store = open_store(store_url)
    uploads = upload_concurrency(store)  # (asked before the store is wrapped)
    if isinstance(store, LocalStore) and not store.root.is_dir():
        raise OpenError(f"store {store_url} does not exist")
    if opts.store_latency or opts.store_bandwidth:
        store = SlowStore(store, latency=opts.store_latency, bandwidth=opts.store_bandwidth)
    lock: int | None = None
    lease: Lease | None = None
    try:
        volume = await unlock(store, secret, state_root=opts.cache_dir, read_only=opts.read_only)
        local = opts.cache_dir / volume.volume_id.hex()
        if not opts.read_only:
            lock = lock_local_state(local)
            lease = Lease(store, volume.keys)
            await lease.acquire()
        if (local / "blocks").is_dir():  # the cache of earlier versions (a file per block)
            await trio.to_thread.run_sync(
                functools.partial(shutil.rmtree, local / "blocks", ignore_errors=True)
            )
        cache = ChunkCache(
            local / "chunks",
            volume.keys.cache,
            volume.open_blocks,
            max_bytes=opts.cache_max_bytes(local),
        )
        staging = None
        if not opts.read_only:
            staging = StagingStore(
                store,
                local / "staging",
                is_barrier=is_barrier,
                max_pending_bytes=opts.staging_max_bytes(local),
                concurrency=uploads,
                on_full=cache.make_room,  # staged changes come before cached copies
                adopter=cache,  # uploaded chunks stay cached: no copy made
                upload_quiet=opts.upload_delay,
            )
            volume.store = staging
        vfs = Vfs(
            volume,
            read_only=opts.read_only,
            commit_interval=opts.commit_interval,
            space=space_of(store),
            block_cache=cache,
            writeback=staging,
            fsync_remote=opts.fsync_remote,
            dir_cache_time=opts.dir_cache_time,
        )
        vfs.evict_min_nodes = opts.inode_cache
        await vfs.start()
    except BaseException:
        with trio.CancelScope(shield=True):
            if lease is not None and lease.etag is not None:
                await lease.release()
            await store.aclose()
        if lock is not None:
            os.close(lock)
        raise
    return VolumeStack(store, volume, vfs, cache, staging, lease, lock)
