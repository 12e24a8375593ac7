"""The ``megafs`` command.

Every failure prints one line ``megafs: ...`` to stderr and exits non-zero (see
:mod:`megafs.exitcodes`); tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import trio

from megafs import exitcodes
from megafs.config import UsageError, parse_options, read_passphrase
from megafs.errors import MegafsError, VolumeError
from megafs.mount import (
    PID_XATTR,
    MountError,
    check_mountpoint,
    mounted_at,
    run_daemon,
    run_foreground,
)
from megafs.stores import LocalStore, open_store
from megafs.volume.drive import Volume

log = logging.getLogger("megafs")


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pyfuse3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megafs", description="End-to-end encrypted drive.")
    p.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    pi = sub.add_parser("init", help="create a volume (asks the passphrase twice)")
    pi.add_argument("store")
    pi.add_argument("--passphrase-file", type=Path)

    pm = sub.add_parser("mount", help="mount a volume; returns once the mount is live")
    pm.add_argument("store")
    pm.add_argument("mountpoint", type=Path)
    pm.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    pm.add_argument("-f", "--foreground", action="store_true")
    pm.add_argument("--passphrase-file", type=Path)

    pu = sub.add_parser("umount", help="commit everything, then unmount")
    pu.add_argument("mountpoint", type=Path)
    pu.add_argument("--timeout", type=float, default=3600.0)
    return p


def cmd_init(args: argparse.Namespace) -> int:
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
    opts = parse_options(args.options)
    passphrase_file = args.passphrase_file or opts.passphrase_file
    _setup_logging(args.debug or opts.debug)
    check_mountpoint(args.mountpoint)
    passphrase = read_passphrase(passphrase_file)
    mountpoint = args.mountpoint.resolve()
    if args.foreground:

        def ready(error: MegafsError | None) -> None:
            pass  # errors are raised as well, and reported by main()

        run_foreground(args.store, mountpoint, passphrase, opts, ready)
        return exitcodes.OK
    log_path = opts.cache_dir / "megafs.log"
    return run_daemon(args.store, mountpoint, passphrase, opts, log_path)


def cmd_umount(args: argparse.Namespace) -> int:
    mnt = args.mountpoint.resolve()
    if not mounted_at(mnt):
        raise MountError(f"{mnt} is not mounted")
    pid: int | None = None
    try:
        pid = int(os.getxattr(mnt, PID_XATTR.decode()))
    except (OSError, ValueError):
        pid = None
    tool = "fusermount3"
    res = subprocess.run([tool, "-u", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise MountError(f"cannot unmount {mnt}: {msg[-1] if msg else 'fusermount3 failed'}")
    if pid is not None:
        deadline = time.monotonic() + args.timeout
        announced = False
        while _alive(pid):
            if time.monotonic() > deadline:
                raise MountError(
                    f"the megafs process {pid} is still committing; not waiting longer"
                )
            if not announced and sys.stderr.isatty():
                print("megafs: committing pending changes to the store...", file=sys.stderr)
                announced = True
            time.sleep(0.05)
    return exitcodes.OK


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        handler = {"init": cmd_init, "mount": cmd_mount, "umount": cmd_umount}[args.cmd]
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
