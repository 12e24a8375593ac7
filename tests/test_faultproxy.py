"""The loopback fault-injection proxy (megafs/testing/faultproxy.py) against a tiny
HTTP/1.1 upstream (stdlib http.server in a thread) that serves GET/HEAD (with Range) and
accepts PUT, echoing the size and an ETag."""

from __future__ import annotations

import gc
import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from megafs.testing.faultproxy import (
    FaultProxy,
    bandwidth,
    drop_mid_body,
    latency,
    reset,
    slow_down,
    status,
    truncate,
)

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
BIG = os.urandom(5 * 1024 * 1024 + 123)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: dict[str, bytes] = {}
    seen: list[tuple[str, str, dict[str, str]]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _note(self) -> None:
        self.seen.append((self.command, self.path, dict(self.headers.items())))

    def _body(self, data: bytes, code: int = 200, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", '"' + hashlib.md5(data).hexdigest() + '"')
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._note()
        data = self.store.get(self.path)
        if data is None:
            self._body(b"missing", 404)
            return
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng)
            assert m
            a, b = int(m.group(1)), int(m.group(2))
            self._body(data[a : b + 1], 206, {"Content-Range": f"bytes {a}-{b}/{len(data)}"})
        else:
            self._body(data)

    do_HEAD = do_GET

    def do_PUT(self) -> None:
        self._note()
        n = int(self.headers["Content-Length"])
        data = b""
        while len(data) < n:
            chunk = self.rfile.read(min(1 << 16, n - len(data)))
            if not chunk:
                return
            data += chunk
        self.store[self.path] = data
        self._body(str(len(data)).encode())


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # The proxy cuts connections on purpose: a broken pipe here is the test
        # working, not a failure (anything else still prints its traceback).
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    _Handler.store["/obj"] = BIG
    _Handler.store["/small"] = b"hello world\n" * 100
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(upstream: str) -> Iterator[FaultProxy]:
    with FaultProxy.start(upstream, seed=7) as p:
        yield p


def _client(p: FaultProxy) -> httpx.Client:
    return httpx.Client(base_url=p.url, timeout=10)


def test_passthrough_get_put_headers_keepalive(proxy: FaultProxy) -> None:
    _Handler.seen.clear()
    with _client(proxy) as c:
        r = c.put("/up", content=BIG, headers={"X-Amz-Thing": "Keep Me"})
        assert r.status_code == 200 and r.text == str(len(BIG))
        r = c.get("/up")
        assert r.content == BIG
        assert r.headers["etag"] == '"' + hashlib.md5(BIG).hexdigest() + '"'
        r = c.get("/obj", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == BIG[10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{len(BIG)}"
        r = c.head("/obj")
        assert r.headers["content-length"] == str(len(BIG)) and r.content == b""
    host = proxy.url.removeprefix("http://")
    assert [s[1] for s in _Handler.seen] == ["/up", "/up", "/obj", "/obj"]
    for _, _, headers in _Handler.seen:
        assert headers["Host"] == host
    assert _Handler.seen[0][2]["X-Amz-Thing"] == "Keep Me"
    assert _Handler.seen[2][2]["Range"] == "bytes=10-19"
    st = proxy.stats()
    assert st["requests"] == 4
    assert st["connections"] == 1  # keep-alive on the client side
    assert st["bytes_up"] == len(BIG)
    assert st["bytes_down"] == len(str(len(BIG))) + len(BIG) + 10


def test_latency_count_and_regex(proxy: FaultProxy) -> None:
    proxy.add(latency(0.3, path=r"^/small$", method="GET", count=2))
    with _client(proxy) as c:
        t = time.monotonic()
        c.get("/obj", headers={"Range": "bytes=0-0"})  # does not match
        assert time.monotonic() - t < 0.25
        for _ in range(2):
            t = time.monotonic()
            assert c.get("/small").status_code == 200
            assert 0.28 < time.monotonic() - t < 3
        t = time.monotonic()
        c.get("/small")  # count used up
        assert time.monotonic() - t < 0.25
    assert proxy.stats()["faults"] == {"latency": 2}


def test_bandwidth(proxy: FaultProxy) -> None:
    proxy.add(bandwidth(4 * 1024 * 1024))
    with _client(proxy) as c:
        t = time.monotonic()
        assert c.get("/obj").content == BIG  # ~5 MiB at 4 MiB/s
        dt = time.monotonic() - t
    assert 1.0 < dt < 5, dt


def test_status_faults(proxy: FaultProxy) -> None:
    proxy.add(status(500, count=1))
    proxy.add(status(429, b"busy", [("Retry-After", "1")], method="PUT", count=1))
    proxy.add(slow_down(path="^/obj", count=1))
    with _client(proxy) as c:
        r = c.get("/small")
        assert r.status_code == 500 and r.content == b""
        r = c.put("/x", content=BIG)  # body drained, connection stays usable
        assert r.status_code == 429 and r.text == "busy" and r.headers["retry-after"] == "1"
        r = c.get("/obj")
        assert r.status_code == 503
        assert b"<Error><Code>SlowDown</Code>" in r.content
        assert c.get("/small").status_code == 200
    st = proxy.stats()
    assert st["faults"] == {"status": 3}
    assert st["connections"] == 1


def _expect_put(sock: socket.socket, path: str, body: bytes) -> bytes:
    """PUT with "Expect: 100-continue" the way AWS SDKs do it: headers, then wait for the
    100 (at most 2 s) before the body; returns the final response's head and body."""
    sock.sendall(
        f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\n\r\n".encode()
    )
    sock.settimeout(2)
    interim = sock.recv(4096)
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    assert interim.endswith(b"\r\n\r\n"), interim  # nothing but the 100
    sock.settimeout(10)
    sock.sendall(body)
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(65536)
    head, _, rest = reply.partition(b"\r\n\r\n")
    m = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
    assert m, head
    while len(rest) < int(m.group(1)):
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


def test_expect_100_continue(proxy: FaultProxy) -> None:
    proxy.add(latency(0.05))
    proxy.add(status(429, b"busy", method="PUT", path="^/refused$", count=1))
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        reply = _expect_put(sock, "/expect", BIG)
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(str(len(BIG)).encode())
        # A status fault answers after the body (read and dropped); keep-alive holds.
        reply = _expect_put(sock, "/refused", b"abc")
        assert reply.startswith(b"HTTP/1.1 429 ") and reply.endswith(b"busy")
        reply = _expect_put(sock, "/expect2", b"small")
        assert reply.startswith(b"HTTP/1.1 200 ")
    assert _Handler.store["/expect"] == BIG and _Handler.store["/expect2"] == b"small"
    assert proxy.stats()["connections"] == 1


def test_probability_is_seeded(upstream: str) -> None:
    def run() -> list[int]:
        with FaultProxy.start(upstream, seed=42) as p:
            p.add(status(503, probability=0.5))
            with httpx.Client(base_url=p.url, timeout=10) as c:
                return [c.get("/small").status_code for _ in range(20)]

    a, b = run(), run()
    assert a == b and 503 in a and 200 in a


def test_drop_mid_body(proxy: FaultProxy) -> None:
    proxy.add(drop_mid_body(1000, count=1))
    with _client(proxy) as c:
        with pytest.raises(httpx.RemoteProtocolError), c.stream("GET", "/obj") as r:
            assert r.status_code == 200
            got = b""
            for chunk in r.iter_bytes():
                got += chunk
        assert c.get("/obj").content == BIG  # a new connection works
    assert proxy.stats()["connections"] == 2


def test_truncate(proxy: FaultProxy) -> None:
    proxy.add(truncate(count=1))
    with _client(proxy) as c:
        got = bytearray()
        with pytest.raises(httpx.RemoteProtocolError), c.stream("GET", "/obj") as r:
            assert r.headers["content-length"] == str(len(BIG))
            for chunk in r.iter_bytes():
                got += chunk
        assert len(got) == len(BIG) // 2 and bytes(got) == BIG[: len(got)]


def test_reset(proxy: FaultProxy) -> None:
    proxy.add(reset(method="GET", count=1))
    with _client(proxy) as c:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            c.get("/small")
        assert c.get("/small").status_code == 200
    assert proxy.stats()["faults"] == {"reset": 1}


def test_down_up(proxy: FaultProxy) -> None:
    with _client(proxy) as c:
        assert c.get("/small").status_code == 200
        proxy.down()
        with pytest.raises(httpx.TransportError):
            c.get("/small")
        with pytest.raises(httpx.ConnectError):
            httpx.get(proxy.url + "/small", timeout=5)
        proxy.up()
        assert c.get("/small").status_code == 200


def test_down_closes_streaming_response(proxy: FaultProxy) -> None:
    proxy.add(bandwidth(1024 * 1024))
    with _client(proxy) as c:
        with pytest.raises(httpx.RemoteProtocolError), c.stream("GET", "/obj") as r:
            for i, _ in enumerate(r.iter_bytes()):
                if i == 2:
                    proxy.down()
    proxy.up()
    proxy.clear()
    with _client(proxy) as c:
        assert c.get("/small").status_code == 200


def test_stopping_closes_open_connections(upstream: str) -> None:
    """A connection still open when the proxy stops is closed by the proxy (client and
    upstream side), not left to the garbage collector, which warns (ResourceWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FaultProxy.start(upstream) as proxy:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            client.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(_Handler.store["/small"]):
                reply += client.recv(65536)
            # The client keeps its keep-alive connection while the proxy stops.
        with client:
            assert client.recv(1) == b""
        gc.collect()
    assert [str(w.message) for w in caught] == []


def test_cli(upstream: str) -> None:
    cmd = [str(ROOT / "scripts/fault-proxy"), "--upstream", upstream, "--latency", "0.02"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            assert m, line
            r = httpx.get(m.group(1) + "/small", timeout=10)
            assert r.status_code == 200 and r.content == _Handler.store["/small"]
        finally:
            proc.terminate()
            proc.wait(10)
