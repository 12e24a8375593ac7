"""Opening a drive for a program: :func:`open_drive`.

A drive is open for the body of an ``async with``: its background work runs in a
nursery that the context manager owns, as a mount's does in the daemon (see
:mod:`megafs.stack`): the uploader (staged objects to the store), the lease renewer,
the committer (everything reaches the sealed local journal within
``commit_interval``) and, read-only, the checker for changes made by the volume's
writer elsewhere. That is why it is ``async with open_drive(...)`` and not a plain
``await``: background tasks need a scope that ends.

Leaving the block closes files left open, makes the final commit (shielded from
cancellation: it only writes to local disk), then, with ``wait_for_uploads`` and
unless the block ended with an exception, waits until the store holds everything,
as ``megafs umount`` does. That wait can be
cancelled (Ctrl-C, a cancel scope): what is not uploaded stays sealed in the staging
area and the next opening or mount on this machine uploads it. The lease is given
back only when nothing is left to upload.

A MEGA account (``mega://EMAIL``) runs the same way on the MEGA mount's stack
(:mod:`megafs.mega.stack`): ``MegaVfs.run`` does its background work (remote changes,
read-ahead, uploads and their retries), and leaving the block uploads what is still
staged, as a MEGA unmount does: an upload that fails then is logged, and the file
stays staged (sealed) for the next opening or mount to upload.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import final

import trio

from megafs.config import MountOptions, UsageError, default_cache_root
from megafs.mega.fs import MegaVfs
from megafs.mega.stack import SCHEME as MEGA_SCHEME
from megafs.mega.stack import MegaStack, open_mega_stack, parse_mega_url
from megafs.memory import return_large_buffers
from megafs.sdk._drive import Drive
from megafs.stack import VolumeStack, open_stack
from megafs.vfs.fs import Vfs
from megafs.volume.lease import LeaseHeld
from megafs.volume.maintenance import Secret, read_key_file

log = logging.getLogger(__name__)


def _secret(passphrase: str | bytes | None, key_file: str | os.PathLike[str] | None) -> Secret:
    if passphrase is not None and key_file is not None:
        raise UsageError("give passphrase= or key_file=, not both")
    if key_file is not None:
        return read_key_file(Path(key_file))
    if passphrase is None or not passphrase:
        raise UsageError("a volume opens with passphrase= or key_file=")
    return passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)


@asynccontextmanager
async def open_drive(
    url: str,
    *,
    passphrase: str | bytes | None = None,
    key_file: str | os.PathLike[str] | None = None,
    mega_password: str | None = None,
    read_only: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    commit_interval: float = 1.0,
    fsync_remote: bool = False,
    wait_for_uploads: bool = True,
) -> AsyncIterator[Drive]:
    """Open a megafs volume or a MEGA account for the body of ``async with``::

        async with megafs.sdk.open_drive("/srv/vol", passphrase="...") as drive:
            await drive.write_bytes("hello.txt", b"hi")

    ``url`` is a STORE as for ``megafs mount``: a path, ``file://``, ``s3://``,
    ``webdav+http(s)://`` (a megafs volume), or ``mega://EMAIL`` (a MEGA account).

    A volume opens with ``passphrase`` or with a ``key_file`` (``megafs
    export-key``). Read-write, the drive holds the volume's single-writer lease: if a
    mount or program elsewhere holds it, :class:`~megafs.volume.lease.LeaseHeld` names
    the holder; ``read_only=True`` is always allowed.

    A MEGA account opens with ``mega_password`` (default: ``$MEGA_PASSWORD``); the
    session is cached, sealed, as a MEGA mount caches it, so reopening does not log in
    again. One process at a time uses an account's local state: while it is mounted
    on this machine, :class:`~megafs.stack.OpenError` says by which process.

    ``cache_dir`` holds the sealed block cache and staging area (default: the same as
    ``megafs mount``'s). ``fsync_remote`` makes ``File.fsync`` wait for the store. See
    the module docstring for what leaving the block waits for."""
    return_large_buffers()  # memory freed by a transfer goes back (megafs.memory)
    opts = MountOptions(
        read_only=read_only,
        cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_root(),
        commit_interval=commit_interval,
        fsync_remote=fsync_remote,
    )
    opened: _Opened
    if url.startswith(MEGA_SCHEME):
        if parse_mega_url(url)[1]:
            raise UsageError(f"{url}: a drive opens at the account's root (mega://EMAIL)")
        password = _mega_password(mega_password, passphrase, key_file)
        opened = _MegaOpened(await open_mega_stack(url, password, opts))
    else:
        if mega_password is not None:
            raise UsageError("mega_password= is for MEGA accounts (mega://EMAIL)")
        secret = _secret(passphrase, key_file)
        try:
            opened = _VolumeOpened(await open_stack(url, secret, opts))
        except LeaseHeld as exc:
            raise LeaseHeld(f"{exc}; a program can open it with read_only=True") from None
    # The caller's exception is caught inside the nursery and raised again outside
    # it, so that it arrives as itself and not wrapped in an ExceptionGroup; so is a
    # background task's single failure.
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            drive = Drive(opened.fs, url, sync=opened.sync)
            try:
                await opened.start(nursery)
                try:
                    yield drive
                except BaseException as exc:
                    body_error = exc
            finally:
                await opened.finish(drive, wait_for_uploads and body_error is None)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1 or isinstance(group.exceptions[0], BaseExceptionGroup):
            raise
        raise group.exceptions[0] from body_error
    finally:
        with trio.CancelScope(shield=True):
            await opened.aclose()
    if body_error is not None:
        raise body_error


def _mega_password(
    mega_password: str | None,
    passphrase: str | bytes | None,
    key_file: str | os.PathLike[str] | None,
) -> str:
    if passphrase is not None or key_file is not None:
        raise UsageError(
            "a MEGA account opens with mega_password= (or $MEGA_PASSWORD), "
            "not a volume passphrase or key file"
        )
    password = mega_password if mega_password is not None else os.environ.get("MEGA_PASSWORD")
    if not password:
        raise UsageError("a MEGA account opens with mega_password= or $MEGA_PASSWORD")
    return password


class _Opened:
    """What :func:`open_drive` runs a drive on: a volume's or a MEGA account's stack,
    with the background tasks, syncing and closing each needs."""

    fs: Vfs | MegaVfs

    async def start(self, nursery: trio.Nursery) -> None:
        raise NotImplementedError

    async def sync(self, remote: bool) -> None:
        raise NotImplementedError

    async def finish(self, drive: Drive, wait_for_uploads: bool) -> None:
        """Close the drive (see the module docstring); the nursery is still running."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Give back what is left once the background tasks have stopped."""
        raise NotImplementedError


@final
class _VolumeOpened(_Opened):
    def __init__(self, stack: VolumeStack) -> None:
        self.stack = stack
        self.fs = stack.vfs

    async def start(self, nursery: trio.Nursery) -> None:
        stack = self.stack
        vfs = stack.vfs
        if stack.staging is not None:
            nursery.start_soon(stack.staging.run_uploader)
        if stack.lease is not None:

            def lease_lost() -> None:
                vfs.read_only = True  # another writer has the volume now: stop committing

            nursery.start_soon(partial(stack.lease.run, lease_lost))
        await nursery.start(vfs.run_committer)
        await nursery.start(vfs.run_refresher)

    async def sync(self, remote: bool) -> None:
        stack = self.stack
        if stack.vfs.read_only:
            return
        await stack.vfs.sync()
        if remote and stack.staging is not None:
            await stack.staging.wait_idle()

    async def finish(self, drive: Drive, wait_for_uploads: bool) -> None:
        stack = self.stack
        staging = stack.staging
        try:
            with trio.CancelScope(shield=True):
                try:
                    await drive._close_files()
                finally:
                    drive.closed = True
                    await stack.vfs.close()
            if wait_for_uploads and staging is not None and staging.pending_count:
                log.info("waiting for %d objects to reach the store", staging.pending_count)
                await staging.wait_idle()
        finally:
            with trio.CancelScope(shield=True):
                if stack.lease is not None and (staging is None or not staging.pending_count):
                    await stack.lease.release()
                await stack.volume.aclose()

    async def aclose(self) -> None:
        if self.stack.lock is not None:
            os.close(self.stack.lock)


@final
class _MegaOpened(_Opened):
    """A MEGA account: ``vfs.run`` does the background work (remote changes,
    read-ahead, upload workers and retries); leaving uploads what is still staged, as
    a MEGA unmount does (what fails stays staged for the next opening or mount)."""

    def __init__(self, stack: MegaStack) -> None:
        self.stack = stack
        self.fs = stack.vfs

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.stack.vfs.run)

    async def sync(self, remote: bool) -> None:
        if not self.stack.vfs.read_only:
            await self.stack.vfs.sync(remote=remote)

    async def finish(self, drive: Drive, wait_for_uploads: bool) -> None:
        vfs = self.stack.vfs
        with trio.CancelScope(shield=True):
            try:
                await drive._close_files()
            finally:
                drive.closed = True
        if wait_for_uploads and vfs.dirty_file_count():
            log.info("waiting for %d files to reach MEGA", vfs.dirty_file_count())
            await vfs.close()

    async def aclose(self) -> None:
        try:
            await self.stack.api.aclose()
        finally:
            os.close(self.stack.lock)
