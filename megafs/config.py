"""Mount options, passphrase sources and default locations."""

from __future__ import annotations

import getpass
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megafs import exitcodes
from megafs.errors import MegafsError


class UsageError(MegafsError):
    """The command line or an option is wrong."""

    exit_code = exitcodes.USAGE


def xdg_dir(var: str, fallback: str) -> Path:
    """``$VAR``, or ``~/FALLBACK`` when it is unset or relative (the XDG spec ignores
    relative ones; the daemon works from /, where they would name something else)."""
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def default_cache_root() -> Path:
    return xdg_dir("XDG_CACHE_HOME", ".cache") / "megafs"


def default_config_dir() -> Path:
    return xdg_dir("XDG_CONFIG_HOME", ".config") / "megafs"


def default_data_dir() -> Path:
    return xdg_dir("XDG_DATA_HOME", ".local/share") / "megafs"


@dataclass
class MountOptions:
    """Parsed ``-o`` options."""

    read_only: bool = False
    allow_other: bool = False
    cache_dir: Path = field(default_factory=default_cache_root)
    commit_interval: float = 1.0
    # Uploads start once writes have paused this long (StagingStore: "When").
    upload_delay: float = 1.0
    # Read-only mounts: seconds between checks of loaded directories for changes made by
    # the volume's writer elsewhere.
    dir_cache_time: float = 30.0
    debug: bool = False
    fsname: str | None = None
    passphrase_file: Path | None = None
    cache_size: int | None = None  # bytes; None: a share of the free disk space
    staging_size: int | None = None  # bytes; None: a share of the free disk space
    fsync_remote: bool = False
    # Benchmarks/tests: make the store behave like a distant one.
    store_latency: float = 0.0
    store_bandwidth: int = 0
    # MEGA accounts: which root to mount, and whether deletes skip the Rubbish Bin.
    mega_root: str = "drive"
    mega_delete_permanent: bool = False
    # Daemon mode: how long ``megafs mount`` (and so mount.megafs) waits for the mount.
    mount_timeout: float = 120.0
    # Kernel mount flags passed through to libfuse (``noexec``; ``nosuid`` and ``nodev``
    # are on for every megafs mount anyway, whatever mount(8) or mount.fuse3 add).
    mount_flags: set[str] = field(default_factory=set)
    # Nodes in the inode table past which cold directories are unloaded (Vfs.evict_cold).
    inode_cache: int = 10_000

    def cache_max_bytes(self, where: Path) -> int:
        """The block cache cap: ``cache_size=``, or a quarter of the free space
        (at most 10 GiB, at least 64 MiB)."""
        if self.cache_size is not None:
            return self.cache_size
        return max(64 << 20, min(10 << 30, _free_bytes(where) // 4))

    def staging_max_bytes(self, where: Path) -> int:
        """How much not-yet-uploaded data may wait on local disk before writers
        are slowed down: ``staging_size=``, or half the free space (at most 20 GiB,
        at least 256 MiB)."""
        if self.staging_size is not None:
            return self.staging_size
        return max(256 << 20, min(20 << 30, _free_bytes(where) // 2))

    def fuse_options(self, store_url: str) -> set[str]:
        opts = {"default_permissions", "subtype=megafs", f"fsname={self.fsname or store_url}"}
        if self.read_only:
            opts.add("ro")
        if self.allow_other:
            opts.add("allow_other")
        return opts | self.mount_flags


# Options that only matter to mount(8), fstab or systemd, and the defaults mount(8) and
# mount.fuse3 add (``rw``, ``dev``, ``suid``: megafs mounts are always nosuid,nodev); ignored.
# ``x-*``/``X-*`` options and ``comment=`` are ignored too (fstab comments, systemd's).
_IGNORED = {
    "rw",
    "defaults",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "dev",
    "suid",
    "exec",
    "atime",
    "noatime",
    "relatime",
    "async",
}


# Set by megafs itself whatever the options say (``subtype=megafs``), or fstab comments.
_NAMED_ELSEWHERE = {"subtype", "comment"}


# Options given in seconds: name -> (lowest, highest, whether the lowest itself is allowed).
_SECONDS: dict[str, tuple[float, float, bool]] = {
    "dir_cache_time": (0, 86400, True),
    "commit_interval": (0, 3600, False),
    "upload_delay": (0, 3600, True),
    "store_latency": (0, 3600, True),
    "mount_timeout": (0, float("inf"), False),
}


def _seconds(name: str, value: str) -> float:
    """The value of seconds-valued option ``name`` (see _SECONDS), checked."""
    low, high, low_ok = _SECONDS[name]
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"{name}={value}: not a number of seconds") from None
    if not (low <= seconds if low_ok else low < seconds) or not seconds <= high:
        above = f"at least {low:g}" if low_ok else f"more than {low:g}"
        upto = "" if high == float("inf") else f" and at most {high:g}"
        raise UsageError(f"{name} must be {above}{upto} seconds")
    return seconds


def parse_options(specs: list[str]) -> MountOptions:
    """Parse ``-o a,b=c`` strings; an unknown option is a :class:`UsageError`."""
    opts = MountOptions()
    for spec in specs:
        for item in filter(None, spec.split(",")):
            name, _, value = item.partition("=")
            if name == "ro":
                opts.read_only = True
            elif name == "allow_other":
                opts.allow_other = True
            elif name == "cache_dir" and value:
                # (absolute: the daemon works from /)
                opts.cache_dir = Path(value).expanduser().absolute()
            elif name in _SECONDS and value:
                setattr(opts, name, _seconds(name, value))
            elif name == "store_bandwidth" and value:
                opts.store_bandwidth = parse_size(value, name)
            elif name in ("cache_size", "staging_size") and value:
                setattr(opts, name, parse_size(value, name))
            elif name == "fsync" and value in ("local", "remote"):
                opts.fsync_remote = value == "remote"
            elif name == "mega_root" and value in ("drive", "rubbish", "inbox"):
                opts.mega_root = value
            elif name == "mega_delete" and value in ("rubbish", "permanent"):
                opts.mega_delete_permanent = value == "permanent"
            elif name == "debug":
                opts.debug = True
            elif name == "fsname" and value:
                opts.fsname = value
            elif name == "passphrase_file" and value:
                opts.passphrase_file = Path(value)
            elif name == "inode_cache" and value:
                if not value.isdigit():
                    raise UsageError(f"inode_cache={value}: not a number of inodes")
                opts.inode_cache = int(value)
            elif name in ("noexec", "nosuid", "nodev"):
                opts.mount_flags.add(name)
            elif name == "passphrase":
                # Never echo it: options show in ps, logs and error messages.
                raise UsageError(
                    "the passphrase never goes in the mount options (they show in ps and "
                    "the logs): use passphrase_file=FILE or the systemd credential "
                    "megafs-passphrase"
                )
            elif name in _IGNORED or name.lower().startswith("x-") or name in _NAMED_ELSEWHERE:
                continue
            else:
                raise UsageError(f"unknown mount option {item!r}")
    return opts


def parse_size(value: str, what: str) -> int:
    """``512M``, ``2G``, ``1.5T``, ``4096`` (bytes) -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    v = value.strip().upper().removesuffix("IB").removesuffix("B")
    unit = v[-1:] if v[-1:] in units else ""
    try:
        n = float(v[: len(v) - len(unit)])
    except ValueError:
        raise UsageError(f"{what}={value}: not a size (e.g. 512M, 2G)") from None
    if n < 0:
        raise UsageError(f"{what}={value}: must not be negative")
    return int(n * units[unit])


def _free_bytes(where: Path) -> int:
    p = where
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def read_passphrase(passphrase_file: Path | None, *, confirm: bool = False) -> bytes:
    """The volume passphrase: ``MEGAFS_PASSPHRASE``, a file, a systemd credential,
    or a prompt on the terminal. Never a command-line argument."""
    if passphrase_file is not None:
        try:
            data = passphrase_file.read_bytes()
        except OSError as exc:
            raise UsageError(
                f"cannot read passphrase file {passphrase_file}: {exc.strerror}"
            ) from None
        data = data.rstrip(b"\r\n")
        if not data:
            raise UsageError(f"passphrase file {passphrase_file} is empty")
        return data
    env = os.environ.get("MEGAFS_PASSPHRASE")
    if env:
        return env.encode()
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / "megafs-passphrase").exists():
        return read_passphrase(Path(cred_dir) / "megafs-passphrase")
    if not sys.stdin.isatty():
        raise UsageError(
            "no passphrase: set MEGAFS_PASSPHRASE or use --passphrase-file (no terminal to ask on)"
        )
    first = getpass.getpass("Volume passphrase: ")
    if not first:
        raise UsageError("empty passphrase")
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise UsageError("the passphrases do not match")
    return first.encode()
