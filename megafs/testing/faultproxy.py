"""A loopback HTTP/1.1 fault-injection reverse proxy for tests and benchmarks.

It sits between megafs and a real S3 or WebDAV server on 127.0.0.1 and makes that server
slow (latency, bandwidth), flaky (status codes, resets, bodies cut short) or absent
(``down``). Bodies are streamed chunk by chunk, never buffered whole. Requests and
responses (Host included) are forwarded with their headers unchanged, so S3 SigV4
signatures made for the proxy's ``host:port`` still verify upstream.

Usage from sync tests::

    with FaultProxy.start("http://127.0.0.1:9000", seed=1) as proxy:
        proxy.url                        # "http://127.0.0.1:PORT"
        proxy.add(latency(0.02))
        proxy.add(status(503, method="GET", path=r"^/bucket/", count=2))
        proxy.add(slow_down(probability=0.1))
        proxy.down(); proxy.up(); proxy.clear(); proxy.stats()

From a trio nursery: ``proxy = FaultProxy(upstream); port = await nursery.start(proxy.serve)``.
CLI: ``scripts/fault-proxy --listen 127.0.0.1:PORT --upstream URL [--latency S] [--bandwidth 50M]``.

Concurrency rules:

* All networking runs in ONE trio run (the loop thread when started with ``start()``).
* The accept task owns the listening socket; it is closed by ``down()`` and rebound (same
  port) by ``up()``, so connections are refused meanwhile.
* Each accepted client connection gets one task, which owns both the client stream and
  its single upstream stream (opened lazily, kept alive, one request at a time: the
  request body is streamed up, then the response body down). Nothing else touches them;
  ``down()``/shutdown cancel that task's cancel scope and the task closes both streams.
* Thread boundary: ``add``/``clear``/``stats`` only touch the fault list and counters under
  ``self._lock`` (a ``threading.Lock`` held only for short, non-blocking sections, also by
  the trio side). ``down``/``up``/``stop`` from another thread are run inside the trio
  loop with ``trio.from_thread.run_sync``.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import select
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

CHUNK = 64 * 1024
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>faultproxy</RequestId></Error>"
)

KINDS = ("latency", "bandwidth", "status", "drop_mid_body", "truncate", "reset")


@dataclass
class Fault:
    """One fault rule. ``method`` (exact, case-insensitive) and ``path`` (regex searched in
    the request target) select requests; ``count`` is how many requests it fires for (-1:
    until cleared); ``probability`` is checked with the proxy's seeded RNG."""

    kind: str
    method: str | None = None
    path: str | None = None
    count: int = -1
    probability: float = 1.0
    seconds: float = 0.0
    bytes_per_second: float = 0.0
    code: int = 0
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    after_bytes: int = 0
    # Bandwidth faults: the time at which the shared link is free again (trio clock).
    link_free: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        self._regex = re.compile(self.path) if self.path is not None else None

    def matches(self, method: str, target: str) -> bool:
        if self.count == 0:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self._regex is None or self._regex.search(target) is not None


def latency(seconds: float, **match: Any) -> Fault:
    """Wait ``seconds`` before forwarding each matching request."""
    return Fault("latency", seconds=seconds, **match)


def bandwidth(bytes_per_second: float, **match: Any) -> Fault:
    """Limit request and response bodies of matching requests to one shared link."""
    return Fault("bandwidth", bytes_per_second=bytes_per_second, **match)


def status(
    code: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None, **match: Any
) -> Fault:
    """Answer with ``code`` without forwarding (the request body is read and discarded)."""
    return Fault("status", code=code, body=body, headers=list(headers or []), **match)


def slow_down(**match: Any) -> Fault:
    """An S3-style ``503 SlowDown`` with its XML error body."""
    return status(503, SLOWDOWN_BODY, [("Content-Type", "application/xml")], **match)


def drop_mid_body(after_bytes: int, **match: Any) -> Fault:
    """Forward, send the response headers and ``after_bytes`` of the body, then close."""
    return Fault("drop_mid_body", after_bytes=after_bytes, **match)


def truncate(**match: Any) -> Fault:
    """Forward, send the headers (full Content-Length) and half the body, then close."""
    return Fault("truncate", **match)


def reset(**match: Any) -> Fault:
    """Close the client connection (TCP RST) without any response, before forwarding."""
    return Fault("reset", **match)


class _Abort(Exception):
    """Close this client connection now (fault fired or peer misbehaved)."""

    def __init__(self, rst: bool = False) -> None:
        self.rst = rst


def _rst_close(stream: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _stale(stream: trio.SocketStream) -> bool:
    """An idle keep-alive upstream connection that is readable has been closed (or sent
    junk): do not reuse it."""
    try:
        readable, _, _ = select.select([stream.socket.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class FaultProxy:
    """The proxy. Create it, then either ``await nursery.start(proxy.serve)`` in trio or use
    ``with FaultProxy.start(upstream) as proxy:`` (background thread, sync control)."""

    def __init__(
        self,
        upstream: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        idle_timeout: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://HOST:PORT, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._faults: list[Fault] = []
        self._counters: Counter[str] = Counter()
        self._fired: Counter[str] = Counter()
        self._down = False
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._loop_thread: int | None = None
        self._conn_scopes: set[trio.CancelScope] = set()
        self._listener: trio.SocketListener | None = None
        self._accept_scope: trio.CancelScope | None = None
        self._up_event: trio.Event | None = None
        self._serve_scope: trio.CancelScope | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ----- control (any thread) -----

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            self._faults = [f for f in self._faults if f is not fault]

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def stats(self) -> dict[str, Any]:
        """``requests``, ``connections``, ``bytes_up`` (request bodies), ``bytes_down``
        (response bodies), ``faults`` (fired, by kind)."""
        with self._lock:
            out: dict[str, Any] = {
                k: self._counters[k] for k in ("requests", "connections", "bytes_up", "bytes_down")
            }
            out["faults"] = dict(self._fired)
            return out

    def down(self) -> None:
        """Refuse new connections and close the existing ones, until ``up()``."""
        self._in_loop(self._down_sync)

    def up(self) -> None:
        self._in_loop(self._up_sync)

    def _in_loop(self, fn: Any) -> None:
        if self._loop_thread is None or self._loop_thread == threading.get_ident():
            fn()
        else:
            trio.from_thread.run_sync(fn, trio_token=self._trio_token)

    def _down_sync(self) -> None:
        self._down = True
        self._close_listener()
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for scope in list(self._conn_scopes):
            scope.cancel()
        with self._lock:
            self._fired["down"] += 1

    def _up_sync(self) -> None:
        self._down = False
        if self._listener is None:
            self._bind()
        if self._up_event is not None:
            self._up_event.set()

    # ----- fault selection -----

    def _select(self, method: str, target: str) -> list[Fault]:
        with self._lock:
            self._counters["requests"] += 1
            fired = []
            for f in self._faults:
                if not f.matches(method, target):
                    continue
                if f.probability < 1.0 and self._rng.random() >= f.probability:
                    continue
                if f.count > 0:
                    f.count -= 1
                fired.append(f)
                self._fired[f.kind] += 1
            return fired

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self._counters[key] += n

    # ----- serving (trio) -----

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started(port)`` once listening."""
        self._trio_token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        try:
            async with trio.open_nursery() as nursery:
                self._bind()
                task_status.started(self.port)
                while True:
                    if self._listener is None:  # down: wait for up() to rebind
                        self._up_event = trio.Event()
                        await self._up_event.wait()
                        continue
                    with trio.CancelScope() as self._accept_scope:
                        try:
                            stream = await self._listener.accept()
                        except trio.ClosedResourceError:
                            continue
                        nursery.start_soon(self._handle, stream)
        finally:
            self._close_listener()

    def _bind(self) -> None:
        """Synchronous, so that when ``up()`` returns the port is accepting again."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    def _close_listener(self) -> None:
        """Synchronous, so that when ``down()`` returns new connections are refused."""
        if self._listener is not None:
            self._listener.socket.close()
            self._listener = None

    async def _handle(self, client: trio.SocketStream) -> None:
        self._count("connections", 1)
        if self._down:
            _rst_close(client)
            await client.aclose()
            return
        conn = _Conn(self, client)
        try:
            with trio.CancelScope() as scope:
                self._conn_scopes.add(scope)
                try:
                    await conn.run()
                except _Abort as e:
                    if e.rst:
                        _rst_close(client)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                    pass
                except (h11.ProtocolError, OSError):
                    pass
                finally:
                    self._conn_scopes.discard(scope)
        finally:
            # Also when the whole proxy stops (its cancellation passes through here):
            # never leave the sockets to the garbage collector.
            with trio.CancelScope(shield=True):
                await conn.close()

    # ----- background-thread runner -----

    @classmethod
    @contextlib.contextmanager
    def start(cls, upstream: str, **kwargs: Any) -> Iterator[FaultProxy]:
        """Run a proxy in a background thread for the ``with`` block; stops it (closing
        every connection) on exit."""
        proxy = cls(upstream, **kwargs)
        ready = threading.Event()
        errors: list[BaseException] = []

        async def main() -> None:
            with trio.CancelScope() as proxy._serve_scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(proxy.serve)
                    ready.set()

        def run() -> None:
            try:
                trio.run(main)
            except BaseException as e:
                errors.append(e)
            finally:
                ready.set()

        thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        thread.start()
        if not ready.wait(10) or errors:
            raise RuntimeError(f"fault proxy did not start: {errors!r}")
        try:
            yield proxy
        finally:
            scope = proxy._serve_scope
            if scope is not None and thread.is_alive():
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(scope.cancel, trio_token=proxy._trio_token)
            thread.join(10)
            if thread.is_alive():
                raise RuntimeError("fault proxy did not stop within 10 s")
            if errors:
                raise RuntimeError(f"fault proxy failed: {errors!r}")


class _Conn:
    """One client connection and its (lazily opened, kept-alive) upstream connection.
    Owned by exactly one task: ``FaultProxy._handle``."""

    def __init__(self, proxy: FaultProxy, client: trio.SocketStream) -> None:
        self.p = proxy
        self.client = client
        self.cconn = h11.Connection(h11.SERVER)
        self.up: trio.SocketStream | None = None
        self.uconn: h11.Connection | None = None

    async def close(self) -> None:
        await self.client.aclose()
        await self._close_up()

    async def _close_up(self) -> None:
        if self.up is not None:
            await self.up.aclose()
        self.up = None
        self.uconn = None

    async def _recv(self, stream: trio.SocketStream) -> bytes:
        with trio.fail_after(self.p.idle_timeout):
            return await stream.receive_some(CHUNK)

    async def _send(self, stream: trio.SocketStream, data: bytes) -> None:
        if data:
            with trio.fail_after(self.p.idle_timeout):
                await stream.send_all(data)

    async def _client_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            ev = self.cconn.next_event()
            if ev is h11.NEED_DATA:
                self.cconn.receive_data(await self._recv(self.client))
                continue
            return ev

    async def _up_event(self) -> Any:
        assert self.uconn is not None and self.up is not None
        while True:
            ev = self.uconn.next_event()
            if ev is h11.NEED_DATA:
                self.uconn.receive_data(await self._recv(self.up))
                continue
            return ev

    async def _throttle(self, faults: list[Fault], n: int) -> None:
        for f in faults:
            if f.kind == "bandwidth" and f.bytes_per_second > 0:
                now = trio.current_time()
                f.link_free = max(now, f.link_free) + n / f.bytes_per_second
                await trio.sleep_until(f.link_free)

    async def run(self) -> None:
        while True:
            ev = await self._client_event()
            if isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                return
            if not isinstance(ev, h11.Request):
                raise _Abort()
            await self._one(ev)
            if self.cconn.our_state is h11.MUST_CLOSE or self.cconn.their_state is h11.MUST_CLOSE:
                return
            self.cconn.start_next_cycle()

    async def _one(self, req: h11.Request) -> None:
        method = req.method.decode("latin-1")
        target = req.target.decode("latin-1")
        faults = self.p._select(method, target)
        kinds = {f.kind for f in faults}
        if "reset" in kinds:
            raise _Abort(rst=True)
        for f in faults:
            if f.kind == "latency":
                await trio.sleep(f.seconds)
        if self.cconn.they_are_waiting_for_100_continue:
            # "Expect: 100-continue" (AWS SDKs send it on larger PUTs): the body is read
            # from the client before anything comes back from upstream, so say 100 now
            # (upstream's own 100 is skipped below); otherwise the client would wait out
            # its expect timeout (1 s in Go's AWS SDK) on every such request.
            await self._send(
                self.client, self.cconn.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        terminal = next((f for f in faults if f.kind == "status"), None)
        if terminal is not None:
            await self._drain_request()
            headers = [*terminal.headers, ("Content-Length", str(len(terminal.body)))]
            await self._send(
                self.client,
                self.cconn.send(h11.Response(status_code=terminal.code, headers=headers)),
            )
            await self._send(self.client, self.cconn.send(h11.Data(data=terminal.body)))
            await self._send(self.client, self.cconn.send(h11.EndOfMessage()))
            return

        # Forward: (re)connect upstream, send the request head, stream the body up.
        if self.up is not None and _stale(self.up):
            await self._close_up()
        if self.up is None:
            with trio.fail_after(self.p.connect_timeout):
                self.up = await trio.open_tcp_stream(*self.p.upstream)
            self.uconn = h11.Connection(h11.CLIENT)
        assert self.uconn is not None and self.up is not None
        head = h11.Request(method=req.method, target=req.target, headers=req.headers.raw_items())
        await self._send(self.up, self.uconn.send(head))
        while True:
            ev = await self._client_event()
            if isinstance(ev, h11.Data):
                await self._throttle(faults, len(ev.data))
                self.p._count("bytes_up", len(ev.data))
                await self._send(self.up, self.uconn.send(ev))
            elif isinstance(ev, h11.EndOfMessage):
                await self._send(self.up, self.uconn.send(ev))
                break
            else:
                raise _Abort()

        # Response head (skipping 1xx), then the body down.
        while True:
            rev = await self._up_event()
            if isinstance(rev, h11.InformationalResponse):
                continue
            if isinstance(rev, h11.Response):
                break
            raise _Abort()
        limit: int | None = None
        cut = next((f for f in faults if f.kind in ("drop_mid_body", "truncate")), None)
        if cut is not None:
            if cut.kind == "drop_mid_body":
                limit = cut.after_bytes
            else:
                length = next(
                    (int(v) for k, v in rev.headers if k.lower() == b"content-length"), None
                )
                limit = (length // 2) if length is not None else 0
        resp = h11.Response(
            status_code=rev.status_code, headers=rev.headers.raw_items(), reason=rev.reason
        )
        await self._send(self.client, self.cconn.send(resp))
        sent = 0
        while True:
            rev = await self._up_event()
            if isinstance(rev, h11.Data):
                data = rev.data
                if limit is not None and sent + len(data) >= limit:
                    data = data[: limit - sent]
                await self._throttle(faults, len(data))
                self.p._count("bytes_down", len(data))
                await self._send(self.client, self.cconn.send(h11.Data(data=data)))
                sent += len(data)
                if limit is not None and sent >= limit:
                    raise _Abort()
            elif isinstance(rev, h11.EndOfMessage):
                if limit is not None:
                    raise _Abort()
                await self._send(self.client, self.cconn.send(h11.EndOfMessage()))
                break
            else:
                raise _Abort()
        if self.uconn.our_state is h11.DONE and self.uconn.their_state is h11.DONE:
            self.uconn.start_next_cycle()
        else:
            await self._close_up()

    async def _drain_request(self) -> None:
        while True:
            ev = await self._client_event()
            if isinstance(ev, h11.Data):
                self.p._count("bytes_up", len(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                return
            else:
                raise _Abort()


def _parse_rate(text: str) -> float:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)(i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad bandwidth {text!r} (e.g. 50M)")
    return float(m.group(1)) * units[m.group(2).upper()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fault-proxy", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: pick one)")
    ap.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    ap.add_argument("--bandwidth", type=_parse_rate, default=0.0, help="bytes/s, e.g. 50M")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    proxy = FaultProxy(args.upstream, host=host or "127.0.0.1", port=int(port), seed=args.seed)
    if args.latency > 0:
        proxy.add(latency(args.latency))
    if args.bandwidth > 0:
        proxy.add(bandwidth(args.bandwidth))

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            print(f"fault-proxy listening on {proxy.url} -> {args.upstream}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
