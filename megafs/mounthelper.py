"""The fstab helper: ``mount.megafs STORE MOUNTPOINT [-sfnv] [-o OPTIONS]``.

Two ways in, one code path:

- ``TYPE megafs`` (fstab, ``mount -t megafs``): mount(8) runs ``/sbin/mount.megafs STORE
  MOUNTPOINT [-sfnv] [-N NS] -o OPTIONS``. mount(8) looks for helpers in /sbin (and
  /sbin/fs.d, /sbin/fs) only, never along PATH: ``scripts/setup`` links
  /usr/sbin/mount.megafs (which is /sbin on merged-/usr systems).
- ``TYPE fuse.megafs`` (fstab, ``mount -t fuse.megafs``): mount(8) runs /sbin/mount.fuse3,
  which drops ``_netdev``, ``nofail``, ``user(s)``, ``(no)auto``, appends ``dev,suid`` and
  runs ``sh -c 'megafs STORE MOUNTPOINT -o OPTIONS'``, found along the PATH that mount(8)
  sets (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin): ``scripts/setup``
  links /usr/local/bin/megafs. :func:`megafs.cli.main` sends that calling form here. With
  the type written ``fuse./abs/path/to/megafs`` mount.fuse3 runs that file, no PATH needed.

Options are parsed the fstab way by :func:`megafs.config.parse_options` (what only
mount(8), fstab or systemd reads is dropped; ``fsname=`` and ``subtype=megafs`` reach
libfuse). Then ``megafs mount`` forks the daemon and returns once the mount is listed in
/proc/self/mountinfo (bounded by ``mount_timeout=``), or prints the daemon's one-line
error and exits non-zero. The passphrase comes from ``passphrase_file=`` or the systemd
credential ``megafs-passphrase`` ($CREDENTIALS_DIRECTORY), never from the fstab line.
"""

from __future__ import annotations

import os
import re
import sys

from megafs import exitcodes

USAGE = "usage: mount.megafs STORE MOUNTPOINT [-sfnv] [-o OPTIONS]"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def absolute_store(store: str) -> str:
    """``store`` with a local path made absolute (a URL is left as it is): the
    daemon works from /, where a relative path names something else."""
    return store if _URL.match(store) else os.path.abspath(store)


def is_mount_fuse_call(argv: list[str]) -> bool:
    """Whether ``megafs ARGV`` is mount.fuse3's ``megafs STORE MOUNTPOINT -o OPTIONS``:
    a store path or URL (it has a ``/`` or ``:``, which no subcommand has) where a
    subcommand would be, and ``-o`` after the mountpoint."""
    return (
        len(argv) >= 3
        and not argv[0].startswith("-")
        and ("/" in argv[0] or ":" in argv[0])
        and argv[2] == "-o"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the helper on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options: list[str] = []
    fake = False
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-o", "-t", "-N"):
            if i + 1 == len(args):
                print(f"mount.megafs: {a} needs an argument\n{USAGE}", file=sys.stderr)
                return exitcodes.USAGE
            if a == "-o":
                options.append(args[i + 1])
            elif a == "-N":
                print(
                    "mount.megafs: -N (another mount namespace) is not supported", file=sys.stderr
                )
                return exitcodes.USAGE
            i += 2  # -t TYPE: mount.fuse style; the type is megafs whatever it says
            continue
        if a in ("-h", "--help"):
            print(USAGE)
            return exitcodes.OK
        if a.startswith("-") and len(a) > 1 and set(a[1:]) <= set("sfnvrw"):
            # mount(8): -s sloppy, -n no mtab, -v verbose, -r/-w ro/rw (also in -o):
            # nothing to do; -f fake: do everything but mount, i.e. nothing.
            fake = fake or "f" in a
            if "r" in a:
                options.append("ro")
            i += 1
            continue
        positional.append(a)
        i += 1
    if len(positional) != 2:
        print(USAGE, file=sys.stderr)
        return exitcodes.USAGE
    store, mountpoint = positional
    store = absolute_store(store)
    if fake:
        return exitcodes.OK
    from megafs import cli  # here, not at the top: cli imports this module

    forwarded = ["mount", store, mountpoint]
    for o in options:
        forwarded += ["-o", o]
    return cli.main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
