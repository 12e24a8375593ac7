"""MegaApi (cs/sc channel, retries, hashcash), login/resume/logout and the session cache,
against the MEGA emulator."""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from megafs.errors import IntegrityError, StoreError, StoreUnavailable
from megafs.mega import crypto
from megafs.mega.api import MegaApi, RetryPolicy, parse_hashcash_challenge, redact
from megafs.mega.errors import (
    LoginFailed,
    MegaError,
    MegaKeyError,
    MegaNetworkError,
    MegaNotFound,
    MegaOverQuota,
    MegaSessionExpired,
    MegaTryAgain,
    errno_for,
    mega_error,
)
from megafs.mega.session import (
    Session,
    _session_from_login,
    load_session,
    login,
    logout,
    open_session,
    resume,
    save_session,
)
from megafs.testing.megaemu.process import EmulatorProcess

T = TypeVar("T")

# The accounts tests/conftest.py creates: alice is a v2 account, bob a v1 account.
ALICE, ALICE_PW = "alice@example.com", "alice-Passw0rd"
BOB, BOB_PW = "bob@example.com", "bob-Passw0rd"
FAST = RetryPolicy(initial=0.01, max_delay=0.05, max_total=10.0)
SHORT = RetryPolicy(initial=0.01, max_delay=0.05, max_total=0.4)
TEST_KDF = {"memory_kib": 8192, "iterations": 1, "lanes": 1}


def run(
    fn: Callable[[MegaApi], Awaitable[T]], emulator: EmulatorProcess, retry: RetryPolicy = FAST
) -> T:
    async def main() -> T:
        async with MegaApi(emulator.url, retry=retry) as api:
            return await fn(api)

    return trio.run(main)


def stat_delta(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


# -- errors ------------------------------------------------------------------------------


def test_error_classes_messages_and_errno() -> None:
    err = mega_error(-9, command="g")
    assert isinstance(err, MegaNotFound)
    assert str(err) == "MEGA: -9 ENOENT: object not found (g)"
    assert err.code == -9
    assert errno_for(err) == errno.ENOENT
    assert errno_for(mega_error(-17)) == errno.EDQUOT
    assert isinstance(mega_error(-17), MegaOverQuota)
    assert errno_for(mega_error(-11)) == errno.EACCES
    assert errno_for(mega_error(-3)) == errno.EAGAIN
    assert errno_for(mega_error(-4)) == errno.EAGAIN
    assert errno_for(mega_error(-14)) == errno.EIO
    assert errno_for(mega_error(-12)) == errno.EEXIST
    assert errno_for(MegaNetworkError(detail="ConnectError")) == errno.EIO
    assert errno_for(ValueError()) == errno.EIO
    # They live in the project's error tree.
    assert isinstance(mega_error(-9), StoreError)
    assert isinstance(mega_error(-3), StoreUnavailable)
    assert isinstance(mega_error(-14), IntegrityError)
    assert isinstance(mega_error(-15), MegaSessionExpired)
    unknown = mega_error(-99)
    assert type(unknown) is MegaError and unknown.code == -99
    assert "-99" in str(unknown)
    assert str(LoginFailed()) == "MEGA login failed: wrong e-mail or password"


def test_redact_and_hashcash_header() -> None:
    assert redact("POST http://h/cs?id=abc&sid=SECRET123 200") == (
        "POST http://h/cs?id=abc&sid=<redacted> 200"
    )
    assert parse_hashcash_challenge("1:255:1731410499:TOKEN") == (255, "TOKEN")
    with pytest.raises(MegaError):
        parse_hashcash_challenge("2:255:1:TOKEN")
    with pytest.raises(MegaError):
        parse_hashcash_challenge("1:x:1:TOKEN")


# -- login -------------------------------------------------------------------------------


def _check_session(session: Session, emulator: EmulatorProcess, email: str) -> None:
    assert session.email == email
    assert len(session.user_handle) == 11
    assert len(session.master_key) == 16
    assert session.rsa is not None
    assert crypto.b64decode(session.sid)[16:27] == session.user_handle.encode()
    assert session.sid not in repr(session)


@pytest.mark.parametrize(
    ("email", "password"), [(ALICE, ALICE_PW), (BOB, BOB_PW)], ids=["v2", "v1"]
)
def test_login(emulator: EmulatorProcess, email: str, password: str) -> None:
    async def go(api: MegaApi) -> tuple[Session, Any]:
        session = await login(api, email.upper(), password)
        assert api.sid == session.sid
        return session, await api.call({"a": "ug"})

    session, user = run(go, emulator)
    _check_session(session, emulator, email)
    assert user["u"] == session.user_handle
    assert user["email"] == email


def test_wrong_password(emulator: EmulatorProcess) -> None:
    with pytest.raises(LoginFailed) as info:
        run(lambda api: login(api, ALICE, "not-the-password"), emulator)
    assert str(info.value) == "MEGA login failed: wrong e-mail or password"
    assert errno_for(info.value) == errno.ENOENT


def test_unknown_account(emulator: EmulatorProcess) -> None:
    with pytest.raises(LoginFailed, match="wrong e-mail or password"):
        run(lambda api: login(api, "nobody@example.com", "whatever"), emulator)


def test_logout_kills_the_session(emulator: EmulatorProcess) -> None:
    async def go(api: MegaApi) -> None:
        session = await login(api, ALICE, ALICE_PW)
        await logout(api)
        assert api.sid is None
        api.sid = session.sid
        with pytest.raises(MegaSessionExpired) as info:
            await api.call({"a": "ug"})
        assert info.value.code == -15
        assert not await resume(api, session)
        assert api.sid is None

    run(go, emulator)


# -- the session cache -------------------------------------------------------------------


def test_session_cache_round_trip(emulator: EmulatorProcess, tmp_path: Path) -> None:
    cache = tmp_path / "sub" / "session.json"

    async def go(api: MegaApi) -> Session:
        return await open_session(api, ALICE, ALICE_PW, cache, kdf_params=TEST_KDF)

    first = run(go, emulator)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    text = cache.read_text()
    assert first.sid not in text and ALICE not in text
    assert crypto.b64encode(first.master_key) not in text
    assert [p.name for p in cache.parent.iterdir()] == ["session.json"]

    before = emulator.stats()
    second = run(go, emulator)
    after = emulator.stats()
    assert stat_delta(before, after, "cs:us") == 0
    assert stat_delta(before, after, "cs:us0") == 0
    assert stat_delta(before, after, "cs:ug") == 1
    assert second.sid == first.sid
    assert second.master_key == first.master_key
    assert second.user_handle == first.user_handle
    assert second.rsa == first.rsa  # restored from ug's privk

    assert load_session(cache, ALICE, "wrong password") is None
    assert load_session(cache, BOB, ALICE_PW) is None
    assert load_session(tmp_path / "missing.json", ALICE, ALICE_PW) is None
    loaded = load_session(cache, ALICE.upper(), ALICE_PW)
    assert loaded is not None and loaded.sid == first.sid


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_damaged_cache_logs_in_again(
    emulator: EmulatorProcess, tmp_path: Path, damage: str
) -> None:
    cache = tmp_path / "session.json"

    async def go(api: MegaApi) -> Session:
        return await open_session(api, ALICE, ALICE_PW, cache, kdf_params=TEST_KDF)

    first = run(go, emulator)
    raw = cache.read_bytes()
    if damage == "flip":
        doc = json.loads(raw)
        sealed = bytearray(crypto.b64decode(doc["sealed"]))
        sealed[20] ^= 1
        doc["sealed"] = base64.b64encode(bytes(sealed)).decode()
        cache.write_text(json.dumps(doc))
    elif damage == "truncate":
        cache.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        cache.write_bytes(os.urandom(300))
    else:
        cache.write_bytes(b"")
    assert load_session(cache, ALICE, ALICE_PW) is None

    before = emulator.stats()
    second = run(go, emulator)
    assert stat_delta(before, emulator.stats(), "cs:us") == 1
    assert second.sid != first.sid
    # ... and the cache was rewritten with the new session.
    loaded = load_session(cache, ALICE, ALICE_PW)
    assert loaded is not None and loaded.sid == second.sid


def test_expired_cached_session_logs_in_again(emulator: EmulatorProcess, tmp_path: Path) -> None:
    cache = tmp_path / "session.json"

    async def go(api: MegaApi) -> Session:
        return await open_session(api, ALICE, ALICE_PW, cache, kdf_params=TEST_KDF)

    first = run(go, emulator)
    assert emulator.expire_sessions(ALICE) == 1
    before = emulator.stats()
    second = run(go, emulator)
    assert stat_delta(before, emulator.stats(), "cs:us") == 1
    assert second.sid != first.sid


def test_save_session_replaces_atomically(tmp_path: Path) -> None:
    cache = tmp_path / "s.json"
    s1 = Session("a@example.com", "AAAAAAAAAAA", "sid-one", b"k" * 16)
    s2 = Session("a@example.com", "AAAAAAAAAAA", "sid-two", b"j" * 16)
    save_session(cache, s1, "pw", kdf_params=TEST_KDF)
    save_session(cache, s2, "pw", kdf_params=TEST_KDF)
    loaded = load_session(cache, "a@example.com", "pw")
    assert loaded is not None
    assert (loaded.sid, loaded.master_key) == ("sid-two", b"j" * 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


# -- retries -----------------------------------------------------------------------------


async def _ug(api: MegaApi) -> Any:
    await login(api, ALICE, ALICE_PW)
    return await api.call({"a": "ug"})


@pytest.mark.parametrize(
    "fault",
    [
        {"match": "cs:ug", "kind": "request_error", "code": -3, "count": 2},
        {"match": "cs:ug", "kind": "request_error", "code": -4, "count": 1},
        {"match": "cs:ug", "kind": "command_error", "code": -3, "count": 2},
        {"match": "cs:ug", "kind": "http", "status": 500, "count": 2},
        {"match": "cs:ug", "kind": "http", "status": 503, "count": 1},
        {"match": "cs:ug", "kind": "http", "status": 429, "count": 1},
        {"match": "cs:ug", "kind": "drop", "phase": "before", "count": 2},
        {"match": "cs:ug", "kind": "truncate", "count": 1},
    ],
    ids=[
        "request-3",
        "request-4",
        "command-3",
        "http500",
        "http503",
        "http429",
        "drop",
        "truncate",
    ],
)
def test_transient_failures_are_retried(
    emulator: EmulatorProcess, fault: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    emulator.control("POST", "faults", fault)
    with caplog.at_level(logging.WARNING, logger="megafs.mega"):
        user = run(_ug, emulator)
    assert "u" in user
    stats = emulator.stats()
    assert stats["faults"] == fault["count"]
    assert emulator.control("GET", "faults") == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == fault["count"]
    assert all("ug" in r.getMessage() for r in warnings)
    for record in caplog.records:
        assert "sid=" not in record.getMessage() or "<redacted>" in record.getMessage()


def test_retry_keeps_the_request_id(emulator: EmulatorProcess) -> None:
    """A response lost after the server ran the command: the resend (same id) is answered
    from the server's replay cache, so a folder is created once."""

    async def go(api: MegaApi) -> list[dict[str, Any]]:
        session = await login(api, ALICE, ALICE_PW)
        tree = await api.call({"a": "f", "c": 1})
        root = next(n["h"] for n in tree["f"] if n["t"] == 2)
        emulator.fault("cs:p", "drop", phase="after")
        key = os.urandom(16)
        reply = await api.call(
            {
                "a": "p",
                "t": root,
                "n": [
                    {
                        "h": "xxxxxxxx",
                        "t": 1,
                        "a": crypto.encrypt_attributes({"n": "dir"}, key),
                        "k": crypto.encrypt_key(session.master_key, key),
                    }
                ],
                "i": api.client_tag,
            }
        )
        nodes: list[dict[str, Any]] = reply["f"]
        return nodes

    nodes = run(go, emulator)
    assert len(nodes) == 1
    stats = emulator.stats()
    assert stats["cs:replayed"] == 1
    folders = [n for n in emulator.tree(ALICE) if n["t"] == 1]
    assert len(folders) == 1


def test_hashcash_challenge_is_solved(emulator: EmulatorProcess) -> None:
    emulator.fault("cs:us0", "hashcash", easiness=255)
    session = run(lambda api: login(api, ALICE, ALICE_PW), emulator)
    assert session.user_handle
    stats = emulator.stats()
    assert stats["cs:us0"] == 2  # challenged, then accepted with the proof of work


@pytest.mark.parametrize(
    ("fault", "exc", "text"),
    [
        ({"kind": "request_error", "code": -3}, MegaTryAgain, "MEGA: -3 EAGAIN"),
        ({"kind": "command_error", "code": -3}, MegaTryAgain, "MEGA: -3 EAGAIN"),
        ({"kind": "http", "status": 503}, MegaNetworkError, "MEGA unreachable: HTTP 503"),
        ({"kind": "drop", "phase": "before"}, MegaNetworkError, "MEGA unreachable"),
    ],
    ids=["request", "command", "http503", "drop"],
)
def test_bounded_retries_give_up(
    emulator: EmulatorProcess, fault: dict[str, Any], exc: type[MegaError], text: str
) -> None:
    emulator.control("POST", "faults", {"match": "cs:ug", "count": -1, **fault})

    async def go(api: MegaApi) -> None:
        await login(api, ALICE, ALICE_PW)
        start = trio.current_time()
        with pytest.raises(exc) as info:
            await api.call({"a": "ug"}, retry=SHORT)
        assert trio.current_time() - start < 2.0
        message = str(info.value)
        assert message.startswith(text)
        assert "gave up after" in message
        assert "\n" not in message
        assert "sid" not in message
        assert errno_for(info.value) in (errno.EAGAIN, errno.EIO)

    run(go, emulator)


def test_unreachable_server_gives_up() -> None:
    async def main() -> None:
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        async with MegaApi(f"http://127.0.0.1:{port}", retry=SHORT) as api:
            with pytest.raises(MegaNetworkError, match=r"^MEGA unreachable: ConnectError"):
                await api.call({"a": "us0", "user": "x@example.com"})

    trio.run(main)


def test_batch_positional_results(emulator: EmulatorProcess) -> None:
    async def go(api: MegaApi) -> list[Any]:
        await login(api, ALICE, ALICE_PW)
        emulator.fault("cs:uq", "command_error", code=-3, count=1)
        return await api.batch(
            [{"a": "ug"}, {"a": "g", "g": 1, "n": "AAAAAAAA"}, {"a": "uq", "strg": 1}, {"a": "ug"}]
        )

    first, missing, quota, last = run(go, emulator)
    assert first["u"] == last["u"]
    assert isinstance(missing, MegaError) and missing.code == -9
    assert "mstrg" in quota  # the -3 command alone was sent again
    assert emulator.stats()["cs:uq"] == 2
    assert emulator.stats()["cs:ug"] == 2


def test_request_level_errors_raise(emulator: EmulatorProcess) -> None:
    async def go(api: MegaApi) -> None:
        api.sid = "not-a-session"
        with pytest.raises(MegaSessionExpired):
            await api.call({"a": "ug"})
        with pytest.raises(MegaSessionExpired):
            await api.batch([{"a": "ug"}, {"a": "uq"}])

    run(go, emulator)


def test_api_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        monkeypatch.delenv("MEGAFS_MEGA_API_URL", raising=False)
        async with MegaApi() as api:
            assert api.base_url == "https://g.api.mega.co.nz"
            assert len(api.client_tag) == 10 and api.client_tag.isalnum()
            ids = {api._next_id() for _ in range(3)}
            assert len(ids) == 3 and all(len(i) == 10 and i.islower() for i in ids)
        monkeypatch.setenv("MEGAFS_MEGA_API_URL", "http://127.0.0.1:9/")
        async with MegaApi() as api:
            assert api.base_url == "http://127.0.0.1:9"

    trio.run(main)


# -- events ------------------------------------------------------------------------------


def test_poll_events_waits_for_packets(emulator: EmulatorProcess) -> None:
    async def go(api: MegaApi) -> None:
        session = await login(api, ALICE, ALICE_PW)
        tree = await api.call({"a": "f", "c": 1})
        root = next(n["h"] for n in tree["f"] if n["t"] == 2)
        sn = tree["sn"]
        got: list[tuple[list[dict[str, Any]], str]] = []

        async def poll() -> None:
            got.append(await api.poll_events(sn))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await trio.sleep(0.3)  # the poller now waits on the w URL
            key = os.urandom(16)
            await api.call(
                {
                    "a": "p",
                    "t": root,
                    "n": [
                        {
                            "h": "xxxxxxxx",
                            "t": 1,
                            "a": crypto.encrypt_attributes({"n": "d"}, key),
                            "k": crypto.encrypt_key(session.master_key, key),
                        }
                    ],
                    "i": api.client_tag,
                }
            )
        packets, next_sn = got[0]
        assert next_sn != sn
        assert [p["a"] for p in packets] == ["t"]
        assert packets[0].get("i") == api.client_tag
        # Nothing new after next_sn: the poll long-polls (the emulator gives up after 1.5 s)
        # and asks again; a cancelled poll just stops.
        with trio.move_on_after(2.0) as scope:
            await api.poll_events(next_sn)
        assert scope.cancelled_caught

    run(go, emulator)
    assert emulator.stats().get("wait", 0) >= 1


def test_poll_events_session_expired(emulator: EmulatorProcess) -> None:
    async def go(api: MegaApi) -> None:
        await login(api, ALICE, ALICE_PW)
        tree = await api.call({"a": "f", "c": 1})
        emulator.expire_sessions(ALICE)
        with pytest.raises(MegaSessionExpired):
            await api.poll_events(tree["sn"])

    run(go, emulator)


def test_poll_events_retries(emulator: EmulatorProcess) -> None:
    async def go(api: MegaApi) -> None:
        session = await login(api, ALICE, ALICE_PW)
        tree = await api.call({"a": "f", "c": 1})
        root = next(n["h"] for n in tree["f"] if n["t"] == 2)
        key = os.urandom(16)
        await api.call(
            {
                "a": "p",
                "t": root,
                "n": [
                    {
                        "h": "xxxxxxxx",
                        "t": 1,
                        "a": crypto.encrypt_attributes({"n": "d"}, key),
                        "k": crypto.encrypt_key(session.master_key, key),
                    }
                ],
            }
        )
        emulator.fault("sc", "request_error", code=-3)
        emulator.fault("sc", "http", status=500)
        packets, _ = await api.poll_events(tree["sn"])
        assert [p["a"] for p in packets] == ["t"]

    run(go, emulator)
    assert emulator.stats()["sc"] == 3


def test_login_errors_map_cleanly(emulator: EmulatorProcess) -> None:
    emulator.fault("cs:us", "command_error", code=-16)
    with pytest.raises(MegaError, match=r"^MEGA: -16 EBLOCKED"):
        run(lambda api: login(api, ALICE, ALICE_PW), emulator)
    emulator.fault("cs:us", "command_error", code=-26)
    with pytest.raises(MegaError, match="two-factor"):
        run(lambda api: login(api, ALICE, ALICE_PW), emulator)


def test_key_error_is_integrity() -> None:
    err = MegaKeyError(detail="MAC mismatch for node X")
    assert str(err) == "MEGA: -14 EKEY: MAC mismatch for node X"
    assert errno_for(err) == errno.EIO


def test_httpx_log_lines_hide_the_sid(
    emulator: EmulatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        session, _ = run(lambda api: _login_and_ug(api), emulator)
    messages = [r.getMessage() for r in caplog.records]
    assert any("sid=<redacted>" in m for m in messages)
    assert not any(session.sid in m for m in messages)


async def _login_and_ug(api: MegaApi) -> tuple[Session, Any]:
    session = await login(api, ALICE, ALICE_PW)
    return session, await api.call({"a": "ug"})


def test_tsid_login_response() -> None:
    """Accounts without an RSA key pair answer us with a tsid (checked with the master key)."""
    password_key, master_key = os.urandom(16), os.urandom(16)
    handle = "-a1DHeWfguY"
    reply = {
        "u": handle,
        "k": crypto.encrypt_key(password_key, master_key),
        "tsid": crypto.make_tsid(master_key, handle),
    }
    session = _session_from_login(reply, "x@example.com", password_key)
    assert session.sid == reply["tsid"] and session.rsa is None
    assert session.master_key == master_key
    with pytest.raises(MegaKeyError):
        _session_from_login(reply, "x@example.com", os.urandom(16))
    with pytest.raises(MegaKeyError, match="does not belong"):
        _session_from_login({**reply, "u": "AAAAAAAAAAA"}, "x@example.com", password_key)
