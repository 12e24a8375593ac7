"""``mount.megafs STORE MOUNTPOINT [-o OPTIONS]``: the helper mount(8) runs for
``-t megafs`` and fstab lines of type ``megafs``.

It turns fstab options into ``megafs mount`` options (options meant only for
mount(8), fstab or systemd are dropped by :func:`megafs.config.parse_options`), and
returns once the mount is live, or prints the daemon's error and exits non-zero.
The passphrase comes from ``passphrase_file=`` or a systemd credential, never from
the fstab line itself.
"""

from __future__ import annotations

import sys

from megafs import cli


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-o" and i + 1 < len(args):
            options.append(args[i + 1])
            i += 2
            continue
        if a in ("-n", "-s", "-f", "-v"):  # mount(8) flags with no meaning here
            i += 1
            continue
        positional.append(a)
        i += 1
    if len(positional) != 2:
        print("usage: mount.megafs STORE MOUNTPOINT [-o OPTIONS]", file=sys.stderr)
        return 2
    forwarded = ["mount", positional[0], positional[1]]
    for o in options:
        forwarded += ["-o", o]
    return cli.main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
