"""The MEGA API emulator: command shapes, error codes, uploads, events and fault injection.

Everything goes over HTTP to the emulator subprocess (``emulator`` fixture), except a few
in-process checks of the pure state.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from megafs.mega import crypto
from megafs.testing.megaemu.client import EmuClient
from megafs.testing.megaemu.process import EmulatorProcess, start_emulator
from megafs.testing.megaemu.state import (
    EmulatorState,
    chunk_index,
    chunk_start,
    decode_sn,
    encode_sn,
    is_chunk_boundary,
    upload_crc,
)

ALICE = "alice@example.com"  # v2
BOB = "bob@example.com"  # v1


@pytest.fixture(scope="module")
def web() -> Iterator[httpx.Client]:
    """One HTTP client for the storage and event URLs (cheaper than a client per request)."""
    with httpx.Client(timeout=30.0) as http:
        yield http


@pytest.fixture
def client(emulator: EmulatorProcess) -> Iterator[EmuClient]:
    with EmuClient(emulator.url) as c:
        yield c


@pytest.fixture
def alice(emulator: EmulatorProcess, client: EmuClient) -> EmuClient:
    client.login(ALICE, emulator.accounts[ALICE])
    return client


# --------------------------------------------------------------------------- login


def test_prelogin_shapes(emulator: EmulatorProcess, client: EmuClient) -> None:
    v2 = client.one({"a": "us0", "user": "Alice@Example.com"})
    assert v2["v"] == 2 and len(crypto.b64decode(v2["s"])) == 32
    assert client.one({"a": "us0", "user": BOB}) == {"v": 1}
    assert client.call({"a": "us0", "user": "nobody@example.com"}) == [-9]


@pytest.mark.parametrize("email", [ALICE, BOB])
def test_login_and_account_shapes(emulator: EmulatorProcess, client: EmuClient, email: str) -> None:
    password = emulator.accounts[email]
    pre = client.one({"a": "us0", "user": email})
    if pre["v"] == 2:
        password_key, uh = crypto.derive_key_v2(password, crypto.b64decode(pre["s"]))
        assert len(uh) == 22
    else:
        password_key = crypto.prepare_key_v1(crypto.password_bytes_v1(password))
        uh = crypto.user_hash_v1(email, password_key)
        assert len(uh) == 11
    res = client.one({"a": "us", "user": email, "uh": uh})
    assert set(res) >= {"k", "u", "privk", "csid"}
    master = crypto.decrypt_key(password_key, res["k"])
    rsa = crypto.decode_private_key(crypto.aes_ecb_decrypt(master, crypto.b64decode(res["privk"])))
    sid = crypto.decrypt_session_id(res["csid"], rsa)
    assert len(sid) == 58
    assert crypto.b64decode(sid)[16:27].decode() == res["u"]  # token = 16 || handle || 16

    client.sid = sid
    ug = client.one({"a": "ug"})
    assert ug["u"] == res["u"] and ug["email"] == email and ug["k"] == res["k"]
    assert ug["privk"] == res["privk"]
    assert crypto.decode_public_key(crypto.b64decode(ug["pubk"]))[0] == rsa.n

    tree = client.fetch()
    assert tree["ok"] == [] and tree["s"] == [] and decode_sn(tree["sn"]) == 0
    assert sorted(n["t"] for n in tree["f"]) == [2, 3, 4]
    assert all(n["u"] == res["u"] and n["p"] == "" and len(n["h"]) == 8 for n in tree["f"])
    assert tree["u"][0]["u"] == res["u"]


def test_login_errors(emulator: EmulatorProcess, client: EmuClient) -> None:
    salt = crypto.b64decode(client.one({"a": "us0", "user": ALICE})["s"])
    _, wrong_uh = crypto.derive_key_v2("not the password", salt)
    assert client.call({"a": "us", "user": ALICE, "uh": wrong_uh}) == [-9]
    v1_uh = crypto.user_hash_v1(ALICE, bytes(16))  # a v1-style login against a v2 account
    assert client.call({"a": "us", "user": ALICE, "uh": v1_uh}) == [-8]
    assert client.call({"a": "us", "user": BOB, "uh": v1_uh}) == [-9]
    assert client.call({"a": "us", "user": "nobody@example.com", "uh": v1_uh}) == [-9]
    assert client.call({"a": "us", "user": ALICE}) == [-2]


def test_request_level_errors(
    emulator: EmulatorProcess, alice: EmuClient, web: httpx.Client
) -> None:
    bogus = crypto.b64encode(crypto.make_session_token("AAAAAAAAAAA"))
    response = alice.request([{"a": "f"}], sid=bogus)
    assert response.status_code == 200 and response.json() == -15
    assert alice.call({"a": "f"}, use_session=False) == [-15]  # no sid: per command
    assert alice.call({"a": "nosuchcommand"}, {"a": "ug"})[0] == -2
    for body in (b"not json", b'{"a":"f"}'):
        r = web.post(f"{emulator.url}/cs", params={"id": "1"}, content=body)
        assert r.json() == -2


def test_logout_kills_the_session(
    emulator: EmulatorProcess, alice: EmuClient, web: httpx.Client
) -> None:
    assert alice.call({"a": "sml"}) == [0]
    assert alice.request([{"a": "f"}]).json() == -15
    r = web.post(f"{emulator.url}/sc", params={"sn": encode_sn(0), "sid": alice.sid or ""})
    assert r.json() == -15


def test_expired_sessions(emulator: EmulatorProcess, alice: EmuClient) -> None:
    assert emulator.expire_sessions(ALICE) == 1
    assert alice.request([{"a": "ug"}]).json() == -15
    alice.login(ALICE, emulator.accounts[ALICE])
    assert alice.one({"a": "ug"})["email"] == ALICE


def test_ephemeral_account_tsid(emulator: EmulatorProcess, client: EmuClient) -> None:
    master, password_key, challenge = (secrets.token_bytes(16) for _ in range(3))
    handle = client.one(
        {
            "a": "up",
            "k": crypto.encrypt_key(password_key, master),
            "ts": crypto.b64encode(challenge + crypto.aes_ecb_encrypt(master, challenge)),
        }
    )
    assert isinstance(handle, str) and len(handle) == 11
    res = client.one({"a": "us", "user": handle})
    assert crypto.decrypt_key(password_key, res["k"]) == master
    assert crypto.check_tsid(res["tsid"], master)
    assert crypto.b64decode(res["tsid"])[16:27].decode() == handle
    client.sid = res["tsid"]
    assert sorted(n["t"] for n in client.fetch()["f"]) == [2, 3, 4]
    assert client.call({"a": "up", "k": "x", "ts": "y"}) == [-2]


# --------------------------------------------------------------------------- nodes


def test_put_nodes_shapes_and_errors(emulator: EmulatorProcess, alice: EmuClient) -> None:
    me = alice.login_info
    assert me is not None
    root = alice.root()
    folder = alice.mkdir(root, "docs")
    assert set(folder) >= {"h", "p", "u", "t", "a", "k", "ts"}
    assert len(folder["h"]) == 8 and folder["p"] == root and folder["u"] == me.handle
    assert folder["t"] == 1 and folder["k"].startswith(me.handle + ":")
    assert alice.name_of(folder) == "docs"
    twin = alice.mkdir(root, "docs")  # duplicate names are legal
    assert twin["h"] != folder["h"] and alice.name_of(twin) == "docs"

    # a batch whose second folder names the first one (by its placeholder) as parent
    key = secrets.token_bytes(16)
    item = {"t": 1, "a": crypto.encrypt_attributes({"n": "x"}, key), "k": crypto.b64encode(key)}
    res = alice.one(
        {"a": "p", "t": root, "n": [{**item, "h": "tmp1"}, {**item, "h": "tmp2", "p": "tmp1"}]}
    )
    first, second = res["f"]
    assert second["p"] == first["h"] and first["p"] == root

    file_node = alice.upload(root, "f.bin", b"data")
    new = {**item, "h": "xxxxxxxx"}
    assert alice.call({"a": "p", "t": file_node["h"], "n": [new]}) == [-2]  # parent is a file
    assert alice.call({"a": "p", "t": "AAAAAAAA", "n": [new]}) == [-9]
    assert alice.call({"a": "p", "t": root, "n": []}) == [-2]
    assert alice.call({"a": "p", "t": root, "n": [{"h": "xxxxxxxx", "t": 1}]}) == [-2]
    unknown_token = crypto.b64encode(secrets.token_bytes(36))
    assert alice.call({"a": "p", "t": root, "n": [{**item, "h": unknown_token, "t": 0}]}) == [-9]
    # the failed batches created nothing
    assert len(emulator.tree(ALICE)) == 3 + 5


def test_copy_move_delete_attributes_links(
    emulator: EmulatorProcess, alice: EmuClient, web: httpx.Client
) -> None:
    root, rubbish = alice.root(2), alice.root(4)
    a = alice.mkdir(root, "a")
    b = alice.mkdir(a["h"], "b")
    f = alice.upload(b["h"], "f.txt", b"hello world")

    # copy a file by handle: new node, same content
    copy = alice.one(
        {"a": "p", "t": root, "n": [{"h": f["h"], "t": 0, "a": f["a"], "k": f["k"].split(":")[1]}]}
    )["f"][0]
    assert copy["h"] != f["h"] and copy["s"] == 11 and alice.download(copy) == b"hello world"

    # move: circular, into a file, roots, unknown handles
    assert alice.call({"a": "m", "n": a["h"], "t": b["h"]}) == [-10]
    assert alice.call({"a": "m", "n": a["h"], "t": a["h"]}) == [-10]
    assert alice.call({"a": "m", "n": b["h"], "t": f["h"]}) == [-2]
    assert alice.call({"a": "m", "n": root, "t": rubbish}) == [-11]
    assert alice.call({"a": "m", "n": "AAAAAAAA", "t": root}) == [-9]
    assert alice.call({"a": "m", "n": b["h"], "t": root}) == [0]
    parents = {n["h"]: n["p"] for n in emulator.tree(ALICE)}
    assert parents[b["h"]] == root and parents[f["h"]] == b["h"]

    # attributes: modern "at" and legacy "attr" (+ ignored "key")
    blob = crypto.encrypt_attributes({"n": "renamed"}, alice.node_key(b))
    assert alice.call({"a": "a", "n": b["h"], "at": blob}) == [0]
    legacy = crypto.encrypt_attributes({"n": "again"}, alice.node_key(b))
    assert alice.call({"a": "a", "n": b["h"], "attr": legacy, "key": "ignored"}) == [0]
    node = next(n for n in alice.fetch()["f"] if n["h"] == b["h"])
    assert alice.name_of(node) == "again"
    assert alice.call({"a": "a", "n": b["h"]}) == [-2]
    assert alice.call({"a": "a", "n": root, "at": blob}) == [-11]

    # public link: a handle, idempotent, usable without a session, removable
    ph = alice.one({"a": "l", "n": f["h"]})
    assert isinstance(ph, str) and len(ph) == 8 and alice.one({"a": "l", "n": f["h"]}) == ph
    public = alice.one({"a": "g", "g": 1, "p": ph}, use_session=False)
    assert public["s"] == 11 and public["at"] == f["a"]
    own = alice.one({"a": "g", "g": 1, "n": f["h"]})["g"]
    assert web.get(public["g"]).content == web.get(own).content
    assert alice.download(f) == b"hello world"
    assert alice.call({"a": "l", "n": f["h"], "d": 1}) == [0]
    assert alice.call({"a": "g", "g": 1, "p": ph}, use_session=False) == [-9]

    # delete is recursive and frees quota
    used = alice.one({"a": "uq", "strg": 1})["cstrg"]
    assert used == 22
    assert alice.call({"a": "d", "n": b["h"]}) == [0]
    handles = {n["h"] for n in emulator.tree(ALICE)}
    assert b["h"] not in handles and f["h"] not in handles and copy["h"] in handles
    assert alice.one({"a": "uq", "strg": 1})["cstrg"] == 11
    assert alice.call({"a": "d", "n": b["h"]}) == [-9]
    assert alice.call({"a": "d", "n": root}) == [-11]


def test_accounts_are_isolated(emulator: EmulatorProcess, alice: EmuClient) -> None:
    folder = alice.mkdir(alice.root(), "private")
    with EmuClient(emulator.url) as bob:
        bob.login(BOB, emulator.accounts[BOB])
        assert bob.call({"a": "d", "n": folder["h"]}) == [-9]
        assert bob.call({"a": "g", "g": 1, "n": folder["h"]}) == [-9]
        assert bob.call({"a": "m", "n": folder["h"], "t": bob.root()}) == [-9]
        assert folder["h"] not in {n["h"] for n in bob.fetch()["f"]}


# --------------------------------------------------------------------------- transfers


@pytest.mark.parametrize(
    ("size", "version"), [(0, 2), (1, None), (131072, 2), (131073, None), (400000, 2)]
)
def test_upload_download_byte_exact(
    emulator: EmulatorProcess, alice: EmuClient, size: int, version: int | None, web: httpx.Client
) -> None:
    data = secrets.token_bytes(size)
    key = crypto.FileKey.random()
    command: dict[str, Any] = {"a": "u", "s": size}
    if version is not None:
        command["v"] = version
    url = alice.one(command)["p"]
    assert url.startswith(emulator.url + "/ul/")
    cipher = crypto.ctr_crypt(key.aes_key, key.nonce, 0, data)
    bounds = crypto.chunk_bounds(size) or [(0, 0)]
    replies = []
    for start, length in reversed(bounds):  # out of order
        replies.append(web.post(f"{url}/{start}", content=cipher[start : start + length]))
    assert all(r.status_code == 200 for r in replies)
    assert [r.content for r in replies[:-1]] == [b""] * (len(bounds) - 1)
    token = replies[-1].content
    if version == 2:
        assert len(token) == 36
        handle = crypto.b64encode(token)
    else:
        assert (
            len(token) == 36
            and crypto.b64encode(crypto.b64decode(token.decode())) == token.decode()
        )
        handle = token.decode()
    attrs = crypto.encrypt_attributes({"n": "x"}, key.aes_key)
    node = {"h": handle, "t": 0, "a": attrs, "k": crypto.encrypt_key(alice.master_key, key.pack())}
    created = alice.one({"a": "p", "t": alice.root(), "n": [node]})["f"][0]
    assert created["s"] == size and created["t"] == 0
    # the token is spent
    assert alice.call({"a": "p", "t": alice.root(), "n": [node]}) == [-9]

    info = alice.one({"a": "g", "g": 1, "n": created["h"]})
    assert info["s"] == size and info["at"] == attrs
    dl = info["g"]
    assert dl.startswith(emulator.url + "/dl/")
    assert web.get(dl).content == cipher
    assert web.post(dl).content == cipher
    if size:
        a, b = size // 3, max(size // 3, size - 2)
        assert web.post(f"{dl}/{a}-{b}").content == cipher[a : b + 1]  # inclusive end
        assert web.get(f"{dl}/0-{size + 100}").content == cipher  # clamped at EOF
        r = web.get(dl, headers={"Range": f"bytes={a}-{b}"})
        assert r.status_code == 206 and r.content == cipher[a : b + 1]
        assert r.headers["content-range"] == f"bytes {a}-{b}/{size}"
        tail = web.get(dl, headers={"Range": "bytes=-1"})
        assert tail.content == cipher[-1:]
        assert web.get(dl, headers={"Range": f"bytes={size}-"}).status_code == 416
        assert crypto.ctr_crypt(key.aes_key, key.nonce, a, cipher[a : b + 1]) == data[a : b + 1]
    assert alice.call({"a": "g", "n": created["h"]})[0] == {"s": size, "at": attrs}  # no g:1


def test_upload_multi_chunk_post_and_retransmitted_piece(
    alice: EmuClient, web: httpx.Client
) -> None:
    size = 131072 + 262144 + 1000
    url = alice.one({"a": "u", "s": size, "v": 2})["p"]
    body = secrets.token_bytes(size)
    assert web.post(f"{url}/0", content=body[:393216]).content == b""  # chunks 0 and 1
    assert web.post(f"{url}/0", content=body[:131072]).content == b""  # sent again
    token = web.post(f"{url}/393216", content=body[393216:]).content
    assert len(token) == 36
    # a piece re-sent after completion gets the same token
    assert web.post(f"{url}/393216", content=body[393216:]).content == token


def test_upload_erange_and_crc(alice: EmuClient, web: httpx.Client) -> None:
    size = 300000
    url = alice.one({"a": "u", "s": size})["p"]
    body = secrets.token_bytes(size)
    assert web.post(f"{url}/1", content=body[1:131072]).content == b"-7"  # start
    assert web.post(f"{url}/0", content=body[:1000]).content == b"-7"  # end
    assert web.post(f"{url}/131072", content=body[131072:] + b"x").content == b"-7"  # past EOF
    assert web.post(f"{url}/{size}", content=b"").content == b"-7"
    assert web.post(f"{url}/abc", content=b"").content == b"-7"
    piece = body[:131072]
    good = upload_crc(piece)
    bad = crypto.upload_crc(piece[:-1] + bytes([piece[-1] ^ 1]))
    assert web.post(f"{url}/0", params={"c": bad}, content=piece).content == b"-14"
    assert web.post(f"{url}/0", params={"c": good}, content=piece).content == b""
    assert web.post(f"{url}/0", params={"d": good}, content=piece).content == b"0"
    rest = body[131072:]
    token = web.post(f"{url}/131072", params={"d": upload_crc(rest)}, content=rest).content
    assert len(token) == 36 and token != b"0"

    empty = alice.one({"a": "u", "s": 0})["p"]
    assert web.post(f"{empty}/0", content=b"x").content == b"-7"
    assert len(web.post(f"{empty}/0", content=b"").content) == 36
    assert web.post(f"{empty.rsplit('/', 1)[0]}/nosuchtoken/0", content=b"").status_code == 404


def test_upload_crc_matches_the_client_algorithm() -> None:
    for size in (0, 1, 11, 12, 13, 24, 25, 1000, 131072, 131073):
        body = secrets.token_bytes(size)
        assert upload_crc(body) == crypto.upload_crc(body)


def test_chunk_boundaries_match_the_client_algorithm() -> None:
    for index in range(20):
        assert chunk_start(index) == crypto.chunk_start(index)
        assert is_chunk_boundary(chunk_start(index))
        assert not is_chunk_boundary(chunk_start(index) + 16)
    for offset in (0, 1, 131071, 131072, 393215, 4718591, 4718592, 9999999):
        assert chunk_index(offset) == crypto.chunk_index(offset)


def test_quota(emulator: EmulatorProcess, alice: EmuClient) -> None:
    alice.upload(alice.root(), "one", b"x" * 1000)
    uq = alice.one({"a": "uq", "strg": 1, "xfer": 1})
    assert uq["cstrg"] == 1000 and uq["mstrg"] == 20 << 30
    assert uq["cstrgn"][alice.root()][:3] == [1000, 1, 0]
    emulator.set_quota(1500, ALICE)
    assert alice.one({"a": "uq"})["mstrg"] == 1500
    assert alice.call({"a": "u", "s": 501}) == [-17]
    assert "p" in alice.one({"a": "u", "s": 500})
    assert alice.call({"a": "u", "s": -1}) == [-2]


# --------------------------------------------------------------------------- idempotence


def test_retransmitted_request_runs_once(emulator: EmulatorProcess, alice: EmuClient) -> None:
    key = secrets.token_bytes(16)
    command = {
        "a": "p",
        "t": alice.root(),
        "n": [{"h": "xxxxxxxx", "t": 1, "a": crypto.encrypt_attributes({"n": "d"}, key), "k": "x"}],
        "i": alice.tag,
    }
    first = alice.request([command], request_id="retry-1")
    second = alice.request([command], request_id="retry-1")
    assert first.content == second.content
    assert len(emulator.tree(ALICE)) == 4
    alice.request([command], request_id="retry-2")  # a new request id runs again
    assert len(emulator.tree(ALICE)) == 5
    assert emulator.stats()["cs:replayed"] == 1

    # the response is lost after the command ran; the retransmission gets it
    emulator.fault("cs:p", "drop")
    with pytest.raises(httpx.RemoteProtocolError):
        alice.request([command], request_id="retry-3")
    assert len(emulator.tree(ALICE)) == 6
    replay = alice.request([command], request_id="retry-3").json()
    assert replay[0]["f"][0]["h"] in {n["h"] for n in emulator.tree(ALICE)}
    assert len(emulator.tree(ALICE)) == 6


def test_only_the_latest_request_is_a_retransmission(
    emulator: EmulatorProcess, alice: EmuClient
) -> None:
    """megatools numbers requests from time(NULL) in each process and shares cached sessions
    between processes: a second command started within the same second repeats earlier
    (sid, id, body) triples -- which must run again, not get the old answer replayed."""
    fetch = [{"a": "f", "c": 1}]
    first = alice.request(fetch, request_id="1795700001").json()
    alice.mkdir(alice.root(), "made in between")  # other requests on the session
    again = alice.request(fetch, request_id="1795700001").json()  # the "next process"
    assert len(again[0]["f"]) == len(first[0]["f"]) + 1
    assert "cs:replayed" not in emulator.stats()

    # session-less requests are never replayed: a repeated login is a new login
    pre = alice.one({"a": "us0", "user": ALICE}, use_session=False)
    _, uh = crypto.derive_key_v2(emulator.accounts[ALICE], crypto.b64decode(pre["s"]))
    login = [{"a": "us", "user": ALICE, "uh": uh}]
    one = alice.request(login, request_id="7", use_session=False).json()
    two = alice.request(login, request_id="7", use_session=False).json()
    assert one[0]["csid"] != two[0]["csid"]  # two sessions
    assert "cs:replayed" not in emulator.stats()


# --------------------------------------------------------------------------- events


def sc(emulator: EmulatorProcess, client: EmuClient, sn: str) -> Any:
    r = client.http.post(f"{emulator.url}/sc", params={"sn": sn, "sid": client.sid or ""})
    assert r.status_code == 200
    return r.json()


def test_action_packets(emulator: EmulatorProcess, alice: EmuClient) -> None:
    me = alice.login_info
    assert me is not None
    sn0 = alice.fetch()["sn"]
    root, rubbish = alice.root(2), alice.root(4)
    folder = alice.mkdir(root, "dir")
    inner = alice.mkdir(folder["h"], "inner")
    blob = crypto.encrypt_attributes({"n": "renamed"}, alice.node_key(folder))
    alice.call({"a": "a", "n": folder["h"], "at": blob, "i": "tag-a"})
    alice.call({"a": "m", "n": folder["h"], "t": rubbish, "i": "tag-m"})
    alice.call({"a": "d", "n": folder["h"], "i": "tag-d"})

    res = sc(emulator, alice, sn0)
    kinds = [(p["a"], p.get("i"), p.get("m")) for p in res["a"]]
    assert kinds == [
        ("t", alice.tag, None),
        ("t", alice.tag, None),
        ("u", "tag-a", None),
        ("d", "tag-m", 1),
        ("t", "tag-m", None),
        ("d", "tag-d", None),
    ]
    packets = res["a"]
    assert list(packets[0])[:2] == ["a", "i"]  # "a" first, then the tag
    assert packets[0]["t"]["f"][0]["h"] == folder["h"] and packets[0]["ou"] == me.handle
    assert packets[2] == {
        "a": "u",
        "i": "tag-a",
        "n": folder["h"],
        "u": me.handle,
        "at": blob,
        "ts": folder["ts"],
    }
    moved = packets[4]["t"]["f"]
    assert [n["h"] for n in moved] == [folder["h"], inner["h"]] and moved[0]["p"] == rubbish
    assert packets[5]["n"] == folder["h"]
    assert decode_sn(res["sn"]) == 5  # one step per command

    # partial reads: only what came after the given sn
    assert [p["a"] for p in sc(emulator, alice, encode_sn(4))["a"]] == ["d"]
    waiting = sc(emulator, alice, res["sn"])
    assert set(waiting) == {"w"} and waiting["w"].startswith(emulator.url + "/wait/")
    assert sc(emulator, alice, encode_sn(99)) == -2
    assert sc(emulator, alice, "garbage!") == -2


def test_long_poll_wakes_up_on_a_change(
    emulator: EmulatorProcess, alice: EmuClient, web: httpx.Client
) -> None:
    sn = alice.fetch()["sn"]
    wait_url = sc(emulator, alice, sn)["w"]
    root = alice.root()

    def change() -> None:
        time.sleep(0.2)
        alice.mkdir(root, "wake")

    for method in ("GET", "POST"):
        worker = threading.Thread(target=change)
        started = time.monotonic()
        worker.start()
        r = web.request(method, wait_url, timeout=10)
        elapsed = time.monotonic() - started
        worker.join()
        assert r.status_code == 200 and 0.15 < elapsed < 1.2
        res = sc(emulator, alice, sn)
        sn = res["sn"]
        assert res["a"][-1]["a"] == "t"
        wait_url = sc(emulator, alice, sn)["w"]

    # nothing happens: the long poll gives up after the wait timeout
    started = time.monotonic()
    assert web.get(wait_url, timeout=10).status_code == 200
    assert time.monotonic() - started >= 1.2


def test_wsc_is_held_open(emulator: EmulatorProcess, alice: EmuClient, web: httpx.Client) -> None:
    sn = alice.fetch()["sn"]
    root = alice.root()

    def change() -> None:
        time.sleep(0.2)
        alice.mkdir(root, "x")

    worker = threading.Thread(target=change)
    worker.start()
    started = time.monotonic()
    r = web.post(f"{emulator.url}/wsc", params={"sn": sn, "sid": alice.sid or ""}, timeout=10)
    worker.join()
    assert time.monotonic() - started < 1.2
    res = r.json()
    before, after = decode_sn(sn), decode_sn(res["sn"])
    assert before is not None and after == before + 1
    assert [p["a"] for p in res["a"]] == ["t"]
    idle = web.post(f"{emulator.url}/wsc", params={"sn": res["sn"], "sid": alice.sid or ""})
    assert idle.json() == {"a": [], "sn": res["sn"]}
    r = web.post(f"{emulator.url}/wsc", params={"sn": res["sn"], "sid": "nope"})
    assert r.json() == -15


# --------------------------------------------------------------------------- faults


def test_request_and_command_errors(emulator: EmulatorProcess, alice: EmuClient) -> None:
    emulator.fault("cs", "request_error", code=-3, count=2)
    assert alice.request([{"a": "ug"}]).json() == -3
    assert alice.request([{"a": "ug"}]).json() == -3
    assert alice.one({"a": "ug"})["email"] == ALICE

    emulator.fault("cs:f", "command_error", code=-4)
    ug, f = alice.call({"a": "ug"}, {"a": "f"})
    assert ug["email"] == ALICE and f == -4
    assert "f" in alice.fetch()

    emulator.fault("cs:f", "request_error", code=-3)
    assert alice.request([{"a": "ug"}]).json()[0]["email"] == ALICE  # batch without f
    assert alice.request([{"a": "ug"}, {"a": "f"}]).json() == -3

    emulator.fault("sc", "request_error", code=-3)
    assert sc(emulator, alice, encode_sn(0)) == -3
    stats = emulator.stats()
    assert stats["faults"] == 5 and stats["cs:ug"] == 6 and stats["sc"] == 1


def test_http_faults(emulator: EmulatorProcess, alice: EmuClient, web: httpx.Client) -> None:
    emulator.fault("cs", "http", status=500)
    emulator.fault("cs", "http", status=503)
    emulator.fault("cs", "http", status=429, headers={"Retry-After": "1"})
    assert [alice.request([{"a": "ug"}]).status_code for _ in range(4)] == [500, 503, 429, 200]

    node = alice.upload(alice.root(), "f", b"content")
    url = alice.one({"a": "g", "g": 1, "n": node["h"]})["g"]
    emulator.fault("dl", "http", status=509, headers={"X-MEGA-Time-Left": "42"})
    r = web.get(url)
    assert r.status_code == 509 and r.headers["x-mega-time-left"] == "42"
    assert web.get(url).status_code == 200
    assert emulator.control("GET", "faults") == []


def test_upload_server_errors(
    emulator: EmulatorProcess, alice: EmuClient, web: httpx.Client
) -> None:
    url = alice.one({"a": "u", "s": 10})["p"]
    emulator.fault("ul", "request_error", code=-4)
    assert web.post(f"{url}/0", content=b"0123456789").content == b"-4"
    assert len(web.post(f"{url}/0", content=b"0123456789").content) == 36


def test_drop_truncate_delay(
    emulator: EmulatorProcess, alice: EmuClient, web: httpx.Client
) -> None:
    emulator.fault("cs", "drop", phase="before")
    with pytest.raises(httpx.RemoteProtocolError, match="without sending"):
        alice.request([{"a": "ug"}])
    emulator.fault("cs", "truncate")
    with pytest.raises(httpx.RemoteProtocolError):
        alice.request([{"a": "ug"}])

    node = alice.upload(alice.root(), "f", secrets.token_bytes(5000))
    url = alice.one({"a": "g", "g": 1, "n": node["h"]})["g"]
    emulator.fault("dl", "truncate")
    with pytest.raises(httpx.RemoteProtocolError):
        web.get(url)
    emulator.fault("dl", "drop")
    with pytest.raises(httpx.RemoteProtocolError):
        web.get(url)
    assert len(web.get(url).content) == 5000

    emulator.fault("cs:ug", "delay", seconds=0.5)
    started = time.monotonic()
    assert alice.one({"a": "ug"})["email"] == ALICE
    assert time.monotonic() - started >= 0.5


def test_expire_urls(emulator: EmulatorProcess, alice: EmuClient, web: httpx.Client) -> None:
    node = alice.upload(alice.root(), "f", b"abc")
    dl = alice.one({"a": "g", "g": 1, "n": node["h"]})["g"]
    ul = alice.one({"a": "u", "s": 3})["p"]
    assert emulator.fault("dl", "expire_urls") == {"expired": 1}
    assert web.get(dl).status_code == 403
    assert web.post(f"{ul}/0", content=b"abc").status_code == 200  # uploads unaffected
    fresh = alice.one({"a": "g", "g": 1, "n": node["h"]})["g"]
    assert alice.download(node) == b"abc" and web.get(fresh).status_code == 200

    ul2 = alice.one({"a": "u", "s": 3})["p"]
    ul3 = alice.one({"a": "u", "s": 3})["p"]
    emulator.fault("ul", "expire_urls")
    assert web.post(f"{ul2}/0", content=b"abc").status_code == 403
    ul4 = alice.one({"a": "u", "s": 3})["p"]
    emulator.fault("ul", "expire_urls", code=-8)
    assert web.post(f"{ul4}/0", content=b"abc").content == b"-8"
    assert web.post(f"{ul3}/0", content=b"abc").status_code == 403


def test_hashcash_round_trip(emulator: EmulatorProcess, client: EmuClient) -> None:
    emulator.fault("cs:us", "hashcash", easiness=255)
    assert client.one({"a": "us0", "user": ALICE})["v"] == 2  # not challenged
    with pytest.raises(httpx.HTTPStatusError) as info:
        client.login(ALICE, emulator.accounts[ALICE])
    response = info.value.response
    assert response.status_code == 402 and response.content == b""
    version, easiness, ts, token = response.headers["x-hashcash"].split(":")
    assert (version, easiness) == ("1", "255") and abs(int(ts) - time.time()) < 60
    assert len(token) == 64
    salt = crypto.b64decode(client.one({"a": "us0", "user": ALICE})["s"])
    _, uh = crypto.derive_key_v2(emulator.accounts[ALICE], salt)
    command = [{"a": "us", "user": ALICE, "uh": uh}]
    # no answer, or a wrong one: challenged again with the same token
    assert client.request(command).headers["x-hashcash"].endswith(token)
    wrong = next(
        c
        for c in (crypto.b64encode(i.to_bytes(4, "little")) for i in range(64))
        if not crypto.hashcash_check(token, c, 255)
    )
    r = client.request(command, headers={"X-Hashcash": f"1:{token}:{wrong}"})
    assert r.status_code == 402
    cash = crypto.solve_hashcash(token, 255)
    r = client.request(command, headers={"X-Hashcash": f"1:{token}:{cash}"})
    assert r.status_code == 200 and "csid" in r.json()[0]
    assert client.request(command).status_code == 200  # spent: no more challenges


# --------------------------------------------------------------------------- control plane


def test_control_plane(emulator: EmulatorProcess, client: EmuClient) -> None:
    handle = emulator.add_account("carol@example.com", "carol-pw", version=1)
    assert len(handle) == 11
    with pytest.raises(httpx.HTTPStatusError):
        emulator.add_account("carol@example.com", "again")
    assert client.login("carol@example.com", "carol-pw").handle == handle
    assert len(emulator.tree("carol@example.com")) == 3
    for bad in ({"match": "nowhere", "kind": "drop"}, {"match": "cs", "kind": "explode"}):
        with pytest.raises(httpx.HTTPStatusError):
            emulator.control("POST", "faults", bad)
    with pytest.raises(httpx.HTTPStatusError):
        emulator.tree("nobody@example.com")
    client.call({"a": "ug"}, {"a": "f"})
    stats = emulator.stats()
    assert stats["cs:ug"] == 1 and stats["cs:f"] == 1 and stats["cs:us"] == 1
    emulator.control("DELETE", "stats")
    assert emulator.stats() == {}


def test_proxy_absolute_form(emulator: EmulatorProcess) -> None:
    """Requests to the hard-coded API host, sent through the emulator as an HTTP proxy."""
    with httpx.Client(proxy=emulator.url, timeout=30) as http:
        client = EmuClient("http://g.api.mega.co.nz", http=http)
        client.login(ALICE, emulator.accounts[ALICE])
        url = client.one({"a": "u", "s": 1})["p"]
        assert url.startswith(emulator.url + "/ul/")  # the address the emulator listens on
        node = client.upload(client.root(), "p", b"\x01\x02")
        assert client.download(node) == b"\x01\x02"


def test_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    trust = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with start_emulator(
        "--tls-cert",
        str(tmp_path / "cert.pem"),
        "--tls-key",
        str(tmp_path / "key.pem"),
        "--v1",
        accounts={"tls@example.com": "tls-pw"},
        log=tmp_path / "emu.log",
        verify=trust,
    ) as emulator:
        assert emulator.url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=trust, timeout=30) as http:
            client = EmuClient(emulator.url.replace("127.0.0.1", "localhost"), http=http)
            assert client.one({"a": "us0", "user": "tls@example.com"}) == {"v": 1}  # --v1
            client.login("tls@example.com", "tls-pw")
            url = client.one({"a": "u", "s": 1})["p"]
            assert url.startswith("https://localhost:")  # the Host the client used
            node = client.upload(client.root(), "t", b"z")
            assert client.download(node) == b"z"
        assert emulator.stats()["cs:us"] == 1


def test_tls_bind_next_to_plain_http(tmp_path: Path) -> None:
    """``--tls-bind``: the main listener stays plain HTTP, an extra HTTPS one shares the state
    (how megatools, with its hard-coded https API host, meets megafs on one emulator)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "g.api.mega.co.nz")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    trust = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with socket.socket() as probe:  # a free port for the TLS side
        probe.bind(("127.0.0.1", 0))
        tls_port = probe.getsockname()[1]
    with start_emulator(
        "--tls-cert",
        str(tmp_path / "cert.pem"),
        "--tls-key",
        str(tmp_path / "key.pem"),
        "--tls-bind",
        f"127.0.0.1:{tls_port}",
        accounts={"both@example.com": "both-pw"},
        log=tmp_path / "emu.log",
    ) as emulator:
        assert emulator.url.startswith("http://127.0.0.1:")
        with EmuClient(emulator.url) as plain:
            plain.login("both@example.com", "both-pw")
            plain.mkdir(plain.root(), "made over http")
        tls_url = f"https://127.0.0.1:{tls_port}"
        with httpx.Client(verify=trust, timeout=30) as http:
            tls = EmuClient(tls_url, http=http)
            tls.login("both@example.com", "both-pw")
            folders = [n for n in tls.one({"a": "f", "c": 1})["f"] if n["t"] == 1]
            assert len(folders) == 1  # the folder made over plain HTTP: one state
            url = tls.one({"a": "u", "s": 1})["p"]
            assert url.startswith(tls_url + "/ul/")  # transfer URLs follow the TLS listener
            node = tls.upload(tls.root(), "t", b"z")
            assert tls.download(node) == b"z"
        with EmuClient(emulator.url) as plain:
            plain.login("both@example.com", "both-pw")
            assert plain.download(node) == b"z"
        assert emulator.stats()["cs:us"] == 3


def test_tls_bind_needs_a_certificate() -> None:
    with pytest.raises(RuntimeError, match="exited with status 2"):
        with start_emulator("--tls-bind", "127.0.0.1:0"):
            pass


def test_state_dir_survives_a_restart(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    accounts = {"keep@example.com": "keep-pw"}
    with start_emulator(
        "--state-dir", str(state_dir), "--quota", "1M", accounts=accounts
    ) as emulator:
        with EmuClient(emulator.url) as client:
            client.login("keep@example.com", "keep-pw")
            assert client.one({"a": "uq"})["mstrg"] == 1 << 20
            folder = client.mkdir(client.root(), "kept")
            node = client.upload(folder["h"], "file", b"persistent bytes")
            sid = client.sid
        assert emulator.stop() == 0
    blobs = os.listdir(state_dir / "blobs")
    assert len(blobs) == 1 and not blobs[0].endswith(".part")
    with start_emulator("--state-dir", str(state_dir), accounts=accounts) as emulator:
        with EmuClient(emulator.url) as client:
            client.sid = sid  # the session survived, like MEGA's
            handles = {n["h"] for n in client.fetch()["f"]}
            assert {folder["h"], node["h"]} <= handles
            client.login("keep@example.com", "keep-pw")
            assert client.download(node) == b"persistent bytes"


# --------------------------------------------------------------------------- in-process


def test_state_in_process() -> None:
    clock = [1_700_000_000.0]
    state = EmulatorState(rsa_bits=1024, clock=lambda: clock[0])
    new = state.create_account("inproc@example.com", "pw", version=1)
    account = state.account("INPROC@example.com")
    assert account.version == 1 and account.pubk == new.pubk
    uh = crypto.user_hash_v1(new.email, crypto.prepare_key_v1(crypto.password_bytes_v1("pw")))
    body = json.dumps([{"a": "us", "user": new.email, "uh": uh}]).encode()
    (login,) = state.cs(body, sid=None, request_id="1", base_url="http://x")
    sid = crypto.decrypt_session_id(login["csid"], new.rsa)
    woken: list[str] = []
    state.add_listener(woken.append)
    root = account.roots[2]
    mkdir = [{"a": "p", "t": root, "n": [{"h": "xxxxxxxx", "t": 1, "a": "A", "k": "K"}]}]
    (res,) = state.cs(json.dumps(mkdir).encode(), sid=sid, request_id="2", base_url="http://x")
    assert res["f"][0]["ts"] == 1_700_000_000 and woken == [account.handle]
    assert state.sc(sid=sid, sn=encode_sn(0))["sn"] == encode_sn(1)
    snapshot = json.loads(json.dumps(state.snapshot()))
    copy = EmulatorState()
    copy.restore(snapshot)
    assert copy.tree("inproc@example.com") == state.tree("inproc@example.com")
    assert copy.cs(b'[{"a":"ug"}]', sid=sid, request_id=None, base_url="")[0]["u"] == account.handle
    state.reset()
    assert len(state.tree("inproc@example.com")) == 3 and state.sessions == {}
