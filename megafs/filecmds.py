"""File commands on a volume or MEGA account without mounting it: ``ls``, ``cat``,
``get``, ``put``, ``rm``, ``mkdir``, ``mv`` — the SDK (:mod:`megafs.sdk`) from the
command line.

Addressing a file: ``STORE:/PATH``. STORE is what ``megafs mount`` takes (a path,
``file://``, ``s3://BUCKET[/PREFIX]``, ``webdav+http(s)://HOST[:PORT]/PATH``,
``mega://EMAIL``); the path inside the drive starts at the **last** ``:/`` of the
argument that is not the ``://`` of a URL scheme. Without one, the argument is a STORE
and means its root::

    /srv/vol                         the root of a local volume
    /srv/vol:/photos/cat.jpg         a file in it
    s3://bucket/prefix:/photos       a directory of an S3 volume
    webdav+http://host:8080/dav:/a   the port's colon is not followed by '/'
    mega://me@example.com:/Docs      a folder of a MEGA account

(A local store whose own path contains ``:/`` cannot be named this way; use a
symbolic link to it.) The volume passphrase, or the MEGA password, comes as for
``mount``: ``MEGAFS_PASSPHRASE``, ``--passphrase-file``, a systemd credential or a
prompt; or ``--key-file`` (volumes only).

Every failure is one line ``megafs: ...`` and a non-zero exit (``main`` in
:mod:`megafs.cli` prints it). Progress of ``get``/``put`` shows on a terminal only.
``put --continue`` resumes an interrupted upload: files already there (same size and
modification time) are skipped, and of a file cut short only the chunks the store
lacks are uploaded.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from megafs import exitcodes
from megafs.config import UsageError, read_passphrase
from megafs.errors import MegafsError

if TYPE_CHECKING:
    from megafs.sdk import Drive

PIECE: Final = 1 << 20


class FileCommandError(MegafsError):
    """A file command failed on a path (exit code 1)."""

    exit_code = exitcodes.ERROR


@dataclass(frozen=True)
class Target:
    """A parsed ``STORE[:/PATH]`` argument."""

    store: str
    path: str  # inside the drive, starting with "/"

    def show(self, path: str | None = None) -> str:
        return f"{self.store}:{path if path is not None else self.path}"


def parse_target(arg: str) -> Target:
    """Split ``STORE[:/PATH]`` (see the module docstring)."""
    i = len(arg)
    while True:
        i = arg.rfind(":/", 0, i)
        if i < 0:
            store, path = arg, "/"
            break
        if not arg.startswith("//", i + 1):  # not the "://" of a scheme
            store, path = arg[:i], arg[i + 1 :]
            break
    if store.endswith(":") and "://" not in store[-3:]:
        store = store[:-1]  # "STORE:" names the root too
    if not store:
        raise UsageError(f"{arg!r}: no store before ':/'")
    return Target(store, "/" + path.strip("/"))


# ---------------------------------------------------------------- plumbing


def add_parsers(sub: Any) -> None:
    """Register the file commands on the ``megafs`` subparsers."""

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--passphrase-file", type=Path)
        q.add_argument("--key-file", type=Path, help="open with a key file (megafs export-key)")
        q.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint (MEGAFS_S3_ENDPOINT)")
        q.add_argument("--cache-dir", type=Path, help="local state (default: the mount's)")

    where = "STORE[:/PATH] (see 'megafs ls --help')"
    p = sub.add_parser(
        "ls",
        help="list a directory of a volume or MEGA account (no mount needed)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="STORE[:/PATH]")
    p.add_argument("-l", dest="long", action="store_true", help="long listing")
    p.add_argument("-R", dest="recursive", action="store_true", help="list subdirectories too")
    common(p)
    p = sub.add_parser("cat", help="write files of a volume or MEGA account to standard output")
    p.add_argument("targets", nargs="+", metavar=where)
    common(p)
    p = sub.add_parser("get", help="copy a file or directory (-r) out of a volume or MEGA account")
    p.add_argument("target", metavar=where)
    p.add_argument("local", type=Path, metavar="LOCAL")
    p.add_argument("-r", dest="recursive", action="store_true", help="copy directories")
    p.add_argument("-c", "--continue", dest="resume", action="store_true", help=_RESUME)
    common(p)
    p = sub.add_parser(
        "put", help="copy a local file or directory (-r) into a volume or MEGA account"
    )
    p.add_argument("local", type=Path, metavar="LOCAL")
    p.add_argument("target", metavar=where)
    p.add_argument("-r", dest="recursive", action="store_true", help="copy directories")
    p.add_argument("-c", "--continue", dest="resume", action="store_true", help=_RESUME)
    common(p)
    p = sub.add_parser(
        "rm", help="remove files (or directories, with -r) of a volume or MEGA account"
    )
    p.add_argument("targets", nargs="+", metavar=where)
    p.add_argument("-r", dest="recursive", action="store_true", help="remove directories too")
    common(p)
    p = sub.add_parser("mkdir", help="make directories in a volume or MEGA account")
    p.add_argument("targets", nargs="+", metavar=where)
    p.add_argument(
        "-p", dest="parents", action="store_true", help="make parents, no error if there"
    )
    common(p)
    p = sub.add_parser("mv", help="rename or move within a volume or MEGA account")
    p.add_argument("source", metavar=where)
    p.add_argument("dest", metavar=where)
    common(p)


_RESUME = "skip files already copied (same size and mtime): resume an interrupted copy"


def _run(
    args: argparse.Namespace,
    targets: list[Target],
    fn: Callable[[Drive], Awaitable[int]],
    *,
    read_only: bool,
) -> int:
    # (imported here: `megafs status` and `umount` load this module too, and start
    # faster without the drive and trio)
    import trio

    from megafs.mega.stack import SCHEME as MEGA_SCHEME
    from megafs.sdk import PathError, open_drive

    stores = {t.store for t in targets}
    if len(stores) != 1:
        raise UsageError("all paths must be on the same store")
    store = targets[0].store
    if args.key_file is not None and args.passphrase_file is not None:
        raise UsageError("give --passphrase-file or --key-file, not both")
    credentials: dict[str, Any] = {}
    if store.startswith(MEGA_SCHEME):
        if args.key_file is not None:
            raise UsageError("a MEGA account opens with its password, not a key file")
        try:
            credentials["mega_password"] = read_passphrase(args.passphrase_file).decode()
        except UnicodeDecodeError:
            raise UsageError("the MEGA password is not valid UTF-8") from None
    elif args.key_file is not None:
        credentials["key_file"] = args.key_file
    else:
        credentials["passphrase"] = read_passphrase(args.passphrase_file)

    async def main() -> int:
        async with open_drive(
            store, read_only=read_only, cache_dir=args.cache_dir, **credentials
        ) as drive:
            return await fn(drive)

    try:
        return trio.run(main)
    except PathError as exc:
        where = store if exc.filename is None else f"{store}:{exc.filename}"
        if exc.filename2 is not None:
            where += f" -> {store}:{exc.filename2}"
        raise FileCommandError(f"{where}: {exc.strerror}") from None
    except OSError as exc:  # the local side of get/put
        name = f"{exc.filename}: " if exc.filename else ""
        raise FileCommandError(f"{name}{exc.strerror or exc}") from None


class _Progress:
    """``get``/``put`` progress on standard error, on a terminal only."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        self.last = 0.0
        self.start = time.monotonic()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and done < total):
            return
        self.last = now
        self.shown = True
        pct = 100.0 * done / total if total else 100.0
        rate = done / max(now - self.start, 1e-6) / 2**20
        print(
            f"\r\033[K{done / 2**20:.1f} / {total / 2**20:.1f} MiB ({pct:.0f}%), {rate:.1f} MiB/s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def done(self) -> None:
        if self.shown:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- commands


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _owner(uid: int, gid: int) -> tuple[str, str]:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return user, group


def cmd_ls(args: argparse.Namespace) -> int:
    t = parse_target(args.target)

    async def ls(drive: Drive) -> int:
        st = await drive.lstat(t.path)
        if not stat.S_ISDIR(st.st_mode):
            entries = [(t.path.rsplit("/", 1)[-1], t.path, st)]
            await _print_entries(drive, entries, args.long)
            return exitcodes.OK
        todo = [t.path]
        first = True
        while todo:
            path = todo.pop(0)
            listing = sorted(await drive.scandir(path), key=lambda e: e.name)
            if args.recursive:
                print(("" if first else "\n") + f"{path}:")
            first = False
            await _print_entries(drive, [(e.name, e.path, e.stat) for e in listing], args.long)
            if args.recursive:
                todo[:0] = [e.path for e in listing if e.is_dir()]
        return exitcodes.OK

    return _run(args, [t], ls, read_only=True)


async def _print_entries(drive: Drive, entries: list[tuple[str, str, Any]], long: bool) -> None:
    for name, path, st in entries:
        if not long:
            print(name)
            continue
        user, group = _owner(st.st_uid, st.st_gid)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.st_mtime))
        line = f"{stat.filemode(st.st_mode)} {st.st_nlink:>3} {user:<8} {group:<8} "
        line += f"{st.st_size:>12} {when} {name}"
        if stat.S_ISLNK(st.st_mode):
            line += f" -> {await drive.readlink(path)}"
        print(line)


def cmd_cat(args: argparse.Namespace) -> int:
    targets = [parse_target(a) for a in args.targets]
    out = sys.stdout.buffer

    async def cat(drive: Drive) -> int:
        for t in targets:
            async with await drive.open(t.path, "rb") as f:
                async for piece in f.chunks(PIECE):
                    out.write(piece)
        out.flush()
        return exitcodes.OK

    return _run(args, targets, cat, read_only=True)


def cmd_get(args: argparse.Namespace) -> int:
    t = parse_target(args.target)
    local: Path = args.local
    progress = _Progress()

    async def get(drive: Drive) -> int:
        st = await drive.stat(t.path)
        if stat.S_ISDIR(st.st_mode) and not args.recursive:
            raise UsageError(f"{t.show()} is a directory (use -r)")
        # Into LOCAL if it is a directory (the volume's root by the store's name).
        dest = local
        if local.is_dir():
            dest = local / (_basename(t.path) or Path(t.store.rstrip("/")).name or "volume")
        try:
            await drive.download(t.path, dest, progress=progress, skip_unchanged=args.resume)
        finally:
            progress.done()
        return exitcodes.OK

    return _run(args, [t], get, read_only=True)


def cmd_put(args: argparse.Namespace) -> int:
    t = parse_target(args.target)
    local: Path = args.local
    if not os.path.lexists(local):
        raise FileCommandError(f"{local}: No such file or directory")
    if local.is_dir() and not local.is_symlink() and not args.recursive:
        raise UsageError(f"{local} is a directory (use -r)")
    progress = _Progress()

    async def put(drive: Drive) -> int:
        dest = t.path
        if await drive.is_dir(dest):  # into an existing directory, as cp(1)
            dest = dest.rstrip("/") + "/" + local.resolve().name
        try:
            result = await drive.upload(local, dest, progress=progress, skip_unchanged=args.resume)
        finally:
            progress.done()
        for path in result.not_copied:
            print(f"megafs: {path}: not copied (not a file, directory or link)", file=sys.stderr)
        return exitcodes.OK

    return _run(args, [t], put, read_only=False)


def cmd_rm(args: argparse.Namespace) -> int:
    targets = [parse_target(a) for a in args.targets]

    async def rm(drive: Drive) -> int:
        for t in targets:
            st = await drive.lstat(t.path)
            if t.path == "/":
                raise UsageError(f"{t.show()}: refusing to remove the root")
            if stat.S_ISDIR(st.st_mode):
                if not args.recursive:
                    raise UsageError(f"{t.show()} is a directory (use -r)")
                await drive.rmtree(t.path)
            else:
                await drive.remove(t.path)
        return exitcodes.OK

    return _run(args, targets, rm, read_only=False)


def cmd_mkdir(args: argparse.Namespace) -> int:
    targets = [parse_target(a) for a in args.targets]

    async def mkdir(drive: Drive) -> int:
        for t in targets:
            await drive.mkdir(t.path, parents=args.parents, exist_ok=args.parents)
        return exitcodes.OK

    return _run(args, targets, mkdir, read_only=False)


def cmd_mv(args: argparse.Namespace) -> int:
    src, dst = parse_target(args.source), parse_target(args.dest)

    async def mv(drive: Drive) -> int:
        dest = dst.path
        if await drive.is_dir(dest):  # into an existing directory, as mv(1)
            dest = dest.rstrip("/") + "/" + _basename(src.path)
        await drive.rename(src.path, dest)
        return exitcodes.OK

    return _run(args, [src, dst], mv, read_only=False)


HANDLERS: Final[dict[str, Callable[[argparse.Namespace], int]]] = {
    "ls": cmd_ls,
    "cat": cmd_cat,
    "get": cmd_get,
    "put": cmd_put,
    "rm": cmd_rm,
    "mkdir": cmd_mkdir,
    "mv": cmd_mv,
}
