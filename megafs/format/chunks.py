"""File content: fixed-offset chunks, sealed in sub-blocks.

A file's bytes are cut at fixed offsets into chunks of :data:`CHUNK_SIZE` (the last
one, and chunks before a hole, may be shorter). Chunk ``i`` covers plaintext
``[i * CHUNK_SIZE, i * CHUNK_SIZE + length)``; a chunk that is absent from the file's
record is a hole and reads as zeros (all-zero chunks are never stored).

A chunk is stored once per volume under ``c/XX/HEX`` where ``HEX`` is
keyed BLAKE3(chunk-id key, plaintext): identical chunks share one object (dedup) and
the id reveals nothing without the key. The object is the concatenation of the
chunk's sub-blocks of :data:`BLOCK_SIZE` plaintext bytes, each sealed on its own::

    sealed block j = nonce (12) || AES-256-GCM(block j) || tag (16)
    AD = context(KIND_CHUNK, volume_id, object_key, j, last = j == nblocks - 1)

so a 4 KiB read fetches one sealed block with a ranged GET at
``j * SEALED_BLOCK_SIZE`` and opens it alone. The record that references a chunk
stores its plaintext length, from which the reader knows how many blocks there are
and which one must carry the last flag (truncation and extension fail to open).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from blake3 import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from megafs.errors import IntegrityError
from megafs.format.seal import (
    KIND_CHUNK,
    OVERHEAD,
    context,
    open_sealed,
    seal_many,
    seal_many_into,
)

CHUNK_SIZE: Final = 4 * 1024 * 1024
BLOCK_SIZE: Final = 64 * 1024
SEALED_BLOCK_SIZE: Final = BLOCK_SIZE + OVERHEAD
CHUNK_ID_SIZE: Final = 32
#: A chunk's plaintext as written: one buffer, or pieces in order.
ChunkContent = bytes | bytearray | list[bytes | memoryview]


def chunk_id(id_key: bytes, plaintext: memoryview | ChunkContent) -> bytes:
    """The keyed-hash identity of a chunk's plaintext (one buffer or its pieces in
    order): keyed BLAKE3, 32 bytes. (BLAKE3 because every written byte is hashed: it
    runs at several GB/s where HMAC-SHA256 manages about one.)"""
    if not isinstance(plaintext, list):
        return blake3(plaintext, key=id_key).digest()
    h = blake3(key=id_key)
    for piece in plaintext:
        h.update(piece)
    return h.digest()


def _units(pieces: list[bytes | memoryview], unit: int) -> Iterator[memoryview]:
    """``pieces`` (in order) cut into consecutive units of ``unit`` bytes (the last
    may be shorter): views of the pieces, a copy only for a unit that spans two."""
    carry = bytearray()
    for piece in pieces:
        view = memoryview(piece)
        pos = 0
        if carry:
            take = min(unit - len(carry), len(view))
            carry += view[:take]
            pos = take
            if len(carry) < unit:
                continue
            yield memoryview(bytes(carry))
            carry = bytearray()
        while len(view) - pos >= unit:
            yield view[pos : pos + unit]
            pos += unit
        carry += view[pos:]
    if carry:
        yield memoryview(bytes(carry))


def chunk_key(cid: bytes) -> str:
    """The store key of a chunk object."""
    h = cid.hex()
    return f"c/{h[:2]}/{h}"


def chunk_id_of(key: str) -> bytes | None:
    """The chunk id named by a store key (the inverse of :func:`chunk_key`), or None
    if ``key`` is not a chunk's."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "c" or not parts[2].startswith(parts[1]):
        return None
    try:
        return bytes.fromhex(parts[2])
    except ValueError:
        return None


def block_count(length: int) -> int:
    """How many sealed blocks a chunk of ``length`` plaintext bytes has."""
    return max(1, -(-length // BLOCK_SIZE))


def sealed_size(length: int) -> int:
    """The size of the stored object for a chunk of ``length`` plaintext bytes."""
    return length + block_count(length) * OVERHEAD


def seal_chunk(
    aead: AESGCM,
    volume_id: bytes,
    cid: bytes,
    plaintext: memoryview | ChunkContent,
) -> bytearray:
    """Seal a whole chunk (one buffer or its pieces in order) for upload (a
    ``bytearray`` nobody changes: :meth:`ObjectStore.put` takes it as it is)."""
    units, ads = _sealing(volume_id, cid, plaintext)
    return seal_many(aead, units, ads)


def seal_chunk_into(
    aead: AESGCM,
    volume_id: bytes,
    cid: bytes,
    plaintext: memoryview | ChunkContent,
    dst: memoryview,
) -> None:
    """:func:`seal_chunk` written into ``dst`` (exactly :func:`sealed_size` bytes)."""
    units, ads = _sealing(volume_id, cid, plaintext)
    seal_many_into(aead, units, ads, dst)


def _sealing(
    volume_id: bytes, cid: bytes, plaintext: memoryview | ChunkContent
) -> tuple[list[memoryview], list[bytes]]:
    """A chunk's sealed blocks: their plaintexts and associated data."""
    key = chunk_key(cid)
    if isinstance(plaintext, list):
        units = list(_units(plaintext, BLOCK_SIZE))
    else:
        view = memoryview(plaintext)
        units = [view[i : i + BLOCK_SIZE] for i in range(0, len(view), BLOCK_SIZE)]
    n = max(1, len(units))
    ads = [context(KIND_CHUNK, volume_id, key, j, last=j == n - 1) for j in range(n)]
    return units or [memoryview(b"")], ads


def block_range(p_start: int, p_end: int, length: int) -> tuple[int, int, int, int]:
    """For plaintext ``[p_start, p_end)`` of a chunk of ``length`` bytes: the first
    and one-past-last block numbers and the ciphertext byte range to fetch."""
    if not 0 <= p_start < p_end <= length:
        raise ValueError(f"bad range [{p_start}, {p_end}) of a {length}-byte chunk")
    first = p_start // BLOCK_SIZE
    stop = -(-p_end // BLOCK_SIZE)
    c_start = first * SEALED_BLOCK_SIZE
    c_end = min(stop * SEALED_BLOCK_SIZE, sealed_size(length))
    return first, stop, c_start, c_end


def open_blocks(
    aead: AESGCM,
    volume_id: bytes,
    cid: bytes,
    length: int,
    first: int,
    sealed: bytes,
) -> list[bytes]:
    """Open consecutive sealed blocks starting at block ``first`` of a chunk whose
    plaintext is ``length`` bytes long; returns their plaintext, one ``bytes`` per
    block."""
    key = chunk_key(cid)
    n = block_count(length)
    out = []
    view = memoryview(sealed)
    pos = 0
    j = first
    while pos < len(view):
        if j >= n:
            raise IntegrityError(f"chunk {key}: object longer than its record says")
        p_len = min(BLOCK_SIZE, length - j * BLOCK_SIZE)
        unit = view[pos : pos + p_len + OVERHEAD]
        if len(unit) != p_len + OVERHEAD:
            raise IntegrityError(f"chunk {key}: truncated at block {j}")
        ad = context(KIND_CHUNK, volume_id, key, j, last=j == n - 1)
        out.append(open_sealed(aead, unit, ad, f"chunk {key} block {j}"))
        pos += len(unit)
        j += 1
    return out


def verify_chunk(aead: AESGCM, volume_id: bytes, cid: bytes, length: int, sealed: bytes) -> bytes:
    """Open a whole chunk object, checking its exact size; returns the plaintext."""
    if len(sealed) != sealed_size(length):
        raise IntegrityError(
            f"chunk {chunk_key(cid)}: size {len(sealed)} is not the expected {sealed_size(length)}"
        )
    return b"".join(open_blocks(aead, volume_id, cid, length, 0, sealed))
