"""Where the emulator keeps file ciphertext: in memory, or as files in a directory.

The emulator never looks inside these bytes: they are what the client POSTed to the upload URL,
already encrypted with a key the server never sees.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, final


class BlobStore(Protocol):
    """Storage for upload ciphertext, addressed by an opaque blob id.

    A blob is written piece by piece while its upload is open (``begin`` -> ``write``... ->
    ``commit``); pieces may arrive in any order and may be written again. Only committed blobs are
    read. ``delete`` is idempotent and also discards an uncommitted blob.
    """

    def begin(self, blob: str, size: int) -> None: ...
    def write(self, blob: str, offset: int, data: bytes) -> None: ...
    def commit(self, blob: str) -> None: ...
    def read(self, blob: str, start: int, end: int) -> bytes: ...
    def delete(self, blob: str) -> None: ...
    def exists(self, blob: str) -> bool: ...


@final
class MemoryBlobs:
    """Blobs in memory; pieces are joined when the upload completes."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[int, dict[int, bytes]]] = {}
        self._done: dict[str, bytes] = {}

    def begin(self, blob: str, size: int) -> None:
        self._open[blob] = (size, {})

    def write(self, blob: str, offset: int, data: bytes) -> None:
        self._open[blob][1][offset] = bytes(data)

    def commit(self, blob: str) -> None:
        size, pieces = self._open.pop(blob)
        buf = bytearray(size)
        for offset in sorted(pieces):
            piece = pieces[offset]
            buf[offset : offset + len(piece)] = piece
        self._done[blob] = bytes(buf)

    def read(self, blob: str, start: int, end: int) -> bytes:
        return self._done[blob][start:end]

    def delete(self, blob: str) -> None:
        self._open.pop(blob, None)
        self._done.pop(blob, None)

    def exists(self, blob: str) -> bool:
        return blob in self._done


@final
class DirBlobs:
    """Blobs as files in ``root`` (``<id>.part`` while uploading, ``<id>`` once complete)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, blob: str, *, part: bool = False) -> Path:
        if not blob or "/" in blob or blob.startswith("."):
            raise ValueError(f"bad blob id {blob!r}")
        return self.root / (blob + ".part" if part else blob)

    def begin(self, blob: str, size: int) -> None:
        with open(self._path(blob, part=True), "wb") as f:
            f.truncate(size)

    def write(self, blob: str, offset: int, data: bytes) -> None:
        with open(self._path(blob, part=True), "r+b") as f:
            f.seek(offset)
            f.write(data)

    def commit(self, blob: str) -> None:
        os.replace(self._path(blob, part=True), self._path(blob))

    def read(self, blob: str, start: int, end: int) -> bytes:
        with open(self._path(blob), "rb") as f:
            f.seek(start)
            return f.read(max(0, end - start))

    def delete(self, blob: str) -> None:
        for path in (self._path(blob), self._path(blob, part=True)):
            path.unlink(missing_ok=True)

    def exists(self, blob: str) -> bool:
        return self._path(blob).exists()

    def prune(self, keep: set[str]) -> int:
        """Remove every file that is not a committed blob in ``keep``; return how many."""
        removed = 0
        for path in self.root.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed
