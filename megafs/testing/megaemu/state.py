"""Server-side state of the MEGA API emulator: accounts, sessions, nodes, uploads, events.

Pure Python and crypto-blind: the state holds what MEGA's servers hold -- opaque encrypted blobs
(node attributes ``a`` and keys ``k``, the account's wrapped master key ``k``, ``privk``, ``pubk``,
file ciphertext) keyed by 8-character node handles and 11-character user handles -- and never
decrypts anything. The only cryptography done here is what the real server does too: RSA-encrypt
a fresh session token to the account's public key (``csid``), hash a v2 ``uh`` to compare it with
the stored verifier, and check hashcash and upload CRCs. No I/O except through the injected
:class:`~megafs.testing.megaemu.blobs.BlobStore`.

Protocol behaviour (legacy, non-``v=3`` result shapes; section numbers refer to
``shared/research/mega-protocol.md``):

* ``/cs`` takes a JSON array of commands and answers an array of per-command results, or a bare
  negative number when the whole request failed (nothing ran). A ``sid`` that names no live
  session fails the whole request with ``-15`` (ESID). A command that needs a session in a request
  without ``sid`` answers ``-15`` on its own. A body that is not a JSON array is ``-2``; an
  unknown command answers ``-2`` (EARGS; inferred -- the sources do not say).
* Idempotence (§2.1, inferred from the SDK's "idempotence id"): a request with the same ``sid``,
  ``id`` and body as one already executed is not executed again; the recorded response is
  returned. Requests that failed as a whole (``-15``, ``-2`` for a bad body, injected request-level
  faults) are not recorded, so their retransmission runs. A per-command error (including an
  injected ``command_error``) is part of the recorded response: to run a command again after such
  an error, send a new request (new ``id``).
* ``us0``: ``{"v":1}`` or ``{"v":2,"s":salt}``; unknown e-mail ``-9``. ``us``: v1 compares ``uh``
  with the stored one; v2 compares ``SHA-256(uh)[:16]`` with the verifier; a v1-sized ``uh``
  (8 bytes) against a v2 account is ``-8`` (§2.3), a wrong password ``-9``. Ephemeral accounts
  (``up``) log in with ``{"a":"us","user":<handle>}`` and get a ``tsid``.
* Node commands check ownership: a handle of another account, or none, is ``-9``; a target that is
  a file is ``-2``; roots cannot be moved, deleted, renamed or linked (``-11``); moving a folder
  into itself or its subtree is ``-10``; ``g`` of a folder is ``-11``; ``l`` with ``d:1`` on a
  node without a link is ``-9``. ``p`` validates the whole batch of new nodes before it
  adds any. Names are never looked at, so duplicates are allowed.
* ``sc``/``wsc`` with a dead session answer ``-15``, with an ``sn`` this account never issued
  ``-2``. ``sn`` is 11 base64url characters (8-byte counter).
* Every change appends action packets carrying the caller's ``i`` and advances the account's
  ``sn`` once per command: ``t`` (new nodes), ``u`` (attributes), ``d`` (removal), a move is ``d``
  with ``m:1`` followed by ``t`` with the moved subtree, ``ph`` for public links.
* Uploads (§5.3, §6.2): pieces must start on a chunk boundary and end on one or at EOF (``-7``);
  a ``?c=``/``?d=`` CRC that does not match the body is ``-14``; intermediate pieces answer an
  empty body (``0`` with ``?d=``), the piece that completes the file answers the completion token
  (36 raw bytes when ``u`` had ``v>=2``, else 36 base64url characters); a piece sent again after
  completion gets the token again. A completion token creates one node only (then ``-9``).
  Storage over ``mstrg`` makes ``u`` answer ``-17``. Unknown transfer URLs answer HTTP 404,
  expired ones 403. ``ssl`` and ``v=3`` are ignored (URLs use the connection's scheme).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, final

from megafs.mega import crypto
from megafs.testing.megaemu.blobs import BlobStore, MemoryBlobs
from megafs.testing.megaemu.faults import FaultPlan

# API error codes (§2.3).
EINTERNAL: Final = -1
EARGS: Final = -2
EAGAIN: Final = -3
ERATELIMIT: Final = -4
EFAILED: Final = -5
ERANGE: Final = -7
EEXPIRED: Final = -8
ENOENT: Final = -9
ECIRCULAR: Final = -10
EACCESS: Final = -11
EKEY: Final = -14
ESID: Final = -15
EOVERQUOTA: Final = -17

# Node types (§4.3).
FILE: Final = 0
FOLDER: Final = 1
ROOT: Final = 2
INBOX: Final = 3
RUBBISH: Final = 4

GIB: Final = 1 << 30
DEFAULT_MSTRG: Final = 20 * GIB
MAX_ATTR_SIZE: Final = 65536
_REQUEST_CACHE_SIZE: Final = 4096
_NEW_NODE_PLACEHOLDER: Final = "xxxxxxxx"

# Chunk boundaries (§5.3): chunk k is min(k + 1, 8) * 128 KiB long.
_SEG: Final = 131072
_BIG_START: Final = 4718592  # start of chunk 8, after which every chunk is 1 MiB
_BIG: Final = 1048576
_SMALL_STARTS: Final = tuple(_SEG * k * (k + 1) // 2 for k in range(8))


def chunk_start(index: int) -> int:
    """Offset at which chunk ``index`` starts."""
    return _SMALL_STARTS[index] if index < 8 else _BIG_START + (index - 8) * _BIG


def chunk_index(offset: int) -> int:
    """Index of the chunk that holds byte ``offset``."""
    if offset >= _BIG_START:
        return 8 + (offset - _BIG_START) // _BIG
    k = 0
    while k < 7 and _SMALL_STARTS[k + 1] <= offset:
        k += 1
    return k


def is_chunk_boundary(offset: int) -> bool:
    return offset >= 0 and chunk_start(chunk_index(offset)) == offset


def upload_crc(body: bytes) -> str:
    """The ``?c=``/``?d=`` checksum: the body XOR-ed cyclically into 12 zero bytes (§6.2)."""
    buf = bytes(body) + bytes(-len(body) % 12)
    words = len(buf) // 12
    while words > 1:  # fold halves: positions modulo 12 stay aligned
        if words % 2:
            buf += bytes(12)
            words += 1
        half = len(buf) // 2
        x = int.from_bytes(buf[:half], "big") ^ int.from_bytes(buf[half:], "big")
        buf = x.to_bytes(half, "big")
        words //= 2
    return crypto.b64encode(buf if buf else bytes(12))


def encode_sn(seq: int) -> str:
    """Sequence numbers travel as 11 base64url characters (8 bytes), like MEGA's."""
    return crypto.b64encode(seq.to_bytes(8, "big"))


def decode_sn(sn: str) -> int | None:
    try:
        raw = crypto.b64decode(sn)
    except (ValueError, crypto.MegaCryptoError):
        return None
    return int.from_bytes(raw, "big") if len(raw) == 8 else None


class ApiError(Exception):
    """A command (or request) answers with a MEGA error code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Node:
    """A node as MEGA stores it: only opaque blobs besides the tree structure."""

    h: str
    p: str
    u: str
    t: int
    a: str = ""
    k: str = ""
    ts: int = 0
    s: int = 0
    fa: str | None = None
    blob: str | None = None
    ph: str | None = None

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "h": self.h,
            "p": self.p,
            "u": self.u,
            "t": self.t,
            "a": self.a,
            "k": f"{self.u}:{self.k}" if self.k else "",
        }
        if self.t == FILE:
            out["s"] = self.s
        if self.fa:
            out["fa"] = self.fa
        out["ts"] = self.ts
        return out


@dataclass
class Account:
    """What the server keeps for an account: handle, login verifier and wrapped keys."""

    handle: str
    email: str | None
    version: int
    salt: bytes | None
    verifier: str  # v1: the uh itself; v2: base64url(SHA-256(uh)[:16])
    k: str
    privk: str | None
    pubk: str | None
    ts: str | None  # ephemeral accounts: base64url(challenge || AES(master, challenge))
    name: str
    since: int
    mstrg: int
    roots: dict[int, str] = field(default_factory=dict)
    seq: int = 0
    events: list[tuple[int, list[dict[str, Any]]]] = field(default_factory=list)
    used: int = 0

    @property
    def ephemeral(self) -> bool:
        return self.email is None


@dataclass
class Session:
    sid: str
    user: str
    created: int


@dataclass
class UploadSlot:
    token: str
    owner: str
    blob: str
    size: int
    binary_token: bool
    nchunks: int
    received: set[int] = field(default_factory=set)
    reply: bytes | None = None
    expired: bool = False
    expired_code: int | None = None


@dataclass
class Completion:
    owner: str
    blob: str
    size: int


@dataclass
class DownloadGrant:
    blob: str
    size: int
    expired: bool = False


@dataclass
class _Ctx:
    session: Session | None
    account: Account | None
    base_url: str


@final
class EmulatorState:
    """All server state; the HTTP layer (``app.py``) calls :meth:`cs`, :meth:`sc`,
    :meth:`upload` and :meth:`download`, tests may also call the methods directly."""

    def __init__(
        self,
        *,
        blobs: BlobStore | None = None,
        default_mstrg: int = DEFAULT_MSTRG,
        rsa_bits: int = 2048,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.blobs: BlobStore = blobs if blobs is not None else MemoryBlobs()
        self.default_mstrg = default_mstrg
        self.rsa_bits = rsa_bits
        self.clock = clock
        self.accounts: dict[str, Account] = {}  # by user handle
        self.by_email: dict[str, str] = {}
        self.sessions: dict[str, Session] = {}
        self.nodes: dict[str, Node] = {}
        self.children: dict[str, list[str]] = {}
        self.public: dict[str, str] = {}  # public handle -> node handle
        self.uploads: dict[str, UploadSlot] = {}
        self.completions: dict[str, Completion] = {}
        self.downloads: dict[str, DownloadGrant] = {}
        self.waits: dict[str, tuple[str, int]] = {}
        self.blob_refs: Counter[str] = Counter()
        self.faults = FaultPlan()
        self.stats: Counter[str] = Counter()
        self.dirty = False
        # sid -> ((request id, body digest), results) of the session's latest request
        self._request_cache: OrderedDict[str, tuple[tuple[str, bytes], Any]] = OrderedDict()
        self._listeners: list[Callable[[str], None]] = []
        self._commands: dict[str, Callable[[dict[str, Any], _Ctx], Any]] = {
            "us0": self._cmd_us0,
            "us": self._cmd_us,
            "ug": self._cmd_ug,
            "sml": self._cmd_sml,
            "up": self._cmd_up,
            "f": self._cmd_f,
            "g": self._cmd_g,
            "u": self._cmd_u,
            "p": self._cmd_p,
            "m": self._cmd_m,
            "d": self._cmd_d,
            "a": self._cmd_a,
            "l": self._cmd_l,
            "uq": self._cmd_uq,
        }

    # ------------------------------------------------------------------ accounts (fixtures)

    def create_account(
        self, email: str, password: str, version: int = 2, *, rsa_bits: int | None = None
    ) -> crypto.NewAccount:
        """Sign up an account the way a client would, keep the server's part, return it all."""
        new = crypto.new_account(email, password, version, rsa_bits=rsa_bits or self.rsa_bits)
        self.register_account(new)
        return new

    def register_account(self, new: crypto.NewAccount) -> Account:
        """Store what MEGA's signup stores: verifier, salt, wrapped keys (never the keys)."""
        email = new.email.lower()
        if email in self.by_email:
            raise ValueError(f"account {email} exists")
        if new.version == 1:
            verifier = new.uh
        else:
            verifier = crypto.b64encode(new.verifier)
        account = Account(
            handle=self._new_handle(8, self.accounts),
            email=email,
            version=new.version,
            salt=new.salt,
            verifier=verifier,
            k=new.k,
            privk=new.privk,
            pubk=new.pubk,
            ts=None,
            name=email.partition("@")[0],
            since=int(self.clock()),
            mstrg=self.default_mstrg,
        )
        self._add_account(account)
        return account

    def _add_account(self, account: Account) -> None:
        self.accounts[account.handle] = account
        if account.email is not None:
            self.by_email[account.email] = account.handle
        self._make_roots(account)
        self.dirty = True

    def _make_roots(self, account: Account) -> None:
        for t in (ROOT, INBOX, RUBBISH):
            h = self._new_handle(6, self.nodes)
            self._insert(Node(h=h, p="", u=account.handle, t=t, ts=account.since))
            account.roots[t] = h

    def account(self, email: str) -> Account:
        handle = self.by_email.get(email.lower())
        if handle is None:
            raise KeyError(email)
        return self.accounts[handle]

    def set_quota(self, mstrg: int, email: str | None = None) -> None:
        """Set the storage allowance of one account, or of all (and of future ones)."""
        if email is None:
            self.default_mstrg = mstrg
            for account in self.accounts.values():
                account.mstrg = mstrg
        else:
            self.account(email).mstrg = mstrg
        self.dirty = True

    def expire_sessions(self, email: str | None = None) -> int:
        """Kill all sessions (of one account); later requests with them get -15."""
        user = None if email is None else self.account(email).handle
        dead = [sid for sid, s in self.sessions.items() if user is None or s.user == user]
        for sid in dead:
            del self.sessions[sid]
        self.dirty = True
        return len(dead)

    def expire_urls(self, which: str | None = None, *, ul_code: int | None = None) -> int:
        """Mark every download (``dl``) and/or upload (``ul``) URL handed out so far expired:
        they answer HTTP 403 (uploads: the error body ``ul_code`` instead, if given)."""
        n = 0
        if which in (None, "dl"):
            for grant in self.downloads.values():
                n += not grant.expired
                grant.expired = True
        if which in (None, "ul"):
            for slot in self.uploads.values():
                if not slot.expired:
                    slot.expired, slot.expired_code = True, ul_code
                    n += 1
        return n

    def tree(self, email: str) -> list[dict[str, Any]]:
        """The account's nodes in wire form, parents before children (for assertions)."""
        account = self.account(email)
        return [self.nodes[h].wire() for h in self._walk_account(account)]

    def reset(self) -> None:
        """Forget every node, session, upload, event, fault and counter; keep the accounts
        (same keys and handles) with fresh empty roots and the default quota."""
        for blob in list(self.blob_refs):
            self.blobs.delete(blob)
        for slot in self.uploads.values():
            self.blobs.delete(slot.blob)
        accounts = list(self.accounts.values())
        self.sessions.clear()
        self.nodes.clear()
        self.children.clear()
        self.public.clear()
        self.uploads.clear()
        self.completions.clear()
        self.downloads.clear()
        self.waits.clear()
        self.blob_refs.clear()
        self.faults.clear()
        self.stats.clear()
        self._request_cache.clear()
        for account in accounts:
            account.roots = {}
            account.seq = 0
            account.events = []
            account.used = 0
            account.mstrg = self.default_mstrg
            self._make_roots(account)
        self.dirty = True

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(user_handle)`` whenever packets are appended for that user."""
        self._listeners.append(callback)

    # ------------------------------------------------------------------ helpers

    def _new_handle(self, nbytes: int, taken: Mapping[str, object]) -> str:
        while True:
            h = crypto.b64encode(secrets.token_bytes(nbytes))
            if h not in taken and h not in self.public and h != _NEW_NODE_PLACEHOLDER:
                return h

    def _now(self) -> int:
        return int(self.clock())

    def _insert(self, node: Node) -> None:
        self.nodes[node.h] = node
        self.children.setdefault(node.h, [])
        if node.p:
            self.children.setdefault(node.p, []).append(node.h)
        if node.blob is not None:
            self.blob_refs[node.blob] += 1
        if node.t == FILE:
            self.accounts[node.u].used += node.s

    def _subtree(self, h: str) -> Iterator[str]:
        """``h`` and its descendants, parents first."""
        stack = [h]
        while stack:
            cur = stack.pop()
            yield cur
            stack.extend(reversed(self.children.get(cur, [])))

    def _walk_account(self, account: Account) -> Iterator[str]:
        for t in (ROOT, INBOX, RUBBISH):
            yield from self._subtree(account.roots[t])

    def _remove_subtree(self, h: str) -> None:
        node = self.nodes[h]
        if node.p:
            self.children[node.p].remove(h)
        for cur in list(self._subtree(h)):
            gone = self.nodes.pop(cur)
            self.children.pop(cur, None)
            if gone.ph is not None:
                self.public.pop(gone.ph, None)
            if gone.t == FILE:
                self.accounts[gone.u].used -= gone.s
            if gone.blob is not None:
                self._unref_blob(gone.blob)

    def _unref_blob(self, blob: str) -> None:
        self.blob_refs[blob] -= 1
        if self.blob_refs[blob] <= 0:
            del self.blob_refs[blob]
            self.blobs.delete(blob)

    def _emit(self, account: Account, packets: list[dict[str, Any]]) -> None:
        account.seq += 1
        account.events.append((account.seq, packets))
        self.dirty = True
        for listener in self._listeners:
            listener(account.handle)

    @staticmethod
    def _packet(kind: str, cmd: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
        packet: dict[str, Any] = {"a": kind}
        tag = cmd.get("i")
        if isinstance(tag, str):
            packet["i"] = tag
        packet.update(fields)
        return packet

    def _own_node(self, ctx: _Ctx, h: Any) -> Node:
        assert ctx.account is not None
        node = self.nodes.get(h) if isinstance(h, str) else None
        if node is None or node.u != ctx.account.handle:
            raise ApiError(ENOENT)
        return node

    def _folder(self, ctx: _Ctx, h: Any) -> Node:
        node = self._own_node(ctx, h)
        if node.t == FILE:
            raise ApiError(EARGS)
        return node

    @staticmethod
    def _need_session(ctx: _Ctx) -> Account:
        if ctx.account is None:
            raise ApiError(ESID)
        return ctx.account

    @staticmethod
    def _str_arg(cmd: Mapping[str, Any], name: str) -> str:
        value = cmd.get(name)
        if not isinstance(value, str):
            raise ApiError(EARGS)
        return value

    @staticmethod
    def _int_arg(cmd: Mapping[str, Any], name: str, default: int | None = None) -> int:
        value = cmd.get(name, default)
        if isinstance(value, bool) or value is None:
            raise ApiError(EARGS)
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ApiError(EARGS) from None
        if not isinstance(value, int):
            raise ApiError(EARGS)
        return value

    # ------------------------------------------------------------------ /cs

    def session_user(self, sid: str | None) -> Account | None:
        session = self.sessions.get(sid) if sid is not None else None
        return self.accounts.get(session.user) if session is not None else None

    def cs(self, body: bytes, *, sid: str | None, request_id: str | None, base_url: str) -> Any:
        """Execute one ``/cs`` request; return its JSON response (a list or a bare error).

        A retransmission -- the same ``id`` and body as the latest request of the same session
        -- gets the stored answer instead of running again. Only the latest request counts, and
        only with a session: megatools numbers requests from ``time(NULL)`` in every process and
        reuses cached sessions across processes, so an older ``id`` (or a session-less ``us``
        with the same ``id``) coming back is a new request from a new process, not a retry.
        """
        key = None
        if request_id and sid:
            key = (request_id, hashlib.sha256(body).digest())
            latest = self._request_cache.get(sid)
            if latest is not None and latest[0] == key:
                self._request_cache.move_to_end(sid)
                self.stats["cs:replayed"] += 1
                return latest[1]
        try:
            commands = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return EARGS
        if not isinstance(commands, list):
            return EARGS
        session = None
        if sid is not None:
            session = self.sessions.get(sid)
            if session is None:
                return ESID
        ctx = _Ctx(session, self.accounts.get(session.user) if session else None, base_url)
        results = [self._run_command(cmd, ctx) for cmd in commands]
        if key is not None and sid is not None:
            self._request_cache[sid] = (key, results)
            self._request_cache.move_to_end(sid)
            while len(self._request_cache) > _REQUEST_CACHE_SIZE:
                self._request_cache.popitem(last=False)
        return results

    def _run_command(self, cmd: Any, ctx: _Ctx) -> Any:
        if not isinstance(cmd, dict) or not isinstance(cmd.get("a"), str):
            return EARGS
        name = cmd["a"]
        fault = self.faults.take_command(name)
        if fault is not None:
            self.stats["faults"] += 1
            return fault.code
        handler = self._commands.get(name)
        if handler is None:
            return EARGS
        try:
            return handler(cmd, ctx)
        except ApiError as err:
            return err.code

    # login ---------------------------------------------------------------

    def _cmd_us0(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        email = self._str_arg(cmd, "user").lower()
        handle = self.by_email.get(email)
        if handle is None:
            raise ApiError(ENOENT)
        account = self.accounts[handle]
        if account.version == 2:
            assert account.salt is not None
            return {"v": 2, "s": crypto.b64encode(account.salt)}
        return {"v": 1}

    def _cmd_us(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        user = self._str_arg(cmd, "user")
        if user in self.accounts and self.accounts[user].ephemeral:
            return self._login_ephemeral(self.accounts[user])
        handle = self.by_email.get(user.lower())
        if handle is None:
            raise ApiError(ENOENT)
        account = self.accounts[handle]
        uh = self._str_arg(cmd, "uh")
        if account.version == 1:
            if uh != account.verifier:
                raise ApiError(ENOENT)
        else:
            try:
                raw = crypto.b64decode(uh)
            except (ValueError, crypto.MegaCryptoError):
                raise ApiError(EARGS) from None
            if len(raw) == 8:  # a v1-style login against a v2 account
                raise ApiError(EEXPIRED)
            if not secrets.compare_digest(
                crypto.b64encode(crypto.v2_verifier(uh)), account.verifier
            ):
                raise ApiError(ENOENT)
        assert account.pubk is not None
        token = crypto.make_session_token(account.handle)
        sid = crypto.b64encode(token)
        self.sessions[sid] = Session(sid, account.handle, self._now())
        self.dirty = True
        return {
            "csid": crypto.encrypt_session_id(crypto.b64decode(account.pubk), token),
            "privk": account.privk,
            "k": account.k,
            "u": account.handle,
            "ach": 1,
        }

    def _login_ephemeral(self, account: Account) -> Any:
        assert account.ts is not None
        raw = crypto.b64decode(account.ts)
        tsid = crypto.b64encode(raw[:16] + account.handle.encode("ascii") + raw[16:32])
        self.sessions[tsid] = Session(tsid, account.handle, self._now())
        self.dirty = True
        return {"tsid": tsid, "k": account.k, "u": account.handle}

    def _cmd_up(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        k = self._str_arg(cmd, "k")
        ts = self._str_arg(cmd, "ts")
        try:
            ok = len(crypto.b64decode(k)) == 16 and len(crypto.b64decode(ts)) == 32
        except (ValueError, crypto.MegaCryptoError):
            ok = False
        if not ok:
            raise ApiError(EARGS)
        account = Account(
            handle=self._new_handle(8, self.accounts),
            email=None,
            version=1,
            salt=None,
            verifier="",
            k=k,
            privk=None,
            pubk=None,
            ts=ts,
            name="",
            since=self._now(),
            mstrg=self.default_mstrg,
        )
        self._add_account(account)
        return account.handle

    def _cmd_ug(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        account = self._need_session(ctx)
        out: dict[str, Any] = {"u": account.handle, "s": 0}
        if account.email is not None:
            out["email"] = account.email
            out["name"] = account.name
        out["k"] = account.k
        out["c"] = 0 if account.ephemeral else 1
        if account.ephemeral:
            out["ts"] = account.ts
        else:
            out["pubk"] = account.pubk
            out["privk"] = account.privk
        out["since"] = account.since
        return out

    def _cmd_sml(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        self._need_session(ctx)
        assert ctx.session is not None
        self.sessions.pop(ctx.session.sid, None)
        self.dirty = True
        return 0

    # tree ------------------------------------------------------------------

    def _cmd_f(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        account = self._need_session(ctx)
        me: dict[str, Any] = {"u": account.handle, "c": 2}
        if account.email is not None:
            me["m"] = account.email
        return {
            "f": [self.nodes[h].wire() for h in self._walk_account(account)],
            "ok": [],
            "s": [],
            "u": [me],
            "sn": encode_sn(account.seq),
        }

    def _cmd_g(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        if "p" in cmd:
            ph = self._str_arg(cmd, "p")
            node = self.nodes.get(self.public.get(ph, ""))
            if node is None:
                raise ApiError(ENOENT)
        else:
            self._need_session(ctx)
            node = self._own_node(ctx, cmd.get("n"))
        if node.t != FILE or node.blob is None:
            raise ApiError(EACCESS)
        out: dict[str, Any] = {"s": node.s, "at": node.a}
        if node.fa:
            out["fa"] = node.fa
        if cmd.get("g"):
            token = self._new_handle(24, self.downloads)
            self.downloads[token] = DownloadGrant(node.blob, node.s)
            out["g"] = f"{ctx.base_url}/dl/{token}"
        return out

    def _cmd_uq(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        account = self._need_session(ctx)
        per_root: dict[str, list[int]] = {}
        for t in (ROOT, INBOX, RUBBISH):
            size = files = folders = 0
            for h in self._subtree(account.roots[t]):
                node = self.nodes[h]
                if node.t == FILE:
                    size += node.s
                    files += 1
                elif node.t == FOLDER:
                    folders += 1
            per_root[account.roots[t]] = [size, files, folders, 0, 0]
        return {
            "cstrg": account.used,
            "mstrg": account.mstrg,
            "cstrgn": per_root,
            "mxfer": 0,
            "caxfer": 0,
            "csxfer": 0,
            "srvratio": 0,
            "utype": 0,
        }

    # uploads ---------------------------------------------------------------

    def _cmd_u(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        account = self._need_session(ctx)
        size = self._int_arg(cmd, "s")
        if size < 0:
            raise ApiError(EARGS)
        if account.used + size > account.mstrg:
            raise ApiError(EOVERQUOTA)
        version = cmd.get("v", 0)
        binary = isinstance(version, int) and not isinstance(version, bool) and version >= 2
        token = self._new_handle(30, self.uploads)
        blob = self._new_handle(18, self.blob_refs)
        nchunks = chunk_index(size - 1) + 1 if size else 1
        self.uploads[token] = UploadSlot(token, account.handle, blob, size, binary, nchunks)
        self.blobs.begin(blob, size)
        return {"p": f"{ctx.base_url}/ul/{token}"}

    def upload(
        self, token: str, offset_text: str, body: bytes, *, crc: str | None, zero_reply: bool
    ) -> tuple[int, bytes]:
        """One storage-server POST of ciphertext; returns (HTTP status, response body).

        ``crc`` is the ``?c=``/``?d=`` value if one was sent; ``zero_reply`` (``?d=``) makes an
        accepted intermediate piece answer ``0`` instead of an empty body.
        """
        slot = self.uploads.get(token)
        if slot is None:
            return 404, b""
        if slot.expired:
            if slot.expired_code is not None:
                return 200, str(slot.expired_code).encode()
            return 403, b""
        try:
            offset = int(offset_text)
        except ValueError:
            return 200, str(ERANGE).encode()
        end = offset + len(body)
        if slot.size == 0:
            aligned = offset == 0 and end == 0
        else:
            aligned = (
                0 <= offset < slot.size
                and end <= slot.size
                and is_chunk_boundary(offset)
                and (end == slot.size or is_chunk_boundary(end))
            )
        if not aligned:
            return 200, str(ERANGE).encode()
        if crc is not None and crc != upload_crc(body):
            return 200, str(EKEY).encode()
        if slot.reply is not None:  # a piece sent again after completion
            return 200, slot.reply
        if body:
            self.blobs.write(slot.blob, offset, body)
            slot.received.update(range(chunk_index(offset), chunk_index(end - 1) + 1))
        elif slot.size == 0:
            slot.received.add(0)
        if len(slot.received) < slot.nchunks:
            return 200, b"0" if zero_reply else b""
        self.blobs.commit(slot.blob)
        if slot.binary_token:
            raw = secrets.token_bytes(36)
            key = crypto.b64encode(raw)
        else:
            key = crypto.b64encode(secrets.token_bytes(27))
            raw = key.encode("ascii")
        slot.reply = raw
        self.completions[key] = Completion(slot.owner, slot.blob, slot.size)
        self.blob_refs[slot.blob] += 1  # held by the completion token until used
        self.dirty = True
        return 200, raw

    def download(self, token: str) -> DownloadGrant | int:
        """The grant behind a download URL, or the HTTP status to answer (403, 404)."""
        grant = self.downloads.get(token)
        if grant is None:
            return 404
        if grant.expired:
            return 403
        if not self.blobs.exists(grant.blob):
            return 404
        return grant

    def read_blob(self, grant: DownloadGrant, start: int, end: int) -> bytes:
        return self.blobs.read(grant.blob, start, end)

    # node changes ------------------------------------------------------------

    def _cmd_p(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        account = self._need_session(ctx)
        target = self._folder(ctx, cmd.get("t"))
        items = cmd.get("n")
        if not isinstance(items, list) or not items:
            raise ApiError(EARGS)
        # Validate the whole batch first, then apply it.
        plan: list[tuple[dict[str, Any], str, Node | None, Completion | None]] = []
        batch: dict[str, int] = {}  # handle named in the batch -> index
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise ApiError(EARGS)
            h = self._str_arg(item, "h")
            t = self._int_arg(item, "t", FILE)
            a = self._str_arg(item, "a")
            k = self._str_arg(item, "k")
            if len(a) > MAX_ATTR_SIZE or t not in (FILE, FOLDER) or ":" in k:
                raise ApiError(EARGS)
            fa = item.get("fa")
            if fa is not None and not isinstance(fa, str):
                raise ApiError(EARGS)
            parent = item.get("p")
            if parent is not None:
                if not isinstance(parent, str):
                    raise ApiError(EARGS)
                if parent in batch:
                    if int(items[batch[parent]].get("t", FILE)) != FOLDER:
                        raise ApiError(EARGS)
                else:
                    parent = self._folder(ctx, parent).h
            source = self.nodes.get(h)
            completion = None
            if source is not None and source.u == account.handle and source.t in (FILE, FOLDER):
                if source.t != t:
                    raise ApiError(EARGS)
            elif t == FILE:
                source = None
                completion = self.completions.get(h)
                if completion is None or completion.owner != account.handle:
                    raise ApiError(ENOENT)
                if any(c is completion for _, _, _, c in plan):
                    raise ApiError(ENOENT)
            else:
                source = None
            batch[h] = index
            plan.append((item, parent if isinstance(parent, str) else target.h, source, completion))
        new_handles: dict[str, str] = {}
        created: list[Node] = []
        now = self._now()
        for item, parent, source, completion in plan:
            h = self._new_handle(6, self.nodes)
            new_handles[item["h"]] = h
            node = Node(
                h=h,
                p=new_handles.get(parent, parent),
                u=account.handle,
                t=self._int_arg(item, "t", FILE),
                a=item["a"],
                k=item["k"],
                ts=now,
                fa=item.get("fa"),
            )
            if completion is not None:
                node.s, node.blob = completion.size, completion.blob
                del self.completions[item["h"]]
                self.blob_refs[completion.blob] -= 1  # the node takes over the reference
            elif source is not None and source.t == FILE:
                node.s, node.blob = source.s, source.blob
                if node.fa is None:
                    node.fa = source.fa
            self._insert(node)
            created.append(node)
        wire = [node.wire() for node in created]
        self._emit(account, [self._packet("t", cmd, t={"f": wire}, ou=account.handle)])
        return {"f": wire}

    def _cmd_m(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        account = self._need_session(ctx)
        node = self._own_node(ctx, cmd.get("n"))
        target = self._folder(ctx, cmd.get("t"))
        if node.t not in (FILE, FOLDER):
            raise ApiError(EACCESS)
        if target.h in set(self._subtree(node.h)):
            raise ApiError(ECIRCULAR)
        self.children[node.p].remove(node.h)
        node.p = target.h
        self.children[target.h].append(node.h)
        moved = [self.nodes[h].wire() for h in self._subtree(node.h)]
        self._emit(
            account,
            [
                self._packet("d", cmd, n=node.h, m=1, ou=account.handle),
                self._packet("t", cmd, t={"f": moved}, ou=account.handle),
            ],
        )
        return 0

    def _cmd_d(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        account = self._need_session(ctx)
        node = self._own_node(ctx, cmd.get("n"))
        if node.t not in (FILE, FOLDER):
            raise ApiError(EACCESS)
        self._remove_subtree(node.h)
        self._emit(account, [self._packet("d", cmd, n=node.h, ou=account.handle)])
        return 0

    def _cmd_a(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        account = self._need_session(ctx)
        node = self._own_node(ctx, cmd.get("n"))
        if node.t not in (FILE, FOLDER):
            raise ApiError(EACCESS)
        attr = cmd["at"] if "at" in cmd else cmd.get("attr")
        if not isinstance(attr, str) or len(attr) > MAX_ATTR_SIZE:
            raise ApiError(EARGS)
        node.a = attr  # a legacy "key" argument is ignored: node keys never change here
        self._emit(
            account,
            [self._packet("u", cmd, n=node.h, u=node.u, at=node.a, ts=node.ts)],
        )
        return 0

    def _cmd_l(self, cmd: dict[str, Any], ctx: _Ctx) -> Any:
        account = self._need_session(ctx)
        node = self._own_node(ctx, cmd.get("n"))
        if node.t not in (FILE, FOLDER):
            raise ApiError(EACCESS)
        if cmd.get("d"):
            if node.ph is None:
                raise ApiError(ENOENT)
            ph, node.ph = node.ph, None
            del self.public[ph]
            self._emit(account, [self._packet("ph", cmd, h=node.h, ph=ph, d=1)])
            return 0
        if node.ph is None:
            node.ph = self._new_handle(6, self.nodes)
            self.public[node.ph] = node.h
            self._emit(account, [self._packet("ph", cmd, h=node.h, ph=node.ph)])
        return node.ph

    # ------------------------------------------------------------------ events

    def event_cursor(self, sid: str | None, sn: str | None) -> tuple[Account, int] | int:
        """The account and sequence number an ``sc``/``wsc`` request reads from, or the error
        it answers: -15 for a dead session, -2 for an ``sn`` this account never issued."""
        account = self.session_user(sid)
        if account is None:
            return ESID
        seq = decode_sn(sn) if sn is not None else None
        if seq is None or seq > account.seq:
            return EARGS
        return account, seq

    def sc(self, *, sid: str | None, sn: str | None) -> Any:
        """``/sc``: pending packets ``{"a": [...], "sn": ...}``, ``{"w": token}`` (the caller
        turns the token into a wait URL), or a bare error number."""
        cursor = self.event_cursor(sid, sn)
        if isinstance(cursor, int):
            return cursor
        account, seq = cursor
        packets = self.packets_after(account, seq)
        if packets:
            return {"a": packets, "sn": encode_sn(account.seq)}
        token = self._new_handle(16, self.waits)
        self.waits[token] = (account.handle, seq)
        if len(self.waits) > 10000:
            self.waits.pop(next(iter(self.waits)))
        return {"w": token}

    @staticmethod
    def packets_after(account: Account, seq: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for event_seq, packets in reversed(account.events):
            if event_seq <= seq:
                break
            out[:0] = packets
        return out

    def wait_target(self, token: str) -> tuple[Account, int] | None:
        """The account and ``sn`` a long-poll URL waits on (the URL stays usable)."""
        target = self.waits.get(token)
        if target is None or target[0] not in self.accounts:
            return None
        return self.accounts[target[0]], target[1]

    # ------------------------------------------------------------------ persistence

    def snapshot(self) -> dict[str, Any]:
        """Everything worth keeping across a restart, as JSON-able data (no open uploads,
        download URLs, faults or counters: a restarted server has forgotten those)."""
        return {
            "version": 1,
            "default_mstrg": self.default_mstrg,
            "accounts": [
                {
                    "handle": a.handle,
                    "email": a.email,
                    "version": a.version,
                    "salt": None if a.salt is None else crypto.b64encode(a.salt),
                    "verifier": a.verifier,
                    "k": a.k,
                    "privk": a.privk,
                    "pubk": a.pubk,
                    "ts": a.ts,
                    "name": a.name,
                    "since": a.since,
                    "mstrg": a.mstrg,
                    "roots": {str(t): h for t, h in a.roots.items()},
                    "seq": a.seq,
                    "events": a.events,
                }
                for a in self.accounts.values()
            ],
            "sessions": [[s.sid, s.user, s.created] for s in self.sessions.values()],
            "nodes": [
                [n.h, n.p, n.u, n.t, n.a, n.k, n.ts, n.s, n.fa, n.blob, n.ph]
                for account in self.accounts.values()
                for n in (self.nodes[h] for h in self._walk_account(account))
            ],
            "completions": {key: [c.owner, c.blob, c.size] for key, c in self.completions.items()},
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Load a :meth:`snapshot` into this (empty) state."""
        if data.get("version") != 1:
            raise ValueError("unknown emulator snapshot version")
        self.default_mstrg = int(data["default_mstrg"])
        for a in data["accounts"]:
            account = Account(
                handle=a["handle"],
                email=a["email"],
                version=a["version"],
                salt=None if a["salt"] is None else crypto.b64decode(a["salt"]),
                verifier=a["verifier"],
                k=a["k"],
                privk=a["privk"],
                pubk=a["pubk"],
                ts=a["ts"],
                name=a["name"],
                since=a["since"],
                mstrg=a["mstrg"],
                roots={int(t): h for t, h in a["roots"].items()},
                seq=a["seq"],
                events=[(int(seq), list(packets)) for seq, packets in a["events"]],
            )
            self.accounts[account.handle] = account
            if account.email is not None:
                self.by_email[account.email] = account.handle
        for sid, user, created in data["sessions"]:
            self.sessions[sid] = Session(sid, user, created)
        for h, p, u, t, a_, k, ts, s, fa, blob, ph in data["nodes"]:
            self._insert(Node(h, p, u, t, a_, k, ts, s, fa, blob, ph))
            if ph is not None:
                self.public[ph] = h
        for key, (owner, blob, size) in data["completions"].items():
            self.completions[key] = Completion(owner, blob, size)
            self.blob_refs[blob] += 1
        self.dirty = False

    def live_blobs(self) -> set[str]:
        return set(self.blob_refs)


def command_names(body: bytes) -> list[str]:
    """The ``a`` of each command in a ``/cs`` body (empty if it does not parse)."""
    try:
        commands = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(commands, list):
        return []
    return [c["a"] for c in commands if isinstance(c, dict) and isinstance(c.get("a"), str)]


def strip_sid(query: Sequence[tuple[str, str]]) -> str:
    """A query string for logs, with the session id redacted."""
    return "&".join(f"{k}={'<redacted>' if k == 'sid' else v}" for k, v in query)
