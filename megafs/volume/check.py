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
from dataclasses import dataclass, field

from megafs.errors import IntegrityError, MegafsError, ObjectNotFound
from megafs.format import chunks as fchunks
from megafs.format.records import Record
from megafs.volume.drive import ROOT_INO, Volume


@dataclass
class Report:
    """What a check found."""

    problems: list[str] = field(default_factory=list)
    directories: int = 0
    files: int = 0
    chunks: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


async def check_volume(volume: Volume, *, deep: bool = False) -> Report:
    report = Report()
    links: Counter[int] = Counter()
    linked: dict[int, tuple[str, Record]] = {}
    seen_chunks: set[bytes] = set()
    todo: list[tuple[int, str]] = [(ROOT_INO, "/")]
    while todo:
        ino, path = todo.pop()
        try:
            contents = await volume.load_dir(ino)
        except MegafsError as exc:
            report.problems.append(f"{path}: directory unreadable: {exc}")
            continue
        report.directories += 1
        for raw, rec in contents.entries.items():
            name = raw.decode("utf-8", "surrogateescape")
            child = f"{path.rstrip('/')}/{name}"
            if rec.ref:
                links[rec.ino] += 1
                if rec.ino not in linked:
                    try:
                        linked[rec.ino] = (child, await volume.load_inode(rec.ino))
                    except MegafsError as exc:
                        report.problems.append(f"{child}: inode object unreadable: {exc}")
                        continue
                    await _check_content(
                        volume, child, linked[rec.ino][1], report, seen_chunks, deep
                    )
                continue
            if stat.S_ISDIR(rec.mode):
                todo.append((rec.ino, child))
            else:
                await _check_content(volume, child, rec, report, seen_chunks, deep)
    for ino, count in links.items():
        if ino in linked and linked[ino][1].nlink != count:
            report.problems.append(
                f"{linked[ino][0]}: link count {linked[ino][1].nlink}, but {count} names"
            )
    return report


async def _check_content(
    volume: Volume, path: str, rec: Record, report: Report, seen: set[bytes], deep: bool
) -> None:
    if not stat.S_ISREG(rec.mode):
        return
    report.files += 1
    if rec.inline is not None and rec.chunks:
        report.problems.append(f"{path}: both inline content and chunks")
    for index, ref in sorted(rec.chunks.items()):
        if index * fchunks.CHUNK_SIZE >= rec.size and rec.size:
            report.problems.append(f"{path}: chunk {index} lies past the end of the file")
        if ref.cid in seen:
            continue
        seen.add(ref.cid)
        report.chunks += 1
        key = fchunks.chunk_key(ref.cid)
        try:
            if deep:
                n = fchunks.block_count(ref.length)
                await volume.read_blocks(ref, 0, n)
            else:
                info = await volume.store.head(key)
                if info.size != fchunks.sealed_size(ref.length):
                    report.problems.append(f"{path}: chunk {key} has the wrong size")
        except ObjectNotFound:
            report.problems.append(f"{path}: chunk {key} is missing")
        except IntegrityError as exc:
            report.problems.append(f"{path}: {exc}")
