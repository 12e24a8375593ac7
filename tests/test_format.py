"""The volume format: known-answer vectors and pure round trips (in-process)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from megafs.errors import (
    CorruptHeader,
    IntegrityError,
    NotAVolume,
    UnsupportedFormat,
    WrongPassphrase,
)
from megafs.format import chunks, header, records, seal

MK = bytes(range(32))
VID = bytes(range(100, 116))
FAST = {"memory_kib": 8192, "iterations": 1, "lanes": 1}


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 HKDF-SHA256 for 32 bytes, written out as an independent check."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_subkeys_known_answers() -> None:
    k = header.derive_keys(MK, VID)
    assert k.content.hex() == "26e39be858f1daea5b5c340af8205d447a0b8757d46514eccd0fd4320751a5f6"
    assert k.metadata.hex() == "892b4ec67de601bb5e2fc6033ebe96ba91c3685fff88d7b8542f70c1b5c31568"
    assert k.chunk_id.hex() == "3eb291ac17011b79ebffc10b327bae45e3c5d6febc6fbd40a3ed05a816d46e0b"
    assert k.object_id.hex() == "c48e885b1d8ac647b8bd257efb8adadd695b28a4029c6f7bacb3dcfabb1cc8ca"
    assert k.cache.hex() == "987e707b62b7953271c6fdb69b0d46ff197e4445602a3ee106586d743ee43983"
    for label, key in [
        (header.LABEL_CONTENT, k.content),
        (header.LABEL_METADATA, k.metadata),
        (header.LABEL_CHUNK_ID, k.chunk_id),
        (header.LABEL_OBJECT_ID, k.object_id),
        (header.LABEL_CACHE, k.cache),
    ]:
        assert _hkdf(MK, VID, label) == key
    assert len({k.content, k.metadata, k.chunk_id, k.object_id, k.cache}) == 5


def test_kdf_known_answer() -> None:
    params = {"salt": base64.b64encode(bytes(16)).decode(), **FAST}
    out = header._kdf(b"passphrase", params)
    assert out.hex() == "f76ed78513f8930a53db1d1d3f3694579f52fb833470a0d30dd6bda398a88cfe"


def test_default_kdf_is_at_least_gocryptfs_strength() -> None:
    # gocryptfs: scrypt N=2^16, r=8 -> 64 MiB.
    assert header.DEFAULT_KDF["memory_kib"] >= 65536
    assert header.DEFAULT_KDF["iterations"] >= 3


def test_context_layout() -> None:
    ad = seal.context(seal.KIND_CHUNK, VID, "c/ab/abcd", 3, True)
    assert ad.hex() == (
        "6d65676166732f31046465666768696a6b6c6d6e6f707172730009632f61622f61626364000000000000000301"
    )
    assert seal.context(seal.KIND_CHUNK, VID, "c/ab/abcd", 3, False) != ad
    assert seal.context(seal.KIND_DIR, VID, "c/ab/abcd", 3, True) != ad


def test_seal_known_answer_and_fresh_nonces() -> None:
    k = header.derive_keys(MK, VID)
    ad = seal.context(seal.KIND_CHUNK, VID, "c/ab/abcd", 0, True)
    sealed = seal._seal_with_nonce(k.content, b"megafs known answer", ad, bytes(12))
    assert sealed.hex() == (
        "000000000000000000000000c582dd62564c9877f7f92b510dfe36260cf0c6e08bad24"
        "c554cf9ccc38a1118a7ba626"
    )
    assert seal.open_sealed(k.content, sealed, ad, "x") == b"megafs known answer"
    a, b = seal.seal(k.content, b"same", ad), seal.seal(k.content, b"same", ad)
    assert a[:12] != b[:12] and a != b


def test_chunk_id_and_object_keys_known_answers() -> None:
    k = header.derive_keys(MK, VID)
    cid = chunks.chunk_id(k.chunk_id, b"x" * 100)
    assert cid.hex() == "8e9abbfc65257b4bc63cd2c23cf22d52d197fd9830ee9284f949cdefbef602f5"
    assert chunks.chunk_key(cid) == "c/8e/" + cid.hex()
    # Keyed BLAKE3 itself, from the official BLAKE3 test vectors (keyed_hash,
    # input lengths 0 and 1, key "whats the Elvish word for friend").
    elvish = b"whats the Elvish word for friend"
    assert chunks.chunk_id(elvish, b"").hex() == (
        "92b2b75604ed3c761f9d6f62392c8a9227ad0ea3f09573e783f1498a4ed60d26"
    )
    assert chunks.chunk_id(elvish, b"\x00").hex() == (
        "6d7878dfff2f485635d39013278ae14f1454b8c0a3a2d34bc1ab38228a80c95b"
    )
    assert records.object_key(k.object_id, "d", 1) == "d/ed8039fbb36015bc33ee879190077e0d"
    assert records.object_key(k.object_id, "i", 42) == "i/298e2800aa2d1a82d02f51e6d5d58f67"


def test_directory_encoding_known_answer_and_roundtrip() -> None:
    r = records.Record(
        ino=7,
        mode=0o100644,
        uid=1,
        gid=2,
        nlink=1,
        size=5,
        atime_ns=1,
        mtime_ns=2,
        ctime_ns=3,
        inline=b"hello",
        xattrs={b"user.a": b"b"},
    )
    root = records.Record(ino=1, mode=0o40755, nlink=2)
    entries = {b"f": r, b"h": records.Record(ino=8, ref=True)}
    blob = records.encode_dir(9, 1, root, entries)
    assert hashlib.sha256(blob).hexdigest() == (
        "ced4b883186778c4d3b6cf2a21f2a69a76fe8478f9663206597311d8bbbc5279"
    )
    back = records.decode_dir(blob, "t")
    assert (back.version, back.ino, back.self_record, back.entries) == (9, 1, root, entries)


def test_record_roundtrip_full_metadata() -> None:
    rec = records.Record(
        ino=2**63 - 1,
        mode=0o104755,
        uid=2**32 - 2,
        gid=65534,
        nlink=3,
        rdev=0x0801,
        size=2**40 + 17,
        atime_ns=-(10**18),
        mtime_ns=1_700_000_000_123_456_789,
        ctime_ns=1,
        target=b"",
        xattrs={b"user.x" * 40: os.urandom(65536)},
        chunks={
            0: records.ChunkRef(os.urandom(32), chunks.CHUNK_SIZE),
            262144: records.ChunkRef(os.urandom(32), 17),
        },
    )
    version, back = records.decode_inode(records.encode_inode(5, rec), "t")
    assert version == 5 and back == rec


def test_invalid_names_are_skipped_not_fatal() -> None:
    good = records.Record(ino=3, mode=0o100600)
    blob = records.encode_dir(1, 2, None, {b"ok": good, b"a/b": good, b"..": good})
    back = records.decode_dir(blob, "t")
    assert list(back.entries) == [b"ok"] and back.bad_names == 2


def test_trailing_bytes_rejected() -> None:
    blob = records.encode_dir(1, 2, None, {})
    with pytest.raises(IntegrityError):
        records.decode_dir(blob + b"\0", "t")


@pytest.mark.parametrize(
    "length",
    [
        0,
        1,
        chunks.BLOCK_SIZE - 1,
        chunks.BLOCK_SIZE,
        chunks.BLOCK_SIZE + 1,
        3 * chunks.BLOCK_SIZE + 5,
    ],
)
def test_chunk_seal_and_ranged_open(length: int) -> None:
    k = header.derive_keys(MK, VID)
    aead = AESGCM(k.content)
    data = os.urandom(length)
    cid = chunks.chunk_id(k.chunk_id, data)
    sealed = chunks.seal_chunk(aead, VID, cid, data)
    assert len(sealed) == chunks.sealed_size(length)
    assert chunks.verify_chunk(aead, VID, cid, length, sealed) == data
    if length:
        for start, end in [(0, length), (length - 1, length), (length // 2, length)]:
            first, _stop, c0, c1 = chunks.block_range(start, end, length)
            plain = b"".join(chunks.open_blocks(aead, VID, cid, length, first, sealed[c0:c1]))
            off = start - first * chunks.BLOCK_SIZE
            assert plain[off : off + end - start] == data[start:end]


def test_a_4k_read_fetches_one_sealed_block() -> None:
    length = chunks.CHUNK_SIZE
    first, stop, c0, c1 = chunks.block_range(1_000_000, 1_004_096, length)
    assert stop - first == 1 and c1 - c0 == chunks.SEALED_BLOCK_SIZE


def test_header_roundtrip_and_passphrase_change() -> None:
    blob, mk, vid = header.new_header(b"one", kdf_params=FAST)
    assert header.unlock_header(blob, b"one") == (mk, vid)
    with pytest.raises(WrongPassphrase):
        header.unlock_header(blob, b"two")
    new = header.rewrap_header(blob, b"one", b"two")
    assert header.unlock_header(new, b"two") == (mk, vid)
    with pytest.raises(WrongPassphrase):
        header.unlock_header(new, b"one")


def _redo_check(doc: dict[str, object]) -> bytes:
    doc.pop("check", None)
    return header._encode(doc)


def test_header_bad_inputs() -> None:
    blob, _, _ = header.new_header(b"pw", kdf_params=FAST)
    with pytest.raises(CorruptHeader):
        header.unlock_header(b"\x89PNG garbage", b"pw")
    with pytest.raises(NotAVolume):
        header.unlock_header(b'{"magic": "other"}', b"pw")
    damaged = blob.replace(b'"format": 1', b'"format": 2')
    with pytest.raises(CorruptHeader):
        header.unlock_header(damaged, b"pw")
    with pytest.raises(CorruptHeader):
        header.unlock_header(blob[: len(blob) // 2], b"pw")
    doc = json.loads(blob)
    doc["format"] = 2
    with pytest.raises(UnsupportedFormat, match="newer"):
        header.unlock_header(_redo_check(doc), b"pw")
    # Weaker KDF parameters with a recomputed checksum: the wrapping AD refuses.
    doc = json.loads(blob)
    doc["kdf"]["iterations"] = 2
    with pytest.raises(WrongPassphrase):
        header.unlock_header(_redo_check(doc), b"pw")
    # Another volume's id: the wrapping AD refuses.
    doc = json.loads(blob)
    doc["volume_id"] = "00" * 16
    with pytest.raises(WrongPassphrase):
        header.unlock_header(_redo_check(doc), b"pw")
