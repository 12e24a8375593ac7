"""What the HTTP stores (S3, WebDAV, MEGA) share about httpx.

:class:`AsyncClient` is the client they use: httpx's, with each response freed as
soon as its last user drops it. httpx binds a response and its body stream in a
reference cycle (the stream keeps the response to time it), so a response, and
the body it holds (a whole chunk: up to 4 MiB), lived until Python's cycle
collector ran, which it does after so many container allocations, not bytes: in
a cold 1 GiB read from S3 hundreds of MiB of read bodies waited for it (daemon
peak RSS 333-410 MiB; with the collector run every 0.2 s, 246-252 MiB).

Importing this module also sets how much httpcore asks of the socket per read of a
response: 64 KiB by default, 1 MiB here. A chunk arrives as a response of up to
4 MiB, and every read passes through httpcore, h11 and httpx on the event loop's
thread (the thread that also answers the kernel): with 64 KiB reads that was most
of that thread's time in a cold read from S3 (measured, 1 GiB through a 20 ms
loopback proxy: daemon CPU 8.2-9.0 -> 5.4-6.0 s with whole-chunk read-ahead and
these reads together). A read returns what has arrived, so small responses are
not delayed. httpcore has no per-client setting for it; the class attribute is
what its connections read.
"""

from __future__ import annotations

from typing import Any, Final

import httpcore
import httpx

#: Bytes asked of the socket per read of a response body.
READ_SIZE: Final = 1 << 20

for _cls in (httpcore.AsyncHTTP11Connection, httpcore.HTTP11Connection):
    if getattr(_cls, "READ_NUM_BYTES", READ_SIZE) < READ_SIZE:
        _cls.READ_NUM_BYTES = READ_SIZE


class AsyncClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` whose responses are not left in a reference cycle once
    their body is read (see the module docstring)."""

    async def send(
        self, request: httpx.Request, *, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        response = await super().send(request, stream=stream, **kwargs)
        if not stream:
            # The body is read and the stream closed: the stream object (which holds
            # the response) is dropped, which breaks the cycle. ``content`` stays.
            response.stream = httpx.ByteStream(b"")
        return response
