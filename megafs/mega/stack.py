"""Opening a MEGA account for use: what a MEGA mount and an SDK session both run on.

:func:`open_mega_stack` does, in order: parse ``mega://EMAIL``, lock the account's local
state, log in (or resume the sealed cached session, so reopening does not log in
again), fetch the node tree once, open the block cache, build the
:class:`~megafs.mega.fs.MegaVfs` and ask for the quota. What runs it afterwards (the
FUSE session in :mod:`megafs.mega.mount`, a program through :mod:`megafs.sdk`) owns the
vfs's background task (``vfs.run``: remote changes, read-ahead, upload workers and
retries), the final upload (``vfs.close``) and closing the API client and the lock.

Local state lives in ``cache_dir/mega-<id>/`` (id: a hash of the API URL and the
e-mail address, never the address itself): ``lock`` (held by the one process that may
upload the staging area), ``session`` (sealed), ``blocks/`` (the sealed block cache)
and ``staging/`` (files waiting for upload, sealed).

Nothing here imports pyfuse3: programs use the SDK without FUSE.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from megafs.config import MountOptions
from megafs.errors import MegafsError
from megafs.mega.api import MegaApi
from megafs.mega.errors import MegaError
from megafs.mega.fs import MegaVfs
from megafs.mega.session import Session, login, open_session, save_session
from megafs.mega.tree import Tree
from megafs.stack import lock_local_state
from megafs.vfs.blockcache import BlockCache

log = logging.getLogger(__name__)

SCHEME: Final = "mega://"


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
    """The account's local state directory (see the module docstring)."""
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
    """The account's whole node tree, and the event sequence number it is current at."""
    reply = await api.call({"a": "f", "c": 1, "r": 1})
    if not isinstance(reply, dict) or not isinstance(reply.get("f"), list):
        raise MegaError(detail="unexpected reply to f", command="f")
    tree = Tree(session.user_handle, session.master_key)
    tree.load(n for n in reply["f"] if isinstance(n, dict))
    return tree, str(reply.get("sn", ""))


def _renewer(
    api: MegaApi, session: Session, email: str, password: str, cache: Path
) -> Callable[[], Awaitable[None]]:
    """What an opened account does when its session expires (ESID): log in again with
    the password it was opened with, and cache the new session for the next opening."""

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


@dataclass
class MegaStack:
    """An opened MEGA account and everything that was set up for it (see the module
    docstring)."""

    email: str
    api: MegaApi
    session: Session
    tree: Tree
    cache: BlockCache
    vfs: MegaVfs
    lock: int


async def open_mega_stack(url: str, password: str, opts: MountOptions) -> MegaStack:
    """Open the MEGA account ``mega://EMAIL`` with ``password``, as ``opts`` say
    (``cache_dir``, ``read_only``, ``mega_root``, ``mega_delete_permanent``,
    ``fsync_remote``, the cache size). Raises
    :class:`~megafs.stack.OpenError` when another process has the account's local
    state open (a mount, or a program). On failure, whatever was taken is given back."""
    email, _ = parse_mega_url(url)
    api = MegaApi()
    local = local_dir(opts, api, email)
    try:
        lock = lock_local_state(local)
    except BaseException:
        await api.aclose()
        raise
    try:
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
    except BaseException:
        with trio.CancelScope(shield=True):
            await api.aclose()
        os.close(lock)
        raise
    return MegaStack(email, api, session, tree, cache, vfs, lock)
