"""Mounting a MEGA account: ``megafs mount mega://EMAIL MOUNTPOINT``.

Open the account (:func:`megafs.mega.stack.open_mega_stack`, shared with the SDK: log
in or resume the sealed cached session, fetch the node tree once; local state in
``cache_dir/mega-<id>/``), mount, and serve until unmounted; at unmount, upload what
is still staged. The MEGA password comes the way a volume passphrase does
(``MEGAFS_PASSPHRASE``, ``passphrase_file=``, a systemd credential or a prompt).

Task ownership: the nursery in :func:`serve_mega` owns the vfs's background task
(events, read-ahead, retries), the signal watcher and pyfuse3's workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from megafs import fuse_loop, memory, sdnotify
from megafs.config import MountOptions
from megafs.control import MountError, mounted_at
from megafs.errors import MegafsError
from megafs.kernel_cache import invalidate
from megafs.mega.api import MegaApi
from megafs.mega.fs import MegaVfs, public_link
from megafs.mega.session import load_session, logout
from megafs.mega.stack import (
    SCHEME,
    MegaUrlError,
    connect,
    fetch_tree,
    local_dir,
    open_mega_stack,
    parse_mega_url,
)
from megafs.mount import (
    _on_signal,
    _raise_read_ahead,
    check_mountpoint,
    report_status,
)
from megafs.stack import lock_local_state
from megafs.stats import hit_rate

log = logging.getLogger(__name__)


async def link_for_path(url: str, password: str, opts: MountOptions) -> str:
    """``megafs link mega://EMAIL/path``: the public link of a file, unmounted."""
    email, path = parse_mega_url(url)
    api = MegaApi()
    api, session = await connect(email, password, local_dir(opts, api, email), api=api)
    try:
        tree, _ = await fetch_tree(api, session)
        handle = tree.root()
        for part in filter(None, path.split("/")):
            child = tree.listing(handle).get(part.encode())
            if child is None:
                raise MegaUrlError(f"{url}: no such file in the account")
            handle = child
        return await public_link(api, tree.nodes[handle])
    finally:
        await api.aclose()


async def logout_account(url: str, password: str, opts: MountOptions) -> bool:
    """``megafs logout mega://EMAIL``: end the cached session on the server (``sml``) and
    delete it, so the next mount logs in again. False if there was no cached session.
    Refused while the account is mounted (the mount would log in again at once)."""
    email, _ = parse_mega_url(url)
    api = MegaApi()
    local = local_dir(opts, api, email)
    path = local / "session"
    try:
        if not path.exists():
            return False
        lock = lock_local_state(local)
        try:
            cached = await trio.to_thread.run_sync(load_session, path, email, password)
            if cached is not None:
                api.sid = cached.sid
                await logout(api)
            path.unlink(missing_ok=True)
        finally:
            os.close(lock)
        return cached is not None
    finally:
        await api.aclose()


async def serve_mega(
    url: str,
    mountpoint: Path,
    passphrase: bytes,
    opts: MountOptions,
    ready: Callable[[MegafsError | None], None],
    ops_factory: Callable[[MegaVfs, Callable[[], dict[str, object]]], Any],
) -> None:
    """Like :func:`megafs.mount.serve`, for a MEGA account (``mountpoint`` resolved)."""
    api: MegaApi | None = None
    try:
        check_mountpoint(mountpoint)
        parse_mega_url(url)
        password = passphrase.decode("utf-8")
        stack = await open_mega_stack(url, password, opts)
        api, email, tree, cache, vfs = stack.api, stack.email, stack.tree, stack.cache, stack.vfs
        lock = stack.lock
        vfs.invalidate = invalidate

        def status() -> dict[str, object]:
            """The same document as a volume mount's (megafs.mount._StatusView): a file
            is one upload here, so files and objects pending are the same count; the
            whole node tree is in memory, so every folder counts as a cached directory;
            MEGA has no lease. The last error is the last failed upload's."""
            dirty = vfs.dirty_file_count()
            errors = vfs.upload_errors
            return {
                "pid": os.getpid(),
                "drive": "mega",
                "account": "mega",
                "read_only": vfs.read_only,
                "nodes": len(tree.nodes),
                "undecryptable_nodes": tree.undecryptable,
                "dirty_files": dirty,
                "pending_objects": dirty,
                "pending_files": dirty,
                "blocked": vfs.upload_blocked(),
                "pending_bytes": vfs.pending_bytes(),
                "uploaded_bytes": vfs.uploaded_bytes,
                "upload_rate": vfs.upload_rate.rate(),
                "upload_rate_window": vfs.upload_rate.window,
                "cache_bytes": cache.bytes,
                "cache_max_bytes": cache.max_bytes,
                "cache_hits": cache.hits,
                "cache_misses": cache.misses,
                "cache_hit_rate": hit_rate(cache.hits, cache.misses),
                "dir_objects_cached": vfs.folder_count(),
                "fuse_requests": fuse_loop.requests_taken(),
                **memory.status_fields(),
                "last_error": errors.last,
                "last_error_time": errors.time,
                "last_error_recovered": errors.recovered,
                "store_errors": errors.count,
                "errors": vfs.errors + vfs.reader.errors,
                "lease": None,
                "lease_state": "n/a",
                "lease_taken_by": None,
            }

        pyfuse3.init(ops_factory(vfs, status), str(mountpoint), opts.fuse_options(SCHEME + email))
    except UnicodeDecodeError:
        err = MegafsError("the MEGA password is not valid UTF-8")
        ready(err)
        if api is not None:
            await api.aclose()
        raise err from None
    except MegafsError as exc:
        ready(exc)
        if api is not None:
            await api.aclose()
        raise
    except RuntimeError as exc:
        err2 = MountError(f"cannot mount at {mountpoint}: {exc}")
        ready(err2)
        if api is not None:
            await api.aclose()
        raise err2 from None
    log.info("mounted a MEGA account (%d nodes) at %s", len(tree.nodes), mountpoint)
    ready(None)
    try:
        async with trio.open_nursery() as n:
            await n.start(vfs.run)
            n.start_soon(_raise_read_ahead, mountpoint)
            n.start_soon(_on_signal, fuse_loop.terminate)
            if sdnotify.enabled():  # systemd Type=notify: STATUS= with the backlog
                n.start_soon(report_status, status)
            await fuse_loop.main(max_tasks=64)
            n.cancel_scope.cancel()
    finally:
        sdnotify.notify("STOPPING=1")
        try:
            pyfuse3.close(unmount=mounted_at(mountpoint, resolved=True))
        except Exception:
            log.exception("closing the FUSE session")
        with trio.CancelScope(shield=True):
            await vfs.close()
            await api.aclose()
        os.close(lock)
    log.info("unmounted %s", mountpoint)
