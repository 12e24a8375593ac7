"""Volume consistency check: every directory object opens, every referenced object
exists (and, with ``deep``, every chunk authenticates), hard-link counts match.

One function per invariant; :func:`check_volume` runs them over the whole tree and
returns the problems found, each naming the path (plaintext: for the caller to show,
never to log at info level). This is the oracle of the crash tests, and the core of
``megafs fsck``.
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from megafs.errors import IntegrityError, MegafsError, ObjectNotFound
from megafs.format import chunks as fchunks
from megafs.format.records import ChunkRef, Record
from megafs.volume.drive import ROOT_INO, Volume


@dataclass
class Report:
    """What a check found."""

    problems: list[str] = field(default_factory=list)
    directories: int = 0
    files: int = 0
    chunks: int = 0
    #: Stored (sealed) bytes of the distinct chunks checked.
    bytes: int = 0
    #: Store keys of every chunk, directory and inode object the tree references
    #: (what ``megafs gc`` must keep).
    referenced: set[str] = field(default_factory=set)
    #: Whether some directory or inode object could not be read: then the tree was not
    #: walked completely and ``referenced`` is incomplete.
    incomplete: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


async def check_volume(
    volume: Volume, *, deep: bool = False, progress: Callable[[Report], None] | None = None
) -> Report:
    """Walk the whole tree from the root. ``deep``: authenticate every sub-block of every
    referenced chunk (else: existence and size, one HEAD each). ``progress(report)`` is
    called after each directory and file."""
    report = Report()
    links: Counter[int] = Counter()
    linked: dict[int, tuple[str, Record]] = {}
    seen_chunks: dict[bytes, str | None] = {}
    todo: list[tuple[int, str]] = [(ROOT_INO, "/")]
    while todo:
        ino, path = todo.pop()
        report.referenced.add(volume.dir_key(ino))
        try:
            contents = await volume.load_dir(ino)
        except MegafsError as exc:
            report.problems.append(f"{path}: directory unreadable: {exc}")
            report.incomplete = True
            continue
        report.directories += 1
        if progress is not None:
            progress(report)
        for raw, rec in contents.entries.items():
            name = raw.decode("utf-8", "surrogateescape")
            child = f"{path.rstrip('/')}/{name}"
            if rec.ref:
                links[rec.ino] += 1
                if rec.ino not in linked:
                    report.referenced.add(volume.inode_key(rec.ino))
                    try:
                        linked[rec.ino] = (child, await volume.load_inode(rec.ino))
                    except MegafsError as exc:
                        report.problems.append(f"{child}: inode object unreadable: {exc}")
                        report.incomplete = True
                        continue
                    await _check_content(
                        volume, child, linked[rec.ino][1], report, seen_chunks, deep
                    )
                continue
            if stat.S_ISDIR(rec.mode):
                todo.append((rec.ino, child))
            else:
                await _check_content(volume, child, rec, report, seen_chunks, deep)
            if progress is not None and not stat.S_ISDIR(rec.mode):
                progress(report)
    for ino, count in links.items():
        if ino in linked and linked[ino][1].nlink != count:
            report.problems.append(
                f"{linked[ino][0]}: link count {linked[ino][1].nlink}, but {count} names"
            )
    return report


async def _check_content(
    volume: Volume,
    path: str,
    rec: Record,
    report: Report,
    seen: dict[bytes, str | None],
    deep: bool,
) -> None:
    """Check a regular file's chunks. ``seen``: chunk id -> the problem found with it
    (None: fine), so a chunk shared by several files is fetched once but a problem with
    it is reported under every path that uses it."""
    if not stat.S_ISREG(rec.mode):
        return
    report.files += 1
    if rec.inline is not None and rec.chunks:
        report.problems.append(f"{path}: both inline content and chunks")
    for index, ref in sorted(rec.chunks.items()):
        if index * fchunks.CHUNK_SIZE >= rec.size and rec.size:
            report.problems.append(f"{path}: chunk {index} lies past the end of the file")
        key = fchunks.chunk_key(ref.cid)
        report.referenced.add(key)
        if ref.cid not in seen:
            seen[ref.cid] = await _check_chunk(volume, ref, key, report, deep)
        problem = seen[ref.cid]
        if problem is not None:
            report.problems.append(f"{path}: chunk {index} {problem}")


async def _check_chunk(
    volume: Volume, ref: ChunkRef, key: str, report: Report, deep: bool
) -> str | None:
    """Check one chunk object; return what is wrong with it (None: nothing)."""
    report.chunks += 1
    size = fchunks.sealed_size(ref.length)
    try:
        if deep:
            await volume.read_blocks(ref, 0, fchunks.block_count(ref.length))
        else:
            info = await volume.store.head(key)
            if info.size != size:
                return f"({key}) has the wrong size ({info.size}, expected {size})"
    except ObjectNotFound:
        return f"({key}) is missing"
    except IntegrityError as exc:
        if "is missing" in str(exc):
            return f"({key}) is missing"
        return f"({key}) is damaged: {exc}"
    report.bytes += size
    return None
