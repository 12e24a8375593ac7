"""Zero knowledge: nothing the user wrote is visible on the store or in the cache dir.

Files, directories, symlinks, hard links and xattrs with distinctive names and contents
go through a real mount; after unmounting, every object on the store (and every key,
i.e. every path under the store directory) and every file in the mount's cache dir is
searched for those strings, raw and in UTF-16.
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import Mount

FILE_NAME = "secret-name-4f7c1e9d2a60b.txt"
DIR_NAME = "classified-dir-9a2b7c3d4e5f6"
NESTED_NAME = "nested-secret-b81c2d3e4f5a6.doc"
LINK_NAME = "symlink-name-d41e2f3a4b5c6"
HARDLINK_NAME = "hardlink-name-a1b2c3d4e5f67"
BIG_NAME = "big-secret-name-77aa88bb99cc0.bin"
SYMLINK_TARGET = "zk-symlink-target-e6a1d0f29b37/nowhere/at-all"
XATTR_NAME = "user.zk-xattr-name-5b8d0e61a7c3"
XATTR_VALUE = "zk-xattr-value-0a9f8e7d6c5b4"
SMALL_TEXT = "ZK-CONTENT-SMALL-7e1f0c2b9a44 "
MEDIUM_TEXT = "ZK-CONTENT-MEDIUM-2c4e6a8b0d13 "
LARGE_TEXT = "ZK-CONTENT-LARGE-c3d5a9e8f1b27 "

SECRETS = [
    FILE_NAME,
    DIR_NAME,
    NESTED_NAME,
    LINK_NAME,
    HARDLINK_NAME,
    BIG_NAME,
    SYMLINK_TARGET,
    XATTR_NAME,
    XATTR_VALUE,
    SMALL_TEXT,
    MEDIUM_TEXT,
    LARGE_TEXT,
]


def _fill(text: str, size: int) -> bytes:
    return (text * (size // len(text) + 1)).encode()[:size]


def _needles() -> dict[bytes, str]:
    """Byte patterns to look for -> what they are. The distinctive core of each
    secret is searched too, so a truncated or re-cased copy is found as well."""
    out: dict[bytes, str] = {}
    for s in SECRETS:
        core = s.strip()
        variants = {core, core.split("/")[0], core.removeprefix("user."), core.lower()}
        for v in variants:
            for enc in ("utf-8", "utf-16-le", "utf-16-be"):
                out[v.encode(enc)] = f"{v!r} ({enc})"
    return out


def _leaks(root: Path) -> list[str]:
    """Every (file or relative path, secret) hit under ``root``."""
    needles = _needles()
    hits = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root)).encode()
            for needle, what in needles.items():
                if needle in rel:
                    hits.append(f"path {rel!r} contains {what}")
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                for needle, what in needles.items():
                    if needle in data:
                        hits.append(f"{p} contains {what}")
    return hits


def test_leak_scanner_finds_planted_secrets(tmp_path: Path) -> None:
    # The scanner itself must be able to see what it looks for.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "blob").write_bytes(b"\0junk" + SYMLINK_TARGET.encode("utf-16-le") + b"x")
    (tmp_path / "a" / DIR_NAME).mkdir()
    (tmp_path / "plain").write_bytes(_fill(LARGE_TEXT, 100_000)[7:])
    hits = "\n".join(_leaks(tmp_path))
    assert "utf-16-le" in hits and "path" in hits and "ZK-CONTENT-LARGE" in hits


def _write_tree(root: Path) -> dict[str, bytes]:
    d = root / DIR_NAME
    d.mkdir()
    files = {
        FILE_NAME: _fill(SMALL_TEXT, 3000),  # inline in its directory entry
        f"{DIR_NAME}/{NESTED_NAME}": _fill(MEDIUM_TEXT, 200_000),
        f"{DIR_NAME}/{BIG_NAME}": _fill(LARGE_TEXT, 9 * 1024 * 1024 + 333),
        "utf16.txt": _fill(SMALL_TEXT, 1000).decode().encode("utf-16-le"),
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    os.link(root / FILE_NAME, d / HARDLINK_NAME)  # moves the record into an inode object
    files[f"{DIR_NAME}/{HARDLINK_NAME}"] = files[FILE_NAME]
    (d / LINK_NAME).symlink_to(SYMLINK_TARGET)
    for p in (root / FILE_NAME, d, d / NESTED_NAME):
        os.setxattr(p, XATTR_NAME, XATTR_VALUE.encode())
    # A secret name that was renamed away and one that was deleted.
    (root / f"old-{FILE_NAME}").write_bytes(b"x")
    os.rename(root / f"old-{FILE_NAME}", root / "renamed")
    files["renamed"] = b"x"
    (d / f"deleted-{NESTED_NAME}").write_bytes(_fill(MEDIUM_TEXT, 5000))
    fd = os.open(d / f"deleted-{NESTED_NAME}", os.O_RDONLY)
    os.fsync(fd)  # its directory entry reaches the store before the unlink
    os.close(fd)
    os.unlink(d / f"deleted-{NESTED_NAME}")
    return files


def test_store_and_cache_reveal_nothing(mount: Mount) -> None:
    files = _write_tree(mount.path)
    mount.restart()  # everything goes through the store and comes back
    for rel, data in files.items():
        assert (mount.path / rel).read_bytes() == data, rel
    assert os.readlink(mount.path / DIR_NAME / LINK_NAME) == SYMLINK_TARGET
    assert os.getxattr(mount.path / FILE_NAME, XATTR_NAME) == XATTR_VALUE.encode()
    mount.stop()

    objects = [p for p in mount.store.rglob("*") if p.is_file()]
    # The data really is on the store (9 MiB of it), just not readable.
    assert sum(p.stat().st_size for p in objects) > 9 * 1024 * 1024
    assert any(p.parts[-3] == "c" for p in objects if len(p.parts) >= 3)
    leaks = _leaks(mount.store)
    assert not leaks, "the store reveals:\n" + "\n".join(leaks)
    assert mount.cache.exists()
    leaks = _leaks(mount.cache)
    assert not leaks, "the cache dir reveals:\n" + "\n".join(leaks)
    # A daemonized mount writes its log into the cache dir (here it is kept apart).
    log = mount.log.read_bytes()
    leaks = [f"log: {what}" for needle, what in _needles().items() if needle in log]
    assert not leaks, "the daemon log reveals:\n" + "\n".join(leaks)
