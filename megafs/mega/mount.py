"""Mounting a MEGA account: ``megafs mount mega://EMAIL MOUNTPOINT``.

Log in (or resume the sealed cached session, so remounts do not log in again),
fetch the node tree once, mount, and serve until unmounted; at unmount, upload
what is still staged. The MEGA password comes the way a volume passphrase does
(``MEGAFS_PASSPHRASE``, ``passphrase_file=``, a systemd credential or a prompt).

Local state lives in ``cache_dir/mega-<id>/`` (id: a hash of the API URL and the
e-mail address, never the address itself): ``session`` (sealed), ``blocks/`` (the
sealed block cache) and ``staging/`` (files waiting for upload, sealed).

Task ownership: the nursery in :func:`serve_mega` owns the vfs's background task
(events, read-ahead, retries), the signal watcher and pyfuse3's workers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from megafs.config import MountOptions
from megafs.errors import MegafsError
from megafs.mega.api import MegaApi
from megafs.mega.errors import MegaError
from megafs.mega.fs import MegaVfs, public_link
from megafs.mega.session import (
    Session,
    load_session,
    login,
    logout,
    open_session,
    save_session,
)
from megafs.mega.tree import Tree
from megafs.mount import (
    MountError,
    _on_signal,
    _raise_read_ahead,
    check_mountpoint,
    mounted_at,
)
from megafs.stack import lock_local_state
from megafs.stats import hit_rate
from megafs.vfs.blockcache import BlockCache

log = logging.getLogger(__name__)

SCHEME = "mega://"


class MegaUrlError(MegafsError):
    """A ``mega://`` address that names no account."""


def parse_mega_url(url: str) -> tuple[str, str]:
    """``mega://EMAIL[/path]`` -> (lower-cased e-mail, path inside the drive)."""
    rest = url[len(SCHEME) :] if url.startswith(SCHEME) else url
    email, _, path = rest.partition("/")
    if "@" not in email or not email.strip():
        raise MegaUrlError(f"{url}: expected mega://EMAIL")
    return email.strip().lower(), path.strip("/")


def local_dir(opts: MountOptions, api: MegaApi, email: str) -> Path:
    ident = hashlib.sha256(f"{api.base_url}\n{email}".encode()).hexdigest()[:24]
    return opts.cache_dir / f"mega-{ident}"


async def connect(
    email: str, password: str, state: Path, *, api: MegaApi | None = None
) -> tuple[MegaApi, Session]:
    """An API client with a live session (cached session resumed when possible)."""
    api = api or MegaApi()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        session = await open_session(api, email, password, state / "session")
    except BaseException:
        await api.aclose()
        raise
    return api, session


async def fetch_tree(api: MegaApi, session: Session) -> tuple[Tree, str]:
    reply = await api.call({"a": "f", "c": 1, "r": 1})
    if not isinstance(reply, dict) or not isinstance(reply.get("f"), list):
        raise MegaError(detail="unexpected reply to f", command="f")
    tree = Tree(session.user_handle, session.master_key)
    tree.load(n for n in reply["f"] if isinstance(n, dict))
    return tree, str(reply.get("sn", ""))


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


def _renewer(
    api: MegaApi, session: Session, email: str, password: str, cache: Path
) -> Callable[[], Awaitable[None]]:
    """What the mount does when its session expires (ESID): log in again with the
    password it was mounted with, and cache the new session for the next mount."""

    async def renew() -> None:
        new = await login(api, email, password)
        if new.user_handle != session.user_handle or new.master_key != session.master_key:
            api.sid = None
            raise MegaError(detail="logging in again gave another account", command="us")
        try:
            await trio.to_thread.run_sync(lambda: save_session(cache, new, password))
        except OSError as exc:
            log.warning("could not write the MEGA session cache: %s", exc)

    return renew


def _cache_key(master_key: bytes) -> bytes:
    return hmac.new(master_key, b"megafs/mega/v1/block-cache", hashlib.sha256).digest()


async def serve_mega(
    url: str,
    mountpoint: Path,
    passphrase: bytes,
    opts: MountOptions,
    ready: Callable[[MegafsError | None], None],
    ops_factory: Callable[[MegaVfs, Callable[[], dict[str, object]]], Any],
) -> None:
    """Like :func:`megafs.mount.serve`, for a MEGA account."""
    api: MegaApi | None = None
    try:
        check_mountpoint(mountpoint)
        email, _ = parse_mega_url(url)
        password = passphrase.decode("utf-8")
        api = MegaApi()
        local = local_dir(opts, api, email)
        lock = lock_local_state(local)
        api, session = await connect(email, password, local, api=api)
        api.renew_session = _renewer(api, session, email, password, local / "session")
        tree, sn = await fetch_tree(api, session)
        cache = BlockCache(
            local / "blocks",
            _cache_key(session.master_key),
            session.user_handle.encode(),
            max_bytes=opts.cache_max_bytes(local),
        )
        vfs = MegaVfs(
            api,
            tree,
            cache=cache,
            staging_dir=local / "staging",
            sn=sn,
            root=opts.mega_root,
            read_only=opts.read_only,
            permanent_delete=opts.mega_delete_permanent,
            fsync_remote=opts.fsync_remote,
        )
        await vfs.refresh_quota()

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
            n.start_soon(_on_signal, pyfuse3.terminate)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            n.cancel_scope.cancel()
    finally:
        try:
            pyfuse3.close(unmount=mounted_at(mountpoint))
        except Exception:
            log.exception("closing the FUSE session")
        with trio.CancelScope(shield=True):
            await vfs.close()
            await api.aclose()
        os.close(lock)
    log.info("unmounted %s", mountpoint)
