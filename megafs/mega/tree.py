"""A MEGA account's node tree, kept current, shown as directories.

The tree is read once with ``f`` and then changed only by :meth:`Tree.apply`
(action packets from ``sc``) and by the filesystem's own commands (through the
same methods, with the nodes the server returned). Everything is keyed by node
handle; a rename is an attribute change (same handle), a move changes ``parent``.

Node keys and attributes stay encrypted until a folder is first listed or looked
up in (:meth:`Tree.listing`): then every child of that folder is decrypted at once.
A node whose key or attributes cannot be decrypted is left out of listings with one
warning naming its handle (never its name, which is unknown anyway).

Names: MEGA allows any string and duplicates in one folder. :mod:`megafs.mega.names`
makes each name a valid POSIX name; duplicates are told apart deterministically:
the newest node (largest ``ts``, then handle) keeps the name, the others show as
``stem (HANDLE).ext``. File versions (file nodes whose parent is a file) are never
listed.

Ownership: one Tree per mount, changed only in synchronous code (no ``await``
inside any method), so a listing is never seen half-updated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from megafs.mega import crypto
from megafs.mega.names import posix_bytes

log = logging.getLogger(__name__)

FILE: Final = 0
FOLDER: Final = 1
ROOT: Final = 2
INBOX: Final = 3
RUBBISH: Final = 4


@dataclass(eq=False)
class MegaNode:
    """One node as the server describes it, plus what was decrypted from it."""

    handle: str
    parent: str | None
    type: int
    owner: str
    raw_key: str
    raw_attrs: str
    size: int
    ts: int
    children: set[str] = field(default_factory=set)
    decrypted: bool = False
    key: bytes | None = None  # 16-byte folder key or 32-byte packed file key
    attrs: dict[str, Any] | None = None
    error: str | None = None
    # Folders: posix name -> handle, computed on demand (None = recompute).
    _listing: dict[bytes, str] | None = None

    @property
    def is_folder(self) -> bool:
        return self.type != FILE

    @property
    def name(self) -> str | None:
        if self.attrs is None:
            return None
        n = self.attrs.get("n")
        return n if isinstance(n, str) else None

    @property
    def file_key(self) -> crypto.FileKey:
        assert self.key is not None and len(self.key) == 32
        return crypto.FileKey.unpack(self.key)

    @property
    def attr_key(self) -> bytes:
        """The key the attribute blob is encrypted with."""
        assert self.key is not None
        return self.key if len(self.key) == 16 else self.file_key.aes_key

    @property
    def mtime(self) -> int:
        c = self.attrs.get("c") if self.attrs else None
        if isinstance(c, str):
            m = crypto.fingerprint_mtime(c)
            if m is not None:
                return m
        return self.ts


def _int(v: object, default: int = 0) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def node_from_json(obj: Mapping[str, Any]) -> MegaNode | None:
    """A node from a ``f``/``t``/``p`` node object, or None if malformed."""
    h, t = obj.get("h"), obj.get("t")
    if not isinstance(h, str) or not isinstance(t, int):
        return None
    p = obj.get("p")
    return MegaNode(
        handle=h,
        parent=p if isinstance(p, str) and p else None,
        type=t,
        owner=str(obj.get("u", "")),
        raw_key=str(obj.get("k", "")),
        raw_attrs=str(obj.get("a", "")),
        size=_int(obj.get("s")),
        ts=_int(obj.get("ts")),
    )


def _split_name(name: str) -> tuple[str, str]:
    dot = name.rfind(".")
    if dot <= 0:
        return name, ""
    return name[:dot], name[dot:]


class Tree:
    """See the module docstring."""

    def __init__(self, user_handle: str, master_key: bytes) -> None:
        self.user = user_handle
        self.master_key = master_key
        self.nodes: dict[str, MegaNode] = {}
        self.roots: dict[int, str] = {}
        self.undecryptable = 0

    # ------------------------------------------------------------- building

    def load(self, nodes: Iterable[Mapping[str, Any]]) -> None:
        """Replace the tree with the ``f`` array of a fetch."""
        self.nodes.clear()
        self.roots.clear()
        for obj in nodes:
            n = node_from_json(obj)
            if n is not None:
                self.nodes[n.handle] = n
        for n in self.nodes.values():
            if n.type in (ROOT, INBOX, RUBBISH):
                self.roots.setdefault(n.type, n.handle)
            elif n.parent in self.nodes:
                self.nodes[n.parent].children.add(n.handle)

    def root(self, kind: int = ROOT) -> str:
        try:
            return self.roots[kind]
        except KeyError:
            raise KeyError(f"the account has no root of type {kind}") from None

    # ------------------------------------------------------------- decryption

    def _decrypt(self, n: MegaNode) -> None:
        n.decrypted = True
        if n.type in (ROOT, INBOX, RUBBISH):
            return
        wrapped = None
        for part in n.raw_key.split("/"):
            h, sep, k = part.partition(":")
            if sep and h == self.user:
                wrapped = k
                break
        try:
            if wrapped is None:
                raise crypto.MegaCryptoError("no key for this account")
            if len(wrapped) > 45:
                raise crypto.MegaCryptoError("key encrypted to the account's RSA key")
            key = crypto.decrypt_key(self.master_key, wrapped)
            if (len(key) == 16) != (n.type == FOLDER):
                raise crypto.MegaCryptoError("key length does not match the node type")
            n.key = key
            n.attrs = crypto.decrypt_attributes(n.raw_attrs, n.attr_key)
            if n.name is None:
                raise crypto.MegaCryptoError("attributes without a name")
        except crypto.MegaCryptoError as exc:
            n.key, n.attrs, n.error = None, None, str(exc)
            self.undecryptable += 1
            log.warning("MEGA node %s cannot be decrypted (%s); not shown", n.handle, exc)

    def _redecrypt(self, n: MegaNode) -> None:
        """The node's key or attributes changed: decrypt again now, so nothing reads the old
        ``attrs`` (a rename followed by a SETATTR would otherwise write the old name back)."""
        if n.error is not None:
            self.undecryptable -= 1
        n.key, n.attrs, n.error = None, None, None
        self._decrypt(n)

    def usable(self, n: MegaNode) -> bool:
        if not n.decrypted:
            self._decrypt(n)
        return n.error is None

    # ------------------------------------------------------------- listing

    def listing(self, folder: str) -> dict[bytes, str]:
        """POSIX name -> handle for the folder's children (see module docstring)."""
        d = self.nodes[folder]
        if d._listing is not None:
            return d._listing
        groups: dict[bytes, list[MegaNode]] = {}
        for h in d.children:
            c = self.nodes.get(h)
            if c is None or c.type not in (FILE, FOLDER) or not self.usable(c):
                continue
            name = c.name
            assert name is not None
            raw = posix_bytes(name)
            if raw is None:
                log.warning("MEGA node %s has a name too long to show; not shown", h)
                continue
            groups.setdefault(raw, []).append(c)
        out: dict[bytes, str] = {}
        extra: list[tuple[MegaNode, str]] = []
        for raw, group in groups.items():
            group.sort(key=lambda n: (n.ts, n.handle), reverse=True)
            out[raw] = group[0].handle
            for other in group[1:]:
                name = other.name
                assert name is not None
                extra.append((other, name))
        for other, name in extra:
            stem, ext = _split_name(name)
            raw = posix_bytes(f"{stem} ({other.handle}){ext}")
            if raw is None or raw in out:
                log.warning("MEGA node %s: duplicate name cannot be shown; not shown", other.handle)
                continue
            out[raw] = other.handle
        d._listing = out
        return out

    def _changed(self, folder: str | None) -> None:
        if folder is not None and folder in self.nodes:
            self.nodes[folder]._listing = None

    def subtree(self, handle: str) -> Iterator[MegaNode]:
        stack = [handle]
        while stack:
            n = self.nodes.get(stack.pop())
            if n is None:
                continue
            yield n
            stack.extend(n.children)

    def path_parents(self, handle: str) -> Iterator[str]:
        """The handles from ``handle``'s parent up to its root."""
        n = self.nodes.get(handle)
        seen = 0
        while n is not None and n.parent is not None and seen < 10_000:
            yield n.parent
            n = self.nodes.get(n.parent)
            seen += 1

    # ------------------------------------------------------------- changes

    def add(self, obj: Mapping[str, Any]) -> MegaNode | None:
        """Add or update a node from a node object (``t`` packets, ``p`` replies)."""
        n = node_from_json(obj)
        if n is None:
            return None
        old = self.nodes.get(n.handle)
        if old is not None:
            if old.parent != n.parent:
                self.detach(old.handle)
                old.parent = n.parent
            if old.raw_attrs != n.raw_attrs or old.raw_key != n.raw_key:
                old.raw_attrs, old.raw_key = n.raw_attrs, n.raw_key
                self._redecrypt(old)
            old.size, old.ts = n.size, n.ts
            n = old
        else:
            self.nodes[n.handle] = n
            if n.type in (ROOT, INBOX, RUBBISH):
                self.roots.setdefault(n.type, n.handle)
        if n.parent is not None and n.parent in self.nodes:
            self.nodes[n.parent].children.add(n.handle)
        self._changed(n.parent)
        return n

    def detach(self, handle: str) -> None:
        """Take a node out of its parent's children (it stays known)."""
        n = self.nodes.get(handle)
        if n is not None and n.parent in self.nodes:
            self.nodes[n.parent].children.discard(handle)
            self._changed(n.parent)

    def remove(self, handle: str) -> list[MegaNode]:
        """Forget a node and its subtree; returns what was removed."""
        gone = list(self.subtree(handle))
        self.detach(handle)
        for n in gone:
            self.nodes.pop(n.handle, None)
        return gone

    def set_attrs(self, handle: str, blob: str) -> None:
        n = self.nodes.get(handle)
        if n is None:
            return
        n.raw_attrs = blob
        self._redecrypt(n)
        self._changed(n.parent)

    def move(self, handle: str, parent: str) -> None:
        n = self.nodes.get(handle)
        if n is None:
            return
        self.detach(handle)
        n.parent = parent
        if parent in self.nodes:
            self.nodes[parent].children.add(handle)
        self._changed(parent)

    def apply(self, packet: Mapping[str, Any]) -> set[str]:
        """Apply one action packet idempotently; returns the handles of the folders
        whose listings changed and of the nodes whose attributes changed."""
        kind = packet.get("a")
        touched: set[str] = set()
        if kind == "t":
            t = packet.get("t")
            objs = t.get("f") if isinstance(t, dict) else None
            for obj in objs if isinstance(objs, list) else []:
                if isinstance(obj, dict):
                    n = self.add(obj)
                    if n is not None:
                        touched.update((n.handle, n.parent or ""))
        elif kind == "u":
            h, at = packet.get("n"), packet.get("at")
            if isinstance(h, str) and isinstance(at, str) and h in self.nodes:
                n = self.nodes[h]
                self.set_attrs(h, at)
                if isinstance(packet.get("ts"), int):
                    n.ts = packet["ts"]
                touched.update((h, n.parent or ""))
        elif kind == "d":
            h = packet.get("n")
            if isinstance(h, str) and h in self.nodes:
                touched.add(self.nodes[h].parent or "")
                if packet.get("m") == 1:
                    self.detach(h)  # a move: the following "t" adds it back
                else:
                    touched.update(n.handle for n in self.remove(h))
        touched.discard("")
        return touched
