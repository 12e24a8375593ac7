"""Mount lifecycle: unlock, mount, serve, final flush, unmount.

``megafs mount`` forks before anything else starts (no trio, no threads yet): the
child runs the whole mount and reports through a pipe either ``ok`` once the mount
is live or one line of error; the parent prints that and exits accordingly. With
``--foreground`` there is no fork and the same code runs in the calling process.

Task ownership inside the daemon: the nursery opened in :func:`serve` owns the
committer task (``Vfs.run_committer``), the signal watcher and pyfuse3's request
workers (``pyfuse3.main``). When ``pyfuse3.main`` returns (unmounted by
``fusermount3 -u``/``umount``, or terminated by a signal), the nursery is cancelled
and :meth:`Vfs.close` makes the final flush and commit before the process exits.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Final

import pyfuse3
import trio

from megafs import exitcodes, fuse_loop, memory, sdnotify
from megafs.config import MountOptions
from megafs.control import PID_XATTR, STATUS_XATTR, WAIT_XATTR, MountError, mounted_at
from megafs.errors import MegafsError
from megafs.fuse_ops import Operations
from megafs.kernel_cache import invalidate
from megafs.mega.fs import MegaVfs
from megafs.stack import open_stack
from megafs.stats import RATE_WINDOW, ErrorLog, hit_rate
from megafs.stores.staging import StagingStore
from megafs.stores.tracked import TrackedStore, track_store
from megafs.vfs.blockcache import BlockCache
from megafs.vfs.chunkcache import ChunkCache
from megafs.vfs.fs import Vfs
from megafs.volume.lease import Lease
from megafs.volume.maintenance import Secret

log = logging.getLogger(__name__)

# How long the mount holds a WAIT_XATTR request while uploads run (it answers as soon
# as nothing waits): the caller then asks about twice a second, not ten times, and
# hears of the end at once. (Each status document walks the inode table: asked 10
# times a second, it took half the event loop's thread while a tar's 2,000 chunks
# were uploaded.)
WAIT_ANSWER_MAX: Final = 0.5
READ_AHEAD_KB = 1024


def check_mountpoint(path: Path) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"mountpoint {path} does not exist") from None
    except OSError as exc:
        raise MountError(f"mountpoint {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {path} is not a directory")
    if mounted_at(path):
        raise MountError(f"{path} is already a mountpoint")


class _Ops(Operations):
    """Adds control attributes on the root, answered but never listed:
    ``user.megafs.pid`` (the daemon's pid), ``user.megafs.status`` (JSON) and
    ``user.megafs.status.wait`` (the same, and uploads start at once)."""

    def __init__(
        self,
        vfs: Vfs | MegaVfs,
        status: Callable[[], dict[str, object]],
        upload_now: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(vfs)
        self._status = status
        self._upload_now = upload_now

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if name.startswith((b"security.", b"system.")):
            # Namespaces megafs does not store (setxattr refuses them too). Asked
            # for by the kernel before every write and setattr (kill-priv checks)
            # and by ls for every file: answered here without any further work.
            # EOPNOTSUPP (not ENODATA) tells ls to stop asking on this filesystem.
            # The kernel keeps asking (only ENOSYS would stop it, for every xattr):
            # one round trip per write() call, which the writer waits for behind the
            # WRITE requests queued ahead of it (a do-nothing pyfuse3 filesystem
            # takes 1.5 s per GiB written with 1 MiB write() calls, 2.1 s with this
            # answer). The kernel stops asking only on filesystems that negotiate
            # FUSE_HANDLE_KILLPRIV_V2 (SB_NOSEC), which pyfuse3 cannot.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if inode == pyfuse3.ROOT_INODE:
            if name == PID_XATTR:
                return str(os.getpid()).encode()
            if name in (STATUS_XATTR, WAIT_XATTR):
                if name == WAIT_XATTR and self._upload_now is not None:
                    fuse_loop.handler_suspends()  # (another worker reads the device)
                    await self._upload_now()
                return json.dumps(self._status()).encode()
        return await super().getxattr(inode, name, ctx)


async def _upload_now(staging: StagingStore, vfs: Vfs | None = None) -> None:
    """Commit what ``vfs`` holds in memory and start uploading what waits, at once;
    return when nothing waits, or after WAIT_ANSWER_MAX seconds."""
    with trio.move_on_after(WAIT_ANSWER_MAX):
        staging.upload_now()
        if vfs is not None:
            await vfs.commit_now()  # (the last second of a `cp`: not a second later)
        await staging.wait_idle()  # (uploads what the commit staged without a pause)


async def serve(
    store_url: str,
    mountpoint: Path,
    passphrase: Secret,
    opts: MountOptions,
    ready: Callable[[MegafsError | None], None],
) -> None:
    """Unlock, mount and serve until unmounted. ``ready(None)`` once live, or
    ``ready(error)`` on failure before that (then the error is raised too)."""
    mountpoint = Path(os.path.realpath(mountpoint))  # while nothing is mounted there
    if store_url.startswith("mega://"):
        from megafs.mega.mount import serve_mega

        if not isinstance(passphrase, bytes):
            err = MegafsError("a MEGA account opens with its password, not a key file")
            ready(err)
            raise err
        await serve_mega(store_url, mountpoint, passphrase, opts, ready, _Ops)
        return
    try:
        check_mountpoint(mountpoint)
        stack = await open_stack(store_url, passphrase, opts)
        store, volume, vfs, cache = stack.store, stack.volume, stack.vfs, stack.cache
        staging, lease, lock = stack.staging, stack.lease, stack.lock
        vfs.invalidate = invalidate
        status = _StatusView(vfs, staging, cache, lease, track_store(volume, staging))
        upload_now = partial(_upload_now, staging, vfs) if staging is not None else None
        pyfuse3.init(_Ops(vfs, status, upload_now), str(mountpoint), opts.fuse_options(store.url))
    except MegafsError as exc:
        ready(exc)
        raise
    except RuntimeError as exc:  # pyfuse3.init failing to mount
        err = MountError(f"cannot mount at {mountpoint}: {exc}")
        ready(err)
        raise err from None
    log.info("mounted %s at %s", store.url, mountpoint)
    ready(None)

    def lease_lost() -> None:
        vfs.read_only = True  # another mount writes now: stop committing

    # Task ownership: ``outer`` owns the uploader, which must outlive the FUSE
    # session so the final drain can finish, and the lease renewer (held until the
    # drain ends); ``inner`` owns the committer (and read-ahead), the signal watcher
    # and the FUSE workers.

    async with trio.open_nursery() as outer:
        if staging is not None:
            outer.start_soon(staging.run_uploader)
        if lease is not None:
            outer.start_soon(partial(lease.run, lease_lost))
        if sdnotify.enabled():
            # In ``outer``: the backlog is still reported while the final drain runs.
            outer.start_soon(report_status, status)
        try:
            async with trio.open_nursery() as inner:
                await inner.start(vfs.run_committer)
                await inner.start(vfs.run_refresher)
                inner.start_soon(_raise_read_ahead, mountpoint)
                inner.start_soon(_on_signal, fuse_loop.terminate)
                await fuse_loop.main(max_tasks=64)
                inner.cancel_scope.cancel()
        finally:
            sdnotify.notify("STOPPING=1")
            # Unmount first (so nothing new arrives), then the final commit.
            try:
                pyfuse3.close(unmount=mounted_at(mountpoint, resolved=True))
            except Exception:
                log.exception("closing the FUSE session")
            with trio.CancelScope(shield=True):
                await vfs.close()
        if staging is not None and staging.pending_count:
            await _drain(staging)
        if lease is not None and (staging is None or not staging.pending_count):
            # With uploads left, the lease stays: this host's next mount takes it over
            # (our pid is gone by then), any other waits for it to expire.
            with trio.CancelScope(shield=True):
                await lease.release()
        await volume.aclose()
        outer.cancel_scope.cancel()
    if lock is not None:
        os.close(lock)
    if staging is None or not staging.pending_count:
        log.info("unmounted %s, everything committed", mountpoint)
    else:
        log.info("unmounted %s; staged changes are uploaded by the next mount", mountpoint)


async def _drain(staging: StagingStore) -> None:
    """Wait for the upload queue to empty; a signal stops waiting (what is staged
    stays on local disk and the next mount resumes it)."""
    log.info(
        "uploading %d pending objects (%d bytes) before exit",
        staging.pending_count,
        staging.pending_bytes,
    )
    async with trio.open_nursery() as n:
        n.start_soon(_on_signal, n.cancel_scope.cancel)
        await staging.wait_idle()
        n.cancel_scope.cancel()
    if staging.pending_count:
        log.warning(
            "exiting with %d objects (%d bytes) not yet uploaded; the next mount resumes them",
            staging.pending_count,
            staging.pending_bytes,
        )
    else:
        log.info("all changes are on the store")


async def _on_signal(action: Callable[[], object]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for _ in signals:
            log.info("signal received: stopping")
            action()
            return


#: Seconds between looks at the upload backlog for systemd's STATUS= line.
STATUS_INTERVAL = 2.0


def status_line(st: dict[str, object]) -> str:
    """The one-line STATUS= text for ``systemctl status``, from a status dict (the
    ``user.megafs.status`` document): ``idle``, or the upload backlog."""
    objects = _count(st.get("pending_objects"))
    files = _count(st.get("pending_files", st.get("dirty_files")))
    mib = _count(st.get("pending_bytes")) / 2**20
    text = f"uploading {files} files, {mib:.1f} MiB ({objects} objects)"
    if not objects and not files:
        text = "idle"
    if st.get("last_error") and not st.get("last_error_recovered"):
        text += f"; last store error: {st['last_error']}"
    return text


def _count(value: object) -> int:
    return value if isinstance(value, int) else 0


async def report_status(
    status: Callable[[], dict[str, object]], interval: float = STATUS_INTERVAL
) -> None:
    """Send ``STATUS=`` to systemd whenever the backlog line changes (looked at every
    ``interval`` seconds), until cancelled. ``status`` reads counters that only the
    daemon's trio thread changes, and runs on that thread: it sees a consistent state."""
    last = None
    while True:
        line = status_line(status())
        if line != last:
            sdnotify.notify(f"STATUS={line}")
            last = line
        await trio.sleep(interval)


async def _raise_read_ahead(mountpoint: Path) -> None:
    """Let the kernel read ahead 1 MiB at a time on this mount (its FUSE default is
    128 KiB, which caps sequential reads). Runs once the session serves requests:
    the stat() goes through this very filesystem."""
    try:
        # Abandoned if cancelled: a signal may end the request loop before this
        # stat() is answered, and waiting for it would hang the exit.
        stat_result = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
        dev = stat_result.st_dev
        path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        if path.exists():
            await trio.to_thread.run_sync(path.write_text, str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("could not raise read-ahead: %s", exc)


class _StatusView:
    """What ``megafs status`` shows, computed on request (the ``user.megafs.status``
    document; field names are kept stable for scripts, see ``megafs status --help``).

    ``last_error`` / ``last_error_time``: the newest failure of the store (a request,
    or an upload the staging area retries) and when (Unix time). Kept for the life of
    the mount, never cleared; ``last_error_recovered`` says whether the store has
    answered since."""

    def __init__(
        self,
        vfs: Vfs,
        staging: StagingStore | None,
        cache: BlockCache | ChunkCache,
        lease: Lease | None = None,
        store: TrackedStore | None = None,
    ) -> None:
        self.vfs, self.staging, self.cache = vfs, staging, cache
        self.lease, self.store = lease, store

    def __call__(self) -> dict[str, object]:
        st = self.staging
        errors = self.store.errors if self.store is not None else ErrorLog()
        last_error, last_time = errors.last, errors.time
        if st is not None and st.last_error_time is not None:
            if last_time is None or st.last_error_time > last_time:
                last_error, last_time = st.last_error, st.last_error_time
        pending_keys = st.pending_keys() if st is not None else set()
        return {
            "pid": os.getpid(),
            "drive": "volume",
            "read_only": self.vfs.read_only,
            "pending_objects": st.pending_count if st else 0,
            "pending_bytes": st.pending_bytes if st else 0,
            "pending_files": self.vfs.pending_file_count(pending_keys),
            "dirty_files": self.vfs.dirty_file_count(),
            "uploaded_bytes": st.uploaded_bytes if st else 0,
            "upload_rate": st.upload_rate.rate() if st else 0.0,
            "upload_rate_window": RATE_WINDOW,
            "cache_bytes": self.cache.bytes,
            "cache_max_bytes": self.cache.max_bytes,
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "cache_hit_rate": hit_rate(self.cache.hits, self.cache.misses),
            "dir_objects_cached": self.vfs.dir_objects_cached(),
            "inodes": len(self.vfs.nodes),
            "fuse_requests": fuse_loop.requests_taken(),
            **memory.status_fields(),
            "last_error": last_error,
            "last_error_time": last_time,
            "last_error_recovered": last_time is not None
            and errors.ok_time is not None
            and errors.ok_time >= last_time,
            "store_errors": errors.count,
            "errors": self.vfs.errors,
            **self._lease(),
        }

    def _lease(self) -> dict[str, object]:
        lease = self.lease
        if lease is None:
            return {"lease": None, "lease_state": "none", "lease_taken_by": None}
        held = lease.held()
        return {
            "lease": held.as_dict() if held is not None else None,
            "lease_state": "lost" if lease.lost else "held" if held is not None else "none",
            "lease_taken_by": lease.taken_by,
        }


def run_foreground(
    store_url: str,
    mountpoint: Path,
    passphrase: Secret,
    opts: MountOptions,
    ready: Callable[[MegafsError | None], None],
) -> None:
    """Mount and serve in this process. Under systemd (``Type=notify``) the service
    manager hears READY=1 once the mount is live, STATUS= lines, and STOPPING=1."""

    def ready_and_notify(error: MegafsError | None) -> None:
        ready(error)
        if error is None:
            sdnotify.notify("READY=1")

    memory.keep_chunk_buffers()  # before trio starts threads (see megafs.memory)
    trio.run(serve, store_url, mountpoint, passphrase, opts, ready_and_notify)


#: Seconds the parent of a forked daemon waits, after "ok", for the mount to be listed.
MOUNTINFO_WAIT = 5.0


def _read_reply(fd: int, deadline: float) -> str | None:
    """The child's whole reply (it closes the pipe after writing), or None at the
    deadline. Closes ``fd``."""
    chunks: list[bytes] = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 4096)
            if not data:
                return b"".join(chunks).decode("utf-8", "replace")
            chunks.append(data)
    finally:
        os.close(fd)


def _stop_child(pid: int, mountpoint: Path) -> None:
    """Stop a forked daemon that missed its deadline: SIGTERM (a serving daemon unmounts
    and exits), SIGKILL after a grace period, and no mount left behind either way."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        os.kill(pid, sig)  # not reaped yet, so the pid is still our child's
        if _reaped(pid, grace):
            break
    if mounted_at(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def _reaped(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for child ``pid`` to exit; True once reaped."""
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run_daemon(
    store_url: str, mountpoint: Path, passphrase: Secret, opts: MountOptions, log_path: Path
) -> int:
    """Fork; the child mounts and serves, the parent returns the exit status once the
    mount is live (0) or has failed (non-zero, after printing the child's message)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        reply = _read_reply(r, time.monotonic() + opts.mount_timeout)
        if reply is None:
            _stop_child(pid, mountpoint)
            print(
                f"megafs: the mount did not come up within {opts.mount_timeout:g} s "
                f"(mount_timeout=); see {log_path}",
                file=sys.stderr,
            )
            return exitcodes.ERROR
        if reply == "ok":
            # The child replies once pyfuse3.init has mounted; check that the kernel
            # says so too, in this process's view (bounded: it should already be there).
            deadline = time.monotonic() + MOUNTINFO_WAIT
            while not mounted_at(mountpoint):
                if time.monotonic() > deadline:
                    _stop_child(pid, mountpoint)
                    print(f"megafs: nothing is mounted at {mountpoint}; see {log_path}")
                    return exitcodes.MOUNTPOINT_ERROR
                time.sleep(0.02)
            return exitcodes.OK
        status_text, _, msg = reply.partition(" ")
        if not status_text.isdigit():
            _, status = os.waitpid(pid, 0)
            status_text = str(exitcodes.ERROR)
            msg = f"the mount process ended unexpectedly (status {status}); see {log_path}"
        print(f"megafs: {msg}", file=sys.stderr)
        return int(status_text)
    # Child.
    os.close(r)
    os.setsid()
    # Not the service's main process: never claim readiness for whoever started us.
    os.environ.pop("NOTIFY_SOCKET", None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(devnull)
    os.chdir("/")
    reported = False

    def ready(error: MegafsError | None) -> None:
        nonlocal reported
        if reported:
            return
        reported = True
        reply = "ok" if error is None else f"{exitcodes.for_error(error)} {error}"
        os.write(w, reply.encode())
        os.close(w)

    code = 0
    try:
        run_foreground(store_url, mountpoint, passphrase, opts, ready)
    except MegafsError as exc:
        log.error("%s", exc)
        code = 1
    except BaseException:
        log.exception("mount process failed")
        code = 1
    finally:
        if not reported:
            ready(MegafsError("the mount process failed before the mount was live"))
    os._exit(code)
