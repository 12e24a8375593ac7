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

import logging
import os
import signal
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from megafs import exitcodes
from megafs.config import MountOptions
from megafs.errors import MegafsError
from megafs.fuse_ops import Operations
from megafs.stores import LocalStore, open_store
from megafs.vfs.fs import Vfs
from megafs.volume.drive import Volume

log = logging.getLogger(__name__)

PID_XATTR = b"user.megafs.pid"


class MountError(MegafsError):
    """The mountpoint cannot be used."""

    exit_code = exitcodes.MOUNTPOINT_ERROR


def mounted_at(path: Path) -> bool:
    """Whether something is mounted exactly at ``path`` (from /proc/self/mountinfo)."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    return True
    except OSError:
        return os.path.ismount(target)
    return False


def _unescape(s: str) -> str:
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        s = s.replace(code, ch)
    return s


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


def _space_of(store: object) -> Callable[[], tuple[int, int]] | None:
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


class _Ops(Operations):
    """Adds the control attribute ``user.megafs.pid`` on the root (not listed)."""

    async def getxattr(self, inode: int, name: bytes, ctx: object) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == PID_XATTR:
            return str(os.getpid()).encode()
        return await super().getxattr(inode, name, ctx)


async def serve(
    store_url: str,
    mountpoint: Path,
    passphrase: bytes,
    opts: MountOptions,
    ready: Callable[[MegafsError | None], None],
) -> None:
    """Unlock, mount and serve until unmounted. ``ready(None)`` once live, or
    ``ready(error)`` on failure before that (then the error is raised too)."""
    try:
        check_mountpoint(mountpoint)
        store = open_store(store_url)
        if isinstance(store, LocalStore) and not store.root.is_dir():
            raise MountError(f"store {store_url} does not exist")
        volume = await Volume.open(
            store, passphrase, state_root=opts.cache_dir, read_only=opts.read_only
        )
        vfs = Vfs(
            volume,
            read_only=opts.read_only,
            commit_interval=opts.commit_interval,
            space=_space_of(store),
        )
        await vfs.start()
        ops = _Ops(vfs)
        pyfuse3.init(ops, str(mountpoint), opts.fuse_options(store.url))
    except MegafsError as exc:
        ready(exc)
        raise
    except RuntimeError as exc:  # pyfuse3.init failing to mount
        err = MountError(f"cannot mount at {mountpoint}: {exc}")
        ready(err)
        raise err from None
    log.info("mounted %s at %s", store.url, mountpoint)
    ready(None)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vfs.run_committer)
            nursery.start_soon(_watch_signals)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            nursery.cancel_scope.cancel()
    finally:
        # Unmount first (so nothing new arrives), then the final flush.
        try:
            pyfuse3.close(unmount=mounted_at(mountpoint))
        except Exception:
            log.exception("closing the FUSE session")
        with trio.CancelScope(shield=True):
            await vfs.close()
            await volume.aclose()
        log.info("unmounted %s, everything committed", mountpoint)


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for _ in signals:
            log.info("signal received: unmounting")
            pyfuse3.terminate()
            return


def run_foreground(
    store_url: str,
    mountpoint: Path,
    passphrase: bytes,
    opts: MountOptions,
    ready: Callable[[MegafsError | None], None],
) -> None:
    trio.run(serve, store_url, mountpoint, passphrase, opts, ready)


def run_daemon(
    store_url: str, mountpoint: Path, passphrase: bytes, opts: MountOptions, log_path: Path
) -> int:
    """Fork; the child mounts and serves, the parent returns the exit status once the
    mount is live (0) or has failed (non-zero, after printing the child's message)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            reply = f.read().decode("utf-8", "replace")
        if reply == "ok":
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
