"""The ``megafs`` command.

Every failure prints one line ``megafs: ...`` to stderr and exits non-zero (see
:mod:`megafs.exitcodes`); tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from megafs import exitcodes, filecmds, mounthelper
from megafs.config import UsageError, parse_options, read_passphrase
from megafs.control import PID_XATTR, STATUS_XATTR, WAIT_XATTR, MountError, mounted_at
from megafs.errors import MegafsError, VolumeError
from megafs.progress import ProgressLine, human_bytes

# The mount code, trio, the stores and the volume are imported by the commands that
# use them: `megafs status` and `megafs umount` (run by every bench settle and by
# scripts polling a mount) start in ~0.1 s instead of ~0.6 s.
if TYPE_CHECKING:
    from megafs.stores import ObjectStore
    from megafs.volume import maintenance
    from megafs.volume.check import Report

log = logging.getLogger("megafs")
_T = TypeVar("_T")


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pyfuse3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("pyfuse3").addFilter(_late_reply_filter)


def _late_reply_filter(record: logging.LogRecord) -> bool:
    """libfuse reports a reply the kernel no longer waits for (the request was interrupted,
    or the mount went away first: a release racing an unmount) as ENOENT. Nothing is lost
    then, so it is a debug line, not an error."""
    msg = record.getMessage()
    if "fuse_reply_" in msg and "No such file or directory" in msg:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("pyfuse3").isEnabledFor(logging.DEBUG)
    return True


STATUS_FIELDS = """\
fields of --json (bytes, seconds, Unix times):
  drive                 "volume" or "mega"
  read_only             whether the mount is read-only
  pending_files         files with changes not all on the store yet
  pending_bytes         bytes staged and not yet uploaded
  pending_objects       store objects staged and not yet uploaded (MEGA: files)
  dirty_files           files with changes not yet staged (written within the
                        commit interval)
  uploaded_bytes        bytes uploaded since the mount
  upload_rate           bytes/s uploaded over the last upload_rate_window seconds
  cache_bytes, cache_max_bytes, cache_hits, cache_misses
  cache_hit_rate        hits / lookups of the block cache (null: no lookup yet)
  dir_objects_cached    directory objects in memory (MEGA: every folder)
  inodes                inodes in memory (volumes; past inode_cache=, directories
                        nobody uses are unloaded once the kernel forgets their
                        entries)
  fuse_requests         kernel requests read since the mount (null: not counted,
                        pyfuse3's own request loop in use)
  rss_bytes, peak_rss_bytes
                        the daemon's resident memory now and its peak since it
                        started (null: not known on this system)
  last_error            the store's last error (null: none this mount); kept until
                        a newer one replaces it, never cleared
  last_error_time       when it happened
  last_error_recovered  whether the store has answered since
  store_errors          failed store requests/uploads this mount
  errors                failed background commits (and MEGA read errors)
  lease                 the single-writer lease this mount holds: host, pid,
                        mount_id, since, expires (null: none held)
  lease_state           "held", "lost" (another mount took it over), "none"
                        (read-only mounts take no lease) or "n/a" (MEGA)
  lease_taken_by        who took the lease over, once lost
  blocked               MEGA: why uploads cannot proceed (e.g. over quota)
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megafs", description="End-to-end encrypted drive.")
    p.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    pi = sub.add_parser("init", help="create a volume (asks the passphrase twice)")
    pi.add_argument("store")
    pi.add_argument("--passphrase-file", type=Path)
    pi.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint (MEGAFS_S3_ENDPOINT)")

    pm = sub.add_parser("mount", help="mount a volume; returns once the mount is live")
    pm.add_argument("store")
    pm.add_argument("mountpoint", type=Path)
    pm.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    pm.add_argument("-f", "--foreground", action="store_true")
    pm.add_argument("--passphrase-file", type=Path)
    pm.add_argument(
        "--key-file", type=Path, help="open with a key file (megafs export-key) instead"
    )
    pm.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint (MEGAFS_S3_ENDPOINT)")

    pu = sub.add_parser("umount", help="wait until every change is on the store, then unmount")
    pu.add_argument("mountpoint", type=Path)
    pu.add_argument("--timeout", type=float, default=3600.0)

    pl = sub.add_parser("link", help="print a MEGA public link for a file")
    pl.add_argument("path", help="a file in a mounted MEGA account, or mega://EMAIL[:]/PATH")
    pl.add_argument("--passphrase-file", type=Path)
    pl.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")

    po = sub.add_parser("logout", help="end a MEGA account's cached session")
    po.add_argument("account", help="mega://EMAIL")
    po.add_argument("--passphrase-file", type=Path)
    po.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")

    ps = sub.add_parser(
        "status",
        help="pending uploads, cache use, errors",
        description="What a mount is doing. --json prints the status document for "
        "scripts; its field names are stable (fields are only ever added).",
        epilog=STATUS_FIELDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ps.add_argument("mountpoint", type=Path)
    ps.add_argument("--json", action="store_true")
    ps.add_argument(
        "--wait-idle", action="store_true", help="return once nothing is waiting to be uploaded"
    )
    _add_maintenance_parsers(sub)
    filecmds.add_parsers(sub)
    return p


def _add_maintenance_parsers(sub: Any) -> None:
    def unlock_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("store")
        q.add_argument("--passphrase-file", type=Path)
        q.add_argument(
            "--key-file", type=Path, help="open with a key file (megafs export-key) instead"
        )
        q.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint (MEGAFS_S3_ENDPOINT)")

    pw = sub.add_parser(
        "passwd",
        help="change the volume passphrase (rewraps the master key only)",
        description="Change the volume passphrase: the master key is rewrapped under the new "
        "one; no data is touched. The new passphrase comes from MEGAFS_NEW_PASSPHRASE, "
        "--new-passphrase-file or a prompt. Safe while the volume is mounted (a mount reads "
        "the header only when it starts); other machines' key files keep working.",
    )
    unlock_args(pw)
    pw.add_argument("--new-passphrase-file", type=Path)

    pf = sub.add_parser(
        "fsck",
        help="check the whole volume: every object opens, every chunk exists and authenticates",
    )
    unlock_args(pf)
    pf.add_argument(
        "--quick", action="store_true", help="only check that chunks exist (no content reads)"
    )

    pg = sub.add_parser(
        "gc",
        help="delete chunks nothing references (takes the volume's lease)",
        description="Delete the chunk objects no file references (left by crashes and by "
        "overwritten or deleted files). Holds the volume's single-writer lease, so it refuses "
        "to run while a read-write mount holds the volume; deletes nothing if any directory is "
        "unreadable; keeps chunks younger than --grace where the store tells ages.",
    )
    unlock_args(pg)
    pg.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    pg.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="keep unreferenced chunks younger than this (default 3600)",
    )

    pe = sub.add_parser(
        "export-key",
        help="write a recovery copy of the master key (opens the volume with --key-file)",
    )
    pe.add_argument("store")
    pe.add_argument("--passphrase-file", type=Path)
    pe.add_argument(
        "--key-file", type=Path, help="the file to create (mode 0600); default: standard output"
    )
    pe.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint (MEGAFS_S3_ENDPOINT)")


def cmd_init(args: argparse.Namespace) -> int:
    import trio

    from megafs.stores import LocalStore, open_store
    from megafs.volume.drive import Volume

    store = open_store(args.store)
    if isinstance(store, LocalStore):
        if store.root.exists() and not store.root.is_dir():
            raise UsageError(f"{args.store} exists and is not a directory")
        if store.root.is_dir() and any(store.root.iterdir()):
            if (store.root / "megafs.header").exists():
                raise VolumeError(f"{args.store} already holds a megafs volume")
            raise UsageError(f"{args.store} is not empty; a volume needs an empty directory")
        store.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    passphrase = read_passphrase(args.passphrase_file, confirm=True)
    vid = trio.run(lambda: Volume.create(store, passphrase))
    print(f"created megafs volume {vid.hex()} at {store.url}")
    return exitcodes.OK


def cmd_mount(args: argparse.Namespace) -> int:
    from megafs.mount import check_mountpoint, run_daemon, run_foreground
    from megafs.volume import maintenance

    opts = parse_options(args.options)
    passphrase_file = args.passphrase_file or opts.passphrase_file
    _setup_logging(args.debug or opts.debug)
    check_mountpoint(args.mountpoint)
    if args.key_file is not None and passphrase_file is not None:
        raise UsageError("give --passphrase-file or --key-file, not both")
    passphrase: maintenance.Secret = (
        maintenance.read_key_file(args.key_file)
        if args.key_file is not None
        else read_passphrase(passphrase_file)
    )
    mountpoint = args.mountpoint.resolve()
    if args.foreground:

        def ready(error: MegafsError | None) -> None:
            pass  # errors are raised as well, and reported by main()

        run_foreground(args.store, mountpoint, passphrase, opts, ready)
        return exitcodes.OK
    log_path = opts.cache_dir / "megafs.log"
    store = mounthelper.absolute_store(args.store)
    return run_daemon(store, mountpoint, passphrase, opts, log_path)


def cmd_link(args: argparse.Namespace) -> int:
    target = filecmds.parse_target(args.path) if ":" in args.path else None
    if args.path.startswith("mega://"):
        import trio

        from megafs.mega.mount import link_for_path

        url = args.path  # mega://EMAIL/PATH, or mega://EMAIL:/PATH as the file commands say
        if target is not None and target.path != "/":
            url = target.store + target.path
        opts = parse_options(args.options)
        password = read_passphrase(args.passphrase_file or opts.passphrase_file)
        link = trio.run(link_for_path, url, password.decode("utf-8", "replace"), opts)
    elif _names_a_volume(args.path, target):
        raise UsageError(
            f"{args.path}: public links need MEGA: files of a megafs volume have none "
            "(megafs link takes a file of a MEGA account: mega://EMAIL/PATH, or a path in "
            "a mounted one)"
        )
    else:
        try:
            link = os.getxattr(args.path, "user.megafs.link").decode()
        except OSError as exc:
            raise UsageError(
                f"{args.path}: not a file in a mounted MEGA account ({exc.strerror})"
            ) from None
    print(link)
    return exitcodes.OK


def _names_a_volume(arg: str, target: filecmds.Target | None) -> bool:
    """Whether ``arg`` names a megafs volume's store or a path in one (STORE[:/PATH]),
    rather than a file in a mounted MEGA account."""
    store = target.store if target is not None else arg
    if "://" in store:
        return not store.startswith("mega://")
    root = Path(store)
    return (root / "megafs.header").is_file()


def cmd_logout(args: argparse.Namespace) -> int:
    import trio

    from megafs.mega.mount import logout_account

    opts = parse_options(args.options)
    password = read_passphrase(args.passphrase_file or opts.passphrase_file)
    ended = trio.run(logout_account, args.account, password.decode("utf-8", "replace"), opts)
    print("logged out" if ended else "no cached session (or not this password's); nothing to do")
    return exitcodes.OK


def _status(mnt: Path, *, waiting: bool = False) -> dict[str, Any]:
    """The mount's status document; ``waiting``: also ask it to upload what waits
    now, without waiting for writes to pause (a mount of an older megafs, which does
    not know that request, just answers the status)."""
    try:
        try:
            raw = os.getxattr(mnt, (WAIT_XATTR if waiting else STATUS_XATTR).decode())
        except OSError as exc:
            if not waiting or exc.errno != errno.ENODATA:
                raise
            raw = os.getxattr(mnt, STATUS_XATTR.decode())
    except OSError as exc:
        raise MountError(f"{mnt} is not a megafs mount ({exc.strerror})") from None
    result: dict[str, Any] = json.loads(raw)
    return result


def _wait_idle(mnt: Path, timeout: float, progress: ProgressLine | None = None) -> None:
    """Poll until the mount has nothing left to upload, showing what is left on
    ``progress`` (a terminal line; nothing when it is disabled)."""
    deadline = time.monotonic() + timeout
    started = time.time()
    base: int | None = None
    while True:
        asked = time.monotonic()
        st = _status(mnt, waiting=True)  # (the mount holds it while uploads run)
        if base is None:
            base = int(st.get("uploaded_bytes", 0))
        if not st["pending_objects"] and not st["dirty_files"]:
            break
        if st.get("blocked"):
            # Uploads that only the user can unblock (e.g. the account is over quota): the
            # files stay staged, sealed, and the next mount uploads them.
            if progress is not None:
                progress.done()
            print(
                f"megafs: {st['dirty_files']} file(s) not uploaded ({st['blocked']}); "
                "they stay staged and upload on the next mount",
                file=sys.stderr,
            )
            return
        if time.monotonic() > deadline:
            if progress is not None:
                progress.done()
            raise MountError(
                f"{mnt}: still {st['pending_bytes'] / 2**20:.1f} MiB to upload after "
                f"{timeout:.0f} s; not waiting longer"
            )
        if progress is not None:
            done = max(0, int(st.get("uploaded_bytes", 0)) - base)
            total = done + int(st["pending_bytes"])
            progress.update(_upload_line(st, started), done / total if total else None)
        time.sleep(max(0.0, 0.1 - (time.monotonic() - asked)))
    if progress is not None:
        progress.done("all changes are on the store")


def _upload_line(st: dict[str, Any], since: float) -> str:
    """``uploading 312.0 MiB, 14 files, 8.1 MiB/s`` (and a recent store error)."""
    files = int(st.get("pending_files", st["dirty_files"]))
    if files:
        what = f"{files} file{'' if files == 1 else 's'}"
    else:  # only metadata left (directories, renames, deletions)
        objects = int(st["pending_objects"])
        what = f"{objects} object{'' if objects == 1 else 's'}"
    if st["pending_bytes"]:
        line = f"uploading {human_bytes(st['pending_bytes'])}, {what}"
    else:
        line = f"committing {what}"
    rate = float(st.get("upload_rate") or 0.0)
    if rate:
        line += f", {human_bytes(rate)}/s"
    when = st.get("last_error_time")
    if st.get("last_error") and isinstance(when, int | float) and when >= since - 30:
        line += f"; store error: {st['last_error']}"
    return line


def _ago(when: float) -> str:
    secs = max(0.0, time.time() - when)
    if secs < 120:
        return f"{secs:.0f} s ago"
    if secs < 7200:
        return f"{secs / 60:.0f} min ago"
    return f"{secs / 3600:.1f} h ago"


def _stamp(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def format_status(st: dict[str, Any]) -> list[str]:
    """The human ``megafs status`` lines (label, value), from the status document;
    fields an older daemon does not report are left out."""
    rows: list[tuple[str, str]] = []
    mega = st.get("drive") == "mega" or st.get("account") == "mega"
    mode = "read-only" if st.get("read_only") else "read-write"
    if mega:
        nodes = f", {st.get('nodes', 0)} nodes"
        if st.get("undecryptable_nodes"):
            nodes += f" ({st['undecryptable_nodes']} undecryptable)"
        rows.append(("drive", f"MEGA account ({mode}){nodes}, megafs pid {st.get('pid')}"))
    else:
        rows.append(("drive", f"megafs volume ({mode}), megafs pid {st.get('pid')}"))
    files = st.get("pending_files", st.get("dirty_files", 0))
    pending = f"{files} file{'' if files == 1 else 's'}, {human_bytes(st.get('pending_bytes', 0))}"
    if not mega:
        pending += f" in {st.get('pending_objects', 0)} objects"
    if st.get("dirty_files") and not mega:
        pending += f" ({st['dirty_files']} not yet staged)"
    rows.append(("uploads pending", pending))
    if st.get("blocked"):
        rows.append(("uploads blocked", str(st["blocked"])))
    rate = f"{human_bytes(float(st.get('upload_rate') or 0.0))}/s"
    if "upload_rate_window" in st:
        rate += f" (last {st['upload_rate_window']:g} s)"
    rows.append(("upload rate", f"{rate}; {human_bytes(st.get('uploaded_bytes', 0))} since mount"))
    hits, misses = st.get("cache_hits", 0), st.get("cache_misses", 0)
    ratio = st.get("cache_hit_rate")
    hit_text = "no lookups yet" if ratio is None else f"hit rate {ratio * 100:.1f}%"
    rows.append(
        (
            "cache",
            f"{human_bytes(st.get('cache_bytes', 0))} of "
            f"{human_bytes(st.get('cache_max_bytes', 0))}; {hit_text} "
            f"({hits} hits, {misses} misses)",
        )
    )
    if "dir_objects_cached" in st:
        label = "folders in memory" if mega else "directories cached"
        inodes = st.get("inodes")
        more = "" if inodes is None else f" ({inodes} inodes in memory)"
        rows.append((label, f"{st['dir_objects_cached']}{more}"))
    if st.get("rss_bytes") is not None:
        peak = st.get("peak_rss_bytes")
        peak_text = "" if peak is None else f" (peak {human_bytes(peak)})"
        rows.append(("memory", f"{human_bytes(st['rss_bytes'])} resident{peak_text}"))
    error = st.get("last_error")
    if not error:
        rows.append(("last store error", "none"))
    else:
        when = st.get("last_error_time")
        prefix = ""
        if isinstance(when, int | float):
            since = "; answered since" if st.get("last_error_recovered") else ""
            prefix = f"{_stamp(when)} ({_ago(when)}{since}): "
        count = st.get("store_errors")
        suffix = f" [{count} errors this mount]" if isinstance(count, int) and count > 1 else ""
        rows.append(("last store error", f"{prefix}{error}{suffix}"))
    rows.append(("lease", _lease_text(st)))
    rows.append(("commit errors", str(st.get("errors", 0))))
    width = max(len(label) for label, _ in rows) + 1
    return [f"{label + ':':<{width}} {value}" for label, value in rows]


def _lease_text(st: dict[str, Any]) -> str:
    state = st.get("lease_state")
    lease = st.get("lease")
    if state == "n/a":
        return "n/a (MEGA accounts have no lease)"
    if state == "lost":
        return f"lost: taken over by {st.get('lease_taken_by') or 'another mount'}"
    if isinstance(lease, dict):
        return (
            f"held by {lease.get('host')} (megafs pid {lease.get('pid')}, mount "
            f"{lease.get('mount_id')}, since {_stamp(float(lease.get('since', 0)))})"
        )
    if st.get("read_only"):
        return "none (read-only mount)"
    return "none" if state is None else str(state)


def cmd_status(args: argparse.Namespace) -> int:
    mnt = args.mountpoint.resolve()
    if args.wait_idle:
        _wait_idle(mnt, 24 * 3600.0, ProgressLine())
    st = _status(mnt)
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
    else:
        print("\n".join(format_status(st)))
    return exitcodes.OK


def cmd_umount(args: argparse.Namespace) -> int:
    mnt = args.mountpoint.resolve()
    if not mounted_at(mnt):
        raise MountError(f"{mnt} is not mounted")
    pid: int | None = None
    try:
        pid = int(os.getxattr(mnt, PID_XATTR.decode()))
        _wait_idle(mnt, args.timeout, ProgressLine())
    except (OSError, ValueError):
        pid = None
    res = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise MountError(f"cannot unmount {mnt}: {msg[-1] if msg else 'fusermount3 failed'}")
    if pid is not None:
        # The daemon makes its final commit and uploads it, then exits.
        deadline = time.monotonic() + args.timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise MountError(f"megafs process {pid} is still uploading; not waiting longer")
            time.sleep(0.05)
    return exitcodes.OK


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# ---------------------------------------------------------------- maintenance


def _secret(args: argparse.Namespace) -> maintenance.Secret:
    """The passphrase, or the master key from ``--key-file``."""
    from megafs.volume import maintenance

    if getattr(args, "key_file", None) is not None:
        if args.passphrase_file is not None:
            raise UsageError("give --passphrase-file or --key-file, not both")
        return maintenance.read_key_file(args.key_file)
    return read_passphrase(args.passphrase_file)


def _new_passphrase(args: argparse.Namespace) -> bytes:
    """The new passphrase of ``passwd``: a file, MEGAFS_NEW_PASSPHRASE or a prompt."""
    path: Path | None = args.new_passphrase_file
    if path is not None:
        try:
            data = path.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read passphrase file {path}: {exc.strerror}") from None
        if not data:
            raise UsageError(f"passphrase file {path} is empty")
        return data
    env = os.environ.get("MEGAFS_NEW_PASSPHRASE")
    if env:
        return env.encode()
    if not sys.stdin.isatty():
        raise UsageError(
            "no new passphrase: set MEGAFS_NEW_PASSPHRASE or use --new-passphrase-file "
            "(no terminal to ask on)"
        )
    first = getpass.getpass("New passphrase: ")
    if not first:
        raise UsageError("empty passphrase")
    if getpass.getpass("Repeat new passphrase: ") != first:
        raise UsageError("the passphrases do not match")
    return first.encode()


def _maintenance_store(url: str) -> ObjectStore:
    from megafs.stores import LocalStore, open_store

    store = open_store(url)
    if isinstance(store, LocalStore) and not store.root.is_dir():
        raise UsageError(f"store {url} does not exist")
    return store


def _run_on_store(url: str, fn: Callable[[ObjectStore], Awaitable[_T]]) -> _T:
    import trio

    store = _maintenance_store(url)

    async def run() -> _T:
        try:
            return await fn(store)
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()

    return trio.run(run)


class _WalkProgress:
    """fsck/gc progress on a terminal (see :mod:`megafs.progress`): the walk, with a
    bar over the chunk objects the store holds when they were counted first (orphans
    are in that count, so a volume with garbage ends short of 100%), then gc's
    deletions."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.line = ProgressLine()
        self.chunks_on_store: int | None = None
        self._deleting = False

    async def count(self, store: ObjectStore) -> None:
        """Count the store's chunk objects (one listing), for the bar: only when the
        line is shown, and a listing that fails only costs the bar."""
        if not self.line.enabled:
            return
        try:
            self.chunks_on_store = len(await store.list("c/"))
        except MegafsError:
            self.chunks_on_store = None

    def __call__(self, report: Report) -> None:
        total = self.chunks_on_store
        chunks = f"{report.chunks}/{total}" if total else str(report.chunks)
        self.line.update(
            f"{self.verb}: {report.directories} dirs, {report.files} files, "
            f"{chunks} chunks, {human_bytes(report.bytes)}",
            min(1.0, report.chunks / total) if total else None,
        )

    def deleting(self, done: int, total: int) -> None:
        first = not self._deleting
        self._deleting = True  # a new phase: shown at once
        self.line.update(f"deleting unreferenced chunks: {done}/{total}", done / total, force=first)


def cmd_passwd(args: argparse.Namespace) -> int:
    from megafs.volume import maintenance

    old = _secret(args)
    new = _new_passphrase(args)
    _run_on_store(args.store, lambda store: maintenance.change_passphrase(store, old, new))
    print("passphrase changed (the old one no longer opens the volume)")
    return exitcodes.OK


def cmd_fsck(args: argparse.Namespace) -> int:
    from megafs.volume import maintenance

    secret = _secret(args)
    progress = _WalkProgress("checking")

    async def check(store: ObjectStore) -> Report:
        await progress.count(store)
        return await maintenance.fsck(store, secret, quick=args.quick, progress=progress)

    try:
        report = _run_on_store(args.store, check)
    finally:
        progress.line.done()
    for problem in report.problems:
        print(problem)
    what = "checked for existence" if args.quick else "authenticated"
    print(
        f"{report.directories} directories, {report.files} files, {report.chunks} chunks "
        f"({report.bytes} bytes {what}); {len(report.problems)} problem(s)"
    )
    if report.problems:
        print(f"megafs: {len(report.problems)} problem(s) found", file=sys.stderr)
        return exitcodes.ERROR
    return exitcodes.OK


def cmd_gc(args: argparse.Namespace) -> int:
    from megafs.volume import maintenance

    secret = _secret(args)
    progress = _WalkProgress("scanning")

    async def collect(store: ObjectStore) -> maintenance.GcResult:
        await progress.count(store)
        return await maintenance.collect_garbage(
            store,
            secret,
            dry_run=args.dry_run,
            grace=args.grace,
            progress=progress,
            on_delete=progress.deleting,
        )

    try:
        result = _run_on_store(args.store, collect)
    finally:
        progress.line.done()
    mib = result.garbage_bytes / 2**20
    if args.dry_run:
        for info in result.garbage:
            print(f"would delete {info.key} ({info.size} bytes)")
        print(
            f"would delete {len(result.garbage)} unreferenced chunks, "
            f"{result.garbage_bytes} bytes ({mib:.1f} MiB)"
        )
    else:
        deleted_mib = result.deleted_bytes / 2**20
        print(
            f"deleted {result.deleted - len(result.scratch)} unreferenced chunks"
            + (
                f" and {len(result.scratch)} scratch objects of interrupted uploads"
                if result.scratch
                else ""
            )
            + f", {result.deleted_bytes} bytes ({deleted_mib:.1f} MiB)"
        )
    if args.dry_run and result.scratch:
        print(f"would delete {len(result.scratch)} scratch objects of interrupted uploads")
    if result.young:
        print(f"kept {result.young} unreferenced chunks younger than {args.grace:g} s")
    if result.kept_metadata or result.unknown:
        print(
            f"kept {result.kept_metadata} unreferenced directory/inode objects and "
            f"{len(result.unknown)} unknown objects (not deleted)"
        )
    return exitcodes.OK


def cmd_export_key(args: argparse.Namespace) -> int:
    from megafs.volume import maintenance

    passphrase = read_passphrase(args.passphrase_file)
    if args.key_file is not None and os.path.lexists(args.key_file):
        raise UsageError(f"{args.key_file} already exists; not overwriting it")
    vid, master = _run_on_store(
        args.store, lambda store: maintenance.master_key_of(store, passphrase)
    )
    if args.key_file is None:
        sys.stdout.buffer.write(maintenance.encode_key_file(vid, master))
        sys.stdout.flush()
        return exitcodes.OK
    maintenance.write_key_file(args.key_file, vid, master)
    print(
        f"wrote the master key of volume {vid.hex()} to {args.key_file} (mode 0600): "
        "whoever has it can read the volume, whatever the passphrase; keep it safe"
    )
    return exitcodes.OK


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if mounthelper.is_mount_fuse_call(argv):  # fstab type fuse.megafs, through mount.fuse3
        return mounthelper.main(argv)
    args = _parser().parse_args(argv)
    if getattr(args, "s3_endpoint", None):
        os.environ["MEGAFS_S3_ENDPOINT"] = args.s3_endpoint  # read by open_store (and daemon)
    try:
        handler = {
            "init": cmd_init,
            "mount": cmd_mount,
            "umount": cmd_umount,
            "status": cmd_status,
            "link": cmd_link,
            "logout": cmd_logout,
            "passwd": cmd_passwd,
            "fsck": cmd_fsck,
            "gc": cmd_gc,
            "export-key": cmd_export_key,
            **filecmds.HANDLERS,
        }[args.cmd]
        return handler(args)
    except MegafsError as exc:
        if args.debug:
            logging.exception("failed")
        print(f"megafs: {exc}", file=sys.stderr)
        return exitcodes.for_error(exc)
    except KeyboardInterrupt:
        print("megafs: interrupted", file=sys.stderr)
        return exitcodes.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
