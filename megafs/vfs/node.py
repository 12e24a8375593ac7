"""In-memory inodes.

A :class:`Node` wraps the stored :class:`~megafs.format.records.Record` of one inode
and adds what only lives in memory: where its record is stored (``parent`` or its
own inode object), the directory's entries once loaded, dirty content buffers, and
kernel lookup / open counts.

Ownership: every field is owned by the vfs and changed only in synchronous sections
of :class:`megafs.vfs.fs.Vfs` methods, except the content fields (``dirty``,
``record.chunks``, ``record.inline``, ``saved``), which are
changed only while
holding ``content_lock``.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field, replace
from types import TracebackType

import trio

from megafs.format.records import ChunkRef, Record


class Pieces:
    """A chunk's dirty content as the writer's own buffers, in order: a streaming
    writer's chunk, written front to back in large pieces.

    Copying each piece into a chunk buffer was a third of the event loop's time
    in a sequential write (it holds the GIL: 1 MiB per FUSE write request); the
    pieces are immutable ``bytes`` that pyfuse3 made for the request anyway, so
    they are kept as they are and hashed and sealed piece by piece in a worker
    thread (:func:`megafs.format.chunks.seal_chunk`), never joined.
    :mod:`megafs.vfs.content` turns one into a ``bytearray`` (:meth:`materialize`)
    before any change other than an append at its end.
    """

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, piece: bytes | memoryview) -> None:
        """Add ``piece`` at the end; it must not change afterwards (a ``bytes`` or a
        view of one)."""
        self.parts.append(piece)
        self.size += len(piece)

    def read(self, lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` (clipped to the size)."""
        out: list[bytes | memoryview] = []
        pos = 0
        for p in self.parts:
            end = pos + len(p)
            if end > lo and pos < hi:
                out.append(memoryview(p)[max(lo - pos, 0) : min(hi, end) - pos])
            if end >= hi:
                break
            pos = end
        return b"".join(out)

    def truncate(self, size: int) -> None:
        """Keep only the first ``size`` bytes."""
        pos = 0
        for k, p in enumerate(self.parts):
            if pos + len(p) >= size:
                keep = size - pos
                if 0 < keep < len(p):
                    self.parts[k] = memoryview(p)[:keep]
                del self.parts[k + (keep > 0) :]
                break
            pos += len(p)
        self.size = min(self.size, size)

    def materialize(self) -> bytearray:
        """The content as one buffer that can be changed anywhere."""
        return bytearray(b"".join(self.parts))


class ContentLock:
    """The mutex of one file's content: free to take when nobody holds it.

    ``trio.Lock`` passes through the scheduler on every acquire, even a free one;
    for a FUSE handler that is a suspension, so another worker is woken to read the
    device (:mod:`megafs.fuse_loop`) and every read and write of a file costs a
    task switch more. Taking a free ``ContentLock`` neither yields nor checks for
    cancellation. A taken one parks its waiters in order and hands ownership
    straight to the first on release (no barging), as ``trio.Lock`` does; a waiter
    cancelled while parked never owns it. Not re-entrant; only its holder releases.
    The parking lot is made on first contention (most files never see one).
    """

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters: trio.lowlevel.ParkingLot | None = None

    def locked(self) -> bool:
        return self._held

    async def __aenter__(self) -> None:
        if not self._held:
            self._held = True
            return
        if self._waiters is None:
            self._waiters = trio.lowlevel.ParkingLot()
        await self._waiters.park()  # woken by release(), already the owner

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        if self._waiters:
            self._waiters.unpark()  # ownership passes on: _held stays True
        else:
            self._held = False


@dataclass(slots=True)
class Attr:
    """The attributes the vfs reports for one inode."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class Saved:
    """A file's content as last flushed (see ``Node.saved``)."""

    size: int
    chunks: dict[int, ChunkRef]
    inline: bytes | None


@dataclass(eq=False, slots=True)
class Node:
    """One inode in memory. See the module docstring for who owns what."""

    record: Record
    # Directory whose entry stores this record (None for the root, for hard-linked
    # files whose record is an inode object, and for unlinked inodes).
    parent: int | None = None
    hardlinked: bool = False
    # Containers only some nodes need are made on first use (None until then): a
    # mount holds a node for every file it has seen (with slots on Node, Record and
    # ChunkRef too, a file node went from 1,181 to 725 bytes).
    # Directories: name -> ino once loaded (None until then), plus readdir cookies
    # that stay valid while the directory changes.
    entries: dict[bytes, int] | None = None
    cookies: dict[bytes, int] | None = None
    next_cookie: int = 1
    # (cookie, name) of ``cookies`` in cookie order, and the (next_cookie, count) it
    # was built for: any add or remove changes that pair (see cookie_order).
    _cookie_order: list[tuple[int, bytes]] | None = field(default=None, repr=False)
    _cookie_order_key: tuple[int, int] = (0, 0)
    stored: bool = True  # directory/inode object exists on the store
    # Directories: at least the inline bytes of their entries' records (exact when
    # loaded or sealed, plus what files inlined since; see Vfs._inline_max).
    inline_bytes: int = 0
    loading: trio.Event | None = None
    # Files: chunk index -> full current plaintext of that chunk (dirty, not stored).
    dirty: dict[int, bytearray | Pieces] = field(default_factory=dict)
    # Chunk indexes whose dirty buffer was read from the stored chunk to change it
    # in place (see content.flush_chunk).
    reloaded: set[int] | None = None
    # The content (size, chunks, inline bytes) as of the last complete flush: every
    # chunk it names is stored, so it is what a metadata commit writes. ``None``
    # means "same as the record" (nothing changed since).
    saved: Saved | None = None
    # Full chunks being stored in the background (chunk index -> set when done);
    # their buffers stay in ``dirty`` (unchanged) until then. A background store
    # that failed leaves its buffer dirty and its error here for the next flush.
    flushing: dict[int, trio.Event] = field(default_factory=dict)
    flush_error: Exception | None = None
    counted: int = 0  # this node's share of Vfs._dirty_total
    last_write: float = 0.0
    content_lock: ContentLock = field(default_factory=ContentLock)
    lookups: int = 0
    opens: int = 0
    # Why this inode cannot be used (its inode object failed to load), if it can't.
    broken: str | None = None

    def content_changed(self) -> None:
        """Call before the content (size, chunks, inline) first departs from what
        was last flushed."""
        if self.saved is None:
            r = self.record
            self.saved = Saved(r.size, dict(r.chunks), r.inline)

    def committed(self) -> Record:
        """The record a metadata commit may write now: current attributes, content
        as last flushed."""
        if self.saved is None:
            return self.record
        s = self.saved
        return replace(self.record, size=s.size, chunks=dict(s.chunks), inline=s.inline)

    @property
    def ino(self) -> int:
        return self.record.ino

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.record.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.record.mode)

    def attr(self) -> Attr:
        r = self.record
        blocks = 0
        if stat.S_ISREG(r.mode):
            # (readdir asks this of every entry: no generators for the usual
            # small file, inline or one chunk and nothing dirty)
            stored = len(r.inline) if r.inline else 0
            if self.dirty:
                stored += sum(c.length for i, c in r.chunks.items() if i not in self.dirty)
                stored += sum(len(b) for b in self.dirty.values())
            elif r.chunks:
                stored += sum(c.length for c in r.chunks.values())
            blocks = -(-min(stored, r.size) // 512)
        # Positional (the fields' order): keyword arguments cost three times as much,
        # and readdir asks this of every entry.
        return Attr(
            r.ino, r.mode, r.nlink, r.uid, r.gid, r.rdev, r.size, blocks,
            r.atime_ns, r.mtime_ns, r.ctime_ns,
        )  # fmt: skip

    def add_entry(self, name: bytes, ino: int) -> None:
        assert self.entries is not None
        self.entries[name] = ino
        if self.cookies is None:
            self.cookies = {}
        self.cookies[name] = self.next_cookie
        self.next_cookie += 1

    def cookie_order(self) -> list[tuple[int, bytes]]:
        """(cookie, name) of every entry, sorted by cookie: built once per change of
        the directory, so that paging through it (readdir) is not quadratic. Do not
        modify the list."""
        cookies = self.cookies or {}
        key = (self.next_cookie, len(cookies))
        if self._cookie_order is None or key != self._cookie_order_key:
            self._cookie_order = sorted((c, n) for n, c in cookies.items())
            self._cookie_order_key = key
        return self._cookie_order

    def remove_entry(self, name: bytes) -> int:
        assert self.entries is not None
        if self.cookies is not None:
            self.cookies.pop(name, None)
        return self.entries.pop(name)

    def mark_reloaded(self, i: int) -> None:
        """Note that chunk ``i``'s dirty buffer was read from the stored chunk."""
        if self.reloaded is None:
            self.reloaded = set()
        self.reloaded.add(i)

    def was_reloaded(self, i: int) -> bool:
        return self.reloaded is not None and i in self.reloaded

    def unmark_reloaded(self, i: int) -> None:
        if self.reloaded is not None:
            self.reloaded.discard(i)
