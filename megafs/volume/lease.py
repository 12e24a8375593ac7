"""The single-writer lease: one read-write mount per volume (ARCHITECTURE §6).

A read-write mount holds the object ``lease`` on the store: sealed (the store learns
nothing but that a lease exists), it names the holder (host, pid, a random mount id)
and when it expires. The holder renews it every ``ttl / 4`` with a conditional put on
the ETag it last wrote, so two mounts can never both believe they hold it:

* no lease, or an expired one: take it (create-only put, or a put conditional on the
  ETag read), and say whose expired lease was taken over;
* a live lease of another mount: refuse, naming the holder and when it expires;
* a lease left by a dead process on this very host (``kill -9``, a crash): taken over at
  once, since its holder cannot be running any more;
* a renewal refused (someone else took the lease after ours expired, e.g. while the store
  was unreachable for longer than the ttl): ``on_lost`` is called and the mount stops
  writing. A refusal of our own renewal (it landed, its answer was lost, and the store's
  retry saw the new ETag) is recognised by the mount id in the lease: still ours.

Read-only mounts (``-o ro``) take no lease. Clocks: expiry is wall-clock time of the
writer's machine, so machines sharing a volume need roughly synchronised clocks (well
within the ttl).

Concurrency: one task (:meth:`Lease.run`) owns renewals after :meth:`Lease.acquire`;
``etag`` is only written by the task doing a put, and the put and the assignment of its
result are one step for the others (no other task puts the lease).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

import trio

from megafs.errors import (
    IntegrityError,
    MegafsError,
    ObjectNotFound,
    PreconditionFailed,
    StoreError,
)
from megafs.format.header import VolumeKeys
from megafs.format.seal import KIND_LEASE, context, open_sealed, seal
from megafs.stores.base import ObjectStore

log = logging.getLogger(__name__)

LEASE_KEY: Final = "lease"
DEFAULT_TTL: Final = 60.0
#: Seconds before a lease that did not open is read again (see Lease.acquire).
DAMAGED_PAUSE: Final = 0.2


class LeaseHeld(MegafsError):
    """Another read-write mount holds the volume (exit code 1: the volume itself is fine)."""


@dataclass(frozen=True)
class LeaseInfo:
    """What the lease object says (sealed on the store)."""

    host: str
    pid: int
    mount_id: str
    since: float
    expires: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"{self.host} (megafs pid {self.pid}, since {since})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """See the module docstring."""

    def __init__(
        self,
        store: ObjectStore,
        keys: VolumeKeys,
        *,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keys = keys
        self.ttl = ttl
        self.clock = clock
        self.host = socket.gethostname()
        self.mount_id = secrets.token_hex(8)
        self.since = clock()
        self.etag: str | None = None
        self.lost = False
        self.renewed: float | None = None  # when our lease object was last written
        self.taken_by: str | None = None  # who took it over, once lost

    # ------------------------------------------------------------ the object

    def _ad(self) -> bytes:
        return context(KIND_LEASE, self.keys.volume_id, LEASE_KEY)

    def _sealed(self) -> bytes:
        info = LeaseInfo(self.host, os.getpid(), self.mount_id, self.since, self.clock() + self.ttl)
        return seal(self.keys.metadata, json.dumps(asdict(info)).encode(), self._ad())

    def held(self) -> LeaseInfo | None:
        """What our lease object says, while we hold it (None before it is taken and
        once lost): for ``megafs status``."""
        if self.etag is None or self.lost or self.renewed is None:
            return None
        return LeaseInfo(self.host, os.getpid(), self.mount_id, self.since, self.renewed + self.ttl)

    def _open(self, blob: bytes) -> LeaseInfo:
        plain = open_sealed(self.keys.metadata, blob, self._ad(), "the volume's lease")
        try:
            doc: dict[str, Any] = json.loads(plain)
            return LeaseInfo(
                str(doc["host"]),
                int(doc["pid"]),
                str(doc["mount_id"]),
                float(doc["since"]),
                float(doc["expires"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"the volume's lease is malformed ({exc})") from None

    async def read(self) -> tuple[LeaseInfo, str] | None:
        """The current lease and its ETag, or None if there is none."""
        try:
            head = await self.store.head(LEASE_KEY)
            return self._open(await self.store.get(LEASE_KEY)), head.etag
        except ObjectNotFound:
            return None

    # ------------------------------------------------------------ acquire

    async def acquire(self) -> None:
        """Take the lease or raise :class:`LeaseHeld` (see the module docstring)."""
        damaged: str | None = None  # the ETag of a lease that did not open
        for _ in range(8):
            try:
                current = await self.read()
            except IntegrityError as exc:
                # A damaged lease protects nothing: replace it, loudly. But only once the
                # same object fails twice: a store without atomic replace may show us
                # the holder's renewal half written.
                try:
                    etag = (await self.store.head(LEASE_KEY)).etag
                except ObjectNotFound:
                    continue
                if etag != damaged:
                    damaged = etag
                    await trio.sleep(DAMAGED_PAUSE)
                    continue
                log.warning("%s; replacing it", exc)
                if await self._put(if_match=etag):
                    return
                continue
            if current is None:
                if await self._put(create=True):
                    return
                continue
            info, etag = current
            if info.mount_id != self.mount_id and not self._stale(info):
                until = time.strftime("%H:%M:%S", time.localtime(info.expires))
                raise LeaseHeld(
                    f"this volume is mounted read-write by {info.describe()}; "
                    f"mount it read-only (-o ro) or unmount it there first "
                    f"(its lease runs until {until} if it stopped without unmounting)"
                )
            if await self._put(if_match=etag):
                if info.mount_id != self.mount_id:
                    log.warning("took over the volume's lease from %s", info.describe())
                return
        raise StoreError("could not take the volume's lease: it keeps changing on the store")

    def _stale(self, info: LeaseInfo) -> bool:
        if info.expires < self.clock():
            return True
        # Left by a process of this host that is gone (kill -9, crash, reboot).
        return info.host == self.host and info.pid != os.getpid() and not _pid_alive(info.pid)

    async def _put(self, *, create: bool = False, if_match: str | None = None) -> bool:
        now = self.clock()
        try:
            self.etag = await self.store.put(
                LEASE_KEY, self._sealed(), if_none_match=create, if_match=if_match
            )
        except PreconditionFailed:
            return False
        self.renewed = now
        return True

    # ------------------------------------------------------------ hold

    async def run(
        self, on_lost: Callable[[], None], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Renew every ``ttl / 4`` until cancelled; ``on_lost()`` if another mount took it."""
        task_status.started()
        while not self.lost:
            await trio.sleep(self.ttl / 4)
            try:
                ok = await self._put(if_match=self.etag)
            except StoreError as exc:
                log.warning("could not renew the volume's lease: %s; retrying", exc)
                continue
            if not ok:
                current = None
                try:
                    current = await self.read()
                except (StoreError, IntegrityError):
                    pass
                if current is not None and current[0].mount_id == self.mount_id:
                    # Our renewal did land, but its answer was lost and the store's
                    # retry found the ETag it had just made: the lease is still ours.
                    self.etag = current[1]
                    continue
                self.lost = True
                who = current[0].describe() if current else "another mount"
                self.taken_by = who
                log.error(
                    "the volume's lease was taken over by %s: this mount stops writing "
                    "(what it has not uploaded stays staged on this machine)",
                    who,
                )
                on_lost()

    async def release(self) -> None:
        """Give the lease up (at unmount), if it is still ours."""
        if self.etag is None or self.lost:
            return
        try:
            head = await self.store.head(LEASE_KEY)
            if head.etag == self.etag:
                await self.store.delete(LEASE_KEY)
        except ObjectNotFound:
            pass
        except StoreError as exc:
            log.warning("could not release the volume's lease (%s); it expires by itself", exc)
