"""Logging in to MEGA, resuming a session, and the sealed on-disk session cache.

MEGA blocks accounts that log in too often (mega-protocol.md §9 pitfall 1), so a
mount logs in once and afterwards *resumes*: :func:`open_session` first tries the
cached ``(sid, master key)`` (checked with one ``ug``), and only falls back to a full
:func:`login` when there is no usable cache or the server says ESID.

The cache file is JSON::

    {"magic": "megafs-mega-session", "version": 1,
     "kdf": {"name": "argon2id", "salt": B64, "memory_kib": N, "iterations": N,
             "lanes": N},
     "sealed": B64(nonce || AES-256-GCM(JSON {u, sid, k}) || tag)}

The sealing key is Argon2id(password) with the volume header's default parameters
(:data:`megafs.format.header.DEFAULT_KDF`); the associated data binds the magic, the
version, the KDF parameters and the lower-cased e-mail address, so the file reveals
nothing (not even the address) and cannot be replayed for another account. The file
is written atomically with mode 0600. Any damage, a wrong password or another e-mail
makes :func:`load_session` return None.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from megafs.errors import IntegrityError
from megafs.format.header import DEFAULT_KDF
from megafs.format.seal import open_sealed, seal
from megafs.mega import crypto
from megafs.mega.api import MegaApi
from megafs.mega.errors import (
    LoginFailed,
    MegaError,
    MegaExpired,
    MegaKeyError,
    MegaNotFound,
    MegaSessionExpired,
)

log = logging.getLogger(__name__)

CACHE_MAGIC: Final = "megafs-mega-session"
CACHE_VERSION: Final = 1


@dataclass
class Session:
    """A logged-in MEGA account. ``sid``, ``master_key`` and ``rsa`` are secrets."""

    email: str
    user_handle: str
    sid: str = field(repr=False)
    master_key: bytes = field(repr=False)
    rsa: crypto.RsaKey | None = field(default=None, repr=False)


# -- login -------------------------------------------------------------------------------


def _v1_password_key(password: str) -> bytes:
    return crypto.prepare_key_v1(crypto.password_bytes_v1(password))


async def login(api: MegaApi, email: str, password: str, *, mfa: str | None = None) -> Session:
    """Full login (``us0`` + ``us``); sets ``api.sid`` and returns the session.

    Raises :class:`LoginFailed` for a wrong e-mail/password pair,
    :class:`~megafs.mega.errors.MegaMfaRequired` when a 2FA code is needed, and
    :class:`MegaKeyError` if the server's answer does not decrypt consistently.
    """
    user = email.strip().lower()
    try:
        pre = await api.call({"a": "us0", "user": user})
    except MegaNotFound:
        raise LoginFailed(command="us0") from None
    version = pre.get("v") if isinstance(pre, dict) else None
    if version == 1:
        password_key = await trio.to_thread.run_sync(_v1_password_key, password)
        uh = crypto.user_hash_v1(user, password_key)
    elif version == 2:
        salt = pre.get("s")
        if not isinstance(salt, str) or not salt:
            raise MegaError(detail="prelogin answered version 2 without a salt", command="us0")
        password_key, uh = await trio.to_thread.run_sync(
            crypto.derive_key_v2, password, crypto.b64decode(salt)
        )
    else:
        raise MegaError(detail=f"unsupported account version {version!r}", command="us0")

    cmd: dict[str, Any] = {"a": "us", "user": user, "uh": uh}
    if mfa:
        cmd["mfa"] = mfa
    try:
        reply = await api.call(cmd)
    except (MegaNotFound, MegaExpired):
        # -9 is MEGA's "wrong password"; -8 a login scheme the account does not use.
        raise LoginFailed(command="us") from None
    if not isinstance(reply, dict):
        raise MegaError(detail="malformed login response", command="us")
    session = _session_from_login(reply, user, password_key)
    api.sid = session.sid
    log.info("logged in to MEGA as user %s", session.user_handle)
    return session


def _session_from_login(reply: dict[str, Any], email: str, password_key: bytes) -> Session:
    try:
        user_handle = reply["u"]
        master_key = crypto.decrypt_key(password_key, reply["k"])
        rsa: crypto.RsaKey | None = None
        if "csid" in reply:
            plain = crypto.aes_ecb_decrypt(master_key, crypto.b64decode(reply["privk"]))
            rsa = crypto.decode_private_key(plain)
            sid = crypto.decrypt_session_id(reply["csid"], rsa)
        elif "tsid" in reply:
            sid = reply["tsid"]
            if not crypto.check_tsid(sid, master_key):
                raise MegaKeyError(detail="the temporary session id does not verify", command="us")
        else:
            raise MegaError(detail="login response has no session id", command="us")
        if not isinstance(user_handle, str):
            raise MegaError(detail="login response has no user handle", command="us")
    except (KeyError, TypeError, crypto.MegaCryptoError) as exc:
        raise MegaKeyError(
            detail=f"login response does not decrypt ({type(exc).__name__})", command="us"
        ) from None
    _check_sid(sid, user_handle)
    return Session(email=email, user_handle=user_handle, sid=sid, master_key=master_key, rsa=rsa)


def _check_sid(sid: str, user_handle: str) -> None:
    """The session token's middle 11 characters must be our user handle."""
    try:
        raw = crypto.b64decode(sid)
    except (crypto.MegaCryptoError, ValueError):
        raw = b""
    if len(raw) < 27 or raw[16:27] != user_handle.encode("ascii", "replace"):
        raise MegaKeyError(detail="the session id does not belong to this user", command="us")


# -- resume / logout ---------------------------------------------------------------------


async def resume(api: MegaApi, session: Session) -> bool:
    """Reuse ``session`` on ``api``: True if the server still accepts it.

    Sends one ``ug``; ESID (or a different user) gives False and clears ``api.sid``.
    Fills ``session.rsa`` from ``ug``'s ``privk`` when it is missing. Other failures
    (network, EBLOCKED, ...) are raised.
    """
    api.sid = session.sid
    try:
        user = await api.call({"a": "ug"})
    except MegaSessionExpired:
        api.sid = None
        return False
    if not isinstance(user, dict) or user.get("u") != session.user_handle:
        log.warning("cached MEGA session belongs to another user; logging in again")
        api.sid = None
        return False
    privk = user.get("privk")
    if session.rsa is None and isinstance(privk, str):
        try:
            plain = crypto.aes_ecb_decrypt(session.master_key, crypto.b64decode(privk))
            session.rsa = crypto.decode_private_key(plain)
        except (crypto.MegaCryptoError, ValueError):
            log.warning("cached MEGA master key does not open the account key; logging in again")
            api.sid = None
            return False
    return True


async def logout(api: MegaApi) -> None:
    """End the session server-side (``sml``) and forget ``api.sid``."""
    try:
        await api.call({"a": "sml"})
    except MegaSessionExpired:
        pass
    finally:
        api.sid = None


# -- the sealed session cache ------------------------------------------------------------


def _kdf(password: str, kdf: dict[str, Any]) -> bytes:
    return Argon2id(
        salt=base64.b64decode(kdf["salt"]),
        length=32,
        iterations=int(kdf["iterations"]),
        lanes=int(kdf["lanes"]),
        memory_cost=int(kdf["memory_kib"]),
    ).derive(password.encode("utf-8"))


def _cache_ad(email: str, kdf: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "magic": CACHE_MAGIC,
            "version": CACHE_VERSION,
            "email": email.strip().lower(),
            "kdf": kdf,
        },
        sort_keys=True,
    ).encode()


def save_session(
    path: Path | str,
    session: Session,
    password: str,
    *,
    kdf_params: dict[str, int] | None = None,
) -> None:
    """Write ``session`` (user, sid, master key) sealed under ``password`` to ``path``.

    Atomic (temporary file + rename) and mode 0600; the parent directory is created
    (0700) if needed. Blocking (Argon2id): call it from a worker thread in async code.
    """
    path = Path(path)
    kdf: dict[str, Any] = {
        "name": "argon2id",
        "salt": base64.b64encode(secrets.token_bytes(16)).decode(),
        **(DEFAULT_KDF if kdf_params is None else kdf_params),
    }
    plain = json.dumps(
        {"u": session.user_handle, "sid": session.sid, "k": crypto.b64encode(session.master_key)}
    ).encode()
    sealed = seal(_kdf(password, kdf), plain, _cache_ad(session.email, kdf))
    doc = {
        "magic": CACHE_MAGIC,
        "version": CACHE_VERSION,
        "kdf": kdf,
        "sealed": base64.b64encode(sealed).decode(),
    }
    _write_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def load_session(path: Path | str, email: str, password: str) -> Session | None:
    """The cached session for ``email``, or None (missing, damaged, wrong password).

    Blocking (Argon2id): call it from a worker thread in async code.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes())
        if doc.get("magic") != CACHE_MAGIC or doc.get("version") != CACHE_VERSION:
            return None
        kdf = doc["kdf"]
        if kdf.get("name") != "argon2id":
            return None
        key = _kdf(password, kdf)
        plain = open_sealed(
            key,
            base64.b64decode(doc["sealed"], validate=True),
            _cache_ad(email, kdf),
            "MEGA session cache",
        )
        body = json.loads(plain)
        session = Session(
            email=email.strip().lower(),
            user_handle=str(body["u"]),
            sid=str(body["sid"]),
            master_key=crypto.b64decode(body["k"]),
        )
    except FileNotFoundError:
        return None
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IntegrityError,
        crypto.MegaCryptoError,
    ) as exc:
        log.warning("ignoring the MEGA session cache %s (%s)", path, type(exc).__name__)
        return None
    if len(session.master_key) != 16:
        return None
    return session


async def open_session(
    api: MegaApi,
    email: str,
    password: str,
    cache_path: Path | str | None,
    *,
    mfa: str | None = None,
    kdf_params: dict[str, int] | None = None,
) -> Session:
    """A live session: the cached one if the server still accepts it, else a new login.

    A new login is written back to ``cache_path`` (unless it is None).
    """
    if cache_path is not None:
        cached = await trio.to_thread.run_sync(load_session, cache_path, email, password)
        if cached is not None and await resume(api, cached):
            log.info("resumed MEGA session for user %s", cached.user_handle)
            return cached
    session = await login(api, email, password, mfa=mfa)
    if cache_path is not None:
        try:
            await trio.to_thread.run_sync(
                lambda: save_session(cache_path, session, password, kdf_params=kdf_params)
            )
        except OSError as exc:
            log.warning("could not write the MEGA session cache: %s", exc)
    return session
