"""A small synchronous MEGA client for tests, independent of megafs's own client.

It speaks the wire protocol directly with httpx and the pure functions of
:mod:`megafs.mega.crypto`, so a test can log in, create folders, upload and download through the
emulator (or seed files "from another client") without going through the code under test.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, final

import httpx

from megafs.mega import crypto

_derived: dict[tuple[str, str, bytes | None], tuple[bytes, str]] = {}


class EmuApiError(Exception):
    """The API answered an error number (``request_level``: for the whole request)."""

    def __init__(self, code: int, *, request_level: bool = False) -> None:
        super().__init__(f"MEGA error {code}" + (" (request)" if request_level else ""))
        self.code = code
        self.request_level = request_level


@dataclass
class Login:
    """What a client knows after ``us``."""

    email: str
    handle: str
    sid: str
    master_key: bytes = field(repr=False)
    rsa: crypto.RsaKey | None = field(default=None, repr=False)


@final
class EmuClient:
    """One client session against a MEGA API base URL (no retries: tests see every answer)."""

    def __init__(
        self, url: str, *, http: httpx.Client | None = None, tag: str = "emutest01"
    ) -> None:
        self.url = url.rstrip("/")
        self.http = http or httpx.Client(timeout=30.0)
        self.tag = tag
        self.sid: str | None = None
        self.login_info: Login | None = None
        self._seq = secrets.randbelow(1 << 30)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> EmuClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ raw API

    def next_id(self) -> str:
        self._seq += 1
        return str(self._seq)

    def request(
        self,
        commands: Sequence[Mapping[str, Any]],
        *,
        sid: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        use_session: bool = True,
    ) -> httpx.Response:
        """POST one ``/cs`` request and return the raw HTTP response."""
        params = {"id": request_id or self.next_id()}
        if sid is None and use_session:
            sid = self.sid
        if sid is not None:
            params["sid"] = sid
        return self.http.post(
            f"{self.url}/cs", params=params, json=list(commands), headers=dict(headers or {})
        )

    def call(self, *commands: Mapping[str, Any], **kwargs: Any) -> list[Any]:
        """Run a batch; raises :class:`EmuApiError` for a request-level error."""
        response = self.request(commands, **kwargs)
        response.raise_for_status()
        result = response.json()
        if isinstance(result, int):
            raise EmuApiError(result, request_level=True)
        assert isinstance(result, list)
        return result

    def one(self, command: Mapping[str, Any], **kwargs: Any) -> Any:
        """Run one command; raises :class:`EmuApiError` for any negative result."""
        (result,) = self.call(command, **kwargs)
        if isinstance(result, int) and result < 0:
            raise EmuApiError(result)
        return result

    # ------------------------------------------------------------------ login

    def login(self, email: str, password: str) -> Login:
        """Prelogin + ``us`` with the client algorithms; keeps the session for later calls."""
        email = email.lower()
        pre = self.one({"a": "us0", "user": email}, use_session=False)
        salt = crypto.b64decode(pre["s"]) if pre["v"] == 2 else None
        key = (email, password, salt)
        if key not in _derived:  # the KDFs are slow on purpose: derive once per test run
            if salt is not None:
                _derived[key] = crypto.derive_key_v2(password, salt)
            else:
                pk = crypto.prepare_key_v1(crypto.password_bytes_v1(password))
                _derived[key] = (pk, crypto.user_hash_v1(email, pk))
        password_key, uh = _derived[key]
        res = self.one({"a": "us", "user": email, "uh": uh}, use_session=False)
        master_key = crypto.decrypt_key(password_key, res["k"])
        rsa = crypto.decode_private_key(
            crypto.aes_ecb_decrypt(master_key, crypto.b64decode(res["privk"]))
        )
        sid = crypto.decrypt_session_id(res["csid"], rsa)
        self.sid = sid
        self.login_info = Login(email, res["u"], sid, master_key, rsa)
        return self.login_info

    @property
    def master_key(self) -> bytes:
        assert self.login_info is not None, "log in first"
        return self.login_info.master_key

    # ------------------------------------------------------------------ tree helpers

    def fetch(self) -> dict[str, Any]:
        result: dict[str, Any] = self.one({"a": "f", "c": 1})
        return result

    def root(self, kind: int = 2) -> str:
        for node in self.fetch()["f"]:
            if node["t"] == kind:
                handle: str = node["h"]
                return handle
        raise LookupError(kind)

    def node_key(self, node: Mapping[str, Any]) -> bytes:
        """The node's own key, unwrapped with the master key."""
        _, _, wrapped = str(node["k"]).partition(":")
        return crypto.decrypt_key(self.master_key, wrapped)

    def name_of(self, node: Mapping[str, Any]) -> str:
        key = self.node_key(node)
        if node["t"] == 0:
            key = crypto.FileKey.unpack(key).aes_key
        return str(crypto.decrypt_attributes(node["a"], key)["n"])

    def mkdir(self, parent: str, name: str) -> dict[str, Any]:
        key = secrets.token_bytes(16)
        node = {
            "h": "xxxxxxxx",
            "t": 1,
            "a": crypto.encrypt_attributes({"n": name}, key),
            "k": crypto.encrypt_key(self.master_key, key),
        }
        result = self.one({"a": "p", "t": parent, "n": [node], "i": self.tag})
        created: dict[str, Any] = result["f"][0]
        return created

    def put_data(
        self,
        data: bytes,
        *,
        version: int | None = 2,
        order: Sequence[int] | None = None,
        key: crypto.FileKey | None = None,
    ) -> tuple[bytes, crypto.FileKey]:
        """Encrypt and upload ``data`` chunk by chunk (in ``order`` of chunk indices, default
        last-to-first); return the completion token as it goes into ``p`` and the file key."""
        key = key or crypto.FileKey.random()
        command: dict[str, Any] = {"a": "u", "s": len(data)}
        if version is not None:
            command["v"] = version
        url = self.one(command)["p"]
        bounds = crypto.chunk_bounds(len(data)) or [(0, 0)]
        macs = [
            crypto.chunk_mac(key.aes_key, key.nonce, data[start : start + length])
            for start, length in bounds
        ]
        token = b""
        for index in order if order is not None else reversed(range(len(bounds))):
            start, length = bounds[index]
            cipher = crypto.ctr_crypt(key.aes_key, key.nonce, start, data[start : start + length])
            response = self.http.post(f"{url}/{start}", content=cipher)
            response.raise_for_status()
            if response.content:
                if response.content.lstrip(b"-").isdigit() and len(response.content) < 6:
                    raise EmuApiError(int(response.content))
                token = response.content
        assert token, "no completion token"
        mac = crypto.condensed_mac(key.aes_key, macs if data else [])
        return token, crypto.FileKey(key.aes_key, key.nonce, mac)

    def upload(
        self, parent: str, name: str, data: bytes, *, version: int | None = 2
    ) -> dict[str, Any]:
        """Upload a file and create its node in ``parent``; return the node."""
        token, key = self.put_data(data, version=version)
        handle = crypto.b64encode(token) if version is not None and version >= 2 else token.decode()
        node = {
            "h": handle,
            "t": 0,
            "a": crypto.encrypt_attributes({"n": name}, key.aes_key),
            "k": crypto.encrypt_key(self.master_key, key.pack()),
        }
        result = self.one({"a": "p", "t": parent, "n": [node], "i": self.tag})
        created: dict[str, Any] = result["f"][0]
        return created

    def download(self, node: Mapping[str, Any]) -> bytes:
        """Fetch and decrypt a whole file (checks the size and the MAC for non-empty files)."""
        info = self.one({"a": "g", "g": 1, "n": node["h"]})
        cipher = self.http.get(info["g"]).content
        if len(cipher) != info["s"]:
            raise ValueError("size mismatch")
        key = crypto.FileKey.unpack(self.node_key(node))
        plain = crypto.ctr_crypt(key.aes_key, key.nonce, 0, cipher)
        if plain:
            macs = [
                crypto.chunk_mac(key.aes_key, key.nonce, plain[s : s + n])
                for s, n in crypto.chunk_bounds(len(plain))
            ]
            if crypto.condensed_mac(key.aes_key, macs) != key.meta_mac:
                raise ValueError("MAC mismatch")
        return plain
