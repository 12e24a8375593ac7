"""Volume maintenance: change the passphrase, check, collect garbage, export the key.

The logic behind ``megafs passwd``, ``megafs fsck``, ``megafs gc`` and ``megafs
export-key``; :mod:`megafs.cli` only parses arguments and prints.

Unlocking (:func:`unlock`): a volume opens with its passphrase (Argon2id over the
header) or with a *key file*: a recovery copy of the master key written by
:func:`export_key`. A key file is small JSON::

    {"megafs_key_file": 1, "volume_id": HEX32, "master_key": B64}

created with mode 0600 and never overwritten. It is not the file ``scripts/run``
generates for unattended setups: that one is a random *passphrase* (one base64 line,
used with ``--passphrase-file``); :func:`read_key_file` recognises it and says so.
Whoever holds a key file can read the volume, whatever its passphrase becomes later.

Garbage collection (:func:`collect_garbage`): walks the whole tree (as ``fsck
--quick`` does), then deletes the chunk objects (``c/``) nothing references. It holds
the volume's single-writer lease throughout, so no read-write mount can commit
meanwhile, and refuses while any unexpired lease exists, even one left by a dead
process (its staged uploads may still reference chunks that look unreferenced now).
It deletes nothing at all when some directory or inode object is unreadable (the
walk is then incomplete). Chunks younger than ``grace`` seconds are kept when their
age is known (local stores: the file's mtime; other stores only if their
``ObjectInfo`` carries ``mtime``); otherwise the lease is the only guard.
Unreferenced directory/inode objects and keys megafs does not know are counted and
kept, never deleted.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from megafs import exitcodes
from megafs.errors import (
    IntegrityError,
    MegafsError,
    NotAVolume,
    ObjectNotFound,
    PreconditionFailed,
    VolumeError,
    WrongPassphrase,
)
from megafs.format import header as fheader
from megafs.stores.base import ObjectInfo, ObjectStore
from megafs.stores.local import LocalStore
from megafs.volume.check import Report, check_volume
from megafs.volume.drive import ROOT_INO, Volume
from megafs.volume.lease import LEASE_KEY, Lease, LeaseHeld

KEY_FILE_VERSION: Final = 1
DEFAULT_GRACE: Final = 3600.0
DELETE_BATCH: Final = 1000
DELETE_CONCURRENCY: Final = 16


class KeyFileError(MegafsError):
    """A key file cannot be read, written or does not fit (exit code 2: a usage error)."""

    exit_code = exitcodes.USAGE


# ------------------------------------------------------------------ key files


@dataclass(frozen=True)
class MasterKey:
    """A volume's master key, as read from a key file."""

    volume_id: bytes
    key: bytes
    source: str  # the file it came from, for messages


def encode_key_file(volume_id: bytes, master_key: bytes) -> bytes:
    """The bytes of a key file."""
    doc = {
        "megafs_key_file": KEY_FILE_VERSION,
        "volume_id": volume_id.hex(),
        "master_key": base64.b64encode(master_key).decode(),
        "note": "megafs master key: whoever has this file can read the volume. Keep it safe.",
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def read_key_file(path: Path) -> MasterKey:
    """Read a key file written by :func:`export_key`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        doc: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or "megafs_key_file" not in doc:
        hint = ""
        if raw.strip() and b"\n" not in raw.strip() and len(raw) < 1024:
            hint = " (it looks like a passphrase file: use --passphrase-file)"
        raise KeyFileError(f"{path} is not a megafs key file{hint}")
    if doc["megafs_key_file"] != KEY_FILE_VERSION:
        raise KeyFileError(f"key file {path}: unsupported version {doc['megafs_key_file']!r}")
    try:
        vid = bytes.fromhex(doc["volume_id"])
        key = base64.b64decode(doc["master_key"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise KeyFileError(f"key file {path} is damaged") from None
    if len(vid) != 16 or len(key) != 32:
        raise KeyFileError(f"key file {path} is damaged (bad key length)")
    return MasterKey(vid, key, str(path))


def write_key_file(path: Path, volume_id: bytes, master_key: bytes) -> None:
    """Create ``path`` with mode 0600; an existing file is never overwritten."""
    data = encode_key_file(volume_id, master_key)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; not overwriting it") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from None
    os.close(fd)


# ------------------------------------------------------------------ unlocking

Secret = bytes | MasterKey  # a passphrase or a master key


async def _read_header(store: ObjectStore) -> tuple[bytes, str]:
    """The header and its ETag (the ETag read first: a header that changes between
    the two makes a later conditional put fail, never succeed wrongly)."""
    try:
        info = await store.head(fheader.HEADER_KEY)
        blob = await store.get(fheader.HEADER_KEY)
    except ObjectNotFound:
        raise NotAVolume(f"{store.url} is not a megafs volume (no header)") from None
    return blob, info.etag


async def _master_key(blob: bytes, secret: Secret) -> tuple[bytes, bytes]:
    """``(master_key, volume_id)`` from the header and a passphrase or key file."""
    if isinstance(secret, MasterKey):
        doc = fheader.parse_header(blob)
        vid = bytes.fromhex(doc["volume_id"])
        if vid != secret.volume_id:
            raise WrongPassphrase(
                f"key file {secret.source} belongs to another volume "
                f"({secret.volume_id.hex()}, not {vid.hex()})"
            )
        return secret.key, vid
    return await trio.to_thread.run_sync(fheader.unlock_header, blob, secret)


async def unlock(
    store: ObjectStore,
    secret: Secret,
    *,
    read_only: bool = False,
    state_root: Path | None = None,
) -> Volume:
    """Open the volume on ``store`` with a passphrase or a key file. A key file is
    checked against the root directory object (a wrong key does not find it).
    ``state_root`` as for :meth:`Volume.open` (a mount's rollback table)."""
    blob, _ = await _read_header(store)
    master, vid = await _master_key(blob, secret)
    state_dir = state_root / vid.hex() if state_root is not None else None
    volume = Volume(
        store, fheader.derive_keys(master, vid), state_dir=state_dir, read_only=read_only
    )
    if isinstance(secret, MasterKey):
        # Object names derive from the master key: under a wrong key the root directory
        # object is simply not there. (Present but failing authentication means the key
        # is right and the object is damaged: that is for fsck to report.)
        try:
            await volume.load_dir(ROOT_INO)
        except IntegrityError as exc:
            if "is missing" in str(exc):
                raise WrongPassphrase(
                    f"key file {secret.source} does not unlock this volume "
                    "(or the volume's root directory object is missing)"
                ) from None
    return volume


# ------------------------------------------------------------------ passwd


def _kdf_params(blob: bytes) -> dict[str, int]:
    """The volume's KDF parameters, raised to the current defaults where weaker."""
    kdf = fheader.parse_header(blob)["kdf"]
    return {k: max(int(kdf.get(k, 0)), int(v)) for k, v in fheader.DEFAULT_KDF.items()}


async def change_passphrase(store: ObjectStore, old: Secret, new: bytes) -> None:
    """Rewrap the master key under ``new`` (a new salt; the KDF parameters kept, or
    raised to the current defaults), stored with a put conditional on the header's
    ETag, then verified by reading the header back: the new passphrase gives the same
    master key, the old one no longer opens it."""
    if not new:
        raise ValueError("empty passphrase")
    if isinstance(old, MasterKey):
        await unlock(store, old)  # a key file must prove itself before anything is written
    blob, etag = await _read_header(store)
    master, vid = await _master_key(blob, old)
    params = _kdf_params(blob)
    new_blob = await trio.to_thread.run_sync(lambda: fheader._build(new, master, vid, params))
    try:
        await store.put(fheader.HEADER_KEY, new_blob, if_match=etag)
    except PreconditionFailed:
        raise VolumeError(
            "the volume header changed while the passphrase was being changed "
            "(another passwd?); nothing was written: try again"
        ) from None
    back, _ = await _read_header(store)
    got, got_vid = await trio.to_thread.run_sync(fheader.unlock_header, back, new)
    if (got, got_vid) != (master, vid):
        raise IntegrityError("the rewritten header does not give back the master key")
    if isinstance(old, bytes) and old != new:
        try:
            await trio.to_thread.run_sync(fheader.unlock_header, back, old)
        except WrongPassphrase:
            return
        raise IntegrityError("the old passphrase still opens the rewritten header")


# ------------------------------------------------------------------ export-key


async def master_key_of(store: ObjectStore, secret: Secret) -> tuple[bytes, bytes]:
    """``(volume_id, master_key)`` of the volume (for ``export-key``)."""
    if isinstance(secret, MasterKey):
        await unlock(store, secret)  # a key file must fit
    blob, _ = await _read_header(store)
    master, vid = await _master_key(blob, secret)
    return vid, master


# ------------------------------------------------------------------ fsck


async def fsck(
    store: ObjectStore,
    secret: Secret,
    *,
    quick: bool = False,
    progress: Callable[[Report], None] | None = None,
) -> Report:
    """Check the whole tree (see :func:`megafs.volume.check.check_volume`)."""
    volume = await unlock(store, secret, read_only=True)
    return await check_volume(volume, deep=not quick, progress=progress)


# ------------------------------------------------------------------ gc


@dataclass
class GcResult:
    """What ``gc`` found and did."""

    report: Report
    garbage: list[ObjectInfo] = field(default_factory=list)  # unreferenced chunks
    young: int = 0  # unreferenced chunks kept: younger than the grace period
    kept_metadata: int = 0  # unreferenced directory/inode objects (kept)
    unknown: list[str] = field(default_factory=list)  # keys megafs does not know (kept)
    # Scratch objects of cut-off uploads (WebDAV servers that write PUT bodies in
    # place): deleted with the garbage, counted apart.
    scratch: list[ObjectInfo] = field(default_factory=list)
    deleted: int = 0
    deleted_bytes: int = 0

    @property
    def garbage_bytes(self) -> int:
        return sum(o.size for o in self.garbage)


def _age(store: ObjectStore, info: ObjectInfo, now: float) -> float | None:
    """Seconds since the object was written, when the store can tell."""
    mtime = getattr(info, "mtime", None)
    if isinstance(mtime, int | float):
        return now - float(mtime)
    if isinstance(store, LocalStore):
        try:
            return now - (store.root / info.key).stat().st_mtime
        except OSError:
            return None
    return None


async def _delete(
    store: ObjectStore,
    keys: list[str],
    lease: Lease,
    on_delete: Callable[[int, int], None] | None = None,
) -> None:
    delete_many: Callable[[list[str]], Awaitable[object]] | None = getattr(
        store, "delete_many", None
    )
    limit = trio.CapacityLimiter(DELETE_CONCURRENCY)

    async def one(key: str) -> None:
        async with limit:
            await store.delete(key)

    for i in range(0, len(keys), DELETE_BATCH):
        if lease.lost:
            raise LeaseHeld("another mount took the volume's lease; gc stopped")
        batch = keys[i : i + DELETE_BATCH]
        if delete_many is not None:
            await delete_many(batch)
        else:
            async with trio.open_nursery() as n:
                for key in batch:
                    n.start_soon(one, key)
        if on_delete is not None:
            on_delete(i + len(batch), len(keys))


async def collect_garbage(
    store: ObjectStore,
    secret: Secret,
    *,
    dry_run: bool = False,
    grace: float = DEFAULT_GRACE,
    progress: Callable[[Report], None] | None = None,
    lease_ttl: float | None = None,
    on_delete: Callable[[int, int], None] | None = None,
) -> GcResult:
    """Delete unreferenced chunks (see the module docstring). ``progress(report)``
    follows the walk, ``on_delete(done, total)`` the deletions."""
    volume = await unlock(store, secret, read_only=True)
    lease = (
        Lease(store, volume.keys) if lease_ttl is None else Lease(store, volume.keys, ttl=lease_ttl)
    )
    try:
        current = await lease.read()
    except IntegrityError:
        current = None  # a damaged lease protects nothing: acquire() replaces it
    if current is not None and current[0].expires > time.time():
        info = current[0]
        raise LeaseHeld(
            f"this volume is mounted read-write by {info.describe()} (or that mount "
            "stopped without unmounting and may have changes not yet uploaded): unmount it "
            "first (or mount and unmount it again on that machine)"
        )
    await lease.acquire()
    failure: MegafsError | None = None
    try:
        async with trio.open_nursery() as n:

            def lost() -> None:
                n.cancel_scope.cancel()

            n.start_soon(lease.run, lost)
            try:
                result = await _gc(store, volume, lease, dry_run, grace, progress, on_delete)
            except MegafsError as exc:  # raised below, not as an exception group
                failure = exc
            n.cancel_scope.cancel()
        if lease.lost:
            raise LeaseHeld("another mount took the volume's lease; gc stopped")
        if failure is not None:
            raise failure
    finally:
        with trio.CancelScope(shield=True):
            await lease.release()
    return result


async def _gc(
    store: ObjectStore,
    volume: Volume,
    lease: Lease,
    dry_run: bool,
    grace: float,
    progress: Callable[[Report], None] | None,
    on_delete: Callable[[int, int], None] | None = None,
) -> GcResult:
    report = await check_volume(volume, deep=False, progress=progress)
    result = GcResult(report)
    if report.incomplete:
        raise IntegrityError(
            f"{len(report.problems)} problem(s) found (run megafs fsck): some directory or "
            "inode is unreadable, so what it references is unknown; nothing deleted"
        )
    now = time.time()
    for info in await store.list():
        key = info.key
        if key in report.referenced or key in (fheader.HEADER_KEY, LEASE_KEY):
            continue
        if key.startswith("c/"):
            age = _age(store, info, now)
            if age is not None and age < grace:
                result.young += 1
            else:
                result.garbage.append(info)
        elif key.startswith(("d/", "i/")):
            result.kept_metadata += 1
        else:
            result.unknown.append(key)
    list_scratch: Callable[[], Awaitable[list[ObjectInfo]]] | None = getattr(
        store, "list_scratch", None
    )
    if list_scratch is not None:
        # Safe to delete: the lease is ours, so no upload is between its PUT and MOVE.
        result.scratch = await list_scratch()
    doomed = result.garbage + result.scratch
    if not dry_run and doomed:
        await _delete(store, [o.key for o in doomed], lease, on_delete)
        result.deleted = len(doomed)
        result.deleted_bytes = sum(o.size for o in doomed)
    return result
