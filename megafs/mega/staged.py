"""Local copies of MEGA files being written, sealed at rest.

MEGA files are immutable: a changed file is written to a local staging file and
uploaded whole as a new node on flush/fsync/close. The staging file holds the
content encrypted with AES-128-CTR under a random key of its own (not the key the
upload will use), so nothing plaintext rests on local disk; CTR keeps random
writes cheap. Next to it, ``<id>.meta`` records what the upload is for (parent
handle, name, the node it replaces, mtime), encrypted as MEGA attributes with the
same key, and the key itself wrapped with the account's master key: after a crash
the next mount can still upload it (see :func:`load_pending`).

Files are small-I/O synchronous calls (pread/pwrite on a local disk), made inline.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megafs.mega import crypto

log = logging.getLogger(__name__)


@dataclass
class Target:
    """What a staged file becomes when uploaded."""

    parent: str
    name: str
    replaces: str | None
    mtime: int
    attrs: dict[str, Any]


class Staged:
    """One staging file (see the module docstring). Not safe for concurrent use:
    the owning inode's lock serialises writers."""

    def __init__(self, directory: Path, ident: str, key: bytes, size: int = 0) -> None:
        self.directory = directory
        self.ident = ident
        self.key = key[:16]
        self.nonce = key[16:24]
        self.path = directory / f"{ident}.data"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.fd = fd
        self.size = size
        if size == 0:
            os.ftruncate(fd, 0)

    @classmethod
    def new(cls, directory: Path) -> Staged:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return cls(directory, secrets.token_hex(12), secrets.token_bytes(24))

    def write(self, off: int, data: bytes) -> None:
        if off > self.size:
            self._zero_fill(self.size, off)
        os.pwrite(self.fd, crypto.ctr_crypt(self.key, self.nonce, off, data), off)
        self.size = max(self.size, off + len(data))

    def _zero_fill(self, start: int, end: int) -> None:
        step = 1 << 20
        for pos in range(start, end, step):
            n = min(step, end - pos)
            os.pwrite(self.fd, crypto.ctr_crypt(self.key, self.nonce, pos, bytes(n)), pos)

    def read(self, off: int, size: int) -> bytes:
        end = min(off + size, self.size)
        if off >= end:
            return b""
        data = os.pread(self.fd, end - off, off)
        if len(data) < end - off:
            data += bytes(end - off - len(data))  # a hole left by a crash: zeros
        return crypto.ctr_crypt(self.key, self.nonce, off, data)

    def truncate(self, size: int) -> None:
        if size > self.size:
            self._zero_fill(self.size, size)
        else:
            os.ftruncate(self.fd, size)
        self.size = size

    def sync(self) -> None:
        os.fsync(self.fd)

    def save_target(self, target: Target, master_key: bytes, *, durable: bool = True) -> None:
        """Record what this file is for, so a crash does not lose it (``durable``:
        fsync'ed, the staged data too)."""
        meta = {
            "k": crypto.encrypt_key(master_key, self.key + self.nonce + bytes(8)),
            "a": crypto.encrypt_attributes(
                {
                    "p": target.parent,
                    "n": target.name,
                    "r": target.replaces,
                    "m": target.mtime,
                    "at": target.attrs,
                    "s": self.size,
                },
                self.key,
            ),
        }
        tmp = self.directory / f"{self.ident}.meta.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            json.dump(meta, f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, self.directory / f"{self.ident}.meta")
        if durable:
            self.sync()

    def discard_meta(self) -> None:
        """The upload happened; the file stays open for more writes."""
        (self.directory / f"{self.ident}.meta").unlink(missing_ok=True)

    def discard(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        for p in (self.path, self.directory / f"{self.ident}.meta"):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def load_pending(directory: Path, master_key: bytes) -> list[tuple[Staged, Target]]:
    """Staged files a previous mount did not upload, with their targets. Files
    without a readable record are left in place with a warning (never deleted)."""
    out: list[tuple[Staged, Target]] = []
    if not directory.is_dir():
        return out
    for meta_path in sorted(directory.glob("*.meta")):
        ident = meta_path.name[: -len(".meta")]
        try:
            meta = json.loads(meta_path.read_text(encoding="ascii"))
            key = crypto.decrypt_key(master_key, meta["k"])
            info = crypto.decrypt_attributes(meta["a"], key[:16])
            target = Target(
                parent=str(info["p"]),
                name=str(info["n"]),
                replaces=info.get("r"),
                mtime=int(info["m"]),
                attrs=dict(info.get("at") or {}),
            )
            size = int(info["s"])
            if not (directory / f"{ident}.data").exists():
                raise ValueError("data file missing")
        except (OSError, ValueError, KeyError, TypeError, crypto.MegaCryptoError) as exc:
            log.warning("staged upload %s cannot be read (%s); left in %s", ident, exc, directory)
            continue
        out.append((Staged(directory, ident, key[:24], size), target))
    return out
