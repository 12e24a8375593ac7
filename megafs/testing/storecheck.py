"""The object store contract as a reusable test suite (cf. trio.testing.check_one_way_stream).

:func:`check_store` runs every check against a fresh, empty store from the caller's
factory and closes it afterwards. A failing check raises :class:`AssertionError` (or
the store's unexpected exception, inside an ``ExceptionGroup`` if it came from one of
the concurrent tasks) with a note naming the check and the store. The checks use
keys of lowercase ASCII segments, valid for every store.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import trio

from megafs.errors import ObjectNotFound, PreconditionFailed
from megafs.stores.base import ObjectInfo, ObjectStore

StoreFactory = Callable[[], Awaitable[ObjectStore]]
"""An async callable returning a new, empty store."""


async def check_store(make_store: StoreFactory) -> None:
    """Check that the stores ``make_store`` returns follow the ObjectStore contract.

    ``make_store`` is called once per check and must return an empty store each time.
    """
    for check in _CHECKS:
        store = await make_store()
        try:
            await check(store)
        except Exception as exc:
            exc.add_note(f"store check {check.__name__} failed on {store.url}")
            raise
        finally:
            await store.aclose()


# -- helpers -----------------------------------------------------------------


def _show(value: object) -> str:
    if isinstance(value, bytes) and len(value) > 32:
        return f"<{len(value)} bytes {value[:16]!r}...>"
    return repr(value)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _expect_equal(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}: expected {_show(expected)}, got {_show(actual)}")


@contextmanager
def _raises(exc_type: type[Exception], what: str) -> Iterator[None]:
    try:
        yield
    except exc_type:
        return
    raise AssertionError(f"{what}: expected {exc_type.__name__}, nothing was raised")


# -- checks ------------------------------------------------------------------


async def _check_roundtrip(store: ObjectStore) -> None:
    big = random.Random(1).randbytes(1 << 20)
    for key, data in (("t/empty", b""), ("t/one", b"\x00"), ("t/mib", big)):
        etag = await store.put(key, data)
        _expect(isinstance(etag, str) and etag != "", f"put({key!r}) returned ETag {etag!r}")
        _expect_equal(await store.get(key), data, f"get({key!r})")
    # A bytearray is taken as it is (sealed chunks come in one): stored, not refused.
    sealed = bytearray(big[:70_000])
    await store.put("t/bytearray", sealed)
    _expect_equal(await store.get("t/bytearray"), bytes(sealed), "get('t/bytearray')")


async def _check_ranged_get(store: ObjectStore) -> None:
    data = bytes(range(256)) * 4
    await store.put("r/obj", data)
    ranges: list[tuple[int, int | None]] = [
        (0, None),
        (10, None),
        (10, 20),
        (0, 1),
        (7, 7),
        (1000, 5000),
        (1023, None),
        (1024, None),
        (1024, 2000),
        (5000, None),
    ]
    for start, end in ranges:
        got = await store.get("r/obj", start, end)
        _expect_equal(got, data[start:end], f"get('r/obj', {start}, {end}) of 1024 bytes")


async def _check_missing(store: ObjectStore) -> None:
    for key in ("m/none", "m/deep/er/none"):
        with _raises(ObjectNotFound, f"get({key!r}) of a missing object"):
            await store.get(key)
        with _raises(ObjectNotFound, f"get({key!r}, 5, 10) of a missing object"):
            await store.get(key, 5, 10)
        with _raises(ObjectNotFound, f"head({key!r}) of a missing object"):
            await store.head(key)


async def _check_put_replaces(store: ObjectStore) -> None:
    await store.put("x/obj", b"the first, longer version")
    await store.put("x/obj", b"second")
    _expect_equal(await store.get("x/obj"), b"second", "get after replacing put")
    _expect_equal((await store.head("x/obj")).size, 6, "head size after replacing put")


async def _check_head(store: ObjectStore) -> None:
    etag = await store.put("h/obj", b"12345")
    _expect_equal(await store.head("h/obj"), ObjectInfo("h/obj", 5, etag), "head")
    etag = await store.put("h/empty", b"")
    _expect_equal(await store.head("h/empty"), ObjectInfo("h/empty", 0, etag), "head of empty")


async def _check_etag_changes(store: ObjectStore) -> None:
    first = await store.put("e/obj", b"first content")
    second = await store.put("e/obj", b"other content")  # same size
    _expect(first != second, f"ETag did not change on replace: {first!r}")
    _expect_equal((await store.head("e/obj")).etag, second, "head ETag after replace")


async def _check_if_none_match(store: ObjectStore) -> None:
    etag = await store.put("n/obj", b"one", if_none_match=True)
    _expect_equal((await store.head("n/obj")).etag, etag, "ETag of a create-only put")
    with _raises(PreconditionFailed, "create-only put over an existing object"):
        await store.put("n/obj", b"two", if_none_match=True)
    _expect_equal(await store.get("n/obj"), b"one", "content after a refused create")
    await store.delete("n/obj")
    await store.put("n/obj", b"three", if_none_match=True)
    _expect_equal(await store.get("n/obj"), b"three", "create-only put after delete")


async def _check_if_match(store: ObjectStore) -> None:
    first = await store.put("i/obj", b"version 1")
    second = await store.put("i/obj", b"version 2", if_match=first)
    _expect_equal(await store.get("i/obj"), b"version 2", "content after put with right ETag")
    _expect_equal((await store.head("i/obj")).etag, second, "ETag after put with right ETag")
    with _raises(PreconditionFailed, "put with a stale ETag"):
        await store.put("i/obj", b"version 3", if_match=first)
    with _raises(PreconditionFailed, "put with a made-up ETag"):
        await store.put("i/obj", b"version 3", if_match="not-an-etag")
    _expect_equal(await store.get("i/obj"), b"version 2", "content after refused puts")
    with _raises(PreconditionFailed, "put with if_match on a missing object"):
        await store.put("i/missing", b"data", if_match=second)
    with _raises(ObjectNotFound, "head after a refused if_match put on a missing object"):
        await store.head("i/missing")


async def _check_delete(store: ObjectStore) -> None:
    await store.put("d/obj", b"doomed")
    await store.delete("d/obj")
    with _raises(ObjectNotFound, "get after delete"):
        await store.get("d/obj")
    with _raises(ObjectNotFound, "head after delete"):
        await store.head("d/obj")
    _expect_equal(await store.list("d/"), [], "list after delete")
    await store.delete("d/obj")
    await store.delete("d/never/existed")


async def _check_list(store: ObjectStore) -> None:
    keys = ["a", "ab", "b/x", "c/ab/abcd", "c/ab/abce", "c/ac/0001", "c/b", "megafs.header"]
    shuffled = list(keys)
    random.Random(2).shuffle(shuffled)
    infos: dict[str, ObjectInfo] = {}
    for i, key in enumerate(shuffled):
        etag = await store.put(key, b"x" * i)
        infos[key] = ObjectInfo(key, i, etag)

    def expected(prefix: str) -> list[ObjectInfo]:
        return [infos[k] for k in sorted(keys) if k.startswith(prefix)]

    for prefix in ("", "a", "ab", "b", "b/", "c/", "c/a", "c/ab/", "c/ab/abc", "c/ab/abcd"):
        _expect_equal(await store.list(prefix), expected(prefix), f"list({prefix!r})")
    for prefix in ("zz", "c/ab/abcde", "c/zz/", "d/"):
        _expect_equal(await store.list(prefix), [], f"list({prefix!r})")


async def _check_list_empty(store: ObjectStore) -> None:
    _expect_equal(await store.list(), [], "list() of an empty store")
    _expect_equal(await store.list("c/"), [], "list('c/') of an empty store")


async def _check_concurrent_puts(store: ObjectStore) -> None:
    payloads = {f"p/{i:03d}": f"payload {i};".encode() * (i + 1) for i in range(50)}
    async with trio.open_nursery() as nursery:
        for key, data in payloads.items():
            nursery.start_soon(store.put, key, data)
    listed = await store.list("p/")
    _expect_equal([info.key for info in listed], sorted(payloads), "keys after concurrent puts")
    for key, data in payloads.items():
        _expect_equal(await store.get(key), data, f"get({key!r}) after concurrent puts")


async def _check_concurrent_create(store: ObjectStore) -> None:
    winners: list[int] = []

    async def attempt(i: int) -> None:
        try:
            await store.put("race/obj", f"writer {i}".encode(), if_none_match=True)
        except PreconditionFailed:
            return
        winners.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(attempt, i)
    _expect_equal(len(winners), 1, f"winners of 10 concurrent create-only puts ({winners})")
    _expect_equal(await store.get("race/obj"), f"writer {winners[0]}".encode(), "race winner")


async def _check_read_during_replace(store: ObjectStore) -> None:
    versions = [bytes([i]) * (100_000 + 7_919 * i) for i in range(16)]
    allowed = set(versions)
    await store.put("v/obj", versions[0])
    done = trio.Event()

    async def writer() -> None:
        for version in versions[1:]:
            await store.put("v/obj", version)
        done.set()

    async def reader() -> None:
        reads = 0
        while not done.is_set() or reads < 3:
            data = await store.get("v/obj")
            if data not in allowed:
                bad_reads.append(data)
                return
            reads += 1

    bad_reads: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        nursery.start_soon(reader)
        nursery.start_soon(reader)
    _expect(
        not bad_reads,
        f"read during replace saw a mix or a prefix: {[_show(b) for b in bad_reads]}",
    )
    _expect_equal(await store.get("v/obj"), versions[-1], "content after the last replace")


_CHECKS: list[Callable[[ObjectStore], Awaitable[None]]] = [
    _check_roundtrip,
    _check_ranged_get,
    _check_missing,
    _check_put_replaces,
    _check_head,
    _check_etag_changes,
    _check_if_none_match,
    _check_if_match,
    _check_delete,
    _check_list,
    _check_list_empty,
    _check_concurrent_puts,
    _check_concurrent_create,
    _check_read_during_replace,
]
