"""The volume header, the master key and its subkeys.

The header is the one object the store keeps under a fixed key (:data:`HEADER_KEY`).
It is UTF-8 JSON, readable without the passphrase but revealing nothing about the
tree::

    {"magic": "megafs", "format": 1, "volume_id": HEX16,
     "kdf": {"name": "argon2id", "salt": B64, "memory_kib": N, "iterations": N,
             "lanes": N},
     "wrapped_key": B64(nonce || AES-256-GCM(master_key) || tag),
     "check": HEX(sha256(canonical JSON of every other field))}

``check`` tells a damaged header (CorruptHeader) from a wrong passphrase
(WrongPassphrase). The wrapping AEAD's associated data covers the volume id and the
KDF parameters, so they cannot be swapped for weaker ones. Changing the passphrase
rewraps the master key only.

Subkeys come from HKDF-SHA256 over the master key with the named ``info`` labels
below; nothing ever uses the master key directly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from megafs.errors import (
    CorruptHeader,
    IntegrityError,
    NotAVolume,
    UnsupportedFormat,
    WrongPassphrase,
)
from megafs.format.seal import KIND_HEADER, context, open_sealed, seal

FORMAT_VERSION: Final = 1
HEADER_KEY: Final = "megafs.header"
MAGIC: Final = "megafs"

# At least as strong as gocryptfs' scrypt N=2^16 (64 MiB); about 0.15 s here.
DEFAULT_KDF: Final = {"memory_kib": 65536, "iterations": 3, "lanes": 4}
MIN_KDF_MEMORY_KIB: Final = 65536

LABEL_CONTENT: Final = b"megafs/v1/content"
LABEL_METADATA: Final = b"megafs/v1/metadata"
LABEL_CHUNK_ID: Final = b"megafs/v1/chunk-id"
LABEL_OBJECT_ID: Final = b"megafs/v1/object-id"
LABEL_CACHE: Final = b"megafs/v1/cache"


@dataclass(frozen=True)
class VolumeKeys:
    """The per-purpose subkeys of one volume."""

    volume_id: bytes
    content: bytes
    metadata: bytes
    chunk_id: bytes
    object_id: bytes
    cache: bytes


def derive_keys(master_key: bytes, volume_id: bytes) -> VolumeKeys:
    """HKDF subkeys for every purpose, bound to the volume id."""

    def sub(label: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=volume_id, info=label).derive(
            master_key
        )

    return VolumeKeys(
        volume_id=volume_id,
        content=sub(LABEL_CONTENT),
        metadata=sub(LABEL_METADATA),
        chunk_id=sub(LABEL_CHUNK_ID),
        object_id=sub(LABEL_OBJECT_ID),
        cache=sub(LABEL_CACHE),
    )


def _kdf(passphrase: bytes, params: dict[str, Any]) -> bytes:
    return Argon2id(
        salt=base64.b64decode(params["salt"]),
        length=32,
        iterations=int(params["iterations"]),
        lanes=int(params["lanes"]),
        memory_cost=int(params["memory_kib"]),
    ).derive(passphrase)


def _wrap_ad(volume_id: bytes, kdf: dict[str, Any]) -> bytes:
    return context(KIND_HEADER, volume_id, HEADER_KEY) + json.dumps(kdf, sort_keys=True).encode()


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _encode(body: dict[str, Any]) -> bytes:
    return (
        json.dumps({**body, "check": _checksum(body)}, indent=1, sort_keys=True) + "\n"
    ).encode()


def new_header(
    passphrase: bytes, *, kdf_params: dict[str, int] | None = None
) -> tuple[bytes, bytes, bytes]:
    """Create a volume: returns ``(header_bytes, master_key, volume_id)``."""
    master_key = secrets.token_bytes(32)
    volume_id = secrets.token_bytes(16)
    return _build(passphrase, master_key, volume_id, kdf_params), master_key, volume_id


def rewrap_header(header: bytes, old: bytes, new: bytes) -> bytes:
    """The same volume with its master key wrapped under a new passphrase."""
    master_key, volume_id = unlock_header(header, old)
    return _build(new, master_key, volume_id, None)


def _build(
    passphrase: bytes, master_key: bytes, volume_id: bytes, kdf_params: dict[str, int] | None
) -> bytes:
    params = dict(DEFAULT_KDF if kdf_params is None else kdf_params)
    kdf: dict[str, Any] = {
        "name": "argon2id",
        "salt": base64.b64encode(secrets.token_bytes(16)).decode(),
    }
    kdf.update(params)
    wrapping_key = _kdf(passphrase, kdf)
    wrapped = seal(wrapping_key, master_key, _wrap_ad(volume_id, kdf))
    body = {
        "magic": MAGIC,
        "format": FORMAT_VERSION,
        "volume_id": volume_id.hex(),
        "kdf": kdf,
        "wrapped_key": base64.b64encode(wrapped).decode(),
    }
    return _encode(body)


def parse_header(header: bytes) -> dict[str, Any]:
    """Validate the header's structure and version (no passphrase needed)."""
    try:
        doc = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        # Something sits under the header's key but does not parse: damage.
        raise CorruptHeader("volume header is damaged (not valid JSON)") from None
    if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
        raise NotAVolume("not a megafs volume (the header object is not a megafs header)")
    check = doc.pop("check", None)
    if check != _checksum(doc):
        raise CorruptHeader("volume header is damaged (checksum mismatch)")
    fmt = doc.get("format")
    if not isinstance(fmt, int):
        raise CorruptHeader("volume header is damaged (no format version)")
    if fmt > FORMAT_VERSION:
        raise UnsupportedFormat(
            f"volume format version {fmt} is newer than this megafs supports "
            f"(version {FORMAT_VERSION}); upgrade megafs"
        )
    if fmt < 1:
        raise UnsupportedFormat(f"volume format version {fmt} is not supported")
    try:
        kdf = doc["kdf"]
        if kdf["name"] != "argon2id" or int(kdf["memory_kib"]) < 8:
            raise UnsupportedFormat(f"unsupported key derivation {kdf['name']!r}")
        bytes.fromhex(doc["volume_id"])
        base64.b64decode(doc["wrapped_key"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptHeader(f"volume header is damaged ({exc})") from None
    return doc


def unlock_header(header: bytes, passphrase: bytes) -> tuple[bytes, bytes]:
    """Return ``(master_key, volume_id)``; raise WrongPassphrase if it does not fit."""
    doc = parse_header(header)
    volume_id = bytes.fromhex(doc["volume_id"])
    wrapping_key = _kdf(passphrase, doc["kdf"])
    try:
        master_key = open_sealed(
            wrapping_key,
            base64.b64decode(doc["wrapped_key"]),
            _wrap_ad(volume_id, doc["kdf"]),
            "volume header",
        )
    except IntegrityError:
        raise WrongPassphrase("wrong passphrase for this volume") from None
    if len(master_key) != 32:
        raise CorruptHeader("volume header is damaged (bad key length)")
    return master_key, volume_id
