"""File content in memory: dirty chunk buffers over stored chunks.

Every function here must be called with ``node.content_lock`` held: they ``await``
chunk fetches and uploads in the middle of changing ``node.dirty`` and
``node.record.chunks``, and the lock is what keeps those changes whole.

Invariants (with the lock released):

* ``record.size`` is the file's current size; bytes past a buffer's end or in a
  chunk with neither buffer nor reference read as zeros (holes).
* No buffer or stored chunk holds bytes at or past ``record.size`` (truncation cuts).
* ``record.inline`` is not None only when ``dirty`` and ``record.chunks`` are empty;
  then it holds exactly the file's bytes.
* ``node.saved`` is not None from the first change after a flush until the next
  complete :func:`flush`; it holds the content as of that flush (see Node).
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from megafs.format.chunks import CHUNK_SIZE
from megafs.vfs.chunkio import ChunkIO
from megafs.vfs.node import Node, Pieces

#: A file this small is stored inline in its record (its directory's entry, or its
#: inode object), not as a chunk object.
INLINE_MAX: Final = 4096
#: A file up to this size is stored inline too while its directory's inline bytes
#: stay under DIR_INLINE_BUDGET (``Vfs._inline_max``). Each chunk object costs the
#: store a request and the local store two fsyncs: a `tar x` of a source tree
#: (3,957 files, 1,434 of them 4-16 KiB) staged 2,010 chunk objects with the 4 KiB
#: limit, about 1,200 with this one; on a store with 20 ms per request and 50 MB/s
#: it was all there 2.8-3.2 s after tar returned, now 1.8-2.4 s. The budget bounds
#: what every commit of a directory rewrites (the object is sealed whole): a
#: maildir of 10,000 mails would otherwise become a 160 MB directory object. The
#: cost: loaded directories keep their files' inline bytes in memory (five
#: extracted stdlib trees, 20,000 files: peak RSS 167 -> 240 MiB).
INLINE_DIR_MAX: Final = 16 * 1024
DIR_INLINE_BUDGET: Final = 1 << 20
#: ... and while the loaded directories hold less than this in inline bytes, which
#: stay in memory with them: a mount that writes a million small files makes chunk
#: objects once this is reached, rather than growing by 16 KiB per file.
MOUNT_INLINE_BUDGET: Final = 64 << 20
MAX_FLUSHING: Final = 2
#: A write this large at a chunk's start begins a streaming chunk (node.Pieces): it
#: and the writes that continue it at its end (each at least PIECE_MIN, or ending the
#: chunk) are kept as they came, not copied into a buffer.
PREALLOCATE_MIN: Final = 512 * 1024
PIECE_MIN: Final = 64 * 1024
_ZERO_BYTES = bytes(CHUNK_SIZE)
_ZEROS = memoryview(_ZERO_BYTES)
log = logging.getLogger(__name__)


def _zeros(n: int) -> bytes:
    return bytes(n)


async def read(vol: ChunkIO, node: Node, off: int, size: int) -> bytes:
    r = node.record
    end = min(off + size, r.size)
    if off >= end:
        return b""
    if r.inline is not None:
        data = r.inline[off:end]
        return data + _zeros(end - off - len(data))
    parts = []
    pos = off
    while pos < end:
        i = pos // CHUNK_SIZE
        base = i * CHUNK_SIZE
        lo, hi = pos - base, min(base + CHUNK_SIZE, end) - base
        buf = node.dirty.get(i)
        if isinstance(buf, Pieces):
            piece = buf.read(lo, hi)
        elif buf is not None:
            piece = bytes(buf[lo:hi])
        elif (ref := r.chunks.get(i)) is not None:
            piece = await vol.read_chunk(ref, lo, hi)
        else:
            piece = b""
        if len(piece) < hi - lo:
            piece += _zeros(hi - lo - len(piece))
        parts.append(piece)
        pos = base + hi
    return parts[0] if len(parts) == 1 else b"".join(parts)


def prefetch(vol: ChunkIO, node: Node, start: int, end: int, piece: int = 1 << 20) -> None:
    """Ask for ``[start, end)`` to be fetched into the cache in the background, in
    pieces of up to ``piece`` bytes, none across a chunk's end (no lock needed: it
    only reads stored chunks)."""
    r = node.record
    pos = start
    while pos < end:
        i = pos // CHUNK_SIZE
        base = i * CHUNK_SIZE
        stop = min(base + CHUNK_SIZE, end, pos + piece)
        ref = r.chunks.get(i)
        if ref is not None and i not in node.dirty:
            vol.prefetch(ref, pos - base, stop - base)
        pos = stop


def _uninline(node: Node) -> None:
    r = node.record
    node.content_changed()
    if r.inline is not None:
        if r.inline:
            node.dirty[0] = bytearray(r.inline)
        r.inline = None


async def write(vol: ChunkIO, node: Node, off: int, data: bytes) -> None:
    """Write ``data`` at ``off``. Chunks the write completes are stored in the
    background (at most ``MAX_FLUSHING`` per file at once)."""
    r = node.record
    _uninline(node)
    view = memoryview(data)
    end = off + len(data)
    pos = off
    full: list[int] = []
    while pos < end:
        i = pos // CHUNK_SIZE
        base = i * CHUNK_SIZE
        lo = pos - base
        n = min(CHUNK_SIZE - lo, end - pos)
        if (ev := node.flushing.get(i)) is not None:
            await ev.wait()  # a chunk being stored is never changed under it
        buf = node.dirty.get(i)
        if buf is None:
            node.unmark_reloaded(i)  # (left by a buffer that truncate or a drop took)
            ref = r.chunks.get(i)
            if ref is not None and not (lo == 0 and n >= ref.length):
                buf = bytearray(await vol.read_chunk(ref, 0, ref.length))
                node.mark_reloaded(i)
            elif lo == 0 and n >= PREALLOCATE_MIN and isinstance(data, bytes):
                # A streaming writer (big pieces from the chunk's start): its
                # pieces are kept, not copied (see Pieces).
                buf = Pieces()
            else:
                buf = bytearray()
            node.dirty[i] = buf
        if isinstance(buf, Pieces):
            # (a small piece only if it ends the chunk: a writer out of step with the
            # chunk size by up to 64 KiB copied 4 MiB per chunk, with its 1 MiB writes)
            if (
                lo == len(buf)
                and (n >= PIECE_MIN or lo + n == CHUNK_SIZE)
                and isinstance(data, bytes)
            ):
                buf.append(data if n == len(data) else view[pos - off : pos - off + n])
                buf = None
            else:
                buf = node.dirty[i] = buf.materialize()
        if buf is not None:
            if len(buf) < lo:
                buf.extend(_zeros(lo - len(buf)))
            buf[lo : lo + n] = view[pos - off : pos - off + n]
        if lo + n == CHUNK_SIZE:
            full.append(i)
        pos += n
    if end > r.size:
        r.size = end
    for i in full:
        while len(node.flushing) >= MAX_FLUSHING:
            await next(iter(node.flushing.values())).wait()
        if i in node.dirty and i not in node.flushing:
            # Claimed here, before the task first runs: from now on writers of this
            # chunk and flush() wait for it instead of storing it a second time.
            ev = node.flushing[i] = trio.Event()
            if not vol.spawn(_background_store, vol, node, i, ev):
                del node.flushing[i]
                ev.set()
                await flush_chunk(vol, node, i)


async def _background_store(vol: ChunkIO, node: Node, i: int, ev: trio.Event) -> None:
    try:
        await flush_chunk(vol, node, i)
    except Exception as exc:
        node.flush_error = exc
    finally:
        del node.flushing[i]
        ev.set()


async def wait_flushing(node: Node) -> None:
    """Wait for the node's background stores; raise the error of a failed one (its
    data is still dirty: the caller's flush stores it again)."""
    while node.flushing:
        await next(iter(node.flushing.values())).wait()
    if node.flush_error is not None:
        exc, node.flush_error = node.flush_error, None
        log.warning("storing a chunk in the background failed (retrying): %s", exc)


async def truncate(vol: ChunkIO, node: Node, size: int) -> None:
    await wait_flushing(node)
    r = node.record
    _uninline(node)
    if size < r.size:
        for i in [i for i in node.dirty if i * CHUNK_SIZE >= size]:
            del node.dirty[i]
        for i in [i for i in r.chunks if i * CHUNK_SIZE >= size]:
            del r.chunks[i]
        i, cut = divmod(size, CHUNK_SIZE)
        if cut:
            if (buf := node.dirty.get(i)) is not None:
                if isinstance(buf, Pieces):
                    buf.truncate(cut)
                else:
                    del buf[cut:]
            elif (ref := r.chunks.get(i)) is not None and ref.length > cut:
                node.dirty[i] = bytearray(await vol.read_chunk(ref, 0, cut))
    r.size = size


async def flush_chunk(vol: ChunkIO, node: Node, i: int) -> None:
    # A file that is dropped (unlinked, closed and forgotten: Vfs._maybe_drop) loses
    # its buffers at once, whoever is storing them: a store under way finishes with
    # no buffer to release, and the ones after it have nothing to store.
    buf = node.dirty.get(i)
    if buf is None:
        return
    valid = max(0, min(len(buf), node.record.size - i * CHUNK_SIZE))
    if valid < len(buf):
        if isinstance(buf, Pieces):
            buf.truncate(valid)
        else:
            del buf[valid:]
    if _all_zeros(buf):
        node.record.chunks.pop(i, None)
    else:
        # No copy: nothing changes this buffer until it leaves ``dirty`` (writers
        # of this chunk wait for ``flushing``; everything else holds the lock).
        ref = node.record.chunks[i] = await vol.write_chunk(
            buf.parts if isinstance(buf, Pieces) else buf
        )
        if node.was_reloaded(i) and not isinstance(buf, Pieces):
            # A chunk changed in place (read, changed, stored: a database's pages)
            # is likely to be changed again soon: its plaintext stays in the memory
            # cache, so the next change finds it there instead of reading the new
            # object back (a staged-file read, opening it, a cache-file write).
            # Streaming writes never come here.
            vol.cache.remember_plaintext(ref, buf)
    node.unmark_reloaded(i)
    node.dirty.pop(i, None)


def _all_zeros(buf: bytearray | Pieces) -> bool:
    # (memcmp: stops at the first byte that is not zero)
    if isinstance(buf, Pieces):
        return all(_ZERO_BYTES.startswith(p) for p in buf.parts)
    return buf == _ZEROS[: len(buf)]


async def flush(vol: ChunkIO, node: Node, inline_max: int = INLINE_MAX) -> None:
    """Store every dirty buffer (files up to ``inline_max`` bytes go inline).
    Afterwards the record describes the whole content, all of it stored, and
    ``saved`` is None."""
    await wait_flushing(node)
    r = node.record
    if r.size <= inline_max and set(r.chunks) | set(node.dirty) <= {0}:
        if r.inline is None:
            r.inline = await read(vol, node, 0, r.size)
            r.chunks.clear()
            node.dirty.clear()
    else:
        for i in sorted(node.dirty):
            await flush_chunk(vol, node, i)
    node.saved = None
