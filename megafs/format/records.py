"""Directory objects and inode objects: the encrypted metadata.

Every directory is one object ``d/HEX`` (HEX = keyed hash of its inode number, so the
store cannot link it to anything). Its plaintext::

    b"MFD1" || version u64 || ino u64 || has_self u8 [|| record]
            || count u32 || count * (name_len u8 || name || record)

``has_self`` is set only for the root, whose own attributes have no parent entry to
live in. Every other inode's attributes live in its parent's entry; a hard-linked
file (one that has ever had more than one name) lives in its own inode object
``i/HEX``, ``b"MFI1" || version u64 || ino u64 || record``, and its entries are
references (flag REF, no attributes).

A record::

    flags u8 || ino u64 || [unless REF:] mode u32 || uid u32 || gid u32 || nlink u32
    || rdev u64 || size u64 || atime_ns i64 || mtime_ns i64 || ctime_ns i64
    || target_len u16 || target || xattr_count u16
    || xattr_count * (name_len u8 || name || value_len u32 || value)
    || [if INLINE:] inline_len u32 || inline
    || chunk_count u32 || chunk_count * (index u64 || chunk id (32) || length u32)

The whole plaintext is sealed as one unit (block 0, last) with the object's kind and
key in the associated data. ``version`` grows by one on every write of the object;
readers remember the highest they have seen and refuse older ones (rollback).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from typing import Final

from megafs.errors import IntegrityError
from megafs.format.chunks import CHUNK_ID_SIZE

NAME_MAX: Final = 255
FLAG_REF: Final = 1
FLAG_INLINE: Final = 2

_DIR_MAGIC = b"MFD1"
_INODE_MAGIC = b"MFI1"
_ATTRS = struct.Struct(">IIIIQQqqq")
_CHUNK = struct.Struct(f">Q{CHUNK_ID_SIZE}sI")


@dataclass(slots=True)
class ChunkRef:
    """One stored chunk of a file: its index, keyed-hash id and plaintext length."""

    cid: bytes
    length: int


@dataclass(slots=True)
class Record:
    """Everything stored about one inode (or, with ``ref``, only its number)."""

    ino: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    rdev: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    inline: bytes | None = None
    chunks: dict[int, ChunkRef] = field(default_factory=dict)
    ref: bool = False


def object_key(id_key: bytes, prefix: str, ino: int) -> str:
    """The store key of the directory (``prefix="d"``) or inode (``"i"``) object."""
    digest = hmac.new(id_key, prefix.encode() + ino.to_bytes(8, "big"), hashlib.sha256).hexdigest()
    return f"{prefix}/{digest[:32]}"


def valid_name(name: bytes) -> bool:
    """Whether ``name`` may be a directory entry (checked on every decode)."""
    return (
        0 < len(name) <= NAME_MAX
        and name not in (b".", b"..")
        and b"/" not in name
        and b"\0" not in name
    )


def _encode_record(out: list[bytes], rec: Record) -> None:
    if rec.ref:
        out.append(struct.pack(">BQ", FLAG_REF, rec.ino))
        return
    flags = FLAG_INLINE if rec.inline is not None else 0
    out.append(struct.pack(">BQ", flags, rec.ino))
    out.append(
        _ATTRS.pack(
            rec.mode,
            rec.uid,
            rec.gid,
            rec.nlink,
            rec.rdev,
            rec.size,
            rec.atime_ns,
            rec.mtime_ns,
            rec.ctime_ns,
        )
    )
    out.append(struct.pack(">H", len(rec.target)))
    out.append(rec.target)
    out.append(struct.pack(">H", len(rec.xattrs)))
    for name, value in sorted(rec.xattrs.items()):
        out.append(struct.pack(">B", len(name)))
        out.append(name)
        out.append(struct.pack(">I", len(value)))
        out.append(value)
    if rec.inline is not None:
        out.append(struct.pack(">I", len(rec.inline)))
        out.append(rec.inline)
    out.append(struct.pack(">I", len(rec.chunks)))
    for index in sorted(rec.chunks):
        ref = rec.chunks[index]
        out.append(_CHUNK.pack(index, ref.cid, ref.length))


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise IntegrityError(f"{self.what}: record truncated")
        b = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return b

    def unpack(self, st: struct.Struct | str) -> tuple[int, ...]:
        s = st if isinstance(st, struct.Struct) else struct.Struct(st)
        return s.unpack(self.take(s.size))


def _decode_record(r: _Reader) -> Record:
    flags, ino = r.unpack(">BQ")
    if flags & FLAG_REF:
        return Record(ino=ino, ref=True)
    mode, uid, gid, nlink, rdev, size, at, mt, ct = r.unpack(_ATTRS)
    (tlen,) = r.unpack(">H")
    target = r.take(tlen)
    (nx,) = r.unpack(">H")
    xattrs = {}
    for _ in range(nx):
        (nl,) = r.unpack(">B")
        name = r.take(nl)
        (vl,) = r.unpack(">I")
        xattrs[name] = r.take(vl)
    inline = None
    if flags & FLAG_INLINE:
        (il,) = r.unpack(">I")
        inline = r.take(il)
    (nc,) = r.unpack(">I")
    chunks = {}
    for _ in range(nc):
        index, cid, length = r.unpack(_CHUNK)
        chunks[index] = ChunkRef(cid, length)  # type: ignore[arg-type]
    return Record(
        ino=ino,
        mode=mode,
        uid=uid,
        gid=gid,
        nlink=nlink,
        rdev=rdev,
        size=size,
        atime_ns=at,
        mtime_ns=mt,
        ctime_ns=ct,
        target=target,
        xattrs=xattrs,
        inline=inline,
        chunks=chunks,
    )


@dataclass
class DirContents:
    """A decoded directory object."""

    version: int
    ino: int
    self_record: Record | None
    entries: dict[bytes, Record]
    bad_names: int = 0


def encode_dir(
    version: int, ino: int, self_record: Record | None, entries: dict[bytes, Record]
) -> bytes:
    out = [_DIR_MAGIC, struct.pack(">QQB", version, ino, 1 if self_record else 0)]
    if self_record is not None:
        _encode_record(out, self_record)
    out.append(struct.pack(">I", len(entries)))
    for name, rec in entries.items():
        out.append(struct.pack(">B", len(name)))
        out.append(name)
        _encode_record(out, rec)
    return b"".join(out)


def decode_dir(data: bytes, what: str) -> DirContents:
    """Decode a directory object's plaintext. Entries with invalid names are dropped
    and counted in ``bad_names`` (the caller logs them) instead of failing the whole
    directory."""
    r = _Reader(data, what)
    if r.take(4) != _DIR_MAGIC:
        raise IntegrityError(f"{what}: not a directory object")
    version, ino, has_self = r.unpack(">QQB")
    self_record = _decode_record(r) if has_self else None
    (count,) = r.unpack(">I")
    entries: dict[bytes, Record] = {}
    bad = 0
    for _ in range(count):
        (nl,) = r.unpack(">B")
        name = r.take(nl)
        rec = _decode_record(r)
        if valid_name(name) and name not in entries:
            entries[name] = rec
        else:
            bad += 1
    if r.pos != len(r.data):
        raise IntegrityError(f"{what}: trailing bytes after the last entry")
    return DirContents(version, ino, self_record, entries, bad)


def encode_inode(version: int, rec: Record) -> bytes:
    out = [_INODE_MAGIC, struct.pack(">QQ", version, rec.ino)]
    _encode_record(out, rec)
    return b"".join(out)


def decode_inode(data: bytes, what: str) -> tuple[int, Record]:
    r = _Reader(data, what)
    if r.take(4) != _INODE_MAGIC:
        raise IntegrityError(f"{what}: not an inode object")
    version, ino = r.unpack(">QQ")
    rec = _decode_record(r)
    if rec.ino != ino or rec.ref:
        raise IntegrityError(f"{what}: inode number mismatch")
    if r.pos != len(r.data):
        raise IntegrityError(f"{what}: trailing bytes")
    return version, rec
