"""MEGA's own cryptography: pure functions, no I/O.

Everything here follows the MEGA protocol notes (``mega-protocol.md``; section numbers
below refer to it) and is pinned by known-answer tests in ``tests/mega/test_crypto.py``.

* Encodings (§1): base64url without padding (lenient decoder), MPI integers.
* Login keys (§3): v1 ``prepare_key`` (65 536 AES rounds) and ``stringhash`` user hash,
  v2 PBKDF2-HMAC-SHA512, RSA private/public key blobs, ``csid``/``tsid`` session ids.
* Node keys and attributes (§4.4-4.7): AES-ECB key wrapping, ``MEGA{json}`` attribute
  blobs under AES-CBC with a zero IV, the ``c`` fingerprint.
* File content (§5): AES-128-CTR at any byte offset, chunk layout, chunk CBC-MACs,
  the condensed meta-MAC, the 32-byte packed file key.
* Upload piece checksum (§6.2), hashcash proof of work (§2.6), public links (§6.5).

These are MEGA's algorithms, reproduced for compatibility; several are weak by modern
standards (unauthenticated attribute encryption, raw RSA) and must not be reused for
megafs's own volume format. Every failure on untrusted input raises
:class:`MegaCryptoError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import secrets
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, final

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

Buffer = bytes | bytearray | memoryview
_M = TypeVar("_M", modes.ECB, modes.CBC, modes.CTR)

BLOCK = 16
SEGMENT = 131072  # chunk k has min(k + 1, 8) segments
_MAX_CHUNK = 8 * SEGMENT
_SMALL_CHUNKS_END = SEGMENT * 8 * 9 // 2  # 4 718 592: start of the first 1 MiB chunk
SESSION_TOKEN_LEN = 43
_PREPARE_KEY_INIT = bytes.fromhex("93c467e37db0c7a4d1be3f810152cb56")
_PREPARE_KEY_ROUNDS = 65536
_STRINGHASH_ROUNDS = 16384
_V2_ITERATIONS = 100000
_HASHCASH_REPEAT = 262144
_HASHCASH_TOKEN_LEN = 48
_FINGERPRINT_FULL = 8192
_FINGERPRINT_LANES = 4
_FINGERPRINT_BLOCKS = 32
_FINGERPRINT_WINDOW = 64


class MegaCryptoError(ValueError):
    """A key, attribute blob, MAC or encoding could not be used."""


# --------------------------------------------------------------------------- encodings


_B64_CHARS = re.compile(r"[A-Za-z0-9_-]*")


def b64encode(data: Buffer) -> str:
    """base64url without ``=`` padding, as MEGA writes every handle, key and blob."""
    return base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    """Decode base64url leniently: ``+``/``/`` and ``=`` padding accepted, ``,`` dropped."""
    s = text.replace(",", "").replace("+", "-").replace("/", "_").rstrip("=")
    if not _B64_CHARS.fullmatch(s) or len(s) % 4 == 1:
        raise MegaCryptoError("invalid base64")
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - the regex screens
        raise MegaCryptoError("invalid base64") from exc


def _mpi(value: int) -> bytes:
    bits = value.bit_length()
    if bits > 0xFFFF:
        raise MegaCryptoError("integer too large for an MPI")
    return struct.pack(">H", bits) + value.to_bytes((bits + 7) // 8, "big")


def _read_mpi(data: bytes, pos: int) -> tuple[int, int]:
    if pos + 2 > len(data):
        raise MegaCryptoError("truncated MPI header")
    (bits,) = struct.unpack_from(">H", data, pos)
    end = pos + 2 + (bits + 7) // 8
    if end > len(data):
        raise MegaCryptoError("truncated MPI")
    return int.from_bytes(data[pos + 2 : end], "big"), end


# ---------------------------------------------------------------------------- AES


def _cipher(key: bytes, mode: _M) -> Cipher[_M]:
    try:
        return Cipher(algorithms.AES(key), mode)
    except ValueError as exc:
        raise MegaCryptoError(f"invalid AES key length {len(key)}") from exc


def _ecb_encryptor(key: bytes) -> CipherContext:
    return _cipher(key, modes.ECB()).encryptor()


def _check_aes128(key: bytes) -> None:
    if len(key) != 16:
        raise MegaCryptoError(f"expected a 16-byte AES key, got {len(key)} bytes")


def aes_ecb_encrypt(key: bytes, data: Buffer) -> bytes:
    """AES-ECB encryption; ``len(data)`` must be a multiple of 16."""
    if len(data) % BLOCK:
        raise MegaCryptoError("ECB data must be a multiple of 16 bytes")
    enc = _ecb_encryptor(key)
    return enc.update(data) + enc.finalize()


def aes_ecb_decrypt(key: bytes, data: Buffer) -> bytes:
    """AES-ECB decryption; ``len(data)`` must be a multiple of 16."""
    if len(data) % BLOCK:
        raise MegaCryptoError("ECB data must be a multiple of 16 bytes")
    dec = _cipher(key, modes.ECB()).decryptor()
    return dec.update(data) + dec.finalize()


def encrypt_key(wrapping_key: bytes, key: bytes) -> str:
    """Wrap a 16-byte (folder, master, share) or 32-byte (file) key: b64(AES-ECB)."""
    if len(key) not in (16, 32):
        raise MegaCryptoError(f"cannot wrap a {len(key)}-byte key")
    _check_aes128(wrapping_key)
    return b64encode(aes_ecb_encrypt(wrapping_key, key))


def decrypt_key(wrapping_key: bytes, blob: str) -> bytes:
    """Unwrap a key written by :func:`encrypt_key`; the result is 16 or 32 bytes."""
    raw = b64decode(blob)
    if len(raw) not in (16, 32):
        raise MegaCryptoError(f"wrapped key has {len(raw)} bytes, expected 16 or 32")
    _check_aes128(wrapping_key)
    return aes_ecb_decrypt(wrapping_key, raw)


# ------------------------------------------------------------------ password keys (§3)


def password_bytes_v1(password: str) -> bytes:
    """The JS/SDK password byte string for v1 accounts (§3.3).

    Each UTF-16 code unit j is OR-ed into the big-endian 32-bit word j // 4 after a
    left shift of ``24 - 8 * (j % 4)``, truncated to 32 bits (JavaScript semantics), so
    a code unit above 0xFF spills its high byte into the preceding slot of its word or,
    in slot 0, loses it. The length is the number of code units. For ASCII and Latin-1
    passwords this is simply one byte per character.
    """
    utf16 = password.encode("utf-16-be", "surrogatepass")
    units = struct.unpack(f">{len(utf16) // 2}H", utf16)
    words = [0] * ((len(units) + 3) // 4)
    for j, unit in enumerate(units):
        words[j >> 2] |= (unit << (24 - 8 * (j & 3))) & 0xFFFFFFFF
    return struct.pack(f">{len(words)}I", *words)[: len(units)]


def prepare_key_v1(password: bytes) -> bytes:
    """The 16-byte v1 password key: 65 536 rounds of AES over the password pieces."""
    padded = password + b"\0" * (-len(password) % 16)
    encryptors = [_ecb_encryptor(padded[i : i + 16]) for i in range(0, len(padded), 16)]
    value = _PREPARE_KEY_INIT
    if len(encryptors) == 1:
        (only,) = encryptors
        for _ in range(_PREPARE_KEY_ROUNDS):
            value = only.update(value)
    else:
        for _ in range(_PREPARE_KEY_ROUNDS):
            for enc in encryptors:
                value = enc.update(value)
    return value


def _stringhash(data: bytes, key: bytes) -> bytes:
    """MEGA's 8-byte ``stringhash``: fold ``data`` into 16 bytes, AES 16 384 times."""
    _check_aes128(key)
    folded = bytearray(16)
    for i, byte in enumerate(data):
        folded[i % 16] ^= byte
    enc = _ecb_encryptor(key)
    value = bytes(folded)
    for _ in range(_STRINGHASH_ROUNDS):
        value = enc.update(value)
    return value[0:4] + value[8:12]


def user_hash_v1(email: str, password_key: bytes) -> str:
    """The v1 ``uh`` (11 characters) for the lower-cased e-mail address."""
    return b64encode(_stringhash(email.lower().encode("utf-8"), password_key))


def derive_key_v2(password: str, salt: bytes) -> tuple[bytes, str]:
    """v2 login: PBKDF2-HMAC-SHA512(100 000) -> (password key, ``uh`` of 22 chars)."""
    dk = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, _V2_ITERATIONS, 32)
    return dk[:16], b64encode(dk[16:])


def v2_verifier(uh: str) -> bytes:
    """What the server stores for a v2 account: SHA-256 of the auth key, 16 bytes."""
    return hashlib.sha256(b64decode(uh)).digest()[:16]


def new_v2_salt() -> bytes:
    """A registration salt as the SDK makes it (§3.2)."""
    return hashlib.sha256(b"mega.nz".ljust(200, b"P") + secrets.token_bytes(16)).digest()


# ----------------------------------------------------------------------------- RSA


@final
@dataclass(frozen=True)
class RsaKey:
    """An RSA key pair in MEGA's order: u = p^-1 mod q (p is the first stored prime)."""

    p: int = field(repr=False)
    q: int = field(repr=False)
    d: int = field(repr=False)
    u: int = field(repr=False)
    e: int

    @property
    def n(self) -> int:
        return self.p * self.q


def generate_rsa_key(bits: int = 2048) -> RsaKey:
    """A fresh key pair with e = 65537 (``bits`` >= 1024)."""
    try:
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    except ValueError as exc:
        raise MegaCryptoError(str(exc)) from exc
    numbers = private.private_numbers()
    p, q = sorted((numbers.p, numbers.q))
    return RsaKey(p=p, q=q, d=numbers.d, u=pow(p, -1, q), e=numbers.public_numbers.e)


def encode_private_key(key: RsaKey) -> bytes:
    """MPI(p) || MPI(q) || MPI(d) || MPI(u), zero-padded to a multiple of 16 bytes."""
    raw = b"".join(_mpi(v) for v in (key.p, key.q, key.d, key.u))
    return raw + b"\0" * (-len(raw) % 16)


def decode_private_key(plain: bytes) -> RsaKey:
    """Parse a decrypted ``privk`` blob; e is recomputed as d^-1 mod lcm(p-1, q-1)."""
    pos = 0
    values = []
    for _ in range(4):
        value, pos = _read_mpi(plain, pos)
        values.append(value)
    p, q, d, u = values
    if len(plain) - pos >= 16:
        raise MegaCryptoError("private key blob has trailing data")
    if p < 3 or q < 3 or d < 3 or p == q:
        raise MegaCryptoError("invalid private key")
    lam = math.lcm(p - 1, q - 1)
    try:
        e = pow(d, -1, lam)
    except ValueError as exc:
        raise MegaCryptoError("invalid private key") from exc
    return RsaKey(p=p, q=q, d=d, u=u, e=e)


def encode_public_key(key: RsaKey) -> bytes:
    """The ``pubk`` blob: MPI(n) || MPI(e)."""
    return _mpi(key.n) + _mpi(key.e)


def decode_public_key(raw: bytes) -> tuple[int, int]:
    """Parse ``pubk`` into (n, e); an exponent stored in 4 bytes is accepted."""
    n, pos = _read_mpi(raw, 0)
    e, _ = _read_mpi(raw, pos)
    if n < 3 or e < 3:
        raise MegaCryptoError("invalid public key")
    return n, e


def encrypt_session_id(pubk: bytes, token: bytes) -> str:
    """Server side: the ``csid`` for a session token (raw RSA, random right padding).

    Like the web client, the plaintext is the token followed by random bytes up to
    (modulus bytes - 2).
    """
    n, e = decode_public_key(pubk)
    width = (n.bit_length() + 7) // 8 - 2
    if len(token) > width:
        raise MegaCryptoError("token longer than the RSA modulus allows")
    m = int.from_bytes(token + secrets.token_bytes(width - len(token)), "big")
    return b64encode(_mpi(pow(m, e, n)))


def decrypt_session_id(csid: str, key: RsaKey) -> str:
    """Client side: the ``sid`` (58 chars) from ``csid``.

    The first 43 bytes of the plaintext written at the fixed width
    len(p) + len(q) - 2 (the SDK's rule), so a token starting with 0x00 survives.
    """
    c, _ = _read_mpi(b64decode(csid), 0)
    n = key.n
    if c >= n:
        raise MegaCryptoError("csid is not smaller than the modulus")
    m = pow(c, key.d, n)
    width = max(
        (key.p.bit_length() + 7) // 8 + (key.q.bit_length() + 7) // 8 - 2,
        (m.bit_length() + 7) // 8,
    )
    if width < SESSION_TOKEN_LEN:
        raise MegaCryptoError("RSA key too small for a session id")
    return b64encode(m.to_bytes(width, "big")[:SESSION_TOKEN_LEN])


def _handle_bytes(user_handle: str, length: int) -> bytes:
    try:
        raw = user_handle.encode("ascii")
    except UnicodeEncodeError as exc:
        raise MegaCryptoError("handle is not ASCII") from exc
    if len(raw) != length:
        raise MegaCryptoError(f"handle must be {length} characters")
    return raw


def make_session_token(user_handle: str) -> bytes:
    """A 43-byte session token: 16 random || 11-char user handle || 16 random."""
    return secrets.token_bytes(16) + _handle_bytes(user_handle, 11) + secrets.token_bytes(16)


def make_tsid(master_key: bytes, user_handle: str) -> str:
    """A ``tsid`` for an account without RSA keys: C || handle || AES(master, C)."""
    _check_aes128(master_key)
    challenge = secrets.token_bytes(16)
    return b64encode(
        challenge + _handle_bytes(user_handle, 11) + aes_ecb_encrypt(master_key, challenge)
    )


def check_tsid(tsid: str, master_key: bytes) -> bool:
    """Whether ``tsid`` proves knowledge of ``master_key`` (False on any malformation)."""
    try:
        raw = b64decode(tsid)
    except MegaCryptoError:
        return False
    if len(raw) != SESSION_TOKEN_LEN or len(master_key) != 16:
        return False
    return secrets.compare_digest(aes_ecb_encrypt(master_key, raw[:16]), raw[-16:])


def handle_auth(master_key: bytes, handle: str) -> str:
    """The ``ha`` of an outgoing share: b64(AES-ECB(master, h || h)), h 8 ASCII chars."""
    _check_aes128(master_key)
    raw = _handle_bytes(handle, 8)
    return b64encode(aes_ecb_encrypt(master_key, raw + raw))


# ------------------------------------------------------------------- attributes (§4.7)


def encrypt_attributes(attrs: Mapping[str, Any], key: bytes) -> str:
    """b64(AES-CBC(key, zero IV, ``MEGA`` || compact JSON || NULs to a 16-byte multiple))."""
    _check_aes128(key)
    try:
        text = json.dumps(dict(attrs), separators=(",", ":"), ensure_ascii=False)
        plain = b"MEGA" + text.encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise MegaCryptoError(f"attributes cannot be encoded: {exc}") from exc
    plain += b"\0" * (-len(plain) % BLOCK)
    enc = _cipher(key, modes.CBC(bytes(BLOCK))).encryptor()
    return b64encode(enc.update(plain) + enc.finalize())


def decrypt_attributes(blob: str, key: bytes) -> dict[str, Any]:
    """Decrypt an attribute blob; raises :class:`MegaCryptoError` on any defect.

    The plaintext must start with ``MEGA{"``; trailing NULs are stripped; compact or
    spaced JSON is accepted, as is junk after the JSON object (go-mega tolerance).
    """
    _check_aes128(key)
    raw = b64decode(blob)
    if not raw or len(raw) % BLOCK:
        raise MegaCryptoError("attribute blob length is not a positive multiple of 16")
    dec = _cipher(key, modes.CBC(bytes(BLOCK))).decryptor()
    plain = dec.update(raw) + dec.finalize()
    if not plain.startswith(b'MEGA{"'):
        raise MegaCryptoError("attribute blob does not decrypt (wrong key?)")
    try:
        text = plain[4:].rstrip(b"\0").decode("utf-8")
        value, _ = json.JSONDecoder().raw_decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MegaCryptoError("attribute blob is not valid JSON") from exc
    if not isinstance(value, dict):  # pragma: no cover - the prefix guarantees an object
        raise MegaCryptoError("attributes are not a JSON object")
    return value


# --------------------------------------------------------------- file content (§4.5, §5)


@final
@dataclass(frozen=True)
class FileKey:
    """The material of a file's 32-byte node key (§4.5)."""

    aes_key: bytes = field(repr=False)  # 16
    nonce: bytes = field(repr=False)  # 8, the CTR nonce
    meta_mac: bytes = field(repr=False)  # 8, the condensed MAC

    def __post_init__(self) -> None:
        if len(self.aes_key) != 16 or len(self.nonce) != 8 or len(self.meta_mac) != 8:
            raise MegaCryptoError("file key parts must be 16, 8 and 8 bytes")

    def pack(self) -> bytes:
        """(aes_key XOR (nonce || mac)) || nonce || mac."""
        tail = self.nonce + self.meta_mac
        return bytes(a ^ b for a, b in zip(self.aes_key, tail, strict=True)) + tail

    @classmethod
    def unpack(cls, raw: bytes) -> FileKey:
        if len(raw) != 32:
            raise MegaCryptoError(f"file key has {len(raw)} bytes, expected 32")
        head, tail = raw[:16], raw[16:]
        aes_key = bytes(a ^ b for a, b in zip(head, tail, strict=True))
        return cls(aes_key=aes_key, nonce=tail[:8], meta_mac=tail[8:])

    @classmethod
    def random(cls) -> FileKey:
        """A fresh key for an upload; ``meta_mac`` stays zero until it is known."""
        return cls(aes_key=secrets.token_bytes(16), nonce=secrets.token_bytes(8), meta_mac=bytes(8))


def ctr_crypt(aes_key: bytes, nonce: bytes, offset: int, data: Buffer) -> bytes:
    """AES-128-CTR en/decryption of ``data`` that sits at byte ``offset`` of the file.

    The counter block of file block ``o // 16`` is ``nonce || uint64_be(o // 16)``;
    ``offset`` need not be a multiple of 16.
    """
    _check_aes128(aes_key)
    if len(nonce) != 8:
        raise MegaCryptoError("CTR nonce must be 8 bytes")
    if offset < 0 or offset >= 1 << 68:
        raise MegaCryptoError("offset out of range")
    counter = (int.from_bytes(nonce, "big") << 64) | (offset >> 4)
    enc = _cipher(aes_key, modes.CTR(counter.to_bytes(16, "big"))).encryptor()
    skip = offset & 15
    if skip:
        enc.update(bytes(skip))
    return enc.update(data) + enc.finalize()


def chunk_start(index: int) -> int:
    """Byte offset where chunk ``index`` begins."""
    if index < 0:
        raise ValueError("negative chunk index")
    if index <= 8:
        return SEGMENT * index * (index + 1) // 2
    return _SMALL_CHUNKS_END + (index - 8) * _MAX_CHUNK


def chunk_index(offset: int) -> int:
    """Index of the chunk containing byte ``offset``."""
    if offset < 0:
        raise ValueError("negative offset")
    if offset >= _SMALL_CHUNKS_END:
        return 8 + (offset - _SMALL_CHUNKS_END) // _MAX_CHUNK
    index = 0
    while chunk_start(index + 1) <= offset:
        index += 1
    return index


def chunk_bounds(size: int) -> list[tuple[int, int]]:
    """``[(start, length)]`` of every chunk of a ``size``-byte file; ``[]`` for 0."""
    if size < 0:
        raise ValueError("negative size")
    bounds = []
    index = 0
    start = 0
    while start < size:
        end = min(chunk_start(index + 1), size)
        bounds.append((start, end - start))
        start = end
        index += 1
    return bounds


def chunk_mac(aes_key: bytes, nonce: bytes, plaintext: Buffer) -> bytes:
    """CBC-MAC of one chunk's plaintext with IV nonce || nonce (zero-padded last block)."""
    _check_aes128(aes_key)
    if len(nonce) != 8:
        raise MegaCryptoError("CTR nonce must be 8 bytes")
    view = memoryview(plaintext).cast("B")
    if not len(view):
        return nonce + nonce
    enc = _cipher(aes_key, modes.CBC(nonce + nonce)).encryptor()
    full = len(view) - len(view) % BLOCK
    out = b""
    if full:
        out = enc.update(view[:full])
    if full < len(view):
        tail = bytes(view[full:])
        out = enc.update(tail + b"\0" * (BLOCK - len(tail)))
    return out[-BLOCK:]


def condensed_mac(aes_key: bytes, chunk_macs: Iterable[bytes]) -> bytes:
    """Meta-MAC (CBC over the chunk MACs, zero IV) folded to 8 bytes; zeros if none."""
    _check_aes128(aes_key)
    macs = b"".join(chunk_macs)
    if len(macs) % BLOCK:
        raise MegaCryptoError("chunk MACs must be 16 bytes each")
    mac = bytes(BLOCK)
    if macs:
        enc = _cipher(aes_key, modes.CBC(bytes(BLOCK))).encryptor()
        mac = enc.update(macs)[-BLOCK:]
    words = struct.unpack(">4I", mac)
    return struct.pack(">2I", words[0] ^ words[1], words[2] ^ words[3])


def upload_crc(body: Buffer) -> str:
    """The ``?c=``/``?d=`` checksum of an upload POST: body XOR-ed cyclically into 12 bytes."""
    data = bytes(body)
    data += b"\0" * (-len(data) % 12)
    acc = 0
    rows = len(data) // 12
    # Fold halves together at C speed instead of looping over the bytes.
    while rows > 1:
        if rows % 2:
            acc ^= int.from_bytes(data[-12:], "big")
            data = data[:-12]
            rows -= 1
        half = rows // 2 * 12
        folded = int.from_bytes(data[:half], "big") ^ int.from_bytes(data[half:], "big")
        data = folded.to_bytes(half, "big")
        rows //= 2
    if rows:
        acc ^= int.from_bytes(data, "big")
    return b64encode(acc.to_bytes(12, "big"))


# ------------------------------------------------------------------- fingerprint (§4.7)


def fingerprint_crc(read: Callable[[int, int], bytes], size: int) -> bytes:
    """The 16-byte CRC part of the ``c`` attribute; ``read(offset, length)`` gives bytes."""
    if size < 0:
        raise ValueError("negative size")

    def exact(offset: int, length: int) -> bytes:
        data = read(offset, length)
        if len(data) != length:
            raise MegaCryptoError("short read while fingerprinting")
        return data

    if size <= 16:
        return exact(0, size) + bytes(16 - size)
    lanes = []
    if size <= _FINGERPRINT_FULL:
        data = exact(0, size)
        for i in range(_FINGERPRINT_LANES):
            begin = i * size // _FINGERPRINT_LANES
            end = (i + 1) * size // _FINGERPRINT_LANES
            lanes.append(zlib.crc32(data[begin:end]))
    else:
        last = _FINGERPRINT_LANES * _FINGERPRINT_BLOCKS - 1
        for i in range(_FINGERPRINT_LANES):
            crc = 0
            for j in range(_FINGERPRINT_BLOCKS):
                offset = (size - _FINGERPRINT_WINDOW) * (i * _FINGERPRINT_BLOCKS + j) // last
                crc = zlib.crc32(exact(offset, _FINGERPRINT_WINDOW), crc)
            lanes.append(crc)
    return struct.pack(">4I", *lanes)


def encode_fingerprint(crc: bytes, mtime: int) -> str:
    """``c`` = b64(crc || length byte || little-endian mtime without leading zeros)."""
    if len(crc) != 16:
        raise MegaCryptoError("fingerprint CRC must be 16 bytes")
    value = mtime & 0xFFFFFFFFFFFFFFFF
    packed = value.to_bytes((value.bit_length() + 7) // 8, "little")
    return b64encode(crc + bytes((len(packed),)) + packed)


def fingerprint_mtime(c: str) -> int | None:
    """The mtime in a ``c`` attribute (either base64 alphabet), or None if undecodable."""
    try:
        raw = b64decode(c)
    except MegaCryptoError:
        return None
    if len(raw) < 17:
        return None
    length = raw[16]
    if length > 8 or 17 + length > len(raw):
        return None
    value = int.from_bytes(raw[17 : 17 + length], "little")
    return value - (1 << 64) if value >= 1 << 63 else value


# --------------------------------------------------------------------- hashcash (§2.6)


def hashcash_threshold(easiness: int) -> int:
    """The largest acceptable leading SHA-256 word for ``easiness`` (0..255)."""
    if not 0 <= easiness <= 255:
        raise MegaCryptoError("hashcash easiness must be 0..255")
    return (((easiness & 63) << 1) + 1) << ((easiness >> 6) * 7 + 3)


def _hashcash_buffer(token: str) -> bytearray:
    raw = b64decode(token)
    if len(raw) != _HASHCASH_TOKEN_LEN:
        raise MegaCryptoError("hashcash token must be 48 bytes")
    return bytearray(4) + raw * _HASHCASH_REPEAT


def _hashcash_word(buffer: bytearray) -> int:
    value: int = struct.unpack(">I", hashlib.sha256(buffer).digest()[:4])[0]
    return value


def hashcash_check(token: str, cash: str, easiness: int) -> bool:
    """Server side: whether ``cash`` solves the challenge ``token`` at ``easiness``."""
    try:
        threshold = hashcash_threshold(easiness)
        prefix = b64decode(cash)
        buffer = _hashcash_buffer(token)
    except MegaCryptoError:
        return False
    if len(prefix) != 4:
        return False
    buffer[:4] = prefix
    return _hashcash_word(buffer) <= threshold


def _hashcash_search(
    buffer: bytearray,
    threshold: int,
    start: int,
    step: int,
    cancelled: Callable[[], bool],
    stop: threading.Event | None,
) -> str | None:
    for counter in range(start, 1 << 32, step):
        if stop is not None and stop.is_set():
            return None
        if cancelled():
            raise MegaCryptoError("hashcash cancelled")
        prefix = counter.to_bytes(4, "little")
        buffer[:4] = prefix
        if _hashcash_word(buffer) <= threshold:
            return b64encode(prefix)
    return None


def solve_hashcash(
    token: str,
    easiness: int,
    *,
    workers: int = 1,
    cancelled: Callable[[], bool] = lambda: False,
) -> str:
    """Find a ``cash`` for the challenge (blocking; run it in a worker thread).

    Prefixes are tried as a little-endian counter (byte 0 first, like go-mega); with
    ``workers > 1`` threads stripe the counter space (hashlib releases the GIL).
    ``cancelled`` is polled between attempts; when it returns True the search stops
    with ``MegaCryptoError('hashcash cancelled')``.
    """
    threshold = hashcash_threshold(easiness)
    template = _hashcash_buffer(token)
    workers = max(1, workers)
    if workers == 1:
        found = _hashcash_search(template, threshold, 0, 1, cancelled, None)
        if found is None:
            raise MegaCryptoError("hashcash: no solution exists")
        return found

    stop = threading.Event()
    results: list[str] = []
    errors: list[BaseException] = []

    def run(start: int) -> None:
        try:
            found = _hashcash_search(
                bytearray(template), threshold, start, workers, cancelled, stop
            )
        except BaseException as exc:  # reported by the caller's thread
            errors.append(exc)
            stop.set()
            return
        if found is not None:
            results.append(found)
            stop.set()

    threads = [
        threading.Thread(target=run, args=(w,), name=f"hashcash-{w}", daemon=True)
        for w in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if results:
        return results[0]
    if errors:
        raise errors[0]
    raise MegaCryptoError("hashcash: no solution exists")


# ------------------------------------------------------------------------ links, signup


def file_link(public_handle: str, key: FileKey) -> str:
    """The public link ``https://mega.nz/file/<ph>#<43-char key>`` (§6.5)."""
    return f"https://mega.nz/file/{public_handle}#{b64encode(key.pack())}"


@final
@dataclass(frozen=True)
class NewAccount:
    """What MEGA's signup leaves on the server, computed with the client algorithms.

    ``verifier`` is what the server compares a login's ``uh`` against: the raw ``uh``
    bytes for v1, :func:`v2_verifier` of it for v2. ``master_key`` and ``rsa`` are the
    client's secrets, kept so tests can check what a client derives.
    """

    email: str
    version: int
    salt: bytes | None
    uh: str = field(repr=False)
    verifier: bytes = field(repr=False)
    k: str = field(repr=False)
    privk: str = field(repr=False)
    pubk: str
    master_key: bytes = field(repr=False)
    rsa: RsaKey


def new_account(email: str, password: str, version: int = 2, *, rsa_bits: int = 2048) -> NewAccount:
    """Create an account's server-side records the way a MEGA client registers (§3)."""
    email = email.lower()
    master_key = secrets.token_bytes(16)
    salt: bytes | None
    if version == 2:
        salt = new_v2_salt()
        password_key, uh = derive_key_v2(password, salt)
        verifier = v2_verifier(uh)
    elif version == 1:
        salt = None
        password_key = prepare_key_v1(password_bytes_v1(password))
        uh = user_hash_v1(email, password_key)
        verifier = b64decode(uh)
    else:
        raise MegaCryptoError(f"unknown account version {version}")
    key = generate_rsa_key(rsa_bits)
    return NewAccount(
        email=email,
        version=version,
        salt=salt,
        uh=uh,
        verifier=verifier,
        k=encrypt_key(password_key, master_key),
        privk=b64encode(aes_ecb_encrypt(master_key, encode_private_key(key))),
        pubk=b64encode(encode_public_key(key)),
        master_key=master_key,
        rsa=key,
    )


__all__ = [
    "BLOCK",
    "SEGMENT",
    "SESSION_TOKEN_LEN",
    "Buffer",
    "FileKey",
    "MegaCryptoError",
    "NewAccount",
    "RsaKey",
    "aes_ecb_decrypt",
    "aes_ecb_encrypt",
    "b64decode",
    "b64encode",
    "check_tsid",
    "chunk_bounds",
    "chunk_index",
    "chunk_mac",
    "chunk_start",
    "condensed_mac",
    "ctr_crypt",
    "decode_private_key",
    "decode_public_key",
    "decrypt_attributes",
    "decrypt_key",
    "decrypt_session_id",
    "derive_key_v2",
    "encode_fingerprint",
    "encode_private_key",
    "encode_public_key",
    "encrypt_attributes",
    "encrypt_key",
    "encrypt_session_id",
    "file_link",
    "fingerprint_crc",
    "fingerprint_mtime",
    "generate_rsa_key",
    "handle_auth",
    "hashcash_check",
    "hashcash_threshold",
    "make_session_token",
    "make_tsid",
    "new_account",
    "new_v2_salt",
    "password_bytes_v1",
    "prepare_key_v1",
    "solve_hashcash",
    "upload_crc",
    "user_hash_v1",
]
