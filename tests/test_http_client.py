"""megafs.stores.http: the HTTP stores' shared client.

Against a real HTTP server on 127.0.0.1 (the standard library's), so httpx's whole
request path runs: a response is freed when its last user drops it (no reference
cycle left for Python's collector), its body stays readable, streamed responses
still stream, and httpcore reads bodies 1 MiB at a time.
"""

from __future__ import annotations

import gc
import http.server
import threading
import weakref
from collections.abc import Iterator

import httpcore
import httpx
import pytest
import trio

from megafs.stores import http as mhttp

BODY = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/obj"
    finally:
        server.shutdown()
        server.server_close()


def _freed_when_dropped(client_class: type[httpx.AsyncClient], url: str) -> bool:
    async def main() -> bool:
        async with client_class() as client:
            response = await client.get(url)
            assert response.status_code == 200
            assert response.content == BODY
            ref = weakref.ref(response)
            del response
            return ref() is None

    enabled = gc.isenabled()
    gc.disable()  # only reference counting may free it
    try:
        return trio.run(main)
    finally:
        if enabled:
            gc.enable()


def test_response_is_freed_without_the_cycle_collector(url: str) -> None:
    assert _freed_when_dropped(mhttp.AsyncClient, url)


def test_streamed_response_still_streams(url: str) -> None:
    async def main() -> bytes:
        async with mhttp.AsyncClient() as client:
            async with client.stream("GET", url) as response:
                return b"".join([piece async for piece in response.aiter_bytes()])

    assert trio.run(main) == BODY


def test_bodies_are_read_a_mebibyte_at_a_time() -> None:
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES >= mhttp.READ_SIZE == 1 << 20
